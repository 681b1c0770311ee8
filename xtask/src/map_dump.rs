//! `cargo xtask map-dump [MAP] [--bpffs DIR] [--state-dir DIR] [--json]`: every pinned map
//! decoded, with pod, namespace and policy names next to the numbers.
//!
//! xtask only builds the agent (release) and replaces itself with `npc-agent [--bpffs DIR]
//! [--state-dir DIR] dump [MAP] [--json]`, from the caller's directory: the dump is the agent's
//! own code, so where cargo is absent (a cluster node) `kubectl exec ... npc-agent dump` does
//! the same. The agent validates MAP and reports its errors.
use std::{ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::util::{self, command};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  sudo cargo xtask map-dump\n  sudo cargo xtask map-dump \
                        policy\n  sudo cargo xtask map-dump conntrack --json | jq .conntrack\n\
                        Run `cargo xtask map-dump -- --help` for the agent's own help, with \
                        every MAP."
)]
pub struct Args {
    /// `all` (default), one map (endpoints, interfaces, cidrs, policy, conntrack, fragments,
    /// denied, drops, counters, blocked, events, event_rate, config) or `identities`.
    #[arg(value_name = "MAP")]
    map: Option<String>,
    /// Where the agent pins its maps [default: the agent's: NPC_BPFFS, else /sys/fs/bpf/npc].
    #[arg(long, value_name = "DIR")]
    bpffs: Option<PathBuf>,
    /// Where the agent publishes its names [default: the agent's: NPC_STATE_DIR, else
    /// /run/npc].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// One JSON object with a key per map instead of tables.
    #[arg(long)]
    json: bool,
    /// More arguments for `npc-agent dump` (e.g. `-- --help`).
    #[arg(last = true, value_name = "ARGS")]
    more: Vec<String>,
}

/// The agent's command line for `args`.
fn agent_args(args: Args) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    if let Some(dir) = args.bpffs {
        argv.extend(["--bpffs".into(), dir.into()]);
    }
    if let Some(dir) = args.state_dir {
        argv.extend(["--state-dir".into(), dir.into()]);
    }
    argv.push("dump".into());
    argv.extend(args.map.map(OsString::from));
    if args.json {
        argv.push("--json".into());
    }
    argv.extend(args.more.into_iter().map(OsString::from));
    argv
}

/// Builds the agent, then execs `npc-agent ... dump ...`. Only returns on failure.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut build = command("cargo");
    build.args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "npc-agent",
        "--bin",
        "npc-agent",
    ]);
    util::run(&mut build)
        .context("building the agent (`cargo xtask setup` installs what the build needs)")?;
    let bin = util::target_dir().join("release").join("npc-agent");
    let err = Command::new(&bin).args(agent_args(args)).exec();
    Err(err).with_context(|| format!("cannot run {}", bin.display()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn argv(args: &[&str]) -> Vec<String> {
        let cli =
            Cli::try_parse_from(std::iter::once("map-dump").chain(args.iter().copied())).unwrap();
        agent_args(cli.args)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn agent_command_line() {
        assert_eq!(argv(&[]), ["dump"]);
        assert_eq!(
            argv(&["policy", "--json", "--bpffs", "/b", "--state-dir", "s"]),
            [
                "--bpffs",
                "/b",
                "--state-dir",
                "s",
                "dump",
                "policy",
                "--json"
            ]
        );
        assert_eq!(argv(&["--", "--help"]), ["dump", "--help"]);
    }
}
