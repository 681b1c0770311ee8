//! Denied connections, not denied packets. A denied connect is retried with the same packet (the
//! client retransmits its SYN after 1, 3, 7, ... s; a UDP client resends its datagram), and the
//! flow's later packets are denied too: counted per packet, one denied connect would show as
//! several blocked connections and deny events. The `denied` map remembers each denied flow (see
//! `npc_common::DeniedEntry` for when a packet repeats one), so only the first packet of a denied
//! connection is counted in `blocked` and reported; every denied packet still counts in `drops`.
use npc_common::{CtKey, DENIED_REVOKED, DENIED_SYN, DeniedEntry};

use crate::{conntrack::is_tcp_open, maps::DENIED, parse::Packet};

/// Records a denied packet of the flow `key` (the local endpoint's policy `generation`, at
/// `now`), and tells whether it starts a new denied connection (to count and report) rather than
/// repeating one already counted. `revoked`: a tracked flow whose policy no longer allows it.
#[inline(always)]
pub fn first_denial(key: &CtKey, pkt: &Packet, generation: u32, now: u64, revoked: bool) -> bool {
    let syn_seq = if is_tcp_open(pkt) {
        Some(pkt.tcp_seq)
    } else {
        None
    };
    let found = DENIED.get_ptr_mut(key);
    if let Some(e) = found {
        let e = unsafe { &mut *e };
        if e.repeated_by(generation, syn_seq, now) {
            // The sequence number and flags stay: a repeat either is the recorded SYN again or
            // no SYN at all.
            e.last_ns = now;
            return false;
        }
    }
    let entry = DeniedEntry {
        last_ns: now,
        generation,
        tcp_seq: syn_seq.unwrap_or(0),
        flags: if syn_seq.is_some() { DENIED_SYN } else { 0 }
            | if revoked { DENIED_REVOKED } else { 0 },
        _pad0: 0,
    };
    match found {
        // In place: no second hash lookup.
        Some(e) => unsafe { *e = entry },
        None => {
            let _ = DENIED.insert(key, &entry, 0);
        }
    }
    true
}
