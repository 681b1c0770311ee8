//! Attach point: the host-side veth's ingress hook, i.e. packets the pod sends.
use aya_ebpf::{macros::classifier, programs::TcContext};
use npc_common::Direction;

use crate::verdict::process;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    process(&ctx, Direction::Egress)
}
