//! Opening the pinned maps read-only and reading them.
//!
//! aya opens pins read-write (`MapData::from_pin`); the dump asks the kernel for read-only
//! descriptors (`BPF_OBJ_GET` with `BPF_F_RDONLY`), so it cannot modify a map even by mistake.
//! For the same reason it never maps the `events` ring buffer: its size comes from the map's
//! info.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{Map, MapData, MapError};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use npc_common::map_names;

/// `BPF_OBJ_GET` with `BPF_F_RDONLY`: a read-only descriptor of the object pinned at `path`.
fn obj_get_rdonly(path: &Path) -> io::Result<OwnedFd> {
    /// The `BPF_OBJ_*` member of `union bpf_attr`; the kernel zero-extends a shorter attr.
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_int = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    let pathname = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let attr = ObjGetAttr {
        pathname: pathname.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_OBJ_GET, its size is passed along,
    // and `pathname` is a NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A map opened read-only from its pin.
pub struct Opened {
    pub path: PathBuf,
    pub max_entries: u32,
    pub data: MapData,
}

impl Opened {
    /// The map typed as `T`, which the pin must match (type, key and value sizes).
    pub fn typed<T>(self) -> Result<T>
    where
        T: TryFrom<Map, Error = MapError>,
    {
        let path = self.path;
        let wrong = || {
            format!(
                "{} is not the map this npc-agent expects (pinned by another version? \
                 `npc-agent cleanup` removes stale pins)",
                path.display()
            )
        };
        let map = Map::from_map_data(self.data).with_context(wrong)?;
        T::try_from(map).with_context(wrong)
    }
}

/// The pin directory of a (running or stopped) agent.
pub struct Pins {
    dir: PathBuf,
}

fn no_pins(dir: &Path, why: &str) -> anyhow::Error {
    anyhow!(
        "no maps pinned under {dir}: {why}. Is the agent running with `--bpffs {dir}`? Give \
         dump the directory the agent pins its maps in with --bpffs (or NPC_BPFFS)",
        dir = dir.display()
    )
}

impl Pins {
    /// Checks that `dir` holds at least one of npc's maps.
    pub fn new(dir: &Path) -> Result<Pins> {
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(no_pins(dir, "the directory does not exist"));
            }
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", dir.display())),
            Ok(m) if !m.is_dir() => return Err(no_pins(dir, "it is not a directory")),
            Ok(_) => {}
        }
        if !map_names::ALL.iter().any(|name| dir.join(name).exists()) {
            let on_bpffs = statfs(dir).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
            let why = if on_bpffs {
                "it holds none of npc's maps"
            } else {
                "it is not on a bpffs (note that `ip netns exec` hides the host's /sys/fs/bpf)"
            };
            return Err(no_pins(dir, why));
        }
        Ok(Pins {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens map `name` read-only; `None` when it is not pinned.
    pub fn open(&self, name: &str) -> Result<Option<Opened>> {
        let path = self.dir.join(name);
        let fd = match obj_get_rdonly(&path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                return Err(e).with_context(|| {
                    format!(
                        "opening {} read-only (reading BPF maps needs root, or CAP_BPF)",
                        path.display()
                    )
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                bail!("{} is not a pinned BPF map", path.display())
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let data =
            MapData::from_fd(fd).with_context(|| format!("inspecting {}", path.display()))?;
        let max_entries = data
            .info()
            .with_context(|| format!("inspecting {}", path.display()))?
            .max_entries();
        Ok(Some(Opened {
            path,
            max_entries,
            data,
        }))
    }

    /// Opens map `name` read-only; an error naming the path when it is not pinned.
    pub fn require(&self, name: &str) -> Result<Opened> {
        self.open(name)?.with_context(|| {
            format!(
                "map {name} is not pinned under {} (no {}: an agent of another version?)",
                self.dir.display(),
                self.dir.join(name).display()
            )
        })
    }
}

/// Reads every entry of an iterable map, at most `limit` of them: deleting the key that a
/// `BPF_MAP_GET_NEXT_KEY` walk stands on restarts the walk, so a busy map can yield entries
/// twice (callers sort and deduplicate) and, in theory, forever. Returns the entries and whether
/// the limit cut the walk short.
pub fn collect<T, E>(
    iter: impl Iterator<Item = Result<T, E>>,
    limit: usize,
    what: &str,
) -> Result<(Vec<T>, bool)>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let mut out = Vec::new();
    for item in iter {
        if out.len() == limit {
            return Ok((out, true));
        }
        out.push(item.with_context(|| format!("reading {what}"))?);
    }
    Ok((out, false))
}

/// The name of interface `ifindex` in this process's network namespace.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write, NUL included.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}
