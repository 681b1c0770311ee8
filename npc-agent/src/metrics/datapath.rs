//! The datapath's metrics, read from the pinned BPF maps at scrape time.
//!
//! The collector owns its own [`Maps`] (opened from the pins) behind a mutex: a scrape never
//! waits for the sync loop, and two scrapes take turns. Per-CPU counters are summed over CPUs.
//! A map that cannot be read is logged and its families are left out of that scrape; the rest
//! is still served.
use std::{
    collections::BTreeMap,
    fmt,
    path::Path,
    sync::{Mutex, PoisonError},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, MapType};
use npc_common::{
    BLOCKED_AUDIT, BLOCKED_OVERFLOW, Counter, Direction, ProtoClass, ipproto, map_names,
};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{MetricType, counter::ConstCounter, family::Family, gauge::ConstGauge},
};
use tracing::{debug, warn};

use super::{MapLabels, UGauge};
use crate::dataplane::{BlockedCount, DropCount, Maps};

/// The `dport` label of `npc_blocked_connections_total` and `npc_audit_would_block_total`.
///
/// - `Port(p)`: the destination port, for the protocols that have ports (TCP, UDP, SCTP);
/// - `None` (`dport="none"`): a protocol without ports (ICMP, ICMPv6, others). Not `"0"`, which
///   reads like a real (if odd) port number;
/// - `Other` (`dport="other"`): the overflow cell of (direction, protocol), which counts every
///   port that found the `blocked` map full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dport {
    Port(u16),
    None,
    Other,
}

impl EncodeLabelValue for Dport {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        use fmt::Write as _;
        match self {
            Dport::Port(p) => write!(encoder, "{p}"),
            Dport::None => encoder.write_str("none"),
            Dport::Other => encoder.write_str("other"),
        }
    }
}

/// `{direction, protocol, dport}` of a blocked-connection series. `protocol` is the protocol's
/// class name (`tcp`, `udp`, `sctp`, `icmp`, `icmpv6`, or `other` for any other protocol number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct BlockedLabels {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub dport: Dport,
}

/// The `blocked` map's cells as series: denied connections, and those audit mode let through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockedSeries {
    /// `npc_blocked_connections_total`: cells without `BLOCKED_AUDIT`.
    pub blocked: BTreeMap<BlockedLabels, u64>,
    /// `npc_audit_would_block_total`: cells with `BLOCKED_AUDIT`.
    pub audit: BTreeMap<BlockedLabels, u64>,
}

/// Maps `blocked` cells to labelled series. Cells that get the same labels (an overflow cell
/// and, say, a cell of an unclassified protocol) are summed.
pub fn blocked_series(cells: &[BlockedCount]) -> BlockedSeries {
    let mut out = BlockedSeries::default();
    for cell in cells {
        let key = cell.key;
        let class = ProtoClass::of(key.protocol);
        let dport = if key.flags & BLOCKED_OVERFLOW != 0 {
            Dport::Other
        } else if matches!(key.protocol, ipproto::TCP | ipproto::UDP | ipproto::SCTP) {
            Dport::Port(key.dport)
        } else {
            Dport::None
        };
        let labels = BlockedLabels {
            direction: Direction::from_u8(key.direction).map_or("unknown", Direction::as_str),
            protocol: class.as_str(),
            dport,
        };
        let series = if key.flags & BLOCKED_AUDIT != 0 {
            &mut out.audit
        } else {
            &mut out.blocked
        };
        let n = series.entry(labels).or_default();
        *n = n.wrapping_add(cell.connections);
    }
    out
}

/// A map's type and `max_entries`, from the kernel's info on its pin under `dir`.
pub(crate) fn max_entries(dir: &Path, name: &str) -> Result<(MapType, u32)> {
    let path = dir.join(name);
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let info = map
        .info()
        .with_context(|| format!("reading the info of map {name}"))?;
    let ty = info
        .map_type()
        .with_context(|| format!("reading the type of map {name}"))?;
    Ok((ty, info.max_entries()))
}

/// `npc_map_capacity`: `max_entries` of every pinned map for which it is a number of entries
/// that can fill up (hashes and tries). Arrays (fixed size, always "full") and the ring buffer
/// (whose `max_entries` is a size in bytes) are left out. Capacities are fixed for a map's life,
/// so they are read once.
pub(super) fn map_capacities(dir: &Path) -> Vec<(&'static str, u64)> {
    let mut out = Vec::new();
    for name in map_names::ALL {
        match max_entries(dir, name) {
            Ok((
                MapType::Hash
                | MapType::LruHash
                | MapType::PerCpuHash
                | MapType::LruPerCpuHash
                | MapType::LpmTrie,
                n,
            )) => out.push((name, u64::from(n))),
            Ok(_) => {}
            Err(e) => debug!(map = name, error = format!("{e:#}"), "no capacity metric"),
        }
    }
    out
}

/// What one scrape read from the maps; `None`: reading failed (logged).
#[derive(Default)]
struct Snapshot {
    drops: Option<Vec<DropCount>>,
    blocked: Option<Vec<BlockedCount>>,
    counters: Option<Vec<(Counter, u64)>>,
    allowed: Option<Vec<(Direction, ProtoClass, u64)>>,
    /// Entries of the small maps walked at scrape time.
    entries: Vec<(&'static str, u64)>,
}

fn logged<T>(what: &str, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(error = format!("{e:#}"), "metrics: reading {what} failed");
            None
        }
    }
}

impl Snapshot {
    fn read(maps: &Maps) -> Snapshot {
        let drops = logged("drops", maps.drops());
        let blocked = logged("blocked", maps.blocked());
        let counters = logged(
            "counters",
            Counter::ALL
                .iter()
                .map(|&c| Ok((c, maps.counter(c)?)))
                .collect(),
        );
        let allowed = logged(
            "allowed connections",
            Direction::ALL
                .iter()
                .flat_map(|&d| ProtoClass::ALL.iter().map(move |&p| (d, p)))
                .map(|(d, p)| Ok((d, p, maps.allowed(d, p)?)))
                .collect(),
        );
        // Small maps (thousands of entries at most): counting them costs little.
        let mut entries = Vec::new();
        if let Some(n) = logged(
            "fragments",
            count(maps.fragments.keys()).context("walking fragments"),
        ) {
            entries.push((map_names::FRAGMENTS, n));
        }
        if let Some(n) = logged(
            "blocked",
            count(maps.blocked.keys()).context("walking blocked"),
        ) {
            entries.push((map_names::BLOCKED, n));
        }
        Snapshot {
            drops,
            blocked,
            counters,
            allowed,
            entries,
        }
    }
}

fn count<K>(keys: impl Iterator<Item = Result<K, aya::maps::MapError>>) -> Result<u64> {
    let mut n = 0;
    for k in keys {
        k?;
        n += 1;
    }
    Ok(n)
}

/// Labels of `npc_dropped_packets_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    direction: &'static str,
    protocol: &'static str,
    reason: &'static str,
}

/// Labels of `npc_allowed_connections_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AllowedLabels {
    direction: &'static str,
    protocol: &'static str,
}

/// Labels of `npc_datapath_events_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

/// One family of constant values read at scrape time.
fn family<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (S, u64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, v) in series {
        let sample = metric.encode_family(&labels)?;
        match metric_type {
            MetricType::Counter => ConstCounter::new(v).encode(sample)?,
            _ => ConstGauge::new(v).encode(sample)?,
        }
    }
    Ok(())
}

/// One unlabelled counter read at scrape time.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(metric)
}

/// The counters with a family of their own; the others go to `npc_datapath_events_total`.
const OWN_FAMILY: [(Counter, &str, &str); 3] = [
    (
        Counter::EventsLost,
        "npc_events_lost",
        "Deny events lost because the ring buffer was full.",
    ),
    (
        Counter::EventsRateLimited,
        "npc_events_rate_limited",
        "Deny events suppressed by the datapath's per-CPU rate limit.",
    ),
    (
        Counter::EventsSubmitted,
        "npc_events_submitted",
        "Deny events written to the ring buffer.",
    ),
];

/// Reads the maps on every scrape; also encodes `npc_map_entries`, whose agent-side values it
/// shares with [`super::Metrics`].
pub(super) struct DatapathCollector {
    /// `None`: no datapath (only `npc_map_entries` as the agent set it).
    maps: Option<Mutex<Maps>>,
    capacities: Vec<(&'static str, u64)>,
    map_entries: Family<MapLabels, UGauge>,
}

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatapathCollector")
            .field("maps", &self.maps.is_some())
            .field("capacities", &self.capacities)
            .finish_non_exhaustive()
    }
}

impl DatapathCollector {
    pub(super) fn new(
        datapath: Option<(Maps, Vec<(&'static str, u64)>)>,
        map_entries: Family<MapLabels, UGauge>,
    ) -> DatapathCollector {
        let (maps, capacities) = match datapath {
            Some((mut maps, capacities)) => {
                // The event reader has its own; this handle never reads events.
                maps.events = None;
                (Some(Mutex::new(maps)), capacities)
            }
            None => (None, Vec::new()),
        };
        DatapathCollector {
            maps,
            capacities,
            map_entries,
        }
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let snapshot = match &self.maps {
            Some(maps) => Snapshot::read(&maps.lock().unwrap_or_else(PoisonError::into_inner)),
            None => Snapshot::default(),
        };
        let enc = &mut encoder;
        if let Some(drops) = snapshot.drops {
            family(
                enc,
                "npc_dropped_packets",
                "Packets the datapath dropped, by direction, protocol and reason.",
                MetricType::Counter,
                drops.iter().map(|d| {
                    let labels = DropLabels {
                        direction: d.direction.as_str(),
                        protocol: d.proto.as_str(),
                        reason: d.reason.as_str(),
                    };
                    (labels, d.packets)
                }),
            )?;
        }
        if let Some(cells) = snapshot.blocked {
            let series = blocked_series(&cells);
            family(
                enc,
                "npc_blocked_connections",
                "New connections denied by policy, by direction, protocol and destination port \
                 (dport=\"none\": a protocol without ports; \"other\": the ports that found the \
                 blocked map full).",
                MetricType::Counter,
                series.blocked,
            )?;
            family(
                enc,
                "npc_audit_would_block",
                "New connections policy would deny that audit mode let through, by direction, \
                 protocol and destination port (as npc_blocked_connections_total).",
                MetricType::Counter,
                series.audit,
            )?;
        }
        if let Some(allowed) = snapshot.allowed {
            family(
                enc,
                "npc_allowed_connections",
                "New connections allowed by policy, by direction and protocol.",
                MetricType::Counter,
                allowed.iter().map(|&(d, p, n)| {
                    let labels = AllowedLabels {
                        direction: d.as_str(),
                        protocol: p.as_str(),
                    };
                    (labels, n)
                }),
            )?;
        }
        if let Some(counters) = snapshot.counters {
            let value = |c: Counter| {
                counters
                    .iter()
                    .find(|(k, _)| *k == c)
                    .map_or(0, |&(_, n)| n)
            };
            for (c, name, help) in OWN_FAMILY {
                counter(enc, name, help, value(c))?;
            }
            family(
                enc,
                "npc_datapath_events",
                "Other datapath events, by event: icmp_related (ICMP errors passed for a tracked \
                 flow), fragments_passed, unknown_endpoint_passed, rechecked (tracked flows that \
                 passed a re-check after a policy change), ct_insert_failed, blocked_overflow, \
                 audit_would_block.",
                MetricType::Counter,
                counters
                    .iter()
                    .filter(|(c, _)| !OWN_FAMILY.iter().any(|(o, _, _)| o == c))
                    .map(|&(c, n)| (EventLabels { event: c.as_str() }, n)),
            )?;
        }
        if !self.capacities.is_empty() {
            family(
                enc,
                "npc_map_capacity",
                "Maximum entries of a BPF map (hashes and tries).",
                MetricType::Gauge,
                self.capacities
                    .iter()
                    .map(|&(map, n)| (MapLabels { map }, n)),
            )?;
        }
        for (map, n) in snapshot.entries {
            self.map_entries.get_or_create(&MapLabels { map }).set(n);
        }
        let metric = enc.encode_descriptor(
            "npc_map_entries",
            "Entries of a BPF map: as the agent last wrote them (endpoints, interfaces, cidrs, \
             policy), as the last conntrack GC found them (conntrack), or counted at scrape time \
             (fragments, blocked).",
            None,
            MetricType::Gauge,
        )?;
        self.map_entries.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use npc_common::BlockedKey;

    use super::*;

    fn cell(direction: Direction, protocol: u8, dport: u16, flags: u32, n: u64) -> BlockedCount {
        BlockedCount {
            key: BlockedKey {
                dport,
                direction: direction as u8,
                protocol,
                flags,
            },
            connections: n,
        }
    }

    fn labels(direction: &'static str, protocol: &'static str, dport: Dport) -> BlockedLabels {
        BlockedLabels {
            direction,
            protocol,
            dport,
        }
    }

    #[test]
    fn blocked_cells_become_labelled_series() {
        use Direction::{Egress, Ingress};
        let cells = [
            cell(Ingress, ipproto::TCP, 80, 0, 5),
            cell(Ingress, ipproto::TCP, 443, 0, 1),
            cell(Egress, ipproto::UDP, 53, 0, 2),
            cell(Egress, ipproto::SCTP, 9, 0, 1),
            cell(Ingress, ipproto::ICMP, 0, 0, 3),
            cell(Egress, ipproto::ICMPV6, 0, 0, 4),
            // Overflow cells: every port that did not fit.
            cell(Ingress, ipproto::TCP, 0, BLOCKED_OVERFLOW, 7),
            cell(Ingress, ipproto::ICMP, 0, BLOCKED_OVERFLOW, 1),
            // Unclassified protocols share "other", with their overflow cell (protocol 0).
            cell(Egress, 47, 0, 0, 2),
            cell(Egress, 50, 0, 0, 3),
            cell(Egress, 0, 0, BLOCKED_OVERFLOW, 10),
            // Audit cells are split out.
            cell(Ingress, ipproto::TCP, 80, BLOCKED_AUDIT, 6),
            cell(Egress, ipproto::UDP, 0, BLOCKED_AUDIT | BLOCKED_OVERFLOW, 8),
        ];
        let s = blocked_series(&cells);
        let blocked: Vec<_> = s.blocked.into_iter().collect();
        let mut expected = vec![
            (labels("ingress", "tcp", Dport::Port(80)), 5),
            (labels("ingress", "tcp", Dport::Port(443)), 1),
            (labels("ingress", "tcp", Dport::Other), 7),
            (labels("egress", "udp", Dport::Port(53)), 2),
            (labels("egress", "sctp", Dport::Port(9)), 1),
            (labels("ingress", "icmp", Dport::None), 3),
            (labels("ingress", "icmp", Dport::Other), 1),
            (labels("egress", "icmpv6", Dport::None), 4),
            (labels("egress", "other", Dport::None), 5),
            (labels("egress", "other", Dport::Other), 10),
        ];
        expected.sort();
        assert_eq!(blocked, expected);
        let audit: Vec<_> = s.audit.into_iter().collect();
        assert_eq!(
            audit,
            vec![
                (labels("egress", "udp", Dport::Other), 8),
                (labels("ingress", "tcp", Dport::Port(80)), 6),
            ]
        );
    }

    #[test]
    fn blocked_series_encode_with_their_labels() {
        let cells = [
            cell(Direction::Ingress, ipproto::TCP, 8080, 0, 2),
            cell(Direction::Ingress, ipproto::TCP, 0, BLOCKED_OVERFLOW, 1),
            cell(Direction::Egress, ipproto::ICMP, 0, 0, 1),
        ];
        let s = blocked_series(&cells);
        let mut text = String::new();
        {
            let mut registry = prometheus_client::registry::Registry::default();
            #[derive(Debug)]
            struct Fixed(BTreeMap<BlockedLabels, u64>);
            impl Collector for Fixed {
                fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
                    family(
                        &mut encoder,
                        "npc_blocked_connections",
                        "test",
                        MetricType::Counter,
                        self.0.clone(),
                    )
                }
            }
            registry.register_collector(Box::new(Fixed(s.blocked)));
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        }
        for line in [
            "npc_blocked_connections_total{direction=\"ingress\",protocol=\"tcp\",dport=\"8080\"} 2",
            "npc_blocked_connections_total{direction=\"ingress\",protocol=\"tcp\",dport=\"other\"} 1",
            "npc_blocked_connections_total{direction=\"egress\",protocol=\"icmp\",dport=\"none\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    /// Loads the real datapath into a pin directory of its own (root and BPF needed, as for
    /// every datapath test of this project) and scrapes it.
    #[test]
    fn scrape_reads_a_loaded_datapath() {
        use crate::dataplane::{Datapath, LoadOptions, remove_pins};

        struct Pins(std::path::PathBuf);
        impl Drop for Pins {
            fn drop(&mut self) {
                let _ = remove_pins(&self.0);
            }
        }
        let pins = Pins(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/npc-metrics-test-{}",
            std::process::id()
        )));
        let mut opts = LoadOptions::new(&pins.0);
        opts.conntrack_capacity = 4096;
        let datapath = Datapath::load(&opts).expect("loading the datapath");

        let metrics = super::super::Metrics::new(&pins.0).expect("opening the metrics");
        let text = metrics.encode().unwrap();
        let has = |line: &str| text.lines().any(|l| l == line);
        for line in [
            "npc_map_capacity{map=\"conntrack\"} 4096".to_string(),
            format!(
                "npc_map_capacity{{map=\"policy\"}} {}",
                npc_common::capacity::POLICY
            ),
            // The overflow cells: 2 directions x 6 protocols x (denied, audit).
            "npc_map_entries{map=\"blocked\"} 24".to_string(),
            "npc_map_entries{map=\"fragments\"} 0".to_string(),
            "npc_allowed_connections_total{direction=\"ingress\",protocol=\"tcp\"} 0".to_string(),
            "npc_allowed_connections_total{direction=\"egress\",protocol=\"other\"} 0".to_string(),
            "npc_events_lost_total 0".to_string(),
            "npc_events_rate_limited_total 0".to_string(),
            "npc_events_submitted_total 0".to_string(),
            "npc_datapath_events_total{event=\"icmp_related\"} 0".to_string(),
            "npc_datapath_events_total{event=\"ct_insert_failed\"} 0".to_string(),
        ] {
            assert!(has(&line), "missing {line:?} in\n{text}");
        }
        // Hashes and tries have a capacity (the loader may size `blocked` for its overflow
        // cells), arrays and the ring buffer do not.
        for map in ["endpoints", "interfaces", "cidrs", "fragments", "blocked"] {
            let prefix = format!("npc_map_capacity{{map=\"{map}\"}} ");
            assert!(
                text.lines().any(|l| l.starts_with(&prefix)),
                "missing {prefix:?} in\n{text}"
            );
        }
        for absent in [
            "map=\"events\"",
            "map=\"drops\"",
            "event=\"events_lost\"",
            "event=\"events_submitted\"",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        for family in [
            "# TYPE npc_dropped_packets counter",
            "# TYPE npc_blocked_connections counter",
            "# TYPE npc_audit_would_block counter",
        ] {
            assert!(
                text.lines().any(|l| l == family),
                "missing {family:?} in\n{text}"
            );
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("npc_datapath_events_total"))
                .count(),
            7,
            "{text}"
        );
        drop(datapath);
    }
}
