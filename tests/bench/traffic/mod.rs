//! Real traffic between pod namespaces, side by side in one run: TCP connection rate and TCP
//! throughput from a client pod to a server pod through the lab's node namespace (routed pods,
//! Calico style), with
//!
//! * (a) no enforcement,
//! * (b) npc enforcing the generated policy set at 10 and 1,000 policies,
//! * (c) an iptables + ipset rule set generated from the same parsed policy set (see
//!   [`iptables`]).
//!
//! Every round runs each arm once, in an order rotated by one arm per round (so no arm always
//! follows the same one), switching the enforcement in between: the agent is started (and waited
//! for), stopped and cleaned up; the rules are loaded and removed. Before measuring, each arm is
//! checked: the client's connection to the server succeeds, and (with enforcement) a connection
//! from a pod no policy admits, one to a port no policy admits, and one the client's egress
//! policy does not allow all time out (dropped, not rejected); without enforcement the same three
//! succeed. A fail-open arm stops the benchmark.
//!
//! Client and server run as threads of this process pinned to different CPUs (see [`Pinning`];
//! `NPC_BENCH_PIN=same|off` to compare).
mod iptables;
mod load;
mod policy;

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use npc_agent::compiler::{Identities, compile};
use npc_tests::lab::{self, Lab, Pod};

use crate::Args;
use load::Probe;
use policy::{CLIENT_IP, CLOSED_PORT, PolicySet, RATE_PORT, SERVER_IP, STRANGER_IP, STREAM_PORT};

/// Policy counts compared.
const SIZES: [usize; 2] = [10, 1000];
/// An admitted connection must connect within this (it takes microseconds).
const ALLOWED_WAIT: Duration = Duration::from_secs(2);
/// A dropped connection is one with no answer within this.
const DENIED_WAIT: Duration = Duration::from_millis(500);
/// Pause after switching enforcement, the same for every arm.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    None,
    /// Index into the policy sets.
    Npc(usize),
    Iptables(usize),
}

struct Arm {
    label: String,
    kind: Kind,
    rates: Vec<f64>,
    gbps: Vec<f64>,
}

/// The enforcement of the arm being measured; removed by [`Enforcement::stop`] or on drop.
enum Enforcement {
    None,
    Npc(crate::agent::Agent),
    Iptables(iptables::Active),
}

impl Enforcement {
    fn stop(self) -> Result<()> {
        match self {
            Enforcement::None => Ok(()),
            Enforcement::Npc(agent) => agent.stop(),
            Enforcement::Iptables(active) => active.unload(),
        }
    }
}

/// Where client and server threads run (`NPC_BENCH_PIN`: `split`, the default, `same` or `off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pinning {
    /// Client on CPU 0, servers on CPU 1: each direction's forwarding (softirq on the sending
    /// CPU) then has a CPU of its own. The smallest spread in trial runs, though every
    /// request and reply costs a cross-CPU wakeup.
    Split,
    /// Client and servers on CPU 0.
    Same,
    Off,
}

impl Pinning {
    fn from_env(cpus: usize) -> Result<Pinning> {
        let pinning = match std::env::var("NPC_BENCH_PIN").as_deref() {
            Err(_) | Ok("split" | "1") => Pinning::Split,
            Ok("same") => Pinning::Same,
            Ok("off" | "0") => Pinning::Off,
            Ok(other) => bail!("NPC_BENCH_PIN={other}: use split, same or off"),
        };
        Ok(if pinning == Pinning::Split && cpus < 2 {
            Pinning::Same
        } else {
            pinning
        })
    }

    /// CPUs of the client and the server threads.
    fn cpus(self) -> (Option<usize>, Option<usize>) {
        match self {
            Pinning::Split => (Some(0), Some(1)),
            Pinning::Same => (Some(0), Some(0)),
            Pinning::Off => (None, None),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Pinning::Split => {
                "pinned: client thread to CPU 0, server threads to CPU 1 (each direction's \
                 forwarding runs in softirq on its sender's CPU), the agent not pinned \
                 (NPC_BENCH_PIN=same|off to change)"
            }
            Pinning::Same => {
                "pinned: client and server threads both to CPU 0, the agent not pinned"
            }
            Pinning::Off => "not pinned (NPC_BENCH_PIN=off)",
        }
    }
}

/// The lab's pods.
struct Pods {
    server: Pod,
    client: Pod,
    stranger: Pod,
}

pub fn run(args: &Args) -> Result<()> {
    let rounds = if args.quick { 2 } else { args.rounds.max(10) };
    let dur = Duration::from_secs(if args.quick { 1 } else { 3 });
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let pinning = Pinning::from_env(cpus)?;
    let (client_cpu, server_cpu) = pinning.cpus();

    let agent = crate::agent_binary()?;
    let backend = iptables::backend().context("iptables (apt-get install iptables ipset)")?;
    lab::run(&["ipset", "version"]).context("ipset (apt-get install ipset)")?;
    lab::cleanup_stale(crate::LAB)?;
    crate::agent::cleanup_stale(&agent)?;

    let work = crate::TempDir::new("npc-bench-traffic")?;
    let sets: Vec<PolicySet> = SIZES
        .iter()
        .map(|&n| policy::generate(&work.0.join(format!("policies-{n}")), n))
        .collect::<Result<_>>()?;
    let rulesets: Vec<iptables::Ruleset> = sets
        .iter()
        .map(|s| iptables::generate(&s.state))
        .collect::<Result<_>>()?;

    let lab = Lab::new(crate::LAB)?;
    let pods = Pods {
        server: lab.add_routed_pod("server", SERVER_IP, None)?,
        client: lab.add_routed_pod("client", CLIENT_IP, None)?,
        stranger: lab.add_routed_pod("stranger", STRANGER_IP, None)?,
    };
    // Room for every connection of a measurement without reusing a port.
    lab::sysctl(
        &pods.client.netns,
        "net.ipv4.ip_local_port_range",
        "1024 65535",
    )?;
    let _servers = load::Servers::start(&pods.server.netns, RATE_PORT, STREAM_PORT, server_cpu)?;
    // Listeners the denied probes aim at: without enforcement they answer.
    let _closed = pods.server.serve_tcp(CLOSED_PORT)?;
    let _stranger = pods.stranger.serve_tcp(RATE_PORT)?;

    print_header(rounds, dur, pinning, cpus, &backend, &sets, &rulesets);

    let mut arms = vec![Arm::new("(a) no enforcement", Kind::None)];
    for (i, n) in SIZES.iter().enumerate() {
        arms.push(Arm::new(&format!("(b) npc, {n} policies"), Kind::Npc(i)));
    }
    for (i, n) in SIZES.iter().enumerate() {
        arms.push(Arm::new(
            &format!("(c) iptables+ipset, {n} policies"),
            Kind::Iptables(i),
        ));
    }

    let rate_dst = SocketAddr::new(IpAddr::V4(SERVER_IP), RATE_PORT);
    let stream_dst = SocketAddr::new(IpAddr::V4(SERVER_IP), STREAM_PORT);
    let started = Instant::now();
    for round in 0..rounds {
        for k in 0..arms.len() {
            let a = (round + k) % arms.len();
            let kind = arms[a].kind;
            let enforcement = match kind {
                Kind::None => Enforcement::None,
                Kind::Npc(i) => Enforcement::Npc(crate::agent::Agent::start(
                    &agent,
                    lab.node_netns(),
                    &sets[i].dir,
                    policy::NODE,
                    &work.0,
                )?),
                Kind::Iptables(i) => {
                    Enforcement::Iptables(iptables::load(lab.node_netns(), &rulesets[i])?)
                }
            };
            thread::sleep(SETTLE);
            verify(&pods, kind != Kind::None)
                .with_context(|| format!("round {}, {}", round + 1, arms[a].label))?;
            let rate = load::connection_rate(&pods.client.netns, rate_dst, dur, client_cpu)
                .with_context(|| format!("connection rate, {}", arms[a].label))?;
            let gbps = load::throughput(&pods.client.netns, stream_dst, dur, client_cpu)
                .with_context(|| format!("throughput, {}", arms[a].label))?;
            enforcement.stop()?;
            eprintln!(
                "  round {}/{rounds} {:<34} {rate:>9.0} conn/s {gbps:>7.2} Gbit/s",
                round + 1,
                arms[a].label
            );
            arms[a].rates.push(rate);
            arms[a].gbps.push(gbps);
        }
    }
    let leftovers = iptables::leftovers(lab.node_netns())?;
    if !leftovers.is_empty() {
        bail!(
            "iptables/ipset state left in {} after the last arm:\n{leftovers}",
            lab.node_netns()
        );
    }

    println!();
    print_table(
        "TCP connection rate (connect, 64 B request, 64 B reply, server closes), connections/s",
        &arms,
        |a| &a.rates,
        0,
    );
    println!();
    print_table(
        "TCP throughput (one stream client -> server, 128 KiB writes), Gbit/s",
        &arms,
        |a| &a.gbps,
        2,
    );
    println!(
        "\n{rounds} rounds in {:.0} s (load average at the end: {}); ratio: median / median of (a). Shared, noisy machine: \
         differences below the min..max spread are no finding.",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}

impl Arm {
    fn new(label: &str, kind: Kind) -> Arm {
        Arm {
            label: label.to_string(),
            kind,
            rates: Vec::new(),
            gbps: Vec::new(),
        }
    }
}

/// Checks that the arm enforces (or, without enforcement, that everything connects); see the
/// module docs. The probes run in parallel, so an enforcing arm costs one [`DENIED_WAIT`].
fn verify(pods: &Pods, enforcing: bool) -> Result<()> {
    let rate_dst = SocketAddr::new(IpAddr::V4(SERVER_IP), RATE_PORT);
    load::check_transaction(&pods.client.netns, rate_dst).context("the client is not admitted")?;
    let probes: [(&str, &Pod, SocketAddr); 3] = [
        (
            "stranger -> server (no policy admits it)",
            &pods.stranger,
            rate_dst,
        ),
        (
            "client -> server's closed port",
            &pods.client,
            SocketAddr::new(IpAddr::V4(SERVER_IP), CLOSED_PORT),
        ),
        (
            "client -> stranger (the client's egress policy does not allow it)",
            &pods.client,
            SocketAddr::new(IpAddr::V4(STRANGER_IP), RATE_PORT),
        ),
    ];
    let wait = if enforcing { DENIED_WAIT } else { ALLOWED_WAIT };
    let results: Vec<Result<Probe>> = thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|(_, from, dst)| s.spawn(move || load::probe(&from.netns, *dst, wait)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("probe thread panicked")))
            .collect()
    });
    let expected = if enforcing {
        Probe::TimedOut
    } else {
        Probe::Connected
    };
    let mut wrong = String::new();
    for ((what, _, _), got) in probes.iter().zip(results) {
        let got = got?;
        if got != expected {
            let _ = write!(wrong, "; {what}: {got:?}, expected {expected:?}");
        }
    }
    if !wrong.is_empty() {
        bail!(
            "{} check failed{wrong}",
            if enforcing {
                "enforcement"
            } else {
                "no-enforcement"
            }
        );
    }
    Ok(())
}

fn print_header(
    rounds: usize,
    dur: Duration,
    pinning: Pinning,
    cpus: usize,
    backend: &str,
    sets: &[PolicySet],
    rulesets: &[iptables::Ruleset],
) {
    println!(
        "traffic: TCP from a client pod to a server pod (routed veths, forwarded by the lab's \
         node namespace), {rounds} rounds, each arm once per round in rotated order, {} s per \
         measurement",
        dur.as_secs()
    );
    println!(
        "  THIS MACHINE IS SHARED AND NOISY ({cpus} CPUs, other jobs run): read medians with \
         their min..max, compare ratios within this run, do not compare absolute numbers across \
         runs or machines"
    );
    println!("  {}", pinning.describe());
    println!("  load average at the start: {}", loadavg());
    println!("  iptables backend: {backend}");
    println!(
        "  policy set (the same manifests for npc and iptables): N ingress policies select the \
         server, each admits another peer label on ports {RATE_PORT},{STREAM_PORT}, the client's \
         is the last; 1 egress policy isolates the client; {} remote pods on 10 other nodes",
        policy::REMOTE_PODS
    );
    for (set, rs) in sets.iter().zip(rulesets) {
        let desired = compile(&set.state, &mut Identities::default());
        println!(
            "  N={:<5} npc: {} endpoints, {} identities, {} policy entries | iptables: {} rules in \
             {} chains, {} ipsets with {} entries",
            set.n,
            desired.endpoints.len(),
            desired.identities.len(),
            desired.policy.len(),
            rs.rule_count(),
            rs.chain_count(),
            rs.set_count(),
            rs.entry_count()
        );
    }
}

/// The 1, 5 and 15 minute load averages (how busy the shared machine was).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn print_table(title: &str, arms: &[Arm], values: impl Fn(&Arm) -> &Vec<f64>, decimals: usize) {
    println!("{title}");
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>8}",
        "arm", "median", "min", "max", "vs (a)"
    );
    let base = crate::stats::stats(values(&arms[0]).clone()).0;
    for arm in arms {
        let (med, min, max) = crate::stats::stats(values(arm).clone());
        println!(
            "{:<34} {med:>10.decimals$} {min:>10.decimals$} {max:>10.decimals$} {:>7.2}x",
            arm.label,
            med / base
        );
    }
}
