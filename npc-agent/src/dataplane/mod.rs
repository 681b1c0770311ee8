//! The dataplane: loads the eBPF object, pins its maps, attaches it to veths and offers a typed
//! API over the maps.
mod addresses;
mod bpffs;
pub mod gc;
pub mod links;
mod loader;
mod maps;
pub mod migrate;
pub mod pod_veths;

pub use addresses::node_addresses;
pub use bpffs::{ensure_bpffs, remove_pins};
pub use loader::{AttachMode, Datapath, LINKS_DIR, LoadOptions};
pub use maps::{BlockedCount, DropCount, Maps, PortMatch, monotonic_ns};
