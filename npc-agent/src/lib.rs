//! The npc agent as a library: the binary (`main.rs`) and the integration tests use it.
pub mod cli;
pub mod compiler;
pub mod dataplane;
pub mod http;
pub mod model;
pub mod reconcile;
pub mod run;
pub mod sources;
pub mod sync;
