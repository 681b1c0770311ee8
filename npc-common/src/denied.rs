//! Denied flows: what makes one denied *connection* out of its many denied packets.
use crate::{NS_PER_SEC, assert_layout};

/// `denied` map value (LRU hash keyed by [`crate::CtKey`], the same local-endpoint view of a flow
/// as conntrack).
///
/// A denied connect is retried with the same packet: the client retransmits its SYN (same
/// 5-tuple, same ISN) after 1, 3, 7, ... seconds, a UDP client resends its datagram. Counted per
/// packet, one denied connect would show as several blocked connections and deny events. The
/// datapath remembers each denied flow here, and only a packet that starts a new denied
/// connection counts in `blocked` and emits a deny event (every denied packet still counts in
/// `drops`): a packet repeats a denied connection if its flow has an entry of the same endpoint
/// policy generation, refreshed less than [`DENIED_REPEAT_WINDOW_NS`] ago, and, for a TCP SYN
/// (without ACK), one recorded from a SYN with the same sequence number: a SYN with a new ISN on
/// a reused tuple is a new attempt.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeniedEntry {
    /// `bpf_ktime_get_coarse_ns` of the flow's last denied packet.
    pub last_ns: u64,
    /// The local endpoint's policy generation when that packet was denied.
    pub generation: u32,
    /// The initial sequence number of the last denied SYN (`DENIED_SYN` set), else 0.
    pub tcp_seq: u32,
    /// `DENIED_*` bits.
    pub flags: u32,
    pub _pad0: u32,
}
assert_layout!(DeniedEntry, 24, 8);

/// `tcp_seq` holds the sequence number of a denied SYN (a TCP SYN without ACK).
pub const DENIED_SYN: u32 = 1 << 0;
/// The entry was made when a tracked flow was revoked (its policy no longer allows it).
pub const DENIED_REVOKED: u32 = 1 << 1;

/// How long after a flow's last denied packet another one still repeats the same denied
/// connection (every repeat refreshes it). Linux backs SYN retransmissions off exponentially up
/// to `TCP_RTO_MAX` (120 s) between two attempts (with the default 6 retries the longest gap is
/// 32 s); 130 s covers the longest gap with room for timer slack and the coarse clock.
pub const DENIED_REPEAT_WINDOW_NS: u64 = 130 * NS_PER_SEC;

impl DeniedEntry {
    /// Whether a packet denied at `now_ns` for an endpoint of policy generation `generation`
    /// repeats the denied connection this entry records. `syn_seq` is the sequence number of a
    /// TCP SYN without ACK, `None` for any other packet.
    #[inline(always)]
    pub const fn repeated_by(&self, generation: u32, syn_seq: Option<u32>, now_ns: u64) -> bool {
        if self.generation != generation
            || now_ns.wrapping_sub(self.last_ns) >= DENIED_REPEAT_WINDOW_NS
        {
            return false;
        }
        match syn_seq {
            Some(seq) => self.flags & DENIED_SYN != 0 && self.tcp_seq == seq,
            None => true,
        }
    }
}
