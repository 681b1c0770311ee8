//! The npc datapath: two TC programs on every pod's host-side veth.
//!
//! - `from_pod` (veth ingress hook, `from_pod.rs`): packets the pod sends; its egress policy.
//! - `to_pod` (veth egress hook, `to_pod.rs`): packets delivered to the pod; its ingress policy.
//!
//! Both run the same pipeline (`verdict.rs`) with the local endpoint on the other side of the
//! packet. Helpers are split by concern: parsing, conntrack, policy, counters, denied-connection
//! de-duplication, events.
#![no_std]
#![no_main]

mod conntrack;
mod counters;
mod denied;
mod events;
mod from_pod;
mod maps;
mod parse;
mod policy;
mod to_pod;
mod verdict;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
