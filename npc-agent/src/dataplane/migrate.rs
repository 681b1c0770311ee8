//! Pinned maps from another agent version (or from the same agent run with other sizes, e.g.
//! `--conntrack-size`) that this agent's object cannot reuse.
//!
//! aya refuses to reuse a pinned map whose type, key or value size, capacity or flags differ
//! from the object's definition. The loader then creates the new map pinned in
//! `<bpffs>/staging/` ([`staging_path`]), [`carry_over`] copies the old map's entries into it,
//! and [`install`] swaps the two pins in one `renameat2(RENAME_EXCHANGE)`: the pin path never
//! names a missing or an empty map. The old map moves on to `<bpffs>/retired/` and lives as long
//! as the previous agent's programs, still attached through their pinned links, use it:
//! enforcement goes on with the old maps until this agent swaps its programs into those links.
//! Then [`carry_over_flows`] copies once more, without overwriting, the flows the old programs
//! tracked in between, and [`remove_retired`] removes the retired pins.
//!
//! The layout tag of a map is its name: the layout of every key and value is fixed by the
//! compile-time assertions in npc-common, and a change of what a map's bytes mean must come with
//! a new map name (`conntrack_v2`), so that no agent ever reads another layout's bytes. Entries
//! are carried over only between maps of one name and equal key and value sizes (a map whose
//! sizes changed starts empty, logged); a map of the new name starts empty unless code converting
//! the old one's entries is added here, and the old one's pin is removed with the retired ones.
use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    Pod,
    maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
};
use npc_common::map_names;
use tracing::{info, warn};

use super::maps::Maps;

/// The directory under the pin directory that holds retired pins.
pub const RETIRED_DIR: &str = "retired";
/// The directory under the pin directory where replacement maps are made.
pub const STAGING_DIR: &str = "staging";

/// `BPF_NOEXIST`: insert only when the key is absent.
const NOEXIST: u64 = 1;

fn retired_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(RETIRED_DIR)
}

/// Removes replacement maps a migration left half done (an agent that died during one).
pub fn clear_staging(bpffs: &Path) -> Result<()> {
    remove_dir(&bpffs.join(STAGING_DIR))
}

/// Where the replacement of map `name` is pinned until [`install`].
pub fn staging_path(bpffs: &Path, name: &str) -> Result<PathBuf> {
    let dir = bpffs.join(STAGING_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.join(name))
}

/// Puts the replacement maps `names` in place of the old ones, each in one atomic exchange of
/// pins, and moves the old ones to the retired directory.
pub fn install(bpffs: &Path, names: &[&str]) -> Result<()> {
    let retired = retired_dir(bpffs);
    std::fs::create_dir_all(&retired).with_context(|| format!("creating {}", retired.display()))?;
    for name in names {
        let (new, old) = (bpffs.join(STAGING_DIR).join(name), bpffs.join(name));
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &new,
            nix::fcntl::AT_FDCWD,
            &old,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .with_context(|| format!("exchanging {} and {}", new.display(), old.display()))?;
        std::fs::rename(&new, retired.join(name))
            .with_context(|| format!("moving {} to {}", new.display(), retired.display()))?;
    }
    remove_dir(&bpffs.join(STAGING_DIR))
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// The names of the retired pins present (left by this agent or an earlier one).
pub fn retired(bpffs: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(retired_dir(bpffs)) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Copies every entry of the maps `names` still pinned under `bpffs` (the old ones) into this
/// agent's new, empty maps of those names. Returns the number of entries copied per map. A map
/// that cannot be carried over (its key or value size changed, or the new map is too small) is
/// logged and skipped.
pub fn carry_over(bpffs: &Path, maps: &mut Maps, names: &[&str]) -> Vec<(String, usize)> {
    let mut copied = Vec::new();
    for name in names {
        match copy(&bpffs.join(name), maps, name, 0) {
            Ok(Some(n)) => copied.push((name.to_string(), n)),
            Ok(None) => {}
            Err(error) => warn!(
                map = %name,
                error = format!("{error:#}"),
                "the entries of the retired map cannot be carried over: it starts empty"
            ),
        }
    }
    copied
}

/// Copies the flows the retired flow tables (conntrack, fragments, denied) hold and the new ones
/// do not: the flows the previous agent's programs tracked until they were swapped out.
pub fn carry_over_flows(bpffs: &Path, maps: &mut Maps) -> usize {
    let mut total = 0;
    for name in retired(bpffs) {
        if ![
            map_names::CONNTRACK,
            map_names::FRAGMENTS,
            map_names::DENIED,
        ]
        .contains(&name.as_str())
        {
            continue;
        }
        match copy(&retired_dir(bpffs).join(&name), maps, &name, NOEXIST) {
            Ok(n) => total += n.unwrap_or(0),
            Err(error) => warn!(
                map = %name,
                error = format!("{error:#}"),
                "carrying over the retired map's flows failed"
            ),
        }
    }
    total
}

/// Removes the retired pins and the pins of maps this agent does not have (an older layout's,
/// see the module doc), once no attached program uses them.
pub fn remove_retired(bpffs: &Path) -> Result<()> {
    let dir = retired_dir(bpffs);
    if dir.exists() {
        info!(dir = %dir.display(), "retired maps removed");
    }
    remove_dir(&dir)?;
    let Ok(entries) = std::fs::read_dir(bpffs) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && !map_names::ALL.contains(&name.as_str()) {
            let path = entry.path();
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            info!(pin = %path.display(), "pin of a map this agent does not have removed");
        }
    }
    Ok(())
}

/// Copies the map pinned at `path` into this agent's map `name` with `flags`; `None` for maps
/// whose contents are not carried over (the config is rewritten, events are transient).
fn copy(path: &Path, maps: &mut Maps, name: &str, flags: u64) -> Result<Option<usize>> {
    let open = || -> Result<Map> {
        let data =
            MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
        Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))
    };
    let n = match name {
        map_names::ENDPOINTS => copy_hash(open()?, &mut maps.endpoints, flags)?,
        map_names::INTERFACES => copy_hash(open()?, &mut maps.interfaces, flags)?,
        map_names::CONNTRACK => copy_hash(open()?, &mut maps.conntrack, flags)?,
        map_names::FRAGMENTS => copy_hash(open()?, &mut maps.fragments, flags)?,
        map_names::DENIED => copy_hash(open()?, &mut maps.denied, flags)?,
        map_names::CIDRS => copy_lpm(open()?, &mut maps.cidrs, flags)?,
        map_names::POLICY => copy_lpm(open()?, &mut maps.policy, flags)?,
        map_names::DROPS => copy_per_cpu_array(open()?, &mut maps.drops)?,
        map_names::COUNTERS => copy_per_cpu_array(open()?, &mut maps.counters)?,
        map_names::BLOCKED => copy_per_cpu_hash(open()?, &mut maps.blocked, flags)?,
        _ => return Ok(None),
    };
    Ok(Some(n))
}

/// Whether an insert failed only because the key exists (with `NOEXIST`).
fn exists(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EEXIST))
}

/// Writes `entries` with `insert`, skipping keys that exist (with `NOEXIST`); returns how
/// many were written.
fn copy_entries<K, V>(
    entries: impl Iterator<Item = Result<(K, V), MapError>>,
    mut insert: impl FnMut(&K, V) -> Result<(), MapError>,
) -> Result<usize> {
    let mut n = 0;
    for entry in entries {
        let (k, v) = entry.context("reading an entry")?;
        match insert(&k, v) {
            Ok(()) => n += 1,
            Err(e) if exists(&e) => {}
            Err(e) => return Err(e).context("writing an entry"),
        }
    }
    Ok(n)
}

fn copy_hash<K: Pod, V: Pod>(
    from: Map,
    to: &mut HashMap<MapData, K, V>,
    flags: u64,
) -> Result<usize> {
    let from: HashMap<MapData, K, V> = from.try_into().context("its layout changed")?;
    copy_entries(from.iter(), |k, v| to.insert(k, &v, flags))
}

fn copy_lpm<K: Pod, V: Pod>(
    from: Map,
    to: &mut LpmTrie<MapData, K, V>,
    flags: u64,
) -> Result<usize> {
    let from: LpmTrie<MapData, K, V> = from.try_into().context("its layout changed")?;
    copy_entries(from.iter(), |k, v| to.insert(k, &v, flags))
}

fn copy_per_cpu_array<V: Pod>(from: Map, to: &mut PerCpuArray<MapData, V>) -> Result<usize> {
    let from: PerCpuArray<MapData, V> = from.try_into().context("its layout changed")?;
    let len = from.len().min(to.len());
    for i in 0..len {
        let values = from.get(&i, 0).context("reading an entry")?;
        to.set(i, values, 0).context("writing an entry")?;
    }
    Ok(len as usize)
}

fn copy_per_cpu_hash<K: Pod, V: Pod>(
    from: Map,
    to: &mut PerCpuHashMap<MapData, K, V>,
    flags: u64,
) -> Result<usize> {
    let from: PerCpuHashMap<MapData, K, V> = from.try_into().context("its layout changed")?;
    copy_entries(from.iter(), |k, values| to.insert(k, values, flags))
}
