//! Connection tracking, keyed from the local endpoint's point of view.
use crate::{IpBytes, assert_layout, ipproto};

/// `conntrack` map key. The same key matches both directions of a flow at one endpoint, and
/// the client's and the server's entries on one node differ (their `local` differs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub local: IpBytes,
    pub remote: IpBytes,
    /// Host byte order. For ICMP echo: the echo identifier.
    pub local_port: u16,
    /// Host byte order. 0 for ICMP.
    pub remote_port: u16,
    pub protocol: u8,
    // Padding as scalars: an array would be zeroed by a `memset` call on the BPF target.
    pub _pad0: u8,
    pub _pad1: u16,
}
assert_layout!(CtKey, 40, 2);

impl CtKey {
    #[inline(always)]
    pub const fn new(
        local: IpBytes,
        remote: IpBytes,
        local_port: u16,
        remote_port: u16,
        protocol: u8,
    ) -> CtKey {
        CtKey {
            local,
            remote,
            local_port,
            remote_port,
            protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// `conntrack` map value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` when the entry was made.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// The local endpoint's policy generation when the flow was last checked.
    pub generation: u32,
    /// Cookie of the rule that allowed the flow.
    pub rule: u32,
    /// `CT_*` bits.
    pub flags: u16,
    /// `Direction as u8` of the flow's first packet: whose policy admitted it.
    pub opener: u8,
    pub _pad0: u8,
    pub _pad1: u32,
}
assert_layout!(CtEntry, 32, 8);

pub const CT_SYN_LOCAL: u16 = 1 << 0;
pub const CT_SYN_REMOTE: u16 = 1 << 1;
pub const CT_FIN_LOCAL: u16 = 1 << 2;
pub const CT_FIN_REMOTE: u16 = 1 << 3;
pub const CT_RST: u16 = 1 << 4;
/// Packets have been seen in both directions.
pub const CT_REPLIED: u16 = 1 << 5;
/// Admitted while the endpoint was not isolated in the opener direction.
pub const CT_UNISOLATED: u16 = 1 << 6;
/// Admitted in audit mode although policy would deny it.
pub const CT_AUDIT: u16 = 1 << 7;

pub const NS_PER_SEC: u64 = 1_000_000_000;
/// A TCP flow whose handshake has not completed.
pub const CT_LIFETIME_TCP_SYN_NS: u64 = 60 * NS_PER_SEC;
pub const CT_LIFETIME_TCP_ESTABLISHED_NS: u64 = 6 * 3600 * NS_PER_SEC;
/// After a RST, or FIN from both sides.
pub const CT_LIFETIME_TCP_CLOSING_NS: u64 = 10 * NS_PER_SEC;
/// UDP, SCTP, ICMP and anything else.
pub const CT_LIFETIME_OTHER_NS: u64 = 60 * NS_PER_SEC;
/// `last_seen_ns` is written at most this often on the hot path.
pub const CT_REFRESH_INTERVAL_NS: u64 = NS_PER_SEC;

impl CtEntry {
    /// The TCP flow is closing (RST, or FIN from both sides).
    #[inline(always)]
    pub const fn closing(&self) -> bool {
        self.flags & CT_RST != 0
            || self.flags & (CT_FIN_LOCAL | CT_FIN_REMOTE) == (CT_FIN_LOCAL | CT_FIN_REMOTE)
    }

    /// How long the entry lives after its last packet.
    #[inline(always)]
    pub const fn lifetime_ns(&self, protocol: u8) -> u64 {
        if protocol != ipproto::TCP {
            CT_LIFETIME_OTHER_NS
        } else if self.closing() {
            CT_LIFETIME_TCP_CLOSING_NS
        } else if self.flags & CT_REPLIED != 0 {
            CT_LIFETIME_TCP_ESTABLISHED_NS
        } else {
            CT_LIFETIME_TCP_SYN_NS
        }
    }

    #[inline(always)]
    pub const fn expired(&self, protocol: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.lifetime_ns(protocol)
    }
}
