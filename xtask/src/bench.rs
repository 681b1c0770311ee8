//! `cargo xtask bench [PART...] [--quick]`: setup, then `npc-bench` (tests/bench): the datapath
//! cost per packet (BPF_PROG_TEST_RUN, next to an empty TC program), the control plane's compile,
//! map-write and change times and memory, and real TCP traffic next to no enforcement and an
//! iptables + ipset rule set. Needs root. Results go to stdout; docs/benchmarks.md records runs.
use anyhow::bail;

use crate::{
    setup,
    util::{self, command},
};

#[derive(clap::Args)]
pub struct Args {
    /// Parts to run: datapath, control, traffic (all when none is named).
    #[arg(value_parser = ["datapath", "control", "traffic"])]
    parts: Vec<String>,
    /// A short run, as a smoke check.
    #[arg(long)]
    quick: bool,
    /// Interleaved rounds per scenario.
    #[arg(long)]
    rounds: Option<usize>,
}

/// What the traffic part runs besides npc: the iptables + ipset enforcer it is compared with
/// (nft removes the emptied nf_tables table between arms, so it adds no hooks to the others).
const TRAFFIC_PACKAGES: [&str; 3] = ["iptables", "ipset", "nftables"];

pub fn run(args: Args) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask bench` must run as root (it loads BPF programs)");
    }
    setup::run()?;
    if args.parts.is_empty() || args.parts.iter().any(|p| p == "traffic") {
        let packages: Vec<String> = TRAFFIC_PACKAGES.iter().map(|p| p.to_string()).collect();
        util::step("bench", "traffic packages", || {
            setup::ensure_apt("traffic packages", &packages)
        })?;
    }
    // The control and traffic parts run the agent binary as a node's DaemonSet would.
    util::run(command("cargo").args(["build", "--quiet", "--release", "-p", "npc-agent"]))?;
    let mut bench = command("cargo");
    bench.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "npc-tests",
        "--bin",
        "npc-bench",
        "--",
    ]);
    bench.args(&args.parts);
    if args.quick {
        bench.arg("--quick");
    }
    if let Some(rounds) = args.rounds {
        bench.args(["--rounds", &rounds.to_string()]);
    }
    util::run(&mut bench)
}
