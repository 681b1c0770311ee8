//! Control-plane figures: compile time and resident memory for a generated cluster.
use std::{net::IpAddr, time::Instant};

use anyhow::Result;
use npc_agent::{
    compiler::{Identities, compile},
    model::{
        ClusterState, LabelSelector, Labels, NAMESPACE_NAME_LABEL, NamedPort, Namespace,
        NetworkPolicy, ObjectRef, Peer, Pod, PolicyPort, PortRef, Protocol, Rule,
    },
};
use npc_common::ENDPOINT_LOCAL;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn selector(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: vec![],
    }
}

fn tcp(port: PortRef) -> PolicyPort {
    PolicyPort {
        protocol: Protocol::Tcp,
        port: Some(port),
        end_port: None,
    }
}

/// `namespaces` namespaces with `pods_per_ns` pods each (4 apps, named ports), spread over 100
/// nodes, and `policies` policies (one per namespace, round robin) mixing pod, namespace-label
/// and namespace-name selectors, named ports and ipBlocks with excepts.
pub fn cluster(
    namespaces: u32,
    pods_per_ns: u32,
    policies: u32,
    node: Option<&str>,
) -> ClusterState {
    let mut st = ClusterState {
        node: node.map(String::from),
        node_ips: vec!["192.168.0.1".parse().unwrap()],
        ..Default::default()
    };
    for i in 0..namespaces {
        let ns = format!("ns-{i}");
        let ns_labels = labels(&[
            ("team", format!("t{}", i % 20)),
            (
                "env",
                if i % 2 == 0 {
                    "prod".into()
                } else {
                    "dev".into()
                },
            ),
            (NAMESPACE_NAME_LABEL, ns.clone()),
        ]);
        st.namespaces.insert(
            ns.clone(),
            Namespace {
                name: ns.clone(),
                labels: ns_labels,
                audit: false,
            },
        );
        for j in 0..pods_per_ns {
            let app = j % 4;
            let mut named_ports = vec![NamedPort {
                name: "metrics".into(),
                port: 9090,
                protocol: Protocol::Tcp,
            }];
            if app < 2 {
                named_ports.push(NamedPort {
                    name: "http".into(),
                    port: 8080 + app as u16,
                    protocol: Protocol::Tcp,
                });
            }
            named_ports.sort();
            let n = i * pods_per_ns + j;
            let ip: IpAddr = std::net::Ipv4Addr::from(0x0a00_0000 + n + 1).into();
            let name = format!("p-{j}");
            st.pods.insert(
                ObjectRef {
                    namespace: ns.clone(),
                    name: name.clone(),
                },
                Pod {
                    namespace: ns.clone(),
                    name,
                    labels: labels(&[("app", format!("app{app}")), ("tier", "web".into())]),
                    node: Some(format!("node-{}", n % 100)),
                    ips: vec![ip],
                    named_ports,
                    host_network: false,
                },
            );
        }
    }
    for k in 0..policies {
        let i = k % namespaces;
        let ns = format!("ns-{i}");
        let name = format!("policy-{k}");
        let policy = NetworkPolicy {
            namespace: ns.clone(),
            name: name.clone(),
            pod_selector: selector(&[("app", format!("app{}", k % 4))]),
            ingress_isolation: true,
            egress_isolation: true,
            ingress: vec![
                Rule {
                    peers: Some(vec![Peer::Pods {
                        namespaces: None,
                        pods: selector(&[("app", "app1".into())]),
                    }]),
                    ports: Some(vec![
                        tcp(PortRef::Number(8080)),
                        tcp(PortRef::Name("http".into())),
                    ]),
                },
                Rule {
                    peers: Some(vec![Peer::Pods {
                        namespaces: Some(selector(&[("team", format!("t{}", i % 20))])),
                        pods: selector(&[("app", "app2".into())]),
                    }]),
                    ports: Some(vec![tcp(PortRef::Name("metrics".into()))]),
                },
            ],
            egress: vec![
                Rule {
                    peers: Some(vec![Peer::Pods {
                        namespaces: Some(selector(&[(
                            NAMESPACE_NAME_LABEL,
                            format!("ns-{}", (i + 1) % namespaces),
                        )])),
                        pods: selector(&[("app", "app0".into())]),
                    }]),
                    ports: Some(vec![tcp(PortRef::Name("http".into()))]),
                },
                Rule {
                    peers: Some(vec![
                        Peer::IpBlock {
                            cidr: "10.0.0.0/8".parse().unwrap(),
                            except: vec![format!("10.{}.0.0/16", i % 4).parse().unwrap()],
                        },
                        Peer::IpBlock {
                            cidr: format!("172.{}.{}.0/24", 16 + i % 16, i % 256)
                                .parse()
                                .unwrap(),
                            except: vec![],
                        },
                    ]),
                    ports: Some(vec![
                        tcp(PortRef::Number(443)),
                        PolicyPort {
                            protocol: Protocol::Udp,
                            port: Some(PortRef::Number(53)),
                            end_port: None,
                        },
                    ]),
                },
            ],
        };
        st.policies.insert(
            ObjectRef {
                namespace: ns,
                name,
            },
            policy,
        );
    }
    st
}

/// Resident set size of this process, in MiB (from /proc/self/status).
fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn run(args: &crate::Args) -> Result<()> {
    let rounds = args.rounds.min(10);
    println!("control plane: compile of a generated cluster, {rounds} rounds");
    println!(
        "{:<44} {:>9} {:>8} {:>8} {:>10} {:>9} {:>8} {:>9}",
        "cluster (pods/namespaces/policies, node)",
        "median ms",
        "min",
        "max",
        "identities",
        "entries",
        "cidrs",
        "RSS MiB"
    );
    for (pods_per_ns, namespaces, policies) in [(10u32, 1_000u32, 1_000u32), (10, 100, 100)] {
        for node in [Some("node-0"), None] {
            let rss_before = rss_mib("VmRSS:");
            let state = cluster(namespaces, pods_per_ns, policies, node);
            let mut ids = Identities::default();
            let mut times = Vec::new();
            let mut desired = compile(&state, &mut ids);
            for _ in 0..rounds {
                let t = Instant::now();
                desired = compile(&state, &mut ids);
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let rss = rss_mib("VmRSS:") - rss_before;
            let local = desired
                .endpoints
                .values()
                .filter(|e| e.flags & ENDPOINT_LOCAL != 0)
                .count();
            let (med, min, max) = crate::stats::stats(times);
            let label = format!(
                "{}/{}/{}, {}",
                namespaces * pods_per_ns,
                namespaces,
                policies,
                match node {
                    Some(n) => format!("{n} ({local} local)"),
                    None => "all local".into(),
                }
            );
            println!(
                "{label:<44} {med:>9.1} {min:>8.1} {max:>8.1} {:>10} {:>9} {:>8} {rss:>9.1}",
                desired.identities.len(),
                desired.policy.len(),
                desired.cidrs.len()
            );
            drop((state, desired, ids));
        }
    }
    println!(
        "(RSS: growth of this process's resident set while the state, its compilation and the identities were held)"
    );
    println!(
        "peak RSS of the benchmark process: {:.1} MiB",
        rss_mib("VmHWM:")
    );
    Ok(())
}
