//! The per-packet pipeline shared by both attach points.
//!
//! 1. Parse; malformed packets are dropped with their own reason.
//! 2. Find the local endpoint (source for `from_pod`, destination for `to_pod`); check the source
//!    is the pod's own.
//! 3. Conntrack hit of the current policy generation: pass (the hot path).
//! 4. Otherwise decide by policy; track allowed flows, count and report denied ones.
use aya_ebpf::{EbpfContext, bindings::__sk_buff, programs::TcContext};
use npc_common::{
    BLOCKED_AUDIT, CONFIG_AUDIT, CONFIG_GRANDFATHER, CONFIG_UNKNOWN_ALLOW, CT_AUDIT, CT_UNISOLATED,
    Config, Counter, CtEntry, DenyEvent, Direction, DropReason, ENDPOINT_AUDIT, EVENT_AUDIT,
    EndpointInfo, FragEntry, FragKey, IpBytes, verdict,
};

use crate::{
    conntrack::{self, is_tcp_open, now_ns},
    counters::{count, count_allowed, count_blocked, count_drop},
    events,
    maps::{CONNTRACK, ENDPOINTS, FRAGMENTS, INTERFACES, config},
    parse::{Fragment, Packet, Parsed, parse},
    policy::{Decision, decide},
};

#[inline(always)]
pub fn process(ctx: &TcContext, dir: Direction) -> i32 {
    match try_process(ctx, dir) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn drop(reason: DropReason, dir: Direction, protocol: u8) -> i32 {
    count_drop(reason, dir, protocol);
    verdict::DROP
}

/// The packet's flow as the local endpoint sees it.
struct Flow {
    local: IpBytes,
    remote: IpBytes,
    local_port: u16,
    remote_port: u16,
}

fn try_process(ctx: &TcContext, dir: Direction) -> Result<i32, i32> {
    let mut pkt = Packet::empty();
    match parse(ctx, &mut pkt) {
        Ok(Parsed::Ip) => {}
        Ok(Parsed::Arp) => return Ok(verdict::PASS),
        Err(reason) => return Err(drop(reason, dir, 0)),
    }
    if pkt.link_local_control {
        return Ok(verdict::PASS);
    }
    let flow = match dir {
        Direction::Egress => Flow {
            local: pkt.src,
            remote: pkt.dst,
            local_port: pkt.sport,
            remote_port: pkt.dport,
        },
        Direction::Ingress => Flow {
            local: pkt.dst,
            remote: pkt.src,
            local_port: pkt.dport,
            remote_port: pkt.sport,
        },
    };
    let ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };

    let ep = match unsafe { ENDPOINTS.get(&flow.local) } {
        Some(ep) if ep.is_local() => *ep,
        other => return unknown_endpoint(other.is_some(), dir, ifindex, pkt.protocol),
    };
    // Anti-spoofing: a pod may only send from its own addresses, through its own veth.
    if dir == Direction::Egress && ep.ifindex != 0 && ep.ifindex != ifindex {
        return Err(drop(DropReason::SpoofedSource, dir, pkt.protocol));
    }

    if pkt.fragment == Fragment::Later {
        return later_fragment(&pkt, dir);
    }

    if pkt.is_error {
        let q = &pkt.quoted;
        // An ICMP error quotes a packet that travelled the other way: for an error delivered to
        // the pod, the quoted source is the pod; for one the pod sends, the quoted destination.
        let (q_local, q_remote, q_lport, q_rport) = match dir {
            Direction::Ingress => (q.src, q.dst, q.sport, q.dport),
            Direction::Egress => (q.dst, q.src, q.dport, q.sport),
        };
        if q_local == flow.local {
            let key = conntrack::key(q_local, q_remote, q_lport, q_rport, q.protocol);
            if let Some(e) = unsafe { CONNTRACK.get(&key) }
                && !e.expired(q.protocol, now_ns())
            {
                count(Counter::IcmpRelated);
                return Ok(verdict::PASS);
            }
        }
        // Not related to a tracked flow: decided like any other ICMP packet, never tracked.
        return new_flow(ctx, &pkt, &flow, &ep, dir, ifindex, false);
    }

    let ct_key = conntrack::key(
        flow.local,
        flow.remote,
        flow.local_port,
        flow.remote_port,
        pkt.protocol,
    );
    if let Some(entry) = CONNTRACK.get_ptr_mut(&ct_key) {
        let entry = unsafe { &mut *entry };
        let now = now_ns();
        // A SYN on a closed connection, or an expired entry, starts over as a new flow.
        if !entry.expired(pkt.protocol, now) && !(is_tcp_open(&pkt) && entry.closing()) {
            if entry.generation == ep.generation {
                conntrack::touch(entry, &pkt, dir, now);
                record_fragment(&pkt, true, 0);
                return Ok(verdict::PASS);
            }
            return recheck(&pkt, &flow, &ep, entry, &ct_key, dir, ifindex, now);
        }
    }
    new_flow(ctx, &pkt, &flow, &ep, dir, ifindex, true)
}

/// A packet whose local address is no local endpoint.
#[inline(always)]
fn unknown_endpoint(
    known_remote: bool,
    dir: Direction,
    ifindex: u32,
    protocol: u8,
) -> Result<i32, i32> {
    // From a pod veth the agent knows, or with another node's pod address: spoofed.
    if dir == Direction::Egress && (known_remote || unsafe { INTERFACES.get(&ifindex) }.is_some()) {
        return Err(drop(DropReason::SpoofedSource, dir, protocol));
    }
    if config().flags & CONFIG_UNKNOWN_ALLOW != 0 {
        count(Counter::UnknownEndpointPassed);
        return Ok(verdict::PASS);
    }
    Err(drop(DropReason::UnknownEndpoint, dir, protocol))
}

/// A non-first fragment: the first fragment's verdict decides.
#[inline(always)]
fn later_fragment(pkt: &Packet, dir: Direction) -> Result<i32, i32> {
    match unsafe { FRAGMENTS.get(&frag_key(pkt)) } {
        Some(f) if f.allowed != 0 => {
            count(Counter::FragmentsPassed);
            Ok(verdict::PASS)
        }
        Some(_) => Err(drop(DropReason::FragmentDenied, dir, pkt.protocol)),
        None => Err(drop(DropReason::FragmentNoRecord, dir, pkt.protocol)),
    }
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.frag_id,
        protocol: pkt.protocol,
        _pad: [0; 3],
    }
}

/// Remembers a first fragment's verdict for the rest of its datagram.
#[inline(always)]
fn record_fragment(pkt: &Packet, allowed: bool, reason: u32) {
    if pkt.fragment == Fragment::First {
        let entry = FragEntry {
            allowed: allowed as u32,
            reason,
        };
        let _ = FRAGMENTS.insert(&frag_key(pkt), &entry, 0);
    }
}

#[inline(always)]
fn audited(ep: &EndpointInfo, cfg: &Config) -> bool {
    ep.flags & ENDPOINT_AUDIT != 0 || cfg.flags & CONFIG_AUDIT != 0
}

/// The destination port of a flow's first packet, as policy names it (0 if the protocol has none).
#[inline(always)]
fn policy_port(pkt: &Packet, flow: &Flow, opener: Direction) -> u16 {
    if !pkt.has_ports() {
        0
    } else if opener == Direction::Egress {
        flow.remote_port
    } else {
        flow.local_port
    }
}

/// A tracked flow whose endpoint's policy changed since it was last checked: decide it again
/// under the direction that opened it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn recheck(
    pkt: &Packet,
    flow: &Flow,
    ep: &EndpointInfo,
    entry: &mut CtEntry,
    key: &npc_common::CtKey,
    dir: Direction,
    ifindex: u32,
    now: u64,
) -> Result<i32, i32> {
    let cfg = config();
    let opener = if entry.opener == Direction::Egress as u8 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    let port = policy_port(pkt, flow, opener);
    let d = decide(ep, opener, &flow.remote, pkt.protocol, port, &cfg);
    if d.allowed || cfg.flags & CONFIG_GRANDFATHER != 0 || audited(ep, &cfg) {
        if d.allowed {
            entry.rule = d.rule;
            entry.flags = (entry.flags & !(CT_UNISOLATED | CT_AUDIT)) | d.ct_flags;
            count(Counter::Rechecked);
        } else if cfg.flags & CONFIG_GRANDFATHER == 0 {
            entry.flags |= CT_AUDIT;
            count(Counter::AuditWouldBlock);
            report(
                pkt,
                flow,
                ep,
                &d,
                opener,
                port,
                ifindex,
                now,
                &cfg,
                DropReason::PolicyRevoked,
                true,
            );
        }
        entry.generation = ep.generation;
        conntrack::touch(entry, pkt, dir, now);
        record_fragment(pkt, true, 0);
        return Ok(verdict::PASS);
    }
    let _ = CONNTRACK.remove(key);
    report(
        pkt,
        flow,
        ep,
        &d,
        opener,
        port,
        ifindex,
        now,
        &cfg,
        DropReason::PolicyRevoked,
        false,
    );
    record_fragment(pkt, false, DropReason::PolicyRevoked as u32);
    Err(drop(DropReason::PolicyRevoked, dir, pkt.protocol))
}

/// A packet of no tracked flow: policy decides; allowed flows are tracked (`track`), denied ones
/// are counted and reported.
#[inline(always)]
fn new_flow(
    _ctx: &TcContext,
    pkt: &Packet,
    flow: &Flow,
    ep: &EndpointInfo,
    dir: Direction,
    ifindex: u32,
    track: bool,
) -> Result<i32, i32> {
    let cfg = config();
    let port = policy_port(pkt, flow, dir);
    let d = decide(ep, dir, &flow.remote, pkt.protocol, port, &cfg);
    let now = now_ns();
    if d.allowed || audited(ep, &cfg) {
        let mut ct_flags = d.ct_flags;
        if d.allowed {
            count_allowed(dir, pkt.protocol);
        } else {
            ct_flags |= CT_AUDIT;
            count(Counter::AuditWouldBlock);
            count_blocked(dir, pkt.protocol, port, BLOCKED_AUDIT);
            report(
                pkt,
                flow,
                ep,
                &d,
                dir,
                port,
                ifindex,
                now,
                &cfg,
                DropReason::PolicyDenied,
                true,
            );
        }
        if track {
            let key = conntrack::key(
                flow.local,
                flow.remote,
                flow.local_port,
                flow.remote_port,
                pkt.protocol,
            );
            if !conntrack::create(&key, pkt, dir, ep.generation, d.rule, ct_flags, now) {
                count(Counter::CtInsertFailed);
            }
        }
        record_fragment(pkt, true, 0);
        return Ok(verdict::PASS);
    }
    count_blocked(dir, pkt.protocol, port, 0);
    report(
        pkt,
        flow,
        ep,
        &d,
        dir,
        port,
        ifindex,
        now,
        &cfg,
        DropReason::PolicyDenied,
        false,
    );
    record_fragment(pkt, false, DropReason::PolicyDenied as u32);
    Err(drop(DropReason::PolicyDenied, dir, pkt.protocol))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report(
    pkt: &Packet,
    flow: &Flow,
    ep: &EndpointInfo,
    d: &Decision,
    dir: Direction,
    _port: u16,
    ifindex: u32,
    now: u64,
    cfg: &Config,
    reason: DropReason,
    audit: bool,
) {
    events::emit(cfg, now, |e: &mut DenyEvent| {
        e.timestamp_ns = now;
        e.local = flow.local;
        e.remote = flow.remote;
        e.local_port = flow.local_port;
        e.remote_port = flow.remote_port;
        e.local_identity = ep.identity;
        e.remote_identity = d.remote_identity;
        e.remote_cidr_identity = d.cidr_identity;
        e.ifindex = ifindex;
        e.protocol = pkt.protocol;
        e.direction = dir as u8;
        e.reason = reason as u8;
        e.flags = if audit { EVENT_AUDIT } else { 0 };
    });
}
