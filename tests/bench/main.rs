//! `npc-bench`: the benchmarks of `cargo xtask bench` (root). Three parts, each runnable alone:
//! `datapath` (cost per packet, BPF_PROG_TEST_RUN), `control` (compile and map-write times,
//! change latency, memory), `traffic` (real TCP between network namespaces, npc next to no
//! enforcement and iptables). Every figure is a median with its spread over interleaved rounds;
//! nothing here asserts a time.
use anyhow::{Context as _, Result, bail};

mod agent;
mod control;
mod datapath;
mod empty;
mod stats;
mod traffic;

/// What to run and how long.
pub struct Args {
    /// A short run, as a smoke check.
    pub quick: bool,
    /// Interleaved rounds per scenario.
    pub rounds: usize,
    /// Runs per BPF_PROG_TEST_RUN call.
    pub repeat: u32,
    /// Which parts: `datapath`, `control`, `traffic` (all when none is named).
    pub parts: Vec<String>,
}

const PARTS: [&str; 3] = ["datapath", "control", "traffic"];

fn args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        rounds: 15,
        repeat: 200_000,
        parts: Vec::new(),
    };
    let mut rounds = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--rounds" => rounds = Some(it.next().context("--rounds N")?.parse()?),
            "--repeat" => a.repeat = it.next().context("--repeat N")?.parse()?,
            part if PARTS.contains(&part) => a.parts.push(arg),
            other => bail!(
                "unknown argument {other} (use [datapath] [control] [traffic] [--quick] \
                 [--rounds N] [--repeat N])"
            ),
        }
    }
    if a.quick {
        a.rounds = 3;
        a.repeat = 20_000;
    }
    if let Some(r) = rounds {
        a.rounds = r;
    }
    if a.parts.is_empty() {
        a.parts = PARTS.iter().map(|p| p.to_string()).collect();
    }
    Ok(a)
}

/// Name prefix of the labs (network namespaces) of every part: each part's start removes what
/// killed runs left under it.
pub const LAB: &str = "npcbench";

/// The agent binary: `npc-agent` next to this one (`target/release`; `cargo xtask bench` builds
/// it), for the parts that run it as a node would.
pub fn agent_binary() -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("locating npc-bench")?;
    let agent = exe.with_file_name("npc-agent");
    anyhow::ensure!(
        agent.is_file(),
        "no agent binary at {} (build it: cargo build --release -p npc-agent)",
        agent.display()
    );
    Ok(agent)
}

/// A scratch directory (manifests, agent logs and state), removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// `<tmp>/<prefix>-<pid>`, emptied first.
    pub fn new(prefix: &str) -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> Result<()> {
    let args = args()?;
    println!(
        "npc-bench: {} (shared {}-core machine, kernel {}: expect +-20% between runs; compare \
         ratios within one run)",
        args.parts.join(", "),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    for part in &args.parts {
        println!();
        match part.as_str() {
            "datapath" => datapath::run(&args)?,
            "control" => control::run(&args)?,
            "traffic" => traffic::run(&args)?,
            _ => unreachable!(),
        }
    }
    Ok(())
}
