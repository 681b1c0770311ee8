//! `cargo xtask test`: setup, then the checks CI runs (fmt, clippy, tests), each timed, with a
//! summary at the end.

use std::time::Duration;

use anyhow::bail;

use crate::{
    kube_apiserver, setup,
    util::{self, command},
};

#[derive(clap::Args)]
pub struct Args {
    /// Passed to `cargo test` after `--workspace --release` (e.g. `-- -p npc-tests -- --nocapture`).
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Loading BPF programs and creating network namespaces need root; say so before spending
    // minutes on setup and builds.
    if !util::is_root() {
        bail!(
            "`cargo xtask test` must run as root (the tests load BPF programs and create network namespaces)"
        );
    }

    let mut results = Vec::new();

    header("setup", "cargo xtask setup");
    let (setup_result, took) = util::timed(setup::run);
    footer("setup", &setup_result, took);
    // Nothing below can work without the tools setup installs.
    setup_result?;
    results.push(("setup", true, took));

    // The tests that run a real API server find its binaries through NPC_KUBE_APISERVER and
    // NPC_ETCD; built once per machine (minutes), then instant.
    header("kube-apiserver", "cargo xtask kube-apiserver");
    let (kube_result, took) = util::timed(kube_apiserver::ensure);
    footer("kube-apiserver", &kube_result, took);
    let kube = kube_result?;
    results.push(("kube-apiserver", true, took));

    let mut fmt = command("cargo");
    fmt.args(["fmt", "--all", "--", "--check"]);
    // npc-ebpf only builds for the BPF target (no_std, its own panic handler): the host steps
    // exclude it, and it is linted for its own target.
    let mut clippy = command("cargo");
    clippy.args([
        "clippy",
        "--workspace",
        "--exclude",
        "npc-ebpf",
        "--all-targets",
    ]);
    clippy.args(["--", "-D", "warnings"]);
    let mut clippy_ebpf = command("cargo");
    clippy_ebpf
        .args([
            "clippy",
            "-p",
            "npc-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--", "-D", "warnings"])
        .env("RUSTC_BOOTSTRAP", "1");
    // Release: the eBPF object is built in release whatever the profile, and the tests (packet
    // loops, namespaces) run faster.
    let mut test = command("cargo");
    test.args(["test", "--workspace", "--exclude", "npc-ebpf", "--release"])
        .args(&args.cargo_test_args)
        .env("RUST_BACKTRACE", "1")
        .env("NPC_KUBE_APISERVER", &kube.kube_apiserver)
        .env("NPC_ETCD", &kube.etcd);

    // Keep going after a failure: a fmt nit should not hide what clippy and the tests say.
    let mut tally = Tally::default();
    for (name, mut cmd) in [
        ("fmt", fmt),
        ("clippy", clippy),
        ("clippy-ebpf", clippy_ebpf),
        ("test", test),
    ] {
        header(name, &util::display(&cmd));
        let (result, took) = if name == "test" {
            util::timed(|| util::run_tee(&mut cmd, |line| tally.add(line)))
        } else {
            util::timed(|| util::run(&mut cmd))
        };
        footer(name, &result, took);
        if let Err(e) = &result {
            eprintln!("{e:#}");
        }
        results.push((name, result.is_ok(), took));
    }

    println!("==> summary");
    for (name, ok, took) in &results {
        let status = if *ok { "ok" } else { "FAILED" };
        println!("    {name:<15} {status:<7} {}", util::secs(*took));
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(name, _, _)| *name)
        .collect();
    // The last line: every test binary's results added up.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Sums cargo test's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` lines.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

fn header(name: &str, what: &str) {
    println!("==> {name}: {what}");
}

fn footer<T>(name: &str, result: &anyhow::Result<T>, took: Duration) {
    let status = if result.is_ok() { "ok" } else { "FAILED" };
    println!("<== {name}: {status} ({})", util::secs(took));
}
