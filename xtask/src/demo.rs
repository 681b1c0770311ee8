//! `cargo xtask demo`: the README's main command. Sets up what is missing, builds the agent
//! and `npc-lab` (release), then runs `npc-lab demo` on examples/sock-shop: the lab without
//! policies and its reachability matrix, the policies copied into the directory the agent
//! watches, the matrix again, the connections that are now blocked; the lab is removed at the
//! end, also on failure or Ctrl-C. Needs root.
use crate::{lab, util};

#[derive(clap::Args)]
pub struct Args {
    /// Example directory: cluster files (Namespaces, Pods) and policy files (NetworkPolicies
    /// only).
    #[arg(long, value_name = "DIR")]
    example: Option<std::path::PathBuf>,
    /// Pods on /32 routes instead of a bridge.
    #[arg(long)]
    routed: bool,
    /// Without the agent (nothing is enforced: both matrices are the same).
    #[arg(long)]
    no_agent: bool,
    /// More arguments for `npc-lab demo` (e.g. `-- --timeout-ms 300 --settle-ms 3000`).
    #[arg(last = true, value_name = "ARGS")]
    more: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let example = args
        .example
        .map(|p| p.canonicalize().unwrap_or(p))
        .unwrap_or_else(|| util::workspace_root().join("examples").join("sock-shop"));
    let mut argv = vec!["demo".to_string(), example.to_string_lossy().into_owned()];
    if args.routed {
        argv.push("--routed".into());
    }
    if args.no_agent {
        argv.push("--no-agent".into());
    }
    argv.extend(args.more);
    let with_agent = !args.no_agent && std::env::var_os("NPC_AGENT").is_none();
    lab::exec_npc_lab(&argv, with_agent)
}
