//! Per-CPU counters: drops by reason, allowed connections, blocked connections by port.
use aya_ebpf::bindings::BPF_NOEXIST;
use npc_common::{
    BLOCKED_OVERFLOW, BlockedKey, Counter, Direction, DropReason, ProtoClass, allowed_index,
    drop_index,
};

use crate::maps::{BLOCKED, COUNTERS, DROPS};

#[inline(always)]
fn bump(map: &aya_ebpf::maps::PerCpuArray<u64>, index: u32) {
    if let Some(p) = map.get_ptr_mut(index) {
        // Per-CPU: no other writer, no atomics needed.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn count_drop(reason: DropReason, dir: Direction, protocol: u8) {
    bump(&DROPS, drop_index(reason, dir, ProtoClass::of(protocol)));
}

#[inline(always)]
pub fn count_allowed(dir: Direction, protocol: u8) {
    bump(&COUNTERS, allowed_index(dir, ProtoClass::of(protocol)));
}

#[inline(always)]
pub fn count(counter: Counter) {
    bump(&COUNTERS, counter as u32);
}

/// Counts a denied new connection under (direction, protocol, destination port). When the map
/// is full, the connection is counted in the (direction, protocol) overflow cell instead.
#[inline(always)]
pub fn count_blocked(dir: Direction, protocol: u8, dport: u16, flags: u32) {
    let key = BlockedKey {
        dport,
        direction: dir as u8,
        protocol,
        flags,
    };
    if let Some(p) = BLOCKED.get_ptr_mut(&key) {
        unsafe { *p += 1 };
        return;
    }
    if BLOCKED.insert(&key, &1, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    count(Counter::BlockedOverflow);
    // One overflow cell per (direction, protocol class, audit): protocols without a class of
    // their own share protocol 0. The agent creates them all up front.
    let protocol = if ProtoClass::of(protocol) == ProtoClass::Other {
        0
    } else {
        protocol
    };
    let overflow = BlockedKey {
        dport: 0,
        direction: dir as u8,
        protocol,
        flags: flags | BLOCKED_OVERFLOW,
    };
    if let Some(p) = BLOCKED.get_ptr_mut(&overflow) {
        unsafe { *p += 1 };
    } else {
        // The agent pre-creates the overflow cells; this only runs if it has not yet.
        let _ = BLOCKED.insert(&overflow, &1, BPF_NOEXIST as u64);
    }
}
