/// The eBPF build depends on the `bpf-linker` binary, which cargo cannot see: rebuild when it
/// changes.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
