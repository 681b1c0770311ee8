//! The policy decision for a new (or re-checked) flow: resolve the remote address to identities,
//! then at most three policy lookups: its pod identity, its CIDR identity, and ANY.
use aya_ebpf::maps::lpm_trie::Key;
use npc_common::{
    CONFIG_ALLOW_HOST, CT_UNISOLATED, Config, Direction, EndpointInfo, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_NONE, IpBytes, POLICY_PREFIX_FULL, PolicyKey, RULE_HOST, RULE_NONE,
};

use crate::maps::{CIDRS, ENDPOINTS, POLICY};

pub struct Decision {
    pub allowed: bool,
    /// Cookie of the rule that allowed the flow.
    pub rule: u32,
    /// Conntrack flags to record with the flow.
    pub ct_flags: u16,
    /// What the remote resolved to (for deny events).
    pub remote_identity: u32,
    pub cidr_identity: u32,
}

#[inline(always)]
fn lookup(local: u32, remote: u32, dir: Direction, protocol: u8, port: u16) -> Option<u32> {
    let key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey::new(local, remote, dir, protocol, port),
    );
    POLICY.get(&key).map(|e| e.rule)
}

/// Decides a flow of `protocol` to destination `port` (0 for portless protocols) between the
/// local endpoint `ep` and `remote`, under `ep`'s policy for `dir`.
#[inline(always)]
pub fn decide(
    ep: &EndpointInfo,
    dir: Direction,
    remote: &IpBytes,
    protocol: u8,
    port: u16,
    cfg: &Config,
) -> Decision {
    let mut d = Decision {
        allowed: true,
        rule: RULE_NONE,
        ct_flags: 0,
        remote_identity: IDENTITY_NONE,
        cidr_identity: IDENTITY_NONE,
    };
    if !ep.isolated(dir) {
        d.ct_flags = CT_UNISOLATED;
        return d;
    }
    if let Some(r) = unsafe { ENDPOINTS.get(remote) } {
        d.remote_identity = r.identity;
    }
    if d.remote_identity == IDENTITY_HOST
        && dir == Direction::Ingress
        && cfg.flags & CONFIG_ALLOW_HOST != 0
    {
        d.rule = RULE_HOST;
        return d;
    }
    if d.remote_identity != IDENTITY_NONE
        && let Some(rule) = lookup(ep.identity, d.remote_identity, dir, protocol, port)
    {
        d.rule = rule;
        return d;
    }
    if let Some(c) = CIDRS.get(&Key::new(128, *remote)) {
        d.cidr_identity = c.identity;
        if let Some(rule) = lookup(ep.identity, c.identity, dir, protocol, port) {
            d.rule = rule;
            return d;
        }
    }
    if let Some(rule) = lookup(ep.identity, IDENTITY_ANY, dir, protocol, port) {
        d.rule = rule;
        return d;
    }
    d.allowed = false;
    d
}
