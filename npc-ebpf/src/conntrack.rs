//! Connection tracking from the local endpoint's point of view.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use npc_common::{
    CT_FIN_LOCAL, CT_FIN_REMOTE, CT_REFRESH_INTERVAL_NS, CT_REPLIED, CT_RST, CT_SYN_LOCAL,
    CT_SYN_REMOTE, CtEntry, CtKey, Direction, ipproto,
};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn now_ns() -> u64 {
    // Coarse (jiffy resolution) is enough for timeouts and cheaper than bpf_ktime_get_ns.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A TCP segment that opens a connection (SYN without ACK).
#[inline(always)]
pub fn is_tcp_open(pkt: &Packet) -> bool {
    pkt.protocol == ipproto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// State bits this packet adds, seen from the local endpoint.
#[inline(always)]
pub fn state_bits(pkt: &Packet, dir: Direction, opener: u8) -> u16 {
    let mut bits = if dir as u8 != opener { CT_REPLIED } else { 0 };
    if pkt.protocol == ipproto::TCP {
        let from_local = dir == Direction::Egress;
        if pkt.tcp_flags & TCP_SYN != 0 {
            bits |= if from_local {
                CT_SYN_LOCAL
            } else {
                CT_SYN_REMOTE
            };
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            bits |= if from_local {
                CT_FIN_LOCAL
            } else {
                CT_FIN_REMOTE
            };
        }
        if pkt.tcp_flags & TCP_RST != 0 {
            bits |= CT_RST;
        }
    }
    bits
}

/// Records a packet of a tracked flow. Writes only when the state changes or the last-seen time
/// is stale, so an established flow's packets mostly only read the entry.
#[inline(always)]
pub fn touch(entry: &mut CtEntry, pkt: &Packet, dir: Direction, now: u64) {
    let flags = entry.flags | state_bits(pkt, dir, entry.opener);
    if flags != entry.flags {
        entry.flags = flags;
        entry.last_seen_ns = now;
    } else if now.wrapping_sub(entry.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
        entry.last_seen_ns = now;
    }
}

/// Tracks a new flow admitted in direction `dir`.
#[inline(always)]
pub fn create(
    key: &CtKey,
    pkt: &Packet,
    dir: Direction,
    generation: u32,
    rule: u32,
    flags: u16,
    now: u64,
) -> bool {
    let entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        generation,
        rule,
        flags: flags | state_bits(pkt, dir, dir as u8),
        opener: dir as u8,
        _pad0: 0,
        _pad1: 0,
    };
    CONNTRACK.insert(key, &entry, 0).is_ok()
}
