//! The agent's Prometheus metrics, served as OpenMetrics text at `/metrics` (see `crate::http`).
//!
//! One [`Registry`] holds three kinds of metrics:
//! - **agent-side** metrics the agent sets as it works (policy syncs, the state's size, invalid
//!   objects, attached interfaces, conntrack GC), through the cheap `&self` methods of
//!   [`Metrics`];
//! - **datapath** metrics read from the pinned BPF maps at scrape time by a collector
//!   ([`datapath`]) that holds its own handle on the maps, so a scrape never contends with the
//!   sync loop's;
//! - **process** metrics read from `/proc/self` at scrape time ([`process`]), with the standard
//!   Prometheus names (`process_cpu_seconds_total`, ...).
//!
//! Every family name starts with `npc_` except the `process_*` ones. Counters end in `_total`.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex, PoisonError, atomic::AtomicU64},
    time::Duration,
};

use anyhow::{Context as _, Result};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Registry, Unit},
};

mod datapath;
mod process;

pub(crate) use datapath::max_entries;
pub use datapath::{BlockedLabels, BlockedSeries, Dport, blocked_series};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of `npc_policy_sync_duration_seconds`: 1 ms to 10 s.
const SYNC_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A gauge of non-negative integers.
type UGauge = Gauge<u64, AtomicU64>;

/// The size of the cluster state as the last successful sync left it in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateStats {
    /// Distinct identities (`npc_identities`).
    pub identities: u64,
    /// Addresses of pods on this node (`npc_endpoints{local="true"}`).
    pub local_endpoints: u64,
    /// Addresses of pods elsewhere (`npc_endpoints{local="false"}`).
    pub remote_endpoints: u64,
    /// Entries of the maps the agent writes (`endpoints`, `interfaces`, `cidrs`, `policy`), by
    /// map name (`npc_map_entries{map}`).
    pub map_entries: Vec<(&'static str, u64)>,
}

/// The outcome of a policy sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SyncResult {
    Success,
    Error,
}

impl EncodeLabelValue for SyncResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            SyncResult::Success => "success",
            SyncResult::Error => "error",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: SyncResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LocalLabels {
    local: bool,
}

/// `{map}`: a map's name as pinned (`npc_common::map_names`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// `{resource}`: an API resource the kube source watches (`pods`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The agent's metrics: cheap to clone (one `Arc`), shared by the sync loop, the conntrack GC
/// and the HTTP server.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    sync_duration: Histogram,
    syncs: Family<ResultLabels, Counter>,
    identities: UGauge,
    endpoints: Family<LocalLabels, UGauge>,
    /// `npc_map_entries`: not registered itself but encoded by the datapath collector, which
    /// adds the maps it walks at scrape time (one family must come from one place).
    map_entries: Family<MapLabels, UGauge>,
    invalid_objects: Family<KindLabels, UGauge>,
    /// Every kind `set_invalid_objects` has seen, so that a kind that went away reads 0.
    invalid_kinds: Mutex<BTreeSet<String>>,
    attached_interfaces: UGauge,
    conntrack_entries: UGauge,
    conntrack_gc_deleted: Counter,
    kube_watch_errors: Family<ResourceLabels, Counter>,
}

impl Metrics {
    /// The metrics of an agent whose datapath is pinned under `bpffs` (load it first): opens the
    /// collector's own handle on the pinned maps and reads their capacities.
    pub fn new(bpffs: &Path) -> Result<Metrics> {
        let maps = crate::dataplane::Maps::open(bpffs)
            .context("opening the pinned maps for the metrics collector")?;
        let capacities = datapath::map_capacities(bpffs);
        Ok(Metrics::build(Some((maps, capacities))))
    }

    /// The agent-side and process metrics only, without a datapath (for tests, and for an agent
    /// that serves before its datapath is loaded).
    pub fn without_datapath() -> Metrics {
        Metrics::build(None)
    }

    fn build(datapath: Option<(crate::dataplane::Maps, Vec<(&'static str, u64)>)>) -> Metrics {
        let mut registry = Registry::default();

        let sync_duration = Histogram::new(SYNC_BUCKETS);
        registry.register_with_unit(
            "npc_policy_sync_duration",
            "Time to bring the maps to the cluster state (compile, diff, write), per sync",
            Unit::Seconds,
            sync_duration.clone(),
        );
        let syncs = Family::<ResultLabels, Counter>::default();
        registry.register("npc_policy_syncs", "Policy syncs, by result", syncs.clone());
        // Both series exist from the start.
        for result in [SyncResult::Success, SyncResult::Error] {
            let _ = syncs.get_or_create(&ResultLabels { result });
        }

        let identities = UGauge::default();
        registry.register(
            "npc_identities",
            "Distinct identities (namespace, labels, named ports) in the last synced state",
            identities.clone(),
        );
        let endpoints = Family::<LocalLabels, UGauge>::default();
        registry.register(
            "npc_endpoints",
            "Pod addresses known to the datapath, on this node (local=\"true\") or elsewhere",
            endpoints.clone(),
        );
        for local in [true, false] {
            let _ = endpoints.get_or_create(&LocalLabels { local });
        }

        let invalid_objects = Family::<KindLabels, UGauge>::default();
        registry.register(
            "npc_invalid_objects",
            "Objects of the policy source that could not be used, by kind",
            invalid_objects.clone(),
        );

        let attached_interfaces = UGauge::default();
        registry.register(
            "npc_attached_interfaces",
            "Interfaces the datapath is attached to",
            attached_interfaces.clone(),
        );

        let conntrack_entries = UGauge::default();
        registry.register(
            "npc_conntrack_entries",
            "Conntrack entries left after the last garbage collection",
            conntrack_entries.clone(),
        );
        let conntrack_gc_deleted = Counter::default();
        registry.register(
            "npc_conntrack_gc_deleted",
            "Expired conntrack entries deleted by the agent's garbage collection",
            conntrack_gc_deleted.clone(),
        );

        let kube_watch_errors = Family::<ResourceLabels, Counter>::default();
        registry.register(
            "npc_kube_watch_errors",
            "Failed lists and watches of the Kubernetes API, by resource (each is retried with \
             backoff; the state in force stays meanwhile)",
            kube_watch_errors.clone(),
        );

        registry.register(
            "npc_build",
            "The agent's build",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );

        let map_entries = Family::<MapLabels, UGauge>::default();
        registry.register_collector(Box::new(datapath::DatapathCollector::new(
            datapath,
            map_entries.clone(),
        )));
        registry.register_collector(Box::new(process::ProcessCollector));

        Metrics {
            inner: Arc::new(Inner {
                registry,
                sync_duration,
                syncs,
                identities,
                endpoints,
                map_entries,
                invalid_objects,
                invalid_kinds: Mutex::new(BTreeSet::new()),
                attached_interfaces,
                conntrack_entries,
                conntrack_gc_deleted,
                kube_watch_errors,
            }),
        }
    }

    /// Records one policy sync: `npc_policy_sync_duration_seconds` and
    /// `npc_policy_syncs_total{result}`.
    pub fn observe_sync(&self, took: Duration, ok: bool) {
        self.inner.sync_duration.observe(took.as_secs_f64());
        let result = if ok {
            SyncResult::Success
        } else {
            SyncResult::Error
        };
        self.inner
            .syncs
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Records the state a successful sync left in the maps: `npc_identities`,
    /// `npc_endpoints{local}` and `npc_map_entries{map}` of the maps the agent writes.
    pub fn set_state(&self, s: &StateStats) {
        let i = &self.inner;
        i.identities.set(s.identities);
        i.endpoints
            .get_or_create(&LocalLabels { local: true })
            .set(s.local_endpoints);
        i.endpoints
            .get_or_create(&LocalLabels { local: false })
            .set(s.remote_endpoints);
        for &(map, n) in &s.map_entries {
            i.map_entries.get_or_create(&MapLabels { map }).set(n);
        }
    }

    /// Sets `npc_invalid_objects{kind}` from the current counts; a kind seen before and absent
    /// now reads 0.
    pub fn set_invalid_objects(&self, by_kind: &BTreeMap<String, u64>) {
        let mut kinds = self
            .inner
            .invalid_kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        kinds.extend(by_kind.keys().cloned());
        for kind in kinds.iter() {
            let n = by_kind.get(kind).copied().unwrap_or(0);
            self.inner
                .invalid_objects
                .get_or_create(&KindLabels { kind: kind.clone() })
                .set(n);
        }
    }

    /// Sets `npc_attached_interfaces`.
    pub fn set_attached_interfaces(&self, n: u64) {
        self.inner.attached_interfaces.set(n);
    }

    /// Records one conntrack garbage collection: `remaining` entries are left
    /// (`npc_conntrack_entries`, `npc_map_entries{map="conntrack"}`), `deleted` were removed
    /// (`npc_conntrack_gc_deleted_total`).
    pub fn observe_conntrack_gc(&self, remaining: u64, deleted: u64) {
        let i = &self.inner;
        i.conntrack_entries.set(remaining);
        i.map_entries
            .get_or_create(&MapLabels {
                map: npc_common::map_names::CONNTRACK,
            })
            .set(remaining);
        i.conntrack_gc_deleted.inc_by(deleted);
    }

    /// Creates the `npc_kube_watch_errors_total` series of the watched resources at 0.
    pub fn init_kube_watch_errors(&self, resources: &[&'static str]) {
        for &resource in resources {
            let _ = self
                .inner
                .kube_watch_errors
                .get_or_create(&ResourceLabels { resource });
        }
    }

    /// Counts one failed list or watch of `resource` (`npc_kube_watch_errors_total`).
    pub fn observe_kube_watch_error(&self, resource: &'static str) {
        self.inner
            .kube_watch_errors
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }

    /// Every metric as OpenMetrics text ([`CONTENT_TYPE`]), ending in `# EOF`. Reads the BPF
    /// maps and `/proc`: call it from a blocking context.
    pub fn encode(&self) -> Result<String> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .context("encoding the metrics")?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` (no comments), for exact matching.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    fn has(text: &str, line: &str) -> bool {
        samples(text).contains(&line)
    }

    #[test]
    fn fresh_metrics_have_the_agent_families() {
        let text = Metrics::without_datapath().encode().unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in [
            "npc_policy_syncs_total{result=\"success\"} 0",
            "npc_policy_syncs_total{result=\"error\"} 0",
            "npc_policy_sync_duration_seconds_count 0",
            "npc_identities 0",
            "npc_endpoints{local=\"true\"} 0",
            "npc_endpoints{local=\"false\"} 0",
            "npc_attached_interfaces 0",
            "npc_conntrack_entries 0",
            "npc_conntrack_gc_deleted_total 0",
        ] {
            assert!(has(&text, line), "missing {line:?} in\n{text}");
        }
        let build = format!(
            "npc_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(has(&text, &build), "{text}");
        for meta in [
            "# TYPE npc_policy_sync_duration_seconds histogram",
            "# UNIT npc_policy_sync_duration_seconds seconds",
            "# TYPE npc_policy_syncs counter",
            "# TYPE npc_map_entries gauge",
            "# TYPE npc_build info",
        ] {
            assert!(
                text.lines().any(|l| l == meta),
                "missing {meta:?} in\n{text}"
            );
        }
        // Without a datapath there is nothing to read from BPF.
        assert!(!text.contains("npc_dropped_packets"), "{text}");
    }

    #[test]
    fn observe_sync_counts_and_times() {
        let m = Metrics::without_datapath();
        m.observe_sync(Duration::from_millis(3), true);
        m.observe_sync(Duration::from_millis(30), true);
        m.observe_sync(Duration::from_secs(20), false);
        let text = m.encode().unwrap();
        for line in [
            "npc_policy_syncs_total{result=\"success\"} 2",
            "npc_policy_syncs_total{result=\"error\"} 1",
            "npc_policy_sync_duration_seconds_count 3",
            "npc_policy_sync_duration_seconds_bucket{le=\"0.001\"} 0",
            "npc_policy_sync_duration_seconds_bucket{le=\"0.005\"} 1",
            "npc_policy_sync_duration_seconds_bucket{le=\"0.05\"} 2",
            "npc_policy_sync_duration_seconds_bucket{le=\"10.0\"} 2",
            "npc_policy_sync_duration_seconds_bucket{le=\"+Inf\"} 3",
        ] {
            assert!(has(&text, line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn set_state_sets_sizes() {
        let m = Metrics::without_datapath();
        m.set_state(&StateStats {
            identities: 7,
            local_endpoints: 3,
            remote_endpoints: 40,
            map_entries: vec![
                ("endpoints", 43),
                ("interfaces", 3),
                ("cidrs", 2),
                ("policy", 120),
            ],
        });
        m.observe_conntrack_gc(12, 5);
        m.observe_conntrack_gc(10, 4);
        m.set_attached_interfaces(4);
        let text = m.encode().unwrap();
        for line in [
            "npc_identities 7",
            "npc_endpoints{local=\"true\"} 3",
            "npc_endpoints{local=\"false\"} 40",
            "npc_map_entries{map=\"endpoints\"} 43",
            "npc_map_entries{map=\"interfaces\"} 3",
            "npc_map_entries{map=\"cidrs\"} 2",
            "npc_map_entries{map=\"policy\"} 120",
            "npc_map_entries{map=\"conntrack\"} 10",
            "npc_conntrack_entries 10",
            "npc_conntrack_gc_deleted_total 9",
            "npc_attached_interfaces 4",
        ] {
            assert!(has(&text, line), "missing {line:?} in\n{text}");
        }
        // One family, one descriptor.
        assert_eq!(text.matches("# TYPE npc_map_entries ").count(), 1);
    }

    #[test]
    fn invalid_objects_reset_kinds_that_went_away() {
        let m = Metrics::without_datapath();
        let mut kinds = BTreeMap::new();
        kinds.insert("NetworkPolicy".to_string(), 2);
        kinds.insert("Pod".to_string(), 1);
        m.set_invalid_objects(&kinds);
        let text = m.encode().unwrap();
        assert!(
            has(&text, "npc_invalid_objects{kind=\"NetworkPolicy\"} 2"),
            "{text}"
        );
        assert!(has(&text, "npc_invalid_objects{kind=\"Pod\"} 1"), "{text}");

        kinds.remove("Pod");
        kinds.insert("NetworkPolicy".to_string(), 1);
        m.set_invalid_objects(&kinds);
        let text = m.encode().unwrap();
        assert!(
            has(&text, "npc_invalid_objects{kind=\"NetworkPolicy\"} 1"),
            "{text}"
        );
        assert!(has(&text, "npc_invalid_objects{kind=\"Pod\"} 0"), "{text}");
    }

    #[test]
    fn metrics_are_shareable() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<Metrics>();
    }
}
