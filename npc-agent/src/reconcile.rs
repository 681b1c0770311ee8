//! The reconciler: writes the difference between the compiler's desired map contents and what
//! the maps hold, in an order that never opens a transient hole or a transient block:
//!
//! 1. new policy entries and CIDR prefixes (a new identity's allowances exist before anything
//!    refers to it);
//! 2. endpoints and pod interfaces: identities switched, isolation flags set or cleared;
//! 3. stale endpoints, interfaces, CIDR prefixes and policy entries removed;
//! 4. last, the policy generation of every endpoint whose verdicts may have changed is bumped,
//!    so its tracked flows are re-checked against the final state (bumping before step 3 would
//!    let a flow re-check against entries about to be removed, and keep it).
//!
//! The plan is computed without touching BPF (`plan`), then executed (`Reconciler::apply`).
use std::{
    collections::{BTreeMap, BTreeSet, hash_map::DefaultHasher},
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
};

use anyhow::Result;
use npc_common::{
    ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, ENDPOINT_LOCAL, EndpointInfo,
    INTERFACE_POD, InterfaceInfo, PolicyEntry, PolicyKey,
};

use crate::{compiler::Desired, dataplane::Maps};

/// What the maps hold (as far as the agent writes them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Realized {
    pub endpoints: BTreeMap<IpAddr, EndpointInfo>,
    pub interfaces: BTreeSet<u32>,
    pub cidrs: BTreeMap<(IpAddr, u8), u32>,
    /// Raw LPM entries: (prefix length, key) -> value.
    pub policy: BTreeMap<(u32, PolicyKey), PolicyEntry>,
}

impl Realized {
    /// Reads the maps' current contents (an agent adopting maps pinned by its predecessor).
    pub fn read(maps: &Maps) -> Result<Realized> {
        Ok(Realized {
            endpoints: maps.endpoint_entries()?.into_iter().collect(),
            interfaces: maps.interface_entries()?.into_iter().collect(),
            cidrs: maps.cidr_entries()?.into_iter().collect(),
            policy: maps.policy_entries()?.into_iter().collect(),
        })
    }
}

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    PolicyPut(u32, PolicyKey, PolicyEntry),
    CidrPut(IpAddr, u8, u32),
    EndpointPut(IpAddr, EndpointInfo),
    InterfacePut(u32),
    EndpointDel(IpAddr),
    InterfaceDel(u32),
    CidrDel(IpAddr, u8),
    PolicyDel(u32, PolicyKey),
}

/// Counts of what one reconciliation wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub writes: usize,
    pub deletes: usize,
    /// Endpoints whose policy generation was bumped.
    pub bumped: usize,
}

/// The desired contents in the maps' raw form.
fn desired_policy(desired: &Desired) -> BTreeMap<(u32, PolicyKey), PolicyEntry> {
    let mut out = BTreeMap::new();
    for (entry, &rule) in &desired.policy {
        for key in entry.ports.keys(entry.local, entry.remote, entry.direction) {
            // Several rules may cover one prefix: the smallest cookie wins, deterministically.
            out.entry((key.prefix_len(), key.data()))
                .and_modify(|e: &mut PolicyEntry| e.rule = e.rule.min(rule))
                .or_insert(PolicyEntry { rule, flags: 0 });
        }
    }
    out
}

/// A fingerprint of each local identity's policy entries (cookies aside: they change no
/// verdict).
fn fingerprints(policy: &BTreeMap<(u32, PolicyKey), PolicyEntry>) -> BTreeMap<u32, u64> {
    let mut hashers: BTreeMap<u32, DefaultHasher> = BTreeMap::new();
    for (prefix, key) in policy.keys() {
        let h = hashers.entry(key.local()).or_default();
        (prefix, key).hash(h);
    }
    hashers
        .into_iter()
        .map(|(id, h)| (id, h.finish()))
        .collect()
}

/// A fingerprint of how every address resolves to identities (endpoints and CIDR prefixes):
/// when it changes, any isolated endpoint's verdicts may change.
fn peer_view(
    endpoints: impl Iterator<Item = (IpAddr, u32)>,
    cidrs: &BTreeMap<(IpAddr, u8), u32>,
) -> u64 {
    // Streamed: no copy of the endpoints (10,000s of them) per sync.
    let mut h = DefaultHasher::new();
    for entry in endpoints {
        entry.hash(&mut h);
    }
    cidrs.hash(&mut h);
    h.finish()
}

fn isolated(flags: u32) -> bool {
    flags & (ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED) != 0
}

/// The ordered writes that turn `realized` into `desired`. `veths` maps local pod addresses to
/// their host veth (learned; missing: not yet known). `next_generation` hands out generations
/// (each write of a new generation gets a number never used before, so a conntrack entry of a
/// recycled address can never match it by chance). `recheck_all` bumps the generation of every
/// local endpoint (the datapath's verdict-changing switches changed).
pub fn plan(
    realized: &Realized,
    desired: &Desired,
    veths: &BTreeMap<IpAddr, u32>,
    next_generation: &mut u32,
    recheck_all: bool,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let want_policy = desired_policy(desired);

    // 1. Allowances first.
    for (&(prefix, key), &entry) in &want_policy {
        if realized.policy.get(&(prefix, key)) != Some(&entry) {
            ops.push(Op::PolicyPut(prefix, key, entry));
        }
    }
    for (&(ip, len), &id) in &desired.cidrs {
        if realized.cidrs.get(&(ip, len)) != Some(&id) {
            ops.push(Op::CidrPut(ip, len, id));
        }
    }

    // 2. Endpoints (generation unchanged for now) and interfaces.
    let old_prints = fingerprints(&realized.policy);
    let new_prints = fingerprints(&want_policy);
    let old_view = peer_view(
        realized.endpoints.iter().map(|(ip, e)| (*ip, e.identity)),
        &realized.cidrs,
    );
    let new_view = peer_view(
        desired.endpoints.iter().map(|(ip, e)| (*ip, e.identity)),
        &desired.cidrs,
    );
    let mut bumps = Vec::new();
    for (&ip, want) in &desired.endpoints {
        let local = want.flags & ENDPOINT_LOCAL != 0;
        let ifindex = if local {
            veths.get(&ip).copied().unwrap_or(0)
        } else {
            0
        };
        let old = realized.endpoints.get(&ip);
        let generation = match old {
            Some(old) => old.generation,
            None => {
                *next_generation += 1;
                *next_generation
            }
        };
        let info = EndpointInfo {
            identity: want.identity,
            flags: want.flags,
            ifindex,
            generation,
        };
        if old != Some(&info) {
            ops.push(Op::EndpointPut(ip, info));
        }
        if let Some(old) = old
            && local
        {
            let changed = recheck_all
                || old.identity != want.identity
                || old.flags != want.flags
                || old_prints.get(&old.identity) != new_prints.get(&want.identity)
                || (old_view != new_view && (isolated(old.flags) || isolated(want.flags)));
            if changed {
                bumps.push((ip, info));
            }
        }
    }
    let want_interfaces: BTreeSet<u32> = desired
        .endpoints
        .iter()
        .filter(|(_, e)| e.flags & ENDPOINT_LOCAL != 0)
        .filter_map(|(ip, _)| veths.get(ip).copied())
        .collect();
    for &ifindex in want_interfaces.difference(&realized.interfaces) {
        ops.push(Op::InterfacePut(ifindex));
    }

    // 3. Removals.
    for &ip in realized.endpoints.keys() {
        if !desired.endpoints.contains_key(&ip) {
            ops.push(Op::EndpointDel(ip));
        }
    }
    for &ifindex in realized.interfaces.difference(&want_interfaces) {
        ops.push(Op::InterfaceDel(ifindex));
    }
    for &(ip, len) in realized.cidrs.keys() {
        if !desired.cidrs.contains_key(&(ip, len)) {
            ops.push(Op::CidrDel(ip, len));
        }
    }
    for &(prefix, key) in realized.policy.keys() {
        if !want_policy.contains_key(&(prefix, key)) {
            ops.push(Op::PolicyDel(prefix, key));
        }
    }

    // 4. Generations, against the final state.
    for (ip, mut info) in bumps {
        *next_generation += 1;
        info.generation = *next_generation;
        ops.push(Op::EndpointPut(ip, info));
    }
    ops
}

/// Applies desired states to the maps, remembering what it wrote.
pub struct Reconciler {
    realized: Realized,
    next_generation: u32,
    /// The next apply re-checks every local endpoint's tracked flows.
    recheck_all: bool,
}

impl Reconciler {
    /// Starts from the maps' current contents (empty on a first start, a predecessor's after a
    /// restart: only the difference is then written).
    pub fn adopt(maps: &Maps) -> Result<Reconciler> {
        let realized = Realized::read(maps)?;
        let next_generation = realized
            .endpoints
            .values()
            .map(|e| e.generation)
            .max()
            .unwrap_or(0);
        Ok(Reconciler {
            realized,
            next_generation,
            recheck_all: false,
        })
    }

    /// Makes the next successful apply bump every local endpoint's generation, so flows tracked
    /// under other datapath switches (e.g. audit mode) are checked again.
    pub fn recheck_all(&mut self) {
        self.recheck_all = true;
    }

    pub fn realized(&self) -> &Realized {
        &self.realized
    }

    /// Writes what differs. On an error the realized view is re-read, so the next call retries
    /// exactly what is still missing.
    pub fn apply(
        &mut self,
        maps: &mut Maps,
        desired: &Desired,
        veths: &BTreeMap<IpAddr, u32>,
    ) -> Result<Stats> {
        let ops = plan(
            &self.realized,
            desired,
            veths,
            &mut self.next_generation,
            self.recheck_all,
        );
        let mut stats = Stats::default();
        for op in &ops {
            // A known endpoint written with another generation: its flows are re-checked.
            if let Op::EndpointPut(ip, info) = op
                && self
                    .realized
                    .endpoints
                    .get(ip)
                    .is_some_and(|e| e.generation != info.generation)
            {
                stats.bumped += 1;
            }
            if let Err(e) = execute(maps, &mut self.realized, *op) {
                self.realized = Realized::read(maps)?;
                return Err(e);
            }
            match op {
                Op::EndpointDel(_) | Op::InterfaceDel(_) | Op::CidrDel(..) | Op::PolicyDel(..) => {
                    stats.deletes += 1
                }
                _ => stats.writes += 1,
            }
        }
        self.recheck_all = false;
        Ok(stats)
    }
}

fn execute(maps: &mut Maps, realized: &mut Realized, op: Op) -> Result<()> {
    match op {
        Op::PolicyPut(prefix, key, entry) => maps.insert_policy_raw(prefix, key, entry)?,
        Op::CidrPut(ip, len, id) => maps.set_cidr(ip, len, id)?,
        Op::EndpointPut(ip, info) => maps.set_endpoint(ip, info)?,
        Op::InterfacePut(ifindex) => maps.set_interface(
            ifindex,
            InterfaceInfo {
                flags: INTERFACE_POD,
                _pad: 0,
            },
        )?,
        Op::EndpointDel(ip) => maps.remove_endpoint(ip)?,
        Op::InterfaceDel(ifindex) => maps.remove_interface(ifindex)?,
        Op::CidrDel(ip, len) => maps.remove_cidr(ip, len)?,
        Op::PolicyDel(prefix, key) => maps.remove_policy_raw(prefix, key)?,
    }
    realized.record(op);
    Ok(())
}

impl Realized {
    /// Notes a write that reached the maps.
    pub fn record(&mut self, op: Op) {
        match op {
            Op::PolicyPut(prefix, key, entry) => {
                self.policy.insert((prefix, key), entry);
            }
            Op::CidrPut(ip, len, id) => {
                self.cidrs.insert((ip, len), id);
            }
            Op::EndpointPut(ip, info) => {
                self.endpoints.insert(ip, info);
            }
            Op::InterfacePut(ifindex) => {
                self.interfaces.insert(ifindex);
            }
            Op::EndpointDel(ip) => {
                self.endpoints.remove(&ip);
            }
            Op::InterfaceDel(ifindex) => {
                self.interfaces.remove(&ifindex);
            }
            Op::CidrDel(ip, len) => {
                self.cidrs.remove(&(ip, len));
            }
            Op::PolicyDel(prefix, key) => {
                self.policy.remove(&(prefix, key));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use npc_common::{Direction, IDENTITY_ANY, ipproto};

    use super::*;
    use crate::{
        compiler::{DesiredEndpoint, PolicyEntryKey},
        dataplane::PortMatch,
    };

    const A: u32 = 256;
    const B: u32 = 257;
    const B2: u32 = 258;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn local(identity: u32, flags: u32) -> DesiredEndpoint {
        DesiredEndpoint {
            identity,
            flags: ENDPOINT_LOCAL | flags,
        }
    }

    fn allow_80(desired: &mut Desired, local: u32, remote: u32) {
        let key = PolicyEntryKey {
            local,
            remote,
            direction: Direction::Ingress,
            ports: PortMatch::Range {
                protocol: ipproto::TCP,
                port: 80,
                end_port: 80,
            },
        };
        desired.policy.insert(key, 1);
    }

    /// Two local pods: a (10.0.0.1) and b (10.0.0.2).
    fn base() -> Desired {
        let mut d = Desired::default();
        d.endpoints.insert(ip("10.0.0.1"), local(A, 0));
        d.endpoints.insert(ip("10.0.0.2"), local(B, 0));
        d
    }

    /// `base` with b ingress-isolated (and no allowances yet).
    fn isolated_b() -> Desired {
        let mut d = base();
        d.endpoints
            .insert(ip("10.0.0.2"), local(B, ENDPOINT_INGRESS_ISOLATED));
        d
    }

    /// Plans `desired` from `realized`, applies the plan, and returns it.
    fn step(realized: &mut Realized, desired: &Desired, next: &mut u32) -> Vec<Op> {
        let veths = BTreeMap::from([(ip("10.0.0.1"), 11), (ip("10.0.0.2"), 12)]);
        let ops = plan(realized, desired, &veths, next, false);
        for op in &ops {
            realized.record(*op);
        }
        ops
    }

    fn position(ops: &[Op], f: impl Fn(&Op) -> bool) -> usize {
        ops.iter().position(f).expect("op present")
    }

    fn is_policy_put(op: &Op) -> bool {
        matches!(op, Op::PolicyPut(..))
    }

    fn is_policy_del(op: &Op) -> bool {
        matches!(op, Op::PolicyDel(..))
    }

    fn sets_flags_of(ip_: IpAddr, flags: u32) -> impl Fn(&Op) -> bool {
        move |op| matches!(op, Op::EndpointPut(i, e) if *i == ip_ && e.flags == flags)
    }

    #[test]
    fn first_apply_writes_everything_then_nothing() {
        let (mut r, mut next) = (Realized::default(), 0);
        let ops = step(&mut r, &base(), &mut next);
        assert_eq!(ops.len(), 4, "2 endpoints + 2 interfaces: {ops:?}");
        assert_eq!(r.interfaces, BTreeSet::from([11, 12]));
        assert_eq!(r.endpoints[&ip("10.0.0.1")].ifindex, 11, "learned veth");
        assert!(step(&mut r, &base(), &mut next).is_empty(), "idempotent");
    }

    #[test]
    fn a_new_policy_allows_before_it_isolates() {
        let (mut r, mut next) = (Realized::default(), 0);
        step(&mut r, &base(), &mut next);
        let mut d = isolated_b();
        allow_80(&mut d, B, A);
        let ops = step(&mut r, &d, &mut next);
        let put = position(&ops, is_policy_put);
        let isolate = position(
            &ops,
            sets_flags_of(ip("10.0.0.2"), ENDPOINT_LOCAL | ENDPOINT_INGRESS_ISOLATED),
        );
        assert!(put < isolate, "allow entry before isolation flag: {ops:?}");
        let bumped: Vec<_> = ops
            .iter()
            .filter(|op| matches!(op, Op::EndpointPut(_, e) if e.generation > 2))
            .collect();
        assert_eq!(bumped.len(), 1, "only b's generation is bumped: {ops:?}");
        assert!(
            matches!(ops.last(), Some(Op::EndpointPut(i, _)) if *i == ip("10.0.0.2")),
            "bump last"
        );
    }

    #[test]
    fn a_deleted_policy_unisolates_before_it_removes_allowances() {
        let (mut r, mut next) = (Realized::default(), 0);
        let mut d = isolated_b();
        allow_80(&mut d, B, A);
        step(&mut r, &d, &mut next);
        let ops = step(&mut r, &base(), &mut next);
        let unisolate = position(&ops, sets_flags_of(ip("10.0.0.2"), ENDPOINT_LOCAL));
        let del = position(&ops, is_policy_del);
        assert!(
            unisolate < del,
            "isolation cleared before entries removed: {ops:?}"
        );
    }

    #[test]
    fn a_relabelled_pod_gets_its_new_allowances_before_its_new_identity() {
        let (mut r, mut next) = (Realized::default(), 0);
        let mut d = isolated_b();
        allow_80(&mut d, B, IDENTITY_ANY);
        step(&mut r, &d, &mut next);
        let mut d2 = base();
        d2.endpoints
            .insert(ip("10.0.0.2"), local(B2, ENDPOINT_INGRESS_ISOLATED));
        allow_80(&mut d2, B2, IDENTITY_ANY);
        let ops = step(&mut r, &d2, &mut next);
        let put = position(
            &ops,
            |op| matches!(op, Op::PolicyPut(_, k, _) if k.local() == B2),
        );
        let switch = position(
            &ops,
            |op| matches!(op, Op::EndpointPut(_, e) if e.identity == B2),
        );
        let del = position(
            &ops,
            |op| matches!(op, Op::PolicyDel(_, k) if k.local() == B),
        );
        assert!(
            put < switch && switch < del,
            "new entries, switch, old entries gone: {ops:?}"
        );
    }

    #[test]
    fn generations_are_bumped_after_removals_and_never_reused() {
        let (mut r, mut next) = (Realized::default(), 0);
        let mut d = isolated_b();
        allow_80(&mut d, B, A);
        step(&mut r, &d, &mut next);
        let before = r.endpoints[&ip("10.0.0.2")].generation;
        let mut d2 = d.clone();
        d2.policy.clear();
        let ops = step(&mut r, &d2, &mut next);
        let del = position(&ops, is_policy_del);
        let bump = position(
            &ops,
            |op| matches!(op, Op::EndpointPut(_, e) if e.generation != before),
        );
        assert!(del < bump, "bump after the removal it reflects: {ops:?}");
        let after = r.endpoints[&ip("10.0.0.2")].generation;
        assert!(
            after > before && after > r.endpoints[&ip("10.0.0.1")].generation,
            "fresh number"
        );
        assert_eq!(
            r.endpoints[&ip("10.0.0.1")].generation,
            1,
            "a (not isolated, unchanged) kept its"
        );
    }

    #[test]
    fn a_peer_relabel_bumps_isolated_endpoints_only() {
        let (mut r, mut next) = (Realized::default(), 0);
        let mut d = isolated_b();
        d.endpoints.insert(
            ip("10.1.0.9"),
            DesiredEndpoint {
                identity: 300,
                flags: 0,
            },
        );
        allow_80(&mut d, B, 300);
        step(&mut r, &d, &mut next);
        let (ga, gb) = (
            r.endpoints[&ip("10.0.0.1")].generation,
            r.endpoints[&ip("10.0.0.2")].generation,
        );
        d.endpoints.insert(
            ip("10.1.0.9"),
            DesiredEndpoint {
                identity: 301,
                flags: 0,
            },
        );
        step(&mut r, &d, &mut next);
        assert_eq!(
            r.endpoints[&ip("10.0.0.1")].generation,
            ga,
            "unisolated a untouched"
        );
        assert_ne!(
            r.endpoints[&ip("10.0.0.2")].generation,
            gb,
            "isolated b re-checks its flows"
        );
    }
}
