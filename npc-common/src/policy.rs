//! Policy entries: which remote identities a local identity may talk to, per direction,
//! protocol and port.
use crate::assert_layout;

/// `policy` LPM key data. The fields are ordered so that a prefix length expresses the wildcards:
/// identities and direction always match exactly; then the protocol; then the port, stored in
/// network byte order so that an aligned port range is a bit prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Identity of the local endpoint (network byte order, like every field here).
    pub local_identity: [u8; 4],
    /// Identity of the peer: a pod identity, a CIDR identity, or `IDENTITY_ANY`.
    pub remote_identity: [u8; 4],
    /// `Direction as u8`.
    pub direction: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port of the connection, network byte order.
    pub port: [u8; 2],
}
assert_layout!(PolicyKey, 12, 1);

/// Prefix length that matches one exact port.
pub const POLICY_PREFIX_FULL: u32 = 96;
/// Prefix length of "every port of this protocol".
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// Prefix length of "every protocol and port".
pub const POLICY_PREFIX_ANY_PROTOCOL: u32 = 72;

impl PolicyKey {
    #[inline(always)]
    pub const fn new(
        local_identity: u32,
        remote_identity: u32,
        direction: crate::Direction,
        protocol: u8,
        port: u16,
    ) -> Self {
        PolicyKey {
            local_identity: local_identity.to_be_bytes(),
            remote_identity: remote_identity.to_be_bytes(),
            direction: direction as u8,
            protocol,
            port: port.to_be_bytes(),
        }
    }

    pub const fn local(&self) -> u32 {
        u32::from_be_bytes(self.local_identity)
    }

    pub const fn remote(&self) -> u32 {
        u32::from_be_bytes(self.remote_identity)
    }

    pub const fn port_u16(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// `policy` map value: the packet is allowed; `rule` names the rule that allowed it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    /// Cookie of the rule (the agent keeps the table from cookie to policy and rule).
    pub rule: u32,
    pub flags: u32,
}
assert_layout!(PolicyEntry, 8, 4);

/// Rule cookie of a pass that no policy entry made (endpoint not isolated, host traffic, ...).
pub const RULE_NONE: u32 = 0;
/// Rule cookie of node-to-local-pod traffic allowed by the host rule.
pub const RULE_HOST: u32 = u32::MAX;

/// Splits the inclusive port range `start..=end` into aligned blocks, calling `f(port, bits)`
/// for each, where `bits` is how many leading bits of the port are fixed (16 = one port).
/// Use `POLICY_PREFIX_ANY_PORT + bits` as the LPM prefix length.
pub fn for_each_port_prefix(start: u16, end: u16, mut f: impl FnMut(u16, u32)) {
    if start > end {
        return;
    }
    let (mut lo, hi) = (start as u32, end as u32);
    while lo <= hi {
        // The largest aligned block starting at `lo` that does not pass `hi`.
        let mut size_log2 = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while size_log2 > 0 && lo + (1 << size_log2) - 1 > hi {
            size_log2 -= 1;
        }
        f(lo as u16, 16 - size_log2);
        lo += 1 << size_log2;
    }
}
