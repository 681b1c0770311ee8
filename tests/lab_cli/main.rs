//! `npc-lab`: a local "cluster" from Kubernetes manifests, in network namespaces, with the npc
//! agent enforcing the manifests' NetworkPolicies (run it through `cargo xtask lab` and
//! `cargo xtask demo`). Needs root.
//!
//! * `npc-lab up DIR [--routed] [--name NAME] [--agent PATH | --no-agent]`: one network
//!   namespace per Pod with the Pod's IP(s), its host veth on a bridge of the node namespace
//!   (or a /32 route with `--routed`), a TCP/UDP echo responder on every declared container
//!   port, and `npc-agent --manifests DIR` in the node namespace. Returns once the agent's
//!   `/readyz` answers 200; the lab lives on until `down`.
//! * `npc-lab probe [--name NAME] [--timeout-ms N] [--json]`: the reachability matrix.
//! * `npc-lab down [--name NAME]`: removes everything `up` made.
//! * `npc-lab demo [DIR]`: up without the policies, matrix, apply them, matrix, what closed,
//!   down.
//!
//! State: `/run/npc-lab/<name>.json` (see `state.rs`), logs beside it.
use std::{io::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod demo;
mod manifests;
mod plan;
mod probe;
mod serve;
mod state;
mod up;

/// The lab name when `--name` is not given.
pub const DEFAULT_NAME: &str = "default";

#[derive(Parser)]
#[command(
    name = "npc-lab",
    about = "A local cluster from manifests, in network namespaces, enforced by npc-agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct AgentArgs {
    /// The npc-agent binary [default: npc-agent next to npc-lab].
    #[arg(
        long,
        value_name = "PATH",
        env = "NPC_AGENT",
        conflicts_with = "no_agent"
    )]
    agent: Option<PathBuf>,
    /// No agent: the lab without enforcement.
    #[arg(long)]
    no_agent: bool,
    /// How long the agent may take to answer /readyz.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    ready_timeout: u64,
}

impl AgentArgs {
    fn agent(&self) -> Result<Option<PathBuf>> {
        if self.no_agent {
            return Ok(None);
        }
        match &self.agent {
            Some(p) => Ok(Some(p.clone())),
            None => up::default_agent().map(Some),
        }
    }
}

#[derive(clap::Args, Clone)]
struct ProbeArgs {
    /// How long one connection attempt may take (a blocked TCP connect waits that long).
    #[arg(long, value_name = "N", default_value_t = 400)]
    timeout_ms: u64,
    /// Connection attempts in flight at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    parallel: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab from the manifests in DIR and start the agent on DIR.
    Up {
        /// Directory of manifests (*.yaml, *.yml, *.json): Namespaces, Pods (with
        /// status.podIP(s) and container ports), NetworkPolicies.
        dir: PathBuf,
        /// Pods get /32 (/128) routes instead of bridge ports.
        #[arg(long)]
        routed: bool,
        /// The lab's name (several labs may run at once).
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Print the reachability matrix: rows are clients, columns are the servers' declared
    /// ports; `.` connected, `X` blocked.
    Probe {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        #[command(flatten)]
        probe: ProbeArgs,
        /// Every probe as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Stop the agent and the responders, remove the namespaces, pins and state.
    Down {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Up without DIR's policy files, matrix, apply them, matrix, what they blocked, down.
    Demo {
        /// An example directory: cluster files (Namespaces, Pods) and policy files (only
        /// NetworkPolicies).
        #[arg(default_value = "examples/sock-shop")]
        dir: PathBuf,
        #[arg(long, default_value = "demo")]
        name: String,
        #[arg(long)]
        routed: bool,
        #[command(flatten)]
        agent: AgentArgs,
        #[command(flatten)]
        probe: ProbeArgs,
        /// How long the agent gets to apply the policies before the second matrix.
        #[arg(long, value_name = "N", default_value_t = 2000)]
        settle_ms: u64,
    },
    /// (internal) The lab's long-lived process: reads a plan on stdin, builds the lab, runs
    /// the responders until SIGTERM.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("npc-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn require_root() -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("npc-lab must run as root (network namespaces, BPF)");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Up {
            dir,
            routed,
            name,
            agent,
        } => {
            require_root()?;
            state::check_name(&name)?;
            up::cleanup_on_signal(&name, || {})?;
            up::up(&up::UpOptions {
                dir,
                name: name.clone(),
                routed,
                agent: agent.agent()?,
                ready_timeout: Duration::from_secs(agent.ready_timeout),
                verbose: true,
            })?;
            let name_arg = if name == DEFAULT_NAME {
                String::new()
            } else {
                format!(" --name {name}")
            };
            // How the user runs us (`cargo xtask lab` sets it).
            let prog = std::env::var("NPC_LAB_PROG").unwrap_or_else(|_| "npc-lab".into());
            println!("next: {prog} probe{name_arg}; {prog} down{name_arg}");
            Ok(())
        }
        Cmd::Probe { name, probe, json } => {
            require_root()?;
            state::check_name(&name)?;
            let st = state::read(&name)?.with_context(|| {
                format!(
                    "no lab {name:?} (no {})",
                    state::state_path(&name).display()
                )
            })?;
            if st.phase == state::Phase::Starting || !st.responder.is_some_and(|p| p.alive()) {
                bail!(
                    "lab {name:?} is not (fully) up: `npc-lab down --name {name}`, then up again"
                );
            }
            if let Some(agent) = &st.agent
                && !agent.process.is_some_and(|p| p.alive())
            {
                eprintln!(
                    "npc-lab: warning: the agent of lab {name} is not running (log: {}): \
                     nothing is enforced",
                    agent.log.display()
                );
            }
            let m = probe::run(&st, Duration::from_millis(probe.timeout_ms), probe.parallel)?;
            let text = if json {
                serde_json::to_string_pretty(&m)? + "\n"
            } else {
                probe::render(&m)
            };
            // A closed pipe (`| head`) is no error.
            match std::io::stdout().lock().write_all(text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Cmd::Down { name } => {
            require_root()?;
            state::check_name(&name)?;
            let removed = up::teardown(&name)?;
            if removed.existed {
                if removed.namespaces.is_empty() {
                    println!("lab {name} removed");
                } else {
                    // The responder process was gone and left them.
                    println!(
                        "lab {name} removed (and {} namespaces it had left behind)",
                        removed.namespaces.len()
                    );
                }
            } else {
                println!("no lab {name}: nothing to do");
            }
            Ok(())
        }
        Cmd::Demo {
            dir,
            name,
            routed,
            agent,
            probe,
            settle_ms,
        } => {
            require_root()?;
            state::check_name(&name)?;
            let workdir = state::lab_dir(&name);
            up::cleanup_on_signal(&name, move || {
                let _ = state::remove_dir(&workdir);
            })?;
            demo::run(&demo::DemoOptions {
                dir,
                name,
                routed,
                agent: agent.agent()?,
                ready_timeout: Duration::from_secs(agent.ready_timeout),
                timeout: Duration::from_millis(probe.timeout_ms),
                parallel: probe.parallel,
                settle: Duration::from_millis(settle_ms),
            })
        }
        Cmd::Serve { name } => serve::run(&name),
    }
}
