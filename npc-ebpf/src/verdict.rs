//! The per-packet pipeline shared by both attach points.
//!
//! 1. Parse; malformed packets are dropped with their own reason.
//! 2. Find the local endpoint (source for `from_pod`, destination for `to_pod`); check the source
//!    is the pod's own.
//! 3. Conntrack hit of the current policy generation: pass (the hot path).
//! 4. Otherwise decide by policy; track allowed flows; drop denied ones, counting and reporting
//!    each denied connection once (not each of its retransmitted packets).
//!
//! The BPF stack is 512 bytes for the whole call chain, so the stages after parsing are separate
//! BPF functions (`#[inline(never)]`) that share one `Flow` through a pointer.
use aya_ebpf::{EbpfContext, bindings::__sk_buff, programs::TcContext};
use npc_common::{
    BLOCKED_AUDIT, CONFIG_AUDIT, CONFIG_GRANDFATHER, CONFIG_UNKNOWN_ALLOW, CT_AUDIT, CT_UNISOLATED,
    Config, Counter, CtEntry, CtKey, DenyEvent, Direction, DropReason, ENDPOINT_AUDIT, EVENT_AUDIT,
    EndpointInfo, FragEntry, FragKey, IpBytes, verdict,
};

use crate::{
    conntrack::{self, is_tcp_open, now_ns},
    counters::{count, count_allowed, count_blocked, count_drop},
    denied, events,
    maps::{CONNTRACK, ENDPOINTS, FRAGMENTS, INTERFACES, config},
    parse::{Fragment, Packet, Parsed, Quoted, parse, parse_quoted},
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

/// A packet and its flow as the local endpoint sees it.
struct Flow<'a> {
    pkt: &'a Packet,
    dir: Direction,
    ifindex: u32,
    /// The local endpoint, in the map (no copy).
    ep: &'a EndpointInfo,
}

impl Flow<'_> {
    /// The local endpoint's address: the source of what a pod sends, the destination of what it
    /// receives.
    #[inline(always)]
    fn local(&self) -> &IpBytes {
        if self.dir == Direction::Egress {
            &self.pkt.src
        } else {
            &self.pkt.dst
        }
    }

    #[inline(always)]
    fn remote(&self) -> &IpBytes {
        if self.dir == Direction::Egress {
            &self.pkt.dst
        } else {
            &self.pkt.src
        }
    }

    #[inline(always)]
    fn local_port(&self) -> u16 {
        if self.dir == Direction::Egress {
            self.pkt.sport
        } else {
            self.pkt.dport
        }
    }

    #[inline(always)]
    fn remote_port(&self) -> u16 {
        if self.dir == Direction::Egress {
            self.pkt.dport
        } else {
            self.pkt.sport
        }
    }

    #[inline(always)]
    fn ct_key(&self) -> CtKey {
        CtKey::new(
            *self.local(),
            *self.remote(),
            self.local_port(),
            self.remote_port(),
            self.pkt.protocol,
        )
    }

    /// The destination port of the flow's first packet in direction `opener`, as policy names
    /// it (0 if the protocol has none).
    #[inline(always)]
    fn policy_port(&self, opener: Direction) -> u16 {
        if !self.pkt.has_ports() {
            0
        } else if opener == Direction::Egress {
            self.remote_port()
        } else {
            self.local_port()
        }
    }

    #[inline(always)]
    fn audited(&self, cfg: &Config) -> bool {
        self.ep.flags & ENDPOINT_AUDIT != 0 || cfg.flags & CONFIG_AUDIT != 0
    }
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
    let ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    let local = if dir == Direction::Egress {
        &pkt.src
    } else {
        &pkt.dst
    };
    let f = match unsafe { ENDPOINTS.get(local) } {
        Some(ep) if ep.is_local() => Flow {
            pkt: &pkt,
            dir,
            ifindex,
            ep,
        },
        other => return unknown_endpoint(other.is_some(), &pkt, dir, ifindex),
    };
    // Anti-spoofing: a pod may only send from its own addresses, through its own veth.
    if dir == Direction::Egress && f.ep.ifindex != 0 && f.ep.ifindex != f.ifindex {
        return Err(drop(DropReason::SpoofedSource, dir, f.pkt.protocol));
    }
    if f.pkt.fragment == Fragment::Later {
        return later_fragment(f.pkt, dir);
    }
    if f.pkt.is_error {
        if related_icmp_error(ctx, &f) {
            count(Counter::IcmpRelated);
            return Ok(verdict::PASS);
        }
        // Not related to a tracked flow: decided like any ICMP packet, and never tracked.
        return Ok(new_flow(&f, false));
    }

    if let Some(entry) = CONNTRACK.get_ptr_mut(&f.ct_key()) {
        let entry = unsafe { &mut *entry };
        let now = now_ns();
        // A SYN on a closed connection, or an expired entry, starts over as a new flow.
        if !entry.expired(f.pkt.protocol, now) && !(is_tcp_open(f.pkt) && entry.closing()) {
            if entry.generation == f.ep.generation {
                conntrack::touch(entry, f.pkt, dir, now);
                record_fragment(f.pkt, true, 0);
                return Ok(verdict::PASS);
            }
            return Ok(recheck(&f, entry));
        }
    }
    Ok(new_flow(&f, true))
}

/// A packet whose local address is no local endpoint.
#[inline(always)]
fn unknown_endpoint(
    known_remote: bool,
    pkt: &Packet,
    dir: Direction,
    ifindex: u32,
) -> Result<i32, i32> {
    // From a pod veth the agent knows, or with another node's pod address: spoofed.
    if dir == Direction::Egress && (known_remote || unsafe { INTERFACES.get(&ifindex) }.is_some()) {
        return Err(drop(DropReason::SpoofedSource, dir, pkt.protocol));
    }
    if config().flags & CONFIG_UNKNOWN_ALLOW != 0 {
        count(Counter::UnknownEndpointPassed);
        return Ok(verdict::PASS);
    }
    Err(drop(DropReason::UnknownEndpoint, dir, pkt.protocol))
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
    FragKey::new(pkt.src, pkt.dst, pkt.frag_id, pkt.frag_protocol)
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

/// Whether an ICMP error quotes a tracked flow of the local endpoint (the quoted packet
/// travelled the other way: for an error delivered to the pod the quoted source is the pod, for
/// one the pod sends the quoted destination).
#[inline(never)]
fn related_icmp_error(ctx: &TcContext, f: &Flow) -> bool {
    let mut q = Quoted {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        protocol: 0,
    };
    if parse_quoted(ctx, f.pkt, &mut q).is_err() {
        return false;
    }
    let (q_local, q_remote, q_lport, q_rport) = match f.dir {
        Direction::Ingress => (&q.src, &q.dst, q.sport, q.dport),
        Direction::Egress => (&q.dst, &q.src, q.dport, q.sport),
    };
    if q_local == f.local() {
        let key = CtKey::new(*q_local, *q_remote, q_lport, q_rport, q.protocol);
        if let Some(e) = unsafe { CONNTRACK.get(&key) } {
            return !e.expired(q.protocol, now_ns());
        }
    }
    false
}

/// A tracked flow whose endpoint's policy changed since it was last checked: decide it again
/// under the direction that opened it.
#[inline(never)]
fn recheck(f: &Flow, entry: &mut CtEntry) -> i32 {
    let cfg = config();
    let opener = if entry.opener == Direction::Egress as u8 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    let port = f.policy_port(opener);
    let d = decide(f.ep, opener, f.remote(), f.pkt.protocol, port, &cfg);
    let now = now_ns();
    let grandfather = cfg.flags & CONFIG_GRANDFATHER != 0;
    if d.allowed || grandfather || f.audited(&cfg) {
        if d.allowed {
            entry.rule = d.rule;
            entry.flags = (entry.flags & !(CT_UNISOLATED | CT_AUDIT)) | d.ct_flags;
            count(Counter::Rechecked);
        } else if !grandfather {
            entry.flags |= CT_AUDIT;
            count(Counter::AuditWouldBlock);
            report(f, &d, opener, now, &cfg, DropReason::PolicyRevoked, true);
        }
        entry.generation = f.ep.generation;
        conntrack::touch(entry, f.pkt, f.dir, now);
        record_fragment(f.pkt, true, 0);
        return verdict::PASS;
    }
    let key = f.ct_key();
    let _ = CONNTRACK.remove(&key);
    // The revoked connection counts as one blocked connection, under the direction and port
    // whose policy admitted it. Its following packets arrive untracked and are denied by
    // `new_flow`: the `denied` entry makes them repeats of this one, not new connections.
    if denied::first_denial(&key, f.pkt, f.ep.generation, now, true) {
        count_blocked(opener, f.pkt.protocol, port, 0);
        report(f, &d, opener, now, &cfg, DropReason::PolicyRevoked, false);
    }
    record_fragment(f.pkt, false, DropReason::PolicyRevoked as u32);
    drop(DropReason::PolicyRevoked, f.dir, f.pkt.protocol)
}

/// A packet of no tracked flow: policy decides; allowed flows are tracked (`track`), denied ones
/// are counted and reported.
#[inline(never)]
fn new_flow(f: &Flow, track: bool) -> i32 {
    let cfg = config();
    let port = f.policy_port(f.dir);
    let d = decide(f.ep, f.dir, f.remote(), f.pkt.protocol, port, &cfg);
    let now = now_ns();
    if d.allowed || f.audited(&cfg) {
        let mut ct_flags = d.ct_flags;
        if d.allowed {
            count_allowed(f.dir, f.pkt.protocol);
        } else {
            ct_flags |= CT_AUDIT;
            count(Counter::AuditWouldBlock);
            count_blocked(f.dir, f.pkt.protocol, port, BLOCKED_AUDIT);
            report(f, &d, f.dir, now, &cfg, DropReason::PolicyDenied, true);
        }
        // A TCP segment that does not open a connection, passed only because this direction is
        // not isolated, is not tracked: tracking it would let the other, isolated direction's
        // packets through as "replies" of a flow nobody admitted (e.g. a revoked connection
        // revived by the peer's retransmission). Its other direction is judged on its own.
        let mid_stream = pkt_is_tcp(f.pkt) && !is_tcp_open(f.pkt);
        if track
            && !(mid_stream && d.ct_flags & CT_UNISOLATED != 0)
            && !conntrack::create(
                &f.ct_key(),
                f.pkt,
                f.dir,
                f.ep.generation,
                d.rule,
                ct_flags,
                now,
            )
        {
            count(Counter::CtInsertFailed);
        }
        record_fragment(f.pkt, true, 0);
        return verdict::PASS;
    }
    // Counted and reported once per denied connection, not per retransmission (`denied.rs`).
    if denied::first_denial(&f.ct_key(), f.pkt, f.ep.generation, now, false) {
        count_blocked(f.dir, f.pkt.protocol, port, 0);
        report(f, &d, f.dir, now, &cfg, DropReason::PolicyDenied, false);
    }
    record_fragment(f.pkt, false, DropReason::PolicyDenied as u32);
    drop(DropReason::PolicyDenied, f.dir, f.pkt.protocol)
}

#[inline(always)]
fn pkt_is_tcp(pkt: &Packet) -> bool {
    pkt.protocol == npc_common::ipproto::TCP
}

#[inline(always)]
fn report(
    f: &Flow,
    d: &Decision,
    dir: Direction,
    now: u64,
    cfg: &Config,
    reason: DropReason,
    audit: bool,
) {
    events::emit(cfg, now, |e: &mut DenyEvent| {
        e.timestamp_ns = now;
        e.local = *f.local();
        e.remote = *f.remote();
        e.local_port = f.local_port();
        e.remote_port = f.remote_port();
        e.local_identity = f.ep.identity;
        e.remote_identity = d.remote_identity;
        e.remote_cidr_identity = d.cidr_identity;
        e.ifindex = f.ifindex;
        e.protocol = f.pkt.protocol;
        e.direction = dir as u8;
        e.reason = reason as u8;
        e.flags = if audit { EVENT_AUDIT } else { 0 };
    });
}
