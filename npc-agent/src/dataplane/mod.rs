//! The dataplane: loads the eBPF object, pins its maps, attaches it to veths and offers a typed
//! API over the maps.
