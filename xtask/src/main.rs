//! Developer tasks for npc, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! One module per task; `util` holds what they share (workspace root, running commands, timing).

mod bench;
mod demo;
mod kube_apiserver;
mod lab;
mod map_dump;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for npc"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, pinned toolchain, bpf-linker, a
    /// kubectl with kustomize for the deploy/ render test); only what is missing.
    Setup,
    /// Setup, then fmt check, clippy and the workspace tests (release). Needs root.
    Test(test::Args),
    /// Setup, then the datapath benchmark (ns per packet next to an empty program). Needs root.
    Bench(bench::Args),
    /// A local "cluster" from manifests in network namespaces, enforced by the agent:
    /// `lab up DIR`, `lab probe`, `lab down`. Needs root.
    Lab(lab::Args),
    /// Build the agent and print every pinned map decoded, with pod, namespace and policy names
    /// (`npc-agent dump`). Needs root (BPF).
    MapDump(map_dump::Args),
    /// Setup, build, and show the sock-shop's policies at work: the reachability matrix
    /// before and after applying them. Needs root.
    Demo(demo::Args),
    /// Build kube-apiserver (Kubernetes 1.20.2, from Debian's source package) and fetch etcd
    /// for the tests that need a real API server; once, cached in target/kube/. Root for the
    /// build (apt).
    KubeApiserver,
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test(args) => test::run(args),
        Task::Bench(args) => bench::run(args),
        Task::Lab(args) => lab::run(args),
        Task::MapDump(args) => map_dump::run(args),
        Task::Demo(args) => demo::run(args),
        Task::KubeApiserver => kube_apiserver::run(),
    };
    // Errors here are messages for the user, not bugs: print the cause chain without the
    // backtrace anyhow would add when RUST_BACKTRACE is set (as in CI).
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
