//! ipBlocks -> `cidrs` LPM entries and CIDR identities.
//!
//! Every `cidr` and every `except` of every ipBlock is a prefix of the `cidrs` trie. A prefix `p`
//! belongs to block `B` iff `p` lies inside `B.cidr` and inside none of `B.except`; its CIDR
//! identity stands for the exact set of blocks it belongs to. For an address `a`, the longest
//! prefix `p` containing `a` then belongs to exactly the blocks `a` belongs to:
//! - `a` in `B.cidr` => `B.cidr` is a prefix containing `a`, so `p` (at least as long, also
//!   containing `a`) lies inside `B.cidr`;
//! - `a` in an except `e` => `e` is a prefix containing `a`, so `p` lies inside `e`;
//! - `a` in no except => `p` (which contains `a`) lies inside none.
//!
//! Any extra prefixes keep this property, which the named-port host prefixes rely on (see
//! `CidrKey::named_ports`). A prefix that belongs to no block gets `IDENTITY_WORLD`: it must be in
//! the trie to shadow a shorter prefix, but no policy entry refers to it.
//!
//! The datapath stores IPv4 as `::ffff:a.b.c.d` in one trie with IPv6, so an IPv6 prefix that
//! covers `::ffff:0:0/96` (say `::/0`) would also match IPv4 addresses: when there is one, the
//! IPv4 `0.0.0.0/0` is inserted too (with the identity of its own blocks, WORLD if none), which
//! shadows it for every IPv4 address. IPv6 prefixes inside `::ffff:0:0/96` stand for IPv4
//! addresses in IPv6 form, which the datapath drops: they match no packet and are left out.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::{IpNet, Ipv4Net};
use npc_common::IDENTITY_WORLD;

use super::identity::Interner;
use crate::model::NamedPort;

/// A normalized ipBlock: host bits zeroed, excepts sorted, deduplicated, of the same family and
/// overlapping `cidr`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Block {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl Block {
    /// `None` for a block that can match no packet (an IPv4-mapped IPv6 prefix).
    pub fn new(cidr: &IpNet, except: &[IpNet]) -> Option<Block> {
        let cidr = cidr.trunc();
        if in_v4_mapped(&cidr) {
            return None;
        }
        let mut except: Vec<IpNet> = except
            .iter()
            .map(IpNet::trunc)
            .filter(|e| !in_v4_mapped(e) && (cidr.contains(e) || e.contains(&cidr)))
            .collect();
        except.sort_unstable();
        except.dedup();
        Some(Block { cidr, except })
    }

    pub fn contains_prefix(&self, p: &IpNet) -> bool {
        self.cidr.contains(p) && !self.except.iter().any(|e| e.contains(p))
    }

    pub fn contains_addr(&self, a: &IpAddr) -> bool {
        self.cidr.contains(a) && !self.except.iter().any(|e| e.contains(a))
    }
}

/// What a CIDR identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey {
    /// The blocks an address with this identity belongs to (sorted, never empty).
    pub blocks: Vec<Block>,
    /// Empty, except for the host prefix (/32, /128) of a pod address that lies in a block some
    /// egress rule uses with a named port: then the pod's named-port table, so that such a rule
    /// can resolve the name per address (see `rules`).
    pub named_ports: Vec<NamedPort>,
}

/// One CIDR identity a block belongs to.
#[derive(Clone, Copy, Debug)]
pub struct CidrTarget<'a> {
    pub identity: u32,
    /// The named-port table of a host-prefix identity (empty otherwise).
    pub named_ports: &'a [NamedPort],
}

pub struct CidrTable<'a> {
    /// The `cidrs` entries: (network address, prefix length in its family) -> identity.
    pub entries: BTreeMap<(IpAddr, u8), u32>,
    /// For each block (by index in the slice given to `compile_cidrs`): the CIDR identities
    /// whose set contains it, sorted by identity.
    pub by_block: Vec<Vec<CidrTarget<'a>>>,
}

/// The prefixes of `blocks` (sorted, distinct) and the pod host prefixes `hosts` (address and
/// that pod's named-port table), with CIDR identities numbered by `interner`.
pub fn compile_cidrs<'a>(
    blocks: &[Block],
    hosts: &[(IpAddr, &'a [NamedPort])],
    interner: &mut Interner<CidrKey>,
) -> CidrTable<'a> {
    let mut prefixes: BTreeMap<IpNet, &'a [NamedPort]> = BTreeMap::new();
    for b in blocks {
        prefixes.entry(b.cidr).or_insert(&[]);
        for e in &b.except {
            prefixes.entry(*e).or_insert(&[]);
        }
    }
    for (ip, table) in hosts {
        prefixes.insert(IpNet::from(*ip), table);
    }
    if prefixes.keys().any(covers_v4_mapped) {
        let all_v4 = IpNet::V4(Ipv4Net::default());
        prefixes.entry(all_v4).or_insert(&[]);
    }

    // The set of blocks of every prefix, and its key (`None`: no block, WORLD).
    let members: Vec<(IpNet, Vec<usize>, &'a [NamedPort])> = prefixes
        .into_iter()
        .map(|(p, table)| {
            let set = (0..blocks.len())
                .filter(|&i| blocks[i].contains_prefix(&p))
                .collect();
            (p, set, table)
        })
        .collect();
    let keys: Vec<Option<CidrKey>> = members
        .iter()
        .map(|(_, set, table)| {
            (!set.is_empty()).then(|| CidrKey {
                blocks: set.iter().map(|&i| blocks[i].clone()).collect(),
                named_ports: table.to_vec(),
            })
        })
        .collect();
    let refs: Vec<&CidrKey> = keys.iter().flatten().collect();
    let mut numbers = interner.assign(&refs).into_iter();

    let mut entries = BTreeMap::new();
    let mut by_block: Vec<Vec<CidrTarget<'a>>> = vec![Vec::new(); blocks.len()];
    for ((p, set, table), key) in members.iter().zip(&keys) {
        // An exhausted number space (16 million sets) falls back to WORLD: matches nothing.
        let identity = match key {
            Some(_) => numbers.next().flatten().unwrap_or(IDENTITY_WORLD),
            None => IDENTITY_WORLD,
        };
        entries.insert((p.network(), p.prefix_len()), identity);
        if identity != IDENTITY_WORLD {
            for &i in set {
                by_block[i].push(CidrTarget {
                    identity,
                    named_ports: table,
                });
            }
        }
    }
    for targets in &mut by_block {
        targets.sort_unstable_by_key(|t| t.identity);
        targets.dedup_by_key(|t| t.identity);
    }
    CidrTable { entries, by_block }
}

/// An IPv6 prefix inside `::ffff:0:0/96` (IPv4 addresses in IPv6 form).
fn in_v4_mapped(p: &IpNet) -> bool {
    match p {
        IpNet::V4(_) => false,
        IpNet::V6(n) => n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some(),
    }
}

/// An IPv6 prefix that contains `::ffff:0:0/96`.
fn covers_v4_mapped(p: &IpNet) -> bool {
    match p {
        IpNet::V4(_) => false,
        IpNet::V6(n) => n.prefix_len() <= 96 && n.contains(&Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()),
    }
}
