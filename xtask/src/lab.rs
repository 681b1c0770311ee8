//! `cargo xtask lab up DIR [...] | probe [...] | down [...]`: the network-namespace lab of
//! `npc-lab` (tests/lab_cli): a local "cluster" from manifests, with the agent enforcing
//! their NetworkPolicies. Needs root.
//!
//! xtask only builds and delegates: `npc-lab` (and for `up`, the agent it runs) are built in
//! release, then `npc-lab` replaces this process with the arguments as given, from the caller's
//! directory, so relative paths work and Ctrl-C reaches `npc-lab` (which cleans up) directly.
use std::{env, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    setup,
    util::{self, command},
};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  cargo xtask lab up examples/sock-shop\n  cargo xtask lab probe\n  \
                  cargo xtask lab down\n  cargo xtask lab up --routed --name bank examples/banking\n\
                  Run `cargo xtask lab -- --help` for npc-lab's own help."
)]
pub struct Args {
    /// The npc-lab subcommand and its arguments: `up DIR [--routed] [--name NAME]
    /// [--agent PATH | --no-agent]`, `probe [--name NAME] [--timeout-ms N] [--json]`,
    /// `down [--name NAME]`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let args = args.args;
    let sub = args.first().map(String::as_str).unwrap_or_default();
    if !matches!(sub, "up" | "probe" | "down" | "--help" | "-h" | "help") {
        bail!("unknown lab command {sub:?}: use up, probe or down");
    }
    // `up` runs the agent unless told otherwise (or given another one).
    let with_agent = sub == "up"
        && !args
            .iter()
            .any(|a| a == "--no-agent" || a == "--agent" || a.starts_with("--agent="))
        && env::var_os("NPC_AGENT").is_none();
    exec_npc_lab(&args, with_agent)
}

/// Setup (for `up` and `demo`), release build of npc-lab (and the agent), then exec
/// `npc-lab ARGS`. Only returns on failure.
pub fn exec_npc_lab(args: &[String], with_agent: bool) -> anyhow::Result<()> {
    let help = args
        .iter()
        .any(|a| a == "--help" || a == "-h" || a == "help");
    if !help && !util::is_root() {
        bail!(
            "`cargo xtask lab` and `cargo xtask demo` must run as root (network namespaces, BPF)"
        );
    }
    // npc-lab links the agent's library, whose build script builds the eBPF object: that
    // needs bpf-linker even without the agent binary. `probe` and `down` follow an `up` that
    // did the setup (and keep stdout clean for `probe --json`).
    let sub = args.first().map(String::as_str).unwrap_or_default();
    if !help && matches!(sub, "up" | "demo") {
        setup::run()?;
    }
    // One cargo invocation for both binaries.
    let mut build = command("cargo");
    build.args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "npc-tests",
        "--bin",
        "npc-lab",
    ]);
    if with_agent {
        build.args(["-p", "npc-agent", "--bin", "npc-agent"]);
    }
    util::run(&mut build)?;
    let bin = util::target_dir().join("release").join("npc-lab");
    // npc-lab finds the agent next to itself (target/release/npc-agent).
    let err = Command::new(&bin)
        .args(args)
        .env("NPC_LAB_PROG", "cargo xtask lab")
        .exec();
    Err(err).with_context(|| format!("cannot run {}", bin.display()))
}
