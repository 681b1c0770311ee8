//! The kube source without a cluster: the store's rules event by event, and the watchers
//! against a mock API server (tower-test) for what a real server does not easily produce: a
//! 410 Gone in the middle of a watch, objects the agent cannot use, undecodable events, a
//! server that refuses.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use k8s_openapi::api::{core::v1 as core, networking::v1 as networking};
use kube::{Client, client::Body, runtime::watcher::Event};
use serde_json::{Value, json};
use tower_test::mock;

use super::{KubeWatch, store::Store};
use crate::{metrics::Metrics, model::ObjectRef};

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

fn ns_json(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels, "resourceVersion": "1"},
    })
}

fn pod_json(ns: &str, name: &str, app: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}, "resourceVersion": "1"},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn policy_json(ns: &str, name: &str, cidr: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}]},
    })
}

fn ns(name: &str) -> core::Namespace {
    serde_json::from_value(ns_json(name, json!({}))).unwrap()
}

fn pod(ns: &str, name: &str, app: &str, ip: &str) -> core::Pod {
    serde_json::from_value(pod_json(ns, name, app, ip)).unwrap()
}

fn policy(ns: &str, name: &str, cidr: &str) -> networking::NetworkPolicy {
    serde_json::from_value(policy_json(ns, name, cidr)).unwrap()
}

fn key(ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        namespace: ns.into(),
        name: name.into(),
    }
}

/// A store whose three kinds are listed (empty but for `pods`).
fn synced_store(pods: Vec<core::Pod>) -> Store {
    let mut store = Store::new("node-1".into());
    store.apply::<core::Namespace>(Event::Init);
    store.apply::<core::Namespace>(Event::InitApply(ns("a")));
    store.apply::<core::Namespace>(Event::InitDone);
    store.apply::<networking::NetworkPolicy>(Event::Init);
    store.apply::<networking::NetworkPolicy>(Event::InitDone);
    store.apply::<core::Pod>(Event::Init);
    for p in pods {
        store.apply(Event::InitApply(p));
    }
    assert!(store.apply::<core::Pod>(Event::InitDone));
    store
}

fn app_of(store: &Store, ns: &str, name: &str) -> Option<String> {
    store
        .state()
        .pods
        .get(&key(ns, name))
        .map(|p| p.labels["app"].clone())
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

#[test]
fn nothing_is_published_before_every_kind_is_listed() {
    let mut store = Store::new("node-1".into());
    assert!(!store.apply::<core::Namespace>(Event::Init));
    assert!(!store.apply::<core::Namespace>(Event::InitApply(ns("a"))));
    assert!(!store.apply::<core::Namespace>(Event::InitDone));
    assert!(!store.apply::<core::Pod>(Event::Init));
    assert!(!store.apply::<core::Pod>(Event::InitDone));
    // A change before the last kind is listed: kept, not yet worth a sync.
    assert!(!store.apply(Event::Apply(pod("a", "p", "x", "10.0.0.1"))));
    assert!(!store.apply::<networking::NetworkPolicy>(Event::Init));
    assert!(!store.is_synced());
    // The last list, even an empty one, completes the initial state: worth the first sync.
    assert!(store.apply::<networking::NetworkPolicy>(Event::InitDone));
    assert!(store.is_synced());
    assert_eq!(store.state().node.as_deref(), Some("node-1"));
    assert_eq!(store.state().pods.len(), 1);
    assert_eq!(
        store.state().namespaces["a"].labels["kubernetes.io/metadata.name"],
        "a",
        "the namespace name label is set when the server (before 1.21) does not"
    );
}

#[test]
fn updates_and_deletes_apply_and_repeats_are_no_change() {
    let mut store = synced_store(vec![pod("a", "p", "x", "10.0.0.1")]);
    assert!(!store.apply(Event::Apply(pod("a", "p", "x", "10.0.0.1"))));
    assert!(store.apply(Event::Apply(pod("a", "p", "y", "10.0.0.1"))));
    assert_eq!(app_of(&store, "a", "p").as_deref(), Some("y"));
    assert!(store.apply(Event::Apply(policy("a", "np", "10.0.0.0/8"))));
    assert!(store.apply(Event::Delete(pod("a", "p", "y", "10.0.0.1"))));
    assert!(store.state().pods.is_empty());
    // Deleting what is not there changes nothing.
    assert!(!store.apply(Event::Delete(pod("a", "p", "y", "10.0.0.1"))));
}

#[test]
fn an_invalid_version_keeps_the_last_valid_one_in_force() {
    let mut store = synced_store(vec![pod("a", "p", "x", "10.0.0.1")]);
    // An address the API would reject (a mock or a broken server sends it).
    assert!(!store.apply(Event::Apply(pod("a", "p", "y", "10.0.0.300"))));
    assert_eq!(app_of(&store, "a", "p").as_deref(), Some("x"));
    assert_eq!(store.invalid_objects()["Pod"], 1);
    assert_eq!(store.invalid_objects()["Namespace"], 0);
    // A new invalid object is absent, and counted.
    assert!(!store.apply(Event::Apply(policy("a", "np", "10.0.0.0/33"))));
    assert!(store.state().policies.is_empty());
    assert_eq!(store.invalid_objects()["NetworkPolicy"], 1);
    // Fixed: the new version applies and the count drops.
    assert!(store.apply(Event::Apply(pod("a", "p", "z", "10.0.0.1"))));
    assert_eq!(app_of(&store, "a", "p").as_deref(), Some("z"));
    assert_eq!(store.invalid_objects()["Pod"], 0);
    // Deleting an invalid object forgets it.
    assert!(!store.apply(Event::Delete(policy("a", "np", "10.0.0.0/33"))));
    assert_eq!(store.invalid_objects()["NetworkPolicy"], 0);
}

#[test]
fn a_relist_is_swapped_in_whole_at_its_end() {
    let mut store = synced_store(vec![
        pod("a", "p1", "x", "10.0.0.1"),
        pod("a", "p2", "x", "10.0.0.2"),
        pod("a", "p3", "x", "10.0.0.3"),
    ]);
    let before = store.state().clone();
    // After a 410 Gone: p1 changed, p2 is gone, p3 is invalid now, p4 is new.
    assert!(!store.apply::<core::Pod>(Event::Init));
    assert!(!store.apply(Event::InitApply(pod("a", "p1", "y", "10.0.0.1"))));
    assert!(!store.apply(Event::InitApply(pod("a", "p3", "y", "not-an-ip"))));
    assert!(!store.apply(Event::InitApply(pod("a", "p4", "y", "10.0.0.4"))));
    assert_eq!(
        store.state(),
        &before,
        "nothing changes before the list completes"
    );
    assert!(store.apply::<core::Pod>(Event::InitDone));
    let pods = &store.state().pods;
    assert_eq!(app_of(&store, "a", "p1").as_deref(), Some("y"));
    assert!(!pods.contains_key(&key("a", "p2")), "not listed: deleted");
    assert_eq!(
        app_of(&store, "a", "p3").as_deref(),
        Some("x"),
        "invalid in the relist: its last valid version stays"
    );
    assert_eq!(
        pods[&key("a", "p4")].ips,
        [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 4))]
    );
    assert_eq!(store.invalid_objects()["Pod"], 1);

    // The same list again is no change.
    store.apply::<core::Pod>(Event::Init);
    store.apply(Event::InitApply(pod("a", "p1", "y", "10.0.0.1")));
    store.apply(Event::InitApply(pod("a", "p3", "y", "not-an-ip")));
    store.apply(Event::InitApply(pod("a", "p4", "y", "10.0.0.4")));
    assert!(!store.apply::<core::Pod>(Event::InitDone));
}

#[test]
fn completed_pods_are_no_endpoints() {
    let mut done: core::Pod = pod("a", "job", "x", "10.0.0.9");
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let mut store = synced_store(vec![pod("a", "job", "x", "10.0.0.9")]);
    assert!(store.apply(Event::Apply(done)));
    assert!(store.state().pods[&key("a", "job")].ips.is_empty());
}

// ---------------------------------------------------------------------------------------------
// A mock API server
// ---------------------------------------------------------------------------------------------

/// What the mock answers to one request.
enum Reply {
    /// 200 with this body (a list, or a watch's events, one JSON per line).
    Body(String),
    /// An error status with a `Status` body.
    Status(StatusCode, &'static str),
}

/// Scripted answers by request: `(resource, watch)` -> replies in order. A request with no
/// reply left is never answered (a watch that stays open).
#[derive(Default)]
struct Script {
    replies: HashMap<(&'static str, bool), VecDeque<Reply>>,
    /// Requests seen, by `(resource, watch)`.
    seen: HashMap<(&'static str, bool), usize>,
}

impl Script {
    fn list(&mut self, resource: &'static str, items: Vec<Value>) -> &mut Self {
        let body = json!({"metadata": {"resourceVersion": "10"}, "items": items});
        self.push(resource, false, Reply::Body(body.to_string()))
    }

    fn watch(&mut self, resource: &'static str, events: Vec<Value>) -> &mut Self {
        let body: String = events.iter().map(|e| format!("{e}\n")).collect();
        self.push(resource, true, Reply::Body(body))
    }

    fn push(&mut self, resource: &'static str, watch: bool, reply: Reply) -> &mut Self {
        self.replies
            .entry((resource, watch))
            .or_default()
            .push_back(reply);
        self
    }
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

fn gone() -> Value {
    event(
        "ERROR",
        json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
               "message": "too old resource version: 10 (20)", "reason": "Expired", "code": 410}),
    )
}

/// Serves `script` to a client until the test ends. Returns the client and the script (to
/// count requests).
fn mock_api(script: Script) -> (Client, Arc<Mutex<Script>>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let script = Arc::new(Mutex::new(script));
    let served = script.clone();
    tokio::spawn(async move {
        // Watches left open, answered never (dropping them would fail the request).
        let mut open = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let uri = request.uri().to_string();
            let resource = ["namespaces", "pods", "networkpolicies"]
                .into_iter()
                .find(|r| request.uri().path().ends_with(r))
                .unwrap_or_else(|| panic!("unexpected request {uri}"));
            let watch = uri.contains("watch=true");
            let reply = {
                let mut script = served.lock().unwrap();
                *script.seen.entry((resource, watch)).or_default() += 1;
                script
                    .replies
                    .get_mut(&(resource, watch))
                    .and_then(VecDeque::pop_front)
            };
            match reply {
                Some(Reply::Body(body)) => send.send_response(
                    Response::builder()
                        .status(StatusCode::OK)
                        .body(Body::from(body.into_bytes()))
                        .unwrap(),
                ),
                Some(Reply::Status(code, reason)) => {
                    let status = json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
                        "status": "Failure", "message": reason, "reason": reason,
                        "code": code.as_u16()});
                    send.send_response(
                        Response::builder()
                            .status(code)
                            .body(Body::from(status.to_string().into_bytes()))
                            .unwrap(),
                    )
                }
                None => open.push(send),
            }
        }
    });
    (Client::new(service, "default"), script)
}

/// The next state worth a sync, within 10 s (the watchers back off 0.8 s after an error).
async fn next_update(watch: &mut KubeWatch) -> crate::sources::Update {
    tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("no update within 10 s")
        .expect("the watchers stopped");
    watch.current()
}

fn watch_errors(metrics: &Metrics, resource: &str) -> u64 {
    let text = metrics.encode().unwrap();
    let series = format!("npc_kube_watch_errors_total{{resource=\"{resource}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

fn basic_lists(script: &mut Script, pods: Vec<Value>) {
    script
        .list("namespaces", vec![ns_json("a", json!({"team": "t"}))])
        .list("pods", pods)
        .list(
            "networkpolicies",
            vec![policy_json("a", "np", "10.0.0.0/8")],
        );
}

#[tokio::test]
async fn gone_during_a_watch_relists_without_flushing() {
    let mut script = Script::default();
    basic_lists(
        &mut script,
        vec![
            pod_json("a", "p1", "x", "10.0.0.1"),
            pod_json("a", "p2", "x", "10.0.0.2"),
        ],
    );
    // The pods watch: one change, then 410 Gone. The relist finds p2 deleted and p3 new.
    script
        .watch(
            "pods",
            vec![
                event("MODIFIED", pod_json("a", "p1", "y", "10.0.0.1")),
                gone(),
            ],
        )
        .list(
            "pods",
            vec![
                pod_json("a", "p1", "y", "10.0.0.1"),
                pod_json("a", "p3", "x", "10.0.0.3"),
            ],
        );
    let (client, script) = mock_api(script);
    let metrics = Metrics::without_datapath();
    let mut watch = KubeWatch::start(client, "node-1".into(), metrics.clone());

    // Every state handed out is a whole one: the initial list (maybe with p1's change), then
    // the relisted one; never a list in progress.
    let mut update = next_update(&mut watch).await;
    assert_eq!(update.state.namespaces.len(), 1);
    assert_eq!(update.state.policies.len(), 1);
    while update.state.pods.contains_key(&key("a", "p2")) {
        assert_eq!(update.state.pods.len(), 2, "{:?}", update.state.pods.keys());
        update = next_update(&mut watch).await;
    }
    let pods: Vec<_> = update.state.pods.keys().map(|k| k.name.as_str()).collect();
    assert_eq!(pods, ["p1", "p3"]);
    assert_eq!(update.state.pods[&key("a", "p1")].labels["app"], "y");
    assert_eq!(watch_errors(&metrics, "pods"), 1, "the 410 is counted");
    assert_eq!(watch_errors(&metrics, "namespaces"), 0);
    assert_eq!(script.lock().unwrap().seen[&("pods", false)], 2, "relisted");
}

#[tokio::test]
async fn unusable_objects_are_counted_and_undecodable_events_skipped() {
    let mut script = Script::default();
    basic_lists(&mut script, vec![pod_json("a", "p1", "x", "10.0.0.1")]);
    let mut bad_labels = pod_json("a", "p1", "x", "10.0.0.1");
    bad_labels["metadata"]["labels"]["app"] = json!("not a label value!");
    let mut undecodable = pod_json("a", "p9", "x", "10.0.0.9");
    undecodable["metadata"]["labels"] = json!(5);
    script.watch(
        "pods",
        vec![
            // Valid for serde, invalid for the model: p1 keeps its last valid version.
            event("MODIFIED", bad_labels),
            // Not even a Pod: the watcher reports an error and goes on with the stream.
            event("ADDED", undecodable),
            event("ADDED", pod_json("a", "p2", "x", "10.0.0.2")),
        ],
    );
    let (client, _script) = mock_api(script);
    let metrics = Metrics::without_datapath();
    let mut watch = KubeWatch::start(client, "node-1".into(), metrics.clone());

    let mut update = next_update(&mut watch).await;
    while !update.state.pods.contains_key(&key("a", "p2")) {
        update = next_update(&mut watch).await;
    }
    assert_eq!(update.state.pods[&key("a", "p1")].labels["app"], "x");
    assert!(!update.state.pods.contains_key(&key("a", "p9")));
    assert_eq!(update.invalid_objects["Pod"], 1);
    assert_eq!(update.invalid_objects["NetworkPolicy"], 0);
    assert_eq!(watch_errors(&metrics, "pods"), 1, "the undecodable event");
}

#[tokio::test]
async fn no_state_until_every_list_succeeds_and_refusals_are_retried() {
    let mut script = Script::default();
    // The first networkpolicies list is forbidden (RBAC not yet in place), the second works.
    script
        .list("namespaces", vec![ns_json("a", json!({}))])
        .list("pods", vec![])
        .push(
            "networkpolicies",
            false,
            Reply::Status(StatusCode::FORBIDDEN, "Forbidden"),
        )
        .list("networkpolicies", vec![]);
    let (client, script) = mock_api(script);
    let metrics = Metrics::without_datapath();
    let mut watch = KubeWatch::start(client, "node-1".into(), metrics.clone());

    let update = next_update(&mut watch).await;
    assert_eq!(update.state.namespaces.len(), 1);
    assert_eq!(watch_errors(&metrics, "networkpolicies"), 1);
    assert_eq!(script.lock().unwrap().seen[&("networkpolicies", false)], 2);
    let invalid: BTreeMap<_, _> = update.invalid_objects;
    assert!(invalid.values().all(|&n| n == 0), "{invalid:?}");
}
