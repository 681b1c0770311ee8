//! From raw map entries to the dump's model: flags, protocols, port ranges, identities and
//! rules named. Pure functions over the raw values and the agent's [`Names`].
use std::{
    borrow::Cow,
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use npc_common::{
    BLOCKED_AUDIT, BLOCKED_OVERFLOW, BlockedKey, CONFIG_ALLOW_HOST, CONFIG_AUDIT,
    CONFIG_GRANDFATHER, CONFIG_UNKNOWN_ALLOW, CT_AUDIT, CT_FIN_LOCAL, CT_FIN_REMOTE, CT_REPLIED,
    CT_RST, CT_SYN_LOCAL, CT_SYN_REMOTE, CT_UNISOLATED, Config, Counter, CtEntry, CtKey,
    DENIED_REVOKED, DENIED_SYN, DeniedEntry, Direction, DropReason, ENDPOINT_AUDIT,
    ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, ENDPOINT_LOCAL, EndpointInfo, FragEntry,
    FragKey, IDENTITY_ANY, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_POD, IDENTITY_HOST, IDENTITY_WORLD,
    INTERFACE_POD, InterfaceInfo, NS_PER_SEC, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL,
    POLICY_PREFIX_FULL, PolicyEntry, PolicyKey, ProtoClass, RULE_HOST, RULE_NONE, RateLimit,
    ip_from_bytes, ipproto,
};

use super::model::{
    Blocked, Cidr, ConfigValue, CounterValue, DeniedFlow, DropCell, Endpoint, EventRate, Flow,
    Fragment, Identity, Interface, PolicyRule,
};
use crate::names::{EndpointName, Names, protocol_name};

pub const ENDPOINT_FLAGS: &[(u32, &str)] = &[
    (ENDPOINT_LOCAL, "local"),
    (ENDPOINT_INGRESS_ISOLATED, "ingress_isolated"),
    (ENDPOINT_EGRESS_ISOLATED, "egress_isolated"),
    (ENDPOINT_AUDIT, "audit"),
];

pub const INTERFACE_FLAGS: &[(u32, &str)] = &[(INTERFACE_POD, "pod")];

pub const CT_FLAGS: &[(u32, &str)] = &[
    (CT_SYN_LOCAL as u32, "syn_local"),
    (CT_SYN_REMOTE as u32, "syn_remote"),
    (CT_FIN_LOCAL as u32, "fin_local"),
    (CT_FIN_REMOTE as u32, "fin_remote"),
    (CT_RST as u32, "rst"),
    (CT_REPLIED as u32, "replied"),
    (CT_UNISOLATED as u32, "unisolated"),
    (CT_AUDIT as u32, "audit"),
];

pub const DENIED_FLAGS: &[(u32, &str)] = &[(DENIED_SYN, "syn"), (DENIED_REVOKED, "revoked")];

pub const BLOCKED_FLAGS: &[(u32, &str)] =
    &[(BLOCKED_OVERFLOW, "overflow"), (BLOCKED_AUDIT, "audit")];

pub const CONFIG_FLAGS: &[(u32, &str)] = &[
    (CONFIG_AUDIT, "audit"),
    (CONFIG_ALLOW_HOST, "allow_host"),
    (CONFIG_UNKNOWN_ALLOW, "unknown_allow"),
    (CONFIG_GRANDFATHER, "grandfather"),
];

/// The names of the bits set in `bits`, in `table` order; bits the table does not know come
/// last as one hexadecimal `0x..`.
pub fn flag_names(bits: u32, table: &[(u32, &str)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = bits;
    for &(bit, name) in table {
        if bits & bit != 0 {
            out.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    out
}

/// `ingress`, `egress`, or `unknown(N)`.
pub fn direction_name(direction: u8) -> Cow<'static, str> {
    match Direction::from_u8(direction) {
        Some(d) => d.as_str().into(),
        None => format!("unknown({direction})").into(),
    }
}

/// The protocols and ports a `policy` LPM entry covers, from its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyPorts {
    /// Prefix `POLICY_PREFIX_ANY_PROTOCOL`: every protocol and port.
    AnyProtocol,
    /// Prefix `POLICY_PREFIX_ANY_PORT`: every port of one protocol.
    AnyPort { protocol: u8 },
    /// Prefix `ANY_PORT + bits` (1..=16 fixed port bits): an aligned block of `2^(16 - bits)`
    /// ports, `start..=end` (one port at `POLICY_PREFIX_FULL`).
    Range { protocol: u8, start: u16, end: u16 },
    /// A prefix length npc never writes (e.g. a partial protocol).
    Invalid,
}

impl PolicyPorts {
    pub fn of(prefix_len: u32, key: &PolicyKey) -> PolicyPorts {
        match prefix_len {
            POLICY_PREFIX_ANY_PROTOCOL => PolicyPorts::AnyProtocol,
            POLICY_PREFIX_ANY_PORT => PolicyPorts::AnyPort {
                protocol: key.protocol,
            },
            p if p > POLICY_PREFIX_ANY_PORT && p <= POLICY_PREFIX_FULL => {
                let free_bits = POLICY_PREFIX_FULL - p;
                let mask = (1u32 << free_bits) - 1;
                let start = u32::from(key.port_u16()) & !mask;
                PolicyPorts::Range {
                    protocol: key.protocol,
                    start: start as u16,
                    end: (start | mask) as u16,
                }
            }
            _ => PolicyPorts::Invalid,
        }
    }

    pub fn protocol(self) -> Option<u8> {
        match self {
            PolicyPorts::AnyPort { protocol } | PolicyPorts::Range { protocol, .. } => {
                Some(protocol)
            }
            PolicyPorts::AnyProtocol | PolicyPorts::Invalid => None,
        }
    }

    /// `any`, `80`, `8000-8063`.
    pub fn ports(self) -> String {
        match self {
            PolicyPorts::AnyProtocol | PolicyPorts::AnyPort { .. } => "any".into(),
            PolicyPorts::Range { start, end, .. } if start == end => start.to_string(),
            PolicyPorts::Range { start, end, .. } => format!("{start}-{end}"),
            PolicyPorts::Invalid => "invalid prefix".into(),
        }
    }
}

/// What kind of identity a number is.
pub fn identity_kind(id: u32) -> &'static str {
    match id {
        IDENTITY_ANY => "any",
        IDENTITY_WORLD => "world",
        IDENTITY_HOST => "host",
        id if id >= IDENTITY_FIRST_CIDR => "cidr",
        id if id >= IDENTITY_FIRST_POD => "pod",
        _ => "reserved",
    }
}

/// TCP: `opening`, `established`, `closing`; other protocols: `new`, `replied`.
pub fn ct_state(protocol: u8, entry: &CtEntry) -> &'static str {
    let replied = entry.flags & CT_REPLIED != 0;
    match (protocol, replied) {
        (ipproto::TCP, _) if entry.closing() => "closing",
        (ipproto::TCP, true) => "established",
        (ipproto::TCP, false) => "opening",
        (_, true) => "replied",
        (_, false) => "new",
    }
}

/// The port column of a `blocked` cell: `other` for an overflow cell (every port that found the
/// map full), nothing for ICMP.
pub fn blocked_port(key: &BlockedKey) -> (Option<u16>, String) {
    if key.flags & BLOCKED_OVERFLOW != 0 {
        (None, "other".into())
    } else if matches!(key.protocol, ipproto::ICMP | ipproto::ICMPV6) {
        (None, "-".into())
    } else {
        (Some(key.dport), key.dport.to_string())
    }
}

/// The protocol column of a `blocked` cell: overflow cells of protocol 0 gather every protocol
/// without a class of its own.
pub fn blocked_protocol(key: &BlockedKey) -> Cow<'static, str> {
    if key.flags & BLOCKED_OVERFLOW != 0 && key.protocol == 0 {
        "other".into()
    } else {
        protocol_name(key.protocol)
    }
}

/// The `cidrs` prefixes by length, for longest-prefix lookups of many addresses (one hash
/// lookup per distinct prefix length).
#[derive(Debug, Default)]
pub struct CidrIndex {
    /// (prefix length, IPv4?) longest first -> network -> identity.
    by_len: Vec<((u8, bool), HashMap<IpNet, u32>)>,
}

impl CidrIndex {
    pub fn new(prefixes: impl IntoIterator<Item = (IpNet, u32)>) -> CidrIndex {
        let mut map: HashMap<(u8, bool), HashMap<IpNet, u32>> = HashMap::new();
        for (net, id) in prefixes {
            let v4 = matches!(net, IpNet::V4(_));
            map.entry((net.prefix_len(), v4))
                .or_default()
                .insert(net.trunc(), id);
        }
        let mut by_len: Vec<_> = map.into_iter().collect();
        by_len.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        CidrIndex { by_len }
    }

    /// The identity of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<u32> {
        let ip = ip.to_canonical();
        let v4 = ip.is_ipv4();
        self.by_len
            .iter()
            .filter(|((_, is_v4), _)| *is_v4 == v4)
            .find_map(|((len, _), nets)| {
                let net = IpNet::new(ip, *len).ok()?.trunc();
                nets.get(&net).copied()
            })
    }
}

/// The `cidrs` LPM key (16-byte form, IPv4 with 96 + len bits) as a prefix.
pub fn cidr_prefix(prefix_len: u32, data: [u8; 16]) -> Option<IpNet> {
    match ip_from_bytes(data) {
        ip @ IpAddr::V4(_) if prefix_len >= 96 => IpNet::new(ip, (prefix_len - 96) as u8).ok(),
        _ => IpNet::new(IpAddr::V6(data.into()), u8::try_from(prefix_len).ok()?).ok(),
    }
}

/// A counter cell of the `counters` array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterCell {
    Allowed(Direction, ProtoClass),
    Named(Counter),
}

/// What decoding needs besides the entry: the names (if any), the endpoints and ipBlock
/// prefixes (to resolve flows' peers like the datapath does), interface names, the time.
#[derive(Default)]
pub struct Context {
    pub names: Option<Names>,
    pub endpoints: HashMap<IpAddr, EndpointInfo>,
    pub cidrs: CidrIndex,
    pub ifnames: HashMap<u32, String>,
    pub now_ns: u64,
}

fn secs(ns: u64) -> u64 {
    ns / NS_PER_SEC
}

impl Context {
    /// A short description of an identity: reserved ones always, others with names.
    pub fn identity_name(&self, id: u32) -> Option<String> {
        match id {
            IDENTITY_ANY | IDENTITY_WORLD | IDENTITY_HOST => Some(identity_kind(id).to_string()),
            _ => {
                let names = self.names.as_ref()?;
                (names.identities.contains_key(&id) || names.cidr_identities.contains_key(&id))
                    .then(|| names.identity(id))
            }
        }
    }

    /// `namespace/policy ingress[0]`, `host` for the node-traffic rule, `none` for passes no
    /// rule made.
    pub fn rule_name(&self, rule: u32) -> Option<String> {
        match rule {
            RULE_HOST => Some("host".into()),
            RULE_NONE => Some("none".into()),
            _ => self
                .names
                .as_ref()?
                .rules
                .get(&rule)
                .map(ToString::to_string),
        }
    }

    /// `namespace/name` of the pod owning `ip`.
    pub fn pod_of(&self, ip: IpAddr) -> Option<String> {
        match self.names.as_ref()?.endpoint(ip)? {
            EndpointName::Pod {
                namespace, name, ..
            } => Some(format!("{namespace}/{name}")),
            EndpointName::Host => None,
        }
    }

    fn is_host(&self, ip: IpAddr, info: &EndpointInfo) -> bool {
        info.identity == IDENTITY_HOST
            || self
                .names
                .as_ref()
                .and_then(|n| n.endpoint(ip))
                .is_some_and(|e| *e == EndpointName::Host)
    }

    /// The identity the datapath gives a remote address: its endpoint's, else its longest
    /// ipBlock prefix's, else `world`.
    pub fn remote_identity(&self, ip: IpAddr) -> u32 {
        match self.endpoints.get(&ip.to_canonical()) {
            Some(e) => e.identity,
            None => self.cidrs.lookup(ip).unwrap_or(IDENTITY_WORLD),
        }
    }

    fn ifname(&self, ifindex: u32) -> Option<String> {
        self.ifnames.get(&ifindex).cloned()
    }

    pub fn endpoint(&self, &(ip, info): &(IpAddr, EndpointInfo)) -> Endpoint {
        Endpoint {
            ip,
            pod: self.pod_of(ip),
            host: self.is_host(ip, &info),
            identity: info.identity,
            identity_name: self.identity_name(info.identity),
            flags: info.flags,
            flag_names: flag_names(info.flags, ENDPOINT_FLAGS),
            ifindex: info.ifindex,
            interface: self.ifname(info.ifindex),
            generation: info.generation,
        }
    }

    /// `pods_by_ifindex`: see [`Context::pods_by_ifindex`].
    pub fn interface(
        &self,
        &(ifindex, info): &(u32, InterfaceInfo),
        pods_by_ifindex: &HashMap<u32, Vec<String>>,
    ) -> Interface {
        Interface {
            ifindex,
            interface: self.ifname(ifindex),
            flags: info.flags,
            flag_names: flag_names(info.flags, INTERFACE_FLAGS),
            pods: pods_by_ifindex.get(&ifindex).cloned().unwrap_or_default(),
        }
    }

    /// The pods (or, without names, the addresses) of the endpoints on each ifindex.
    pub fn pods_by_ifindex(&self) -> HashMap<u32, Vec<String>> {
        let mut out: HashMap<u32, BTreeSet<String>> = HashMap::new();
        for (&ip, info) in &self.endpoints {
            if info.ifindex != 0 {
                let who = self.pod_of(ip).unwrap_or_else(|| ip.to_string());
                out.entry(info.ifindex).or_default().insert(who);
            }
        }
        out.into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect()
    }

    /// The pod identities the names know, by number (empty without names).
    pub fn identity(&self, id: u32) -> Option<Identity> {
        let names = self.names.as_ref()?;
        let i = names.identities.get(&id)?;
        Some(Identity {
            identity: id,
            namespace: i.namespace.clone(),
            labels: i.labels.clone(),
            pods: i.pods.clone(),
            isolated_ingress_by: names.isolating(id, Direction::Ingress).to_vec(),
            isolated_egress_by: names.isolating(id, Direction::Egress).to_vec(),
        })
    }

    pub fn cidr(&self, &(prefix, identity): &(IpNet, u32)) -> Cidr {
        Cidr {
            prefix: prefix.to_string(),
            identity,
            identity_name: self.identity_name(identity),
            blocks: self.names.as_ref().map(|n| {
                n.cidr_identities
                    .get(&identity)
                    .cloned()
                    .unwrap_or_default()
            }),
        }
    }

    pub fn policy(&self, &(prefix_len, key, entry): &(u32, PolicyKey, PolicyEntry)) -> PolicyRule {
        let ports = PolicyPorts::of(prefix_len, &key);
        let (port, end_port) = match ports {
            PolicyPorts::Range { start, end, .. } => (Some(start), Some(end)),
            _ => (None, None),
        };
        let (local, remote) = (key.local(), key.remote());
        PolicyRule {
            prefix_len,
            local_identity: local,
            local_name: self.identity_name(local),
            local_pods: self.names.as_ref().map(|n| {
                n.identities
                    .get(&local)
                    .map(|i| i.pods.clone())
                    .unwrap_or_default()
            }),
            direction: direction_name(key.direction).into_owned(),
            remote_identity: remote,
            remote_kind: identity_kind(remote),
            remote_name: self.identity_name(remote),
            protocol: ports.protocol(),
            protocol_name: match ports.protocol() {
                Some(p) => protocol_name(p).into_owned(),
                None => "any".into(),
            },
            port,
            end_port,
            ports: ports.ports(),
            rule: entry.rule,
            rule_name: self.rule_name(entry.rule),
            flags: entry.flags,
        }
    }

    pub fn flow(&self, (key, entry): &(CtKey, CtEntry)) -> Flow {
        let (local, remote) = (ip_from_bytes(key.local), ip_from_bytes(key.remote));
        let endpoint = self.endpoints.get(&local);
        let remote_identity = self.remote_identity(remote);
        let idle = self.now_ns.saturating_sub(entry.last_seen_ns);
        Flow {
            local_ip: local,
            local_port: key.local_port,
            remote_ip: remote,
            remote_port: key.remote_port,
            protocol: key.protocol,
            protocol_name: protocol_name(key.protocol).into_owned(),
            local_pod: self.pod_of(local),
            local_identity: endpoint.map(|e| e.identity),
            remote_pod: self.pod_of(remote),
            remote_identity,
            remote_name: self.identity_name(remote_identity),
            state: ct_state(key.protocol, entry),
            flags: entry.flags,
            flag_names: flag_names(u32::from(entry.flags), CT_FLAGS),
            opener: direction_name(entry.opener).into_owned(),
            created_ns: entry.created_ns,
            last_seen_ns: entry.last_seen_ns,
            age_secs: secs(self.now_ns.saturating_sub(entry.created_ns)),
            idle_secs: secs(idle),
            expires_in_secs: secs(entry.lifetime_ns(key.protocol).saturating_sub(idle)),
            generation: entry.generation,
            endpoint_generation: endpoint.map(|e| e.generation),
            rule: entry.rule,
            rule_name: self.rule_name(entry.rule),
        }
    }

    pub fn fragment(&self, (key, entry): &(FragKey, FragEntry)) -> Fragment {
        let allowed = entry.allowed != 0;
        Fragment {
            src: ip_from_bytes(key.src),
            dst: ip_from_bytes(key.dst),
            id: key.id,
            protocol: key.protocol,
            protocol_name: protocol_name(key.protocol).into_owned(),
            allowed,
            reason: (!allowed).then(|| {
                u8::try_from(entry.reason)
                    .ok()
                    .and_then(DropReason::from_u8)
                    .map_or_else(|| entry.reason.to_string(), |r| r.as_str().to_string())
            }),
        }
    }

    pub fn denied(&self, (key, entry): &(CtKey, DeniedEntry)) -> DeniedFlow {
        let (local, remote) = (ip_from_bytes(key.local), ip_from_bytes(key.remote));
        let remote_identity = self.remote_identity(remote);
        DeniedFlow {
            local_ip: local,
            local_port: key.local_port,
            remote_ip: remote,
            remote_port: key.remote_port,
            protocol: key.protocol,
            protocol_name: protocol_name(key.protocol).into_owned(),
            local_pod: self.pod_of(local),
            remote_pod: self.pod_of(remote),
            remote_identity,
            remote_name: self.identity_name(remote_identity),
            flags: entry.flags,
            flag_names: flag_names(entry.flags, DENIED_FLAGS),
            tcp_seq: (entry.flags & DENIED_SYN != 0).then_some(entry.tcp_seq),
            generation: entry.generation,
            last_ns: entry.last_ns,
            last_secs_ago: secs(self.now_ns.saturating_sub(entry.last_ns)),
        }
    }

    pub fn drop_cell(
        &self,
        &(reason, dir, proto, packets): &(DropReason, Direction, ProtoClass, u64),
    ) -> DropCell {
        DropCell {
            reason: reason.as_str(),
            direction: dir.as_str(),
            protocol: proto.as_str(),
            packets,
        }
    }

    pub fn counter(&self, &(cell, value): &(CounterCell, u64)) -> CounterValue {
        match cell {
            CounterCell::Allowed(dir, proto) => CounterValue {
                name: "allowed_connections",
                direction: Some(dir.as_str()),
                protocol: Some(proto.as_str()),
                value,
            },
            CounterCell::Named(counter) => CounterValue {
                name: counter.as_str(),
                direction: None,
                protocol: None,
                value,
            },
        }
    }

    pub fn blocked(&self, &(key, connections): &(BlockedKey, u64)) -> Blocked {
        let (dport, port) = blocked_port(&key);
        Blocked {
            direction: direction_name(key.direction).into_owned(),
            protocol: key.protocol,
            protocol_name: blocked_protocol(&key).into_owned(),
            dport,
            port,
            flags: key.flags,
            flag_names: flag_names(key.flags, BLOCKED_FLAGS),
            connections,
        }
    }

    pub fn event_rate(&self, &(cpu, rate): &(usize, RateLimit)) -> EventRate {
        EventRate {
            cpu,
            tokens: rate.tokens as f64 / NS_PER_SEC as f64,
            last_ns: rate.last_ns,
            last_secs_ago: (rate.last_ns != 0)
                .then(|| secs(self.now_ns.saturating_sub(rate.last_ns))),
        }
    }

    pub fn config(&self, config: &Config) -> ConfigValue {
        ConfigValue {
            flags: config.flags,
            flag_names: flag_names(config.flags, CONFIG_FLAGS),
            audit: config.flags & CONFIG_AUDIT != 0,
            unknown_endpoints: if config.flags & CONFIG_UNKNOWN_ALLOW != 0 {
                "allow"
            } else {
                "deny"
            },
            host_traffic: if config.flags & CONFIG_ALLOW_HOST != 0 {
                "allow"
            } else {
                "policy"
            },
            grandfather: config.flags & CONFIG_GRANDFATHER != 0,
            events_per_sec: config.events_per_sec,
            events_burst: config.events_burst,
        }
    }
}
