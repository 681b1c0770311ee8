//! A generated cluster, written as manifests (JSON lists, which the manifests reader takes as
//! YAML): namespaces of 10 pods each (4 apps, named ports) spread over 100 nodes, and one policy
//! per namespace mixing pod, namespace-label and namespace-name selectors, named ports and
//! ipBlocks with excepts.
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

const PODS_PER_NAMESPACE: u32 = 10;
const NODES: u32 = 100;

#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub pods: u32,
    pub policies: u32,
}

/// Writes the cluster of `scale` into `dir` (created): namespaces.json, pods.json,
/// policies.json.
pub fn write(dir: &Path, scale: Scale) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let namespaces = scale.pods.div_ceil(PODS_PER_NAMESPACE);
    let lists = [
        ("namespaces.json", (0..namespaces).map(namespace).collect()),
        (
            "pods.json",
            (0..scale.pods)
                .map(|n| pod(n / PODS_PER_NAMESPACE, n % PODS_PER_NAMESPACE, n))
                .collect(),
        ),
        (
            "policies.json",
            (0..scale.policies)
                .map(|k| policy(k, namespaces))
                .collect::<Vec<_>>(),
        ),
    ];
    for (file, items) in lists {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        let path = dir.join(file);
        std::fs::write(&path, serde_json::to_vec(&list)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn namespace(i: u32) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": format!("ns-{i}"),
            "labels": {"team": format!("t{}", i % 20), "env": if i.is_multiple_of(2) { "prod" } else { "dev" }},
        },
    })
}

/// Pod `j` of namespace `i`, the `n`th of the cluster: app `j % 4`, on node `n % 100`, address
/// 10.0.0.0 + n + 1.
fn pod(i: u32, j: u32, n: u32) -> Value {
    let app = j % 4;
    let mut ports = vec![json!({"name": "metrics", "containerPort": 9090, "protocol": "TCP"})];
    if app < 2 {
        ports.push(json!({"name": "http", "containerPort": 8080 + app, "protocol": "TCP"}));
    }
    let ip = std::net::Ipv4Addr::from(0x0a00_0000 + n + 1).to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("p-{j}"),
            "namespace": format!("ns-{i}"),
            "labels": {"app": format!("app{app}"), "tier": "web"},
        },
        "spec": {
            "nodeName": format!("node-{}", n % NODES),
            "containers": [{"name": "app", "image": "registry.example/app:1", "ports": ports}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn selector(key: &str, value: String) -> Value {
    json!({"matchLabels": {key: value}})
}

/// Policy `k`, in namespace `k % namespaces`.
fn policy(k: u32, namespaces: u32) -> Value {
    let i = k % namespaces;
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": format!("policy-{k}"), "namespace": format!("ns-{i}")},
        "spec": {
            "podSelector": selector("app", format!("app{}", k % 4)),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"podSelector": selector("app", "app1".into())}],
                    "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": "http"}],
                },
                {
                    "from": [{
                        "namespaceSelector": selector("team", format!("t{}", i % 20)),
                        "podSelector": selector("app", "app2".into()),
                    }],
                    "ports": [{"protocol": "TCP", "port": "metrics"}],
                },
            ],
            "egress": [
                {
                    "to": [{
                        "namespaceSelector": selector(
                            "kubernetes.io/metadata.name",
                            format!("ns-{}", (i + 1) % namespaces),
                        ),
                        "podSelector": selector("app", "app0".into()),
                    }],
                    "ports": [{"protocol": "TCP", "port": "http"}],
                },
                {
                    "to": [
                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.{}.0.0/16", i % 4)]}},
                        {"ipBlock": {"cidr": format!("172.{}.{}.0/24", 16 + i % 16, i % 256)}},
                    ],
                    "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "UDP", "port": 53}],
                },
            ],
        },
    })
}
