//! How a lab realizes the manifests' pods: which pods get a namespace, under which name, on
//! which bridge (with which gateway) or routed, and which responders they run. Pure: the
//! responder process ([`crate::serve`]) carries the plan out.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Result, bail, ensure};
use npc_tests::lab::ROUTED_GATEWAY_V4;
use serde::{Deserialize, Serialize};

use crate::manifests::{Cluster, Port};

/// A bridge in the node namespace: one per IPv4 /24 that holds pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgePlan {
    pub name: String,
    /// Gateway with prefix length, e.g. `10.88.1.1/24`.
    pub gateway_v4: String,
    /// e.g. `fd00:88:1::1/64`, when some pod on the bridge has IPv6.
    pub gateway_v6: Option<String>,
}

/// One pod of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    /// The lab's name for it (namespace `<lab>-<lab_name>`): `<namespace>.<name>` with every
    /// character other than ASCII letters, digits and `.` replaced by `_`.
    pub lab_name: String,
    pub labels: BTreeMap<String, String>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    /// Bridge name, or `None` for a routed pod.
    pub bridge: Option<String>,
    /// Declared ports (responders run on the TCP and UDP ones).
    pub ports: Vec<Port>,
}

/// What the responder process builds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The lab's user-facing name (`--name`).
    pub name: String,
    pub bridges: Vec<BridgePlan>,
    pub pods: Vec<PodPlan>,
}

/// Lab name of a pod: see [`PodPlan::lab_name`]. Kubernetes namespaces hold no `.`, so the
/// first `.` separates namespace and name and distinct pods get distinct names.
pub fn lab_pod_name(namespace: &str, name: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}.{}", clean(namespace).replace('.', "_"), clean(name))
}

/// Plans the lab. Pods without an address or with `hostNetwork` are left out (returned as
/// notes); every other pod needs exactly one IPv4 address and at most one IPv6 address.
pub fn plan(name: &str, cluster: &Cluster, routed: bool) -> Result<(Plan, Vec<String>)> {
    let mut notes = Vec::new();
    let mut pods = Vec::new();
    let mut lab_names = BTreeMap::new();
    for pod in &cluster.pods {
        if pod.host_network {
            notes.push(format!(
                "pod {}: hostNetwork, no namespace of its own",
                pod.key()
            ));
            continue;
        }
        if pod.ips.is_empty() {
            notes.push(format!(
                "pod {}: no status.podIP(s), not part of the lab",
                pod.key()
            ));
            continue;
        }
        let v4: Vec<Ipv4Addr> = pod
            .ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: Vec<Ipv6Addr> = pod
            .ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(a) => Some(*a),
                IpAddr::V4(_) => None,
            })
            .collect();
        ensure!(
            v4.len() == 1 && v6.len() <= 1,
            "pod {}: the lab needs exactly one IPv4 address and at most one IPv6 address, \
             got {:?}",
            pod.key(),
            pod.ips
        );
        ensure!(
            v4[0] != ROUTED_GATEWAY_V4 && !v4[0].is_loopback() && !v4[0].is_unspecified(),
            "pod {}: {} cannot be a pod address in the lab",
            pod.key(),
            v4[0]
        );
        let lab_name = lab_pod_name(&pod.namespace, &pod.name);
        if let Some(other) = lab_names.insert(lab_name.clone(), pod.key()) {
            bail!(
                "pods {other} and {} map to the same lab name {lab_name:?}",
                pod.key()
            );
        }
        pods.push(PodPlan {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            lab_name,
            labels: pod.labels.clone(),
            ipv4: v4[0],
            ipv6: v6.first().copied(),
            bridge: None,
            ports: pod.ports.clone(),
        });
    }
    ensure!(!pods.is_empty(), "no pod with an address: nothing to build");
    let bridges = if routed {
        Vec::new()
    } else {
        assign_bridges(&mut pods)?
    };
    Ok((
        Plan {
            name: name.to_string(),
            bridges,
            pods,
        },
        notes,
    ))
}

/// One bridge per IPv4 /24 holding pods; its gateway is the first of .1, .254, .2, .3, ...
/// that no pod uses, and its IPv6 gateway (when pods on it have IPv6, all in one /64) the
/// first of ::1, ::2, ... in that /64 that no pod uses.
fn assign_bridges(pods: &mut [PodPlan]) -> Result<Vec<BridgePlan>> {
    let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, pod) in pods.iter().enumerate() {
        let host = pod.ipv4.octets()[3];
        ensure!(
            host != 0 && host != 255,
            "pod {}/{}: {} is the network or broadcast address of its /24 bridge subnet; \
             use --routed",
            pod.namespace,
            pod.name,
            pod.ipv4
        );
        groups
            .entry(u32::from(pod.ipv4) & 0xffff_ff00)
            .or_default()
            .push(i);
    }
    let mut bridges = Vec::new();
    for (n, (net, members)) in groups.into_iter().enumerate() {
        let used: Vec<u8> = members.iter().map(|&i| pods[i].ipv4.octets()[3]).collect();
        let host = [1u8, 254]
            .into_iter()
            .chain(2..254)
            .find(|h| !used.contains(h))
            .expect("a /24 with at most 254 pods has a free address");
        let gw4 = Ipv4Addr::from(net | u32::from(host));

        let v6: Vec<(usize, Ipv6Addr)> = members
            .iter()
            .filter_map(|&i| pods[i].ipv6.map(|a| (i, a)))
            .collect();
        let gateway_v6 = match v6.first() {
            None => None,
            Some(&(_, first)) => {
                let prefix = u128::from(first) & !u128::from(u64::MAX);
                for &(i, a) in &v6 {
                    ensure!(
                        u128::from(a) & !u128::from(u64::MAX) == prefix,
                        "pods on the bridge for {}/24 have IPv6 addresses in different /64s \
                         ({first} and {a} of {}/{}); use --routed",
                        Ipv4Addr::from(net),
                        pods[i].namespace,
                        pods[i].name
                    );
                }
                let gw = (1u128..)
                    .map(|h| Ipv6Addr::from(prefix | h))
                    .find(|g| !v6.iter().any(|(_, a)| a == g))
                    .expect("a free address");
                Some(format!("{gw}/64"))
            }
        };
        let name = format!("br{n}");
        for &i in &members {
            pods[i].bridge = Some(name.clone());
        }
        bridges.push(BridgePlan {
            name,
            gateway_v4: format!("{gw4}/24"),
            gateway_v6,
        });
    }
    Ok(bridges)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::manifests::{ManifestPod, Protocol};

    fn pod(ns: &str, name: &str, ips: &[&str]) -> ManifestPod {
        ManifestPod {
            namespace: ns.into(),
            name: name.into(),
            labels: BTreeMap::new(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ports: vec![Port {
                port: 80,
                protocol: Protocol::Tcp,
                name: None,
            }],
            host_network: false,
            file: PathBuf::from("x.yaml"),
        }
    }

    fn cluster(pods: Vec<ManifestPod>) -> Cluster {
        Cluster {
            pods,
            ..Cluster::default()
        }
    }

    #[test]
    fn names() {
        assert_eq!(
            lab_pod_name("sock-shop", "front-end"),
            "sock_shop.front_end"
        );
        assert_eq!(lab_pod_name("a", "b.c-d"), "a.b.c_d");
    }

    #[test]
    fn bridges_and_gateways() {
        let c = cluster(vec![
            pod("a", "p1", &["10.88.1.1", "fd00:1::1"]),
            pod("a", "p2", &["10.88.1.2", "fd00:1::5"]),
            pod("a", "p3", &["10.88.2.7"]),
            pod("a", "nohost", &[]),
        ]);
        let (plan, notes) = plan("t", &c, false).unwrap();
        assert_eq!(notes.len(), 1);
        assert_eq!(
            plan.bridges,
            vec![
                BridgePlan {
                    name: "br0".into(),
                    gateway_v4: "10.88.1.254/24".into(),
                    gateway_v6: Some("fd00:1::2/64".into()),
                },
                BridgePlan {
                    name: "br1".into(),
                    gateway_v4: "10.88.2.1/24".into(),
                    gateway_v6: None,
                },
            ]
        );
        assert_eq!(plan.pods[2].bridge.as_deref(), Some("br1"));

        let (routed, _) = plan_routed(&c);
        assert!(routed.bridges.is_empty());
        assert!(routed.pods.iter().all(|p| p.bridge.is_none()));
    }

    fn plan_routed(c: &Cluster) -> (Plan, Vec<String>) {
        plan("t", c, true).unwrap()
    }

    #[test]
    fn rejects() {
        for (pods, want) in [
            (vec![pod("a", "p", &["fd00::1"])], "exactly one IPv4"),
            (
                vec![pod("a", "p", &["10.0.0.1", "10.0.0.2"])],
                "exactly one IPv4",
            ),
            (vec![pod("a", "p", &["10.0.0.0"])], "use --routed"),
            (
                vec![
                    pod("a", "p", &["10.0.0.1", "fd00:1::1"]),
                    pod("a", "q", &["10.0.0.2", "fd00:2::1"]),
                ],
                "different /64s",
            ),
            (
                vec![
                    pod("a-b", "c", &["10.0.0.1"]),
                    pod("a_b", "c", &["10.0.0.2"]),
                ],
                "same lab name",
            ),
            (vec![pod("a", "p", &[])], "no pod with an address"),
        ] {
            let e = plan("t", &cluster(pods), false).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{e:#}");
        }
        // Routed takes what the bridges cannot.
        plan("t", &cluster(vec![pod("a", "p", &["10.0.0.0"])]), true).unwrap();
    }
}
