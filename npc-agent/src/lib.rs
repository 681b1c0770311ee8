//! The npc agent as a library: the binary (`main.rs`) and the integration tests use it.
pub mod dataplane;
