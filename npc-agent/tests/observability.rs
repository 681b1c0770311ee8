//! What operators see, from outside, with real packets between lab pods: exact counters in
//! `/metrics`, one denied-connection log line per denied connect naming the pods and the
//! policies, audit mode (global and per namespace), the blocked map's overflow bucket, and
//! `npc-agent dump` with names. Also checks that the dashboard and the alerting rules in
//! `deploy/monitoring` only query metrics the agent serves.
//!
//! The cluster is the one of `policy.rs` (see `support::cluster`): a, b in ns-x (bridge), c in
//! ns-y (routed). Counters are compared before and after a known number of connects, so
//! traffic of the setup does not matter.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use npc_common::ENDPOINT_INGRESS_ISOLATED;
use npc_tests::lab::{ConnectOutcome, Pod};

mod support;
use support::{AGENT, Agent, cluster::*, scrape::*};

/// Long enough for the kernel to retransmit the SYN once (after 1 s): a retransmission must not
/// count as another connection.
const SLOW_CONNECT: Duration = Duration::from_millis(1300);

fn blocked_tcp(s: &Scrape, dir: &str, dport: &str) -> f64 {
    s.get(
        "npc_blocked_connections_total",
        &[("direction", dir), ("protocol", "tcp"), ("dport", dport)],
    )
}

fn would_block_tcp(s: &Scrape, dir: &str, dport: &str) -> f64 {
    s.get(
        "npc_audit_would_block_total",
        &[("direction", dir), ("protocol", "tcp"), ("dport", dport)],
    )
}

/// Waits until `pod`'s endpoint is isolated for ingress (the policy is in the maps).
fn wait_isolated(k: &Cluster, pod: &Pod) {
    endpoint_until(&k.agent, pod, "ingress isolation applied", |e| {
        e.flags & ENDPOINT_INGRESS_ISOLATED != 0
    });
}

/// `n` connects from `from` to `to:port`, each expecting `outcome`.
fn connects(from: &Pod, to: &Pod, port: u16, n: usize, outcome: ConnectOutcome) {
    for i in 0..n {
        let got = from.connect_tcp(IpAddr::V4(to.ipv4), port, SLOW_CONNECT);
        assert_eq!(
            got, outcome,
            "connect {i} {} -> {}:{port}",
            from.name, to.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The denied-connection log (JSON)
// ---------------------------------------------------------------------------------------------

/// The agent's JSON log lines from the `npc::denied` target.
fn denied_lines(agent: &Agent) -> Vec<serde_json::Value> {
    agent
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "npc::denied")
        .collect()
}

/// The deny lines matching every (key, value) of `fields`.
fn lines_with(agent: &Agent, fields: &[(&str, &str)]) -> Vec<serde_json::Value> {
    denied_lines(agent)
        .into_iter()
        .filter(|v| fields.iter().all(|(k, want)| v[*k].as_str() == Some(*want)))
        .collect()
}

/// Waits until exactly `n` deny lines match `fields` (events arrive asynchronously), then
/// checks no more arrive for a moment.
fn expect_lines(agent: &Agent, fields: &[(&str, &str)], n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = lines_with(agent, fields);
        if got.len() >= n || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let got = lines_with(agent, fields);
    assert_eq!(
        got.len(),
        n,
        "deny lines with {fields:?}: {got:#?}\nall deny lines: {:#?}",
        denied_lines(agent)
    );
    got
}

const DENY_B: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: deny-b, namespace: ns-x}\nspec: {podSelector: {matchLabels: {app: b}}}\n---\n\
    apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
    metadata: {name: b-from-a, namespace: ns-x}\n\
    spec:\n  podSelector: {matchLabels: {app: b}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]\n";

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Three denied connects (each with a retransmitted SYN) count exactly three blocked
/// connections with the right labels, and log three lines naming both pods and both policies
/// that isolate b; an allowed connect counts one allowed connection per side. The dashboard and
/// the alerting rules only use metrics the agent serves.
#[test]
fn denied_connects_are_counted_once_and_logged_with_pods_and_policies() {
    let k = cluster_with_agent("metrics", &[], &[], &["--log-format", "json"]);
    k.manifests.write("deny.yaml", DENY_B);
    wait_isolated(&k, &k.b);
    // a is allowed to b: wait until that is in force too.
    reaches(&k.a, &k.b, 80, "a -> b allowed");

    let before = scrape(&k.lab);
    connects(&k.c, &k.b, 80, 3, ConnectOutcome::TimedOut);
    let after = scrape(&k.lab);
    assert_eq!(
        blocked_tcp(&after, "ingress", "80") - blocked_tcp(&before, "ingress", "80"),
        3.0,
        "three denied connects, retransmissions not counted:\n{}",
        after.text
    );
    let dropped = |s: &Scrape| {
        s.get(
            "npc_dropped_packets_total",
            &[
                ("direction", "ingress"),
                ("protocol", "tcp"),
                ("reason", "policy_denied"),
            ],
        )
    };
    let packets = dropped(&after) - dropped(&before);
    assert!(
        packets >= 6.0,
        "every SYN (3 first + 3 retransmitted) is a dropped packet: {packets}"
    );

    let lines = expect_lines(
        &k.agent,
        &[("src_peer", "pod ns-y/c"), ("dst_peer", "pod ns-x/b")],
        3,
    );
    for line in &lines {
        assert_eq!(line["message"], "connection denied", "{line}");
        assert_eq!(line["direction"], "ingress", "{line}");
        assert_eq!(line["protocol"], "tcp", "{line}");
        assert_eq!(line["reason"], "policy_denied", "{line}");
        assert_eq!(line["pod"], "ns-x/b", "{line}");
        assert_eq!(line["policies"], "ns-x/b-from-a,ns-x/deny-b", "{line}");
        assert_eq!(line["dst"], format!("{}:80", k.b.ipv4), "{line}");
        let src = line["src"].as_str().unwrap();
        assert!(src.starts_with(&format!("{}:", k.c.ipv4)), "{line}");
    }

    // Allowed: one new connection, counted by a's egress hook and b's ingress hook.
    let before = scrape(&k.lab);
    connects(&k.a, &k.b, 80, 1, ConnectOutcome::Connected);
    let after = scrape(&k.lab);
    for dir in ["ingress", "egress"] {
        let allowed = |s: &Scrape| {
            s.get(
                "npc_allowed_connections_total",
                &[("direction", dir), ("protocol", "tcp")],
            )
        };
        assert_eq!(allowed(&after) - allowed(&before), 1.0, "{dir}");
    }
    assert_eq!(
        blocked_tcp(&after, "ingress", "80"),
        blocked_tcp(&before, "ingress", "80")
    );

    // Agent health.
    assert_eq!(
        after.get("npc_policy_syncs_total", &[("result", "error")]),
        0.0
    );
    assert!(after.get("npc_policy_syncs_total", &[("result", "success")]) >= 1.0);
    assert!(after.get("npc_policy_sync_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        after.get("npc_endpoints", &[("local", "true")]),
        3.0,
        "{}",
        after.text
    );
    assert_eq!(
        after.get("npc_endpoints", &[("local", "false")]),
        0.0,
        "the node's own addresses are no pod endpoints"
    );
    assert_eq!(after.get("npc_identities", &[]), 3.0);
    assert!(after.get("npc_attached_interfaces", &[]) >= 3.0);
    assert!(after.get("npc_map_entries", &[("map", "policy")]) >= 1.0);
    assert_eq!(
        after.get("npc_map_capacity", &[("map", "conntrack")]),
        f64::from(npc_common::capacity::CONNTRACK)
    );
    assert!(after.get("process_resident_memory_bytes", &[]) > 1e6);
    assert_eq!(after.get("npc_events_lost_total", &[]), 0.0);
    assert_eq!(after.get("npc_invalid_objects", &[]), 0.0);

    // The dashboard and the rules query only what the agent serves.
    let families = after.families();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring");
    for file in ["grafana-dashboard.json", "prometheus-rules.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut used = BTreeSet::new();
        for (i, _) in text
            .match_indices("npc_")
            .chain(text.match_indices("process_"))
        {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used.insert(name);
        }
        assert!(!used.is_empty(), "{file} queries no metric");
        for name in used {
            let family = ["_bucket", "_count", "_sum", "_total", "_info"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            // Served in Kubernetes mode only (this agent runs in manifests mode); checked by
            // tests/kubernetes.rs.
            if KUBERNETES_MODE_ONLY.contains(&family) {
                continue;
            }
            assert!(
                families.contains(family) || families.contains(&name),
                "{file} uses {name}, which /metrics does not serve ({families:?})"
            );
        }
    }
}

/// Metric families only an agent in Kubernetes mode serves.
const KUBERNETES_MODE_ONLY: &[&str] = &["npc_kube_watch_errors"];

/// Egress: c may not talk to a; the line names c (whose policy denied it) and c's policy.
#[test]
fn denied_egress_names_the_client_and_its_policy() {
    let k = cluster_with_agent("egress-log", &[], &[], &["--log-format", "json"]);
    k.manifests.write(
        "egress.yaml",
        &policy(
            "ns-y",
            "c-egress",
            "{podSelector: {matchLabels: {app: c}}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {app: nothing}}}]}]}",
        ),
    );
    blocked(&k.c, &k.a, 80, "c's egress denied");
    let before = scrape(&k.lab);
    connects(&k.c, &k.a, 81, 2, ConnectOutcome::TimedOut);
    let after = scrape(&k.lab);
    assert_eq!(
        blocked_tcp(&after, "egress", "81") - blocked_tcp(&before, "egress", "81"),
        2.0
    );
    let lines = expect_lines(&k.agent, &[("dst", &format!("{}:81", k.a.ipv4))], 2);
    for line in &lines {
        assert_eq!(line["direction"], "egress", "{line}");
        assert_eq!(line["pod"], "ns-y/c", "{line}");
        assert_eq!(line["policies"], "ns-y/c-egress", "{line}");
        assert_eq!(line["src_peer"], "pod ns-y/c", "{line}");
        assert_eq!(line["dst_peer"], "pod ns-x/a", "{line}");
    }
}

/// Audit by namespace annotation: ns-x's denied connections pass, are counted as "would block"
/// (not as blocked) and logged as such; ns-y stays enforced.
#[test]
fn audit_namespace_passes_counts_and_logs() {
    let k = cluster_with_agent("audit-ns", &[], &[], &["--log-format", "json"]);
    k.manifests.write("deny.yaml", DENY_B);
    k.manifests.write(
        "deny-y.yaml",
        &policy("ns-y", "deny-y", "{podSelector: {}}"),
    );
    wait_isolated(&k, &k.b);
    blocked(&k.a, &k.c, 80, "ns-y enforced");
    // Annotate ns-x for audit (the cluster file declares namespaces without annotations).
    let mut yaml = std::fs::read_to_string(k.manifests.path().join("cluster.yaml")).unwrap();
    yaml = yaml.replacen(
        "metadata:\n  name: ns-x\n",
        "metadata:\n  name: ns-x\n  annotations: {npc.dev/enforcement: audit}\n",
        1,
    );
    k.manifests.write("cluster.yaml", &yaml);
    endpoint_until(&k.agent, &k.b, "audit flag", |e| {
        e.flags & npc_common::ENDPOINT_AUDIT != 0
    });
    let before = scrape(&k.lab);
    connects(&k.c, &k.b, 80, 2, ConnectOutcome::Connected);
    let after = scrape(&k.lab);
    assert_eq!(
        would_block_tcp(&after, "ingress", "80") - would_block_tcp(&before, "ingress", "80"),
        2.0,
        "{}",
        after.text
    );
    assert_eq!(
        blocked_tcp(&after, "ingress", "80"),
        blocked_tcp(&before, "ingress", "80"),
        "audited connections are not blocked"
    );
    let lines = expect_lines(
        &k.agent,
        &[("src_peer", "pod ns-y/c"), ("dst_peer", "pod ns-x/b")],
        2,
    );
    for line in &lines {
        assert_eq!(
            line["message"], "connection would be denied (audit)",
            "{line}"
        );
        assert_eq!(line["audit"], true, "{line}");
        assert_eq!(line["pod"], "ns-x/b", "{line}");
    }
    // ns-y is still enforced.
    holds(&k.a, &k.c, 80, ConnectOutcome::TimedOut, "ns-y enforced");
    // Back to enforce: the audited connections' flows are checked again, new ones are blocked.
    k.write_cluster();
    blocked(&k.c, &k.b, 80, "enforced again");
}

/// `--audit`: every denial passes and is counted.
#[test]
fn global_audit_passes_everything_and_counts() {
    let k = cluster_with_agent("audit-all", &[], &[], &["--audit"]);
    k.manifests.write("deny.yaml", DENY_B);
    wait_isolated(&k, &k.b);
    let before = scrape(&k.lab);
    connects(&k.c, &k.b, 81, 3, ConnectOutcome::Connected);
    let after = scrape(&k.lab);
    assert_eq!(
        would_block_tcp(&after, "ingress", "81") - would_block_tcp(&before, "ingress", "81"),
        3.0
    );
    assert_eq!(blocked_tcp(&after, "ingress", "81"), 0.0);
}

/// With room for two ports in the blocked map, the third and fourth denied ports are counted
/// under `dport="other"`.
#[test]
fn blocked_ports_beyond_the_map_are_counted_as_other() {
    let k = cluster_with_agent("overflow", &[], &[], &["--blocked-ports", "2"]);
    k.manifests.write("deny.yaml", DENY_B);
    wait_isolated(&k, &k.b);
    for port in [80, 81, 82, 83] {
        connects(&k.c, &k.b, port, 1, ConnectOutcome::TimedOut);
    }
    let s = scrape(&k.lab);
    let ports: BTreeMap<String, f64> = s
        .series
        .iter()
        .filter(|(n, l, _)| {
            n == "npc_blocked_connections_total"
                && l.get("direction").map(String::as_str) == Some("ingress")
        })
        .map(|(_, l, v)| (l["dport"].clone(), *v))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            ("80".to_string(), 1.0),
            ("81".to_string(), 1.0),
            ("other".to_string(), 2.0)
        ]),
        "{}",
        s.text
    );
    assert_eq!(
        s.get(
            "npc_datapath_events_total",
            &[("event", "blocked_overflow")]
        ),
        2.0
    );
}

/// `npc-agent dump`, text and JSON, names pods, identities and the policy behind each entry.
#[test]
fn map_dump_names_pods_and_policies() {
    let k = cluster("dump");
    k.manifests.write("deny.yaml", DENY_B);
    wait_isolated(&k, &k.b);
    reaches(&k.a, &k.b, 80, "a -> b allowed");
    let dump = |args: &[&str]| {
        let out = Command::new(AGENT)
            .arg("--bpffs")
            .arg(&k.agent.bpffs)
            .arg("--state-dir")
            .arg(&k.agent.state_dir)
            .arg("dump")
            .args(args)
            .output()
            .expect("running npc-agent dump");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "dump {args:?}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let text = dump(&[]);
    for want in [
        "ns-x/a",
        "ns-x/b",
        "ns-y/c",
        "ns-x/b-from-a",
        &k.b.ipv4.to_string(),
    ] {
        assert!(text.contains(want), "dump lacks {want}:\n{text}");
    }
    let policy = dump(&["policy"]);
    assert!(policy.contains("ns-x/b-from-a ingress[0]"), "{policy}");
    assert!(
        !policy.contains("conntrack"),
        "only the policy map:\n{policy}"
    );

    let json: serde_json::Value = serde_json::from_str(&dump(&["--json"])).expect("JSON");
    let text = json.to_string();
    for want in ["ns-x/b", "ns-x/b-from-a", "ns-y/c"] {
        assert!(text.contains(want), "JSON dump lacks {want}");
    }
    assert!(
        json["endpoints"].is_array() || json["endpoints"].is_object(),
        "{json}"
    );
    assert!(
        json["policy"].is_array() || json["policy"].is_object(),
        "{json}"
    );
    // The established a -> b flow is in conntrack with both pods.
    let ct = json["conntrack"].to_string();
    assert!(ct.contains(&k.b.ipv4.to_string()), "{ct}");
}
