#![no_std]
// The library target only exists so the workspace can depend on this crate; the programs are in
// the `npc` binary (src/main.rs).
