//! The npc agent as a library: the binary (`main.rs`) and the integration tests use it.
pub mod cli;
pub mod compiler;
pub mod dataplane;
pub mod deny_log;
pub mod dump;
pub mod http;
pub mod metrics;
pub mod model;
pub mod names;
pub mod reconcile;
pub mod run;
pub mod sources;
pub mod sync;
