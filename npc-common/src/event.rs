//! Denied-connection events, sent through the `events` ring buffer.
use crate::{IpBytes, assert_layout};

/// One denied (or, in audit mode, would-be-denied) new connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    pub timestamp_ns: u64,
    pub local: IpBytes,
    pub remote: IpBytes,
    pub local_port: u16,
    pub remote_port: u16,
    pub local_identity: u32,
    pub remote_identity: u32,
    /// Identity of the remote's longest matching ipBlock prefix, if any.
    pub remote_cidr_identity: u32,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    pub protocol: u8,
    /// `Direction as u8`: whose policy denied it.
    pub direction: u8,
    /// `DropReason as u8`.
    pub reason: u8,
    /// `EVENT_*` bits.
    pub flags: u8,
}
assert_layout!(DenyEvent, 64, 8);

/// Audit mode: the connection passed although policy would deny it.
pub const EVENT_AUDIT: u8 = 1 << 0;
