//! Fuzz-style test of both TC programs through BPF_PROG_TEST_RUN.
//!
//! `fuzz_both_programs` loads a datapath with a realistic state (local endpoints of both families
//! with identities and isolation flags, a remote endpoint, HOST endpoints, nested CIDR prefixes,
//! policy entries with port ranges) and pushes random frames through it; every frame runs through
//! both programs, in random order. About a third are well-formed frames of every kind
//! `packets.rs` makes, plus ARP, neighbour discovery and MLD (with and without the hop limit and
//! source that make them link-local control), IPv4 options and long IPv6 extension chains (some
//! with a fragment header), with addresses from a small pool (now and then an IPv4-mapped IPv6
//! one) and replies to recent flows, so conntrack entries, ICMP errors and fragment records are
//! hit. About half are such frames mutated: bytes flipped, truncated at
//! random lengths (also below 14 bytes), garbage appended, header fields set to extremes (IHL,
//! total length, IPv6 payload length, next header, TCP data offset, fragment bits, ICMP type,
//! EtherType). The rest are random bytes behind a valid or random EtherType. After 80% and 90% of
//! the frames, every local endpoint's policy generation is bumped, two rules are toggled and the
//! loopback device is marked as a pod veth, so re-checks, revocations and the interface
//! anti-spoofing path run too.
//!
//! The oracle is a model of the datapath written from its documented behaviour (the `DropReason`
//! docs, the counters, the policy semantics): a parser that classifies every frame, the endpoint
//! table, the policy decision, and over-approximations of conntrack (the flows that may be
//! tracked) and of the fragment records. Checked on every run:
//! - the kernel refuses a frame (EINVAL, counted apart) only if it is shorter than an Ethernet
//!   header, or than the fixed IPv4/IPv6 header its EtherType announces (see `kernel_may_refuse`);
//! - the verdict is PASS or DROP, and one the model allows for that frame and state;
//! - a Drop increments exactly one `drops` cell, one the model allows (reason and protocol
//!   class); a Pass increments none (every cell is compared with a shadow copy every
//!   `NPC_FUZZ_CHECK_EVERY` runs: total drops == Drop verdicts, per direction and per cell);
//! - a `policy_denied` or `policy_revoked` drop leaves the flow's `denied` entry as the model
//!   predicts (generation, SYN sequence number, flags), and the model decides from its copy of
//!   the `denied` map whether the drop starts a new denied connection or repeats one (see
//!   "Denied connections" below).
//!
//! And at the end, with every map read back:
//! - non-first fragments passed == `fragments_passed`; `unknown_endpoint_passed` == 0 (the
//!   default is to drop); `ct_insert_failed` == 0;
//! - the pass-side counters (allowed new connections, `icmp_related`, `fragments_passed`,
//!   `audit_would_block`, `rechecked`) count disjoint passes, so their sum plus the passes the
//!   model knows are uncounted (ARP, link-local control) is at most the Pass verdicts; the
//!   difference is the conntrack hits, which are not counted anywhere (it is printed, and must be
//!   positive); allowed connections per (direction, protocol class) are at most the passes that
//!   reached the policy stage in that cell;
//! - every deny report is accounted for: `events_submitted + events_rate_limited + events_lost`
//!   == the model's denied connections (new ones, revocations included, not their repeated
//!   packets) + `audit_would_block`, and every submitted event is read back from the ring buffer
//!   and is consistent (reason, direction, local endpoint and identity, audit flag, remote
//!   identity);
//! - every overflow increment (`blocked_overflow`) lands in one of the overflow cells the agent
//!   creates; the enforcing `blocked` cells add up to the model's denied connections per
//!   (direction, protocol class) exactly, the audit ones to `audit_would_block` exactly before
//!   the first generation bump and at most to it after (a re-check in audit counts
//!   `audit_would_block` but no `blocked` cell);
//! - every `denied` map entry is one the model made, with the fields it expects;
//! - every conntrack entry belongs to a local endpoint, is one the model says may exist, and has
//!   sane fields; every fragment record matches the model's;
//! - with at least 50,000 frames, every drop reason but `truncated_ethernet` (the kernel never runs
//!   such frames) was counted, and so were deny events (submitted and rate-limited), ICMP errors
//!   of tracked flows, passed fragments, audit passes, re-checks and conntrack hits.
//!
//! Denied connections: the datapath counts (in `blocked`) and reports a denied connection once,
//! not each of its packets (a retransmitted SYN, a resent datagram, the packets after a
//! revocation). The model keeps a copy of the `denied` map (keyed like conntrack, from the local
//! endpoint's side) and applies the datapath's rule: a drop repeats a connection if the flow's
//! entry has the endpoint's current generation, was refreshed less than
//! `DENIED_REPEAT_WINDOW_NS` ago, and, for a TCP SYN without ACK, records a SYN with the same
//! sequence number. A new one counts under the run's direction, a revocation under the
//! direction that opened the flow. Two things the model cannot know are read from the maps just
//! before a run that may be a policy drop: whether the LRU map evicted the flow's entry (then it
//! is a new connection), and the opener of the flow's conntrack entry. A repeat within a second
//! of the window's end is allowed either way (the model's clock is not the datapath's); with the
//! default frame count the window never ends inside a run.
//!
//! Deny events: the ring buffer is not read before the first churn, so it fills up and events
//! are lost; after it, the rate is lowered so events are rate-limited, and they are read at every
//! check.
//!
//! Not checked exactly, and why: how many passes were conntrack hits (no counter), whether an
//! ICMP error that quotes a possibly tracked flow passes as related or is decided as a new flow,
//! and whether a tracked flow is still there (expiry depends on the clock, the LRU map may evict,
//! a SYN reopens a closed flow, a re-check after a generation bump may revoke it). For those the
//! model allows every outcome the documented behaviour allows, and checks the rest exactly.
//!
//! `same_frame_same_verdict` runs 1000 frames twice each, through both programs, on a datapath
//! with no endpoints (where no frame creates state), and expects the same verdict both times, the
//! drop cells to add up, and no conntrack entry, fragment record, blocked cell or event after.
//!
//! The datapath's documented limits are part of the model: at most 8 IPv6 extension headers, and
//! no header read past byte 1024 of the frame.
//!
//! Environment: `NPC_FUZZ_SEED` (u64, decimal or 0x-hex), `NPC_FUZZ_PACKETS` (frames; each runs
//! through both programs), `NPC_FUZZ_CHECK_EVERY` (runs between full comparisons of the drop
//! cells; 1 pins a stray drop count to its run).
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::programs::{ProgramError, TestRun, TestRunOptions};
use npc_agent::dataplane::PortMatch;
use npc_common::{
    BLOCKED_AUDIT, BLOCKED_OVERFLOW, CONFIG_ALLOW_HOST, CONFIG_AUDIT, CONFIG_UNKNOWN_ALLOW,
    CT_AUDIT, CT_FIN_LOCAL, CT_FIN_REMOTE, CT_REPLIED, CT_RST, CT_SYN_LOCAL, CT_SYN_REMOTE,
    CT_UNISOLATED, Config, Counter, CtKey, DENIED_REPEAT_WINDOW_NS, DENIED_REVOKED, DENIED_SYN,
    DROPS_LEN, DeniedEntry, DenyEvent, Direction, DropReason, ENDPOINT_AUDIT,
    ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, ENDPOINT_LOCAL, EVENT_AUDIT, EndpointInfo,
    FragKey, IDENTITY_ANY, IDENTITY_FIRST_CIDR, IDENTITY_HOST, IDENTITY_NONE, INTERFACE_POD,
    InterfaceInfo, IpBytes, ProtoClass, drop_index, drop_index_parts, ip_bytes, ipproto,
    ipv4_mapped, verdict,
};
use npc_tests::{
    datapath::{TestDatapath, ip},
    packets::{self, ETH_HLEN, L4, Tcp},
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

const DEFAULT_SEED: u64 = 0x6e70_635f_6675_7a7a;
const DEFAULT_PACKETS: usize = 100_000;
const DEFAULT_CHECK_EVERY: u64 = 1024;
/// Failures described in full in the panic message (all are counted).
const MAX_REPORTED: usize = 25;
/// `__sk_buff.ifindex` under BPF_PROG_TEST_RUN: the loopback device.
const RUN_IFINDEX: u32 = 1;
/// An IPv6 extension header chain longer than this is malformed (`MAX_IPV6_EXT_HEADERS`).
const MAX_EXT_HEADERS: usize = 8;
/// Headers that start further into the frame than this are not read (`MAX_HEADER_OFF`): an IPv6
/// extension header there is a malformed chain, an L4 header malformed, an ICMP quote unreadable.
const MAX_HEADER_OFF: usize = 1024;
/// Where the IPv6 payload starts in a frame.
const V6_PAYLOAD: usize = ETH_HLEN + 40;
/// Past this many fragment records the datapath's LRU map (8192) may have evicted some.
const FRAG_RECORDS_SAFE: usize = 4096;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

fn seed() -> u64 {
    env_u64("NPC_FUZZ_SEED").unwrap_or(DEFAULT_SEED)
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn v4_at(b: &[u8], off: usize) -> IpBytes {
    ipv4_mapped([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn v6_at(b: &[u8], off: usize) -> IpBytes {
    b[off..off + 16].try_into().expect("16 bytes")
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn addr(b: &IpBytes) -> IpAddr {
    npc_common::ip_from_bytes(*b)
}

// ------------------------------------------------------------------------------------------------
// The state under test.

const ID_POD: u32 = 256;
const ID_OPEN: u32 = 257;
const ID_DENY_ALL: u32 = 258;
const ID_AUDIT: u32 = 259;
const ID_WRONG_VETH: u32 = 260;
const ID_REMOTE: u32 = 300;
const CIDR_172_16_12: u32 = IDENTITY_FIRST_CIDR + 1;
const CIDR_8_8: u32 = IDENTITY_FIRST_CIDR + 2;
const CIDR_8_8_8_24: u32 = IDENTITY_FIRST_CIDR + 3;
const CIDR_DB8_32: u32 = IDENTITY_FIRST_CIDR + 4;
const CIDR_DB8_1_48: u32 = IDENTITY_FIRST_CIDR + 5;

const POD_BOTH: u32 = ENDPOINT_LOCAL | ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED;
const POD_IN: u32 = ENDPOINT_LOCAL | ENDPOINT_INGRESS_ISOLATED;
const POD_OUT: u32 = ENDPOINT_LOCAL | ENDPOINT_EGRESS_ISOLATED;
const POD_AUDIT: u32 = POD_BOTH | ENDPOINT_AUDIT;

/// (address, identity, flags, veth ifindex)
const ENDPOINTS: [(&str, u32, u32, u32); 12] = [
    ("10.0.1.1", ID_POD, POD_BOTH, 0),
    ("fd00::1:1", ID_POD, POD_IN, RUN_IFINDEX),
    ("10.0.1.2", ID_OPEN, ENDPOINT_LOCAL, RUN_IFINDEX),
    ("fd00::1:2", ID_OPEN, ENDPOINT_LOCAL, 0),
    ("10.0.1.3", ID_DENY_ALL, POD_BOTH, 0),
    ("fd00::1:3", ID_DENY_ALL, POD_BOTH, RUN_IFINDEX),
    ("10.0.1.4", ID_AUDIT, POD_AUDIT, 0),
    // Its veth is not the one the test runs on: everything it sends is spoofed.
    ("10.0.1.5", ID_WRONG_VETH, POD_OUT, 9999),
    ("10.0.2.1", ID_REMOTE, 0, 0),
    ("fd00::2:1", ID_REMOTE, 0, 0),
    ("192.168.0.1", IDENTITY_HOST, 0, 0),
    ("fd00::ff", IDENTITY_HOST, 0, 0),
];

const CIDRS: [(&str, u8, u32); 5] = [
    ("172.16.0.0", 12, CIDR_172_16_12),
    ("8.0.0.0", 8, CIDR_8_8),
    ("8.8.8.0", 24, CIDR_8_8_8_24),
    ("2001:db8::", 32, CIDR_DB8_32),
    ("2001:db8:1::", 48, CIDR_DB8_1_48),
];

const fn range(protocol: u8, port: u16, end_port: u16) -> PortMatch {
    PortMatch::Range {
        protocol,
        port,
        end_port,
    }
}

/// (local identity, remote identity, direction, ports, toggled after 80% and 90% of the frames)
fn rules() -> Vec<(u32, u32, Direction, PortMatch, bool)> {
    use Direction::{Egress as Out, Ingress as In};
    let tcp = |lo, hi| range(ipproto::TCP, lo, hi);
    let udp = |lo, hi| range(ipproto::UDP, lo, hi);
    let sctp = |lo, hi| range(ipproto::SCTP, lo, hi);
    let any_port = |protocol| PortMatch::AnyPort { protocol };
    let any = PortMatch::AnyProtocol;
    vec![
        (ID_POD, ID_REMOTE, In, tcp(80, 80), true),
        (ID_POD, ID_REMOTE, In, tcp(8000, 8099), false),
        (ID_POD, ID_REMOTE, In, udp(53, 53), false),
        (ID_POD, CIDR_172_16_12, In, any_port(ipproto::TCP), false),
        (ID_POD, ID_POD, In, sctp(1000, 1999), false),
        (ID_POD, IDENTITY_ANY, In, any_port(ipproto::ICMP), false),
        (ID_POD, IDENTITY_ANY, In, any_port(ipproto::ICMPV6), false),
        (ID_POD, CIDR_DB8_32, In, any, false),
        (ID_POD, ID_OPEN, In, udp(0, 65535), false),
        (ID_POD, IDENTITY_ANY, Out, udp(53, 53), false),
        (ID_POD, ID_REMOTE, Out, any, true),
        (ID_POD, CIDR_8_8_8_24, Out, tcp(443, 443), false),
        // The agent gives a prefix the identity of every ipBlock containing it: 8.8.8.0/24
        // carries the rules of 8.0.0.0/8 too.
        (ID_POD, CIDR_8_8_8_24, Out, tcp(1, 1023), false),
        (ID_POD, CIDR_8_8, Out, tcp(1, 1023), false),
        (ID_POD, CIDR_DB8_1_48, Out, tcp(1, 1023), false),
        (ID_POD, ID_POD, Out, sctp(1000, 1999), false),
        (ID_POD, ID_POD, Out, tcp(5000, 5999), false),
        (ID_POD, ID_AUDIT, Out, any_port(ipproto::UDP), false),
        (ID_POD, ID_DENY_ALL, Out, any, false),
        (ID_AUDIT, ID_REMOTE, In, tcp(22, 22), false),
        (ID_OPEN, IDENTITY_ANY, In, tcp(1, 65535), false),
        (ID_WRONG_VETH, IDENTITY_ANY, Out, any, false),
    ]
}

/// Host traffic allowed to pods; enforcing; unknown local addresses dropped; events on, at a rate
/// no run reaches (the ring buffer is not read until the first churn, so it fills up and events
/// are lost).
fn config() -> Config {
    Config {
        flags: CONFIG_ALLOW_HOST,
        events_per_sec: 1_000_000,
        events_burst: 100_000,
        _pad: 0,
    }
}

/// After the first churn, events are read at every check, and rate-limited.
const CHURN_EVENTS_PER_SEC: u32 = 2_000;
const CHURN_EVENTS_BURST: u32 = 50;

struct Rule {
    local: u32,
    remote: u32,
    dir: Direction,
    ports: PortMatch,
    toggled: bool,
    active: bool,
}

/// What the maps hold, as the model sees it.
struct World {
    config: Config,
    endpoints: HashMap<IpBytes, EndpointInfo>,
    interfaces: HashSet<u32>,
    /// (address, prefix length in the 128-bit key space, identity)
    cidrs: Vec<(IpBytes, u32, u32)>,
    rules: Vec<Rule>,
}

impl World {
    fn empty(config: Config) -> World {
        World {
            config,
            endpoints: HashMap::new(),
            interfaces: HashSet::new(),
            cidrs: Vec::new(),
            rules: Vec::new(),
        }
    }

    /// Writes the whole state into `t`'s maps.
    fn populated(t: &mut TestDatapath) -> World {
        let mut w = World::empty(config());
        let maps = &mut t.dp.maps;
        for (a, identity, flags, ifindex) in ENDPOINTS {
            let info = EndpointInfo {
                identity,
                flags,
                ifindex,
                generation: 1,
            };
            maps.set_endpoint(ip(a), info).expect("set_endpoint");
            w.endpoints.insert(ip_bytes(ip(a)), info);
        }
        for (a, len, identity) in CIDRS {
            maps.set_cidr(ip(a), len, identity).expect("set_cidr");
            let bits = if ip(a).is_ipv4() {
                96 + u32::from(len)
            } else {
                u32::from(len)
            };
            w.cidrs.push((ip_bytes(ip(a)), bits, identity));
        }
        for (cookie, (local, remote, dir, ports, toggled)) in rules().into_iter().enumerate() {
            maps.allow(local, remote, dir, ports, cookie as u32 + 1)
                .expect("allow");
            w.rules.push(Rule {
                local,
                remote,
                dir,
                ports,
                toggled,
                active: true,
            });
        }
        w
    }

    /// Bumps every local endpoint's generation, toggles the toggled rules, marks the test's
    /// device as a pod veth.
    fn churn(&mut self, t: &mut TestDatapath) {
        let maps = &mut t.dp.maps;
        for (key, info) in self.endpoints.iter_mut() {
            if info.is_local() {
                info.generation += 1;
                maps.set_endpoint(addr(key), *info).expect("set_endpoint");
            }
        }
        for (cookie, r) in self.rules.iter_mut().enumerate() {
            if !r.toggled {
                continue;
            }
            if r.active {
                maps.revoke(r.local, r.remote, r.dir, r.ports)
                    .expect("revoke");
            } else {
                maps.allow(r.local, r.remote, r.dir, r.ports, cookie as u32 + 1)
                    .expect("allow");
            }
            r.active = !r.active;
        }
        self.config.events_per_sec = CHURN_EVENTS_PER_SEC;
        self.config.events_burst = CHURN_EVENTS_BURST;
        maps.set_config(self.config).expect("set_config");
        maps.set_interface(
            RUN_IFINDEX,
            InterfaceInfo {
                flags: INTERFACE_POD,
                _pad: 0,
            },
        )
        .expect("set_interface");
        self.interfaces.insert(RUN_IFINDEX);
    }

    fn identity(&self, a: &IpBytes) -> u32 {
        self.endpoints.get(a).map_or(IDENTITY_NONE, |e| e.identity)
    }

    /// The identity of the longest CIDR prefix containing `a`.
    fn cidr(&self, a: &IpBytes) -> Option<u32> {
        let matches = |prefix: &IpBytes, bits: u32| {
            (0..bits as usize).all(|i| (a[i / 8] ^ prefix[i / 8]) & (0x80 >> (i % 8)) == 0)
        };
        self.cidrs
            .iter()
            .filter(|(p, bits, _)| matches(p, *bits))
            .max_by_key(|(_, bits, _)| *bits)
            .map(|(_, _, id)| *id)
    }

    fn rule_allows(
        &self,
        local: u32,
        remote: u32,
        dir: Direction,
        protocol: u8,
        port: u16,
    ) -> bool {
        self.rules.iter().any(|r| {
            r.active
                && r.local == local
                && r.remote == remote
                && r.dir == dir
                && match r.ports {
                    PortMatch::AnyProtocol => true,
                    PortMatch::AnyPort { protocol: p } => p == protocol,
                    PortMatch::Range {
                        protocol: p,
                        port: lo,
                        end_port: hi,
                    } => p == protocol && (lo..=hi).contains(&port),
                }
        })
    }

    /// Policy: whether `ep` may open a flow of `protocol` to destination `port` with `remote`.
    fn decide(
        &self,
        ep: &EndpointInfo,
        dir: Direction,
        remote: &IpBytes,
        protocol: u8,
        port: u16,
    ) -> bool {
        if !ep.isolated(dir) {
            return true;
        }
        let rid = self.identity(remote);
        if rid == IDENTITY_HOST
            && dir == Direction::Ingress
            && self.config.flags & CONFIG_ALLOW_HOST != 0
        {
            return true;
        }
        if rid != IDENTITY_NONE && self.rule_allows(ep.identity, rid, dir, protocol, port) {
            return true;
        }
        if let Some(cid) = self.cidr(remote)
            && self.rule_allows(ep.identity, cid, dir, protocol, port)
        {
            return true;
        }
        self.rule_allows(ep.identity, IDENTITY_ANY, dir, protocol, port)
    }
}

// ------------------------------------------------------------------------------------------------
// The reference parser: what a frame is, from the documented behaviour.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Frag {
    #[default]
    None,
    First,
    Later,
}

#[derive(Debug)]
struct Quoted {
    src: IpBytes,
    dst: IpBytes,
    sport: u16,
    dport: u16,
    protocol: u8,
}

#[derive(Debug, Default)]
struct Pkt {
    src: IpBytes,
    dst: IpBytes,
    /// The L4 protocol (after IPv6 extension headers; for a later fragment, the protocol its
    /// fragment header names).
    protocol: u8,
    /// Ports, or the echo identifier in both.
    sport: u16,
    dport: u16,
    /// TCP flags and sequence number (0 for other protocols).
    tcp_flags: u8,
    tcp_seq: u32,
    frag: Frag,
    frag_id: u32,
    /// The protocol fragments are recorded and matched under: IPv4's, or the next header an IPv6
    /// fragment header names.
    frag_proto: u8,
    /// IPv6 hop limit.
    hop_limit: u8,
    /// An ICMP error whose quoted flow could be read.
    quoted: Option<Quoted>,
    /// Link-local ICMPv6 control, passed before any other check: neighbour discovery with hop
    /// limit 255, MLD with hop limit 1 from a link-local source.
    link_local: bool,
}

#[derive(Debug)]
enum Parse {
    Arp,
    Drop(DropReason),
    Ip(Pkt),
}

fn model_parse(f: &[u8]) -> Parse {
    if f.len() < ETH_HLEN {
        return Parse::Drop(DropReason::TruncatedEthernet);
    }
    match be16(f, 12) {
        0x0800 => parse_v4(&f[ETH_HLEN..]),
        0x86dd => parse_v6(&f[ETH_HLEN..]),
        0x0806 => Parse::Arp,
        0x8100 | 0x88a8 => Parse::Drop(DropReason::VlanTagged),
        _ => Parse::Drop(DropReason::UnsupportedL3),
    }
}

fn parse_v4(ip: &[u8]) -> Parse {
    let bad = Parse::Drop(DropReason::MalformedIpv4);
    if ip.len() < 20 {
        return bad;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return bad;
    }
    let ip = &ip[..total];
    let field = be16(ip, 6);
    let mut pkt = Pkt {
        src: v4_at(ip, 12),
        dst: v4_at(ip, 16),
        protocol: ip[9],
        frag: if field & 0x1fff != 0 {
            Frag::Later
        } else if field & 0x2000 != 0 {
            Frag::First
        } else {
            Frag::None
        },
        frag_id: u32::from(be16(ip, 4)),
        frag_proto: ip[9],
        ..Pkt::default()
    };
    if pkt.frag == Frag::Later {
        return Parse::Ip(pkt);
    }
    match parse_l4(&mut pkt, &ip[ihl..], ETH_HLEN + ihl, false) {
        Ok(()) => Parse::Ip(pkt),
        Err(r) => Parse::Drop(r),
    }
}

fn is_v4_mapped(a: &IpBytes) -> bool {
    a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

fn parse_v6(ip: &[u8]) -> Parse {
    let bad = Parse::Drop(DropReason::MalformedIpv6);
    if ip.len() < 40 {
        return bad;
    }
    let plen = usize::from(be16(ip, 4));
    // Payload length 0 is a jumbogram, which no veth carries.
    if ip[0] >> 4 != 6 || plen == 0 || 40 + plen > ip.len() {
        return bad;
    }
    let mut pkt = Pkt {
        src: v6_at(ip, 8),
        dst: v6_at(ip, 24),
        hop_limit: ip[7],
        ..Pkt::default()
    };
    // IPv4-mapped addresses are no wire addresses (and would alias IPv4 endpoints).
    if is_v4_mapped(&pkt.src) || is_v4_mapped(&pkt.dst) {
        return bad;
    }
    let payload = &ip[40..40 + plen];
    let chain = Parse::Drop(DropReason::Ipv6ExtensionChain);
    let mut nh = ip[6];
    let mut off = 0;
    let mut count = 0;
    while matches!(nh, 0 | 43 | 44 | 51 | 60) {
        if count == MAX_EXT_HEADERS || V6_PAYLOAD + off > MAX_HEADER_OFF {
            return chain;
        }
        count += 1;
        if nh == 44 {
            if off + 8 > plen {
                return chain;
            }
            let e = &payload[off..off + 8];
            pkt.frag_id = be32(e, 4);
            pkt.frag_proto = e[0];
            let field = be16(e, 2);
            if field & 0xfff8 != 0 {
                // A later fragment: what follows is no header.
                pkt.protocol = e[0];
                pkt.frag = Frag::Later;
                return Parse::Ip(pkt);
            }
            if field & 1 != 0 {
                pkt.frag = Frag::First;
            }
            nh = e[0];
            off += 8;
            continue;
        }
        if off + 2 > plen {
            return chain;
        }
        let len = if nh == 51 {
            (usize::from(payload[off + 1]) + 2) * 4
        } else {
            (usize::from(payload[off + 1]) + 1) * 8
        };
        if off + len > plen {
            return chain;
        }
        nh = payload[off];
        off += len;
    }
    pkt.protocol = nh;
    match parse_l4(&mut pkt, &payload[off..], V6_PAYLOAD + off, true) {
        Ok(()) => Parse::Ip(pkt),
        Err(r) => Parse::Drop(r),
    }
}

/// `p` is the IP payload from the L4 header on, which starts at `at` in the frame.
fn parse_l4(pkt: &mut Pkt, p: &[u8], at: usize, v6: bool) -> Result<(), DropReason> {
    let bad = Err(DropReason::MalformedL4);
    let read_limit = at > MAX_HEADER_OFF;
    match pkt.protocol {
        ipproto::TCP => {
            if p.len() < 20 || read_limit {
                return bad;
            }
            let doff = usize::from(p[12] >> 4) * 4;
            if doff < 20 || doff > p.len() {
                return bad;
            }
            pkt.sport = be16(p, 0);
            pkt.dport = be16(p, 2);
            pkt.tcp_seq = be32(p, 4);
            pkt.tcp_flags = p[13];
        }
        ipproto::UDP | ipproto::SCTP => {
            let hlen = if pkt.protocol == ipproto::UDP { 8 } else { 12 };
            if p.len() < hlen || read_limit {
                return bad;
            }
            pkt.sport = be16(p, 0);
            pkt.dport = be16(p, 2);
        }
        ipproto::ICMP | ipproto::ICMPV6 => {
            // ICMP in IPv6 or ICMPv6 in IPv4 is invalid.
            if (pkt.protocol == ipproto::ICMPV6) != v6 || p.len() < 8 || read_limit {
                return bad;
            }
            let ty = p[0];
            let (echo, error) = if v6 {
                pkt.link_local = match ty {
                    133..=137 => pkt.hop_limit == 255,
                    130..=132 | 143 => {
                        pkt.hop_limit == 1 && pkt.src[0] == 0xfe && pkt.src[1] & 0xc0 == 0x80
                    }
                    _ => false,
                };
                (ty == 128 || ty == 129, (1..=4).contains(&ty))
            } else {
                (ty == 0 || ty == 8, matches!(ty, 3 | 4 | 11 | 12))
            };
            if echo {
                pkt.sport = be16(p, 4);
                pkt.dport = pkt.sport;
            } else if error {
                pkt.quoted = parse_quoted(&p[8..], at + 8, v6);
            }
        }
        _ => {}
    }
    Ok(())
}

/// The flow an ICMP error quotes (`q` is what follows the 8-byte ICMP header, at `at` in the
/// frame).
fn parse_quoted(q: &[u8], at: usize, v6: bool) -> Option<Quoted> {
    let (src, dst, protocol, l4) = if v6 {
        if q.len() < 40 {
            return None;
        }
        (v6_at(q, 8), v6_at(q, 24), q[6], 40)
    } else {
        if q.len() < 20 {
            return None;
        }
        let ihl = usize::from(q[0] & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        (v4_at(q, 12), v4_at(q, 16), q[9], ihl)
    };
    if l4 + 8 > q.len() || at + l4 > MAX_HEADER_OFF {
        return None;
    }
    let (sport, dport) = match protocol {
        ipproto::TCP | ipproto::UDP | ipproto::SCTP => (be16(q, l4), be16(q, l4 + 2)),
        ipproto::ICMP | ipproto::ICMPV6 => (be16(q, l4 + 4), be16(q, l4 + 4)),
        _ => return None,
    };
    Some(Quoted {
        src,
        dst,
        sport,
        dport,
        protocol,
    })
}

// ------------------------------------------------------------------------------------------------
// The model of the pipeline: which outcomes a run may have.

/// The outcomes the model allows for one run.
#[derive(Clone, Debug)]
struct Expect {
    pass: bool,
    drops: Vec<(DropReason, ProtoClass)>,
}

impl Expect {
    fn pass() -> Expect {
        Expect {
            pass: true,
            drops: Vec::new(),
        }
    }

    fn drop(reason: DropReason, class: ProtoClass) -> Expect {
        Expect {
            pass: false,
            drops: vec![(reason, class)],
        }
    }

    fn or(mut self, other: Expect) -> Expect {
        self.pass |= other.pass;
        for d in other.drops {
            if !self.drops.contains(&d) {
                self.drops.push(d);
            }
        }
        self
    }
}

/// How far into the pipeline a frame gets (by the model's first reading of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Stage {
    Refused,
    Arp,
    Malformed,
    LinkLocal,
    Endpoint,
    LaterFragment,
    Policy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FragRecord {
    Allowed,
    Denied,
    /// Either written or left as it was.
    Unknown,
}

fn ct_key(local: IpBytes, remote: IpBytes, lport: u16, rport: u16, protocol: u8) -> CtKey {
    CtKey::new(local, remote, lport, rport, protocol)
}

fn frag_key(src: IpBytes, dst: IpBytes, id: u32, protocol: u8) -> FragKey {
    FragKey::new(src, dst, id, protocol)
}

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, ipproto::TCP | ipproto::UDP | ipproto::SCTP)
}

/// The packet as the local endpoint of direction `dir` sees it.
struct View {
    local: IpBytes,
    remote: IpBytes,
    lport: u16,
    rport: u16,
}

fn view(p: &Pkt, dir: Direction) -> View {
    match dir {
        Direction::Egress => View {
            local: p.src,
            remote: p.dst,
            lport: p.sport,
            rport: p.dport,
        },
        Direction::Ingress => View {
            local: p.dst,
            remote: p.src,
            lport: p.dport,
            rport: p.sport,
        },
    }
}

/// The outcomes a later fragment may have, given the fragment records.
fn expect_later(frags: &HashMap<FragKey, FragRecord>, p: &Pkt, class: ProtoClass) -> Expect {
    let none = Expect::drop(DropReason::FragmentNoRecord, class);
    let e = match frags.get(&frag_key(p.src, p.dst, p.frag_id, p.frag_proto)) {
        None => none.clone(),
        Some(FragRecord::Allowed) => Expect::pass(),
        Some(FragRecord::Denied) => Expect::drop(DropReason::FragmentDenied, class),
        Some(FragRecord::Unknown) => Expect::pass()
            .or(Expect::drop(DropReason::FragmentDenied, class))
            .or(none.clone()),
    };
    // Past this many records the LRU map may have evicted some.
    if frags.len() > FRAG_RECORDS_SAFE {
        e.or(none)
    } else {
        e
    }
}

/// The model's copy of a `denied` map entry (`DeniedEntry`): a flow whose last packet was denied.
#[derive(Clone, Copy, Debug)]
struct DeniedRec {
    generation: u32,
    /// The ISN of the denied SYN (without ACK) it records, if any.
    syn_seq: Option<u32>,
    /// Made by a revocation.
    revoked: bool,
    /// When a packet of the flow was last denied (taken just before that run).
    last: Instant,
}

impl DeniedRec {
    /// (generation, tcp_seq, flags) as the datapath writes them.
    fn fields(&self) -> (u32, u32, u32) {
        let flags = if self.syn_seq.is_some() {
            DENIED_SYN
        } else {
            0
        } | if self.revoked { DENIED_REVOKED } else { 0 };
        (self.generation, self.syn_seq.unwrap_or(0), flags)
    }

    fn from_entry(e: &DeniedEntry, last: Instant) -> DeniedRec {
        DeniedRec {
            generation: e.generation,
            syn_seq: (e.flags & DENIED_SYN != 0).then_some(e.tcp_seq),
            revoked: e.flags & DENIED_REVOKED != 0,
            last,
        }
    }
}

fn entry_fields(e: &DeniedEntry) -> (u32, u32, u32) {
    (e.generation, e.tcp_seq, e.flags)
}

/// Whether a denied packet repeats the denied connection its flow's entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repeat {
    No,
    Yes,
    /// Within a second of the end of the repeat window (the model's clock is not the
    /// datapath's): either.
    Maybe,
}

/// The datapath's rule (`DeniedEntry::repeated_by`): an entry of the same endpoint generation,
/// refreshed less than `DENIED_REPEAT_WINDOW_NS` ago, and for a SYN without ACK one recorded
/// from a SYN with the same sequence number.
fn repeats(rec: Option<&DeniedRec>, generation: u32, syn_seq: Option<u32>, now: Instant) -> Repeat {
    let Some(r) = rec else {
        return Repeat::No;
    };
    if r.generation != generation || syn_seq.is_some_and(|seq| r.syn_seq != Some(seq)) {
        return Repeat::No;
    }
    let window = Duration::from_nanos(DENIED_REPEAT_WINDOW_NS);
    let slack = Duration::from_secs(1);
    let elapsed = now.saturating_duration_since(r.last);
    if elapsed + slack < window {
        Repeat::Yes
    } else if elapsed > window + slack {
        Repeat::No
    } else {
        Repeat::Maybe
    }
}

/// A run that may be a policy denial, as seen just before it.
struct DenialCtx {
    /// The flow as its local endpoint sees it (the `conntrack` and `denied` key).
    key: CtKey,
    /// The local endpoint's policy generation.
    generation: u32,
    /// The sequence number of a TCP SYN without ACK.
    syn_seq: Option<u32>,
    class: ProtoClass,
    /// The opener of the flow's conntrack entry, if it has one: a revocation counts under it.
    opener: Option<Direction>,
    now: Instant,
}

struct Model {
    world: World,
    /// Conntrack keys that may exist: those of the flows a policy-stage packet passed on.
    ct_possible: HashSet<CtKey>,
    /// Fragment records (keyed by `Pkt::frag_proto`).
    frags: HashMap<FragKey, FragRecord>,
    /// A generation was bumped: tracked flows may be re-checked (and revoked).
    rechecks: bool,
    /// The `denied` map (an entry the LRU map evicted is forgotten when found missing).
    denied: HashMap<CtKey, DeniedRec>,
    /// Denied connections (not packets) per (direction counted under, protocol class): what the
    /// enforcing `blocked` cells add up to, and (with the audit passes) the deny reports.
    blocked: HashMap<(Direction, ProtoClass), u64>,
    /// Denials at the edge of the repeat window, which may or may not count.
    blocked_maybe: HashMap<(Direction, ProtoClass), u64>,
}

impl Model {
    fn new(world: World) -> Model {
        Model {
            world,
            ct_possible: HashSet::new(),
            frags: HashMap::new(),
            rechecks: false,
            denied: HashMap::new(),
            blocked: HashMap::new(),
            blocked_maybe: HashMap::new(),
        }
    }

    /// The outcomes the model allows for a frame, and how far into the pipeline it gets.
    fn expect(&self, parse: &Parse, dir: Direction) -> (Expect, Stage) {
        let p = match parse {
            Parse::Arp => return (Expect::pass(), Stage::Arp),
            Parse::Drop(r) => return (Expect::drop(*r, ProtoClass::Other), Stage::Malformed),
            Parse::Ip(p) => p,
        };
        if p.link_local {
            return (Expect::pass(), Stage::LinkLocal);
        }
        let v = view(p, dir);
        let class = ProtoClass::of(p.protocol);
        let cfg = self.world.config;
        let ep = match self.world.endpoints.get(&v.local) {
            Some(ep) if ep.is_local() => *ep,
            other => {
                let e = if dir == Direction::Egress
                    && (other.is_some() || self.world.interfaces.contains(&RUN_IFINDEX))
                {
                    Expect::drop(DropReason::SpoofedSource, class)
                } else if cfg.flags & CONFIG_UNKNOWN_ALLOW != 0 {
                    Expect::pass()
                } else {
                    Expect::drop(DropReason::UnknownEndpoint, class)
                };
                return (e, Stage::Endpoint);
            }
        };
        if dir == Direction::Egress && ep.ifindex != 0 && ep.ifindex != RUN_IFINDEX {
            return (
                Expect::drop(DropReason::SpoofedSource, class),
                Stage::Endpoint,
            );
        }
        if p.frag == Frag::Later {
            return (expect_later(&self.frags, p, class), Stage::LaterFragment);
        }
        if ep.flags & ENDPOINT_AUDIT != 0 || cfg.flags & CONFIG_AUDIT != 0 {
            // Audit: whatever policy says, it passes.
            return (Expect::pass(), Stage::Policy);
        }
        let port = if has_ports(p.protocol) { p.dport } else { 0 };
        let allowed = self.world.decide(&ep, dir, &v.remote, p.protocol, port);
        let denied = Expect::drop(DropReason::PolicyDenied, class);
        if let Some(q) = &p.quoted {
            // An error passes if it quotes a tracked flow of the local endpoint; otherwise it is
            // decided like any ICMP packet. Never re-checked.
            let (ql, qr, qlp, qrp) = match dir {
                Direction::Ingress => (q.src, q.dst, q.sport, q.dport),
                Direction::Egress => (q.dst, q.src, q.dport, q.sport),
            };
            let related = ql == v.local
                && self
                    .ct_possible
                    .contains(&ct_key(ql, qr, qlp, qrp, q.protocol));
            let e = if allowed {
                Expect::pass()
            } else if related {
                Expect::pass().or(denied)
            } else {
                denied
            };
            return (e, Stage::Policy);
        }
        // An error with an unreadable quote is handled as a plain ICMP packet (its flow may be
        // tracked): the same outcomes, whether or not the datapath tracks it.
        let tracked = self
            .ct_possible
            .contains(&ct_key(v.local, v.remote, v.lport, v.rport, p.protocol));
        let revoked = Expect::drop(DropReason::PolicyRevoked, class);
        let e = match (allowed, tracked, self.rechecks) {
            (true, false, _) | (true, true, false) => Expect::pass(),
            (true, true, true) => Expect::pass().or(revoked),
            (false, false, _) => denied,
            (false, true, false) => Expect::pass().or(denied),
            (false, true, true) => Expect::pass().or(denied).or(revoked),
        };
        (e, Stage::Policy)
    }

    /// Records what a run of a frame at stage `stage` did to the state the model tracks.
    fn update(&mut self, parse: &Parse, stage: Stage, dir: Direction, passed: bool) {
        let Parse::Ip(p) = parse else { return };
        if stage != Stage::Policy {
            return;
        }
        let v = view(p, dir);
        if passed && p.quoted.is_none() {
            self.ct_possible
                .insert(ct_key(v.local, v.remote, v.lport, v.rport, p.protocol));
        }
        if p.frag != Frag::First {
            return;
        }
        let key = frag_key(p.src, p.dst, p.frag_id, p.frag_proto);
        let rec = if !passed {
            FragRecord::Denied
        } else if p.quoted.is_some() && self.frags.get(&key) != Some(&FragRecord::Allowed) {
            // A related error writes no record; an unrelated one does.
            FragRecord::Unknown
        } else {
            FragRecord::Allowed
        };
        self.frags.insert(key, rec);
    }
}

// ------------------------------------------------------------------------------------------------
// Frames.

/// `packets::ip_packet` with any protocol number in the IP header: etherparse builds IPv6
/// extension headers itself when the first one is hop-by-hop, and panics without them.
fn ip_raw(src: IpAddr, dst: IpAddr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = packets::ip_packet(src, dst, 253, payload);
    let at = if src.is_ipv6() {
        ETH_HLEN + 6
    } else {
        ETH_HLEN + 9
    };
    f[at] = protocol;
    f
}

/// `packets::ipv6_with_extensions`, built through `ip_raw`.
fn v6_exts(src: IpAddr, dst: IpAddr, exts: &[(u8, Vec<u8>)], l4: &L4) -> Vec<u8> {
    let mut payload = Vec::new();
    for (i, (_, bytes)) in exts.iter().enumerate() {
        let start = payload.len();
        payload.extend_from_slice(bytes);
        payload[start] = exts.get(i + 1).map_or(l4.protocol(true), |(t, _)| *t);
    }
    payload.extend_from_slice(&l4.bytes(true));
    let first = exts.first().map_or(l4.protocol(true), |(t, _)| *t);
    ip_raw(src, dst, first, &payload)
}

const V4_POOL: [&str; 12] = [
    "10.0.1.1",
    "10.0.1.2",
    "10.0.1.3",
    "10.0.1.4",
    "10.0.1.5",
    "10.0.2.1",
    "192.168.0.1",
    "172.16.5.5",
    "8.8.8.8",
    "8.1.2.3",
    "10.0.9.9",
    "10.0.1.1",
];

const V6_POOL: [&str; 10] = [
    "fd00::1:1",
    "fd00::1:2",
    "fd00::1:3",
    "fd00::2:1",
    "fd00::ff",
    "2001:db8::5",
    "2001:db8:1::7",
    "fd00::9:9",
    "fe80::1",
    "fd00::1:1",
];

/// Now and then in an IPv6 header: IPv4-mapped addresses (the map key of the IPv4 endpoint;
/// dropped as malformed) and near misses that are ordinary IPv6 addresses.
const V6_ODD_POOL: [&str; 5] = [
    "::ffff:10.0.1.1",
    "::ffff:192.168.0.1",
    "::ffff:0.0.0.0",
    "::10.0.1.1",
    "::fffe:a00:101",
];

const PORTS: [u16; 28] = [
    0, 1, 22, 53, 79, 80, 81, 442, 443, 444, 999, 1000, 1023, 1024, 1999, 2000, 4999, 5000, 5999,
    6000, 7999, 8000, 8063, 8064, 8099, 8100, 32768, 65535,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Valid,
    Mutated,
    Random,
}

/// A flow recently sent, to answer or quote.
#[derive(Clone, Copy)]
struct FlowRec {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    sport: u16,
    dport: u16,
}

/// A first fragment recently sent, to follow up.
#[derive(Clone, Copy)]
struct FirstRec {
    src: IpAddr,
    dst: IpAddr,
    id: u32,
    /// The protocol a later fragment's header names.
    protocol: u8,
}

struct Gen {
    rng: StdRng,
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
    v6_odd: Vec<IpAddr>,
    flows: Vec<FlowRec>,
    firsts: Vec<FirstRec>,
}

fn remember<T>(v: &mut Vec<T>, x: T, rng: &mut StdRng) {
    if v.len() < 64 {
        v.push(x);
    } else {
        let i = rng.random_range(0..v.len());
        v[i] = x;
    }
}

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen {
            rng: StdRng::seed_from_u64(seed),
            v4: V4_POOL.iter().map(|a| ip(a)).collect(),
            v6: V6_POOL.iter().map(|a| ip(a)).collect(),
            v6_odd: V6_ODD_POOL.iter().map(|a| ip(a)).collect(),
            flows: Vec::new(),
            firsts: Vec::new(),
        }
    }

    fn frame(&mut self) -> (Vec<u8>, Kind) {
        match self.rng.random_range(0..100) {
            0..35 => (self.valid(), Kind::Valid),
            35..80 => {
                let f = self.valid();
                (self.mutate(f), Kind::Mutated)
            }
            _ => (self.random(), Kind::Random),
        }
    }

    fn addr(&mut self, v6: bool) -> IpAddr {
        let pool = match (v6, self.rng.random_bool(0.02)) {
            (false, _) => &self.v4,
            (true, false) => &self.v6,
            (true, true) => &self.v6_odd,
        };
        *pool.choose(&mut self.rng).expect("pool")
    }

    fn port(&mut self) -> u16 {
        if self.rng.random_bool(0.6) {
            *PORTS.choose(&mut self.rng).expect("ports")
        } else {
            self.rng.random()
        }
    }

    fn tcp_flags(&mut self) -> Tcp {
        match self.rng.random_range(0..8) {
            0..3 => packets::SYN,
            3 => packets::SYN_ACK,
            4 => packets::ACK,
            5 => packets::FIN_ACK,
            6 => packets::RST,
            _ => Tcp {
                syn: self.rng.random(),
                ack: self.rng.random(),
                fin: self.rng.random(),
                rst: self.rng.random(),
            },
        }
    }

    fn echo_id(&mut self) -> u16 {
        *[1u16, 2, 7, 0x1234, self.rng.random()]
            .choose(&mut self.rng)
            .expect("ids")
    }

    /// An L4 header of a protocol with a flow (TCP, UDP, SCTP, echo).
    fn l4(&mut self) -> L4 {
        match self.rng.random_range(0..4) {
            0 => L4::Tcp {
                sport: self.port(),
                dport: self.port(),
                flags: self.tcp_flags(),
            },
            1 => L4::Udp {
                sport: self.port(),
                dport: self.port(),
            },
            2 => L4::Sctp {
                sport: self.port(),
                dport: self.port(),
            },
            _ => L4::Echo {
                id: self.echo_id(),
                reply: self.rng.random(),
            },
        }
    }

    /// Remembers the flow of a packet to answer or quote later.
    fn note_flow(&mut self, src: IpAddr, dst: IpAddr, l4: &L4) -> Option<FlowRec> {
        let (protocol, sport, dport) = match *l4 {
            L4::Tcp { sport, dport, .. } => (ipproto::TCP, sport, dport),
            L4::Udp { sport, dport } => (ipproto::UDP, sport, dport),
            L4::Sctp { sport, dport } => (ipproto::SCTP, sport, dport),
            L4::Echo { id, .. } => (l4.protocol(src.is_ipv6()), id, id),
            L4::Raw { .. } => return None,
        };
        let rec = FlowRec {
            src,
            dst,
            protocol,
            sport,
            dport,
        };
        remember(&mut self.flows, rec, &mut self.rng);
        Some(rec)
    }

    /// The L4 header of a packet of `f`'s flow, from its source (or, `reply`, back).
    fn flow_l4(&mut self, f: &FlowRec, reply: bool) -> L4 {
        let (sport, dport) = if reply {
            (f.dport, f.sport)
        } else {
            (f.sport, f.dport)
        };
        match f.protocol {
            ipproto::TCP => L4::Tcp {
                sport,
                dport,
                flags: if reply {
                    *[
                        packets::SYN_ACK,
                        packets::ACK,
                        packets::FIN_ACK,
                        packets::RST,
                    ]
                    .choose(&mut self.rng)
                    .expect("flags")
                } else {
                    self.tcp_flags()
                },
            },
            ipproto::UDP => L4::Udp { sport, dport },
            ipproto::SCTP => L4::Sctp { sport, dport },
            _ => L4::Echo {
                id: sport,
                reply: reply || self.rng.random(),
            },
        }
    }

    fn valid(&mut self) -> Vec<u8> {
        if !self.flows.is_empty() && self.rng.random_bool(0.2) {
            // A reply to (or more of) a recent flow: conntrack hits.
            let f = *self.flows.choose(&mut self.rng).expect("flows");
            let reply = self.rng.random_bool(0.7);
            let l4 = self.flow_l4(&f, reply);
            let (src, dst) = if reply {
                (f.dst, f.src)
            } else {
                (f.src, f.dst)
            };
            return packets::packet(src, dst, &l4);
        }
        let v6 = self.rng.random_bool(0.45);
        let src = self.addr(v6);
        let dst = self.addr(v6);
        match self.rng.random_range(0..100) {
            0..45 => {
                let l4 = self.l4();
                let _ = self.note_flow(src, dst, &l4);
                packets::packet(src, dst, &l4)
            }
            45..55 => self.icmp_error(v6),
            55..67 => self.fragment(src, dst),
            67..74 => {
                if v6 {
                    self.v6_chain(src, dst)
                } else {
                    self.v4_options(src, dst)
                }
            }
            74..78 => {
                let l4 = self.l4();
                packets::vlan_tagged(&packets::packet(src, dst, &l4))
            }
            78..85 => {
                let protocol = *[0u8, 2, 4, 41, 47, 50, 59, 89, 103, 255, self.rng.random()]
                    .choose(&mut self.rng)
                    .expect("protocols");
                let n = self.rng.random_range(0..40);
                let payload: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
                ip_raw(src, dst, protocol, &payload)
            }
            85..90 => self.arp(),
            _ => self.icmp_other(v6, src, dst),
        }
    }

    /// An ICMP(v6) error quoting a recent flow (or a new one), from its peer or a router.
    fn icmp_error(&mut self, v6: bool) -> Vec<u8> {
        let f = match self.flows.iter().filter(|f| f.src.is_ipv6() == v6).count() {
            n if n > 0 && self.rng.random_bool(0.8) => {
                let i = self.rng.random_range(0..n);
                *self
                    .flows
                    .iter()
                    .filter(|f| f.src.is_ipv6() == v6)
                    .nth(i)
                    .expect("flow")
            }
            _ => {
                let (src, dst) = (self.addr(v6), self.addr(v6));
                let l4 = self.l4();
                self.note_flow(src, dst, &l4).expect("a flow protocol")
            }
        };
        let l4 = self.flow_l4(&f, false);
        let quoted = packets::packet(f.src, f.dst, &l4);
        // The error goes back to the quoted packet's source.
        let from = if self.rng.random_bool(0.6) {
            f.dst
        } else {
            self.addr(v6)
        };
        let kind = if v6 {
            *[(1, 4), (1, 0), (2, 0), (3, 0), (4, 1)]
                .choose(&mut self.rng)
                .expect("kinds")
        } else {
            *[(3, 3), (3, 1), (3, 4), (4, 0), (11, 0), (12, 0)]
                .choose(&mut self.rng)
                .expect("kinds")
        };
        packets::icmp_error(from, f.src, kind, &quoted)
    }

    fn fragment(&mut self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let v6 = src.is_ipv6();
        let same_family: Vec<FirstRec> = self
            .firsts
            .iter()
            .filter(|f| f.src.is_ipv6() == v6)
            .copied()
            .collect();
        if !same_family.is_empty() && self.rng.random_bool(0.55) {
            // A later fragment of a recent datagram.
            let f = *same_family.choose(&mut self.rng).expect("firsts");
            let offset = self.rng.random_range(1..200u16);
            let more = self.rng.random();
            if v6 {
                let n = self.rng.random_range(8..48);
                let payload: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
                let exts = [(44, packets::ipv6_frag_header(f.id, offset, more))];
                let l4 = L4::Raw {
                    protocol: f.protocol,
                    payload,
                };
                return v6_exts(f.src, f.dst, &exts, &l4);
            }
            let l4 = L4::Raw {
                protocol: f.protocol,
                payload: Vec::new(),
            };
            return packets::ipv4_fragment(f.src, f.dst, &l4, f.id as u16, offset, more);
        }
        let l4 = self.l4();
        let id = self.rng.random_range(1..=8u32);
        let more = self.rng.random_bool(0.9);
        if v6 {
            let mut exts = vec![(44, packets::ipv6_frag_header(id, 0, more))];
            match self.rng.random_range(0..5) {
                0 => exts.insert(0, (0, packets::ipv6_opts_header())),
                // Destination options or AH after the fragment header (RFC 8200's order).
                1 => exts.push((60, packets::ipv6_opts_header())),
                2 => exts.push((51, vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
                _ => {}
            }
            let after = exts
                .iter()
                .position(|(t, _)| *t == 44)
                .and_then(|i| exts.get(i + 1))
                .map_or(l4.protocol(true), |(t, _)| *t);
            let rec = FirstRec {
                src,
                dst,
                id,
                protocol: after,
            };
            remember(&mut self.firsts, rec, &mut self.rng);
            return v6_exts(src, dst, &exts, &l4);
        }
        let rec = FirstRec {
            src,
            dst,
            id,
            protocol: l4.protocol(false),
        };
        remember(&mut self.firsts, rec, &mut self.rng);
        packets::ipv4_fragment(src, dst, &l4, id as u16, 0, more)
    }

    /// An IPv6 packet behind a chain of 1 to 9 extension headers, one of them sometimes longer
    /// than 1024 bytes (the parser's direct-access limit), one sometimes a fragment header (often
    /// the last: a later fragment's header ends the chain).
    fn v6_chain(&mut self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let n = *[1usize, 2, 3, 6, 7, 7, 8, 8, 9]
            .choose(&mut self.rng)
            .expect("n");
        let big = self
            .rng
            .random_bool(0.1)
            .then(|| self.rng.random_range(0..n));
        let frag = self.rng.random_bool(0.3).then(|| {
            if self.rng.random() {
                n - 1
            } else {
                self.rng.random_range(0..n)
            }
        });
        let id = self.rng.random_range(1..=8u32);
        let offset = *[0u16, 0, 1, 100].choose(&mut self.rng).expect("offsets");
        let mut exts = Vec::new();
        for i in 0..n {
            if frag == Some(i) {
                exts.push((44, packets::ipv6_frag_header(id, offset, true)));
                continue;
            }
            let t = *[0u8, 43, 60, 51].choose(&mut self.rng).expect("types");
            // Length in 8-byte units after the first 8 (AH: in 4-byte units after the first 8).
            let units: u8 = if big == Some(i) {
                self.rng.random_range(100..=140)
            } else {
                *[0u8, 0, 1, 2].choose(&mut self.rng).expect("units")
            };
            let len = if t == 51 {
                (usize::from(units) + 2) * 4
            } else {
                (usize::from(units) + 1) * 8
            };
            let mut h = vec![0u8; len];
            h[1] = units;
            h[2] = 1; // PadN
            h[3] = (len - 4).min(255) as u8;
            exts.push((t, h));
        }
        let l4 = self.l4();
        let _ = self.note_flow(src, dst, &l4);
        if let Some(i) = frag
            && offset == 0
        {
            let protocol = exts.get(i + 1).map_or(l4.protocol(true), |(t, _)| *t);
            let rec = FirstRec {
                src,
                dst,
                id,
                protocol,
            };
            remember(&mut self.firsts, rec, &mut self.rng);
        }
        v6_exts(src, dst, &exts, &l4)
    }

    fn v4_options(&mut self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let l4 = self.l4();
        let _ = self.note_flow(src, dst, &l4);
        let f = packets::packet(src, dst, &l4);
        let words = self.rng.random_range(1..=10usize);
        let mut v = f[..ETH_HLEN + 20].to_vec();
        v.extend(std::iter::repeat_n(1u8, words * 4 - 1)); // NOPs
        v.push(0); // end of options
        v.extend_from_slice(&f[ETH_HLEN + 20..]);
        v[ETH_HLEN] = 0x40 | (5 + words as u8);
        let total = be16(&f, ETH_HLEN + 2) + (words * 4) as u16;
        v[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
        v
    }

    fn arp(&mut self) -> Vec<u8> {
        let mut v = vec![0xff; 6];
        v.extend_from_slice(&packets::POD_MAC);
        v.extend_from_slice(&[
            0x08,
            0x06,
            0,
            1,
            0x08,
            0x00,
            6,
            4,
            0,
            self.rng.random_range(1..=2),
        ]);
        v.extend_from_slice(&packets::POD_MAC);
        v.extend_from_slice(&[10, 0, 1, 1, 0, 0, 0, 0, 0, 0, 10, 0, 2, 1]);
        if self.rng.random() {
            v.resize(60, 0);
        }
        v
    }

    /// Neighbour discovery / MLD (IPv6), or an ICMP type that is neither echo nor error. ND and
    /// MLD mostly with the hop limit they require, MLD half the time from a link-local source.
    fn icmp_other(&mut self, v6: bool, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let ty = if v6 {
            *[130u8, 131, 132, 133, 134, 135, 136, 137, 143, 138, 139, 200]
                .choose(&mut self.rng)
                .expect("types")
        } else {
            *[5u8, 9, 10, 13, 14, 42]
                .choose(&mut self.rng)
                .expect("types")
        };
        let (src, dst) = if v6 && self.rng.random() {
            let src = *["fe80::1", "febf::2", "fec0::1"]
                .choose(&mut self.rng)
                .expect("link-local");
            (ip(src), ip("ff02::1"))
        } else {
            (src, dst)
        };
        let mut payload = vec![ty, 0, 0, 0, 0, 0, 0, 0];
        payload.extend((0..16).map(|_| self.rng.random::<u8>()));
        let protocol = if v6 { ipproto::ICMPV6 } else { ipproto::ICMP };
        let mut f = packets::ip_packet(src, dst, protocol, &payload);
        if v6 {
            let usual = if (133..=137).contains(&ty) { 255 } else { 1 };
            f[ETH_HLEN + 7] = *[usual, usual, usual, 1, 64, 255]
                .choose(&mut self.rng)
                .expect("hop limits");
        }
        f
    }

    fn mutate(&mut self, mut f: Vec<u8>) -> Vec<u8> {
        for _ in 0..self.rng.random_range(1..=3) {
            match self.rng.random_range(0..100) {
                0..30 => {
                    for _ in 0..self.rng.random_range(1..=4) {
                        if f.is_empty() {
                            break;
                        }
                        let i = if self.rng.random_bool(0.75) {
                            self.rng.random_range(0..f.len().min(80))
                        } else {
                            self.rng.random_range(0..f.len())
                        };
                        f[i] ^= self.rng.random_range(1..=255u8);
                    }
                }
                30..45 => {
                    let len = if self.rng.random_bool(0.1) || f.len() <= ETH_HLEN {
                        self.rng.random_range(0..=f.len().min(ETH_HLEN))
                    } else {
                        self.rng.random_range(ETH_HLEN..f.len())
                    };
                    f.truncate(len);
                }
                45..55 => {
                    let n = if self.rng.random_bool(0.05) {
                        self.rng.random_range(64..1500)
                    } else {
                        self.rng.random_range(1..=64)
                    };
                    f.extend((0..n).map(|_| self.rng.random::<u8>()));
                }
                55..90 => self.extreme_field(&mut f),
                _ => {
                    if f.len() >= ETH_HLEN {
                        let et: u16 = *[0x0800, 0x86dd, 0x0806, 0x8100, 0x88a8, 0x05dc, 0x9100]
                            .choose(&mut self.rng)
                            .expect("ethertypes");
                        f[12..14].copy_from_slice(&et.to_be_bytes());
                    }
                }
            }
        }
        f
    }

    fn set16(f: &mut [u8], off: usize, v: u16) {
        if off + 2 <= f.len() {
            f[off..off + 2].copy_from_slice(&v.to_be_bytes());
        }
    }

    fn set8(f: &mut [u8], off: usize, v: u8) {
        if off < f.len() {
            f[off] = v;
        }
    }

    /// Sets one header field to an extreme or boundary value.
    fn extreme_field(&mut self, f: &mut [u8]) {
        if f.len() < ETH_HLEN + 1 {
            return;
        }
        let l3 = ETH_HLEN;
        let frame_ip_len = (f.len() - l3) as u16;
        let r = &mut self.rng;
        match be16(f, 12) {
            0x0800 => {
                let ihl = usize::from(f[l3] & 0x0f) * 4;
                let l4 = l3 + ihl.max(20);
                match r.random_range(0..9) {
                    0 => f[l3] = (f[l3] & 0xf0) | r.random_range(0..16u8),
                    1 => f[l3] = (r.random_range(0..16u8) << 4) | (f[l3] & 0x0f),
                    2 => {
                        let ihl16 = ihl as u16;
                        let v = *[
                            0,
                            1,
                            19,
                            20,
                            ihl16.wrapping_sub(1),
                            ihl16,
                            frame_ip_len.wrapping_sub(1),
                            frame_ip_len,
                            frame_ip_len.wrapping_add(1),
                            0xffff,
                            r.random(),
                        ]
                        .choose(r)
                        .expect("lengths");
                        Self::set16(f, l3 + 2, v);
                    }
                    3 => {
                        let v = *[
                            0u16,
                            0x2000,
                            0x0001,
                            0x2001,
                            0x1fff,
                            0x4000,
                            0x8000,
                            0xffff,
                            r.random(),
                        ]
                        .choose(r)
                        .expect("frag");
                        Self::set16(f, l3 + 6, v);
                    }
                    4 => {
                        let v = *[0u8, 1, 6, 17, 44, 58, 132, 255, r.random()]
                            .choose(r)
                            .expect("protocols");
                        Self::set8(f, l3 + 9, v);
                    }
                    5 => {
                        // TCP data offset.
                        if l4 + 12 < f.len() {
                            f[l4 + 12] = (r.random_range(0..16u8) << 4) | (f[l4 + 12] & 0x0f);
                        }
                    }
                    6 => {
                        let v = *[0u8, 3, 4, 5, 8, 11, 12, 13, 128, 135, r.random()]
                            .choose(r)
                            .expect("types");
                        Self::set8(f, l4, v);
                    }
                    7 => {
                        // The quoted header's IHL, in an ICMP error.
                        if l4 + 8 < f.len() {
                            f[l4 + 8] = (f[l4 + 8] & 0xf0) | r.random_range(0..16u8);
                        }
                    }
                    _ => Self::set16(f, l4 + 4, r.random_range(0..12)),
                }
            }
            0x86dd => {
                let first = l3 + 40;
                match r.random_range(0..9) {
                    0 => {
                        let actual = frame_ip_len.wrapping_sub(40);
                        let v = *[
                            0,
                            1,
                            8,
                            actual.wrapping_sub(1),
                            actual,
                            actual.wrapping_add(1),
                            actual.wrapping_add(8),
                            0xffff,
                            r.random(),
                        ]
                        .choose(r)
                        .expect("lengths");
                        Self::set16(f, l3 + 4, v);
                    }
                    1 => {
                        let v = *[0u8, 1, 6, 17, 43, 44, 51, 58, 59, 60, 132, r.random()]
                            .choose(r)
                            .expect("next headers");
                        Self::set8(f, l3 + 6, v);
                    }
                    2 => f[l3] = (r.random_range(0..16u8) << 4) | (f[l3] & 0x0f),
                    3 => {
                        let v = *[0u8, 1, 2, 64, 254, 255].choose(r).expect("hop limits");
                        Self::set8(f, l3 + 7, v);
                    }
                    4 => {
                        let v = *[0u8, 6, 17, 44, 51, 58, 59, 60, r.random()]
                            .choose(r)
                            .expect("next headers");
                        Self::set8(f, first, v);
                    }
                    5 => {
                        let v = *[0u8, 1, 2, 255, r.random()].choose(r).expect("lengths");
                        Self::set8(f, first + 1, v);
                    }
                    6 => {
                        // A fragment header's offset and M flag, if the first header is one.
                        let v = *[0u16, 1, 8, 9, 0xfff8, 0xffff, r.random()]
                            .choose(r)
                            .expect("frag");
                        Self::set16(f, first + 2, v);
                    }
                    7 => {
                        let v = *[1u8, 2, 3, 4, 128, 129, 130, 133, 135, 137, 143, r.random()]
                            .choose(r)
                            .expect("types");
                        Self::set8(f, first, v);
                    }
                    _ => {
                        if first + 12 < f.len() {
                            f[first + 12] = (r.random_range(0..16u8) << 4) | (f[first + 12] & 0x0f);
                        }
                    }
                }
            }
            _ => {
                let i = r.random_range(0..f.len());
                f[i] = *[0u8, 0xff, 0x80, 0x7f].choose(r).expect("bytes");
            }
        }
    }

    /// Random bytes behind a valid or random EtherType, sometimes with a plausible IP header.
    fn random(&mut self) -> Vec<u8> {
        let len = self.rng.random_range(ETH_HLEN..=200);
        let mut f: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
        let et: u16 = match self.rng.random_range(0..100) {
            0..35 => 0x0800,
            35..70 => 0x86dd,
            70..80 => 0x0806,
            80..85 => 0x8100,
            _ => self.rng.random(),
        };
        f[12..14].copy_from_slice(&et.to_be_bytes());
        let ip_len = len - ETH_HLEN;
        if self.rng.random_bool(0.6) {
            if et == 0x0800 && ip_len >= 20 {
                f[ETH_HLEN] = 0x45;
                if self.rng.random() {
                    Gen::set16(&mut f, ETH_HLEN + 2, ip_len as u16);
                }
                if self.rng.random() {
                    let (s, d) = (self.addr(false), self.addr(false));
                    f[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&ip_bytes(s)[12..]);
                    f[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&ip_bytes(d)[12..]);
                }
            } else if et == 0x86dd && ip_len >= 40 {
                f[ETH_HLEN] = 0x60;
                if self.rng.random() {
                    Gen::set16(&mut f, ETH_HLEN + 4, (ip_len - 40) as u16);
                }
                if self.rng.random() {
                    let (s, d) = (self.addr(true), self.addr(true));
                    f[ETH_HLEN + 8..ETH_HLEN + 24].copy_from_slice(&ip_bytes(s));
                    f[ETH_HLEN + 24..ETH_HLEN + 40].copy_from_slice(&ip_bytes(d));
                }
            }
        }
        f
    }
}

// ------------------------------------------------------------------------------------------------
// Running and checking.

fn dir_name(dir: Direction) -> &'static str {
    match dir {
        Direction::Egress => "from_pod (egress)",
        Direction::Ingress => "to_pod (ingress)",
    }
}

fn cell_name(index: u32) -> String {
    match drop_index_parts(index) {
        Some((r, d, p)) => format!("{}/{}/{}", r.as_str(), d.as_str(), p.as_str()),
        None => format!("invalid drop cell {index}"),
    }
}

/// Whether BPF_PROG_TEST_RUN may refuse `frame` (EINVAL) instead of running the program: the
/// kernel (seen on 6.18) refuses a frame shorter than an Ethernet header, and one whose EtherType
/// is IPv4 or IPv6 but that is too short for the fixed IP header (< 34 or < 54 bytes).
fn kernel_may_refuse(frame: &[u8]) -> bool {
    frame.len() < ETH_HLEN
        || match be16(frame, 12) {
            0x0800 => frame.len() < ETH_HLEN + 20,
            0x86dd => frame.len() < ETH_HLEN + 40,
            _ => false,
        }
}

fn run_raw(t: &TestDatapath, dir: Direction, frame: &[u8]) -> Result<i32, ProgramError> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        ..TestRunOptions::default()
    };
    t.dp.program(dir)
        .test_run(opts)
        .map(|r| r.return_value as i32)
}

fn drop_cell(t: &TestDatapath, index: u32) -> u64 {
    t.dp.maps
        .drops
        .get(&index, 0)
        .expect("reading a drop cell")
        .iter()
        .sum()
}

fn drop_cells(t: &TestDatapath) -> Vec<u64> {
    (0..DROPS_LEN).map(|i| drop_cell(t, i)).collect()
}

#[derive(Default)]
struct Tally {
    runs: u64,
    refused: u64,
    pass: [u64; 2],
    drop: [u64; 2],
    by_stage: HashMap<(Stage, bool), u64>,
    by_kind: HashMap<(Kind, bool), u64>,
    /// Passes at the policy stage per (direction, protocol class).
    policy_pass: HashMap<(Direction, ProtoClass), u64>,
    /// Passes of ICMP errors with a readable quote at the policy stage.
    error_pass: u64,
    events_read: u64,
    /// Policy drops that started a new denied connection, and those that repeated one, by
    /// whether they were revocations.
    denied_new: u64,
    denied_repeat: u64,
    revoked_new: u64,
    revoked_repeat: u64,
    /// Denied entries the LRU map evicted, and denials at the edge of the repeat window.
    denied_evicted: u64,
    denied_maybe: u64,
}

struct Fuzz {
    t: TestDatapath,
    model: Model,
    seed: u64,
    shadow: Vec<u64>,
    tally: Tally,
    failures: Vec<String>,
    failure_count: u64,
    /// Runs since the drop cells were last compared in full.
    window_start: u64,
}

impl Fuzz {
    fn fail(&mut self, msg: String) {
        self.failure_count += 1;
        if self.failures.len() < MAX_REPORTED {
            self.failures.push(msg);
        }
    }

    fn run(&mut self, frame: &[u8], kind: Kind, dir: Direction) {
        let run = self.tally.runs;
        self.tally.runs += 1;
        let parse = model_parse(frame);
        let (expect, stage) = self.model.expect(&parse, dir);
        let seed = self.seed;
        let context = |what: &str, actual: &str| {
            format!(
                "run {run} (seed {seed:#x}), {kind:?} frame of {len} bytes through {dir}: {what}\n  \
                 expected {expect:?} (model {parse:?})\n  actual {actual}\n  frame {frame}",
                len = frame.len(),
                dir = dir_name(dir),
                frame = hex(frame),
            )
        };
        let denial = self.denial_ctx(&parse, stage, dir, &expect, &context);
        let verdict = match run_raw(&self.t, dir, frame) {
            Err(e) => {
                self.tally.refused += 1;
                *self
                    .tally
                    .by_stage
                    .entry((Stage::Refused, false))
                    .or_default() += 1;
                if !kernel_may_refuse(frame) {
                    let msg = context("the kernel refused a frame it should run", &e.to_string());
                    self.fail(msg);
                }
                return;
            }
            Ok(v) => v,
        };
        let passed = match verdict {
            verdict::PASS => {
                self.tally.pass[dir as usize] += 1;
                if !expect.pass {
                    let msg = context("PASS where the model expects a drop", "PASS");
                    self.fail(msg);
                    return;
                }
                true
            }
            verdict::DROP => {
                self.tally.drop[dir as usize] += 1;
                let hit = expect.drops.iter().find_map(|&(reason, class)| {
                    let i = drop_index(reason, dir, class);
                    (drop_cell(&self.t, i) == self.shadow[i as usize] + 1).then_some(i)
                });
                match hit {
                    Some(i) => {
                        self.shadow[i as usize] += 1;
                        if let Some((
                            reason @ (DropReason::PolicyDenied | DropReason::PolicyRevoked),
                            _,
                            _,
                        )) = drop_index_parts(i)
                        {
                            match denial {
                                Some(d) => self.denied_drop(d, reason, dir, &context),
                                None => {
                                    let msg =
                                        context("a policy drop the model did not prepare", "");
                                    self.fail(msg);
                                }
                            }
                        }
                        false
                    }
                    None => {
                        let changed = self.resync();
                        let msg = context(
                            "DROP not counted in one cell the model allows",
                            &format!("DROP counted in {changed:?}"),
                        );
                        self.fail(msg);
                        return;
                    }
                }
            }
            other => {
                let msg = context(
                    "a verdict that is neither PASS nor DROP",
                    &other.to_string(),
                );
                self.fail(msg);
                self.resync();
                return;
            }
        };
        *self.tally.by_stage.entry((stage, passed)).or_default() += 1;
        *self.tally.by_kind.entry((kind, passed)).or_default() += 1;
        if passed
            && stage == Stage::Policy
            && let Parse::Ip(p) = &parse
        {
            *self
                .tally
                .policy_pass
                .entry((dir, ProtoClass::of(p.protocol)))
                .or_default() += 1;
            if p.quoted.is_some() {
                self.tally.error_pass += 1;
            }
        }
        self.model.update(&parse, stage, dir, passed);
    }

    /// For a run that may be a policy denial: the flow's key and, from the maps, what the model
    /// cannot know: whether the LRU map evicted its `denied` entry (checked against the model's
    /// copy otherwise), and which direction opened its conntrack entry.
    fn denial_ctx(
        &mut self,
        parse: &Parse,
        stage: Stage,
        dir: Direction,
        expect: &Expect,
        context: &dyn Fn(&str, &str) -> String,
    ) -> Option<DenialCtx> {
        let Parse::Ip(p) = parse else { return None };
        let may = |reason| expect.drops.iter().any(|&(r, _)| r == reason);
        if stage != Stage::Policy
            || !(may(DropReason::PolicyDenied) || may(DropReason::PolicyRevoked))
        {
            return None;
        }
        let v = view(p, dir);
        let key = ct_key(v.local, v.remote, v.lport, v.rport, p.protocol);
        let generation = self.model.world.endpoints[&v.local].generation;
        let syn_seq =
            (p.protocol == ipproto::TCP && p.tcp_flags & 0x12 == 0x02).then_some(p.tcp_seq);
        let kernel = self.t.dp.maps.denied.get(&key, 0).ok();
        match (kernel, self.model.denied.get(&key)) {
            (None, Some(_)) => {
                self.model.denied.remove(&key);
                self.tally.denied_evicted += 1;
            }
            (Some(e), None) => {
                let msg = context("a denied entry the model never made", &format!("{e:?}"));
                self.fail(msg);
            }
            (Some(e), Some(rec)) if entry_fields(&e) != rec.fields() => {
                let msg = context(
                    "the denied entry differs from the model's",
                    &format!("{e:?}, model {rec:?}"),
                );
                let rec = DeniedRec::from_entry(&e, rec.last);
                self.model.denied.insert(key, rec);
                self.fail(msg);
            }
            _ => {}
        }
        let opener = if may(DropReason::PolicyRevoked) {
            self.t
                .dp
                .maps
                .conntrack
                .get(&key, 0)
                .ok()
                .and_then(|e| Direction::from_u8(e.opener))
        } else {
            None
        };
        Some(DenialCtx {
            key,
            generation,
            syn_seq,
            class: ProtoClass::of(p.protocol),
            opener,
            now: Instant::now(),
        })
    }

    /// A policy drop: a new denied connection (counted in `blocked` under the direction whose
    /// policy decided, the opener's for a revocation, and reported) or a repeat of one. Either
    /// way the flow's `denied` entry must now be what the model expects.
    fn denied_drop(
        &mut self,
        d: DenialCtx,
        reason: DropReason,
        dir: Direction,
        context: &dyn Fn(&str, &str) -> String,
    ) {
        let revoked = reason == DropReason::PolicyRevoked;
        let counted = if revoked {
            d.opener.unwrap_or_else(|| {
                let msg = context("revoked a flow that had no conntrack entry", "");
                self.fail(msg);
                dir
            })
        } else {
            dir
        };
        let cell = (counted, d.class);
        let repeat = repeats(
            self.model.denied.get(&d.key),
            d.generation,
            d.syn_seq,
            d.now,
        );
        match (repeat, revoked) {
            (Repeat::Yes, false) => self.tally.denied_repeat += 1,
            (Repeat::Yes, true) => self.tally.revoked_repeat += 1,
            (Repeat::No, false) => self.tally.denied_new += 1,
            (Repeat::No, true) => self.tally.revoked_new += 1,
            (Repeat::Maybe, _) => self.tally.denied_maybe += 1,
        }
        match repeat {
            Repeat::No => {
                *self.model.blocked.entry(cell).or_default() += 1;
                let rec = DeniedRec {
                    generation: d.generation,
                    syn_seq: d.syn_seq,
                    revoked,
                    last: d.now,
                };
                self.model.denied.insert(d.key, rec);
            }
            Repeat::Yes => {
                if let Some(rec) = self.model.denied.get_mut(&d.key) {
                    rec.last = d.now;
                }
            }
            Repeat::Maybe => *self.model.blocked_maybe.entry(cell).or_default() += 1,
        }
        let entry = match self.t.dp.maps.denied.get(&d.key, 0) {
            Ok(e) => e,
            Err(e) => {
                let msg = context("no denied entry after a policy drop", &e.to_string());
                self.fail(msg);
                self.model.denied.remove(&d.key);
                return;
            }
        };
        if repeat == Repeat::Maybe {
            // Whichever it was, the datapath's entry is the truth from here on.
            let rec = DeniedRec::from_entry(&entry, d.now);
            self.model.denied.insert(d.key, rec);
            return;
        }
        let rec = self.model.denied[&d.key];
        if entry_fields(&entry) != rec.fields() || entry._pad0 != 0 || entry.last_ns == 0 {
            let msg = context(
                &format!("denied entry after a {repeat:?} repeat"),
                &format!("{entry:?}, model {rec:?}"),
            );
            self.model
                .denied
                .insert(d.key, DeniedRec::from_entry(&entry, d.now));
            self.fail(msg);
        }
    }

    /// Re-reads every drop cell into the shadow; returns the cells that differed.
    fn resync(&mut self) -> Vec<String> {
        let now = drop_cells(&self.t);
        let changed = (0..DROPS_LEN)
            .filter(|&i| now[i as usize] != self.shadow[i as usize])
            .map(|i| {
                format!(
                    "{} {:+}",
                    cell_name(i),
                    now[i as usize] as i64 - self.shadow[i as usize] as i64
                )
            })
            .collect();
        self.shadow = now;
        changed
    }

    /// Compares every drop cell with the shadow, and reads the deny events.
    fn checkpoint(&mut self) {
        let changed = self.resync();
        if !changed.is_empty() {
            let msg = format!(
                "runs {}..{} (seed {:#x}): drop cells changed without a matching DROP verdict: \
                 {changed:?} (set NPC_FUZZ_CHECK_EVERY=1 to find the run)",
                self.window_start, self.tally.runs, self.seed
            );
            self.fail(msg);
        }
        self.window_start = self.tally.runs;
        if self.model.rechecks {
            self.drain_events();
        }
    }

    fn drain_events(&mut self) {
        let mut bad = Vec::new();
        let mut read = 0;
        {
            let ring = self.t.dp.maps.events.as_mut().expect("events ring");
            while let Some(item) = ring.next() {
                read += 1;
                if item.len() < size_of::<DenyEvent>() {
                    bad.push(format!("short event of {} bytes", item.len()));
                    continue;
                }
                let e: DenyEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DenyEvent) };
                if let Err(why) = check_event(&self.model.world, &e) {
                    bad.push(format!("{why}: {e:?}"));
                }
            }
        }
        self.tally.events_read += read;
        for b in bad {
            let msg = format!("deny event (seed {:#x}): {b}", self.seed);
            self.fail(msg);
        }
    }
}

fn check_event(w: &World, e: &DenyEvent) -> Result<(), String> {
    let reason = DropReason::from_u8(e.reason);
    if !matches!(
        reason,
        Some(DropReason::PolicyDenied | DropReason::PolicyRevoked)
    ) {
        return Err(format!("reason {}", e.reason));
    }
    if Direction::from_u8(e.direction).is_none() {
        return Err(format!("direction {}", e.direction));
    }
    let Some(ep) = w.endpoints.get(&e.local).filter(|ep| ep.is_local()) else {
        return Err("local address is no local endpoint".into());
    };
    if e.local_identity != ep.identity {
        return Err(format!("local identity, expected {}", ep.identity));
    }
    let audit = ep.flags & ENDPOINT_AUDIT != 0 || w.config.flags & CONFIG_AUDIT != 0;
    if e.flags & !EVENT_AUDIT != 0 || (e.flags & EVENT_AUDIT != 0) != audit {
        return Err(format!("flags, audited endpoint: {audit}"));
    }
    if e.remote_identity != w.identity(&e.remote) {
        return Err(format!(
            "remote identity, expected {}",
            w.identity(&e.remote)
        ));
    }
    if e.remote_cidr_identity != IDENTITY_NONE && Some(e.remote_cidr_identity) != w.cidr(&e.remote)
    {
        return Err(format!(
            "remote CIDR identity, expected {:?}",
            w.cidr(&e.remote)
        ));
    }
    if e.ifindex != RUN_IFINDEX {
        return Err(format!("ifindex, expected {RUN_IFINDEX}"));
    }
    Ok(())
}

fn counters(t: &TestDatapath) -> HashMap<Counter, u64> {
    Counter::ALL
        .iter()
        .map(|&c| (c, t.dp.maps.counter(c).expect("reading a counter")))
        .collect()
}

fn allowed_total(t: &TestDatapath) -> HashMap<(Direction, ProtoClass), u64> {
    let mut m = HashMap::new();
    for dir in Direction::ALL {
        for class in ProtoClass::ALL {
            let n = t.dp.maps.allowed(dir, class).expect("reading allowed");
            m.insert((dir, class), n);
        }
    }
    m
}

fn drops_of(t: &TestDatapath, reason: DropReason) -> u64 {
    Direction::ALL
        .iter()
        .map(|&d| t.dp.maps.drop_total(reason, d).expect("drop_total"))
        .sum()
}

/// Checks the `blocked` map against the denied connections: every overflow increment is in an
/// overflow cell (port 0, a protocol with a class of its own or 0); the enforcing cells equal the
/// model's denied connections per (direction, protocol class) (not the `policy_denied` drops: a
/// retransmission repeats its connection), give or take the denials at the edge of the repeat
/// window; the audit cells equal `audit_would_block` if `exact` (before any re-check), are at
/// most it after.
fn check_blocked(fz: &mut Fuzz, exact: bool) -> String {
    let cells = fz.t.dp.maps.blocked().expect("reading blocked");
    let c = counters(&fz.t);
    let audit = c[&Counter::AuditWouldBlock];
    let overflow_counted = c[&Counter::BlockedOverflow];
    let mut enforcing: HashMap<(u8, ProtoClass), u64> = HashMap::new();
    let (mut audit_cells, mut overflow) = (0, 0);
    let mut problems = Vec::new();
    for b in &cells {
        let k = b.key;
        let class = ProtoClass::of(k.protocol);
        if k.flags & BLOCKED_OVERFLOW != 0 {
            overflow += b.connections;
            if k.dport != 0 || (k.protocol != 0 && class == ProtoClass::Other) {
                problems.push(format!("overflow cell {k:?}"));
            }
        }
        if k.flags & !(BLOCKED_OVERFLOW | BLOCKED_AUDIT) != 0 {
            problems.push(format!("flags of {k:?}"));
        } else if k.flags & BLOCKED_AUDIT != 0 {
            audit_cells += b.connections;
        } else {
            *enforcing.entry((k.direction, class)).or_default() += b.connections;
        }
    }
    let (mut denied, mut connections) = (0, 0);
    for dir in Direction::ALL {
        for class in ProtoClass::ALL {
            let n = fz.model.blocked.get(&(dir, class)).copied().unwrap_or(0);
            let maybe = fz
                .model
                .blocked_maybe
                .get(&(dir, class))
                .copied()
                .unwrap_or(0);
            let cells = enforcing.remove(&(dir as u8, class)).unwrap_or(0);
            if cells < n || cells > n + maybe {
                problems.push(format!(
                    "{}/{}: blocked {cells} != denied connections {n} (+ up to {maybe})",
                    dir.as_str(),
                    class.as_str()
                ));
            }
            connections += cells;
            denied += drop_cell(&fz.t, drop_index(DropReason::PolicyDenied, dir, class))
                + drop_cell(&fz.t, drop_index(DropReason::PolicyRevoked, dir, class));
        }
    }
    if connections > denied {
        problems.push(format!(
            "blocked connections {connections} > policy_denied + policy_revoked drops {denied}"
        ));
    }
    if !enforcing.is_empty() {
        problems.push(format!("cells of no direction: {enforcing:?}"));
    }
    if overflow != overflow_counted {
        problems.push(format!(
            "overflow cells {overflow} != blocked_overflow {overflow_counted}"
        ));
    }
    if audit_cells > audit || (exact && audit_cells != audit) {
        problems.push(format!(
            "audit cells {audit_cells} vs audit_would_block {audit} (exact: {exact})"
        ));
    }
    let summary = format!(
        "{} cells, overflow {overflow}, blocked connections {connections}, policy_denied + \
         policy_revoked drops {denied}, audit cells {audit_cells}, audit_would_block {audit}",
        cells.len()
    );
    for p in problems {
        fz.fail(format!("blocked ({summary}): {p}"));
    }
    summary
}

#[test]
fn fuzz_both_programs() {
    let seed = seed();
    let packets = env_u64("NPC_FUZZ_PACKETS").map_or(DEFAULT_PACKETS, |n| n as usize);
    let check_every = env_u64("NPC_FUZZ_CHECK_EVERY")
        .unwrap_or(DEFAULT_CHECK_EVERY)
        .max(1);
    println!(
        "fuzz: seed {seed:#x} (NPC_FUZZ_SEED), {packets} frames (NPC_FUZZ_PACKETS), each through \
         both programs"
    );

    let mut t = TestDatapath::new(config());
    let world = World::populated(&mut t);
    let shadow = drop_cells(&t);
    let mut fz = Fuzz {
        t,
        model: Model::new(world),
        seed,
        shadow,
        tally: Tally::default(),
        failures: Vec::new(),
        failure_count: 0,
        window_start: 0,
    };
    let mut frames = Gen::new(seed);
    let churn_at = [packets * 8 / 10, packets * 9 / 10];
    let mut blocked_before_churn = None;
    let start = Instant::now();
    for i in 0..packets {
        if churn_at.contains(&i) {
            fz.checkpoint();
            fz.drain_events();
            if blocked_before_churn.is_none() {
                blocked_before_churn = Some(check_blocked(&mut fz, true));
            }
            fz.model.world.churn(&mut fz.t);
            fz.model.rechecks = true;
        }
        let (frame, kind) = frames.frame();
        let dirs = if frames.rng.random() {
            [Direction::Egress, Direction::Ingress]
        } else {
            [Direction::Ingress, Direction::Egress]
        };
        for dir in dirs {
            fz.run(&frame, kind, dir);
            if fz.tally.runs.is_multiple_of(check_every) {
                fz.checkpoint();
            }
        }
    }
    fz.checkpoint();
    fz.drain_events();
    let elapsed = start.elapsed();
    let blocked_before_churn = blocked_before_churn.unwrap_or_else(|| check_blocked(&mut fz, true));
    let summary = final_checks(&mut fz, packets, blocked_before_churn);
    println!(
        "fuzz: {} runs of {packets} frames in {:.2?} ({:.1} µs/run including the checks)\n{summary}",
        fz.tally.runs,
        elapsed,
        elapsed.as_secs_f64() * 1e6 / fz.tally.runs.max(1) as f64,
    );
    if fz.failure_count > 0 {
        panic!(
            "{} failure(s) with seed {seed:#x}; the first {}:\n{}\n\n{summary}",
            fz.failure_count,
            fz.failures.len(),
            fz.failures.join("\n\n"),
        );
    }
}

/// The end-of-run invariants; returns a summary to print.
fn final_checks(fz: &mut Fuzz, packets: usize, blocked_before_churn: String) -> String {
    let mut out = String::new();
    let tally = &fz.tally;
    let passes: u64 = tally.pass.iter().sum();
    let drop_verdicts: u64 = tally.drop.iter().sum();

    // Every map reads back.
    let maps = &fz.t.dp.maps;
    let cells = drop_cells(&fz.t);
    let raw_total: u64 = cells.iter().sum();
    let drops = maps.drops().expect("reading drops");
    let valid_total: u64 = drops.iter().map(|d| d.packets).sum();
    let c = counters(&fz.t);
    let allowed = allowed_total(&fz.t);
    let blocked = maps.blocked().expect("reading blocked");
    let ct_len = maps.conntrack_len();
    let conntrack: Vec<_> = maps
        .conntrack
        .iter()
        .map(|r| r.expect("reading conntrack"))
        .collect();
    let fragments: Vec<_> = maps
        .fragments
        .iter()
        .map(|r| r.expect("reading fragments"))
        .collect();
    let endpoints = maps
        .endpoints
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .expect("reading endpoints")
        .len();
    let cidrs = maps
        .cidrs
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .expect("reading cidrs")
        .len();
    let policy = maps
        .policy
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .expect("reading policy")
        .len();
    let cfg = maps.config().expect("reading config");
    let mut problems = Vec::new();
    if endpoints != fz.model.world.endpoints.len() || cfg != fz.model.world.config {
        problems.push(format!("endpoints {endpoints} / config {cfg:?} changed"));
    }

    // Drops: one cell per Drop verdict, per direction, and only valid cells.
    if raw_total != drop_verdicts {
        problems.push(format!(
            "sum of drop cells {raw_total} != DROP verdicts {drop_verdicts}"
        ));
    }
    for dir in Direction::ALL {
        let n: u64 = drops
            .iter()
            .filter(|d| d.direction == dir)
            .map(|d| d.packets)
            .sum();
        if n != tally.drop[dir as usize] {
            problems.push(format!(
                "{} drops counted {n} != DROP verdicts {}",
                dir.as_str(),
                tally.drop[dir as usize]
            ));
        }
    }
    if valid_total != raw_total {
        problems.push(format!(
            "drops in cells of no (reason, direction, class): {}",
            raw_total - valid_total
        ));
    }

    // Passes.
    let stage = |s: Stage, passed: bool| tally.by_stage.get(&(s, passed)).copied().unwrap_or(0);
    let allowed_sum: u64 = allowed.values().sum();
    let counted = allowed_sum
        + c[&Counter::IcmpRelated]
        + c[&Counter::FragmentsPassed]
        + c[&Counter::UnknownEndpointPassed]
        + c[&Counter::AuditWouldBlock]
        + c[&Counter::Rechecked];
    let uncounted_known = stage(Stage::Arp, true) + stage(Stage::LinkLocal, true);
    let ct_hits = passes as i64 - counted as i64 - uncounted_known as i64;
    if ct_hits < 0 {
        problems.push(format!(
            "pass-side counters {counted} + ARP/ND passes {uncounted_known} > PASS verdicts {passes}"
        ));
    }
    if c[&Counter::FragmentsPassed] != stage(Stage::LaterFragment, true) {
        problems.push(format!(
            "fragments_passed {} != later fragments passed {}",
            c[&Counter::FragmentsPassed],
            stage(Stage::LaterFragment, true)
        ));
    }
    if c[&Counter::UnknownEndpointPassed] != 0 {
        problems.push("unknown_endpoint_passed with the default to drop".into());
    }
    if c[&Counter::CtInsertFailed] != 0 {
        problems.push(format!("ct_insert_failed {}", c[&Counter::CtInsertFailed]));
    }
    if c[&Counter::IcmpRelated] > tally.error_pass {
        problems.push(format!(
            "icmp_related {} > ICMP errors passed {}",
            c[&Counter::IcmpRelated],
            tally.error_pass
        ));
    }
    for ((dir, class), n) in &allowed {
        let passed = tally.policy_pass.get(&(*dir, *class)).copied().unwrap_or(0);
        if *n > passed {
            problems.push(format!(
                "allowed {}/{} {n} > policy-stage passes {passed}",
                dir.as_str(),
                class.as_str()
            ));
        }
    }

    // Deny reports: one per denied connection (not per denied packet) and per audit pass.
    let connections: u64 = fz.model.blocked.values().sum();
    let maybe: u64 = fz.model.blocked_maybe.values().sum();
    let reports = connections + c[&Counter::AuditWouldBlock];
    let events =
        c[&Counter::EventsSubmitted] + c[&Counter::EventsRateLimited] + c[&Counter::EventsLost];
    if events < reports || events > reports + maybe {
        problems.push(format!(
            "events submitted+rate-limited+lost {events} != denials to report {reports} (+ up \
             to {maybe})"
        ));
    }
    let policy_drops =
        drops_of(&fz.t, DropReason::PolicyDenied) + drops_of(&fz.t, DropReason::PolicyRevoked);
    let decided = tally.denied_new
        + tally.denied_repeat
        + tally.revoked_new
        + tally.revoked_repeat
        + tally.denied_maybe;
    if decided != policy_drops {
        problems.push(format!(
            "policy drops {policy_drops} != policy drops the model followed {decided}"
        ));
    }

    // The denied map: every entry is the model's (evicted ones aside).
    let denied_entries = maps.denied_entries().expect("reading denied");
    for (k, e) in &denied_entries {
        let why = match fz.model.denied.get(k) {
            None => Some("an entry the model never made".to_string()),
            Some(rec) if entry_fields(e) != rec.fields() => Some(format!("model {rec:?}")),
            Some(_) if e._pad0 != 0 || (k._pad0, k._pad1) != (0, 0) => Some("padding".into()),
            Some(_) => None,
        };
        if let Some(why) = why
            && problems.len() < 40
        {
            problems.push(format!(
                "denied entry {}:{} -> {}:{} proto {}: {why}: {e:?}",
                addr(&k.local),
                k.local_port,
                addr(&k.remote),
                k.remote_port,
                k.protocol
            ));
        }
    }
    if tally.events_read != c[&Counter::EventsSubmitted] {
        problems.push(format!(
            "events read {} != events_submitted {}",
            tally.events_read,
            c[&Counter::EventsSubmitted]
        ));
    }

    // Conntrack and fragment records.
    let known_flags = CT_SYN_LOCAL
        | CT_SYN_REMOTE
        | CT_FIN_LOCAL
        | CT_FIN_REMOTE
        | CT_RST
        | CT_REPLIED
        | CT_UNISOLATED
        | CT_AUDIT;
    if ct_len != conntrack.len() {
        problems.push(format!(
            "conntrack_len {ct_len} != entries iterated {}",
            conntrack.len()
        ));
    }
    if ct_len as u64 > allowed_sum + c[&Counter::AuditWouldBlock] {
        problems.push(format!(
            "{ct_len} conntrack entries > new connections passed"
        ));
    }
    for (k, e) in &conntrack {
        let local = fz.model.world.endpoints.get(&k.local);
        let why = if !local.is_some_and(|ep| ep.is_local()) {
            Some("local address is no local endpoint")
        } else if !fz.model.ct_possible.contains(k) {
            Some("a flow the model never passed")
        } else if e.opener > 1
            || e.flags & !known_flags != 0
            || (k._pad0, k._pad1) != (0, 0)
            || (e._pad0, e._pad1) != (0, 0)
        {
            Some("bad field")
        } else if e.generation > local.map_or(0, |ep| ep.generation) {
            Some("generation ahead of its endpoint")
        } else if e.created_ns > e.last_seen_ns {
            Some("created after last seen")
        } else {
            None
        };
        if let Some(why) = why
            && problems.len() < 40
        {
            problems.push(format!(
                "conntrack entry {}:{} -> {}:{} proto {}: {why}: {e:?}",
                addr(&k.local),
                k.local_port,
                addr(&k.remote),
                k.remote_port,
                k.protocol
            ));
        }
    }
    for (k, e) in &fragments {
        let expected = fz.model.frags.get(k);
        let ok = match expected {
            Some(FragRecord::Allowed) => e.allowed == 1,
            Some(FragRecord::Denied) => e.allowed == 0,
            Some(FragRecord::Unknown) => e.allowed <= 1,
            None => false,
        };
        if !ok && problems.len() < 40 {
            problems.push(format!(
                "fragment record {} -> {} id {} proto {}: {e:?}, model {expected:?}",
                addr(&k.src),
                addr(&k.dst),
                k.id,
                k.protocol
            ));
        }
    }

    let blocked_after = check_blocked(fz, false);

    // Coverage: the generator must keep reaching the deep paths.
    if packets >= 50_000 {
        let mut missing = Vec::new();
        for r in DropReason::ALL {
            // Frames shorter than an Ethernet header never reach the program (`kernel_may_refuse`).
            if r != DropReason::TruncatedEthernet && drops_of(&fz.t, r) == 0 {
                missing.push(r.as_str().to_string());
            }
        }
        for counter in [
            Counter::EventsSubmitted,
            Counter::EventsRateLimited,
            Counter::IcmpRelated,
            Counter::FragmentsPassed,
            Counter::AuditWouldBlock,
            Counter::Rechecked,
        ] {
            if c[&counter] == 0 {
                missing.push(counter.as_str().to_string());
            }
        }
        if ct_hits <= 0 {
            missing.push("conntrack hits".into());
        }
        for (n, what) in [
            (fz.tally.denied_repeat, "repeated denied connections"),
            (fz.tally.revoked_new, "revoked connections counted"),
        ] {
            if n == 0 {
                missing.push(what.into());
            }
        }
        if !missing.is_empty() {
            problems.push(format!("paths never reached: {missing:?}"));
        }
    }
    for p in problems {
        fz.fail(p);
    }

    let tally = &fz.tally;
    let _ = writeln!(
        out,
        "verdicts: PASS {passes} (egress {}, ingress {}), DROP {drop_verdicts} (egress {}, \
         ingress {}), refused by the kernel (too short) {}",
        tally.pass[Direction::Egress as usize],
        tally.pass[Direction::Ingress as usize],
        tally.drop[Direction::Egress as usize],
        tally.drop[Direction::Ingress as usize],
        tally.refused
    );
    let mut stages: Vec<_> = tally.by_stage.iter().collect();
    stages.sort();
    let _ = writeln!(out, "by stage (stage, passed): {stages:?}");
    let mut kinds: Vec<_> = tally.by_kind.iter().collect();
    kinds.sort();
    let _ = writeln!(out, "by kind (kind, passed): {kinds:?}");
    let mut reasons: Vec<_> = drops
        .iter()
        .map(|d| {
            format!(
                "{}/{}/{}={}",
                d.reason.as_str(),
                d.direction.as_str(),
                d.proto.as_str(),
                d.packets
            )
        })
        .collect();
    reasons.sort();
    let _ = writeln!(out, "drops: {}", reasons.join(" "));
    let mut counted_list: Vec<_> = Counter::ALL
        .iter()
        .map(|k| format!("{}={}", k.as_str(), c[k]))
        .collect();
    counted_list.push(format!("allowed={allowed_sum}"));
    let _ = writeln!(out, "counters: {}", counted_list.join(" "));
    let _ = writeln!(
        out,
        "passes not counted anywhere (conntrack hits) {ct_hits}; conntrack entries {ct_len}; \
         fragment records {}; blocked cells {}; policy keys {policy}; cidrs {cidrs}; events read {}",
        fragments.len(),
        blocked.len(),
        tally.events_read
    );
    let _ = writeln!(
        out,
        "policy drops: new denied connections {}, repeats {}; revocations counted {}, repeats \
         {}; at the window's edge {}; denied entries {} (model {}, evicted {})",
        tally.denied_new,
        tally.denied_repeat,
        tally.revoked_new,
        tally.revoked_repeat,
        tally.denied_maybe,
        denied_entries.len(),
        fz.model.denied.len(),
        tally.denied_evicted
    );
    let _ = writeln!(
        out,
        "blocked before the first generation bump: {blocked_before_churn}"
    );
    let _ = write!(out, "blocked at the end: {blocked_after}");
    out
}

/// The same frame, run twice with no state change in between, gets the same verdict. With no
/// endpoints, no frame creates state (no conntrack entry, fragment record or blocked cell).
#[test]
fn same_frame_same_verdict() {
    let seed = seed() ^ 0x5eed;
    let t = TestDatapath::new(config());
    let mut frames = Gen::new(seed);
    let mut drops = 0u64;
    for i in 0..1000 {
        let (frame, kind) = frames.frame();
        for dir in Direction::ALL {
            let first = run_raw(&t, dir, &frame).ok();
            let second = run_raw(&t, dir, &frame).ok();
            assert_eq!(
                first,
                second,
                "frame {i} ({kind:?}, seed {seed:#x}) through {}: {}",
                dir_name(dir),
                hex(&frame)
            );
            if first.is_none() {
                assert!(kernel_may_refuse(&frame), "refused: {}", hex(&frame));
            }
            drops += 2 * u64::from(first == Some(verdict::DROP));
        }
    }
    let cells: u64 = drop_cells(&t).iter().sum();
    assert_eq!(cells, drops, "drop cells vs DROP verdicts (seed {seed:#x})");
    let maps = &t.dp.maps;
    assert_eq!(maps.conntrack_len(), 0, "conntrack entries");
    assert_eq!(maps.fragments.keys().count(), 0, "fragment records");
    assert!(maps.blocked().expect("blocked").is_empty(), "blocked cells");
    assert!(
        maps.denied_entries().expect("denied").is_empty(),
        "denied entries"
    );
    assert_eq!(maps.counter(Counter::EventsSubmitted).expect("counter"), 0);
}
