//! The agent in manifests mode, enforcing NetworkPolicies between real pods of a lab.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use npc_tests::lab::{ConnectOutcome, Lab, Pod, ServerHandle, in_netns};

mod support;
use support::*;

const CONNECT: Duration = Duration::from_millis(700);
/// Policy changes apply within a second; allow for a loaded machine.
const APPLY: Duration = Duration::from_secs(5);

/// A temporary manifests directory, removed on drop.
struct Manifests(PathBuf);

impl Manifests {
    fn new(name: &str) -> Manifests {
        let dir = std::env::temp_dir().join(format!("npc-policy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Manifests(dir)
    }

    fn write(&self, file: &str, yaml: &str) {
        // Write then rename: the agent never reads half a file.
        let tmp = self.0.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.0.join(file)).unwrap();
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.0.join(file)).unwrap();
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pod_yaml(ns: &str, name: &str, labels: &str, ip: IpAddr, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {labels}\n\
         spec:\n  containers:\n  - name: c\n    image: x\n    ports: {ports}\n\
         status:\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n---\n"
    )
}

fn ns_yaml(name: &str, labels: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {labels}\n---\n")
}

/// Waits until `from` reaching `to:port` gives `expect` (policy changes apply asynchronously).
fn eventually(from: &Pod, to: IpAddr, port: u16, expect: ConnectOutcome, what: &str) {
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

fn reaches(from: &Pod, to: &Pod, port: u16, what: &str) {
    eventually(
        from,
        IpAddr::V4(to.ipv4),
        port,
        ConnectOutcome::Connected,
        what,
    );
}

fn blocked(from: &Pod, to: &Pod, port: u16, what: &str) {
    eventually(
        from,
        IpAddr::V4(to.ipv4),
        port,
        ConnectOutcome::TimedOut,
        what,
    );
}

/// Waits until the agent's /readyz answers 200 (from inside the node namespace).
fn wait_ready(lab: &Lab, agent: &Agent) {
    let deadline = Instant::now() + LOG_WAIT;
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

struct Cluster {
    _servers: Vec<ServerHandle>,
    a: Pod,
    b: Pod,
    c: Pod,
    agent: Agent,
    manifests: Manifests,
    lab: Lab,
}

/// Pods a, b (namespace x, on a bridge) and c (namespace y, routed), each serving TCP 80 and 81,
/// and the agent in manifests mode.
fn cluster(name: &str) -> Cluster {
    let lab = Lab::new("policy").expect("lab");
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
    let servers = [&a, &b, &c]
        .iter()
        .flat_map(|p| [p.serve_tcp(80).unwrap(), p.serve_tcp(81).unwrap()])
        .collect();
    let manifests = Manifests::new(name);
    let ports = "[{name: http, containerPort: 80}, {name: alt, containerPort: 81}]";
    manifests.write(
        "cluster.yaml",
        &[
            ns_yaml("ns-x", "{team: red}"),
            ns_yaml("ns-y", "{team: blue}"),
            pod_yaml("ns-x", "a", "{app: a}", IpAddr::V4(a.ipv4), ports),
            pod_yaml("ns-x", "b", "{app: b}", IpAddr::V4(b.ipv4), ports),
            pod_yaml("ns-y", "c", "{app: c}", IpAddr::V4(c.ipv4), ports),
        ]
        .concat(),
    );
    let dir = manifests.path().to_str().unwrap().to_owned();
    let agent = Agent::start(
        &lab,
        Enter::Netns,
        &["--manifests", &dir, "--metrics-addr", "127.0.0.1:9090"],
    );
    wait_ready(&lab, &agent);
    Cluster {
        _servers: servers,
        a,
        b,
        c,
        agent,
        manifests,
        lab,
    }
}

#[test]
fn default_deny_then_allow_from_a_namespace_then_delete() {
    let k = cluster("deny");
    reaches(&k.a, &k.b, 80, "no policy: open");
    k.manifests.write(
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: ns-x}\n\
         spec: {podSelector: {}}\n",
    );
    blocked(&k.a, &k.b, 80, "default deny in x");
    blocked(&k.c, &k.b, 80, "default deny in x, from y");
    reaches(&k.b, &k.c, 80, "egress of x is not isolated");
    k.manifests.write(
        "allow.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-blue, namespace: ns-x}\n\
         spec:\n  podSelector: {matchLabels: {app: b}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: blue}}\n    ports:\n    - port: http\n",
    );
    reaches(&k.c, &k.b, 80, "blue namespace on the named port");
    blocked(&k.c, &k.b, 81, "other port");
    blocked(&k.a, &k.b, 80, "a is in red");
    k.manifests.remove("deny.yaml");
    k.manifests.remove("allow.yaml");
    reaches(&k.a, &k.b, 81, "policies deleted: open again");
    let _ = &k.lab;
    let _ = &k.agent;
}
