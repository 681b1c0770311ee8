//! A typed API over the datapath's maps. Every write names what it writes (endpoint, CIDR, policy
//! entry); readers sum per-CPU counters across CPUs.
use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
    RingBuf, lpm_trie::Key,
};
use npc_common::{
    BLOCKED_AUDIT, BLOCKED_OVERFLOW, BlockedKey, CidrInfo, CidrKeyData, Config, Counter, CtEntry,
    CtKey, DROPS_LEN, DeniedEntry, Direction, DropReason, EndpointInfo, EndpointKey, FragEntry,
    FragKey, InterfaceInfo, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL,
    PolicyEntry, PolicyKey, ProtoClass, allowed_index, drop_index_parts, for_each_port_prefix,
    ip_bytes, ip_from_bytes, ipproto, map_names,
};

/// Which protocols and ports a policy entry covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every protocol and port (a rule without `ports`).
    AnyProtocol,
    /// Every port of one protocol.
    AnyPort { protocol: u8 },
    /// One port, or an inclusive range (`port`..=`end_port`).
    Range {
        protocol: u8,
        port: u16,
        end_port: u16,
    },
}

impl PortMatch {
    /// The LPM keys (with prefix lengths) that together cover exactly this match.
    pub fn keys(&self, local: u32, remote: u32, dir: Direction) -> Vec<Key<PolicyKey>> {
        match *self {
            PortMatch::AnyProtocol => vec![Key::new(
                POLICY_PREFIX_ANY_PROTOCOL,
                PolicyKey::new(local, remote, dir, 0, 0),
            )],
            PortMatch::AnyPort { protocol } => vec![Key::new(
                POLICY_PREFIX_ANY_PORT,
                PolicyKey::new(local, remote, dir, protocol, 0),
            )],
            PortMatch::Range {
                protocol,
                port,
                end_port,
            } => {
                let mut keys = Vec::new();
                for_each_port_prefix(port, end_port, |p, bits| {
                    keys.push(Key::new(
                        POLICY_PREFIX_ANY_PORT + bits,
                        PolicyKey::new(local, remote, dir, protocol, p),
                    ));
                });
                debug_assert!(keys.iter().all(|k| k.prefix_len() <= POLICY_PREFIX_FULL));
                keys
            }
        }
    }
}

/// Packets dropped for one (reason, direction, protocol class), summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropCount {
    pub reason: DropReason,
    pub direction: Direction,
    pub proto: ProtoClass,
    pub packets: u64,
}

/// Denied new connections for one `BlockedKey`, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockedCount {
    pub key: BlockedKey,
    pub connections: u64,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock the datapath stamps conntrack entries with.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Protocols with an overflow cell of their own in `blocked` (those with a protocol class); the
/// rest share protocol 0.
const OVERFLOW_PROTOCOLS: [u8; 6] = [
    ipproto::TCP,
    ipproto::UDP,
    ipproto::SCTP,
    ipproto::ICMP,
    ipproto::ICMPV6,
    0,
];

/// Overflow cells the agent creates in `blocked`: per direction, overflow protocol, and
/// enforcing or audit.
pub const BLOCKED_OVERFLOW_CELLS: u32 = 2 * OVERFLOW_PROTOCOLS.len() as u32 * 2;

/// The datapath's maps, typed.
pub struct Maps {
    pub endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    pub interfaces: HashMap<MapData, u32, InterfaceInfo>,
    pub cidrs: LpmTrie<MapData, CidrKeyData, CidrInfo>,
    pub policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub fragments: HashMap<MapData, FragKey, FragEntry>,
    /// Denied flows (written by the datapath only), so a retransmitted denied connect counts once.
    pub denied: HashMap<MapData, CtKey, DeniedEntry>,
    pub drops: PerCpuArray<MapData, u64>,
    pub counters: PerCpuArray<MapData, u64>,
    pub blocked: PerCpuHashMap<MapData, BlockedKey, u64>,
    pub config: Array<MapData, Config>,
    /// Taken by the event reader; `None` once taken.
    pub events: Option<RingBuf<MapData>>,
}

fn typed<T>(map: Option<Map>, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = map.with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn cidr_key(ip: IpAddr, prefix_len: u8) -> Result<Key<CidrKeyData>> {
    let bits = match ip {
        IpAddr::V4(_) if prefix_len <= 32 => 96 + u32::from(prefix_len),
        IpAddr::V6(_) if prefix_len <= 128 => u32::from(prefix_len),
        _ => bail!("prefix length {prefix_len} out of range for {ip}"),
    };
    Ok(Key::new(bits, ip_bytes(ip)))
}

impl Maps {
    /// Takes the maps out of a loaded object (or one reopened from pins, see `Maps::open`).
    pub fn take(mut take: impl FnMut(&str) -> Option<Map>) -> Result<Maps> {
        Ok(Maps {
            endpoints: typed(take(map_names::ENDPOINTS), map_names::ENDPOINTS)?,
            interfaces: typed(take(map_names::INTERFACES), map_names::INTERFACES)?,
            cidrs: typed(take(map_names::CIDRS), map_names::CIDRS)?,
            policy: typed(take(map_names::POLICY), map_names::POLICY)?,
            conntrack: typed(take(map_names::CONNTRACK), map_names::CONNTRACK)?,
            fragments: typed(take(map_names::FRAGMENTS), map_names::FRAGMENTS)?,
            denied: typed(take(map_names::DENIED), map_names::DENIED)?,
            drops: typed(take(map_names::DROPS), map_names::DROPS)?,
            counters: typed(take(map_names::COUNTERS), map_names::COUNTERS)?,
            blocked: typed(take(map_names::BLOCKED), map_names::BLOCKED)?,
            config: typed(take(map_names::CONFIG), map_names::CONFIG)?,
            events: Some(typed(take(map_names::EVENTS), map_names::EVENTS)?),
        })
    }

    /// Opens the maps pinned under `dir` by a running (or stopped) agent, e.g. for map-dump.
    pub fn open(dir: &std::path::Path) -> Result<Maps> {
        Maps::take(|name| {
            MapData::from_pin(dir.join(name))
                .and_then(Map::from_map_data)
                .ok()
        })
        .with_context(|| format!("opening the maps pinned under {}", dir.display()))
    }

    pub fn set_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<()> {
        self.endpoints
            .insert(&ip_bytes(ip), &info, 0)
            .with_context(|| format!("writing endpoint {ip}"))
    }

    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<()> {
        ignore_missing(self.endpoints.remove(&ip_bytes(ip)))
            .with_context(|| format!("removing endpoint {ip}"))
    }

    pub fn endpoint(&self, ip: IpAddr) -> Option<EndpointInfo> {
        self.endpoints.get(&ip_bytes(ip), 0).ok()
    }

    /// Marks `ifindex` as a known pod's veth (packets from it with an unknown source are spoofed).
    pub fn set_interface(&mut self, ifindex: u32, info: InterfaceInfo) -> Result<()> {
        self.interfaces
            .insert(&ifindex, &info, 0)
            .with_context(|| format!("writing interface {ifindex}"))
    }

    pub fn remove_interface(&mut self, ifindex: u32) -> Result<()> {
        ignore_missing(self.interfaces.remove(&ifindex))
            .with_context(|| format!("removing interface {ifindex}"))
    }

    pub fn set_cidr(&mut self, ip: IpAddr, prefix_len: u8, identity: u32) -> Result<()> {
        let key = cidr_key(ip, prefix_len)?;
        self.cidrs
            .insert(&key, &CidrInfo { identity }, 0)
            .with_context(|| format!("writing cidr {ip}/{prefix_len}"))
    }

    pub fn remove_cidr(&mut self, ip: IpAddr, prefix_len: u8) -> Result<()> {
        let key = cidr_key(ip, prefix_len)?;
        ignore_missing(self.cidrs.remove(&key))
            .with_context(|| format!("removing cidr {ip}/{prefix_len}"))
    }

    /// Allows `local` to talk to `remote` in `dir` on `ports`; `rule` is the allowing rule's cookie.
    pub fn allow(
        &mut self,
        local: u32,
        remote: u32,
        dir: Direction,
        ports: PortMatch,
        rule: u32,
    ) -> Result<()> {
        for key in ports.keys(local, remote, dir) {
            self.policy
                .insert(&key, &PolicyEntry { rule, flags: 0 }, 0)
                .with_context(|| format!("writing policy {local} -> {remote} {dir:?} {ports:?}"))?;
        }
        Ok(())
    }

    pub fn revoke(
        &mut self,
        local: u32,
        remote: u32,
        dir: Direction,
        ports: PortMatch,
    ) -> Result<()> {
        for key in ports.keys(local, remote, dir) {
            ignore_missing(self.policy.remove(&key)).with_context(|| {
                format!("removing policy {local} -> {remote} {dir:?} {ports:?}")
            })?;
        }
        Ok(())
    }

    /// Every `endpoints` entry.
    pub fn endpoint_entries(&self) -> Result<Vec<(IpAddr, EndpointInfo)>> {
        self.endpoints
            .iter()
            .map(|r| r.map(|(k, v)| (ip_from_bytes(k), v)))
            .collect::<Result<_, _>>()
            .context("reading endpoints")
    }

    /// Every `interfaces` entry (host veths of known pods).
    pub fn interface_entries(&self) -> Result<Vec<u32>> {
        self.interfaces
            .keys()
            .collect::<Result<_, _>>()
            .context("reading interfaces")
    }

    /// Every `cidrs` entry as (prefix address, prefix length) -> identity.
    pub fn cidr_entries(&self) -> Result<Vec<((IpAddr, u8), u32)>> {
        let mut out = Vec::new();
        for item in self.cidrs.iter() {
            let (key, info) = item.context("reading cidrs")?;
            let ip = ip_from_bytes(key.data());
            let len = match ip {
                IpAddr::V4(_) => key.prefix_len().saturating_sub(96),
                IpAddr::V6(_) => key.prefix_len(),
            };
            out.push(((ip, len as u8), info.identity));
        }
        Ok(out)
    }

    /// Every `policy` entry, as raw LPM (prefix length, key) -> value.
    pub fn policy_entries(&self) -> Result<Vec<((u32, PolicyKey), PolicyEntry)>> {
        self.policy
            .iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect::<Result<_, _>>()
            .context("reading policy")
    }

    pub fn insert_policy_raw(
        &mut self,
        prefix_len: u32,
        key: PolicyKey,
        entry: PolicyEntry,
    ) -> Result<()> {
        self.policy
            .insert(&Key::new(prefix_len, key), &entry, 0)
            .with_context(|| format!("writing policy {key:?}/{prefix_len}"))
    }

    pub fn remove_policy_raw(&mut self, prefix_len: u32, key: PolicyKey) -> Result<()> {
        ignore_missing(self.policy.remove(&Key::new(prefix_len, key)))
            .with_context(|| format!("removing policy {key:?}/{prefix_len}"))
    }

    pub fn set_config(&mut self, config: Config) -> Result<()> {
        self.config.set(0, &config, 0).context("writing config")
    }

    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).context("reading config")
    }

    /// Creates the blocked map's overflow cells so the datapath only ever increments them.
    pub fn init_blocked_overflow(&mut self) -> Result<()> {
        let ncpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        for dir in Direction::ALL {
            for protocol in OVERFLOW_PROTOCOLS {
                for audit in [0, BLOCKED_AUDIT] {
                    let key = BlockedKey {
                        dport: 0,
                        direction: dir as u8,
                        protocol,
                        flags: BLOCKED_OVERFLOW | audit,
                    };
                    if self.blocked.get(&key, 0).is_err() {
                        let zeros = PerCpuValues::try_from(vec![0u64; ncpus.get() as usize])?;
                        self.blocked
                            .insert(&key, zeros, 0)
                            .context("creating overflow cells")?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Nonzero drop counters.
    pub fn drops(&self) -> Result<Vec<DropCount>> {
        let mut out = Vec::new();
        for index in 0..DROPS_LEN {
            let packets = sum(&self.drops.get(&index, 0)?);
            if packets == 0 {
                continue;
            }
            if let Some((reason, direction, proto)) = drop_index_parts(index) {
                out.push(DropCount {
                    reason,
                    direction,
                    proto,
                    packets,
                });
            }
        }
        Ok(out)
    }

    /// Packets dropped for `reason` in `dir`, over all protocols.
    pub fn drop_total(&self, reason: DropReason, dir: Direction) -> Result<u64> {
        Ok(self
            .drops()?
            .iter()
            .filter(|d| d.reason == reason && d.direction == dir)
            .map(|d| d.packets)
            .sum())
    }

    pub fn counter(&self, counter: Counter) -> Result<u64> {
        Ok(sum(&self.counters.get(&(counter as u32), 0)?))
    }

    /// New connections allowed in `dir` for `proto`.
    pub fn allowed(&self, dir: Direction, proto: ProtoClass) -> Result<u64> {
        Ok(sum(&self.counters.get(&allowed_index(dir, proto), 0)?))
    }

    /// Nonzero blocked-connection cells.
    pub fn blocked(&self) -> Result<Vec<BlockedCount>> {
        let mut out = Vec::new();
        for item in self.blocked.iter() {
            let (key, values) = item?;
            let connections = sum(&values);
            if connections > 0 {
                out.push(BlockedCount { key, connections });
            }
        }
        out.sort_by_key(|b| b.key);
        Ok(out)
    }

    /// Every `denied` entry: the flows whose last denied packet the datapath remembers.
    pub fn denied_entries(&self) -> Result<Vec<(CtKey, DeniedEntry)>> {
        self.denied
            .iter()
            .collect::<Result<_, _>>()
            .context("reading denied")
    }

    /// Deletes conntrack entries that outlived their lifetime; returns how many.
    pub fn gc_conntrack(&mut self, now_ns: u64) -> Result<usize> {
        let mut expired = Vec::new();
        for item in self.conntrack.iter() {
            let (key, entry) = item?;
            if entry.expired(key.protocol, now_ns) {
                expired.push(key);
            }
        }
        for key in &expired {
            ignore_missing(self.conntrack.remove(key))?;
        }
        Ok(expired.len())
    }

    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }
}

fn sum(values: &PerCpuValues<u64>) -> u64 {
    values.iter().copied().fold(0u64, u64::wrapping_add)
}

/// Removing an entry that is not there is not an error for an idempotent writer.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
