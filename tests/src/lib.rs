//! Test support: packet crafting, a datapath for BPF_PROG_TEST_RUN, network-namespace labs.

pub mod datapath;
pub mod lab;
pub mod packets;
