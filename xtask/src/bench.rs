//! `cargo xtask bench [--quick]`: setup, then the datapath benchmark (BPF_PROG_TEST_RUN, next to
//! an empty TC program). Needs root. Results go to stdout; docs/benchmarks.md records runs.
use anyhow::bail;

use crate::{
    setup,
    util::{self, command},
};

#[derive(clap::Args)]
pub struct Args {
    /// A short run, as a smoke check.
    #[arg(long)]
    quick: bool,
    /// Interleaved rounds per scenario.
    #[arg(long)]
    rounds: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask bench` must run as root (it loads BPF programs)");
    }
    setup::run()?;
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
    if args.quick {
        bench.arg("--quick");
    }
    if let Some(rounds) = args.rounds {
        bench.args(["--rounds", &rounds.to_string()]);
    }
    util::run(&mut bench)
}
