//! Endpoints (pods, node addresses) and the identities they carry.
use crate::{IpBytes, assert_layout};

/// No identity (never written to a map).
pub const IDENTITY_NONE: u32 = 0;
/// Wildcard remote identity in policy keys: a rule that allows every peer.
pub const IDENTITY_ANY: u32 = 1;
/// An address that is no known pod and lies in no ipBlock prefix.
pub const IDENTITY_WORLD: u32 = 2;
/// The node's own addresses.
pub const IDENTITY_HOST: u32 = 3;
/// First identity the agent hands out to a (namespace, labels, named ports) tuple.
pub const IDENTITY_FIRST_POD: u32 = 256;
/// First identity of a set of ipBlocks (CIDR identities live above this value).
pub const IDENTITY_FIRST_CIDR: u32 = 1 << 24;

/// `endpoints` map key: the endpoint's IP.
pub type EndpointKey = IpBytes;

/// `endpoints` map value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    pub identity: u32,
    /// `ENDPOINT_*` bits.
    pub flags: u32,
    /// Host-side veth of a local pod (0 while not learned).
    pub ifindex: u32,
    /// Bumped by the agent whenever this endpoint's policy changes; conntrack entries of an
    /// older generation are re-checked on their next packet.
    pub generation: u32,
}
assert_layout!(EndpointInfo, 16, 4);

/// The pod runs on this node: its veth carries its traffic and its policy is enforced here.
pub const ENDPOINT_LOCAL: u32 = 1 << 0;
/// Some policy selects this pod for ingress.
pub const ENDPOINT_INGRESS_ISOLATED: u32 = 1 << 1;
/// Some policy selects this pod for egress.
pub const ENDPOINT_EGRESS_ISOLATED: u32 = 1 << 2;
/// Denials are reported but not enforced (audit mode for this endpoint).
pub const ENDPOINT_AUDIT: u32 = 1 << 3;

impl EndpointInfo {
    #[inline(always)]
    pub const fn is_local(&self) -> bool {
        self.flags & ENDPOINT_LOCAL != 0
    }

    #[inline(always)]
    pub const fn isolated(&self, dir: crate::Direction) -> bool {
        let bit = match dir {
            crate::Direction::Ingress => ENDPOINT_INGRESS_ISOLATED,
            crate::Direction::Egress => ENDPOINT_EGRESS_ISOLATED,
        };
        self.flags & bit != 0
    }

    #[inline(always)]
    pub const fn isolated_any(&self) -> bool {
        self.flags & (ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED) != 0
    }
}

/// `interfaces` map value, keyed by the host veth's ifindex (`u32`): a veth the agent knows
/// belongs to a pod. A packet from such a veth whose source is no endpoint is spoofed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub flags: u32,
    pub _pad: u32,
}
assert_layout!(InterfaceInfo, 8, 4);

/// The veth belongs to a known local pod.
pub const INTERFACE_POD: u32 = 1 << 0;

/// `cidrs` LPM key data: the address in the 16-byte form. IPv4 prefixes are stored with
/// `96 + len` bits.
pub type CidrKeyData = IpBytes;

/// `cidrs` map value: the identity of the exact set of ipBlocks containing the prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrInfo {
    pub identity: u32,
}
assert_layout!(CidrInfo, 4, 4);

/// LPM prefix length of an IPv4 prefix in the 16-byte key space.
pub const fn cidr_prefix_len_v4(len: u8) -> u32 {
    96 + len as u32
}
