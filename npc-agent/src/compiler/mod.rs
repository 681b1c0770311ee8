//! The compiler: a pure function from the cluster state to the desired contents of the
//! datapath's maps. Unit-tested without BPF; the reconciler (`crate::reconcile`) writes the
//! difference between two compilations into the maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use npc_common::Direction;

use crate::{
    dataplane::PortMatch,
    model::{ClusterState, Labels, NamedPort, ObjectRef},
};

/// What a pod identity stands for: every pod with the same tuple is treated alike by every
/// policy (replicas share identities, so replica churn only touches `endpoints`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub namespace: String,
    pub pod_labels: Labels,
    pub namespace_labels: Labels,
    pub named_ports: Vec<NamedPort>,
}

/// Identity numbers that stay the same from one compilation to the next, so that an unchanged
/// pod keeps its identity and only real changes reach the maps. Owned by the caller and passed
/// to every `compile`; identities no longer used are released by `compile`.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    // (the compiler's implementation decides the fields)
}

/// One endpoint as the `endpoints` map wants it (the reconciler adds ifindex and generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DesiredEndpoint {
    pub identity: u32,
    /// `ENDPOINT_*` bits (LOCAL, INGRESS_ISOLATED, EGRESS_ISOLATED, AUDIT).
    pub flags: u32,
}

/// One policy entry: `local` may talk to `remote` in `direction` on `ports`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntryKey {
    pub local: u32,
    pub remote: u32,
    pub direction: Direction,
    pub ports: PortMatch,
}

/// Which rule produced a policy entry (for logs and map-dump), identified by its cookie.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: ObjectRef,
    pub direction: Direction,
    /// Index of the rule in the policy's `ingress` or `egress` list.
    pub index: usize,
}

/// The desired contents of the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every pod address (local pods with `ENDPOINT_LOCAL`, pods elsewhere without), and the
    /// node's own addresses with `IDENTITY_HOST`.
    pub endpoints: BTreeMap<IpAddr, DesiredEndpoint>,
    /// `cidrs` LPM entries: (prefix address, prefix length) -> CIDR identity.
    pub cidrs: BTreeMap<(IpAddr, u8), u32>,
    /// `policy` entries -> rule cookie. Only for identities of local pods.
    pub policy: BTreeMap<PolicyEntryKey, u32>,
    /// Rule cookies -> the rule (cookie 0 is never used).
    pub rules: BTreeMap<u32, RuleRef>,
    /// Pod identities in use -> what they stand for.
    pub identities: BTreeMap<u32, IdentityKey>,
    /// For each local pod identity: the policies that select it (isolate it), for deny logs.
    pub isolating: BTreeMap<u32, BTreeSet<ObjectRef>>,
}
