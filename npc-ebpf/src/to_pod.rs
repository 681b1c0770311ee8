//! Attach point: the host-side veth's egress hook, i.e. packets delivered to the pod.
use aya_ebpf::{macros::classifier, programs::TcContext};
use npc_common::Direction;

use crate::verdict::process;

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    process(&ctx, Direction::Ingress)
}
