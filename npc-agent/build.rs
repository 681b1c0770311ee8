//! Builds the eBPF object (npc-ebpf) with bpf-linker, for `include_bytes_aligned!` in the loader.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "npc-ebpf")
        .ok_or_else(|| anyhow!("npc-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // `AYA_BUILD_SKIP=1` (quick `cargo check`s): leave an empty object so `include_bytes!` still
    // compiles; loading it fails at run time with a clear error.
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        if !out.join("npc").exists() {
            std::fs::write(out.join("npc"), b"")?;
        }
    }
    // `-Z build-std=core` on the stable toolchain pinned in rust-toolchain.toml.
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    // The toolchain pinned in rust-toolchain.toml (rustup names it in RUSTUP_TOOLCHAIN), not
    // aya-build's default nightly: its LLVM must match bpf-linker's.
    println!("cargo::rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").ok();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "npc-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        toolchain.as_deref().map_or(
            aya_build::Toolchain::default(),
            aya_build::Toolchain::Custom,
        ),
    )
}
