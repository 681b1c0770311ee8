//! The test API server itself ([`support::apiserver`]): etcd and kube-apiserver start, the admin
//! may do everything a test needs (pods' status included), the agent's ServiceAccount token may
//! only read pods, namespaces and NetworkPolicies, and a restarted API server has the same data
//! and accepts the same token. No BPF, no root.
//!
//! Needs the binaries of `cargo xtask kube-apiserver` (`cargo xtask test` builds them and sets
//! NPC_KUBE_APISERVER and NPC_ETCD).
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Secret},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use serde_json::json;

mod support;
use support::apiserver::{self, ApiServer};

/// How long a request to a stopped API server may take to fail.
const FAIL_WAIT: Duration = Duration::from_secs(10);

async fn create_namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "main", "image": "example.invalid/none"}]},
    }))
    .unwrap()
}

fn status_code(result: kube::Result<impl std::fmt::Debug>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// VmRSS of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

#[tokio::test]
async fn admin_creates_pods_and_sets_their_addresses() {
    let api = ApiServer::start("admin");
    let client = api.admin().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, "v1.20.2");

    create_namespace(&client, "ns-a").await;
    let pods = Api::<Pod>::namespaced(client.clone(), "ns-a");
    pods.create(&PostParams::default(), &pod("web"))
        .await
        .unwrap();
    // Nothing schedules or runs it.
    let created = pods.get("web").await.unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"));

    // What a kubelet would report; podIP and podIPs together (on a difference the API server
    // keeps podIP, for old clients).
    for ip in ["10.1.0.5", "10.1.0.6"] {
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        }});
        pods.patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        let read = pods.get("web").await.unwrap().status.unwrap();
        let ips: Vec<String> = read.pod_ips.unwrap().into_iter().map(|p| p.ip).collect();
        assert_eq!(ips, [ip]);
        assert_eq!(read.pod_ip.as_deref(), Some(ip));
    }

    let (etcd, kube_apiserver) = api.pids();
    eprintln!(
        "RSS: kube-apiserver {} MiB, etcd {} MiB",
        rss_mib(kube_apiserver.unwrap()),
        rss_mib(etcd.unwrap())
    );
}

#[tokio::test]
async fn agent_token_may_only_read() {
    let api = ApiServer::start("agent");
    let admin = api.admin().await;
    create_namespace(&admin, "ns-b").await;
    let kubeconfig = api.agent_kubeconfig().await;
    // Idempotent: the objects exist already, a new token is issued.
    assert_eq!(api.agent_kubeconfig().await, kubeconfig);
    let agent = apiserver::client(&kubeconfig).await;

    let all = ListParams::default();
    Api::<Pod>::all(agent.clone()).list(&all).await.unwrap();
    let namespaces = Api::<Namespace>::all(agent.clone())
        .list(&all)
        .await
        .unwrap();
    assert!(
        namespaces
            .items
            .iter()
            .any(|ns| ns.metadata.name.as_deref() == Some("ns-b"))
    );
    let policies = Api::<NetworkPolicy>::all(agent.clone());
    let list = policies.list(&all).await.unwrap();

    // A watch sees what the admin creates.
    let version = list.metadata.resource_version.unwrap();
    let params = WatchParams::default().timeout(10);
    let mut events = policies.watch(&params, &version).await.unwrap().boxed();
    let policy: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-all", "namespace": "ns-b"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }))
    .unwrap();
    Api::<NetworkPolicy>::namespaced(admin.clone(), "ns-b")
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.try_next())
        .await
        .expect("no watch event within 10 s")
        .unwrap();
    match event {
        Some(WatchEvent::Added(p)) => assert_eq!(p.metadata.name.as_deref(), Some("deny-all")),
        other => panic!("expected the policy's ADDED event, got {other:?}"),
    }

    // Nothing else: RBAC answers 403.
    let secrets = Api::<Secret>::namespaced(agent.clone(), "kube-system");
    assert_eq!(status_code(secrets.get("anything").await), 403);
    assert_eq!(status_code(secrets.list(&all).await), 403);
    let pods = Api::<Pod>::namespaced(agent.clone(), "ns-b");
    assert_eq!(
        status_code(pods.create(&PostParams::default(), &pod("intruder")).await),
        403
    );
}

#[tokio::test]
async fn restart_keeps_data_and_tokens() {
    let mut api = ApiServer::start("restart");
    let port = api.port();
    let admin = api.admin().await;
    create_namespace(&admin, "ns-c").await;
    let kubeconfig = api.agent_kubeconfig().await;
    let agent = apiserver::client(&kubeconfig).await;
    let agent_pods = Api::<Pod>::all(agent.clone());
    agent_pods.list(&ListParams::default()).await.unwrap();

    api.stop_apiserver();
    let namespaces = Api::<Namespace>::all(admin.clone());
    let result = tokio::time::timeout(FAIL_WAIT, namespaces.get("ns-c"))
        .await
        .expect("a request to a stopped API server hangs");
    assert!(
        result.is_err(),
        "the API server answered after stop: {result:?}"
    );

    api.restart_apiserver();
    assert_eq!(api.port(), port);
    // The clients from before the restart reconnect; etcd kept the data.
    namespaces.get("ns-c").await.unwrap();
    agent_pods.list(&ListParams::default()).await.unwrap();
    // So is a client made afresh from the same kubeconfig (the same token).
    let again = apiserver::client(&kubeconfig).await;
    Api::<Namespace>::all(again).get("ns-c").await.unwrap();
}

#[test]
fn base64_matches_rfc4648() {
    for (input, expected) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(apiserver::base64(input.as_bytes()), expected);
    }
}

/// `deploy/rbac.yaml` (what the tests run the agent with) only reads, and only pods, namespaces
/// and NetworkPolicies: no wildcard, no write verb, no other resource.
#[test]
fn deploy_rbac_is_read_only() {
    let (_, role, binding) = support::apiserver::deploy_rbac();
    let mut granted = Vec::new();
    for rule in role.rules.iter().flatten() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.push(format!("{group}/{resource}"));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        ["/namespaces", "/pods", "networking.k8s.io/networkpolicies"]
    );
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
}
