//! Decoding with synthetic values, the JSON model's field names, the tables' layout.
use std::collections::{BTreeMap, BTreeSet};

use npc_common::{
    BLOCKED_AUDIT, BLOCKED_OVERFLOW, CT_AUDIT, CT_FIN_LOCAL, CT_FIN_REMOTE, CT_REPLIED, CT_RST,
    CT_SYN_LOCAL, CT_SYN_REMOTE, CT_UNISOLATED, IDENTITY_FIRST_CIDR, IDENTITY_WORLD, NS_PER_SEC,
    POLICY_PREFIX_ANY_PORT, RULE_HOST, for_each_port_prefix, ip_bytes, ipproto, ipv4_mapped,
};
use serde_json::{Value, json};

use super::{
    decode::{CidrIndex, Context, PolicyPorts, blocked_port, ct_state, flag_names},
    *,
};
use crate::{
    dataplane::PortMatch,
    names::{EndpointName, IdentityName, RuleName},
};

fn policy_key(port: u16) -> PolicyKey {
    PolicyKey::new(256, 257, Direction::Ingress, ipproto::TCP, port)
}

#[test]
fn policy_prefix_lengths_decode_to_port_ranges() {
    let decode = |len, port| PolicyPorts::of(len, &policy_key(port));
    let range = |start, end| PolicyPorts::Range {
        protocol: ipproto::TCP,
        start,
        end,
    };
    assert_eq!(decode(72, 0), PolicyPorts::AnyProtocol);
    assert_eq!(
        decode(80, 0),
        PolicyPorts::AnyPort {
            protocol: ipproto::TCP
        }
    );
    assert_eq!(decode(96, 8080), range(8080, 8080));
    assert_eq!(decode(90, 8000), range(8000, 8063));
    // Bits below the prefix do not count.
    assert_eq!(decode(90, 8001), range(8000, 8063));
    assert_eq!(decode(81, 32768), range(32768, 65535));
    assert_eq!(decode(81, 0), range(0, 32767));
    for bad in [0, 71, 73, 79, 97, 128] {
        assert_eq!(decode(bad, 80), PolicyPorts::Invalid, "prefix {bad}");
    }
    assert_eq!(PolicyPorts::AnyProtocol.ports(), "any");
    assert_eq!(PolicyPorts::AnyProtocol.protocol(), None);
    assert_eq!(range(80, 80).ports(), "80");
    assert_eq!(range(8000, 8063).ports(), "8000-8063");
    assert_eq!(range(8000, 8063).protocol(), Some(ipproto::TCP));
}

#[test]
fn port_blocks_decode_back_to_the_range_they_were_made_from() {
    for (start, end) in [
        (0, 0),
        (1, 1),
        (80, 80),
        (8000, 8100),
        (1, 65535),
        (0, 65534),
        (1024, 2047),
        (30000, 32767),
        (65535, 65535),
    ] {
        let mut covered = Vec::new();
        for_each_port_prefix(start, end, |port, bits| {
            match PolicyPorts::of(POLICY_PREFIX_ANY_PORT + bits, &policy_key(port)) {
                PolicyPorts::Range { start, end, .. } => covered.push((start, end)),
                other => panic!("{start}-{end}: block {port}/{bits} decoded as {other:?}"),
            }
        });
        // Adjacent blocks, from start to end.
        assert_eq!(covered.first().unwrap().0, start);
        assert_eq!(covered.last().unwrap().1, end);
        for pair in covered.windows(2) {
            assert_eq!(
                u32::from(pair[0].1) + 1,
                u32::from(pair[1].0),
                "{covered:?}"
            );
        }
    }
    // Every port: one key of prefix ANY_PORT, which is "any port".
    for_each_port_prefix(0, 65535, |port, bits| {
        assert_eq!(
            PolicyPorts::of(POLICY_PREFIX_ANY_PORT + bits, &policy_key(port)),
            PolicyPorts::AnyPort {
                protocol: ipproto::TCP
            }
        );
    });
    // The keys the agent writes, as the dump shows them.
    let keys = PortMatch::Range {
        protocol: ipproto::TCP,
        port: 8000,
        end_port: 8100,
    }
    .keys(256, 257, Direction::Ingress);
    let shown: Vec<String> = keys
        .iter()
        .map(|k| PolicyPorts::of(k.prefix_len(), &k.data()).ports())
        .collect();
    assert_eq!(shown, ["8000-8063", "8064-8095", "8096-8099", "8100"]);
}

#[test]
fn conntrack_flags_and_states() {
    let all = CT_SYN_LOCAL
        | CT_SYN_REMOTE
        | CT_FIN_LOCAL
        | CT_FIN_REMOTE
        | CT_RST
        | CT_REPLIED
        | CT_UNISOLATED
        | CT_AUDIT;
    assert_eq!(
        flag_names(u32::from(all), decode::CT_FLAGS),
        [
            "syn_local",
            "syn_remote",
            "fin_local",
            "fin_remote",
            "rst",
            "replied",
            "unisolated",
            "audit"
        ]
    );
    assert_eq!(
        flag_names(
            u32::from(CT_SYN_LOCAL | CT_REPLIED) | 0x300,
            decode::CT_FLAGS
        ),
        ["syn_local", "replied", "0x300"]
    );
    assert!(flag_names(0, decode::CT_FLAGS).is_empty());

    let entry = |flags| CtEntry {
        flags,
        ..CtEntry::default()
    };
    let tcp = |flags| ct_state(ipproto::TCP, &entry(flags));
    assert_eq!(tcp(CT_SYN_LOCAL), "opening");
    assert_eq!(
        tcp(CT_SYN_LOCAL | CT_SYN_REMOTE | CT_REPLIED),
        "established"
    );
    assert_eq!(tcp(CT_REPLIED | CT_FIN_LOCAL), "established");
    assert_eq!(tcp(CT_REPLIED | CT_FIN_LOCAL | CT_FIN_REMOTE), "closing");
    assert_eq!(tcp(CT_RST), "closing");
    assert_eq!(ct_state(ipproto::UDP, &entry(0)), "new");
    assert_eq!(ct_state(ipproto::UDP, &entry(CT_REPLIED)), "replied");
}

#[test]
fn a_flow_is_decoded_with_times_and_generations() {
    let mut ctx = Context {
        now_ns: 1_000 * NS_PER_SEC,
        ..Context::default()
    };
    let local = "10.0.0.1".parse().unwrap();
    ctx.endpoints.insert(
        local,
        EndpointInfo {
            identity: 256,
            generation: 4,
            ..EndpointInfo::default()
        },
    );
    let key = CtKey::new(
        ip_bytes(local),
        ipv4_mapped([8, 8, 8, 8]),
        40000,
        53,
        ipproto::UDP,
    );
    let entry = CtEntry {
        created_ns: 900 * NS_PER_SEC,
        last_seen_ns: 990 * NS_PER_SEC + 1,
        generation: 3,
        rule: RULE_HOST,
        flags: CT_REPLIED,
        opener: Direction::Egress as u8,
        ..CtEntry::default()
    };
    let flow = ctx.flow(&(key, entry));
    assert_eq!(flow.age_secs, 100);
    assert_eq!(flow.idle_secs, 9);
    assert_eq!(flow.expires_in_secs, 50);
    assert_eq!(flow.opener, "egress");
    assert_eq!(flow.state, "replied");
    assert_eq!((flow.generation, flow.endpoint_generation), (3, Some(4)));
    assert_eq!(flow.local_identity, Some(256));
    assert_eq!(flow.remote_identity, IDENTITY_WORLD);
    assert_eq!(flow.remote_name.as_deref(), Some("world"));
    assert_eq!(flow.rule_name.as_deref(), Some("host"));
    assert_eq!(flow.local_pod, None, "no names");
    // An entry stamped after the clock was read is 0 s old, not 584 years.
    let future = CtEntry {
        created_ns: 1_001 * NS_PER_SEC,
        last_seen_ns: 1_001 * NS_PER_SEC,
        ..entry
    };
    let flow = ctx.flow(&(key, future));
    assert_eq!((flow.age_secs, flow.idle_secs), (0, 0));
}

#[test]
fn blocked_overflow_cells_are_named_other() {
    let key = |dport, protocol, flags| BlockedKey {
        dport,
        direction: Direction::Egress as u8,
        protocol,
        flags,
    };
    assert_eq!(
        blocked_port(&key(0, ipproto::TCP, BLOCKED_OVERFLOW)),
        (None, "other".to_string())
    );
    assert_eq!(
        blocked_port(&key(443, ipproto::TCP, 0)),
        (Some(443), "443".to_string())
    );
    assert_eq!(
        blocked_port(&key(0, ipproto::ICMP, 0)),
        (None, "-".to_string())
    );
    let ctx = Context::default();
    let b = ctx.blocked(&(key(0, 0, BLOCKED_OVERFLOW | BLOCKED_AUDIT), 7));
    assert_eq!(b.port, "other");
    assert_eq!(
        b.protocol_name, "other",
        "protocols without a class of their own"
    );
    assert_eq!(b.flag_names, ["overflow", "audit"]);
    assert_eq!((b.direction.as_str(), b.connections), ("egress", 7));
    let b = ctx.blocked(&(key(0, ipproto::UDP, BLOCKED_OVERFLOW), 1));
    assert_eq!(
        (b.protocol_name.as_str(), b.port.as_str()),
        ("udp", "other")
    );
    let b = ctx.blocked(&(key(8080, ipproto::SCTP, 0), 1));
    assert_eq!((b.protocol_name.as_str(), b.dport), ("sctp", Some(8080)));
    assert!(b.flag_names.is_empty());
}

#[test]
fn cidr_prefixes_and_longest_prefix_lookup() {
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    assert_eq!(
        decode::cidr_prefix(96 + 8, ipv4_mapped([10, 0, 0, 0])),
        Some(net("10.0.0.0/8"))
    );
    assert_eq!(
        decode::cidr_prefix(64, "fd00::".parse::<std::net::Ipv6Addr>().unwrap().octets()),
        Some(net("fd00::/64"))
    );
    assert_eq!(decode::cidr_prefix(0, [0; 16]), Some(net("::/0")));
    assert_eq!(decode::cidr_prefix(129, [0; 16]), None);

    let cidr = IDENTITY_FIRST_CIDR;
    let index = CidrIndex::new([
        (net("10.0.0.0/8"), cidr),
        (net("10.9.0.0/16"), IDENTITY_WORLD),
        (net("10.9.1.0/24"), cidr + 1),
        (net("0.0.0.0/0"), cidr + 2),
        (net("fd00::/8"), cidr + 3),
    ]);
    let lookup = |s: &str| index.lookup(s.parse().unwrap());
    assert_eq!(lookup("10.1.2.3"), Some(cidr));
    assert_eq!(lookup("10.9.2.3"), Some(IDENTITY_WORLD));
    assert_eq!(lookup("10.9.1.3"), Some(cidr + 1));
    assert_eq!(lookup("192.168.0.1"), Some(cidr + 2));
    assert_eq!(lookup("::ffff:10.1.2.3"), Some(cidr), "IPv4-mapped is IPv4");
    assert_eq!(lookup("fd12::1"), Some(cidr + 3));
    assert_eq!(lookup("2001:db8::1"), None);
}

#[test]
fn identities_and_rules_are_named_with_and_without_names() {
    let mut ctx = Context::default();
    assert_eq!(ctx.identity_name(1).as_deref(), Some("any"));
    assert_eq!(ctx.identity_name(2).as_deref(), Some("world"));
    assert_eq!(ctx.identity_name(3).as_deref(), Some("host"));
    assert_eq!(ctx.identity_name(256), None);
    assert_eq!(ctx.rule_name(RULE_HOST).as_deref(), Some("host"));
    assert_eq!(ctx.rule_name(7), None);
    let mut names = Names::default();
    names.identities.insert(
        256,
        IdentityName {
            namespace: "shop".into(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            pods: vec!["shop/web-1".into()],
        },
    );
    names
        .cidr_identities
        .insert(IDENTITY_FIRST_CIDR, vec!["10.0.0.0/8".into()]);
    names.rules.insert(
        7,
        RuleName {
            policy: "shop/allow".into(),
            direction: "ingress".into(),
            index: 2,
        },
    );
    names.endpoints.insert(
        "10.0.0.1".parse().unwrap(),
        EndpointName::Pod {
            namespace: "shop".into(),
            name: "web-1".into(),
            node: None,
            local: true,
        },
    );
    ctx.names = Some(names);
    assert_eq!(ctx.identity_name(256).as_deref(), Some("shop {app=web}"));
    assert_eq!(
        ctx.identity_name(IDENTITY_FIRST_CIDR).as_deref(),
        Some("ipBlock 10.0.0.0/8")
    );
    assert_eq!(ctx.identity_name(999), None, "unknown to the names");
    assert_eq!(ctx.rule_name(7).as_deref(), Some("shop/allow ingress[2]"));
    assert_eq!(
        ctx.pod_of("10.0.0.1".parse().unwrap()).as_deref(),
        Some("shop/web-1")
    );
    assert_eq!(
        ctx.pod_of("::ffff:10.0.0.1".parse().unwrap()).as_deref(),
        Some("shop/web-1")
    );
}

#[test]
fn map_names_select_sections() {
    let maps: BTreeSet<&str> = Section::ALL.iter().filter_map(|s| s.map_name()).collect();
    assert_eq!(maps, BTreeSet::from(map_names::ALL), "a section per map");
    for name in map_names::ALL {
        let Some(Selection::One(section)) = Selection::from_name(name) else {
            panic!("{name} not selectable");
        };
        assert_eq!(section.name(), name);
    }
    assert_eq!(Selection::from_name("all"), Some(Selection::All));
    assert_eq!(
        Selection::from_name("identities"),
        Some(Selection::One(Section::Identities))
    );
    assert_eq!(Selection::from_name("conntrak"), None);
    assert_eq!(Selection::All.sections(), Section::ALL);
    let names: Vec<&str> = Selection::names().collect();
    assert_eq!(names.len(), 1 + Section::ALL.len());
    assert_eq!(names[0], "all");
}

fn keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

fn sorted(mut v: Vec<&str>) -> Vec<&str> {
    v.sort_unstable();
    v
}

/// A dump of a few synthetic entries, without reading any map.
fn synthetic() -> Dump {
    let ctx = Context {
        now_ns: 50 * NS_PER_SEC,
        ..Context::default()
    };
    let policy = vec![
        (
            96,
            PolicyKey::new(256, 257, Direction::Ingress, ipproto::TCP, 8080),
            PolicyEntry { rule: 7, flags: 0 },
        ),
        (
            72,
            PolicyKey::new(256, 1, Direction::Egress, 0, 0),
            PolicyEntry {
                rule: RULE_HOST,
                flags: 0,
            },
        ),
    ];
    let flow = (
        CtKey::new(
            ipv4_mapped([10, 0, 0, 1]),
            ipv4_mapped([10, 0, 0, 2]),
            8080,
            43210,
            ipproto::TCP,
        ),
        CtEntry {
            created_ns: 20 * NS_PER_SEC,
            last_seen_ns: 45 * NS_PER_SEC,
            flags: CT_SYN_LOCAL | CT_SYN_REMOTE | CT_REPLIED,
            rule: 7,
            ..CtEntry::default()
        },
    );
    Dump {
        meta: Meta {
            bpffs: "/sys/fs/bpf/npc".into(),
            state_dir: "/run/npc".into(),
            names: false,
            names_error: Some("no names".into()),
            node: None,
            monotonic_ns: ctx.now_ns,
        },
        sections: vec![
            (
                Section::Policy,
                Ok(Data::Policy(Listing {
                    max_entries: Some(1024),
                    raw: policy,
                })),
            ),
            (
                Section::Conntrack,
                Ok(Data::Conntrack(Listing {
                    max_entries: Some(4096),
                    raw: vec![flow],
                })),
            ),
            (Section::Denied, Err("map denied is not pinned".into())),
        ],
        ctx,
    }
}

#[test]
fn json_field_names_are_stable() {
    let json = serde_json::to_value(synthetic()).unwrap();
    assert_eq!(keys(&json), ["conntrack", "denied", "meta", "policy"]);
    assert_eq!(
        keys(&json["meta"]),
        sorted(vec![
            "bpffs",
            "state_dir",
            "names",
            "names_error",
            "node",
            "monotonic_ns"
        ])
    );
    assert_eq!(json["denied"], json!({"error": "map denied is not pinned"}));
    assert_eq!(keys(&json["policy"]), ["count", "entries", "max_entries"]);
    assert_eq!(json["policy"]["count"], 2);
    assert_eq!(json["policy"]["max_entries"], 1024);
    let rule = &json["policy"]["entries"][0];
    assert_eq!(
        keys(rule),
        sorted(vec![
            "prefix_len",
            "local_identity",
            "local_name",
            "local_pods",
            "direction",
            "remote_identity",
            "remote_kind",
            "remote_name",
            "protocol",
            "protocol_name",
            "port",
            "end_port",
            "ports",
            "rule",
            "rule_name",
            "flags",
        ])
    );
    assert_eq!(rule["ports"], "8080");
    assert_eq!(
        (rule["port"].clone(), rule["end_port"].clone()),
        (json!(8080), json!(8080))
    );
    let any = &json["policy"]["entries"][1];
    assert_eq!(any["protocol"], Value::Null);
    assert_eq!(any["remote_kind"], "any");
    assert_eq!(any["rule_name"], "host");
    let flow = &json["conntrack"]["entries"][0];
    assert_eq!(
        keys(flow),
        sorted(vec![
            "local_ip",
            "local_port",
            "remote_ip",
            "remote_port",
            "protocol",
            "protocol_name",
            "local_pod",
            "local_identity",
            "remote_pod",
            "remote_identity",
            "remote_name",
            "state",
            "flags",
            "flag_names",
            "opener",
            "created_ns",
            "last_seen_ns",
            "age_secs",
            "idle_secs",
            "expires_in_secs",
            "generation",
            "endpoint_generation",
            "rule",
            "rule_name",
        ])
    );
    assert_eq!(flow["local_ip"], "10.0.0.1", "IPv4-mapped shown as IPv4");
    assert_eq!(flow["age_secs"], 30);
    assert_eq!(flow["idle_secs"], 5);

    // The other entry types.
    let ctx = Context::default();
    let value = |v: &dyn erased::Json| v.json();
    let endpoint = value(&ctx.endpoint(&("fd00::1".parse().unwrap(), EndpointInfo::default())));
    assert_eq!(
        keys(&endpoint),
        sorted(vec![
            "ip",
            "pod",
            "host",
            "identity",
            "identity_name",
            "flags",
            "flag_names",
            "ifindex",
            "interface",
            "generation",
        ])
    );
    let blocked = value(&ctx.blocked(&(BlockedKey::default(), 1)));
    assert_eq!(
        keys(&blocked),
        sorted(vec![
            "direction",
            "protocol",
            "protocol_name",
            "dport",
            "port",
            "flags",
            "flag_names",
            "connections",
        ])
    );
    let denied = value(&ctx.denied(&(CtKey::default(), DeniedEntry::default())));
    assert_eq!(
        keys(&denied),
        sorted(vec![
            "local_ip",
            "local_port",
            "remote_ip",
            "remote_port",
            "protocol",
            "protocol_name",
            "local_pod",
            "remote_pod",
            "remote_identity",
            "remote_name",
            "flags",
            "flag_names",
            "tcp_seq",
            "generation",
            "last_ns",
            "last_secs_ago",
        ])
    );
    let config = value(&ctx.config(&Config::default()));
    assert_eq!(
        keys(&config),
        sorted(vec![
            "flags",
            "flag_names",
            "audit",
            "unknown_endpoints",
            "host_traffic",
            "grandfather",
            "events_per_sec",
            "events_burst",
        ])
    );
    let counter = value(&ctx.counter(&(CounterCell::Named(Counter::EventsLost), 3)));
    assert_eq!(
        counter,
        json!({"name": "events_lost", "direction": null, "protocol": null, "value": 3})
    );
}

/// `serde_json::to_value` behind a trait object, to list many model types in one table.
mod erased {
    pub trait Json {
        fn json(&self) -> serde_json::Value;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

#[test]
fn tables_are_aligned() {
    let mut out = Vec::new();
    synthetic().write_text(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let expected = "\
== policy: 2 entries (capacity 1024) ==
LOCAL  LOCAL PODS  DIRECTION  REMOTE  PROTOCOL  PORTS  RULE
256    -           ingress    257     tcp       8080   rule 7
256    -           egress     any     any       any    host

== conntrack: 1 flow (capacity 4096) ==
PROTO  LOCAL          POD  REMOTE          PEER   STATE        FLAGS                         OPENER   AGE(s)  IDLE(s)  EXPIRES(s)  GEN  RULE
tcp    10.0.0.1:8080  -    10.0.0.2:43210  world  established  syn_local,syn_remote,replied  ingress  30      5        21595       0    rule 7

== denied: unavailable ==
map denied is not pinned
";
    assert_eq!(text, expected, "got:\n{text}");
}
