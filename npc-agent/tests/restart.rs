//! Restarts and upgrades without an enforcement gap: the agent's programs, tcx links and maps stay
//! pinned when it stops (SIGTERM) or dies (SIGKILL); the next agent inherits the links, rebuilds
//! its view from the source, applies only the difference and swaps its programs into the links
//! atomically. A map the next agent cannot reuse (here: another conntrack and blocked size, as a
//! layout change between versions would be) is replaced by one holding its entries.
//!
//! Throughout every restart, three watchers run: an allowed long-lived TCP connection exchanging
//! data (it must never stall), a stream of denied connection attempts (none may connect), and
//! the entry counts of the pinned `endpoints` and `policy` maps (never below what the policy
//! needs).
//!
//! Cleanup also on failure: the agents are killed and the shared bpffs directory (maps and link
//! pins, so also the attachments) removed by guards, the lab's namespaces by the `Lab`.
use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use npc_agent::dataplane::Maps;
use npc_tests::lab::{ConnectOutcome, Pod, in_netns};

mod support;
use support::{Agent, BpffsDir, Enter, cluster::*};

/// How long a denied attempt waits for its SYN-ACK.
const ATTEMPT: Duration = Duration::from_millis(300);
/// Between two exchanges on the long-lived connection.
const EXCHANGE_EVERY: Duration = Duration::from_millis(50);

/// Pods of namespace ns-x accept TCP 80 from namespace team=blue (c) only.
const POLICY: &str = "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}], ports: [{protocol: TCP, port: 80}]}]}";

/// How an agent is stopped.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Term,
    Kill,
}

/// The cluster with [`POLICY`] enforced by an agent whose pins outlive it (shared directory).
struct Restartable {
    k: Cluster,
    bpffs: BpffsDir,
    args: Vec<String>,
}

fn restartable(name: &str) -> Restartable {
    let mut k = cluster(name);
    k.manifests
        .write("policy.yaml", &policy("ns-x", "from-blue", POLICY));
    blocked(&k.a, &k.b, 80, "the policy applies");
    reaches(&k.c, &k.a, 80, "the policy allows c");
    // The guard now removes the directory (pins and links) after every agent, also on failure.
    k.agent.owns_bpffs = false;
    let bpffs = BpffsDir(k.agent.bpffs.clone());
    let args = [
        "--manifests",
        k.manifests.path().to_str().unwrap(),
        "--metrics-addr",
        "127.0.0.1:9090",
    ]
    .map(str::to_owned)
    .to_vec();
    Restartable { k, bpffs, args }
}

impl Restartable {
    fn stop(&mut self, how: Stop) {
        match how {
            Stop::Term => self.k.agent.signal(libc::SIGTERM),
            Stop::Kill => self.k.agent.signal(libc::SIGKILL),
        }
        self.k.agent.wait_exit();
    }

    /// Starts the next agent on the same pins (`extra` added to its arguments), ready.
    fn start(&mut self, extra: &[&str]) {
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let agent = Agent::spawn(
            &self.k.lab,
            Enter::Netns,
            self.bpffs.0.clone(),
            false,
            &args,
        );
        let old = std::mem::replace(&mut self.k.agent, agent);
        drop(old); // already exited: only its output readers and state directory go
        wait_ready(&self.k.lab, &self.k.agent);
        self.k.agent.wait_for("the adoption", |l| {
            l.contains("adopted the previous agent's links")
        });
    }
}

/// The programs attached to a host veth's two hooks (ingress, egress), by program id.
fn attached_programs(k: &Cluster, pod: &Pod) -> [Vec<u32>; 2] {
    let veth = std::ffi::CString::new(pod.host_veth.clone()).unwrap();
    in_netns(k.lab.node_netns(), || {
        [TcAttachType::Ingress, TcAttachType::Egress].map(|hook| {
            SchedClassifier::query_tcx(veth.as_c_str(), hook)
                .expect("querying tcx")
                .1
                .iter()
                .map(|p| p.id())
                .collect()
        })
    })
}

/// What the watchers saw while they ran.
#[derive(Debug, Default)]
struct Watched {
    exchanges: usize,
    /// Exchanges on the long-lived connection that failed or stalled, with when.
    stalls: Vec<String>,
    denied_attempts: usize,
    /// Denied attempts that connected.
    leaks: usize,
    map_polls: usize,
    /// Entries before the watch (a, b, c and the node's addresses; the allow entries).
    endpoints: usize,
    policy: usize,
    min_endpoints: usize,
    min_policy: usize,
}

/// Runs `during` while the watchers run (`a`'s long-lived connection to `c`:80, denied attempts
/// `a` -> `b`:80, the pinned maps' entry counts), and returns what they saw. The connection's
/// replies pass `a`'s isolated ingress only as part of a tracked flow: it stalls if conntrack
/// state is lost.
fn watch(r: &mut Restartable, during: impl FnOnce(&mut Restartable)) -> Watched {
    let done = AtomicBool::new(false);
    let mut conn = open(&r.k.a, &r.k.c, 80);
    let (a, b) = (r.k.a.clone(), r.k.b.clone());
    let bpffs = r.bpffs.0.clone();
    let maps = Maps::open(&bpffs).unwrap();
    let endpoints = maps.endpoint_entries().unwrap().len();
    let policy = maps.policy_entries().unwrap().len();
    drop(maps);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let done = &done;
        let established = scope.spawn(move || {
            let (mut exchanges, mut stalls) = (0, Vec::new());
            while !done.load(Ordering::Relaxed) {
                if let Err(e) = conn.check(EXCHANGE) {
                    stalls.push(format!("at {:?}: {e}", start.elapsed()));
                }
                exchanges += 1;
                std::thread::sleep(EXCHANGE_EVERY);
            }
            (exchanges, stalls)
        });
        let denied = scope.spawn(move || {
            let (mut attempts, mut leaks) = (0, 0);
            while !done.load(Ordering::Relaxed) {
                if a.connect_tcp(IpAddr::V4(b.ipv4), 80, ATTEMPT) == ConnectOutcome::Connected {
                    leaks += 1;
                }
                attempts += 1;
            }
            (attempts, leaks)
        });
        let maps = scope.spawn(move || {
            let (mut polls, mut min_endpoints, mut min_policy) = (0, usize::MAX, usize::MAX);
            while !done.load(Ordering::Relaxed) {
                // Opened anew each time: a replaced map is a new pin.
                let (endpoints, policy) = match Maps::open(&bpffs) {
                    Ok(m) => (
                        m.endpoint_entries().map_or(0, |e| e.len()),
                        m.policy_entries().map_or(0, |e| e.len()),
                    ),
                    Err(_) => (0, 0),
                };
                min_endpoints = min_endpoints.min(endpoints);
                min_policy = min_policy.min(policy);
                polls += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (polls, min_endpoints, min_policy)
        });
        std::thread::sleep(Duration::from_millis(500));
        during(r);
        std::thread::sleep(Duration::from_millis(1000));
        done.store(true, Ordering::Relaxed);
        let (exchanges, stalls) = established.join().unwrap();
        let (denied_attempts, leaks) = denied.join().unwrap();
        let (map_polls, min_endpoints, min_policy) = maps.join().unwrap();
        Watched {
            exchanges,
            stalls,
            denied_attempts,
            leaks,
            map_polls,
            endpoints,
            policy,
            min_endpoints,
            min_policy,
        }
    })
}

fn assert_no_gap(r: &Restartable, w: &Watched) {
    eprintln!("watched: {w:?}");
    let log = r.k.agent.log();
    assert_eq!(w.leaks, 0, "denied attempts connected: {w:?}\n{log}");
    assert!(w.denied_attempts >= 5, "too few denied attempts: {w:?}");
    assert!(
        w.stalls.is_empty(),
        "the established connection stalled: {w:?}\n{log}"
    );
    assert!(w.exchanges >= 20, "too few exchanges: {w:?}");
    assert_eq!(
        w.min_endpoints, w.endpoints,
        "endpoints entries went missing: {w:?}"
    );
    assert_eq!(w.min_policy, w.policy, "policy entries went missing: {w:?}");
    assert!(w.map_polls >= 50, "too few map polls: {w:?}");
}

/// One restart: stop the agent `how`, leave it down for a while, start the next one; no gap
/// at any point, the next agent runs its own programs in the same links, and it enforces
/// changes.
fn restart_without_a_gap(name: &str, how: Stop, next_args: &[&str]) -> Restartable {
    let mut r = restartable(name);
    let before = attached_programs(&r.k, &r.k.a);
    assert!(before.iter().all(|p| p.len() == 1), "{before:?}");
    let w = watch(&mut r, |r| {
        r.stop(how);
        std::thread::sleep(Duration::from_millis(1500));
        r.start(next_args);
    });
    assert_no_gap(&r, &w);
    let after = attached_programs(&r.k, &r.k.a);
    assert!(
        after.iter().all(|p| p.len() == 1),
        "one program per hook: {after:?}"
    );
    assert_ne!(before, after, "the new agent's programs run in the links");
    assert!(
        !r.bpffs.0.join("retired").exists() && !r.bpffs.0.join("staging").exists(),
        "the old maps are gone"
    );
    // The new agent enforces changes through the adopted links.
    r.k.manifests.remove("policy.yaml");
    reaches(&r.k.a, &r.k.b, 80, "policy deleted after the restart");
    r
}

#[test]
fn sigterm_restart_has_no_gap() {
    restart_without_a_gap("rs-term", Stop::Term, &[]);
}

#[test]
fn sigkill_restart_has_no_gap() {
    restart_without_a_gap("rs-kill", Stop::Kill, &[]);
}

/// An upgrade whose maps do not fit the pinned ones (another capacity here; another layout
/// between versions): the new maps get the old entries, conntrack included, before any program
/// uses them.
#[test]
fn restart_with_other_map_sizes_has_no_gap() {
    let r = restart_without_a_gap(
        "rs-layout",
        Stop::Term,
        &["--conntrack-size", "100000", "--blocked-ports", "2000"],
    );
    for map in ["conntrack", "blocked"] {
        r.k.agent.wait_for("the replaced map", |l| {
            l.contains("does not fit this agent") && l.contains(&format!("map={map}"))
        });
    }
    // The long-lived connection's entries (and the others) went to the new conntrack.
    r.k.agent.wait_for("the carried over flows", |l| {
        l.contains("entries carried over into the new map") && l.contains("map=conntrack")
    });
}

/// A pod created while no agent runs has no programs on its veth until an agent returns; then
/// it is attached and its policy applies (and until its pod is known, the default for unknown
/// endpoints: deny).
#[test]
fn a_pod_created_while_no_agent_runs_is_enforced_when_one_returns() {
    let mut r = restartable("rs-newpod");
    r.stop(Stop::Kill);
    let d =
        r.k.lab
            .add_routed_pod("d", "10.67.0.9".parse().unwrap(), None)
            .unwrap();
    let _server = d.serve_tcp(80).unwrap();
    r.k.pods.push(PodDecl {
        ns: "ns-x".into(),
        name: "d".into(),
        labels: "{app: d}".into(),
        ports: PORTS.into(),
        ip: IpAddr::V4(d.ipv4),
    });
    r.k.write_cluster();
    // No agent: nothing on d's veth, but a's and c's veths still enforce (d is no known pod,
    // so only rules for any address could allow it).
    assert!(attached_programs(&r.k, &d).iter().all(Vec::is_empty));
    r.start(&[]);
    reaches(&r.k.c, &d, 80, "d accepts team=blue on 80");
    blocked(&r.k.a, &d, 80, "d is isolated by the policy of ns-x");
    let programs = attached_programs(&r.k, &d);
    assert!(programs.iter().all(|p| p.len() == 1), "{programs:?}");
}

/// An agent that starts with other verdict switches than its predecessor (here: audit mode
/// off after audit mode on) re-checks the flows tracked before: a connection only audit mode let
/// through is cut, not kept as established.
#[test]
fn a_restart_out_of_audit_mode_rechecks_tracked_flows() {
    let mut k = cluster_with_agent("rs-audit", &[], &[], &["--audit"]);
    k.manifests
        .write("policy.yaml", &policy("ns-x", "from-blue", POLICY));
    k.agent.wait_for("the policy synced", |l| {
        l.contains("policy state synced") && l.contains("policy_entries=2")
    });
    let mut conn = open(&k.a, &k.b, 80); // denied, but audit mode only counts it
    k.agent.owns_bpffs = false;
    let mut r = Restartable {
        bpffs: BpffsDir(k.agent.bpffs.clone()),
        args: [
            "--manifests",
            k.manifests.path().to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:9090",
        ]
        .map(str::to_owned)
        .to_vec(),
        k,
    };
    r.stop(Stop::Term);
    conn.check(EXCHANGE)
        .expect("no agent: the pinned programs keep the audit verdicts");
    r.start(&[]);
    exchange_times_out(
        &mut conn,
        "audit mode is off: the denied flow is re-checked",
    );
    blocked(&r.k.a, &r.k.b, 80, "and new ones are denied");
}
