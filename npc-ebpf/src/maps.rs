//! Every map of the datapath. All are pinned by name under the agent's bpffs directory, so an
//! agent restart adopts them instead of starting from empty maps.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use npc_common::{
    BlockedKey, COUNTERS_LEN, CidrInfo, CidrKeyData, Config, CtEntry, CtKey, DROPS_LEN,
    DeniedEntry, EndpointInfo, EndpointKey, FragEntry, FragKey, InterfaceInfo, PolicyEntry,
    PolicyKey, RateLimit, capacity,
};

/// `BPF_F_NO_PREALLOC`: elements are allocated on update (only the agent updates these maps).
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "endpoints")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> =
    HashMap::pinned(capacity::ENDPOINTS, BPF_F_NO_PREALLOC);

#[map(name = "interfaces")]
pub static INTERFACES: HashMap<u32, InterfaceInfo> = HashMap::pinned(capacity::INTERFACES, 0);

#[map(name = "cidrs")]
pub static CIDRS: LpmTrie<CidrKeyData, CidrInfo> = LpmTrie::pinned(capacity::CIDRS, 0);

#[map(name = "policy")]
pub static POLICY: LpmTrie<PolicyKey, PolicyEntry> = LpmTrie::pinned(capacity::POLICY, 0);

#[map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);

#[map(name = "fragments")]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

/// Denied flows, keyed like conntrack: a retransmitted denied connect counts once (`denied.rs`).
#[map(name = "denied")]
pub static DENIED: LruHashMap<CtKey, DeniedEntry> = LruHashMap::pinned(capacity::DENIED, 0);

#[map(name = "drops")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DROPS_LEN, 0);

#[map(name = "counters")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_LEN, 0);

#[map(name = "blocked")]
pub static BLOCKED: PerCpuHashMap<BlockedKey, u64> = PerCpuHashMap::pinned(capacity::BLOCKED, 0);

#[map(name = "events")]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

#[map(name = "event_rate")]
pub static EVENT_RATE: PerCpuArray<RateLimit> = PerCpuArray::pinned(1, 0);

#[map(name = "config")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// The agent's switches; all zero (enforce, drop unknown endpoints, no events) until it writes.
#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config {
            flags: 0,
            events_per_sec: 0,
            events_burst: 0,
            _pad: 0,
        },
    }
}
