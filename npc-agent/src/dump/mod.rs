//! `npc-agent dump [MAP] [--json]` (and `cargo xtask map-dump`): every pinned map decoded, with
//! pod, namespace and policy names next to the numbers.
//!
//! The maps are read from the agent's pin directory (`--bpffs`), read-only (see [`read`]): the
//! dump never modifies a map and never consumes deny events. The names come from the
//! `names.json` the agent publishes in its state directory (`--state-dir`, see
//! [`crate::names`]); without it the dump shows numbers only and says why on stderr. It works
//! while the agent runs and after it stopped (the maps stay pinned). Reading a busy map races
//! with the datapath: an entry may be missing or stale, and names may be a sync behind.
//!
//! `MAP` is `all` (default: every section in [`Section::ALL`] order), one map of
//! [`npc_common::map_names::ALL`], or `identities` (not a map: the identity numbers' meaning,
//! from the names).
//!
//! # JSON (`--json`)
//!
//! One object. These field names are an interface (scripts and tests rely on them): add fields,
//! do not rename or remove them.
//!
//! - `meta`: `bpffs`, `state_dir`, `names` (bool), `names_error` (why not, or null), `node`,
//!   `monotonic_ns` (`CLOCK_MONOTONIC` after reading, the clock of every `*_ns` field).
//! - One key per section printed (the map's name, or `identities`), whose value is either
//!   `{"error": "..."}` (e.g. the map is not pinned, names unavailable for `identities`) or
//!   `{"max_entries": N|null, "count": N, "entries": [...]}`. `max_entries` is the map's
//!   capacity (the ring buffer's size in bytes for `events`; null for `identities`); `count`
//!   is the number of `entries` listed (for per-CPU counter maps, the nonzero cells). Entries:
//!   - `endpoints`: `ip`, `pod` (`namespace/name` or null), `host` (bool), `identity`,
//!     `identity_name`, `flags`, `flag_names` (`local`, `ingress_isolated`, `egress_isolated`,
//!     `audit`), `ifindex`, `interface` (its name in the dump's network namespace, or null),
//!     `generation`.
//!   - `interfaces`: `ifindex`, `interface`, `flags`, `flag_names` (`pod`), `pods` (the pods
//!     of the endpoints on it; their addresses without names).
//!   - `identities`: `identity`, `namespace`, `labels` (object), `pods`, `isolated_ingress_by`,
//!     `isolated_egress_by` (the isolating policies, `namespace/name`).
//!   - `cidrs`: `prefix` (`10.0.0.0/8`), `identity`, `identity_name`, `blocks` (the ipBlocks
//!     of the identity, `10.0.0.0/8 except 10.1.0.0/16`; null without names).
//!   - `policy`: `prefix_len`, `local_identity`, `local_name`, `local_pods`, `direction`,
//!     `remote_identity`, `remote_kind` (`pod`, `cidr`, `any`, `world`, `host`, `reserved`),
//!     `remote_name`, `protocol` (number, null: any), `protocol_name` (`tcp`, ..., `any`),
//!     `port` and `end_port` (inclusive range; null: any port), `ports` (`any`, `80`,
//!     `8000-8063`), `rule` (cookie), `rule_name` (`namespace/policy ingress[0]`; `host` for
//!     the node-traffic rule), `flags`.
//!   - `conntrack`: `local_ip`, `local_port`, `remote_ip`, `remote_port`, `protocol`,
//!     `protocol_name`, `local_pod`, `local_identity`, `remote_pod`, `remote_identity` (as the
//!     datapath resolves it: endpoint, else ipBlock prefix, else world), `remote_name`,
//!     `state` (TCP: `opening`, `established`, `closing`; others: `new`, `replied`), `flags`,
//!     `flag_names` (`syn_local`, `syn_remote`, `fin_local`, `fin_remote`, `rst`, `replied`,
//!     `unisolated`, `audit`), `opener` (`ingress`/`egress`), `created_ns`, `last_seen_ns`,
//!     `age_secs`, `idle_secs`, `expires_in_secs`, `generation`, `endpoint_generation` (the
//!     local endpoint's current one), `rule`, `rule_name`.
//!   - `fragments`: `src`, `dst`, `id`, `protocol`, `protocol_name`, `allowed`, `reason`.
//!   - `denied`: `local_ip`, `local_port`, `remote_ip`, `remote_port`, `protocol`,
//!     `protocol_name`, `local_pod`, `remote_pod`, `remote_identity`, `remote_name`, `flags`,
//!     `flag_names` (`syn`, `revoked`), `tcp_seq` (null unless `syn`), `generation`, `last_ns`,
//!     `last_secs_ago`.
//!   - `drops` (nonzero cells, summed over CPUs): `reason`, `direction`, `protocol` (class),
//!     `packets`.
//!   - `counters` (every cell, summed over CPUs): `name` (`allowed_connections` or a counter
//!     such as `events_lost`), `direction` and `protocol` (for `allowed_connections`, else
//!     null), `value`.
//!   - `blocked` (nonzero cells, summed over CPUs): `direction`, `protocol`, `protocol_name`,
//!     `dport` (null for ICMP and overflow cells), `port` (`other` for an overflow cell),
//!     `flags`, `flag_names` (`overflow`, `audit`), `connections`.
//!   - `events`: no entries (`count` 0): the events belong to the agent.
//!   - `event_rate` (per CPU): `cpu`, `tokens`, `last_ns`, `last_secs_ago`.
//!   - `config` (one entry): `flags`, `flag_names` (`audit`, `allow_host`, `unknown_allow`,
//!     `grandfather`), `audit`, `unknown_endpoints` (`allow`/`deny`), `host_traffic`
//!     (`allow`/`policy`), `grandfather`, `events_per_sec`, `events_burst`.
//!
//! Entries are sorted (by address, identity, key). Memory stays proportional to the maps: the
//! raw entries are kept (72 bytes a conntrack flow) and decoded one at a time while printing.
pub mod decode;
pub mod model;
pub mod read;
mod text;

use std::{
    io::{self, Write},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use ipnet::IpNet;
use npc_common::{
    BlockedKey, COUNTERS_LEN, CidrKeyData, Config, Counter, CtEntry, CtKey, DROPS_LEN, DeniedEntry,
    Direction, DropReason, EndpointInfo, EndpointKey, FragEntry, FragKey, InterfaceInfo,
    PolicyEntry, PolicyKey, ProtoClass, RateLimit, allowed_index, drop_index_parts, ip_from_bytes,
    map_names,
};
use serde::{
    Serialize, Serializer,
    ser::{SerializeMap as _, SerializeStruct as _},
};

use self::{
    decode::{CidrIndex, CounterCell, cidr_prefix},
    model::Meta,
    read::Pins,
};
use crate::{
    dataplane::monotonic_ns,
    names::{Names, names_path},
};

/// A part of the dump: a map, or the identities (from the names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    Endpoints,
    Interfaces,
    Identities,
    Cidrs,
    Policy,
    Conntrack,
    Fragments,
    Denied,
    Drops,
    Counters,
    Blocked,
    Events,
    EventRate,
    Config,
}

impl Section {
    /// Every section, in the order `all` prints them.
    pub const ALL: [Section; 14] = [
        Section::Endpoints,
        Section::Interfaces,
        Section::Identities,
        Section::Cidrs,
        Section::Policy,
        Section::Conntrack,
        Section::Fragments,
        Section::Denied,
        Section::Drops,
        Section::Counters,
        Section::Blocked,
        Section::Events,
        Section::EventRate,
        Section::Config,
    ];

    /// The map it shows (`None` for `identities`).
    pub const fn map_name(self) -> Option<&'static str> {
        Some(match self {
            Section::Endpoints => map_names::ENDPOINTS,
            Section::Interfaces => map_names::INTERFACES,
            Section::Identities => return None,
            Section::Cidrs => map_names::CIDRS,
            Section::Policy => map_names::POLICY,
            Section::Conntrack => map_names::CONNTRACK,
            Section::Fragments => map_names::FRAGMENTS,
            Section::Denied => map_names::DENIED,
            Section::Drops => map_names::DROPS,
            Section::Counters => map_names::COUNTERS,
            Section::Blocked => map_names::BLOCKED,
            Section::Events => map_names::EVENTS,
            Section::EventRate => map_names::EVENT_RATE,
            Section::Config => map_names::CONFIG,
        })
    }

    /// Its name on the command line and in the JSON.
    pub const fn name(self) -> &'static str {
        match self.map_name() {
            Some(name) => name,
            None => "identities",
        }
    }

    pub fn from_name(name: &str) -> Option<Section> {
        Section::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What `dump` prints: `all`, or one section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    All,
    One(Section),
}

impl Selection {
    /// The names `MAP` accepts: `all`, then every section's.
    pub fn names() -> impl Iterator<Item = &'static str> {
        std::iter::once("all").chain(Section::ALL.iter().map(|s| s.name()))
    }

    pub fn from_name(name: &str) -> Option<Selection> {
        match name {
            "all" => Some(Selection::All),
            _ => Section::from_name(name).map(Selection::One),
        }
    }

    /// The command-line parser: a bad name is rejected with the list of valid ones.
    pub fn parser() -> impl TypedValueParser<Value = Selection> {
        PossibleValuesParser::new(Selection::names())
            .map(|name| Selection::from_name(&name).expect("a possible value"))
    }

    pub fn sections(self) -> Vec<Section> {
        match self {
            Selection::All => Section::ALL.to_vec(),
            Selection::One(section) => vec![section],
        }
    }
}

/// The raw entries of one section, as read (sorted), decoded when printed.
pub struct Listing<R> {
    /// The map's capacity (`None` for `identities`).
    pub max_entries: Option<u32>,
    pub raw: Vec<R>,
}

/// What was read for one section.
pub enum Data {
    Endpoints(Listing<(IpAddr, EndpointInfo)>),
    Interfaces(Listing<(u32, InterfaceInfo)>),
    Identities(Listing<u32>),
    Cidrs(Listing<(IpNet, u32)>),
    Policy(Listing<(u32, PolicyKey, PolicyEntry)>),
    Conntrack(Listing<(CtKey, CtEntry)>),
    Fragments(Listing<(FragKey, FragEntry)>),
    Denied(Listing<(CtKey, DeniedEntry)>),
    Drops(Listing<(DropReason, Direction, ProtoClass, u64)>),
    Counters(Listing<(CounterCell, u64)>),
    Blocked(Listing<(BlockedKey, u64)>),
    Events(Listing<()>),
    EventRate(Listing<(usize, RateLimit)>),
    Config(Listing<Config>),
}

/// The dump: what was read from the maps and the names to decode it with. Serializes to the
/// JSON described in the module docs; [`Dump::write_text`] prints the tables.
pub struct Dump {
    pub meta: Meta,
    /// Each section asked for, in order, or why it could not be read.
    pub sections: Vec<(Section, Result<Data, String>)>,
    ctx: decode::Context,
}

/// How to report a problem that does not stop the dump (names unavailable, a map missing).
pub type Warn<'a> = &'a mut dyn FnMut(&str);

impl Dump {
    /// Reads the sections of `selection` from the maps pinned under `bpffs`, with the names
    /// published in `state_dir`. Fails when `bpffs` holds no maps, or when the one section asked
    /// for cannot be read; with `all`, a section that cannot be read is reported through `warn`
    /// and in the output.
    pub fn collect(
        bpffs: &Path,
        state_dir: &Path,
        selection: Selection,
        warn: Warn<'_>,
    ) -> Result<Dump> {
        let pins = Pins::new(bpffs)?;
        let (names, names_error) = match Names::load(state_dir) {
            Ok(Some(names)) => (Some(names), None),
            Ok(None) => (
                None,
                Some(format!(
                    "{} does not exist (the agent publishes it there after its first sync when \
                     run with the same --state-dir)",
                    names_path(state_dir).display()
                )),
            ),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        if let Some(why) = &names_error {
            warn(&format!("names unavailable, showing numbers only: {why}"));
        }
        let sections = selection.sections();
        let wants = |any: &[Section]| sections.iter().any(|s| any.contains(s));
        let mut ctx = decode::Context {
            names,
            ..decode::Context::default()
        };
        // Read first what decoding other sections needs: the endpoints (pods' identities and
        // generations, flows' peers) and the ipBlock prefixes (flows' peers).
        let mut endpoints = None;
        if wants(&[
            Section::Endpoints,
            Section::Interfaces,
            Section::Conntrack,
            Section::Denied,
        ]) {
            let read = read_endpoints(&pins, warn);
            match &read {
                Ok(l) => ctx.endpoints = l.raw.iter().copied().collect(),
                Err(e) if !sections.contains(&Section::Endpoints) => warn(&format!(
                    "without endpoints, flows' peers are unresolved: {e:#}"
                )),
                Err(_) => {}
            }
            endpoints = Some(read);
        }
        let mut cidrs = None;
        if wants(&[Section::Cidrs, Section::Conntrack, Section::Denied]) {
            let read = read_cidrs(&pins, warn);
            match &read {
                Ok(l) => ctx.cidrs = CidrIndex::new(l.raw.iter().copied()),
                Err(e) if !sections.contains(&Section::Cidrs) => warn(&format!(
                    "without cidrs, flows' peers are unresolved: {e:#}"
                )),
                Err(_) => {}
            }
            cidrs = Some(read);
        }
        let mut read_sections = Vec::new();
        for &section in &sections {
            let data = match section {
                Section::Endpoints => endpoints.take().expect("read above").map(Data::Endpoints),
                Section::Cidrs => cidrs.take().expect("read above").map(Data::Cidrs),
                Section::Identities => match &ctx.names {
                    Some(names) => Ok(Data::Identities(Listing {
                        max_entries: None,
                        raw: names.identities.keys().copied().collect(),
                    })),
                    None => Err(anyhow::anyhow!(
                        "names unavailable: {}",
                        names_error.as_deref().unwrap_or_default()
                    )),
                },
                _ => read_section(&pins, section, warn),
            };
            match data {
                Ok(data) => read_sections.push((section, Ok(data))),
                Err(e) if matches!(selection, Selection::One(_)) => return Err(e),
                Err(e) => {
                    warn(&format!("{}: {e:#}", section.name()));
                    read_sections.push((section, Err(format!("{e:#}"))));
                }
            }
        }
        // Interface names, for the ifindexes shown.
        let mut ifindexes: Vec<u32> = ctx.endpoints.values().map(|e| e.ifindex).collect();
        for (_, data) in &read_sections {
            if let Ok(Data::Interfaces(l)) = data {
                ifindexes.extend(l.raw.iter().map(|(i, _)| *i));
            }
        }
        ifindexes.sort_unstable();
        ifindexes.dedup();
        ctx.ifnames = ifindexes
            .into_iter()
            .filter(|&i| i != 0)
            .filter_map(|i| read::interface_name(i).map(|n| (i, n)))
            .collect();
        ctx.now_ns = monotonic_ns();
        Ok(Dump {
            meta: Meta {
                bpffs: pins.dir().display().to_string(),
                state_dir: state_dir.display().to_string(),
                names: ctx.names.is_some(),
                names_error,
                node: ctx.names.as_ref().and_then(|n| n.node.clone()),
                monotonic_ns: ctx.now_ns,
            },
            sections: read_sections,
            ctx,
        })
    }

    /// The tables, one per section.
    pub fn write_text(&self, out: &mut dyn Write) -> io::Result<()> {
        text::write(self, out)
    }
}

/// `npc-agent dump`: collects the dump and writes it to `out` (tables, or JSON with `json`).
/// A closed output (`dump | head`) is not an error.
pub fn run(
    bpffs: &Path,
    state_dir: &Path,
    selection: Selection,
    json: bool,
    out: &mut dyn Write,
    warn: Warn<'_>,
) -> Result<()> {
    let dump = Dump::collect(bpffs, state_dir, selection, warn)?;
    let written = if json {
        serde_json::to_writer(&mut *out, &dump)
            .map_err(|e| match e.io_error_kind() {
                Some(kind) => io::Error::new(kind, e),
                None => io::Error::other(e),
            })
            .and_then(|()| writeln!(out))
    } else {
        dump.write_text(out)
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the dump"),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// At most this many entries are read from a map of `max_entries` (see [`read::collect`]).
fn read_limit(max_entries: u32) -> usize {
    max_entries as usize * 2 + 16
}

fn cut_short(warn: Warn<'_>, name: &str, cut: bool) {
    if cut {
        warn(&format!(
            "{name} changed so much while it was read that the listing may be incomplete"
        ));
    }
}

/// Every entry of hash map `name`, sorted by `key` and deduplicated.
fn hash_entries<K, V, O: Ord>(
    pins: &Pins,
    name: &str,
    warn: Warn<'_>,
    key: impl Fn(&K) -> O,
) -> Result<Listing<(K, V)>>
where
    K: aya::Pod,
    V: aya::Pod,
{
    let opened = pins.require(name)?;
    let max_entries = opened.max_entries;
    let map: BpfHashMap<MapData, K, V> = opened.typed()?;
    let (mut raw, cut) = read::collect(map.iter(), read_limit(max_entries), name)?;
    cut_short(warn, name, cut);
    raw.sort_by_key(|(k, _)| key(k));
    raw.dedup_by(|a, b| key(&a.0) == key(&b.0));
    Ok(Listing {
        max_entries: Some(max_entries),
        raw,
    })
}

fn read_endpoints(pins: &Pins, warn: Warn<'_>) -> Result<Listing<(IpAddr, EndpointInfo)>> {
    let l = hash_entries::<EndpointKey, EndpointInfo, _>(pins, map_names::ENDPOINTS, warn, |k| {
        ip_from_bytes(*k)
    })?;
    Ok(Listing {
        max_entries: l.max_entries,
        raw: l
            .raw
            .into_iter()
            .map(|(k, v)| (ip_from_bytes(k), v))
            .collect(),
    })
}

fn read_cidrs(pins: &Pins, warn: Warn<'_>) -> Result<Listing<(IpNet, u32)>> {
    let name = map_names::CIDRS;
    let opened = pins.require(name)?;
    let max_entries = opened.max_entries;
    let map: LpmTrie<MapData, CidrKeyData, npc_common::CidrInfo> = opened.typed()?;
    let (raw, cut) = read::collect(map.iter(), read_limit(max_entries), name)?;
    cut_short(warn, name, cut);
    let mut raw: Vec<(IpNet, u32)> = raw
        .into_iter()
        .filter_map(|(k, v)| cidr_prefix(k.prefix_len(), k.data()).map(|net| (net, v.identity)))
        .collect();
    raw.sort();
    raw.dedup_by_key(|(net, _)| *net);
    Ok(Listing {
        max_entries: Some(max_entries),
        raw,
    })
}

fn sum(values: &[u64]) -> u64 {
    values.iter().copied().fold(0, u64::wrapping_add)
}

/// A map section other than endpoints and cidrs.
fn read_section(pins: &Pins, section: Section, warn: Warn<'_>) -> Result<Data> {
    let name = section.map_name().expect("a map");
    Ok(match section {
        Section::Interfaces => Data::Interfaces(hash_entries(pins, name, warn, |k: &u32| *k)?),
        Section::Conntrack => Data::Conntrack(hash_entries(pins, name, warn, |k: &CtKey| *k)?),
        Section::Denied => Data::Denied(hash_entries(pins, name, warn, |k: &CtKey| *k)?),
        Section::Fragments => Data::Fragments(hash_entries(pins, name, warn, |k: &FragKey| {
            (k.src, k.dst, k.id, k.protocol)
        })?),
        Section::Policy => {
            let opened = pins.require(name)?;
            let max_entries = opened.max_entries;
            let map: LpmTrie<MapData, PolicyKey, PolicyEntry> = opened.typed()?;
            let (raw, cut) = read::collect(map.iter(), read_limit(max_entries), name)?;
            cut_short(warn, name, cut);
            let mut raw: Vec<_> = raw
                .into_iter()
                .map(|(k, v)| (k.prefix_len(), k.data(), v))
                .collect();
            // By local identity, direction, remote identity, then protocol and port.
            raw.sort_by_key(|&(len, key, _)| {
                (
                    key.local(),
                    key.direction,
                    key.remote(),
                    key.protocol,
                    key.port,
                    len,
                )
            });
            raw.dedup_by_key(|&mut (len, key, _)| (key, len));
            Data::Policy(Listing {
                max_entries: Some(max_entries),
                raw,
            })
        }
        Section::Drops => {
            let opened = pins.require(name)?;
            let max_entries = opened.max_entries;
            let map: PerCpuArray<MapData, u64> = opened.typed()?;
            let mut raw = Vec::new();
            for index in 0..DROPS_LEN.min(max_entries) {
                let values = map.get(&index, 0).context("reading drops")?;
                let packets = sum(&values);
                if let (Some((reason, dir, proto)), true) = (drop_index_parts(index), packets > 0) {
                    raw.push((reason, dir, proto, packets));
                }
            }
            raw.sort_by_key(|&(reason, dir, proto, _)| (reason, dir, proto));
            Data::Drops(Listing {
                max_entries: Some(max_entries),
                raw,
            })
        }
        Section::Counters => {
            let opened = pins.require(name)?;
            let max_entries = opened.max_entries;
            let map: PerCpuArray<MapData, u64> = opened.typed()?;
            let mut cells = Vec::new();
            for dir in Direction::ALL {
                for proto in ProtoClass::ALL {
                    cells.push((CounterCell::Allowed(dir, proto), allowed_index(dir, proto)));
                }
            }
            cells.extend(Counter::ALL.map(|c| (CounterCell::Named(c), c as u32)));
            let mut raw = Vec::new();
            for (cell, index) in cells {
                if index < COUNTERS_LEN.min(max_entries) {
                    let values = map.get(&index, 0).context("reading counters")?;
                    raw.push((cell, sum(&values)));
                }
            }
            Data::Counters(Listing {
                max_entries: Some(max_entries),
                raw,
            })
        }
        Section::Blocked => {
            let opened = pins.require(name)?;
            let max_entries = opened.max_entries;
            let map: PerCpuHashMap<MapData, BlockedKey, u64> = opened.typed()?;
            let (raw, cut) = read::collect(map.iter(), read_limit(max_entries), name)?;
            cut_short(warn, name, cut);
            let mut raw: Vec<(BlockedKey, u64)> = raw
                .into_iter()
                .map(|(k, values)| (k, sum(&values)))
                .filter(|&(_, n)| n > 0)
                .collect();
            // Per direction and protocol: ports in order, the overflow cell last.
            raw.sort_by_key(|(k, _)| {
                (
                    k.direction,
                    k.protocol,
                    k.flags & npc_common::BLOCKED_OVERFLOW,
                    k.dport,
                    k.flags,
                )
            });
            raw.dedup_by_key(|(k, _)| *k);
            Data::Blocked(Listing {
                max_entries: Some(max_entries),
                raw,
            })
        }
        Section::Events => {
            // Never mapped or read: the events belong to the agent.
            let opened = pins.require(name)?;
            Data::Events(Listing {
                max_entries: Some(opened.max_entries),
                raw: Vec::new(),
            })
        }
        Section::EventRate => {
            let opened = pins.require(name)?;
            let max_entries = opened.max_entries;
            let map: PerCpuArray<MapData, RateLimit> = opened.typed()?;
            let values = map.get(&0, 0).context("reading event_rate")?;
            Data::EventRate(Listing {
                max_entries: Some(max_entries),
                raw: values.iter().copied().enumerate().collect(),
            })
        }
        Section::Config => {
            let opened = pins.require(name)?;
            let max_entries = opened.max_entries;
            let map: Array<MapData, Config> = opened.typed()?;
            let config = map.get(&0, 0).context("reading config")?;
            Data::Config(Listing {
                max_entries: Some(max_entries),
                raw: vec![config],
            })
        }
        Section::Endpoints | Section::Cidrs | Section::Identities => {
            bail!("{} is read separately", section.name())
        }
    })
}

// ---------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------

impl Serialize for Dump {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1 + self.sections.len()))?;
        map.serialize_entry("meta", &self.meta)?;
        for (section, data) in &self.sections {
            match data {
                Ok(data) => map.serialize_entry(
                    section.name(),
                    &SectionJson {
                        ctx: &self.ctx,
                        data,
                    },
                )?,
                Err(error) => map.serialize_entry(section.name(), &ErrorJson { error })?,
            }
        }
        map.end()
    }
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    error: &'a str,
}

struct SectionJson<'a> {
    ctx: &'a decode::Context,
    data: &'a Data,
}

/// `entries`: decoded one at a time while written.
struct Entries<'a, R, F> {
    raw: &'a [R],
    decode: F,
}

impl<R, M: Serialize, F: Fn(&R) -> M> Serialize for Entries<'_, R, F> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.raw.iter().map(&self.decode))
    }
}

fn listing<S: Serializer, R, M: Serialize>(
    serializer: S,
    listing: &Listing<R>,
    decode: impl Fn(&R) -> M,
) -> Result<S::Ok, S::Error> {
    let mut s = serializer.serialize_struct("Section", 3)?;
    s.serialize_field("max_entries", &listing.max_entries)?;
    s.serialize_field("count", &listing.raw.len())?;
    s.serialize_field(
        "entries",
        &Entries {
            raw: &listing.raw,
            decode,
        },
    )?;
    s.end()
}

impl Serialize for SectionJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ctx = self.ctx;
        match self.data {
            Data::Endpoints(l) => listing(s, l, |r| ctx.endpoint(r)),
            Data::Interfaces(l) => {
                let pods = ctx.pods_by_ifindex();
                listing(s, l, |r| ctx.interface(r, &pods))
            }
            Data::Identities(l) => listing(s, l, |&id| ctx.identity(id)),
            Data::Cidrs(l) => listing(s, l, |r| ctx.cidr(r)),
            Data::Policy(l) => listing(s, l, |r| ctx.policy(r)),
            Data::Conntrack(l) => listing(s, l, |r| ctx.flow(r)),
            Data::Fragments(l) => listing(s, l, |r| ctx.fragment(r)),
            Data::Denied(l) => listing(s, l, |r| ctx.denied(r)),
            Data::Drops(l) => listing(s, l, |r| ctx.drop_cell(r)),
            Data::Counters(l) => listing(s, l, |r| ctx.counter(r)),
            Data::Blocked(l) => listing(s, l, |r| ctx.blocked(r)),
            Data::Events(l) => listing(s, l, |_| ()),
            Data::EventRate(l) => listing(s, l, |r| ctx.event_rate(r)),
            Data::Config(l) => listing(s, l, |r| ctx.config(r)),
        }
    }
}

#[cfg(test)]
mod tests;
