//! Names for the numbers in the maps: which pod owns an address, what an identity stands for,
//! which ipBlocks a CIDR identity is, which rule produced a policy entry, which policies isolate
//! a pod.
//!
//! Built after every sync from the cluster state and its compilation. The denied-connection log
//! reads it in the agent; `npc-agent dump` (a separate process, possibly while the agent is down)
//! reads the copy the agent publishes as JSON in its state directory ([`Names::publish`]).
use std::{
    borrow::Cow,
    collections::BTreeMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use npc_common::{Direction, ENDPOINT_LOCAL, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, ipproto};
use serde::{Deserialize, Serialize};

use crate::{compiler::Desired, model::ClusterState};

/// The file [`Names::publish`] writes in the state directory.
pub const NAMES_FILE: &str = "names.json";

/// Names for the numbers in the maps (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Names {
    /// The node the agent runs on (`None`: every pod is local).
    pub node: Option<String>,
    /// Every address in `endpoints` -> who owns it.
    pub endpoints: BTreeMap<IpAddr, EndpointName>,
    /// Pod identities -> what they stand for.
    pub identities: BTreeMap<u32, IdentityName>,
    /// CIDR identities -> the ipBlocks an address with that identity is in, as
    /// `10.0.0.0/8 except 10.1.0.0/16, 10.2.0.0/16`.
    pub cidr_identities: BTreeMap<u32, Vec<String>>,
    /// The `cidrs` prefixes -> CIDR identity (`IDENTITY_WORLD` for a prefix in no block).
    pub cidrs: BTreeMap<IpNet, u32>,
    /// Rule cookies -> the rule.
    pub rules: BTreeMap<u32, RuleName>,
    /// Local pod identities -> the policies that isolate them, by direction.
    pub isolating: BTreeMap<u32, Isolation>,
}

/// Who owns an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EndpointName {
    Pod {
        namespace: String,
        name: String,
        node: Option<String>,
        /// The pod runs on this node (its policies are enforced here).
        local: bool,
    },
    /// One of the node's own addresses.
    Host,
}

/// What a pod identity stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityName {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The pods with this identity (`namespace/name`, sorted).
    pub pods: Vec<String>,
}

/// The rule a policy entry comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleName {
    /// `namespace/name` of the NetworkPolicy.
    pub policy: String,
    /// `ingress` or `egress`.
    pub direction: String,
    /// Index of the rule in the policy's `ingress` or `egress` list.
    pub index: usize,
}

impl std::fmt::Display for RuleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}[{}]", self.policy, self.direction, self.index)
    }
}

/// The policies (`namespace/name`) isolating a pod identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
}

impl Isolation {
    pub fn get(&self, dir: Direction) -> &[String] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// A remote peer of a flow, as far as the names tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer<'a> {
    Pod {
        namespace: &'a str,
        name: &'a str,
    },
    /// The node's own address.
    Host,
    /// No pod: inside these ipBlocks of the local pod's policies.
    Cidr(&'a [String]),
    /// No pod and in no ipBlock.
    World,
}

impl std::fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Pod { namespace, name } => write!(f, "pod {namespace}/{name}"),
            Peer::Host => f.write_str("host"),
            Peer::Cidr(blocks) => write!(f, "ipBlock {}", blocks.join("; ")),
            Peer::World => f.write_str("world"),
        }
    }
}

impl Names {
    /// The names of `desired`, the compilation of `state`.
    pub fn build(state: &ClusterState, desired: &Desired) -> Names {
        let mut names = Names {
            node: state.node.clone(),
            ..Names::default()
        };
        for (&id, key) in &desired.identities {
            names.identities.insert(
                id,
                IdentityName {
                    namespace: key.namespace.clone(),
                    labels: key.pod_labels.clone(),
                    pods: Vec::new(),
                },
            );
        }
        // An address claimed by several pods belongs to the one the compiler chose: a local pod
        // before a remote one, then the first by name (the pods are sorted by name).
        for local_pass in [true, false] {
            for (pod_ref, pod) in &state.pods {
                if pod.host_network || state.is_local(pod) != local_pass {
                    continue;
                }
                for ip in &pod.ips {
                    let ip = ip.to_canonical();
                    let Some(want) = desired.endpoints.get(&ip) else {
                        continue;
                    };
                    if names.endpoints.contains_key(&ip) {
                        continue;
                    }
                    names.endpoints.insert(
                        ip,
                        EndpointName::Pod {
                            namespace: pod_ref.namespace.clone(),
                            name: pod_ref.name.clone(),
                            node: pod.node.clone(),
                            local: want.flags & ENDPOINT_LOCAL != 0,
                        },
                    );
                    if let Some(identity) = names.identities.get_mut(&want.identity) {
                        let pod_name = pod_ref.to_string();
                        if !identity.pods.contains(&pod_name) {
                            identity.pods.push(pod_name);
                        }
                    }
                }
            }
        }
        for identity in names.identities.values_mut() {
            identity.pods.sort();
        }
        for (ip, e) in &desired.endpoints {
            if e.identity == IDENTITY_HOST {
                names.endpoints.entry(*ip).or_insert(EndpointName::Host);
            }
        }
        for (&id, blocks) in &desired.cidr_blocks {
            let described = blocks
                .iter()
                .map(|b| {
                    if b.except.is_empty() {
                        b.cidr.to_string()
                    } else {
                        let except: Vec<String> = b.except.iter().map(IpNet::to_string).collect();
                        format!("{} except {}", b.cidr, except.join(", "))
                    }
                })
                .collect();
            names.cidr_identities.insert(id, described);
        }
        for (&(ip, len), &id) in &desired.cidrs {
            if let Ok(net) = IpNet::new(ip, len) {
                names.cidrs.insert(net, id);
            }
        }
        for (&cookie, rule) in &desired.rules {
            names.rules.insert(
                cookie,
                RuleName {
                    policy: rule.policy.to_string(),
                    direction: rule.direction.as_str().to_string(),
                    index: rule.index,
                },
            );
        }
        for ((id, dir), policies) in &desired.isolating {
            let isolation = names.isolating.entry(*id).or_default();
            let list = match dir {
                Direction::Ingress => &mut isolation.ingress,
                Direction::Egress => &mut isolation.egress,
            };
            list.extend(policies.iter().map(ToString::to_string));
        }
        names
    }

    /// The pod (or host) owning `ip`.
    pub fn endpoint(&self, ip: IpAddr) -> Option<&EndpointName> {
        self.endpoints.get(&ip.to_canonical())
    }

    /// The policies isolating `identity` in `dir` (empty when none does).
    pub fn isolating(&self, identity: u32, dir: Direction) -> &[String] {
        self.isolating
            .get(&identity)
            .map(|i| i.get(dir))
            .unwrap_or_default()
    }

    /// The longest `cidrs` prefix containing `ip`, and its CIDR identity.
    pub fn cidr_of(&self, ip: IpAddr) -> Option<(IpNet, u32)> {
        let ip = ip.to_canonical();
        self.cidrs
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(net, id)| (*net, *id))
    }

    /// Who the remote side of a flow is: its pod, else the ipBlocks it is in, else the world.
    pub fn peer(&self, ip: IpAddr) -> Peer<'_> {
        match self.endpoint(ip) {
            Some(EndpointName::Pod {
                namespace, name, ..
            }) => Peer::Pod { namespace, name },
            Some(EndpointName::Host) => Peer::Host,
            None => match self
                .cidr_of(ip)
                .and_then(|(_, id)| self.cidr_identities.get(&id))
            {
                Some(blocks) => Peer::Cidr(blocks),
                None => Peer::World,
            },
        }
    }

    /// A short description of any identity number (pod, CIDR or reserved).
    pub fn identity(&self, id: u32) -> String {
        match id {
            IDENTITY_ANY => "any".to_string(),
            IDENTITY_WORLD => "world".to_string(),
            IDENTITY_HOST => "host".to_string(),
            _ => {
                if let Some(i) = self.identities.get(&id) {
                    let labels: Vec<String> =
                        i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{} {{{}}}", i.namespace, labels.join(","))
                } else if let Some(blocks) = self.cidr_identities.get(&id) {
                    format!("ipBlock {}", blocks.join("; "))
                } else {
                    format!("unknown identity {id}")
                }
            }
        }
    }

    /// Writes the names to `dir`/[`NAMES_FILE`] (created if needed) atomically: a reader sees
    /// the previous or the new file, never a partial one.
    pub fn publish(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(NAMES_FILE);
        let tmp = dir.join(format!(".{NAMES_FILE}.tmp"));
        let json = serde_json::to_vec(self).context("encoding the names")?;
        std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    /// Reads what [`Names::publish`] wrote to `dir`. `Ok(None)` when there is no such file (no
    /// agent has synced with this state directory).
    pub fn load(dir: &Path) -> Result<Option<Names>> {
        let path = names_path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("decoding {}", path.display()))
    }
}

/// An IP protocol's name (`tcp`, `udp`, `sctp`, `icmp`, `icmpv6`), else its number.
pub fn protocol_name(protocol: u8) -> Cow<'static, str> {
    Cow::Borrowed(match protocol {
        ipproto::TCP => "tcp",
        ipproto::UDP => "udp",
        ipproto::SCTP => "sctp",
        ipproto::ICMP => "icmp",
        ipproto::ICMPV6 => "icmpv6",
        other => return Cow::Owned(other.to_string()),
    })
}

/// Where [`Names::publish`] writes in `dir`.
pub fn names_path(dir: &Path) -> PathBuf {
    dir.join(NAMES_FILE)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use npc_common::ENDPOINT_INGRESS_ISOLATED;

    use super::*;
    use crate::{
        compiler::{Block, DesiredEndpoint, IdentityKey, RuleRef},
        model::{ObjectRef, Pod},
    };

    fn object(ns: &str, name: &str) -> ObjectRef {
        ObjectRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn pod(node: &str, ips: &[&str]) -> Pod {
        Pod {
            namespace: String::new(),
            name: String::new(),
            labels: [("app".to_string(), "web".to_string())].into(),
            node: Some(node.into()),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            named_ports: Vec::new(),
            host_network: false,
        }
    }

    /// Two pods of one identity (one local, one remote), the host, a CIDR identity, a rule.
    fn example() -> (ClusterState, Desired) {
        let mut state = ClusterState {
            node: Some("n1".into()),
            ..ClusterState::default()
        };
        state
            .pods
            .insert(object("shop", "web-1"), pod("n1", &["10.0.0.1", "fd00::1"]));
        state
            .pods
            .insert(object("shop", "web-2"), pod("n2", &["10.0.1.1"]));
        // A stale claim on web-1's address by a remote pod: the local pod keeps it.
        state
            .pods
            .insert(object("shop", "aaa-stale"), pod("n2", &["10.0.0.1"]));
        let mut d = Desired::default();
        let ep = |identity, flags| DesiredEndpoint { identity, flags };
        d.endpoints.insert(
            "10.0.0.1".parse().unwrap(),
            ep(256, ENDPOINT_LOCAL | ENDPOINT_INGRESS_ISOLATED),
        );
        d.endpoints.insert(
            "fd00::1".parse().unwrap(),
            ep(256, ENDPOINT_LOCAL | ENDPOINT_INGRESS_ISOLATED),
        );
        d.endpoints.insert("10.0.1.1".parse().unwrap(), ep(256, 0));
        d.endpoints
            .insert("192.168.1.10".parse().unwrap(), ep(IDENTITY_HOST, 0));
        d.identities.insert(
            256,
            IdentityKey {
                namespace: "shop".into(),
                pod_labels: [("app".to_string(), "web".to_string())].into(),
                namespace_labels: Default::default(),
                named_ports: Vec::new(),
            }
            .into(),
        );
        let cidr_id = npc_common::IDENTITY_FIRST_CIDR;
        d.cidrs.insert(("10.0.0.0".parse().unwrap(), 8), cidr_id);
        d.cidrs
            .insert(("10.9.0.0".parse().unwrap(), 16), IDENTITY_WORLD);
        d.cidr_blocks.insert(
            cidr_id,
            vec![Block {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec!["10.9.0.0/16".parse().unwrap()],
            }],
        );
        d.rules.insert(
            1,
            RuleRef {
                policy: object("shop", "allow-frontend"),
                direction: Direction::Ingress,
                index: 0,
            },
        );
        d.isolating.insert(
            (256, Direction::Ingress),
            BTreeSet::from([object("shop", "allow-frontend"), object("shop", "deny-all")]),
        );
        (state, d)
    }

    #[test]
    fn build_names_every_number() {
        let (state, d) = example();
        let n = Names::build(&state, &d);
        assert_eq!(
            n.endpoint("10.0.0.1".parse().unwrap()),
            Some(&EndpointName::Pod {
                namespace: "shop".into(),
                name: "web-1".into(),
                node: Some("n1".into()),
                local: true,
            }),
            "the local pod owns a contested address"
        );
        assert_eq!(
            n.peer("10.0.1.1".parse().unwrap()).to_string(),
            "pod shop/web-2"
        );
        assert_eq!(n.peer("192.168.1.10".parse().unwrap()), Peer::Host);
        assert_eq!(
            n.peer("10.200.0.1".parse().unwrap()).to_string(),
            "ipBlock 10.0.0.0/8 except 10.9.0.0/16"
        );
        assert_eq!(
            n.peer("10.9.0.1".parse().unwrap()),
            Peer::World,
            "in the except"
        );
        assert_eq!(n.peer("8.8.8.8".parse().unwrap()), Peer::World);
        assert_eq!(n.identities[&256].pods, ["shop/web-1", "shop/web-2"]);
        assert_eq!(n.identity(256), "shop {app=web}");
        assert_eq!(n.identity(IDENTITY_WORLD), "world");
        assert_eq!(
            n.identity(npc_common::IDENTITY_FIRST_CIDR),
            "ipBlock 10.0.0.0/8 except 10.9.0.0/16"
        );
        assert_eq!(
            n.isolating(256, Direction::Ingress),
            ["shop/allow-frontend", "shop/deny-all"]
        );
        assert!(n.isolating(256, Direction::Egress).is_empty());
        assert!(n.isolating(999, Direction::Ingress).is_empty());
        assert_eq!(n.rules[&1].to_string(), "shop/allow-frontend ingress[0]");
    }

    #[test]
    fn publish_and_load_round_trip() {
        let (state, d) = example();
        let n = Names::build(&state, &d);
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        assert_eq!(Names::load(&state_dir).unwrap(), None, "nothing published");
        n.publish(&state_dir).unwrap();
        assert_eq!(Names::load(&state_dir).unwrap(), Some(n.clone()));
        // Republishing replaces the file (no temporary left behind).
        let mut other = n;
        other.node = Some("n9".into());
        other.publish(&state_dir).unwrap();
        assert_eq!(Names::load(&state_dir).unwrap(), Some(other));
        let files: Vec<_> = std::fs::read_dir(&state_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, [NAMES_FILE]);
        std::fs::write(names_path(&state_dir), b"{not json").unwrap();
        let err = Names::load(&state_dir).unwrap_err();
        assert!(format!("{err:#}").contains("decoding"), "{err:#}");
    }
}
