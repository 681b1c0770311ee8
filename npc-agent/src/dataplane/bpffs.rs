//! The bpffs directory the maps are pinned under.
use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<()> {
    mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {}", path.display()))
}

/// Makes sure `dir` exists on a bpffs, mounting one when needed (e.g. under `ip netns exec`,
/// which remounts /sys and hides /sys/fs/bpf).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    if is_bpffs(dir) {
        return Ok(());
    }
    let ancestor: PathBuf = dir
        .ancestors()
        .find(|p| p.exists())
        .context("no existing ancestor")?
        .to_path_buf();
    if ancestor == dir {
        return mount_bpffs(dir);
    }
    if is_bpffs(&ancestor) {
        return std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()));
    }
    match std::fs::create_dir_all(dir) {
        Ok(()) => mount_bpffs(dir),
        // The ancestor is an unmounted bpffs mount point on a read-only sysfs (/sys/fs/bpf).
        Err(_) => {
            mount_bpffs(&ancestor)?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
        }
    }
}

/// Removes every pin under `dir` and the directory itself (`npc-agent cleanup`, tests).
pub fn remove_pins(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}
