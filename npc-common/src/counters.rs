//! Drop reasons and counters, shared with userspace for metrics labels.
use crate::{Direction, assert_layout, ipproto};

/// Why the datapath dropped a packet. The value indexes the `drops` per-CPU array.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A new connection that no rule allows.
    PolicyDenied = 1,
    /// A tracked connection whose endpoint's policy changed and no longer allows it.
    PolicyRevoked = 2,
    /// Shorter than an Ethernet header.
    TruncatedEthernet = 3,
    /// An 802.1Q/802.1ad tag, in the frame or in the skb: pods do not send tagged frames.
    VlanTagged = 4,
    /// An EtherType that is neither IPv4, IPv6 nor ARP.
    UnsupportedL3 = 5,
    /// Truncated IPv4 header, IHL < 5, or a total length that does not fit.
    MalformedIpv4 = 6,
    /// Truncated IPv6 header or bad payload length.
    MalformedIpv6 = 7,
    /// An IPv6 extension header chain that is truncated, too long, or otherwise unparseable.
    Ipv6ExtensionChain = 8,
    /// Truncated or invalid TCP, UDP, SCTP, ICMP or ICMPv6 header.
    MalformedL4 = 9,
    /// A non-first fragment whose first fragment was never seen.
    FragmentNoRecord = 10,
    /// A non-first fragment of a datagram whose first fragment was dropped.
    FragmentDenied = 11,
    /// A packet from a pod with a source address that is not the pod's.
    SpoofedSource = 12,
    /// The local address is no known endpoint and the configured default is to drop.
    UnknownEndpoint = 13,
}

/// Number of drop reasons slots (index 0 is unused).
pub const DROP_REASONS: u32 = 16;

impl DropReason {
    pub const ALL: [DropReason; 13] = [
        DropReason::PolicyDenied,
        DropReason::PolicyRevoked,
        DropReason::TruncatedEthernet,
        DropReason::VlanTagged,
        DropReason::UnsupportedL3,
        DropReason::MalformedIpv4,
        DropReason::MalformedIpv6,
        DropReason::Ipv6ExtensionChain,
        DropReason::MalformedL4,
        DropReason::FragmentNoRecord,
        DropReason::FragmentDenied,
        DropReason::SpoofedSource,
        DropReason::UnknownEndpoint,
    ];

    pub const fn from_u8(v: u8) -> Option<DropReason> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u8 == v {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// The metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::PolicyDenied => "policy_denied",
            DropReason::PolicyRevoked => "policy_revoked",
            DropReason::TruncatedEthernet => "truncated_ethernet",
            DropReason::VlanTagged => "vlan_tagged",
            DropReason::UnsupportedL3 => "unsupported_l3",
            DropReason::MalformedIpv4 => "malformed_ipv4",
            DropReason::MalformedIpv6 => "malformed_ipv6",
            DropReason::Ipv6ExtensionChain => "ipv6_extension_chain",
            DropReason::MalformedL4 => "malformed_l4",
            DropReason::FragmentNoRecord => "fragment_no_record",
            DropReason::FragmentDenied => "fragment_denied",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::UnknownEndpoint => "unknown_endpoint",
        }
    }
}

/// Protocol classes used as a counter dimension (bounded, unlike IP protocol numbers).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtoClass {
    Other = 0,
    Tcp = 1,
    Udp = 2,
    Sctp = 3,
    Icmp = 4,
    Icmpv6 = 5,
}

/// Slots per direction in the counter arrays.
pub const PROTO_CLASSES: u32 = 8;

impl ProtoClass {
    pub const ALL: [ProtoClass; 6] = [
        ProtoClass::Other,
        ProtoClass::Tcp,
        ProtoClass::Udp,
        ProtoClass::Sctp,
        ProtoClass::Icmp,
        ProtoClass::Icmpv6,
    ];

    #[inline(always)]
    pub const fn of(protocol: u8) -> ProtoClass {
        match protocol {
            ipproto::TCP => ProtoClass::Tcp,
            ipproto::UDP => ProtoClass::Udp,
            ipproto::SCTP => ProtoClass::Sctp,
            ipproto::ICMP => ProtoClass::Icmp,
            ipproto::ICMPV6 => ProtoClass::Icmpv6,
            _ => ProtoClass::Other,
        }
    }

    pub const fn from_u8(v: u8) -> Option<ProtoClass> {
        if (v as usize) < Self::ALL.len() {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The metrics label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProtoClass::Other => "other",
            ProtoClass::Tcp => "tcp",
            ProtoClass::Udp => "udp",
            ProtoClass::Sctp => "sctp",
            ProtoClass::Icmp => "icmp",
            ProtoClass::Icmpv6 => "icmpv6",
        }
    }
}

/// Length of the `drops` per-CPU array: reason x direction x protocol class.
pub const DROPS_LEN: u32 = DROP_REASONS * 2 * PROTO_CLASSES;

/// Index of a (reason, direction, protocol class) cell in `drops`.
#[inline(always)]
pub const fn drop_index(reason: DropReason, dir: Direction, proto: ProtoClass) -> u32 {
    ((reason as u32) * 2 + dir as u32) * PROTO_CLASSES + proto as u32
}

/// Inverse of [`drop_index`].
pub const fn drop_index_parts(index: u32) -> Option<(DropReason, Direction, ProtoClass)> {
    let proto = ProtoClass::from_u8((index % PROTO_CLASSES) as u8);
    let dir = Direction::from_u8(((index / PROTO_CLASSES) % 2) as u8);
    let reason = DropReason::from_u8((index / PROTO_CLASSES / 2) as u8);
    match (reason, dir, proto) {
        (Some(r), Some(d), Some(p)) => Some((r, d, p)),
        _ => None,
    }
}

/// Event counters in the `counters` per-CPU array, after the allowed-connection cells.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Deny events written to the ring buffer.
    EventsSubmitted = 16,
    /// Deny events suppressed by the per-CPU rate limit.
    EventsRateLimited = 17,
    /// Deny events lost because the ring buffer was full.
    EventsLost = 18,
    /// Blocked connections counted in the overflow bucket (the `blocked` map was full).
    BlockedOverflow = 19,
    /// Packets passed because their local address is unknown and the default is to allow.
    UnknownEndpointPassed = 20,
    /// ICMP errors passed because they quote a tracked flow.
    IcmpRelated = 21,
    /// Non-first fragments passed on their first fragment's verdict.
    FragmentsPassed = 22,
    /// Connections that policy denies but audit mode let through.
    AuditWouldBlock = 23,
    /// Tracked flows whose re-check after a policy change passed.
    Rechecked = 24,
    /// Conntrack inserts that failed.
    CtInsertFailed = 25,
}

impl Counter {
    pub const ALL: [Counter; 10] = [
        Counter::EventsSubmitted,
        Counter::EventsRateLimited,
        Counter::EventsLost,
        Counter::BlockedOverflow,
        Counter::UnknownEndpointPassed,
        Counter::IcmpRelated,
        Counter::FragmentsPassed,
        Counter::AuditWouldBlock,
        Counter::Rechecked,
        Counter::CtInsertFailed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Counter::EventsSubmitted => "events_submitted",
            Counter::EventsRateLimited => "events_rate_limited",
            Counter::EventsLost => "events_lost",
            Counter::BlockedOverflow => "blocked_overflow",
            Counter::UnknownEndpointPassed => "unknown_endpoint_passed",
            Counter::IcmpRelated => "icmp_related",
            Counter::FragmentsPassed => "fragments_passed",
            Counter::AuditWouldBlock => "audit_would_block",
            Counter::Rechecked => "rechecked",
            Counter::CtInsertFailed => "ct_insert_failed",
        }
    }
}

/// Length of the `counters` per-CPU array.
pub const COUNTERS_LEN: u32 = 32;

/// Index of the allowed-new-connection cell for (direction, protocol class) in `counters`.
#[inline(always)]
pub const fn allowed_index(dir: Direction, proto: ProtoClass) -> u32 {
    dir as u32 * PROTO_CLASSES + proto as u32
}

/// `blocked` per-CPU hash key: denied new connections by direction, protocol and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockedKey {
    /// Destination port (host byte order; 0 for ICMP and the overflow bucket).
    pub dport: u16,
    /// `Direction as u8`.
    pub direction: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// `BLOCKED_*` bits.
    pub flags: u32,
}
assert_layout!(BlockedKey, 8, 4);

/// The map was full: this cell counts every port of (direction, protocol) that did not fit.
pub const BLOCKED_OVERFLOW: u32 = 1 << 0;
/// Would have been blocked, but audit mode let it pass.
pub const BLOCKED_AUDIT: u32 = 1 << 1;
