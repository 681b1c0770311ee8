//! Rules -> policy entries.
//!
//! A rule of a policy gives, for every local identity `L` the policy selects, entries
//! `(L, remote, direction, ports)` for every remote identity of its peers (OR) and every port
//! (OR):
//! - no peers: `IDENTITY_ANY`;
//! - a pod peer: the identities of the matching pods, anywhere in the cluster;
//! - an ipBlock: every CIDR identity whose set contains the block (see `cidr`);
//! - no ports: `PortMatch::AnyProtocol`; a port without number: `AnyPort`; a number (and
//!   `endPort`): `Range`.
//!
//! **Named ports** resolve on the pod that owns the port, and a name no container declares (for
//! that protocol) matches nothing:
//! - ingress: on the selected local identity's table; the remote side is as above.
//! - egress to pods: on each peer identity's table, giving entries for that peer identity only.
//! - egress to every peer (no `to`) with a named port: a named port only ever matches pods (as
//!   upstream implementations do in practice), so the name is resolved on every pod identity
//!   that declares it, and the entries are keyed by those pod identities.
//! - egress to an ipBlock with a named port: likewise only pods in the block match, but keying by
//!   pod identity would be wrong when the replicas of one identity lie partly inside and partly
//!   outside the block (the block is about addresses, the identity is not). So the address of
//!   every pod inside such a block gets a host prefix in `cidrs` whose CIDR identity also carries
//!   that pod's named-port table; the name is resolved on those tables and the entries are keyed
//!   by those CIDR identities: exact per address.
use std::{borrow::Cow, collections::BTreeMap, rc::Rc};

use hashbrown::HashMap;
use npc_common::{Direction, IDENTITY_ANY};

use super::{
    Group, PolicyEntryKey,
    cidr::{Block, CidrTable},
};
use crate::{
    dataplane::PortMatch,
    model::{LabelSelector, Labels, NamedPort, Peer, PolicyPort, PortRef, Protocol, Rule},
};

type PeerKey<'a> = (Option<&'a LabelSelector>, &'a LabelSelector, &'a str);
/// A remote identity with the named-port table its named ports resolve on.
type PortOwner<'a> = (u32, &'a [NamedPort]);

/// Resolves peers to identities, with caches shared by every rule of one compilation.
pub(super) struct Resolver<'s, 'a> {
    groups: &'s [Group<'a>],
    by_ns: &'s BTreeMap<&'a str, Vec<usize>>,
    ns_labels: &'s HashMap<&'a str, Cow<'a, Labels>>,
    cidrs: &'s CidrTable<'a>,
    block_index: &'s HashMap<&'s Block, usize>,
    /// Pod peer (namespace selector, pod selector, policy namespace when no namespace selector)
    /// -> matching groups.
    peers: HashMap<PeerKey<'a>, Rc<[usize]>>,
    /// Namespace selector -> matching namespaces (that have pods).
    namespaces: HashMap<&'a LabelSelector, Rc<[&'a str]>>,
    /// Namespace label (key, value) -> the namespaces (that have pods) carrying it: a selector
    /// with `matchLabels` only looks at the namespaces of its rarest pair.
    ns_by_label: Option<HashMap<(&'s str, &'s str), Vec<&'a str>>>,
    /// Every pod identity that declares named ports, with its table.
    port_owners: Option<Rc<[PortOwner<'a>]>>,
}

impl<'s, 'a> Resolver<'s, 'a> {
    pub(super) fn new(
        groups: &'s [Group<'a>],
        by_ns: &'s BTreeMap<&'a str, Vec<usize>>,
        ns_labels: &'s HashMap<&'a str, Cow<'a, Labels>>,
        cidrs: &'s CidrTable<'a>,
        block_index: &'s HashMap<&'s Block, usize>,
    ) -> Self {
        Resolver {
            groups,
            by_ns,
            ns_labels,
            cidrs,
            block_index,
            peers: HashMap::new(),
            namespaces: HashMap::new(),
            ns_by_label: None,
            port_owners: None,
        }
    }

    /// Appends the entries of `rule` (of a policy in `policy_ns`, for its selected local
    /// groups `selected`) to `out`, with `cookie`.
    pub(super) fn rule_entries(
        &mut self,
        direction: Direction,
        rule: &'a Rule,
        policy_ns: &'a str,
        selected: &[usize],
        cookie: u32,
        out: &mut Vec<(PolicyEntryKey, u32)>,
    ) {
        let ports: &[PolicyPort] = rule.ports.as_deref().unwrap_or_default();
        // Egress named ports resolve on the peer: collect the peers' tables.
        let by_owner = direction == Direction::Egress
            && ports
                .iter()
                .any(|p| matches!(p.port, Some(PortRef::Name(_))));
        // Remote identities, and (for egress named ports) remote identities with their tables.
        let mut remotes: Vec<u32> = Vec::new();
        let mut owners: Vec<PortOwner<'a>> = Vec::new();
        match rule.peers.as_deref() {
            None | Some([]) => {
                remotes.push(IDENTITY_ANY);
                if by_owner {
                    owners.extend(self.port_owners().iter().copied());
                }
            }
            Some(peers) => {
                for peer in peers {
                    match peer {
                        Peer::Pods { namespaces, pods } => {
                            let found = self.pods(policy_ns, namespaces.as_ref(), pods);
                            for &g in found.iter() {
                                let group = &self.groups[g];
                                remotes.push(group.identity);
                                if by_owner && !group.named_ports.is_empty() {
                                    owners.push((group.identity, group.named_ports));
                                }
                            }
                        }
                        Peer::IpBlock { cidr, except } => {
                            let Some(&b) = Block::new(cidr, except)
                                .as_ref()
                                .and_then(|b| self.block_index.get(b))
                            else {
                                continue;
                            };
                            for t in &self.cidrs.by_block[b] {
                                remotes.push(t.identity);
                                if by_owner && !t.named_ports.is_empty() {
                                    owners.push((t.identity, t.named_ports));
                                }
                            }
                        }
                    }
                }
            }
        }
        remotes.sort_unstable();
        remotes.dedup();
        owners.sort_unstable_by_key(|o| o.0);
        owners.dedup_by_key(|o| o.0);

        let groups = self.groups;
        let mut emit = |local: u32, remote: u32, ports: PortMatch| {
            out.push((
                PolicyEntryKey {
                    local,
                    remote,
                    direction,
                    ports,
                },
                cookie,
            ));
        };
        // Ports that apply to every remote alike.
        let mut uniform: Vec<PortMatch> = Vec::new();
        if ports.is_empty() {
            uniform.push(PortMatch::AnyProtocol);
        }
        for port in ports {
            let protocol = port.protocol.number();
            match &port.port {
                None => uniform.push(PortMatch::AnyPort { protocol }),
                Some(PortRef::Number(p)) => {
                    let end_port = port.end_port.unwrap_or(*p);
                    // (Validation rejects endPort < port; such a port matches nothing.)
                    if end_port >= *p {
                        uniform.push(PortMatch::Range {
                            protocol,
                            port: *p,
                            end_port,
                        });
                    }
                }
                Some(PortRef::Name(name)) if direction == Direction::Ingress => {
                    for &g in selected {
                        let local = groups[g].identity;
                        for pm in resolve(groups[g].named_ports, name, port.protocol) {
                            for &r in &remotes {
                                emit(local, r, pm);
                            }
                        }
                    }
                }
                Some(PortRef::Name(name)) => {
                    for &(r, table) in &owners {
                        for pm in resolve(table, name, port.protocol) {
                            for &g in selected {
                                emit(groups[g].identity, r, pm);
                            }
                        }
                    }
                }
            }
        }
        for pm in uniform {
            for &g in selected {
                for &r in &remotes {
                    emit(groups[g].identity, r, pm);
                }
            }
        }
    }

    /// The groups a pod peer matches: pods matching `pods` in the policy's namespace (no
    /// namespace selector) or in every namespace matching `namespaces`.
    fn pods(
        &mut self,
        policy_ns: &'a str,
        namespaces: Option<&'a LabelSelector>,
        pods: &'a LabelSelector,
    ) -> Rc<[usize]> {
        let key = (
            namespaces,
            pods,
            if namespaces.is_none() { policy_ns } else { "" },
        );
        if let Some(found) = self.peers.get(&key) {
            return found.clone();
        }
        let in_namespaces: Rc<[&str]> = match namespaces {
            None => Rc::from([policy_ns]),
            Some(sel) => self.namespaces(sel),
        };
        let found: Rc<[usize]> = in_namespaces
            .iter()
            .flat_map(|ns| self.by_ns.get(ns).into_iter().flatten())
            .copied()
            .filter(|&g| pods.matches(self.groups[g].labels))
            .collect();
        self.peers.insert(key, found.clone());
        found
    }

    fn namespaces(&mut self, sel: &'a LabelSelector) -> Rc<[&'a str]> {
        if let Some(found) = self.namespaces.get(sel) {
            return found.clone();
        }
        let (by_ns, ns_labels) = (self.by_ns, self.ns_labels);
        let index = self.ns_by_label.get_or_insert_with(|| {
            let mut index: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
            for &ns in by_ns.keys() {
                for (k, v) in ns_labels.get(ns).map(|l| l.as_ref()).into_iter().flatten() {
                    index.entry((k.as_str(), v.as_str())).or_default().push(ns);
                }
            }
            index
        });
        let rarest = sel
            .match_labels
            .iter()
            .map(|(k, v)| {
                index
                    .get(&(k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|candidates| candidates.len());
        let candidates: Box<dyn Iterator<Item = &&'a str>> = match rarest {
            Some(c) => Box::new(c.iter()),
            None => Box::new(by_ns.keys()),
        };
        let found: Rc<[&'a str]> = candidates
            .copied()
            .filter(|ns| ns_labels.get(ns).is_some_and(|l| sel.matches(l)))
            .collect();
        self.namespaces.insert(sel, found.clone());
        found
    }

    fn port_owners(&mut self) -> Rc<[PortOwner<'a>]> {
        let groups = self.groups;
        self.port_owners
            .get_or_insert_with(|| {
                groups
                    .iter()
                    .filter(|g| !g.named_ports.is_empty())
                    .map(|g| (g.identity, g.named_ports))
                    .collect()
            })
            .clone()
    }
}

/// The ports `name` stands for in a named-port table, for `protocol`.
fn resolve<'t>(
    table: &'t [NamedPort],
    name: &'t str,
    protocol: Protocol,
) -> impl Iterator<Item = PortMatch> + 't {
    table
        .iter()
        .filter(move |np| np.name == name && np.protocol == protocol)
        .map(|np| PortMatch::Range {
            protocol: np.protocol.number(),
            port: np.port,
            end_port: np.port,
        })
}
