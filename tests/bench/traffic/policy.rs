//! The policy set both enforcers get: manifests written for the agent (`--manifests`), then read
//! back with the agent's own loader, so the iptables rule set is generated from literally the
//! same parsed state.
//!
//! Shape, chosen so that an iptables enforcer's cost per new connection grows with the number of
//! policies the way it does in real clusters: every one of the `n` ingress policies selects the
//! server pod and admits a different peer set (a label only its share of the remote pods carry)
//! on the two measured ports; the client carries the label of the *last* policy, so a new
//! connection from it walks every policy chain before it is admitted. One egress policy isolates
//! the client (it may only reach the server's two ports). 1,000 pods on ten other nodes fill the
//! peer sets, the address sets of the iptables rules and npc's endpoint map.
use std::{fmt::Write as _, fs, net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result, ensure};
use npc_agent::{
    model::ClusterState,
    sources::manifests::{LastGood, load_dir},
};

/// The namespace of every pod and policy.
pub const NAMESPACE: &str = "bench";
/// The node the lab stands for (`--node-name`): the three lab pods are on it.
pub const NODE: &str = "bench-node";
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 10);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 20);
/// A local pod no policy admits anywhere, but which is not isolated itself.
pub const STRANGER_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 30);
/// Connection-rate port (admitted).
pub const RATE_PORT: u16 = 5201;
/// Throughput port (admitted).
pub const STREAM_PORT: u16 = 5202;
/// A port of the server no policy admits (checks that admission is per port).
pub const CLOSED_PORT: u16 = 5203;
/// Pods on other nodes (filler: peer sets and endpoint entries).
pub const REMOTE_PODS: usize = 1000;
const REMOTE_NODES: usize = 10;

/// A generated policy set: the manifests directory the agent watches, and its parsed state.
pub struct PolicySet {
    /// Number of ingress policies selecting the server.
    pub n: usize,
    pub dir: std::path::PathBuf,
    pub state: ClusterState,
}

fn remote_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, (j / 200) as u8, (j % 200 + 1) as u8)
}

fn pod(out: &mut String, name: &str, labels: &str, node: &str, ip: Ipv4Addr) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  \
         labels: {{{labels}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    \
         image: bench\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n"
    );
}

/// The label value of policy `i`'s peers.
fn peer(i: usize) -> String {
    format!("p{i:04}")
}

/// Writes the manifests for `n` ingress policies into `dir` (created) and parses them.
pub fn generate(dir: &Path, n: usize) -> Result<PolicySet> {
    ensure!(n >= 1, "at least one policy");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut cluster = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n");
    pod(&mut cluster, "server", "app: server", NODE, SERVER_IP);
    let client_labels = format!("app: client, peer: {}", peer(n - 1));
    pod(&mut cluster, "client", &client_labels, NODE, CLIENT_IP);
    pod(&mut cluster, "stranger", "app: stranger", NODE, STRANGER_IP);
    for j in 0..REMOTE_PODS {
        let labels = format!("app: remote, peer: {}", peer(j % n));
        let node = format!("remote-{}", j % REMOTE_NODES);
        pod(
            &mut cluster,
            &format!("remote-{j:04}"),
            &labels,
            &node,
            remote_ip(j),
        );
    }

    let mut policies = String::new();
    for i in 0..n {
        let _ = write!(
            policies,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  \
             name: allow-{}\n  namespace: {NAMESPACE}\nspec:\n  podSelector:\n    \
             matchLabels: {{app: server}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    \
             - podSelector:\n        matchLabels: {{peer: {}}}\n    ports:\n    \
             - {{protocol: TCP, port: {RATE_PORT}}}\n    - {{protocol: TCP, port: {STREAM_PORT}}}\n",
            peer(i),
            peer(i)
        );
    }
    let _ = write!(
        policies,
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  \
         name: client-egress\n  namespace: {NAMESPACE}\nspec:\n  podSelector:\n    \
         matchLabels: {{app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    \
         - podSelector:\n        matchLabels: {{app: server}}\n    ports:\n    \
         - {{protocol: TCP, port: {RATE_PORT}}}\n    - {{protocol: TCP, port: {STREAM_PORT}}}\n"
    );

    for (file, text) in [("cluster.yaml", &cluster), ("policies.yaml", &policies)] {
        let path = dir.join(file);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }

    let (mut state, errors) = load_dir(dir, &mut LastGood::default());
    if let Some(e) = errors.first() {
        anyhow::bail!(
            "the generated manifests in {} do not load ({} errors), first: {e}",
            dir.display(),
            errors.len()
        );
    }
    ensure!(
        state.pods.len() == REMOTE_PODS + 3 && state.policies.len() == n + 1,
        "the generated manifests loaded as {} pods and {} policies, expected {} and {}",
        state.pods.len(),
        state.policies.len(),
        REMOTE_PODS + 3,
        n + 1
    );
    state.node = Some(NODE.to_string());
    Ok(PolicySet {
        n,
        dir: dir.to_path_buf(),
        state,
    })
}
