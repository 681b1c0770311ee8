//! Types shared by the npc datapath (`npc-ebpf`) and the agent (`npc-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields that writers must zero,
//! and a compile-time size assertion, so both sides agree byte for byte. The `user` feature adds
//! `aya::Pod` for the agent.
#![no_std]

pub mod config;
pub mod conntrack;
pub mod counters;
pub mod denied;
pub mod endpoint;
pub mod event;
pub mod fragment;
pub mod policy;

pub use config::*;
pub use conntrack::*;
pub use counters::*;
pub use denied::*;
pub use endpoint::*;
pub use event::*;
pub use fragment::*;
pub use policy::*;

/// Names of the maps, as declared in the eBPF object and as pinned under the agent's bpffs dir.
///
/// A name is also its map's layout tag: when what a map's key or value bytes mean changes, give
/// it a new name (`conntrack_v2`), so that an upgraded agent never reuses a map pinned by an
/// older one with another layout (see the agent's `dataplane::migrate`).
pub mod map_names {
    pub const ENDPOINTS: &str = "endpoints";
    pub const INTERFACES: &str = "interfaces";
    pub const CIDRS: &str = "cidrs";
    pub const POLICY: &str = "policy";
    pub const CONNTRACK: &str = "conntrack";
    pub const FRAGMENTS: &str = "fragments";
    /// Denied flows, so a retransmitted denied connect counts (and is reported) once.
    pub const DENIED: &str = "denied";
    pub const DROPS: &str = "drops";
    pub const COUNTERS: &str = "counters";
    pub const BLOCKED: &str = "blocked";
    pub const EVENTS: &str = "events";
    pub const EVENT_RATE: &str = "event_rate";
    pub const CONFIG: &str = "config";
    /// Every map, in a stable order (map-dump and cleanup walk this list).
    pub const ALL: [&str; 13] = [
        ENDPOINTS, INTERFACES, CIDRS, POLICY, CONNTRACK, FRAGMENTS, DENIED, DROPS, COUNTERS,
        BLOCKED, EVENTS, EVENT_RATE, CONFIG,
    ];
}

/// Names of the two TC programs in the eBPF object.
pub mod program_names {
    /// Host-side veth ingress hook: packets the pod sends (the pod's egress policy).
    pub const FROM_POD: &str = "from_pod";
    /// Host-side veth egress hook: packets delivered to the pod (the pod's ingress policy).
    pub const TO_POD: &str = "to_pod";
}

/// What the TC programs return.
pub mod verdict {
    /// `TC_ACT_UNSPEC` / `TCX_NEXT`: no objection; the next program in the chain (the CNI's, if
    /// any) or the stack decides.
    pub const PASS: i32 = -1;
    /// `TC_ACT_SHOT`: drop silently (a denied connect times out, it is never rejected).
    pub const DROP: i32 = 2;
}

/// Default capacities of the maps (the agent may override them at load time).
pub mod capacity {
    /// Pod addresses of the whole cluster (100,000 dual-stack pods fit). Not preallocated:
    /// memory follows the entries, not the capacity.
    pub const ENDPOINTS: u32 = 262_144;
    pub const INTERFACES: u32 = 4_096;
    pub const CIDRS: u32 = 65_536;
    pub const POLICY: u32 = 262_144;
    pub const CONNTRACK: u32 = 262_144;
    pub const FRAGMENTS: u32 = 8_192;
    pub const DENIED: u32 = 16_384;
    pub const BLOCKED: u32 = 4_096;
    /// Ring buffer size in bytes (a power of two multiple of the page size).
    pub const EVENTS_BYTES: u32 = 256 * 1024;
}

/// IP protocol numbers the datapath understands.
pub mod ipproto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// An IP address as the maps store it: 16 bytes, IPv4 as `::ffff:a.b.c.d`.
pub type IpBytes = [u8; 16];

/// Maps an IPv4 address (network order bytes) into the 16-byte form.
#[inline(always)]
pub const fn ipv4_mapped(v4: [u8; 4]) -> IpBytes {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The 16-byte map form of any address.
pub const fn ip_bytes(ip: core::net::IpAddr) -> IpBytes {
    match ip {
        core::net::IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address behind the 16-byte map form (IPv4-mapped addresses come back as IPv4).
pub fn ip_from_bytes(b: IpBytes) -> core::net::IpAddr {
    let v6 = core::net::Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => core::net::IpAddr::V4(v4),
        None => core::net::IpAddr::V6(v6),
    }
}

/// Direction of a verdict, from the local endpoint's point of view.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic delivered to the local pod (`to_pod`): its ingress policy applies.
    Ingress = 0,
    /// Traffic sent by the local pod (`from_pod`): its egress policy applies.
    Egress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub const fn from_u8(v: u8) -> Option<Direction> {
        match v {
            0 => Some(Direction::Ingress),
            1 => Some(Direction::Egress),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Pins a type's size (and that it has no implicit padding) at compile time.
#[macro_export]
macro_rules! assert_layout {
    ($t:ty, $size:expr, $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        const _: () = assert!(core::mem::align_of::<$t>() == $align);
    };
}

/// `aya::Pod` for every shared key and value (userspace only).
#[cfg(feature = "user")]
mod pod {
    use super::*;
    macro_rules! pod {
        ($($t:ty),* $(,)?) => { $( unsafe impl aya::Pod for $t {} )* };
    }
    pod!(
        EndpointInfo,
        InterfaceInfo,
        CidrInfo,
        PolicyKey,
        PolicyEntry,
        CtKey,
        CtEntry,
        FragKey,
        FragEntry,
        DeniedEntry,
        BlockedKey,
        DenyEvent,
        Config,
        RateLimit,
    );
}
