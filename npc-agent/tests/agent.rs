//! The real `npc-agent` binary in a network-namespace lab (see `npc_tests::lab`): it attaches to
//! the pods' host veths, present and created later, enforces the default for unknown endpoints,
//! exits cleanly on SIGTERM/SIGINT (its pinned links keep enforcing), and `cleanup` removes its
//! pins and so detaches.
//!
//! Needs root (BPF, network namespaces, bpffs). The test lives in the npc-agent package because
//! only there does cargo build the binary for it (`CARGO_BIN_EXE_npc-agent`); the lab comes from
//! npc-tests, a dev-dependency.
//!
//! Cleanup also on failure: the `Agent` guard kills the agent and removes its bpffs directory,
//! the `Lab` removes its namespaces; both on drop, so also while a failed assertion unwinds.
use std::{
    net::IpAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use npc_common::{Counter, Direction, DropReason, map_names};
use npc_tests::lab::{Bridge, ConnectOutcome, Lab, Pod, ServerHandle};

mod support;
use support::*;

/// How long a connection attempt may take: a dropped SYN shows as a timeout.
const CONNECT: Duration = Duration::from_secs(1);
const PORT: u16 = 8080;

// ---------------------------------------------------------------------------------------------
// The lab: a bridge with pods a (client) and b (TCP echo server)
// ---------------------------------------------------------------------------------------------

/// Fields drop in order: the server, then the lab (which deletes the namespaces).
struct Setup {
    _server: ServerHandle,
    a: Pod,
    b: Pod,
    bridge: Bridge,
    lab: Lab,
}

fn setup() -> Setup {
    let lab = Lab::new("agent").expect("creating the lab");
    let bridge = lab
        .add_bridge("br0", "10.77.0.1/24", None)
        .expect("creating the bridge");
    let a = lab
        .add_pod_on_bridge(&bridge, "a", "10.77.0.2".parse().unwrap(), None)
        .expect("creating pod a");
    let b = lab
        .add_pod_on_bridge(&bridge, "b", "10.77.0.3".parse().unwrap(), None)
        .expect("creating pod b");
    let server = b.serve_tcp(PORT).expect("serving TCP in pod b");
    let setup = Setup {
        _server: server,
        a,
        b,
        bridge,
        lab,
    };
    assert_eq!(
        setup.a_to_b(),
        ConnectOutcome::Connected,
        "without the agent, a reaches b"
    );
    setup
}

impl Setup {
    fn a_to_b(&self) -> ConnectOutcome {
        self.a.connect_tcp(IpAddr::V4(self.b.ipv4), PORT, CONNECT)
    }

    fn add_pod(&self, name: &str, ip: &str) -> Pod {
        self.lab
            .add_pod_on_bridge(&self.bridge, name, ip.parse().unwrap(), None)
            .unwrap_or_else(|e| panic!("creating pod {name}: {e:#}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// (a) Denying unknown endpoints: once attached to both host veths, a's SYN is dropped. Runs
/// the agent the way users of the lab do, under `ip netns exec` (the agent mounts a bpffs).
#[test]
fn unknown_endpoints_deny_drops_once_attached() {
    let s = setup();
    let agent = Agent::start(
        &s.lab,
        Enter::IpNetnsExec,
        &["run", "--datapath-only", "--unknown-endpoints", "deny"],
    );
    let line = agent.wait_attached(&s.a.host_veth);
    assert!(
        line.contains(&format!("ifindex={}", s.a.host_ifindex)),
        "{line}"
    );
    assert!(
        line.contains("mode=tcx") || line.contains("mode=clsact"),
        "{line}"
    );
    agent.wait_attached(&s.b.host_veth);
    assert_eq!(s.a_to_b(), ConnectOutcome::TimedOut);
    // The bridge is no veth.
    assert!(!agent.has_attached(&s.bridge.name), "{}", agent.log());
}

/// (b) A veth created after the agent started is attached too, and forgotten when deleted.
#[test]
fn veth_added_later_is_attached() {
    let s = setup();
    let mut agent = Agent::start(&s.lab, Enter::Netns, &["run", "--datapath-only"]);
    agent.wait_attached(&s.a.host_veth);
    agent.wait_attached(&s.b.host_veth);

    let c = s.add_pod("c", "10.77.0.4");
    agent.wait_attached(&c.host_veth);
    assert_eq!(
        c.connect_tcp(IpAddr::V4(s.b.ipv4), PORT, CONNECT),
        ConnectOutcome::TimedOut
    );
    // Dropped as unknown endpoints (c's SYN leaving c, on c's host veth ingress), counted.
    let dropped = agent
        .maps()
        .drop_total(DropReason::UnknownEndpoint, Direction::Egress)
        .unwrap();
    assert!(dropped > 0, "no unknown-endpoint drops counted");

    s.lab
        .exec(s.lab.node_netns(), &["ip", "link", "del", &c.host_veth])
        .expect("deleting c's veth");
    agent.wait_detached(&c.host_veth);
    assert!(agent.running(), "{}", agent.log());
}

/// Veths that come and go faster than the agent can attach: attach failures are only warnings,
/// every attachment is forgotten with its interface, and the agent goes on.
#[test]
fn veth_churn_is_survived() {
    let s = setup();
    let mut agent = Agent::start(&s.lab, Enter::Netns, &["run", "--datapath-only"]);
    agent.wait_attached(&s.b.host_veth);
    s.lab
        .exec(
            s.lab.node_netns(),
            &[
                "sh",
                "-c",
                "for i in $(seq 1 40); do ip link add chx$i type veth peer name chy$i; \
                 ip link del chx$i; done",
            ],
        )
        .expect("creating and deleting veths");
    // Created after the churn: once it is attached, every churn event was handled.
    let c = s.add_pod("c", "10.77.0.4");
    agent.wait_attached(&c.host_veth);
    assert!(agent.running(), "{}", agent.log());
    let log = agent.log();
    for i in 1..=40 {
        for name in [format!("chx{i}"), format!("chy{i}")] {
            let attached = log.lines().any(|l| agent.is_event(l, "attached", &name));
            let detached = log
                .lines()
                .any(|l| agent.is_event(l, "detached: interface removed", &name));
            assert_eq!(attached, detached, "{name}:\n{log}");
        }
    }
    assert_eq!(
        c.connect_tcp(IpAddr::V4(s.b.ipv4), PORT, CONNECT),
        ConnectOutcome::TimedOut
    );
}

/// (c) Allowing unknown endpoints: traffic flows through the attached programs, which count it.
/// No subcommand (run is the default) and JSON logs.
#[test]
fn unknown_endpoints_allow_passes() {
    let s = setup();
    let agent = Agent::start(
        &s.lab,
        Enter::Netns,
        &[
            "--log-format",
            "json",
            "--datapath-only",
            "--unknown-endpoints",
            "allow",
        ],
    );
    agent.wait_attached(&s.a.host_veth);
    agent.wait_attached(&s.b.host_veth);
    let passed_before = agent
        .maps()
        .counter(Counter::UnknownEndpointPassed)
        .unwrap();
    assert_eq!(s.a_to_b(), ConnectOutcome::Connected);
    let passed = agent
        .maps()
        .counter(Counter::UnknownEndpointPassed)
        .unwrap();
    assert!(
        passed > passed_before,
        "the programs saw none of the traffic"
    );
}

/// (d) SIGTERM: the agent exits 0 within seconds; its pinned links keep enforcing until
/// `cleanup` removes them.
#[test]
fn sigterm_exits_cleanly_and_enforcement_stays() {
    let s = setup();
    let mut agent = Agent::start(&s.lab, Enter::Netns, &["run", "--datapath-only"]);
    agent.wait_attached(&s.a.host_veth);
    agent.wait_attached(&s.b.host_veth);
    assert_eq!(s.a_to_b(), ConnectOutcome::TimedOut);

    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    agent.wait_for("the shutdown log line", |l| {
        l.contains("shutting down") && l.contains("SIGTERM")
    });
    assert_eq!(
        s.a_to_b(),
        ConnectOutcome::TimedOut,
        "enforced after the agent"
    );
    let out = agent_command(&["cleanup", "--bpffs", agent.bpffs.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    // The kernel releases a link whose last pin is gone from a work queue: soon, not at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while s.a_to_b() != ConnectOutcome::Connected {
        assert!(
            std::time::Instant::now() < deadline,
            "cleanup did not detach"
        );
    }
}

/// (e) `cleanup` removes the pins a stopped agent left (after a SIGINT shutdown), says what it
/// removed, and refuses directories that are not on a bpffs.
#[test]
fn cleanup_removes_the_pins() {
    let s = setup();
    let mut agent = Agent::start(&s.lab, Enter::Netns, &["run", "--datapath-only"]);
    agent.wait_attached(&s.a.host_veth);
    agent.signal(libc::SIGINT);
    assert_eq!(agent.wait_exit().code(), Some(0), "{}", agent.log());
    agent.wait_for("the shutdown log line", |l| {
        l.contains("shutting down") && l.contains("SIGINT")
    });

    let dir = agent.bpffs.to_str().unwrap().to_owned();
    let conntrack = agent.bpffs.join(map_names::CONNTRACK);
    assert!(conntrack.exists(), "the maps stay pinned after the agent");
    let out = agent_command(&["cleanup", "--bpffs", &dir]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!("removed {}", conntrack.display())),
        "{stdout}"
    );
    assert!(!agent.bpffs.exists(), "{stdout}");

    let out = agent_command(&["cleanup", "--bpffs", &dir]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to remove"),
        "{out:?}"
    );

    // Not a bpffs: an error (exit 1), and nothing removed.
    let not_bpffs = std::env::temp_dir().join(format!("npc-agenttest-{}", std::process::id()));
    std::fs::create_dir_all(&not_bpffs).unwrap();
    let keep = not_bpffs.join("keep");
    std::fs::write(&keep, "x").unwrap();
    let out = agent_command(&["cleanup", "--bpffs", not_bpffs.to_str().unwrap()]);
    let kept = keep.exists();
    let _ = std::fs::remove_dir_all(&not_bpffs);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not on a bpffs"),
        "{out:?}"
    );
    assert!(kept, "cleanup removed files outside a bpffs");
}

/// (f) Bad command lines exit non-zero with a message naming the problem.
#[test]
fn bad_cli_input_is_rejected() {
    for (args, expected) in [
        (
            &["run", "--unknown-endpoints", "maybe"][..],
            "invalid value 'maybe' for '--unknown-endpoints",
        ),
        (
            &["--host-traffic", "deny"],
            "[possible values: allow, policy]",
        ),
        (&["run", "--conntrack-size", "0"], "'--conntrack-size <N>'"),
        (&["--audit", "cleanup"], "'--audit' is an option of 'run'"),
        (&["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (
            &["run", "--datapath-only", "--manifests", "/tmp"],
            "'--datapath-only' cannot be used with '--manifests <DIR>'",
        ),
    ] {
        let out = agent_command(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(out.status.code().is_some(), "{args:?}: killed by a signal");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `--interfaces` selects by name: only the matching veths get the datapath, also later ones.
#[test]
fn interfaces_glob_selects_by_name() {
    let s = setup();
    let agent = Agent::start(
        &s.lab,
        Enter::Netns,
        &[
            "run",
            "--datapath-only",
            "--interfaces",
            "npc1-*",
            "--interfaces",
            "npc?-c",
        ],
    );
    assert_eq!(s.b.host_veth, "npc1-b", "the lab's naming changed");
    agent.wait_attached(&s.b.host_veth);
    let c = s.add_pod("c", "10.77.0.4");
    agent.wait_attached(&c.host_veth);
    // a's veth came before b's in the initial dump, and c's long after: never attached.
    assert!(!agent.has_attached(&s.a.host_veth), "{}", agent.log());
}

/// A restarted agent reuses the pinned maps and adopts the pinned links; one asking for another
/// conntrack size replaces that map (its entries carried over) and removes the old one once its
/// programs run.
#[test]
fn restart_reuses_the_pins() {
    let s = setup();
    let dir = BpffsDir(unique_bpffs());
    let mut first = Agent::start_in(&s.lab, &dir, &["run", "--datapath-only"]);
    first.wait_attached(&s.a.host_veth);
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit().code(), Some(0), "{}", first.log());

    let second = Agent::start_in(&s.lab, &dir, &["run", "--datapath-only"]);
    second.wait_attached(&s.a.host_veth);
    second.wait_attached(&s.b.host_veth);
    assert_eq!(s.a_to_b(), ConnectOutcome::TimedOut);
    drop(second); // SIGKILL: the pins stay.

    let third = Agent::start_in(
        &s.lab,
        &dir,
        &["run", "--datapath-only", "--conntrack-size", "1024"],
    );
    third.wait_for("the replaced map", |l| {
        l.contains("does not fit this agent") && l.contains(map_names::CONNTRACK)
    });
    third.wait_for("the adoption", |l| {
        l.contains("adopted the previous agent's links")
    });
    let conntrack = aya::maps::MapData::from_pin(dir.0.join(map_names::CONNTRACK)).unwrap();
    assert_eq!(conntrack.info().unwrap().max_entries(), 1024);
    assert!(
        !dir.0.join("retired").exists(),
        "the old map's pin is removed"
    );
    assert_eq!(s.a_to_b(), ConnectOutcome::TimedOut);
}

/// The guard removes the agent's pins.
#[test]
fn guard_removes_its_bpffs() {
    let dir;
    {
        let s = setup();
        let agent = Agent::start(&s.lab, Enter::Netns, &["run", "--datapath-only"]);
        agent.wait_attached(&s.a.host_veth);
        dir = agent.bpffs.clone();
        assert!(Path::new(&dir).exists());
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// (g) Kubernetes mode (no `--manifests`) without a node name or without usable credentials
/// stops at once with a message saying what to set, before anything is loaded or pinned.
#[test]
fn kubernetes_mode_needs_a_node_name_and_credentials() {
    let bpffs = unique_bpffs();
    for (node_args, expected) in [
        (&[][..], "set --node-name or NODE_NAME"),
        (&["--node-name", "n1"][..], "no usable API credentials"),
    ] {
        let out = Command::new(AGENT)
            .args(["run", "--bpffs", bpffs.to_str().unwrap()])
            .args(node_args)
            .env_remove("NODE_NAME")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("KUBECONFIG", "/nonexistent/npc-test-kubeconfig")
            .stdin(Stdio::null())
            .output()
            .expect("running npc-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{node_args:?}: {stderr}");
        assert!(stderr.contains(expected), "{node_args:?}: {stderr}");
        assert!(!bpffs.exists(), "{node_args:?}: something was pinned");
    }
}
