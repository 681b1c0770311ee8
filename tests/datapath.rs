//! Datapath verdicts and counters through BPF_PROG_TEST_RUN with crafted packets.
//!
//! `from_pod` runs with `Egress` (the packet leaves the local pod), `to_pod` with `Ingress`.
//! Each case builds the map state it needs through the agent's typed map API.
use std::net::IpAddr;

use npc_agent::dataplane::PortMatch;
use npc_common::{
    BLOCKED_AUDIT, BLOCKED_OVERFLOW, BlockedKey, CONFIG_ALLOW_HOST, CONFIG_UNKNOWN_ALLOW, Config,
    Counter, CtKey, DENIED_REVOKED, DENIED_SYN, DenyEvent,
    Direction::{self, *},
    DropReason, ENDPOINT_AUDIT, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED,
    ENDPOINT_LOCAL, EndpointInfo, IDENTITY_ANY, IDENTITY_FIRST_CIDR, IDENTITY_HOST, INTERFACE_POD,
    InterfaceInfo, ProtoClass, ip_bytes, ipproto,
};
use npc_tests::{
    datapath::{TestDatapath, Verdict::*, ip},
    packets::*,
};

const ID_A: u32 = 256;
const ID_B: u32 = 257;
const ID_REMOTE: u32 = 300;
const CIDR_ID: u32 = IDENTITY_FIRST_CIDR + 1;
const CIDR_EXCEPT_ID: u32 = IDENTITY_FIRST_CIDR + 2;
const RULE: u32 = 7;
/// BPF_PROG_TEST_RUN runs skbs on the loopback device.
const TEST_IFINDEX: u32 = 1;

/// Two local pods A and B (v4 and v6), a pod on another node, and the node itself.
struct World {
    t: TestDatapath,
}

const A: &str = "10.0.1.1";
const B: &str = "10.0.1.2";
const A6: &str = "fd00::1:1";
const B6: &str = "fd00::1:2";
const REMOTE: &str = "10.0.2.1";
const NODE: &str = "10.0.0.254";

impl World {
    fn new() -> World {
        World::with_config(Config::default())
    }

    fn with_config(config: Config) -> World {
        World::with_datapath(TestDatapath::new(config))
    }

    /// The test pods in a datapath loaded by the caller (e.g. with other load options).
    fn with_datapath(mut t: TestDatapath) -> World {
        let m = &mut t.dp.maps;
        for (addr, id) in [(A, ID_A), (A6, ID_A), (B, ID_B), (B6, ID_B)] {
            m.set_endpoint(ip(addr), local(id, 0)).unwrap();
        }
        m.set_endpoint(
            ip(REMOTE),
            EndpointInfo {
                identity: ID_REMOTE,
                ..Default::default()
            },
        )
        .unwrap();
        m.set_endpoint(
            ip(NODE),
            EndpointInfo {
                identity: IDENTITY_HOST,
                ..Default::default()
            },
        )
        .unwrap();
        World { t }
    }

    /// Sets the flags of both addresses of the pod with identity `id` (generation unchanged).
    fn isolate(&mut self, id: u32, flags: u32) {
        for addr in addrs(id) {
            let mut ep = self.t.dp.maps.endpoint(ip(addr)).unwrap();
            ep.flags = ENDPOINT_LOCAL | flags;
            self.t.dp.maps.set_endpoint(ip(addr), ep).unwrap();
        }
    }

    /// Bumps the policy generation of pod `id` (what the agent does when its policy changes).
    fn bump(&mut self, id: u32) {
        for addr in addrs(id) {
            let mut ep = self.t.dp.maps.endpoint(ip(addr)).unwrap();
            ep.generation += 1;
            self.t.dp.maps.set_endpoint(ip(addr), ep).unwrap();
        }
    }

    fn allow(&mut self, local: u32, remote: u32, dir: Direction, ports: PortMatch) {
        self.t
            .dp
            .maps
            .allow(local, remote, dir, ports, RULE)
            .unwrap();
    }

    fn run(&self, dir: Direction, frame: &[u8]) -> npc_tests::datapath::Verdict {
        self.t.run(dir, frame)
    }

    fn drops(&self, reason: DropReason, dir: Direction) -> u64 {
        self.t.dp.maps.drop_total(reason, dir).unwrap()
    }

    fn all_drops(&self) -> u64 {
        self.t
            .dp
            .maps
            .drops()
            .unwrap()
            .iter()
            .map(|d| d.packets)
            .sum()
    }

    fn counter(&self, c: Counter) -> u64 {
        self.t.dp.maps.counter(c).unwrap()
    }

    fn allowed(&self, dir: Direction, proto: ProtoClass) -> u64 {
        self.t.dp.maps.allowed(dir, proto).unwrap()
    }

    fn blocked(&self, dir: Direction, protocol: u8, dport: u16, flags: u32) -> u64 {
        let key = BlockedKey {
            dport,
            direction: dir as u8,
            protocol,
            flags,
        };
        self.t
            .dp
            .maps
            .blocked()
            .unwrap()
            .iter()
            .find(|b| b.key == key)
            .map_or(0, |b| b.connections)
    }
}

impl World {
    /// The deny events in the ring buffer (consumed).
    fn events(&mut self) -> Vec<DenyEvent> {
        let ring = self.t.dp.maps.events.as_mut().expect("events ring");
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            assert!(item.len() >= size_of::<DenyEvent>(), "short event");
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DenyEvent) });
        }
        out
    }

    /// The `denied` entry of a flow, keyed from the local endpoint's side.
    fn denied_entry(
        &self,
        local: &str,
        remote: &str,
        lport: u16,
        rport: u16,
        protocol: u8,
    ) -> Option<npc_common::DeniedEntry> {
        let key = CtKey::new(
            ip_bytes(ip(local)),
            ip_bytes(ip(remote)),
            lport,
            rport,
            protocol,
        );
        self.t.dp.maps.denied.get(&key, 0).ok()
    }
}

/// Events on, at a rate no test reaches: every reported denial is in the ring buffer.
fn events_config() -> Config {
    Config {
        events_per_sec: 1000,
        events_burst: 1000,
        ..Config::default()
    }
}

/// A TCP segment with sequence number `seq` (the crafted ones carry 1000).
fn tcp_seq(src: &str, sport: u16, dst: &str, dport: u16, flags: Tcp, seq: u32) -> Vec<u8> {
    let mut f = tcp(ipa(src), sport, ipa(dst), dport, flags);
    let l4 = if ipa(src).is_ipv6() {
        ETH_HLEN + 40
    } else {
        ETH_HLEN + usize::from(f[ETH_HLEN] & 0x0f) * 4
    };
    f[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
    f
}

fn local(identity: u32, flags: u32) -> EndpointInfo {
    EndpointInfo {
        identity,
        flags: ENDPOINT_LOCAL | flags,
        ifindex: 0,
        generation: 1,
    }
}

fn addrs(id: u32) -> [&'static str; 2] {
    match id {
        ID_A => [A, A6],
        ID_B => [B, B6],
        _ => panic!("no such test pod {id}"),
    }
}

fn tcp_port(port: u16) -> PortMatch {
    PortMatch::Range {
        protocol: ipproto::TCP,
        port,
        end_port: port,
    }
}

/// B is ingress-isolated and accepts A on UDP 53 only.
fn b_accepts_a_on_udp_53() -> World {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    let dns = PortMatch::Range {
        protocol: ipproto::UDP,
        port: 53,
        end_port: 53,
    };
    w.allow(ID_B, ID_A, Ingress, dns);
    w
}

fn ipa(s: &str) -> IpAddr {
    ip(s)
}

// ---- allowed and denied, per protocol and family ----

/// B is ingress-isolated and allows A on `ports`; a new connection from A to B's `port` over
/// `proto` is checked at B's `to_pod`.
fn ingress_case(v6: bool, l4: L4, ports: PortMatch, expect: npc_tests::datapath::Verdict) {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.allow(ID_B, ID_A, Ingress, ports);
    let (a, b) = if v6 { (A6, B6) } else { (A, B) };
    let frame = packet(ipa(a), ipa(b), &l4);
    assert_eq!(w.run(Ingress, &frame), expect, "{l4:?} v6={v6}");
    let class = ProtoClass::of(l4.protocol(v6));
    let dport = match l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } | L4::Sctp { dport, .. } => dport,
        _ => 0,
    };
    if expect == Pass {
        assert_eq!(w.allowed(Ingress, class), 1, "allowed counter");
        assert_eq!(w.all_drops(), 0, "no drops");
    } else {
        assert_eq!(
            w.drops(DropReason::PolicyDenied, Ingress),
            1,
            "drop counter"
        );
        assert_eq!(
            w.blocked(Ingress, l4.protocol(v6), dport, 0),
            1,
            "blocked counter"
        );
        assert_eq!(w.allowed(Ingress, class), 0);
    }
}

#[test]
fn tcp_allowed_and_denied_v4_v6() {
    for v6 in [false, true] {
        let port = PortMatch::Range {
            protocol: ipproto::TCP,
            port: 80,
            end_port: 80,
        };
        ingress_case(
            v6,
            L4::Tcp {
                sport: 40000,
                dport: 80,
                flags: SYN,
            },
            port,
            Pass,
        );
        ingress_case(
            v6,
            L4::Tcp {
                sport: 40000,
                dport: 81,
                flags: SYN,
            },
            port,
            Drop,
        );
    }
}

#[test]
fn udp_allowed_and_denied_v4_v6() {
    for v6 in [false, true] {
        let port = PortMatch::Range {
            protocol: ipproto::UDP,
            port: 53,
            end_port: 53,
        };
        ingress_case(
            v6,
            L4::Udp {
                sport: 40000,
                dport: 53,
            },
            port,
            Pass,
        );
        ingress_case(
            v6,
            L4::Udp {
                sport: 40000,
                dport: 54,
            },
            port,
            Drop,
        );
        // The same port over TCP is not allowed by a UDP rule.
        ingress_case(
            v6,
            L4::Tcp {
                sport: 40000,
                dport: 53,
                flags: SYN,
            },
            port,
            Drop,
        );
    }
}

#[test]
fn sctp_allowed_and_denied_v4_v6() {
    for v6 in [false, true] {
        let port = PortMatch::Range {
            protocol: ipproto::SCTP,
            port: 3868,
            end_port: 3868,
        };
        ingress_case(
            v6,
            L4::Sctp {
                sport: 40000,
                dport: 3868,
            },
            port,
            Pass,
        );
        ingress_case(
            v6,
            L4::Sctp {
                sport: 40000,
                dport: 3869,
            },
            port,
            Drop,
        );
        ingress_case(
            v6,
            L4::Udp {
                sport: 40000,
                dport: 3868,
            },
            port,
            Drop,
        );
    }
}

#[test]
fn port_wildcard() {
    let any_tcp = PortMatch::AnyPort {
        protocol: ipproto::TCP,
    };
    for port in [1, 80, 12345, 65535] {
        ingress_case(
            false,
            L4::Tcp {
                sport: 40000,
                dport: port,
                flags: SYN,
            },
            any_tcp,
            Pass,
        );
    }
    ingress_case(
        false,
        L4::Udp {
            sport: 40000,
            dport: 80,
        },
        any_tcp,
        Drop,
    );
    ingress_case(
        false,
        L4::Echo {
            id: 9,
            reply: false,
        },
        any_tcp,
        Drop,
    );
}

#[test]
fn protocol_wildcard() {
    let any = PortMatch::AnyProtocol;
    for v6 in [false, true] {
        ingress_case(
            v6,
            L4::Tcp {
                sport: 1,
                dport: 2,
                flags: SYN,
            },
            any,
            Pass,
        );
        ingress_case(v6, L4::Udp { sport: 1, dport: 2 }, any, Pass);
        ingress_case(v6, L4::Sctp { sport: 1, dport: 2 }, any, Pass);
        ingress_case(
            v6,
            L4::Echo {
                id: 9,
                reply: false,
            },
            any,
            Pass,
        );
        ingress_case(
            v6,
            L4::Raw {
                protocol: 47,
                payload: vec![0; 8],
            },
            any,
            Pass,
        );
    }
}

#[test]
fn port_range() {
    let range = PortMatch::Range {
        protocol: ipproto::TCP,
        port: 8000,
        end_port: 8010,
    };
    for (port, expect) in [
        (7999, Drop),
        (8000, Pass),
        (8001, Pass),
        (8005, Pass),
        (8008, Pass),
        (8010, Pass),
        (8011, Drop),
    ] {
        ingress_case(
            false,
            L4::Tcp {
                sport: 40000,
                dport: port,
                flags: SYN,
            },
            range,
            expect,
        );
    }
    // A range over the whole port space, and one ending at 65535.
    let all = PortMatch::Range {
        protocol: ipproto::UDP,
        port: 1,
        end_port: 65535,
    };
    ingress_case(
        false,
        L4::Udp {
            sport: 1,
            dport: 65535,
        },
        all,
        Pass,
    );
    let top = PortMatch::Range {
        protocol: ipproto::UDP,
        port: 65530,
        end_port: 65535,
    };
    ingress_case(
        false,
        L4::Udp {
            sport: 1,
            dport: 65529,
        },
        top,
        Drop,
    );
    ingress_case(
        false,
        L4::Udp {
            sport: 1,
            dport: 65535,
        },
        top,
        Pass,
    );
}

// ---- peers ----

#[test]
fn ip_block_with_except() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    // ipBlock 192.0.2.0/24 except 192.0.2.128/25: the except prefix gets an identity that no
    // rule names.
    w.t.dp.maps.set_cidr(ipa("192.0.2.0"), 24, CIDR_ID).unwrap();
    w.t.dp
        .maps
        .set_cidr(ipa("192.0.2.128"), 25, CIDR_EXCEPT_ID)
        .unwrap();
    w.t.dp
        .maps
        .set_cidr(ipa("2001:db8::"), 32, CIDR_ID)
        .unwrap();
    w.allow(ID_B, CIDR_ID, Ingress, tcp_port(80));
    for (src, dst, expect) in [
        ("192.0.2.1", B, Pass),
        ("192.0.2.127", B, Pass),
        ("192.0.2.128", B, Drop),
        ("192.0.2.255", B, Drop),
        ("198.51.100.1", B, Drop),
        ("2001:db8::5", B6, Pass),
        ("2001:db9::5", B6, Drop),
    ] {
        let v = w.run(Ingress, &tcp(ipa(src), 40000, ipa(dst), 80, SYN));
        assert_eq!(v, expect, "{src} -> {dst}");
    }
    assert_eq!(w.drops(DropReason::PolicyDenied, Ingress), 4);
}

#[test]
fn ip_block_matches_pod_ips_too() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    // A's pod identity has no rule, but its address lies in an allowed ipBlock.
    w.t.dp.maps.set_cidr(ipa("10.0.1.0"), 24, CIDR_ID).unwrap();
    w.allow(ID_B, CIDR_ID, Ingress, tcp_port(80));
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Pass);
}

#[test]
fn any_peer_rule() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.allow(ID_B, IDENTITY_ANY, Ingress, tcp_port(80));
    assert_eq!(
        w.run(Ingress, &tcp(ipa("203.0.113.9"), 40000, ipa(B), 80, SYN)),
        Pass
    );
    assert_eq!(
        w.run(Ingress, &tcp(ipa(REMOTE), 40000, ipa(B), 80, SYN)),
        Pass
    );
    assert_eq!(
        w.run(Ingress, &tcp(ipa(REMOTE), 40000, ipa(B), 81, SYN)),
        Drop
    );
}

#[test]
fn not_isolated_endpoint_passes_and_is_tracked() {
    let w = World::new();
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 9999, SYN)), Pass);
    assert_eq!(
        w.run(Egress, &udp(ipa(B), 5000, ipa("203.0.113.1"), 53)),
        Pass
    );
    assert_eq!(w.allowed(Ingress, ProtoClass::Tcp), 1);
    assert_eq!(w.allowed(Egress, ProtoClass::Udp), 1);
    assert_eq!(w.t.dp.maps.conntrack_len(), 2);
    assert_eq!(w.all_drops(), 0);
}

#[test]
fn node_traffic_to_local_pods() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    assert_eq!(
        w.run(Ingress, &tcp(ipa(NODE), 40000, ipa(B), 8080, SYN)),
        Pass,
        "probe allowed"
    );
    // With host traffic treated like any peer, the isolated pod drops it.
    let cfg = Config {
        flags: Config::default().flags & !CONFIG_ALLOW_HOST,
        ..Config::default()
    };
    let mut w = World::with_config(cfg);
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    assert_eq!(
        w.run(Ingress, &tcp(ipa(NODE), 40000, ipa(B), 8080, SYN)),
        Drop
    );
}

// ---- conntrack ----

#[test]
fn replies_of_allowed_flows_pass() {
    let mut w = World::new();
    // B: isolated both ways, allows A in on 80 and nothing out.
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED);
    w.allow(ID_B, ID_A, Ingress, tcp_port(80));
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Pass);
    assert_eq!(
        w.run(Egress, &tcp(ipa(B), 80, ipa(A), 40000, SYN_ACK)),
        Pass,
        "reply"
    );
    assert_eq!(
        w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)),
        Pass,
        "established"
    );
    assert_eq!(
        w.run(Egress, &tcp(ipa(B), 80, ipa(A), 40000, ACK)),
        Pass,
        "established reply"
    );
    // B opening its own connection to A is egress and not allowed.
    assert_eq!(w.run(Egress, &tcp(ipa(B), 80, ipa(A), 40001, SYN)), Drop);
    assert_eq!(w.allowed(Ingress, ProtoClass::Tcp), 1, "one new connection");
    assert_eq!(w.drops(DropReason::PolicyDenied, Egress), 1);
    assert_eq!(w.t.dp.maps.conntrack_len(), 1);
}

#[test]
fn udp_and_icmp_echo_replies_pass() {
    let mut w = World::new();
    w.isolate(ID_A, ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED);
    w.allow(ID_A, IDENTITY_ANY, Egress, PortMatch::AnyProtocol);
    let dns = ipa("203.0.113.53");
    assert_eq!(w.run(Egress, &udp(ipa(A), 5353, dns, 53)), Pass);
    assert_eq!(
        w.run(Ingress, &udp(dns, 53, ipa(A), 5353)),
        Pass,
        "udp reply"
    );
    assert_eq!(
        w.run(Ingress, &udp(dns, 53, ipa(A), 5354)),
        Drop,
        "not a reply"
    );
    assert_eq!(
        w.run(Egress, &echo(ipa(A6), ipa("2001:db8::1"), 77, false)),
        Pass
    );
    assert_eq!(
        w.run(Ingress, &echo(ipa("2001:db8::1"), ipa(A6), 77, true)),
        Pass,
        "echo reply"
    );
    assert_eq!(
        w.run(Ingress, &echo(ipa("2001:db8::1"), ipa(A6), 78, false)),
        Drop,
        "echo in"
    );
}

#[test]
fn client_egress_allowed_server_ingress_denied_on_one_node() {
    // A may send to B:80, but B does not accept A: the flow must be dropped at B even though
    // A's side tracked it.
    let mut w = World::new();
    w.isolate(ID_A, ENDPOINT_EGRESS_ISOLATED);
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.allow(ID_A, ID_B, Egress, tcp_port(80));
    let syn = tcp(ipa(A), 40000, ipa(B), 80, SYN);
    assert_eq!(w.run(Egress, &syn), Pass, "A's egress allows");
    assert_eq!(w.run(Ingress, &syn), Drop, "B's ingress denies");
    // Retransmission: still dropped at B (A's conntrack entry does not cover B's side).
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)), Drop);
    assert_eq!(w.drops(DropReason::PolicyDenied, Ingress), 2);

    // And the other way round: B accepts A, but A may not send.
    let mut w = World::new();
    w.isolate(ID_A, ENDPOINT_EGRESS_ISOLATED);
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.allow(ID_B, ID_A, Ingress, tcp_port(80));
    assert_eq!(w.run(Egress, &syn), Drop);
    assert_eq!(w.drops(DropReason::PolicyDenied, Egress), 1);
}

#[test]
fn revocation_after_generation_bump() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.allow(ID_B, ID_A, Ingress, tcp_port(80));
    w.allow(ID_B, ID_A, Ingress, tcp_port(443));
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Pass);
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40001, ipa(B), 443, SYN)), Pass);
    assert_eq!(w.t.dp.maps.conntrack_len(), 2);

    // Port 80 is no longer allowed; without a generation bump the flow lives on.
    w.t.dp
        .maps
        .revoke(ID_B, ID_A, Ingress, tcp_port(80))
        .unwrap();
    assert_eq!(
        w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)),
        Pass,
        "no bump yet"
    );
    w.bump(ID_B);
    // Re-checked: 80 is revoked and its entry deleted, 443 is still allowed and refreshed.
    assert_eq!(
        w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)),
        Drop,
        "revoked"
    );
    assert_eq!(w.drops(DropReason::PolicyRevoked, Ingress), 1);
    assert_eq!(
        w.run(Egress, &tcp(ipa(B), 443, ipa(A), 40001, ACK)),
        Pass,
        "still allowed"
    );
    assert_eq!(w.counter(Counter::Rechecked), 1);
    assert_eq!(w.t.dp.maps.conntrack_len(), 1);
    // The revoked flow stays revoked: the client's next segment is a new, denied flow.
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)), Drop);
}

#[test]
fn a_revoked_connection_is_not_revived_by_the_other_side() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.allow(ID_B, ID_A, Ingress, tcp_port(80));
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Pass);
    w.t.dp
        .maps
        .revoke(ID_B, ID_A, Ingress, tcp_port(80))
        .unwrap();
    w.bump(ID_B);
    assert_eq!(
        w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)),
        Drop,
        "revoked"
    );
    // The server pushes (its egress is not isolated): that passes, but must not track the flow
    // again, or the client's next segment would pass as a reply.
    assert_eq!(
        w.run(Egress, &tcp(ipa(B), 80, ipa(A), 40000, ACK)),
        Pass,
        "server push"
    );
    assert_eq!(
        w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)),
        Drop,
        "still revoked"
    );
    assert_eq!(w.t.dp.maps.conntrack_len(), 0);
}

#[test]
fn isolation_added_later_revokes_established_flows() {
    let mut w = World::new();
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Pass);
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.bump(ID_B);
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)), Drop);
    assert_eq!(w.drops(DropReason::PolicyRevoked, Ingress), 1);
}

#[test]
fn syn_after_reset_is_checked_again() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.allow(ID_B, ID_A, Ingress, tcp_port(80));
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Pass);
    assert_eq!(w.run(Egress, &tcp(ipa(B), 80, ipa(A), 40000, RST)), Pass);
    // The rule goes away without a bump: a new SYN on the closed flow is decided afresh.
    w.t.dp
        .maps
        .revoke(ID_B, ID_A, Ingress, tcp_port(80))
        .unwrap();
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Drop);
}

// ---- fragments ----

#[test]
fn ipv4_fragments_follow_the_first() {
    let w = b_accepts_a_on_udp_53();
    let ok = L4::Udp {
        sport: 4000,
        dport: 53,
    };
    let bad = L4::Udp {
        sport: 4000,
        dport: 54,
    };
    assert_eq!(
        w.run(Ingress, &ipv4_fragment(ipa(A), ipa(B), &ok, 1, 0, true)),
        Pass
    );
    assert_eq!(
        w.run(Ingress, &ipv4_fragment(ipa(A), ipa(B), &ok, 1, 3, true)),
        Pass
    );
    assert_eq!(
        w.run(Ingress, &ipv4_fragment(ipa(A), ipa(B), &ok, 1, 6, false)),
        Pass
    );
    assert_eq!(w.counter(Counter::FragmentsPassed), 2);

    assert_eq!(
        w.run(Ingress, &ipv4_fragment(ipa(A), ipa(B), &bad, 2, 0, true)),
        Drop
    );
    assert_eq!(
        w.run(Ingress, &ipv4_fragment(ipa(A), ipa(B), &bad, 2, 3, false)),
        Drop
    );
    assert_eq!(w.drops(DropReason::FragmentDenied, Ingress), 1);

    // A later fragment whose first fragment never came.
    assert_eq!(
        w.run(Ingress, &ipv4_fragment(ipa(A), ipa(B), &ok, 3, 3, false)),
        Drop
    );
    assert_eq!(w.drops(DropReason::FragmentNoRecord, Ingress), 1);
}

#[test]
fn ipv6_fragments_follow_the_first() {
    let w = b_accepts_a_on_udp_53();
    let ok = L4::Udp {
        sport: 4000,
        dport: 53,
    };
    let first = ipv6_with_extensions(ipa(A6), ipa(B6), &[(44, ipv6_frag_header(9, 0, true))], &ok);
    let later_payload = L4::Raw {
        protocol: ipproto::UDP,
        payload: vec![0xab; 16],
    };
    let later = ipv6_with_extensions(
        ipa(A6),
        ipa(B6),
        &[(44, ipv6_frag_header(9, 2, false))],
        &later_payload,
    );
    let orphan = ipv6_with_extensions(
        ipa(A6),
        ipa(B6),
        &[(44, ipv6_frag_header(10, 2, false))],
        &later_payload,
    );
    assert_eq!(w.run(Ingress, &first), Pass);
    assert_eq!(w.run(Ingress, &later), Pass);
    assert_eq!(w.run(Ingress, &orphan), Drop);
    assert_eq!(w.drops(DropReason::FragmentNoRecord, Ingress), 1);
}

// ---- ICMP errors ----

#[test]
fn icmp_error_related_to_an_allowed_flow() {
    let mut w = World::new();
    w.isolate(ID_A, ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED);
    w.allow(
        ID_A,
        IDENTITY_ANY,
        Egress,
        PortMatch::Range {
            protocol: ipproto::UDP,
            port: 53,
            end_port: 53,
        },
    );
    let server = ipa("203.0.113.53");
    let router = ipa("198.51.100.1");
    let query = udp(ipa(A), 5353, server, 53);
    assert_eq!(w.run(Egress, &query), Pass);
    // Port unreachable from the server, and fragmentation needed from a router on the path.
    assert_eq!(
        w.run(Ingress, &icmp_error(server, ipa(A), (3, 3), &query)),
        Pass
    );
    assert_eq!(
        w.run(Ingress, &icmp_error(router, ipa(A), (3, 4), &query)),
        Pass
    );
    assert_eq!(w.counter(Counter::IcmpRelated), 2);
    // An error quoting a flow A never had.
    let other = udp(ipa(A), 5353, server, 54);
    assert_eq!(
        w.run(Ingress, &icmp_error(server, ipa(A), (3, 3), &other)),
        Drop
    );
    // IPv6: packet too big for a tracked TCP flow.
    let syn = tcp(ipa(A6), 40000, ipa("2001:db8::80"), 53, SYN);
    w.allow(ID_A, IDENTITY_ANY, Egress, tcp_port(53));
    assert_eq!(w.run(Egress, &syn), Pass);
    assert_eq!(
        w.run(
            Ingress,
            &icmp_error(ipa("2001:db8::1"), ipa(A6), (2, 0), &syn)
        ),
        Pass
    );
}

// ---- anti-spoofing and unknown endpoints ----

#[test]
fn spoofed_sources_are_dropped() {
    let mut w = World::new();
    // A is learned on this (the test run's) interface, B on another.
    let mut a = w.t.dp.maps.endpoint(ipa(A)).unwrap();
    a.ifindex = TEST_IFINDEX;
    w.t.dp.maps.set_endpoint(ipa(A), a).unwrap();
    let mut b = w.t.dp.maps.endpoint(ipa(B)).unwrap();
    b.ifindex = 4242;
    w.t.dp.maps.set_endpoint(ipa(B), b).unwrap();
    w.t.dp
        .maps
        .set_interface(
            TEST_IFINDEX,
            InterfaceInfo {
                flags: INTERFACE_POD,
                _pad: 0,
            },
        )
        .unwrap();
    let dst = ipa("203.0.113.1");
    assert_eq!(w.run(Egress, &udp(ipa(A), 1, dst, 53)), Pass, "own address");
    assert_eq!(
        w.run(Egress, &udp(ipa(B), 1, dst, 53)),
        Drop,
        "another local pod's address"
    );
    assert_eq!(
        w.run(Egress, &udp(ipa(REMOTE), 1, dst, 53)),
        Drop,
        "another node's pod"
    );
    assert_eq!(
        w.run(Egress, &udp(ipa("10.9.9.9"), 1, dst, 53)),
        Drop,
        "unknown, from a pod veth"
    );
    assert_eq!(w.drops(DropReason::SpoofedSource, Egress), 3);
}

#[test]
fn unknown_endpoints_follow_the_configured_default() {
    let w = World::new();
    let frame = tcp(ipa("10.9.9.1"), 1, ipa("10.9.9.2"), 80, SYN);
    assert_eq!(w.run(Egress, &frame), Drop);
    assert_eq!(w.run(Ingress, &frame), Drop);
    assert_eq!(w.drops(DropReason::UnknownEndpoint, Egress), 1);
    assert_eq!(w.drops(DropReason::UnknownEndpoint, Ingress), 1);
    let w = World::with_config(Config {
        flags: CONFIG_UNKNOWN_ALLOW,
        ..Config::default()
    });
    assert_eq!(w.run(Egress, &frame), Pass);
    assert_eq!(w.counter(Counter::UnknownEndpointPassed), 1);
}

#[test]
fn link_plumbing_passes() {
    let w = World::new();
    let arp = {
        let mut f = tcp(ipa(A), 1, ipa(B), 2, SYN);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f
    };
    assert_eq!(w.run(Egress, &arp), Pass, "ARP");
    // Neighbour solicitation from an unknown link-local address.
    let ns = ip_packet(
        ipa("fe80::1"),
        ipa("ff02::1:ff00:1"),
        58,
        &[135, 0, 0, 0, 0, 0, 0, 0],
    );
    assert_eq!(w.run(Egress, &ns), Pass, "NDP");
    assert_eq!(w.all_drops(), 0);
}

// ---- malformed packets ----

fn malformed(dir: Direction, frame: &[u8], reason: DropReason) {
    let w = World::new();
    let v =
        w.t.try_run(dir, frame)
            .unwrap_or_else(|e| panic!("{reason:?} {frame:02x?}: {e}"));
    assert_eq!(v, Drop, "{reason:?}");
    assert_eq!(w.drops(reason, dir), 1, "{reason:?} counted");
    assert_eq!(w.all_drops(), 1, "{reason:?} counted once");
}

#[test]
fn malformed_packets_are_dropped_with_their_reason() {
    let syn = tcp(ipa(A), 40000, ipa(B), 80, SYN);
    let syn6 = tcp(ipa(A6), 40000, ipa(B6), 80, SYN);

    let mut ihl4 = syn.clone();
    ihl4[ETH_HLEN] = 0x44;
    malformed(Egress, &ihl4, DropReason::MalformedIpv4);

    let mut long = syn.clone();
    long[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&1500u16.to_be_bytes());
    malformed(Egress, &long, DropReason::MalformedIpv4);

    let mut version = syn.clone();
    version[ETH_HLEN] = 0x65;
    malformed(Egress, &version, DropReason::MalformedIpv4);

    // TCP header cut short (IP total length fixed up to match).
    let mut short_tcp = syn[..ETH_HLEN + 20 + 12].to_vec();
    short_tcp[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&32u16.to_be_bytes());
    malformed(Ingress, &short_tcp, DropReason::MalformedL4);

    let mut doff = syn.clone();
    doff[ETH_HLEN + 20 + 12] = 0x40;
    malformed(Ingress, &doff, DropReason::MalformedL4);

    // Payload length beyond the frame.
    let mut long6 = syn6.clone();
    long6[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&1000u16.to_be_bytes());
    malformed(Egress, &long6, DropReason::MalformedIpv6);

    // Extension chains: a header claiming more bytes than the packet has, and one too long.
    let mut huge = ipv6_opts_header();
    huge[1] = 200;
    let l4 = L4::Tcp {
        sport: 1,
        dport: 80,
        flags: SYN,
    };
    malformed(
        Egress,
        &ipv6_with_extensions(ipa(A6), ipa(B6), &[(0, huge)], &l4),
        DropReason::Ipv6ExtensionChain,
    );
    let chain: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60, ipv6_opts_header())).collect();
    malformed(
        Egress,
        &ipv6_with_extensions(ipa(A6), ipa(B6), &chain, &l4),
        DropReason::Ipv6ExtensionChain,
    );

    malformed(Egress, &vlan_tagged(&syn), DropReason::VlanTagged);

    let mut ipx = syn.clone();
    ipx[12..14].copy_from_slice(&[0x81, 0x37]);
    malformed(Egress, &ipx, DropReason::UnsupportedL3);
}

#[test]
fn valid_extension_chain_is_walked() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.allow(ID_B, ID_A, Ingress, tcp_port(80));
    let l4 = L4::Tcp {
        sport: 1,
        dport: 80,
        flags: SYN,
    };
    let exts = vec![(0, ipv6_opts_header()), (60, ipv6_opts_header())];
    assert_eq!(
        w.run(Ingress, &ipv6_with_extensions(ipa(A6), ipa(B6), &exts, &l4)),
        Pass
    );
    let l4 = L4::Tcp {
        sport: 1,
        dport: 81,
        flags: SYN,
    };
    assert_eq!(
        w.run(Ingress, &ipv6_with_extensions(ipa(A6), ipa(B6), &exts, &l4)),
        Drop
    );
}

#[test]
fn eight_extension_headers_are_walked_nine_are_not() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.allow(ID_B, ID_A, Ingress, tcp_port(80));
    let l4 = L4::Tcp {
        sport: 1,
        dport: 80,
        flags: SYN,
    };
    let eight: Vec<(u8, Vec<u8>)> = (0..8).map(|_| (60, ipv6_opts_header())).collect();
    assert_eq!(
        w.run(
            Ingress,
            &ipv6_with_extensions(ipa(A6), ipa(B6), &eight, &l4)
        ),
        Pass
    );
    let nine: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60, ipv6_opts_header())).collect();
    assert_eq!(
        w.run(Ingress, &ipv6_with_extensions(ipa(A6), ipa(B6), &nine, &l4)),
        Drop
    );
    assert_eq!(w.drops(DropReason::Ipv6ExtensionChain, Ingress), 1);
}

#[test]
fn ipv6_fragments_with_headers_after_the_fragment_header() {
    let w = b_accepts_a_on_udp_53();
    let ok = L4::Udp {
        sport: 4000,
        dport: 53,
    };
    let exts = [(44, ipv6_frag_header(5, 0, true)), (60, ipv6_opts_header())];
    assert_eq!(
        w.run(Ingress, &ipv6_with_extensions(ipa(A6), ipa(B6), &exts, &ok)),
        Pass
    );
    // The later fragment names what follows its fragment header (destination options), as the
    // first did.
    let rest = L4::Raw {
        protocol: 60,
        payload: vec![0xab; 16],
    };
    let later = ipv6_with_extensions(
        ipa(A6),
        ipa(B6),
        &[(44, ipv6_frag_header(5, 3, false))],
        &rest,
    );
    assert_eq!(w.run(Ingress, &later), Pass);
    assert_eq!(w.counter(Counter::FragmentsPassed), 1);
}

#[test]
fn ipv6_fragment_header_past_the_payload_is_malformed() {
    let w = World::new();
    let rest = L4::Raw {
        protocol: ipproto::UDP,
        payload: vec![0xab; 16],
    };
    let mut later = ipv6_with_extensions(
        ipa(A6),
        ipa(B6),
        &[(44, ipv6_frag_header(5, 3, false))],
        &rest,
    );
    // Payload length 1: the fragment header lies in bytes after the payload.
    later[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&1u16.to_be_bytes());
    assert_eq!(w.run(Egress, &later), Drop);
    assert_eq!(w.drops(DropReason::Ipv6ExtensionChain, Egress), 1);
}

#[test]
fn ipv4_mapped_ipv6_addresses_are_malformed() {
    // They would alias the IPv4 endpoints (here: the node, which the host rule lets in).
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    let mapped_node = ipa("::ffff:10.0.0.254");
    assert_eq!(
        w.run(Ingress, &tcp(mapped_node, 40000, ipa(B6), 80, SYN)),
        Drop
    );
    assert_eq!(w.drops(DropReason::MalformedIpv6, Ingress), 1);
}

#[test]
fn neighbour_discovery_needs_hop_limit_255() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    let ns = ip_packet(ipa("fd00::9"), ipa(B6), 58, &[135, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(w.run(Ingress, &ns), Pass, "hop limit 255: link plumbing");
    let mut routed = ns.clone();
    routed[ETH_HLEN + 7] = 64;
    assert_eq!(
        w.run(Ingress, &routed),
        Drop,
        "hop limit 64: policed like any ICMPv6"
    );
    assert_eq!(w.drops(DropReason::PolicyDenied, Ingress), 1);
}

#[test]
fn frames_the_kernel_refuses() {
    // BPF_PROG_TEST_RUN itself rejects frames shorter than an Ethernet header, so a zero-length
    // or 13-byte frame never reaches the program.
    // It also refuses IPv4/IPv6 frames too short for the IP header, so those truncations are
    // covered by the header-length cases above (and the fuzz test) instead.
    let w = World::new();
    assert!(w.t.try_run(Egress, &[]).is_err());
    assert!(w.t.try_run(Egress, &[0u8; 13]).is_err());
    let syn = tcp(ipa(A), 40000, ipa(B), 80, SYN);
    assert!(w.t.try_run(Egress, &syn[..ETH_HLEN + 10]).is_err());
    let syn6 = tcp(ipa(A6), 40000, ipa(B6), 80, SYN);
    assert!(w.t.try_run(Egress, &syn6[..ETH_HLEN + 30]).is_err());
}

// ---- audit and events ----

#[test]
fn audit_mode_passes_and_counts() {
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED | ENDPOINT_AUDIT);
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Pass);
    assert_eq!(w.counter(Counter::AuditWouldBlock), 1);
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 80, BLOCKED_AUDIT), 1);
    assert_eq!(w.all_drops(), 0);
}

#[test]
fn denied_connections_emit_rate_limited_events() {
    let cfg = Config {
        events_per_sec: 1,
        events_burst: 3,
        ..Config::default()
    };
    let mut w = World::with_config(cfg);
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    for port in 0..10 {
        assert_eq!(
            w.run(Ingress, &tcp(ipa(A), 40000 + port, ipa(B), 80, SYN)),
            Drop
        );
    }
    let submitted = w.counter(Counter::EventsSubmitted);
    let limited = w.counter(Counter::EventsRateLimited);
    assert_eq!(submitted + limited + w.counter(Counter::EventsLost), 10);
    assert!(
        (3..=4).contains(&submitted),
        "burst of 3 (+1 refill at most): {submitted}"
    );
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 80, 0), 10);
}

// ---- denied connections, not denied packets ----

#[test]
fn retransmitted_denied_syn_counts_one_blocked_connection() {
    for (a, b) in [(A, B), (A6, B6)] {
        let mut w = World::with_config(events_config());
        w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
        let syn = tcp_seq(a, 40000, b, 81, SYN, 7777);
        for _ in 0..3 {
            assert_eq!(w.run(Ingress, &syn), Drop, "{a}");
        }
        assert_eq!(
            w.drops(DropReason::PolicyDenied, Ingress),
            3,
            "every packet dropped"
        );
        assert_eq!(w.blocked(Ingress, ipproto::TCP, 81, 0), 1, "one connection");
        assert_eq!(w.counter(Counter::EventsSubmitted), 1);
        let events = w.events();
        assert_eq!(events.len(), 1, "one deny event");
        let e = events[0];
        assert_eq!(
            (e.local, e.remote, e.local_port, e.remote_port),
            (ip_bytes(ip(b)), ip_bytes(ip(a)), 81, 40000)
        );
        assert_eq!(e.reason, DropReason::PolicyDenied as u8);
        assert_eq!(e.direction, Ingress as u8);
        let d = w
            .denied_entry(b, a, 81, 40000, ipproto::TCP)
            .expect("denied entry");
        assert_eq!((d.generation, d.tcp_seq, d.flags), (1, 7777, DENIED_SYN));
        assert!(d.last_ns > 0);
        assert_eq!(w.t.dp.maps.denied_entries().unwrap().len(), 1);
        assert_eq!(
            w.t.dp.maps.conntrack_len(),
            0,
            "denied flows are not tracked"
        );
    }
}

#[test]
fn syn_with_a_new_isn_on_the_same_tuple_is_a_new_denied_connection() {
    let mut w = World::with_config(events_config());
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    let first = tcp_seq(A, 40000, B, 81, SYN, 1000);
    let second = tcp_seq(A, 40000, B, 81, SYN, 900_000);
    assert_eq!(w.run(Ingress, &first), Drop);
    assert_eq!(w.run(Ingress, &first), Drop, "retransmission");
    assert_eq!(w.run(Ingress, &second), Drop, "new attempt, new ISN");
    assert_eq!(w.run(Ingress, &second), Drop, "its retransmission");
    // A segment without SYN on the tuple repeats the connection (and keeps the recorded ISN).
    assert_eq!(
        w.run(Ingress, &tcp_seq(A, 40000, B, 81, ACK, 900_001)),
        Drop
    );
    assert_eq!(w.run(Ingress, &second), Drop, "still a retransmission");
    assert_eq!(w.drops(DropReason::PolicyDenied, Ingress), 6);
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 81, 0), 2);
    assert_eq!(w.events().len(), 2);
    let d = w.denied_entry(B, A, 81, 40000, ipproto::TCP).unwrap();
    assert_eq!((d.tcp_seq, d.flags), (900_000, DENIED_SYN));
}

#[test]
fn a_denied_segment_without_syn_then_a_syn_are_two_denied_connections() {
    // The entry of a segment without SYN records no ISN: a SYN after it is a new attempt, even
    // with sequence number 0.
    let mut w = World::with_config(events_config());
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    assert_eq!(w.run(Ingress, &tcp_seq(A, 40000, B, 81, ACK, 0)), Drop);
    let d = w.denied_entry(B, A, 81, 40000, ipproto::TCP).unwrap();
    assert_eq!((d.tcp_seq, d.flags), (0, 0));
    assert_eq!(w.run(Ingress, &tcp_seq(A, 40000, B, 81, SYN, 0)), Drop);
    assert_eq!(w.run(Ingress, &tcp_seq(A, 40000, B, 81, SYN, 0)), Drop);
    // SYN-ACK is no connection opener: it repeats like any other segment.
    assert_eq!(w.run(Ingress, &tcp_seq(A, 40000, B, 81, SYN_ACK, 5)), Drop);
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 81, 0), 2);
    assert_eq!(w.events().len(), 2);
    assert_eq!(w.drops(DropReason::PolicyDenied, Ingress), 4);
}

#[test]
fn repeated_denied_datagrams_of_one_flow_count_once() {
    let mut w = World::with_config(events_config());
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    w.isolate(ID_A, ENDPOINT_EGRESS_ISOLATED);
    for _ in 0..5 {
        assert_eq!(w.run(Ingress, &udp(ipa(A), 5000, ipa(B), 54)), Drop);
        assert_eq!(w.run(Egress, &udp(ipa(A6), 5000, ipa(B6), 54)), Drop);
        assert_eq!(w.run(Egress, &echo(ipa(A), ipa(REMOTE), 9, false)), Drop);
    }
    assert_eq!(w.drops(DropReason::PolicyDenied, Ingress), 5);
    assert_eq!(w.drops(DropReason::PolicyDenied, Egress), 10);
    assert_eq!(w.blocked(Ingress, ipproto::UDP, 54, 0), 1);
    assert_eq!(w.blocked(Egress, ipproto::UDP, 54, 0), 1);
    assert_eq!(w.blocked(Egress, ipproto::ICMP, 0, 0), 1);
    assert_eq!(w.events().len(), 3);
    // Another source port is another flow; another echo identifier another "connection".
    assert_eq!(w.run(Ingress, &udp(ipa(A), 5001, ipa(B), 54)), Drop);
    assert_eq!(w.run(Egress, &echo(ipa(A), ipa(REMOTE), 10, false)), Drop);
    assert_eq!(w.blocked(Ingress, ipproto::UDP, 54, 0), 2);
    assert_eq!(w.blocked(Egress, ipproto::ICMP, 0, 0), 2);
    assert_eq!(w.events().len(), 2);
    let d = w.denied_entry(B, A, 54, 5000, ipproto::UDP).unwrap();
    assert_eq!((d.generation, d.tcp_seq, d.flags), (1, 0, 0));
}

#[test]
fn a_denied_flow_counts_again_after_a_generation_bump() {
    let mut w = World::with_config(events_config());
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    let syn = tcp(ipa(A), 40000, ipa(B), 81, SYN);
    let dns = udp(ipa(A), 5000, ipa(B), 54);
    assert_eq!(w.run(Ingress, &syn), Drop);
    assert_eq!(w.run(Ingress, &dns), Drop);
    let before = w.denied_entry(B, A, 81, 40000, ipproto::TCP).unwrap();
    assert_eq!(before.generation, 1);
    // B's policy changed (still denying): the next denial is judged under the new policy and
    // counted again, once.
    w.bump(ID_B);
    for _ in 0..2 {
        assert_eq!(w.run(Ingress, &syn), Drop);
        assert_eq!(w.run(Ingress, &dns), Drop);
    }
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 81, 0), 2);
    assert_eq!(w.blocked(Ingress, ipproto::UDP, 54, 0), 2);
    assert_eq!(w.events().len(), 4);
    assert_eq!(w.drops(DropReason::PolicyDenied, Ingress), 6);
    let after = w.denied_entry(B, A, 81, 40000, ipproto::TCP).unwrap();
    assert_eq!(after.generation, 2);
    assert!(after.last_ns >= before.last_ns);
    // Another endpoint's bump does not matter.
    w.bump(ID_A);
    assert_eq!(w.run(Ingress, &syn), Drop);
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 81, 0), 2);
}

#[test]
fn a_revoked_connection_counts_one_blocked_connection() {
    let mut w = World::with_config(events_config());
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED);
    w.allow(ID_B, ID_A, Ingress, tcp_port(80));
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Pass);
    assert_eq!(
        w.run(Egress, &tcp(ipa(B), 80, ipa(A), 40000, SYN_ACK)),
        Pass
    );
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)), Pass);
    w.t.dp
        .maps
        .revoke(ID_B, ID_A, Ingress, tcp_port(80))
        .unwrap();
    w.bump(ID_B);
    assert_eq!(
        w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)),
        Drop,
        "revoked"
    );
    // The client keeps sending, and the server too (its egress denies the untracked flow): one
    // connection, one event.
    for _ in 0..3 {
        assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, ACK)), Drop);
        assert_eq!(w.run(Egress, &tcp(ipa(B), 80, ipa(A), 40000, ACK)), Drop);
        assert_eq!(
            w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, FIN_ACK)),
            Drop
        );
    }
    assert_eq!(w.drops(DropReason::PolicyRevoked, Ingress), 1);
    assert_eq!(w.drops(DropReason::PolicyDenied, Ingress), 6);
    assert_eq!(w.drops(DropReason::PolicyDenied, Egress), 3);
    assert_eq!(
        w.blocked(Ingress, ipproto::TCP, 80, 0),
        1,
        "the revoked one"
    );
    assert_eq!(
        w.t.dp
            .maps
            .blocked()
            .unwrap()
            .iter()
            .map(|b| b.connections)
            .sum::<u64>(),
        1,
        "nothing else: {:?}",
        w.t.dp.maps.blocked().unwrap()
    );
    let events = w.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].reason, DropReason::PolicyRevoked as u8);
    assert_eq!(events[0].direction, Ingress as u8);
    let d = w.denied_entry(B, A, 80, 40000, ipproto::TCP).unwrap();
    assert_eq!((d.generation, d.flags), (2, DENIED_REVOKED));
    assert_eq!(w.t.dp.maps.conntrack_len(), 0);
    // A new connect on the same tuple (a SYN, which records its ISN) is a new denied connection.
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), 80, SYN)), Drop);
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 80, 0), 2);
}

#[test]
fn a_revoked_connection_opened_by_the_pod_counts_under_its_egress() {
    // A opened the flow under its egress policy; once revoked, the server's replies arrive as
    // untracked packets that A's ingress policy denies: they repeat the revoked connection.
    let mut w = World::with_config(events_config());
    w.isolate(ID_A, ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED);
    w.allow(ID_A, ID_REMOTE, Egress, tcp_port(443));
    assert_eq!(
        w.run(Egress, &tcp(ipa(A), 40000, ipa(REMOTE), 443, SYN)),
        Pass
    );
    assert_eq!(
        w.run(Ingress, &tcp(ipa(REMOTE), 443, ipa(A), 40000, SYN_ACK)),
        Pass
    );
    w.t.dp
        .maps
        .revoke(ID_A, ID_REMOTE, Egress, tcp_port(443))
        .unwrap();
    w.bump(ID_A);
    assert_eq!(
        w.run(Ingress, &tcp(ipa(REMOTE), 443, ipa(A), 40000, ACK)),
        Drop,
        "revoked, on the reply"
    );
    for _ in 0..3 {
        assert_eq!(
            w.run(Ingress, &tcp(ipa(REMOTE), 443, ipa(A), 40000, ACK)),
            Drop
        );
        assert_eq!(
            w.run(Egress, &tcp(ipa(A), 40000, ipa(REMOTE), 443, ACK)),
            Drop
        );
    }
    assert_eq!(w.drops(DropReason::PolicyRevoked, Ingress), 1);
    assert_eq!(
        w.blocked(Egress, ipproto::TCP, 443, 0),
        1,
        "the opener's port"
    );
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 40000, 0), 0);
    let events = w.events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].reason, events[0].direction),
        (DropReason::PolicyRevoked as u8, Egress as u8)
    );
}

#[test]
fn audit_mode_still_counts_every_new_flow() {
    // Audit passes and tracks the flow: its retransmissions are conntrack hits, not new flows.
    let mut w = World::with_config(events_config());
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED | ENDPOINT_AUDIT);
    let syn = tcp(ipa(A), 40000, ipa(B), 81, SYN);
    for _ in 0..3 {
        assert_eq!(w.run(Ingress, &syn), Pass);
    }
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 81, BLOCKED_AUDIT), 1);
    assert_eq!(w.counter(Counter::AuditWouldBlock), 1);
    assert_eq!(w.events().len(), 1);
    assert!(w.t.dp.maps.denied_entries().unwrap().is_empty());
}

#[test]
fn a_small_blocked_map_counts_further_ports_in_the_overflow_cell() {
    let t = TestDatapath::with_options(Config::default(), |o| o.blocked_capacity = 2);
    let mut w = World::with_datapath(t);
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    for port in [81, 82, 83, 84, 85] {
        for _ in 0..2 {
            assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), port, SYN)), Drop);
        }
    }
    // A second connection to a port that has its cell, and a UDP port (the map is full).
    assert_eq!(w.run(Ingress, &tcp(ipa(A), 40001, ipa(B), 81, SYN)), Drop);
    assert_eq!(w.run(Ingress, &udp(ipa(A), 5000, ipa(B), 54)), Drop);
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 81, 0), 2);
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 82, 0), 1);
    for port in [83, 84, 85] {
        assert_eq!(w.blocked(Ingress, ipproto::TCP, port, 0), 0, "port {port}");
    }
    assert_eq!(w.blocked(Ingress, ipproto::TCP, 0, BLOCKED_OVERFLOW), 3);
    assert_eq!(w.blocked(Ingress, ipproto::UDP, 0, BLOCKED_OVERFLOW), 1);
    assert_eq!(w.blocked(Ingress, ipproto::UDP, 54, 0), 0);
    assert_eq!(w.counter(Counter::BlockedOverflow), 4);
    assert_eq!(w.drops(DropReason::PolicyDenied, Ingress), 12);
    // The default size takes them all.
    let mut w = World::new();
    w.isolate(ID_B, ENDPOINT_INGRESS_ISOLATED);
    for port in 81..=85 {
        assert_eq!(w.run(Ingress, &tcp(ipa(A), 40000, ipa(B), port, SYN)), Drop);
        assert_eq!(w.blocked(Ingress, ipproto::TCP, port, 0), 1);
    }
    assert_eq!(w.counter(Counter::BlockedOverflow), 0);
}
