//! The cluster state the compiler works on: only what NetworkPolicy enforcement needs from
//! Namespaces, Pods and NetworkPolicies, already validated. Every source (manifests directory,
//! Kubernetes API) produces these types, so the compiler never sees raw API objects.
pub mod convert;
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

/// Object name within its namespace: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries with its own name (set when a manifest lacks it, as the
/// API server does).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// Includes `kubernetes.io/metadata.name`.
    pub labels: Labels,
    /// The namespace's pods are in audit mode ([`ENFORCEMENT_ANNOTATION`]`: audit`): what their
    /// policies would deny passes, and is counted and logged as "would block".
    pub audit: bool,
}

/// The namespace annotation that switches its pods' policies between `enforce` (the default) and
/// `audit`.
pub const ENFORCEMENT_ANNOTATION: &str = "npc.dev/enforcement";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => npc_common::ipproto::TCP,
            Protocol::Udp => npc_common::ipproto::UDP,
            Protocol::Sctp => npc_common::ipproto::SCTP,
        }
    }
}

/// A container port with a name (the only ones policies can refer to by name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `status.podIPs` (or `status.podIP`); empty until the pod has an address.
    pub ips: Vec<IpAddr>,
    /// Named container ports, sorted.
    pub named_ports: Vec<NamedPort>,
    /// Pods with `hostNetwork: true` share the node's addresses: they are no endpoint of their own.
    pub host_network: bool,
}

/// A label selector (`matchLabels` and `matchExpressions`, ANDed). The empty selector matches
/// everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    /// Non-empty for In/NotIn, empty for Exists/DoesNotExist.
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A port of a NetworkPolicy rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolicyPort {
    pub protocol: Protocol,
    /// `None`: every port of the protocol.
    pub port: Option<PortRef>,
    /// Inclusive end of a numeric range (`endPort`); only with a numeric `port`.
    pub end_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    Number(u16),
    /// A named container port, resolved on the pod that owns it.
    Name(String),
}

/// A peer of a NetworkPolicy rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector` (both in one peer: AND).
    Pods {
        /// `None`: the policy's own namespace (no `namespaceSelector`).
        namespaces: Option<LabelSelector>,
        /// The empty selector when no `podSelector` is given.
        pods: LabelSelector,
    },
    IpBlock {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

/// One ingress or egress rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    /// `from`/`to`: `None` (absent or empty) matches every peer.
    pub peers: Option<Vec<Peer>>,
    /// `None` (absent or empty) matches every port and protocol.
    pub ports: Option<Vec<PolicyPort>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    /// `policyTypes`, defaulted as the API does: Ingress always, Egress when egress rules exist.
    pub ingress_isolation: bool,
    pub egress_isolation: bool,
    /// Ignored when `ingress_isolation` is false (an explicit `[Egress]` ignores ingress rules).
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// Everything the compiler needs, keyed for deterministic iteration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    pub policies: BTreeMap<ObjectRef, NetworkPolicy>,
    /// The node this agent runs on; `None`: every pod is local (manifests mode without
    /// `--node-name`).
    pub node: Option<String>,
    /// This node's own addresses (identity HOST).
    pub node_ips: Vec<IpAddr>,
}

impl ClusterState {
    pub fn is_local(&self, pod: &Pod) -> bool {
        match &self.node {
            None => true,
            Some(node) => pod.node.as_deref() == Some(node),
        }
    }
}
