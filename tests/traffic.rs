//! Real packets between network namespaces: two pods on a bridge and two on /32 routes, the
//! datapath attached (tcx) to their host-side veths in the lab's node namespace, and the maps
//! written through the agent's typed API. Denied connections must time out (dropped, never
//! rejected), allowed ones must exchange data both ways, and the counters must match.
use std::{net::IpAddr, time::Duration};

use npc_agent::dataplane::{AttachMode, PortMatch};
use npc_common::{
    Direction::*, DropReason, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, ENDPOINT_LOCAL,
    EndpointInfo, INTERFACE_POD, InterfaceInfo, ProtoClass, ipproto,
};
use npc_tests::{
    datapath::TestDatapath,
    lab::{ConnectOutcome, Lab, Pod, in_netns},
};

const ALLOWED: Duration = Duration::from_secs(3);
/// How long a denied connect waits: SYNs are dropped, so it can only time out.
const DENIED: Duration = Duration::from_millis(700);

fn tcp_port(port: u16) -> PortMatch {
    PortMatch::Range {
        protocol: ipproto::TCP,
        port,
        end_port: port,
    }
}

fn program(t: &mut TestDatapath, pod: &Pod, identity: u32, flags: u32) {
    let info = EndpointInfo {
        identity,
        flags: ENDPOINT_LOCAL | flags,
        ifindex: pod.host_ifindex,
        generation: 1,
    };
    for ip in pod.ips() {
        t.dp.maps.set_endpoint(ip, info).unwrap();
    }
    t.dp.maps
        .set_interface(
            pod.host_ifindex,
            InterfaceInfo {
                flags: INTERFACE_POD,
                _pad: 0,
            },
        )
        .unwrap();
}

#[test]
fn bridge_and_routed_pods_tcx() {
    bridge_and_routed_pods(AttachMode::Tcx);
}

/// The fallback for kernels without tcx, forced here.
#[test]
fn bridge_and_routed_pods_clsact() {
    bridge_and_routed_pods(AttachMode::Clsact);
}

fn bridge_and_routed_pods(mode: AttachMode) {
    let lab = Lab::new("traffic").expect("lab");
    let br = lab
        .add_bridge("br0", "10.77.0.1/24", Some("fd77::1/64"))
        .unwrap();
    let a = lab
        .add_pod_on_bridge(
            &br,
            "a",
            "10.77.0.2".parse().unwrap(),
            Some("fd77::2".parse().unwrap()),
        )
        .unwrap();
    let b = lab
        .add_pod_on_bridge(
            &br,
            "b",
            "10.77.0.3".parse().unwrap(),
            Some("fd77::3".parse().unwrap()),
        )
        .unwrap();
    let c = lab
        .add_routed_pod(
            "c",
            "10.78.0.2".parse().unwrap(),
            Some("fd78::2".parse().unwrap()),
        )
        .unwrap();
    let d = lab
        .add_routed_pod(
            "d",
            "10.78.0.3".parse().unwrap(),
            Some("fd78::3".parse().unwrap()),
        )
        .unwrap();

    // Servers everywhere, before enforcement starts.
    let _servers: Vec<_> = [&a, &b, &c, &d]
        .iter()
        .flat_map(|p| {
            [
                p.serve_tcp(8080).unwrap(),
                p.serve_tcp(9090).unwrap(),
                p.serve_udp(5353).unwrap(),
            ]
        })
        .collect();

    let (id_a, id_b, id_c, id_d) = (256, 257, 258, 259);
    let mut t = TestDatapath::with_attach_mode(npc_common::Config::default(), Some(mode));
    program(&mut t, &a, id_a, 0);
    // b: accepts a on TCP 8080 and UDP 5353, nothing else.
    program(&mut t, &b, id_b, ENDPOINT_INGRESS_ISOLATED);
    t.dp.maps
        .allow(id_b, id_a, Ingress, tcp_port(8080), 1)
        .unwrap();
    let dns = PortMatch::Range {
        protocol: ipproto::UDP,
        port: 5353,
        end_port: 5353,
    };
    t.dp.maps.allow(id_b, id_a, Ingress, dns, 2).unwrap();
    // c: may only send to d:8080 and a:8080 (and what replies to that).
    program(&mut t, &c, id_c, ENDPOINT_EGRESS_ISOLATED);
    t.dp.maps
        .allow(id_c, id_d, Egress, tcp_port(8080), 3)
        .unwrap();
    t.dp.maps
        .allow(id_c, id_a, Egress, tcp_port(8080), 4)
        .unwrap();
    // d: accepts c on 8080 only.
    program(&mut t, &d, id_d, ENDPOINT_INGRESS_ISOLATED);
    t.dp.maps
        .allow(id_d, id_c, Ingress, tcp_port(8080), 5)
        .unwrap();

    in_netns(lab.node_netns(), || {
        for pod in [&a, &b, &c, &d] {
            assert_eq!(t.dp.attach(pod.host_ifindex).expect("attach"), mode);
        }
    });

    let v4 = |p: &Pod| IpAddr::V4(p.ipv4);
    let v6 = |p: &Pod| IpAddr::V6(p.ipv6.unwrap());
    let mut connected = 0;
    let mut denied = 0;
    let mut attempts_from_c = 0;
    let mut check = |from: &Pod, to: IpAddr, port: u16, allowed: bool| {
        let outcome = from.connect_tcp(to, port, if allowed { ALLOWED } else { DENIED });
        let expected = if allowed {
            ConnectOutcome::Connected
        } else {
            ConnectOutcome::TimedOut
        };
        assert_eq!(outcome, expected, "{} -> {to}:{port}", from.name);
        if allowed {
            connected += 1;
        } else {
            denied += 1;
        }
        if from.name == c.name {
            attempts_from_c += 1;
        }
    };
    // Bridge <-> bridge.
    check(&a, v4(&b), 8080, true);
    check(&a, v6(&b), 8080, true);
    check(&a, v4(&b), 9090, false);
    check(&b, v4(&a), 9090, true); // a is not isolated
    // Routed <-> routed.
    check(&c, v4(&d), 8080, true);
    check(&c, v6(&d), 8080, true);
    check(&c, v4(&d), 9090, false); // c's egress denies (and d's ingress would too)
    // Across bridge and routes.
    check(&c, v4(&a), 8080, true);
    check(&a, v4(&d), 8080, false); // d only accepts c
    check(&b, v4(&c), 9090, true); // c is not ingress-isolated; replies to c pass its egress

    // UDP: a's datagrams reach b and come back; c's and d's do not reach b.
    assert!(a.udp_roundtrip(v4(&b), 5353, ALLOWED), "a -> b udp");
    assert!(a.udp_roundtrip(v6(&b), 5353, ALLOWED), "a -> b udp v6");
    assert!(!d.udp_roundtrip(v4(&b), 5353, DENIED), "d -> b udp");

    let m = &t.dp.maps;
    // Every denied packet is one drop; every denied connect (its retransmitted SYNs, or resent
    // datagrams, included) one blocked connection, with the right labels.
    let policy_drops: u64 = [Ingress, Egress]
        .iter()
        .map(|dir| m.drop_total(DropReason::PolicyDenied, *dir).unwrap())
        .sum();
    let blocked: u64 = m.blocked().unwrap().iter().map(|b| b.connections).sum();
    let denied_udp = 1;
    assert!(
        policy_drops >= denied + denied_udp,
        "each denied attempt dropped at least once"
    );
    assert_eq!(
        blocked,
        denied + denied_udp,
        "one blocked connection per denied connect"
    );
    let blocked_at = |dir: npc_common::Direction, proto: u8, port: u16| {
        m.blocked()
            .unwrap()
            .iter()
            .filter(|b| {
                b.key.direction == dir as u8 && b.key.protocol == proto && b.key.dport == port
            })
            .map(|b| b.connections)
            .sum::<u64>()
    };
    assert!(
        blocked_at(Ingress, ipproto::TCP, 9090) >= 1,
        "a -> b:9090 blocked at b"
    );
    assert!(
        blocked_at(Egress, ipproto::TCP, 9090) >= 1,
        "c -> d:9090 blocked at c"
    );
    assert!(
        blocked_at(Ingress, ipproto::TCP, 8080) >= 1,
        "a -> d:8080 blocked at d"
    );
    assert!(
        blocked_at(Ingress, ipproto::UDP, 5353) >= 1,
        "d -> b udp blocked at b"
    );
    // Each TCP connection that got through is one new ingress flow at its server; each attempt
    // not from c (the only egress-isolated pod) is one new egress flow at its client.
    assert_eq!(m.allowed(Ingress, ProtoClass::Tcp).unwrap(), connected);
    let attempts = connected + denied;
    let egress_denied_at_c = 1;
    assert_eq!(
        m.allowed(Egress, ProtoClass::Tcp).unwrap(),
        attempts - egress_denied_at_c
    );
    assert!(attempts_from_c > 0);
    // Nothing else was dropped: no malformed packets, no spoofing. (The kernels' own link-local
    // multicast chatter, e.g. IGMP to 224.0.0.x, has no endpoint and is dropped as unknown.)
    for d in m.drops().unwrap() {
        let chatter = d.reason == DropReason::UnknownEndpoint && d.proto == ProtoClass::Other;
        assert!(
            d.reason == DropReason::PolicyDenied || chatter,
            "unexpected drop {d:?}"
        );
    }

    // Detach in the node namespace: clsact filters are removed through netlink by ifindex, which
    // would name another interface in this thread's namespace.
    in_netns(lab.node_netns(), || {
        for pod in [&a, &b, &c, &d] {
            t.dp.detach(pod.host_ifindex);
        }
    });
}
