//! IP fragments: the first fragment's verdict applies to the rest of the datagram.
use crate::{IpBytes, assert_layout};

/// `fragments` map key: one IP datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: IpBytes,
    pub dst: IpBytes,
    /// IPv4 identification (16 bits) or IPv6 fragment identification (32 bits).
    pub id: u32,
    pub protocol: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}
assert_layout!(FragKey, 40, 4);

impl FragKey {
    #[inline(always)]
    pub const fn new(src: IpBytes, dst: IpBytes, id: u32, protocol: u8) -> FragKey {
        FragKey {
            src,
            dst,
            id,
            protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// `fragments` map value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    /// 1: the datagram passed, 0: it was dropped.
    pub allowed: u32,
    /// `DropReason` of the first fragment when it was dropped.
    pub reason: u32,
}
assert_layout!(FragEntry, 8, 4);
