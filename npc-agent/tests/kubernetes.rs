//! The agent in Kubernetes mode against a real API server (kube-apiserver 1.20 and etcd, built
//! by `cargo xtask kube-apiserver`), enforcing NetworkPolicies between real pods of a lab.
//!
//! The agent authenticates with a ServiceAccount token that may only get, list and watch pods,
//! namespaces and networkpolicies. There is no kubelet: the tests create Pod objects on the
//! agent's node and set their `status.podIPs` as a kubelet would. Each test has its own API
//! server, lab and agent.
//!
//! The cluster (see `support::kube`): pods a and b in namespace ns-x (team=red, on a bridge), c
//! in ns-y (team=blue, routed), each serving TCP 80 (`http`) and 81 (`alt`).
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use npc_common::{ENDPOINT_INGRESS_ISOLATED, EndpointInfo};
use npc_tests::lab::ConnectOutcome;
use serde_json::json;

mod support;
use support::{
    cluster::{APPLY, CONNECT, HOLD, blocked, endpoint_until, holds, reaches},
    kube::{KubeCluster, ports},
    scrape::{http_get, scrape},
};

const DENY_X: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
metadata: {name: deny, namespace: ns-x}\nspec: {podSelector: {}}\n";

/// b accepts ns-y (by the name label, which a 1.20 server does not set) on the `http` port.
const B_FROM_Y_HTTP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
metadata: {name: b-from-y, namespace: ns-x}\n\
spec:\n  podSelector: {matchLabels: {app: b}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ns-y}}\n    ports:\n    - port: http\n";

const B_FROM_Y_ALT: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
metadata: {name: b-from-y, namespace: ns-x}\n\
spec:\n  podSelector: {matchLabels: {app: b}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ns-y}}\n    ports:\n    - port: alt\n";

/// The longest the watchers may take to come back after the API server does: their backoff's
/// cap (30 s) plus the server's warm-up.
const RECONNECT: Duration = Duration::from_secs(60);

fn ingress_isolated(e: &EndpointInfo) -> bool {
    e.flags & ENDPOINT_INGRESS_ISOLATED != 0
}

/// `npc_kube_watch_errors_total`, summed over resources.
fn watch_errors(k: &KubeCluster) -> f64 {
    scrape(&k.lab).get("npc_kube_watch_errors_total", &[])
}

#[test]
fn initial_state_then_policy_add_update_delete() {
    let mut k = KubeCluster::new("crud");
    // A policy that exists before the agent: enforced by the time it is ready.
    k.apply_policy(DENY_X);
    k.start_agent(&[]);
    for pod in [&k.a, &k.b, &k.c] {
        k.wait_programmed(pod);
    }
    assert_eq!(
        k.a.connect_tcp(IpAddr::V4(k.b.ipv4), 80, CONNECT),
        ConnectOutcome::TimedOut,
        "the initial state is enforced once ready"
    );
    blocked(&k.c, &k.b, 80, "default deny in ns-x, from ns-y");
    reaches(&k.b, &k.c, 80, "ns-x's egress is not isolated");

    // Add: ns-y may reach b on the named port.
    k.apply_policy(B_FROM_Y_HTTP);
    reaches(&k.c, &k.b, 80, "ns-y on http");
    blocked(&k.c, &k.b, 81, "ns-y on another port");
    blocked(&k.a, &k.b, 80, "a is not in ns-y");

    // Update: the port changes.
    k.apply_policy(B_FROM_Y_ALT);
    reaches(&k.c, &k.b, 81, "ns-y on alt after the update");
    blocked(&k.c, &k.b, 80, "http no longer allowed");

    // Delete both: open again.
    k.delete_policy("ns-x", "deny");
    k.delete_policy("ns-x", "b-from-y");
    reaches(&k.a, &k.b, 80, "policies deleted");
    reaches(&k.c, &k.b, 81, "policies deleted");

    // The ServiceAccount's rights were enough for everything.
    assert_eq!(watch_errors(&k), 0.0, "{}", k.agent().log());
    let s = scrape(&k.lab);
    for resource in ["pods", "namespaces", "networkpolicies"] {
        assert!(
            s.text.contains(&format!(
                "npc_kube_watch_errors_total{{resource=\"{resource}\"}} 0"
            )),
            "no npc_kube_watch_errors_total series for {resource}:\n{}",
            s.text
        );
    }
    assert_eq!(s.get("npc_endpoints", &[("local", "true")]), 3.0);
    assert_eq!(s.get("npc_policy_syncs_total", &[("result", "error")]), 0.0);
}

#[test]
fn pod_and_namespace_relabels() {
    let mut k = KubeCluster::new("relabel");
    k.apply_policy(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: b-from-a-and-blue, namespace: ns-x}\n\
         spec:\n  podSelector: {matchLabels: {app: b}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: a}}\n    - namespaceSelector: {matchLabels: {team: blue}}\n",
    );
    k.start_agent(&[]);
    for pod in [&k.a, &k.b, &k.c] {
        k.wait_programmed(pod);
    }
    reaches(&k.a, &k.b, 80, "a by its pod label");
    reaches(&k.c, &k.b, 80, "c by its namespace's label");

    k.relabel_pod("ns-x", "a", json!({"app": "z"}));
    blocked(&k.a, &k.b, 80, "a relabeled away");
    k.relabel_namespace("ns-y", json!({"team": "green"}));
    blocked(&k.c, &k.b, 80, "ns-y relabeled away");

    k.relabel_pod("ns-x", "a", json!({"app": "a"}));
    k.relabel_namespace("ns-y", json!({"team": "blue"}));
    reaches(&k.a, &k.b, 80, "a relabeled back");
    reaches(&k.c, &k.b, 80, "ns-y relabeled back");
}

#[test]
fn pod_address_appearing_later_and_completed_pods() {
    let mut k = KubeCluster::new("podip");
    let d = k
        .lab
        .add_routed_pod("d", "10.67.0.3".parse().unwrap(), None)
        .unwrap();
    // d's object exists, without an address yet (the CNI has not reported it).
    k.create_pod("ns-y", "d", json!({"app": "d"}), ports());
    k.start_agent(&[]);
    k.wait_programmed(&k.b);
    // An address no pod has: an unknown endpoint, denied by default.
    holds(
        &d,
        &k.b,
        80,
        ConnectOutcome::TimedOut,
        "d has no address yet",
    );

    k.set_pod_ip("ns-y", "d", IpAddr::V4(d.ipv4));
    k.wait_programmed(&d);
    reaches(&d, &k.b, 80, "d known once its address is reported");

    // d runs to completion: its address is released (and may be given to another pod).
    k.patch_pod_status("ns-y", "d", json!({"status": {"phase": "Succeeded"}}));
    blocked(&d, &k.b, 80, "a completed pod's address is no endpoint");

    // Deleting a pod forgets its address.
    k.delete_pod("ns-x", "a");
    blocked(&k.a, &k.b, 80, "a deleted");
    reaches(&k.c, &k.b, 80, "the others are untouched");
}

#[test]
fn api_server_outage_keeps_enforcing_and_changes_apply_after() {
    let mut k = KubeCluster::new("outage");
    k.apply_policy(DENY_X);
    k.apply_policy(B_FROM_Y_HTTP);
    k.start_agent(&[]);
    for pod in [&k.a, &k.b, &k.c] {
        k.wait_programmed(pod);
    }
    reaches(&k.c, &k.b, 80, "before the outage");
    blocked(&k.a, &k.b, 80, "before the outage");
    blocked(&k.c, &k.a, 80, "before the outage: deny isolates a");
    let conn_before = support::cluster::open(&k.c, &k.b, 80);

    k.api.stop_apiserver();
    // The watchers notice (their connections close) and retry with backoff.
    let deadline = Instant::now() + Duration::from_secs(20);
    while watch_errors(&k) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "no watch error counted\n{}",
            k.agent().log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nothing is flushed: same verdicts, an established connection lives on, still ready.
    holds(
        &k.c,
        &k.b,
        80,
        ConnectOutcome::Connected,
        "during the outage",
    );
    holds(
        &k.a,
        &k.b,
        80,
        ConnectOutcome::TimedOut,
        "during the outage",
    );
    holds(
        &k.c,
        &k.a,
        80,
        ConnectOutcome::TimedOut,
        "during the outage",
    );
    let mut conn = conn_before;
    conn.check(Duration::from_secs(1))
        .expect("established connection during the outage");
    assert!(
        http_get(&k.lab, "/readyz").contains(" 200 "),
        "still ready during the outage"
    );
    std::thread::sleep(HOLD);
    holds(
        &k.a,
        &k.b,
        80,
        ConnectOutcome::TimedOut,
        "later in the outage",
    );

    k.api.restart_apiserver();
    // A change made after the restart applies once the watchers are back: their backoff
    // (0.8 s doubling to 30 s, jittered) decides when. Deleting `deny` lifts a's isolation (b
    // stays isolated by b-from-y).
    k.delete_policy("ns-x", "deny");
    let started = Instant::now();
    while k.c.connect_tcp(IpAddr::V4(k.a.ipv4), 80, CONNECT) != ConnectOutcome::Connected {
        assert!(
            started.elapsed() < RECONNECT,
            "deny deleted after the restart: c -> a still denied after {RECONNECT:?}\n{}",
            k.agent().log()
        );
    }
    blocked(&k.a, &k.b, 80, "b-from-y still isolates b");
    eprintln!(
        "change applied {:?} after the API server came back",
        started.elapsed()
    );
    conn.check(Duration::from_secs(1))
        .expect("established connection after the outage");
    let log = k.agent().log();
    assert!(log.contains("watch failed"), "{log}");
}

/// The time from creating a policy in the API to the agent's maps enforcing it, printed (a
/// measurement, not a limit: see docs/benchmarks.md).
#[test]
fn policy_create_to_enforcement_time() {
    let mut k = KubeCluster::new("latency");
    k.start_agent(&[]);
    k.wait_programmed(&k.b);
    let mut took = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        k.apply_policy(DENY_X);
        endpoint_until(k.agent(), &k.b, "isolated", ingress_isolated);
        took.push(started.elapsed());
        k.delete_policy("ns-x", "deny");
        endpoint_until(k.agent(), &k.b, "not isolated", |e| !ingress_isolated(e));
    }
    k.apply_policy(DENY_X);
    took.sort();
    eprintln!(
        "policy create -> enforced in the maps: min {:?}, median {:?}, max {:?} (10 runs; APPLY limit {:?})",
        took[0], took[5], took[9], APPLY
    );
    blocked(&k.a, &k.b, 80, "sanity: the last create enforced");
}

/// The agent's memory per 1,000 pods watched: RSS with the lab's 3 pods, then with
/// `NPC_KUBE_MEMORY_PODS` (default 10,000) more pods on 100 other nodes, as deployments of
/// `NPC_KUBE_MEMORY_REPLICAS` (default 10; 1: every pod an identity of its own) replicas spread
/// over 20 namespaces, with 3 labels each (`app`, `tier`, `pod-template-hash`) and 2 named ports. A measurement, run by hand (see docs/benchmarks.md):
/// `cargo test --release -p npc-agent --test kubernetes -- --ignored --nocapture memory`.
#[test]
#[ignore = "a measurement (minutes): run by hand"]
fn memory_per_1000_pods_watched() {
    use futures::{StreamExt as _, stream};
    use k8s_openapi::api::core::v1 as core;
    use kube::{
        Api,
        api::{Patch, PatchParams, PostParams},
    };

    let pods: usize = std::env::var("NPC_KUBE_MEMORY_PODS")
        .ok()
        .map(|v| v.parse().expect("NPC_KUBE_MEMORY_PODS: a number"))
        .unwrap_or(10_000);
    let replicas: usize = std::env::var("NPC_KUBE_MEMORY_REPLICAS")
        .ok()
        .map(|v| v.parse().expect("NPC_KUBE_MEMORY_REPLICAS: a number"))
        .unwrap_or(10);
    let mut k = KubeCluster::new("memory");
    for n in 0..20 {
        k.create_namespace(&format!("load-{n}"), json!({"team": format!("t{}", n % 4)}));
    }
    k.start_agent(&[]);
    k.wait_programmed(&k.b);
    let rss = |k: &KubeCluster| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", k.agent().pid())).unwrap();
        let kib = |field: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
        };
        (kib("VmRSS:"), kib("VmHWM:"))
    };
    std::thread::sleep(Duration::from_secs(2));
    let (base_rss, base_hwm) = rss(&k);

    let started = Instant::now();
    let client = k.client.clone();
    k.rt.block_on(
        stream::iter(0..pods)
            .map(|i| {
                let client = client.clone();
                async move {
                    let deployment = i / replicas;
                    let ns = format!("load-{}", deployment % 20);
                    let name = format!("dep-{deployment}-{i}");
                    let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
                    let mut pod = support::kube::pod_object(
                        &ns,
                        &name,
                        json!({"app": format!("dep-{deployment}"), "tier": format!("t{}", deployment % 3),
                               "pod-template-hash": format!("{:x}", deployment.wrapping_mul(2654435761))}),
                        ports(),
                    );
                    pod.spec.as_mut().unwrap().node_name = Some(format!("node-{}", 2 + i % 100));
                    let api = Api::<core::Pod>::namespaced(client, &ns);
                    api.create(&PostParams::default(), &pod).await.unwrap();
                    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>(),
    );
    let created = started.elapsed();
    // Every pod address is in the maps.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let remote = scrape(&k.lab).get("npc_endpoints", &[("local", "false")]);
        if remote as usize >= pods {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{remote} of {pods} remote pods programmed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let synced = started.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let (rss_after, hwm_after) = rss(&k);
    let per_1000 =
        |after: u64, before: u64| (after.saturating_sub(before)) as f64 / (pods as f64 / 1000.0);
    eprintln!(
        "{pods} pods ({replicas} per deployment) created in {created:?}, all in the maps after {synced:?}\n\
         agent RSS: {base_rss} KiB -> {rss_after} KiB ({:.0} KiB per 1,000 pods)\n\
         agent peak RSS (VmHWM): {base_hwm} KiB -> {hwm_after} KiB ({:.0} KiB per 1,000 pods)",
        per_1000(rss_after, base_rss),
        per_1000(hwm_after, base_hwm),
    );

    // A new agent that finds the pods already there (a restart): one list, one sync.
    k.agent = None;
    let started = Instant::now();
    k.start_agent_within(&[], Duration::from_secs(300));
    let ready = started.elapsed();
    let remote = scrape(&k.lab).get("npc_endpoints", &[("local", "false")]);
    assert!(
        remote as usize >= pods,
        "{remote} of {pods} remote pods programmed when ready"
    );
    std::thread::sleep(Duration::from_secs(5));
    let (rss_restart, hwm_restart) = rss(&k);
    eprintln!(
        "restarted agent: ready with every pod after {ready:?}; RSS {rss_restart} KiB \
         ({:.0} KiB per 1,000 pods over the baseline), peak {hwm_restart} KiB ({:.0} KiB per 1,000 pods)",
        per_1000(rss_restart, base_rss),
        per_1000(hwm_restart, base_hwm),
    );
}
