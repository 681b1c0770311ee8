//! Test support: packet crafting, network-namespace labs.
