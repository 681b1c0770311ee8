//! A cluster in Kubernetes mode: a real API server (etcd and kube-apiserver 1.20, see
//! [`super::apiserver`]), pods as network namespaces of a lab declared as Pod objects (the test
//! sets their `status.podIPs`, as a kubelet would), and the agent watching the API with a
//! ServiceAccount token that may only get, list and watch pods, namespaces and networkpolicies.
//!
//! The API server listens on the host's loopback; the agent runs in the lab's node namespace,
//! whose loopback is another one, so [`Forward`] relays the same port from the node's loopback
//! to the host's.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    io,
    net::{IpAddr, Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use k8s_openapi::api::{core::v1 as core, networking::v1 as networking};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use npc_tests::lab::{Lab, Pod, ServerHandle, in_netns};
use serde_json::{Value, json};

use super::{
    Agent, Enter, LOG_WAIT,
    apiserver::ApiServer,
    cluster::{add_abc, endpoint_until, wait_ready_within},
    unique_bpffs,
};

/// The lab's node, as pods' `spec.nodeName` and the agent's `--node-name` say.
pub const NODE: &str = "node-1";

/// Relays TCP connections to `127.0.0.1:port` in a network namespace to `127.0.0.1:port` of the
/// test's own namespace. Stops accepting on drop; relayed connections end with either side.
pub struct Forward {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forward {
    pub fn start(netns: &str, port: u16) -> Forward {
        // A socket stays in the namespace it was created in.
        let listener = in_netns(netns, || TcpListener::bind(("127.0.0.1", port)))
            .unwrap_or_else(|e| panic!("listening on 127.0.0.1:{port} in {netns}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inbound, _)) => relay(inbound, port),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("accepting on the forward: {e}"),
                }
            }
        });
        Forward {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies both ways between `inbound` and a new connection to the local `port`; a refused
/// connection (API server stopped) closes `inbound`, as a refused connect would.
fn relay(inbound: TcpStream, port: u16) {
    inbound.set_nonblocking(false).unwrap();
    let Ok(outbound) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    for (mut from, mut to) in [
        (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
        (outbound, inbound),
    ] {
        std::thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    }
}

/// The container ports every pod declares.
pub fn ports() -> Value {
    json!([{"name": "http", "containerPort": 80}, {"name": "alt", "containerPort": 81}])
}

/// A Pod object on [`NODE`] (Pending: no kubelet; its address comes with [`KubeCluster::set_pod_ip`]).
pub fn pod_object(ns: &str, name: &str, labels: Value, ports: Value) -> core::Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x", "ports": ports}]},
    }))
    .unwrap()
}

/// A NetworkPolicy from YAML (the same text the manifests-mode tests use).
pub fn policy_object(yaml: &str) -> networking::NetworkPolicy {
    serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("policy YAML: {e}\n{yaml}"))
}

/// The API server, the lab's pods and the agent. Fields drop in order: the agent first.
pub struct KubeCluster {
    pub agent: Option<Agent>,
    pub forward: Forward,
    pub client: Client,
    pub rt: tokio::runtime::Runtime,
    pub api: ApiServer,
    pub servers: Vec<ServerHandle>,
    pub a: Pod,
    pub b: Pod,
    pub c: Pod,
    pub lab: Lab,
}

impl KubeCluster {
    /// Pods a, b (namespace ns-x, team=red, on a bridge) and c (ns-y, team=blue, routed), each
    /// serving TCP 80 and 81, as objects with their addresses; the API server running; no agent
    /// yet ([`KubeCluster::start_agent`]).
    pub fn new(name: &str) -> KubeCluster {
        let lab = Lab::new("kube").expect("lab");
        let (a, b, c) = add_abc(&lab);
        let servers = [&a, &b, &c]
            .into_iter()
            .flat_map(|p| [p.serve_tcp(80).unwrap(), p.serve_tcp(81).unwrap()])
            .collect();
        let api = ApiServer::start(name);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(api.admin());
        let forward = Forward::start(lab.node_netns(), api.port());
        let k = KubeCluster {
            agent: None,
            forward,
            client,
            rt,
            api,
            servers,
            a,
            b,
            c,
            lab,
        };
        k.create_namespace("ns-x", json!({"team": "red"}));
        k.create_namespace("ns-y", json!({"team": "blue"}));
        for (ns, pod, app) in [
            ("ns-x", &k.a, "a"),
            ("ns-x", &k.b, "b"),
            ("ns-y", &k.c, "c"),
        ] {
            k.create_pod(ns, &pod.name, json!({"app": app}), ports());
            k.set_pod_ip(ns, &pod.name, IpAddr::V4(pod.ipv4));
        }
        k
    }

    /// Starts the agent in Kubernetes mode (ServiceAccount kubeconfig, `--node-name`), waits
    /// until it is ready and has programmed the pods that have an address.
    pub fn start_agent(&mut self, extra_args: &[&str]) {
        self.start_agent_within(extra_args, LOG_WAIT);
    }

    /// [`KubeCluster::start_agent`], waiting up to `wait` for readiness (a big cluster's
    /// initial list takes a while).
    pub fn start_agent_within(&mut self, extra_args: &[&str], wait: Duration) {
        let kubeconfig = self.rt.block_on(self.api.agent_kubeconfig());
        let mut args = vec!["--node-name", NODE, "--metrics-addr", "127.0.0.1:9090"];
        args.extend_from_slice(extra_args);
        let agent = Agent::spawn_env(
            &self.lab,
            Enter::Netns,
            unique_bpffs(),
            true,
            &args,
            &[("KUBECONFIG", kubeconfig.as_os_str())],
        );
        wait_ready_within(&self.lab, &agent, wait);
        self.agent = Some(agent);
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the agent was started")
    }

    /// Waits until the agent has programmed `pod` as a local endpoint.
    pub fn wait_programmed(&self, pod: &Pod) {
        endpoint_until(self.agent(), pod, "pod programmed", |e| e.is_local());
    }

    pub fn create_namespace(&self, name: &str, labels: Value) {
        let ns: core::Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }))
        .unwrap();
        let api = Api::<core::Namespace>::all(self.client.clone());
        self.rt
            .block_on(api.create(&PostParams::default(), &ns))
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    }

    pub fn create_pod(&self, ns: &str, name: &str, labels: Value, ports: Value) {
        let api = Api::<core::Pod>::namespaced(self.client.clone(), ns);
        self.rt
            .block_on(api.create(&PostParams::default(), &pod_object(ns, name, labels, ports)))
            .unwrap_or_else(|e| panic!("creating pod {ns}/{name}: {e}"));
    }

    /// Sets the pod's `status.podIP(s)` and phase Running, as the kubelet does once the CNI
    /// gave it an address.
    pub fn set_pod_ip(&self, ns: &str, name: &str, ip: IpAddr) {
        self.patch_pod_status(
            ns,
            name,
            json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}}),
        );
    }

    pub fn patch_pod_status(&self, ns: &str, name: &str, status: Value) {
        let api = Api::<core::Pod>::namespaced(self.client.clone(), ns);
        self.rt
            .block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)))
            .unwrap_or_else(|e| panic!("patching the status of pod {ns}/{name}: {e}"));
    }

    /// Replaces the pod's labels.
    pub fn relabel_pod(&self, ns: &str, name: &str, labels: Value) {
        let api = Api::<core::Pod>::namespaced(self.client.clone(), ns);
        self.rt.block_on(async {
            let mut pod = api.get(name).await.unwrap();
            pod.metadata.labels = Some(serde_json::from_value(labels).unwrap());
            api.replace(name, &PostParams::default(), &pod)
                .await
                .unwrap_or_else(|e| panic!("relabeling pod {ns}/{name}: {e}"));
        });
    }

    /// Replaces the namespace's labels.
    pub fn relabel_namespace(&self, name: &str, labels: Value) {
        let api = Api::<core::Namespace>::all(self.client.clone());
        self.rt.block_on(async {
            let mut ns = api.get(name).await.unwrap();
            ns.metadata.labels = Some(serde_json::from_value(labels).unwrap());
            api.replace(name, &PostParams::default(), &ns)
                .await
                .unwrap_or_else(|e| panic!("relabeling namespace {name}: {e}"));
        });
    }

    /// Creates the NetworkPolicy in `yaml`, or replaces the one of that name.
    pub fn apply_policy(&self, yaml: &str) {
        let mut policy = policy_object(yaml);
        let ns = policy.metadata.namespace.clone().expect("policy namespace");
        let name = policy.metadata.name.clone().expect("policy name");
        let api = Api::<networking::NetworkPolicy>::namespaced(self.client.clone(), &ns);
        self.rt.block_on(async {
            match api.get_opt(&name).await.unwrap() {
                Some(old) => {
                    policy.metadata.resource_version = old.metadata.resource_version;
                    api.replace(&name, &PostParams::default(), &policy).await
                }
                None => api.create(&PostParams::default(), &policy).await,
            }
            .unwrap_or_else(|e| panic!("applying policy {ns}/{name}: {e}"));
        });
    }

    pub fn delete_policy(&self, ns: &str, name: &str) {
        let api = Api::<networking::NetworkPolicy>::namespaced(self.client.clone(), ns);
        self.rt
            .block_on(api.delete(name, &DeleteParams::default()))
            .unwrap_or_else(|e| panic!("deleting policy {ns}/{name}: {e}"));
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let api = Api::<core::Pod>::namespaced(self.client.clone(), ns);
        // No kubelet to confirm the end: delete at once.
        self.rt
            .block_on(api.delete(name, &DeleteParams::default().grace_period(0)))
            .unwrap_or_else(|e| panic!("deleting pod {ns}/{name}: {e}"));
    }
}
