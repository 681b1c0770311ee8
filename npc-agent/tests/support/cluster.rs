//! A small cluster in a lab for the agent in manifests mode: pods as network namespaces on a
//! bridge and routed, a manifests directory, the agent, and helpers to check reachability.
//!
//! Policy changes apply asynchronously (within about a second): the helpers poll with a deadline
//! ([`eventually`]) and check that a verdict does not change with [`holds`]. A denied connection
//! must time out (its SYN is dropped), never be refused.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use npc_common::EndpointInfo;
use npc_tests::lab::{ConnectOutcome, Lab, Pod, ServerHandle, TcpConn, in_netns};

use super::{Agent, Enter, LOG_WAIT};

pub const CONNECT: Duration = Duration::from_millis(700);
/// Policy changes apply within a second; allow for a loaded machine.
pub const APPLY: Duration = Duration::from_secs(5);
/// How long a verdict that must not change is watched.
pub const HOLD: Duration = Duration::from_millis(1500);
/// How long one exchange on an established connection may take.
pub const EXCHANGE: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

/// A temporary manifests directory, removed on drop.
pub struct Manifests(pub PathBuf);

impl Manifests {
    pub fn new(name: &str) -> Manifests {
        let dir = std::env::temp_dir().join(format!("npc-policy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Manifests(dir)
    }

    pub fn write(&self, file: &str, yaml: &str) {
        // Write then rename: the agent never reads half a file.
        let tmp = self.0.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.0.join(file)).unwrap();
    }

    pub fn remove(&self, file: &str) {
        std::fs::remove_file(self.0.join(file)).unwrap();
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn pod_yaml(ns: &str, name: &str, labels: &str, ip: IpAddr, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {labels}\n\
         spec:\n  containers:\n  - name: c\n    image: x\n    ports: {ports}\n\
         status:\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n---\n"
    )
}

pub fn ns_yaml(name: &str, labels: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {labels}\n---\n")
}

/// A NetworkPolicy document; `spec` is a YAML flow mapping.
pub fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {spec}\n---\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Reachability
// ---------------------------------------------------------------------------------------------

/// Waits until `from` reaching `to:port` gives `expect` (policy changes apply asynchronously).
pub fn eventually(from: &Pod, to: IpAddr, port: u16, expect: ConnectOutcome, what: &str) {
    let deadline = Instant::now() + APPLY;
    loop {
        let got = from.connect_tcp(to, port, CONNECT);
        if got == expect {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} -> {to}:{port} is {got:?}, want {expect:?}",
            from.name
        );
    }
}

pub fn reaches(from: &Pod, to: &Pod, port: u16, what: &str) {
    eventually(
        from,
        IpAddr::V4(to.ipv4),
        port,
        ConnectOutcome::Connected,
        what,
    );
}

/// Waits until `from -> to:port` times out: denied connections are dropped, not refused.
pub fn blocked(from: &Pod, to: &Pod, port: u16, what: &str) {
    eventually(
        from,
        IpAddr::V4(to.ipv4),
        port,
        ConnectOutcome::TimedOut,
        what,
    );
}

/// Checks that `from -> to:port` gives `expect` now and for the next [`HOLD`].
pub fn holds(from: &Pod, to: &Pod, port: u16, expect: ConnectOutcome, what: &str) {
    let deadline = Instant::now() + HOLD;
    loop {
        let got = from.connect_tcp(IpAddr::V4(to.ipv4), port, CONNECT);
        assert_eq!(got, expect, "{what}: {} -> {}:{port}", from.name, to.ipv4);
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens a long-lived connection and checks one exchange on it.
pub fn open(from: &Pod, to: &Pod, port: u16) -> TcpConn {
    let mut conn = from
        .open_tcp(IpAddr::V4(to.ipv4), port, CONNECT)
        .unwrap_or_else(|e| panic!("{} -> {}:{port}: {e:#}", from.name, to.name));
    conn.check(EXCHANGE)
        .unwrap_or_else(|e| panic!("first exchange {} -> {}:{port}: {e}", from.name, to.name));
    conn
}

/// Asserts that the next exchange on `conn` gets no answer (its packets are dropped: no reset).
pub fn exchange_times_out(conn: &mut TcpConn, what: &str) {
    match conn.check(EXCHANGE) {
        Ok(()) => panic!(
            "{what}: the connection {} -> {} still works",
            conn.local, conn.peer
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{what}: want a timeout, got {e} ({:?})",
            e.kind()
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The agent and its maps
// ---------------------------------------------------------------------------------------------

/// Waits until the agent's /readyz answers 200 (from inside the node namespace).
pub fn wait_ready(lab: &Lab, agent: &Agent) {
    wait_ready_within(lab, agent, LOG_WAIT);
}

/// [`wait_ready`] with another deadline.
pub fn wait_ready_within(lab: &Lab, agent: &Agent, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        let ok = in_netns(lab.node_netns(), || {
            use std::io::{Read as _, Write as _};
            let Ok(mut s) = std::net::TcpStream::connect("127.0.0.1:9090") else {
                return false;
            };
            let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200")
        });
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent never ready:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the agent's `endpoints` entry for `pod` satisfies `pred`.
pub fn endpoint_until(agent: &Agent, pod: &Pod, what: &str, pred: impl Fn(&EndpointInfo) -> bool) {
    let deadline = Instant::now() + APPLY;
    loop {
        let got = agent.maps().endpoint(IpAddr::V4(pod.ipv4));
        if got.as_ref().is_some_and(&pred) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: endpoint {} ({}) is {got:?}",
            pod.name,
            pod.ipv4
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// The container ports every pod declares unless the test says otherwise.
pub const PORTS: &str = "[{name: http, containerPort: 80}, {name: alt, containerPort: 81}]";

/// An extra routed pod: name, namespace, labels, IPv4 address (in 10.67.0.0/24).
pub struct Extra {
    pub name: &'static str,
    pub ns: &'static str,
    pub labels: &'static str,
    pub ip: &'static str,
}

/// A pod as the manifests declare it.
pub struct PodDecl {
    pub ns: String,
    pub name: String,
    pub labels: String,
    pub ports: String,
    pub ip: IpAddr,
}

pub struct Cluster {
    pub _servers: Vec<ServerHandle>,
    pub a: Pod,
    pub b: Pod,
    pub c: Pod,
    /// The [`Extra`] pods, in order.
    pub extra: Vec<Pod>,
    /// (name, labels), written to `cluster.yaml` with the pods.
    pub namespaces: Vec<(String, String)>,
    pub pods: Vec<PodDecl>,
    pub agent: Agent,
    pub manifests: Manifests,
    pub lab: Lab,
}

/// `cluster.yaml`: the namespaces and the pods.
pub fn cluster_yaml(namespaces: &[(String, String)], pods: &[PodDecl]) -> String {
    let mut yaml: String = namespaces
        .iter()
        .map(|(name, labels)| ns_yaml(name, labels))
        .collect();
    for p in pods {
        yaml.push_str(&pod_yaml(&p.ns, &p.name, &p.labels, p.ip, &p.ports));
    }
    yaml
}

impl Cluster {
    /// Writes `cluster.yaml` with the namespaces and pods as currently declared.
    pub fn write_cluster(&self) {
        self.manifests
            .write("cluster.yaml", &cluster_yaml(&self.namespaces, &self.pods));
    }

    pub fn relabel_pod(&mut self, pod: &str, labels: &str) {
        let decl = self.pods.iter_mut().find(|p| p.name == pod).unwrap();
        decl.labels = labels.to_owned();
        self.write_cluster();
    }

    pub fn relabel_namespace(&mut self, ns: &str, labels: &str) {
        let decl = self.namespaces.iter_mut().find(|(n, _)| n == ns).unwrap();
        decl.1 = labels.to_owned();
        self.write_cluster();
    }
}

/// Pods a and b on a bridge (10.66.0.2 and .3) and c routed (10.67.0.2).
pub fn add_abc(lab: &Lab) -> (Pod, Pod, Pod) {
    let br = lab.add_bridge("br0", "10.66.0.1/24", None).unwrap();
    let a = lab
        .add_pod_on_bridge(&br, "a", "10.66.0.2".parse().unwrap(), None)
        .unwrap();
    let b = lab
        .add_pod_on_bridge(&br, "b", "10.66.0.3".parse().unwrap(), None)
        .unwrap();
    let c = lab
        .add_routed_pod("c", "10.67.0.2".parse().unwrap(), None)
        .unwrap();
    (a, b, c)
}

/// [`cluster_with`] with no extra pods and the default ports.
pub fn cluster(name: &str) -> Cluster {
    cluster_with(name, &[], &[])
}

/// Pods a, b (namespace ns-x, team=red, on a bridge), c (ns-y, team=blue, routed) and the
/// `extra` pods (routed), each serving TCP 80 and 81 and declaring [`PORTS`] unless `ports` names
/// the pod; then the agent in manifests mode, ready.
pub fn cluster_with(name: &str, extra: &[Extra], ports: &[(&str, &str)]) -> Cluster {
    cluster_with_agent(name, extra, ports, &[])
}

/// [`cluster_with`], the agent started with `agent_args` added.
pub fn cluster_with_agent(
    name: &str,
    extra: &[Extra],
    ports: &[(&str, &str)],
    agent_args: &[&str],
) -> Cluster {
    let lab = Lab::new("policy").expect("lab");
    let (a, b, c) = add_abc(&lab);
    let extra_pods: Vec<Pod> = extra
        .iter()
        .map(|e| {
            lab.add_routed_pod(e.name, e.ip.parse().unwrap(), None)
                .unwrap()
        })
        .collect();
    let servers = [&a, &b, &c]
        .into_iter()
        .chain(&extra_pods)
        .flat_map(|p| [p.serve_tcp(80).unwrap(), p.serve_tcp(81).unwrap()])
        .collect();
    let ports_of = |pod: &str| {
        ports
            .iter()
            .find(|(p, _)| *p == pod)
            .map_or(PORTS, |(_, ports)| ports)
            .to_owned()
    };
    let decl = |ns: &str, pod: &Pod, labels: &str| PodDecl {
        ns: ns.to_owned(),
        name: pod.name.clone(),
        labels: labels.to_owned(),
        ports: ports_of(&pod.name),
        ip: IpAddr::V4(pod.ipv4),
    };
    let mut pods = vec![
        decl("ns-x", &a, "{app: a}"),
        decl("ns-x", &b, "{app: b}"),
        decl("ns-y", &c, "{app: c}"),
    ];
    for (e, pod) in extra.iter().zip(&extra_pods) {
        pods.push(decl(e.ns, pod, e.labels));
    }
    let manifests = Manifests::new(name);
    let namespaces = vec![
        ("ns-x".to_owned(), "{team: red}".to_owned()),
        ("ns-y".to_owned(), "{team: blue}".to_owned()),
    ];
    manifests.write("cluster.yaml", &cluster_yaml(&namespaces, &pods));
    let dir = manifests.path().to_str().unwrap().to_owned();
    let mut args = vec!["--manifests", &dir, "--metrics-addr", "127.0.0.1:9090"];
    args.extend_from_slice(agent_args);
    let agent = Agent::start(&lab, Enter::Netns, &args);
    let k = Cluster {
        _servers: servers,
        a,
        b,
        c,
        extra: extra_pods,
        namespaces,
        pods,
        agent,
        manifests,
        lab,
    };
    wait_ready(&k.lab, &k.agent);
    for p in [&k.a, &k.b, &k.c].into_iter().chain(&k.extra) {
        endpoint_until(&k.agent, p, "pods programmed", |e| e.is_local());
    }
    k
}
