//! The entries of the dump as `--json` prints them (and the tables show them): raw numbers next
//! to their names. The field names are an interface, documented in the parent module.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

/// Where the dump comes from (the `meta` key).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Meta {
    /// The pin directory the maps were read from (`--bpffs`).
    pub bpffs: String,
    /// The agent's state directory the names were read from (`--state-dir`).
    pub state_dir: String,
    /// Whether names were available (`names.json` in `state_dir`).
    pub names: bool,
    /// Why not, when `names` is false.
    pub names_error: Option<String>,
    /// The node the names are of, when the agent knows it.
    pub node: Option<String>,
    /// `CLOCK_MONOTONIC` when the maps had been read (the clock of every `*_ns` field).
    pub monotonic_ns: u64,
}

/// An `endpoints` entry: an address the datapath knows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// `namespace/name` of the pod owning the address (`None` for the host or without names).
    pub pod: Option<String>,
    /// One of the node's own addresses.
    pub host: bool,
    pub identity: u32,
    pub identity_name: Option<String>,
    pub flags: u32,
    /// `local`, `ingress_isolated`, `egress_isolated`, `audit` (unknown bits as `0x..`).
    pub flag_names: Vec<String>,
    /// Host-side veth of a local pod (0: not learned).
    pub ifindex: u32,
    /// Its name, as resolved in the network namespace `dump` runs in.
    pub interface: Option<String>,
    pub generation: u32,
}

/// An `interfaces` entry: a known pod's host veth.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Interface {
    pub ifindex: u32,
    pub interface: Option<String>,
    pub flags: u32,
    /// `pod`.
    pub flag_names: Vec<String>,
    /// Pods whose `endpoints` entries name this ifindex (`namespace/name`, or the address
    /// without names).
    pub pods: Vec<String>,
}

/// A pod identity (the `identities` section, from the agent's names).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Identity {
    pub identity: u32,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub pods: Vec<String>,
    /// The policies (`namespace/name`) that isolate the identity for ingress.
    pub isolated_ingress_by: Vec<String>,
    pub isolated_egress_by: Vec<String>,
}

/// A `cidrs` entry: an ipBlock prefix.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cidr {
    pub prefix: String,
    pub identity: u32,
    pub identity_name: Option<String>,
    /// The ipBlocks an address with this identity is in (`None` without names; empty for
    /// `world`, an excepted prefix).
    pub blocks: Option<Vec<String>>,
}

/// A `policy` entry, its LPM key decoded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyRule {
    /// The LPM prefix length (72: any protocol, 80: any port, 81..=96: a port block).
    pub prefix_len: u32,
    pub local_identity: u32,
    pub local_name: Option<String>,
    /// The pods with the local identity (`None` without names).
    pub local_pods: Option<Vec<String>>,
    /// `ingress` or `egress`.
    pub direction: String,
    pub remote_identity: u32,
    /// `pod`, `cidr`, `any`, `world`, `host` or `reserved`.
    pub remote_kind: &'static str,
    pub remote_name: Option<String>,
    /// IP protocol number; `None`: any protocol.
    pub protocol: Option<u8>,
    /// `tcp`, `udp`, ... or `any`.
    pub protocol_name: String,
    /// First port; `None`: any port.
    pub port: Option<u16>,
    /// Last port (inclusive; equal to `port` for one port).
    pub end_port: Option<u16>,
    /// `any`, `80` or `8000-8063` (`invalid prefix` for a prefix length npc never writes).
    pub ports: String,
    /// Cookie of the rule that allowed it.
    pub rule: u32,
    /// `namespace/policy ingress[0]`, `host` for `RULE_HOST`.
    pub rule_name: Option<String>,
    pub flags: u32,
}

/// A `conntrack` entry: a flow from its local endpoint's point of view.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Flow {
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub remote_ip: IpAddr,
    pub remote_port: u16,
    pub protocol: u8,
    pub protocol_name: String,
    pub local_pod: Option<String>,
    /// The local endpoint's identity (`None`: no longer in `endpoints`).
    pub local_identity: Option<u32>,
    pub remote_pod: Option<String>,
    /// The remote's identity as the datapath resolves it: its endpoint's, else its longest
    /// `cidrs` prefix's, else `world` (2).
    pub remote_identity: u32,
    pub remote_name: Option<String>,
    /// TCP: `opening`, `established`, `closing`; others: `new`, `replied`.
    pub state: &'static str,
    pub flags: u16,
    /// `syn_local`, `syn_remote`, `fin_local`, `fin_remote`, `rst`, `replied`, `unisolated`,
    /// `audit`.
    pub flag_names: Vec<String>,
    /// Whose policy admitted the flow: `ingress` or `egress`.
    pub opener: String,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub age_secs: u64,
    pub idle_secs: u64,
    /// Seconds until the agent may delete it (0: expired).
    pub expires_in_secs: u64,
    pub generation: u32,
    /// The local endpoint's current generation (a flow of an older one is re-checked).
    pub endpoint_generation: Option<u32>,
    pub rule: u32,
    pub rule_name: Option<String>,
}

/// A `fragments` entry: the verdict of an IP datagram's first fragment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fragment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u32,
    pub protocol: u8,
    pub protocol_name: String,
    pub allowed: bool,
    /// The drop reason, when not allowed.
    pub reason: Option<String>,
}

/// A `denied` entry: a flow whose last denied packet the datapath remembers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeniedFlow {
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub remote_ip: IpAddr,
    pub remote_port: u16,
    pub protocol: u8,
    pub protocol_name: String,
    pub local_pod: Option<String>,
    pub remote_pod: Option<String>,
    pub remote_identity: u32,
    pub remote_name: Option<String>,
    pub flags: u32,
    /// `syn`, `revoked`.
    pub flag_names: Vec<String>,
    /// Sequence number of the denied SYN (`syn` set).
    pub tcp_seq: Option<u32>,
    pub generation: u32,
    pub last_ns: u64,
    pub last_secs_ago: u64,
}

/// A nonzero `drops` cell, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DropCell {
    pub reason: &'static str,
    pub direction: &'static str,
    /// Protocol class: `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`, `other`.
    pub protocol: &'static str,
    pub packets: u64,
}

/// A `counters` cell, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CounterValue {
    /// `allowed_connections` (per direction and protocol class) or the counter's name.
    pub name: &'static str,
    pub direction: Option<&'static str>,
    pub protocol: Option<&'static str>,
    pub value: u64,
}

/// A nonzero `blocked` cell, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Blocked {
    pub direction: String,
    /// IP protocol number (0 in the overflow cell of the protocols without a class).
    pub protocol: u8,
    pub protocol_name: String,
    /// Destination port; `None` for ICMP and overflow cells.
    pub dport: Option<u16>,
    /// The port, `other` for an overflow cell (ports that found the map full).
    pub port: String,
    pub flags: u32,
    /// `overflow`, `audit`.
    pub flag_names: Vec<String>,
    pub connections: u64,
}

/// One CPU's `event_rate` token bucket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventRate {
    pub cpu: usize,
    /// Deny events the CPU may emit now.
    pub tokens: f64,
    pub last_ns: u64,
    pub last_secs_ago: Option<u64>,
}

/// The `config` element.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConfigValue {
    pub flags: u32,
    /// `audit`, `allow_host`, `unknown_allow`, `grandfather`.
    pub flag_names: Vec<String>,
    pub audit: bool,
    /// `allow` or `deny`.
    pub unknown_endpoints: &'static str,
    /// `allow` or `policy`.
    pub host_traffic: &'static str,
    pub grandfather: bool,
    pub events_per_sec: u32,
    pub events_burst: u32,
}
