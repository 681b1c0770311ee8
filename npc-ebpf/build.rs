/// The eBPF build depends on the `bpf-linker` binary, which cargo cannot see: rebuild when it
/// changes.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    // bpf-linker's default `-bpf-expand-memcpy-in-order` also turns off LLVM's inline expansion
    // of memset: every zeroed key or struct became a call to the byte-loop `memset`. The kernel
    // JITs' memcpy pattern matching that the flag serves does not matter here.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
