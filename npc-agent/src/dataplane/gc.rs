//! Conntrack garbage collection: a periodic walk that deletes expired entries and reports the
//! table's fill (`npc_conntrack_entries`, `npc_conntrack_gc_deleted_total`).
//!
//! The datapath's conntrack is an LRU hash, so a full table evicts rather than fails; the GC
//! keeps it from filling with dead flows and gives the fill an honest number.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::MapError;
use npc_common::{CtKey, map_names};
use tokio::{task::JoinHandle, time::MissedTickBehavior};
use tracing::{debug, warn};

use super::maps::{Maps, monotonic_ns};
use crate::metrics::Metrics;

/// The shortest interval [`spawn_conntrack_gc`] accepts.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// What one walk did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Expired entries deleted.
    pub deleted: u64,
    /// Entries left (as seen by the walk: the datapath adds and evicts while it runs).
    pub remaining: u64,
}

/// Every `interval` (at least [`MIN_INTERVAL`]; the first walk at once), walks the conntrack
/// pinned under `bpffs` once, deletes the expired entries and updates `metrics`. Opens its own
/// handle on the maps (retried on the next tick if the pins are not there yet); the walk runs on
/// the blocking pool. Errors are logged, never fatal. Runs until aborted.
pub fn spawn_conntrack_gc(bpffs: PathBuf, interval: Duration, metrics: Metrics) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval.max(MIN_INTERVAL));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut held: Option<Gc> = None;
        loop {
            ticker.tick().await;
            let dir = bpffs.clone();
            let gc = held.take();
            let walked = tokio::task::spawn_blocking(move || {
                let mut gc = match gc {
                    Some(gc) => gc,
                    None => match Gc::open(&dir) {
                        Ok(gc) => gc,
                        Err(e) => return (None, Err(e)),
                    },
                };
                let r = gc.collect(monotonic_ns());
                (Some(gc), r)
            })
            .await;
            match walked {
                Ok((gc, Ok(stats))) => {
                    held = gc;
                    metrics.observe_conntrack_gc(stats.remaining, stats.deleted);
                    debug!(
                        deleted = stats.deleted,
                        remaining = stats.remaining,
                        "conntrack GC"
                    );
                }
                Ok((gc, Err(e))) => {
                    held = gc;
                    warn!(error = format!("{e:#}"), "conntrack GC failed");
                }
                // The handle went with the task; the next tick reopens it.
                Err(e) => warn!(error = %e, "conntrack GC panicked"),
            }
        }
    })
}

/// The GC's own handle on the maps.
struct Gc {
    maps: Maps,
    /// `max_entries` of conntrack: bounds the walk.
    capacity: u64,
}

impl Gc {
    fn open(dir: &Path) -> Result<Gc> {
        let mut maps = Maps::open(dir)?;
        // Only the event reader reads events.
        maps.events = None;
        let (_, capacity) = crate::metrics::max_entries(dir, map_names::CONNTRACK)?;
        Ok(Gc {
            maps,
            capacity: u64::from(capacity),
        })
    }

    fn collect(&mut self, now_ns: u64) -> Result<GcStats> {
        collect_conntrack(&mut self.maps, self.capacity, now_ns)
    }
}

/// Walks conntrack once: deletes the entries expired at `now_ns` and counts the rest.
///
/// The walk is bounded to twice `capacity` steps: a key deleted by the datapath under the walk
/// makes the kernel restart the key iteration from the start, which must not loop forever (the
/// count is then an estimate, capped at `capacity`). An entry is checked again just before its
/// deletion, so one that a packet refreshed meanwhile survives.
pub fn collect_conntrack(maps: &mut Maps, capacity: u64, now_ns: u64) -> Result<GcStats> {
    let limit =
        usize::try_from(capacity.saturating_mul(2).saturating_add(16)).unwrap_or(usize::MAX);
    let mut seen = 0u64;
    let mut expired: Vec<CtKey> = Vec::new();
    for item in maps.conntrack.iter().take(limit) {
        let (key, entry) = item.context("walking conntrack")?;
        seen += 1;
        if entry.expired(key.protocol, now_ns) {
            expired.push(key);
        }
    }
    expired.sort_unstable();
    expired.dedup();
    let mut deleted = 0u64;
    let mut kept = 0u64;
    for key in &expired {
        match maps.conntrack.get(key, 0) {
            Ok(entry) if !entry.expired(key.protocol, monotonic_ns().max(now_ns)) => {
                kept += 1;
                continue;
            }
            Ok(_) => {}
            Err(e) if missing(&e) => continue,
            Err(e) => return Err(e).context("reading a conntrack entry"),
        }
        match maps.conntrack.remove(key) {
            Ok(()) => deleted += 1,
            Err(e) if missing(&e) => {}
            Err(e) => return Err(e).context("deleting an expired conntrack entry"),
        }
    }
    let remaining = seen
        .saturating_sub(expired.len() as u64)
        .saturating_add(kept)
        .min(capacity);
    Ok(GcStats { deleted, remaining })
}

/// The entry is gone (evicted, or deleted by the datapath): nothing to do.
fn missing(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use npc_common::{CT_REPLIED, CtEntry, NS_PER_SEC, ipproto, ipv4_mapped};

    use super::*;
    use crate::dataplane::{Datapath, LoadOptions, remove_pins};

    /// Loads the real datapath (root and BPF needed) and collects a conntrack with live and
    /// expired entries, directly and through the spawned task.
    #[test]
    fn gc_deletes_expired_entries_and_counts_the_rest() {
        struct Pins(PathBuf);
        impl Drop for Pins {
            fn drop(&mut self) {
                let _ = remove_pins(&self.0);
            }
        }
        let pins = Pins(PathBuf::from(format!(
            "/sys/fs/bpf/npc-gc-test-{}",
            std::process::id()
        )));
        let mut opts = LoadOptions::new(&pins.0);
        opts.conntrack_capacity = 1024;
        let mut datapath = Datapath::load(&opts).expect("loading the datapath");

        let now = monotonic_ns();
        let key = |i: u8, protocol: u8| {
            CtKey::new(
                ipv4_mapped([10, 0, 0, 1]),
                ipv4_mapped([10, 0, 1, i]),
                1000 + u16::from(i),
                80,
                protocol,
            )
        };
        let entry = |idle_s: u64, flags: u16| CtEntry {
            created_ns: now.saturating_sub(idle_s * NS_PER_SEC),
            last_seen_ns: now.saturating_sub(idle_s * NS_PER_SEC),
            flags,
            ..CtEntry::default()
        };
        let ct = &mut datapath.maps.conntrack;
        // Live: fresh UDP, established TCP idle for 10 minutes.
        ct.insert(&key(1, ipproto::UDP), &entry(1, 0), 0).unwrap();
        ct.insert(&key(2, ipproto::TCP), &entry(600, CT_REPLIED), 0)
            .unwrap();
        // Expired: UDP idle for 2 minutes, a handshake idle for 2 minutes.
        ct.insert(&key(3, ipproto::UDP), &entry(120, 0), 0).unwrap();
        ct.insert(&key(4, ipproto::TCP), &entry(120, 0), 0).unwrap();

        let mut gc = Gc::open(&pins.0).unwrap();
        assert_eq!(gc.capacity, 1024);
        assert_eq!(
            gc.collect(monotonic_ns()).unwrap(),
            GcStats {
                deleted: 2,
                remaining: 2
            }
        );
        assert!(
            datapath
                .maps
                .conntrack
                .get(&key(3, ipproto::UDP), 0)
                .is_err()
        );
        assert!(
            datapath
                .maps
                .conntrack
                .get(&key(1, ipproto::UDP), 0)
                .is_ok()
        );

        // The task: one more expired entry, collected at its first tick.
        datapath
            .maps
            .conntrack
            .insert(&key(5, ipproto::ICMP), &entry(61, 0), 0)
            .unwrap();
        let metrics = Metrics::without_datapath();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let task =
                spawn_conntrack_gc(pins.0.clone(), Duration::from_secs(3600), metrics.clone());
            for _ in 0..200 {
                if metrics
                    .encode()
                    .unwrap()
                    .contains("npc_conntrack_gc_deleted_total 1")
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            task.abort();
        });
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("\nnpc_conntrack_gc_deleted_total 1\n"),
            "{text}"
        );
        assert!(text.contains("\nnpc_conntrack_entries 2\n"), "{text}");
        assert!(
            text.contains("\nnpc_map_entries{map=\"conntrack\"} 2\n"),
            "{text}"
        );
        drop(rt);
        drop(datapath);
    }
}
