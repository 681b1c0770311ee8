//! The compiler: a pure function from the cluster state to the desired contents of the
//! datapath's maps. Unit-tested without BPF; the reconciler (`crate::reconcile`) writes the
//! difference between two compilations into the maps.
//!
//! How it works:
//! - **Pod identities.** Pods with addresses (and not `hostNetwork`) are grouped by
//!   (namespace, pod labels, named ports); with the namespace's labels that is the
//!   `IdentityKey`, numbered stably by `Identities`. Every selector is evaluated once per
//!   identity, never per pod: replicas cost one `endpoints` entry each and nothing else.
//! - **Isolation** is a property of the identity (namespace and labels decide which policies
//!   select it); the flags go to the endpoints of local pods only.
//! - **ipBlocks** (of the policies that select local pods) become `cidrs` prefixes with CIDR
//!   identities (sets of blocks), see `cidr`.
//! - **Rules** become policy entries for the local identities their policy selects, see `rules`
//!   (also for how named ports are resolved).
//! - **Determinism**: every output is a sorted map, and every number (pod and CIDR identities,
//!   rule cookies) comes from an `Interner` that numbers new keys in sorted key order and keeps
//!   the numbers of known keys: the same history of inputs gives the same output.
use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::IpAddr,
    sync::Arc,
};

use hashbrown::{Equivalent, HashMap};

use npc_common::{
    Direction, ENDPOINT_AUDIT, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, ENDPOINT_LOCAL,
    IDENTITY_FIRST_CIDR, IDENTITY_FIRST_POD, IDENTITY_HOST, RULE_HOST, RULE_NONE,
};

use crate::{
    dataplane::PortMatch,
    model::{
        ClusterState, Labels, NAMESPACE_NAME_LABEL, NamedPort, NetworkPolicy, ObjectRef, Peer,
        PortRef, Rule,
    },
};

mod cidr;
mod identity;
mod rules;
#[cfg(test)]
mod tests;

pub use cidr::Block;
use cidr::CidrKey;
use identity::Interner;

/// What a pod identity stands for: every pod with the same tuple is treated alike by every
/// policy (replicas share identities, so replica churn only touches `endpoints`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub namespace: String,
    pub pod_labels: Labels,
    pub namespace_labels: Labels,
    pub named_ports: Vec<NamedPort>,
}

/// An [`IdentityKey`] borrowed from the cluster state: hashes, compares and orders like the key
/// (same fields, same order), so known identities are found without building their key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct IdentityKeyRef<'a> {
    namespace: &'a str,
    pod_labels: &'a Labels,
    namespace_labels: &'a Labels,
    named_ports: &'a [NamedPort],
}

impl Equivalent<Arc<IdentityKey>> for IdentityKeyRef<'_> {
    fn equivalent(&self, key: &Arc<IdentityKey>) -> bool {
        self.namespace == key.namespace
            && *self.pod_labels == key.pod_labels
            && *self.namespace_labels == key.namespace_labels
            && *self.named_ports == *key.named_ports
    }
}

impl IdentityKeyRef<'_> {
    fn to_key(self) -> Arc<IdentityKey> {
        Arc::new(IdentityKey {
            namespace: self.namespace.to_string(),
            pod_labels: self.pod_labels.clone(),
            namespace_labels: self.namespace_labels.clone(),
            named_ports: self.named_ports.to_vec(),
        })
    }
}

/// Identity numbers that stay the same from one compilation to the next, so that an unchanged
/// pod keeps its identity and only real changes reach the maps. Owned by the caller and passed
/// to every `compile`; identities no longer used are released by `compile`.
///
/// Also keeps CIDR identities and rule cookies stable (same scheme), so that an unrelated
/// change does not renumber them and rewrite the whole `cidrs` and `policy` maps.
#[derive(Clone, Debug)]
pub struct Identities {
    /// Shared with `Desired::identities` (one copy of each key).
    pods: Interner<Arc<IdentityKey>>,
    cidrs: Interner<CidrKey>,
    rules: Interner<RuleRef>,
}

impl Default for Identities {
    fn default() -> Self {
        Identities {
            pods: Interner::new(IDENTITY_FIRST_POD, IDENTITY_FIRST_CIDR),
            cidrs: Interner::new(IDENTITY_FIRST_CIDR, u32::MAX),
            rules: Interner::new(RULE_NONE + 1, RULE_HOST),
        }
    }
}

impl Identities {
    /// The numbering a restarted agent starts from: the identities of `state` keep the numbers
    /// the maps already hold (`endpoints`: address -> pod identity, `cidrs`: prefix -> CIDR
    /// identity, as the previous agent wrote them), so the first sync rewrites nothing that did
    /// not change. A fresh numbering could give a number another meaning while the maps still
    /// use the old one, and the transient mix could allow what neither state allows.
    ///
    /// Each identity takes the number most of its addresses (prefixes) hold, each number goes
    /// to one identity; the others get fresh numbers above every number the maps hold. Rule
    /// cookies are not adopted: they change no verdict.
    pub fn adopt(
        state: &ClusterState,
        node_ips: &[IpAddr],
        endpoints: &BTreeMap<IpAddr, u32>,
        cidrs: &BTreeMap<(IpAddr, u8), u32>,
    ) -> Identities {
        let mut scratch = Identities::default();
        let fresh = compile_on_node(state, node_ips, &mut scratch);
        let pod_range = IDENTITY_FIRST_POD..IDENTITY_FIRST_CIDR;
        let cidr_range = IDENTITY_FIRST_CIDR..u32::MAX;
        let mut ids = Identities::default();
        let pod_pairs = fresh.endpoints.iter().filter_map(|(ip, e)| {
            let held = *endpoints.get(ip)?;
            (pod_range.contains(&e.identity) && pod_range.contains(&held))
                .then_some((e.identity, held))
        });
        seed(&mut ids.pods, &scratch.pods, pod_pairs);
        let cidr_pairs = fresh.cidrs.iter().filter_map(|(prefix, &id)| {
            let held = *cidrs.get(prefix)?;
            (cidr_range.contains(&id) && cidr_range.contains(&held)).then_some((id, held))
        });
        seed(&mut ids.cidrs, &scratch.cidrs, cidr_pairs);
        if let Some(max) = endpoints.values().filter(|n| pod_range.contains(n)).max() {
            ids.pods.reserve_below(max + 1);
        }
        if let Some(max) = cidrs.values().filter(|n| cidr_range.contains(n)).max() {
            ids.cidrs.reserve_below(max.saturating_add(1));
        }
        ids
    }
}

/// Seeds `into` with the keys of `scratch`, each numbered as most of its `(scratch number, held
/// number)` pairs say; a held number goes to one key only (most votes first, ties by number).
fn seed<K: Clone + Eq + std::hash::Hash + Ord>(
    into: &mut Interner<K>,
    scratch: &Interner<K>,
    pairs: impl Iterator<Item = (u32, u32)>,
) {
    let mut votes: HashMap<(u32, u32), usize> = HashMap::new();
    for pair in pairs {
        *votes.entry(pair).or_default() += 1;
    }
    let mut ranked: Vec<((u32, u32), usize)> = votes.into_iter().collect();
    ranked.sort_by(|(a, va), (b, vb)| vb.cmp(va).then(a.cmp(b)));
    let keys: HashMap<u32, &K> = scratch.numbered().map(|(k, n)| (n, k)).collect();
    let (mut taken_keys, mut taken_numbers) = (BTreeSet::new(), BTreeSet::new());
    for ((fresh, held), _) in ranked {
        if taken_keys.contains(&fresh) || taken_numbers.contains(&held) {
            continue;
        }
        if let Some(key) = keys.get(&fresh) {
            into.seed((*key).clone(), held);
            taken_keys.insert(fresh);
            taken_numbers.insert(held);
        }
    }
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
    pub identities: BTreeMap<u32, Arc<IdentityKey>>,
    /// For each local pod identity and direction it is isolated in: the policies that select it
    /// (isolate it) in that direction, for deny logs.
    pub isolating: BTreeMap<(u32, Direction), BTreeSet<ObjectRef>>,
    /// CIDR identities in use -> the ipBlocks an address with that identity is in (for logs and
    /// map-dump).
    pub cidr_blocks: BTreeMap<u32, Vec<Block>>,
}

/// Pods that share an identity.
struct Group<'a> {
    namespace: &'a str,
    labels: &'a Labels,
    named_ports: &'a [NamedPort],
    identity: u32,
    /// Some pod of the group runs on this node.
    local: bool,
    /// `ENDPOINT_INGRESS_ISOLATED` / `ENDPOINT_EGRESS_ISOLATED`.
    isolation: u32,
}

/// One addressed pod.
struct Member<'a> {
    ips: &'a [IpAddr],
    local: bool,
    group: usize,
}

/// A policy that selects local pods, with the groups it selects among them.
struct Selecting<'a> {
    name: &'a ObjectRef,
    policy: &'a NetworkPolicy,
    local: Vec<usize>,
}

/// Compiles the cluster state into the desired map contents, numbering identities with `ids`
/// (keep the same `ids` from one call to the next).
pub fn compile(state: &ClusterState, ids: &mut Identities) -> Desired {
    compile_on_node(state, &state.node_ips, ids)
}

/// [`compile`] with the node's own addresses given apart from the state (which a source may
/// share, unchanged, with its next update).
pub fn compile_on_node(state: &ClusterState, node_ips: &[IpAddr], ids: &mut Identities) -> Desired {
    let ns_labels = namespace_labels(state);
    let (mut groups, keys, members) = group_pods(state, &ns_labels, &mut ids.pods);
    let mut by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        by_ns.entry(g.namespace).or_default().push(i);
    }

    // Isolation, and the policies that matter on this node.
    let mut isolating: BTreeMap<(u32, Direction), BTreeSet<ObjectRef>> = BTreeMap::new();
    let mut selecting = Vec::new();
    for (name, policy) in &state.policies {
        let mut isolation = 0;
        if policy.ingress_isolation {
            isolation |= ENDPOINT_INGRESS_ISOLATED;
        }
        if policy.egress_isolation {
            isolation |= ENDPOINT_EGRESS_ISOLATED;
        }
        if isolation == 0 {
            continue;
        }
        let mut local = Vec::new();
        for &g in by_ns.get(name.namespace.as_str()).into_iter().flatten() {
            let group = &mut groups[g];
            if !policy.pod_selector.matches(group.labels) {
                continue;
            }
            group.isolation |= isolation;
            if group.local {
                local.push(g);
                for (isolated, dir) in [
                    (policy.ingress_isolation, Direction::Ingress),
                    (policy.egress_isolation, Direction::Egress),
                ] {
                    if isolated {
                        isolating
                            .entry((group.identity, dir))
                            .or_default()
                            .insert(name.clone());
                    }
                }
            }
        }
        if !local.is_empty() {
            selecting.push(Selecting {
                name,
                policy,
                local,
            });
        }
    }

    // Endpoints. An address claimed by several pods (a stale status) goes to a local pod before
    // a remote one, then to the first pod by name; the node's own addresses go last.
    let mut endpoints = BTreeMap::new();
    let mut owners: Vec<(IpAddr, usize)> = Vec::new();
    for local_pass in [true, false] {
        for m in members.iter().filter(|m| m.local == local_pass) {
            let group = &groups[m.group];
            let flags = if !m.local {
                0
            } else if audited(state, group.namespace) {
                ENDPOINT_LOCAL | group.isolation | ENDPOINT_AUDIT
            } else {
                ENDPOINT_LOCAL | group.isolation
            };
            for ip in m.ips {
                let ip = ip.to_canonical();
                if let Entry::Vacant(e) = endpoints.entry(ip) {
                    e.insert(DesiredEndpoint {
                        identity: group.identity,
                        flags,
                    });
                    owners.push((ip, m.group));
                }
            }
        }
    }
    for ip in node_ips {
        endpoints
            .entry(ip.to_canonical())
            .or_insert(DesiredEndpoint {
                identity: IDENTITY_HOST,
                flags: 0,
            });
    }

    // ipBlocks. Pod addresses inside a block that an egress rule uses with a named port get a
    // host prefix of their own (see `rules`).
    let (blocks, named_blocks) = collect_blocks(selecting.iter().map(|s| s.policy));
    let hosts: Vec<(IpAddr, &[NamedPort])> = if named_blocks.is_empty() {
        Vec::new()
    } else {
        owners
            .iter()
            .filter(|(ip, g)| {
                !groups[*g].named_ports.is_empty()
                    && named_blocks.iter().any(|&b| blocks[b].contains_addr(ip))
            })
            .map(|&(ip, g)| (ip, groups[g].named_ports))
            .collect()
    };
    let cidrs = cidr::compile_cidrs(&blocks, &hosts, &mut ids.cidrs);
    let mut cidr_blocks: BTreeMap<u32, Vec<Block>> = BTreeMap::new();
    for (block, targets) in blocks.iter().zip(&cidrs.by_block) {
        for t in targets {
            cidr_blocks
                .entry(t.identity)
                .or_default()
                .push(block.clone());
        }
    }
    let block_index: HashMap<&Block, usize> =
        blocks.iter().enumerate().map(|(i, b)| (b, i)).collect();

    // Rule cookies, then policy entries.
    let mut refs = Vec::new();
    for s in &selecting {
        for (direction, list) in counted_rules(s.policy) {
            refs.extend((0..list.len()).map(|index| RuleRef {
                policy: s.name.clone(),
                direction,
                index,
            }));
        }
    }
    let cookies = ids.rules.assign(&refs.iter().collect::<Vec<_>>());
    let mut resolver = rules::Resolver::new(&groups, &by_ns, &ns_labels, &cidrs, &block_index);
    let mut entries = Vec::new();
    let mut cookie_of = refs.iter().zip(&cookies);
    for s in &selecting {
        for (direction, list) in counted_rules(s.policy) {
            for rule in list {
                let Some((_, Some(cookie))) = cookie_of.next() else {
                    continue;
                };
                resolver.rule_entries(
                    direction,
                    rule,
                    &s.name.namespace,
                    &s.local,
                    *cookie,
                    &mut entries,
                );
            }
        }
    }
    // It borrows `cidrs` (hashbrown's maps are dropped with the scope, unlike std's).
    drop(resolver);
    // Several rules may allow the same entry: the smallest cookie names it.
    entries.sort_unstable();
    entries.dedup_by_key(|e| e.0);

    Desired {
        endpoints,
        cidrs: cidrs.entries,
        policy: entries.into_iter().collect(),
        rules: refs
            .into_iter()
            .zip(cookies)
            .filter_map(|(r, c)| Some((c?, r)))
            .collect(),
        identities: groups.iter().map(|g| g.identity).zip(keys).collect(),
        isolating,
        cidr_blocks,
    }
}

/// Whether `namespace` is annotated for audit mode (see `ENFORCEMENT_ANNOTATION`).
fn audited(state: &ClusterState, namespace: &str) -> bool {
    state.namespaces.get(namespace).is_some_and(|ns| ns.audit)
}

/// Every namespace's labels, including namespaces that pods refer to but that the state lacks
/// (labelled with their name only, as the API server would).
fn namespace_labels(state: &ClusterState) -> HashMap<&str, Cow<'_, Labels>> {
    let mut labels: HashMap<&str, Cow<'_, Labels>> = state
        .namespaces
        .iter()
        .map(|(name, ns)| (name.as_str(), Cow::Borrowed(&ns.labels)))
        .collect();
    let mut previous = None;
    for pod in state.pods.keys() {
        // Pods are sorted by namespace: look each one up once.
        if previous == Some(pod.namespace.as_str()) {
            continue;
        }
        previous = Some(pod.namespace.as_str());
        labels.entry(pod.namespace.as_str()).or_insert_with(|| {
            Cow::Owned(Labels::from([(
                NAMESPACE_NAME_LABEL.to_string(),
                pod.namespace.clone(),
            )]))
        });
    }
    labels
}

/// Groups the addressed pods by identity and numbers the identities.
fn group_pods<'a>(
    state: &'a ClusterState,
    ns_labels: &HashMap<&str, Cow<'_, Labels>>,
    interner: &mut Interner<Arc<IdentityKey>>,
) -> (Vec<Group<'a>>, Vec<Arc<IdentityKey>>, Vec<Member<'a>>) {
    let mut index: HashMap<(&str, &Labels, &[NamedPort]), usize> = HashMap::new();
    let mut groups = Vec::new();
    let mut members = Vec::new();
    for (name, pod) in &state.pods {
        if pod.host_network || pod.ips.is_empty() {
            continue;
        }
        let ns = name.namespace.as_str();
        let g = *index
            .entry((ns, &pod.labels, &pod.named_ports))
            .or_insert_with(|| {
                groups.push(Group {
                    namespace: ns,
                    labels: &pod.labels,
                    named_ports: &pod.named_ports,
                    identity: 0,
                    local: false,
                    isolation: 0,
                });
                groups.len() - 1
            });
        let local = state.is_local(pod);
        groups[g].local |= local;
        members.push(Member {
            ips: &pod.ips,
            local,
            group: g,
        });
    }
    let no_labels = Labels::new();
    let refs: Vec<IdentityKeyRef> = groups
        .iter()
        .map(|g| IdentityKeyRef {
            namespace: g.namespace,
            pod_labels: g.labels,
            namespace_labels: ns_labels
                .get(g.namespace)
                .map_or(&no_labels, |l| l.as_ref()),
            named_ports: g.named_ports,
        })
        .collect();
    let numbers = interner.assign_with(&refs.iter().collect::<Vec<_>>(), |r| r.to_key());
    // Every key is interned now (or its group is dropped below, the number space exhausted).
    let keys: Vec<Arc<IdentityKey>> = refs
        .iter()
        .map(|r| interner.key(r).cloned().unwrap_or_else(|| r.to_key()))
        .collect();
    if numbers.iter().all(Option::is_some) {
        for (g, n) in groups.iter_mut().zip(numbers) {
            g.identity = n.unwrap_or_default();
        }
        return (groups, keys, members);
    }
    // The identity space is exhausted (16 million identities in use): the pods left without a
    // number get no endpoint (they are unknown addresses to the datapath).
    let mut renumber = vec![None; groups.len()];
    let mut kept_groups = Vec::new();
    let mut kept_keys = Vec::new();
    for (i, ((mut g, key), n)) in groups.into_iter().zip(keys).zip(numbers).enumerate() {
        if let Some(n) = n {
            g.identity = n;
            renumber[i] = Some(kept_groups.len());
            kept_groups.push(g);
            kept_keys.push(key);
        }
    }
    let members = members
        .into_iter()
        .filter_map(|m| {
            Some(Member {
                group: renumber[m.group]?,
                ..m
            })
        })
        .collect();
    (kept_groups, kept_keys, members)
}

/// The rules that count: ingress rules when the policy isolates ingress (an explicit
/// `policyTypes: [Egress]` ignores them), egress rules when it isolates egress.
fn counted_rules(policy: &NetworkPolicy) -> impl Iterator<Item = (Direction, &[Rule])> {
    [
        (
            Direction::Ingress,
            policy.ingress_isolation,
            &policy.ingress,
        ),
        (Direction::Egress, policy.egress_isolation, &policy.egress),
    ]
    .into_iter()
    .filter(|(_, counts, _)| *counts)
    .map(|(d, _, rules)| (d, rules.as_slice()))
}

/// Every distinct ipBlock of the counted rules of `policies` (sorted), and the indices of those
/// that some egress rule uses together with a named port.
///
/// Only the policies that select local pods matter: no entry refers to the others' blocks, and
/// leaving their prefixes out keeps the trie small and free of churn from other nodes' policies
/// (the LPM argument in `cidr` needs only the referenced blocks' prefixes).
fn collect_blocks<'a>(
    policies: impl Iterator<Item = &'a NetworkPolicy>,
) -> (Vec<Block>, Vec<usize>) {
    let mut all = BTreeSet::new();
    let mut named = BTreeSet::new();
    for policy in policies {
        for (direction, list) in counted_rules(policy) {
            for rule in list {
                let has_name = direction == Direction::Egress
                    && rule
                        .ports
                        .iter()
                        .flatten()
                        .any(|p| matches!(p.port, Some(PortRef::Name(_))));
                for peer in rule.peers.iter().flatten() {
                    if let Peer::IpBlock { cidr, except } = peer
                        && let Some(block) = Block::new(cidr, except)
                    {
                        if has_name {
                            named.insert(block.clone());
                        }
                        all.insert(block);
                    }
                }
            }
        }
    }
    let blocks: Vec<Block> = all.into_iter().collect();
    let named = blocks
        .iter()
        .enumerate()
        .filter(|(_, b)| named.contains(*b))
        .map(|(i, _)| i)
        .collect();
    (blocks, named)
}
