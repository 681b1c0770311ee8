//! `npc-agent dump` end to end: a real datapath loaded and pinned under a bpffs directory of its
//! own (removed on drop, also when a test fails), entries written through the typed maps, the
//! names the agent would publish, and the binary run on them. Needs root (BPF).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use aya::maps::{HashMap, MapData, PerCpuValues};
use npc_agent::{
    dataplane::{PortMatch, monotonic_ns},
    dump::read::Pins,
    names::{EndpointName, IdentityName, Isolation, Names, RuleName},
};
use npc_common::{
    BLOCKED_OVERFLOW, BlockedKey, CT_REPLIED, CT_SYN_LOCAL, CT_SYN_REMOTE, Config, Counter,
    CtEntry, CtKey, DENIED_SYN, DeniedEntry, Direction, DropReason, ENDPOINT_INGRESS_ISOLATED,
    ENDPOINT_LOCAL, EndpointInfo, FragEntry, FragKey, IDENTITY_ANY, IDENTITY_FIRST_CIDR,
    IDENTITY_HOST, IDENTITY_WORLD, INTERFACE_POD, InterfaceInfo, NS_PER_SEC, ProtoClass, RULE_HOST,
    allowed_index, drop_index, ip_bytes, ipproto,
};
use npc_tests::datapath::TestDatapath;
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_npc-agent");

const WEB: u32 = 256;
const FRONTEND: u32 = 257;
const BLOCKS: u32 = IDENTITY_FIRST_CIDR;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A loaded datapath with entries in every map, and a state directory with its names.
struct Fixture {
    /// Removes the pins on drop.
    dp: TestDatapath,
    state: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let mut dp = TestDatapath::new(Config::default());
        let state = tempfile::tempdir().unwrap();
        fill(&mut dp);
        names().publish(state.path()).unwrap();
        Fixture { dp, state }
    }

    fn bpffs(&self) -> &Path {
        self.dp.dp.bpffs()
    }

    /// `npc-agent --bpffs B --state-dir S dump ARGS`.
    fn dump(&self, args: &[&str]) -> Output {
        dump_in(self.bpffs(), self.state.path(), args)
    }

    /// Like `dump`, asserting success; stdout.
    fn dump_ok(&self, args: &[&str]) -> String {
        let out = self.dump(args);
        assert!(out.status.success(), "dump {args:?} failed: {}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.dump_ok(&args)).expect("dump --json prints JSON")
    }
}

fn dump_in(bpffs: &Path, state: &Path, args: &[&str]) -> Output {
    Command::new(AGENT)
        .arg("--bpffs")
        .arg(bpffs)
        .arg("--state-dir")
        .arg(state)
        .arg("dump")
        .args(args)
        .env_remove("NPC_BPFFS")
        .env_remove("NPC_STATE_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("running npc-agent dump")
}

fn show(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn per_cpu(first: u64) -> PerCpuValues<u64> {
    let n = aya::util::nr_cpus().unwrap().get() as usize;
    let mut values = vec![0u64; n];
    values[0] = first;
    values.try_into().unwrap()
}

/// Pod web-1 (local, ingress isolated, on `lo`'s ifindex 1) serving on 8080 to frontend-1
/// (remote), the host, ipBlock 10.0.0.0/8 except 10.9.0.0/16, and flows, denials, counters.
fn fill(dp: &mut TestDatapath) {
    let maps = &mut dp.dp.maps;
    let local = ENDPOINT_LOCAL | ENDPOINT_INGRESS_ISOLATED;
    let ep = |identity, flags, ifindex, generation| EndpointInfo {
        identity,
        flags,
        ifindex,
        generation,
    };
    maps.set_endpoint(ip("10.0.0.1"), ep(WEB, local, 1, 3))
        .unwrap();
    maps.set_endpoint(ip("fd00::1"), ep(WEB, local, 1, 3))
        .unwrap();
    maps.set_endpoint(ip("10.0.0.2"), ep(FRONTEND, 0, 0, 0))
        .unwrap();
    maps.set_endpoint(ip("192.168.1.10"), ep(IDENTITY_HOST, 0, 0, 0))
        .unwrap();
    maps.set_interface(
        1,
        InterfaceInfo {
            flags: INTERFACE_POD,
            _pad: 0,
        },
    )
    .unwrap();
    maps.set_cidr(ip("10.0.0.0"), 8, BLOCKS).unwrap();
    maps.set_cidr(ip("10.9.0.0"), 16, IDENTITY_WORLD).unwrap();
    let tcp = |port, end_port| PortMatch::Range {
        protocol: ipproto::TCP,
        port,
        end_port,
    };
    maps.allow(WEB, FRONTEND, Direction::Ingress, tcp(8080, 8080), 1)
        .unwrap();
    // 8000-8063, 8064-8095, 8096-8099, 8100.
    maps.allow(WEB, FRONTEND, Direction::Ingress, tcp(8000, 8100), 2)
        .unwrap();
    maps.allow(WEB, BLOCKS, Direction::Egress, PortMatch::AnyProtocol, 3)
        .unwrap();
    maps.allow(
        WEB,
        IDENTITY_ANY,
        Direction::Egress,
        PortMatch::AnyPort {
            protocol: ipproto::UDP,
        },
        4,
    )
    .unwrap();
    maps.allow(
        WEB,
        IDENTITY_HOST,
        Direction::Ingress,
        PortMatch::AnyProtocol,
        RULE_HOST,
    )
    .unwrap();

    let now = monotonic_ns();
    let flow = |local, lport, remote, rport, protocol| {
        CtKey::new(
            ip_bytes(ip(local)),
            ip_bytes(ip(remote)),
            lport,
            rport,
            protocol,
        )
    };
    let entry = |age_s: u64, idle_s: u64, flags, opener: Direction, generation, rule| CtEntry {
        created_ns: now - age_s * NS_PER_SEC,
        last_seen_ns: now - idle_s * NS_PER_SEC,
        generation,
        rule,
        flags,
        opener: opener as u8,
        _pad0: 0,
        _pad1: 0,
    };
    let established = CT_SYN_LOCAL | CT_SYN_REMOTE | CT_REPLIED;
    maps.conntrack
        .insert(
            &flow("10.0.0.1", 8080, "10.0.0.2", 43210, ipproto::TCP),
            &entry(100, 20, established, Direction::Ingress, 2, 1),
            0,
        )
        .unwrap();
    maps.conntrack
        .insert(
            &flow("10.0.0.1", 40000, "10.1.2.3", 53, ipproto::UDP),
            &entry(5, 5, 0, Direction::Egress, 3, 3),
            0,
        )
        .unwrap();
    maps.conntrack
        .insert(
            &flow("10.0.0.1", 40001, "8.8.8.8", 53, ipproto::UDP),
            &entry(1, 1, 0, Direction::Egress, 3, 4),
            0,
        )
        .unwrap();
    maps.denied
        .insert(
            &flow("10.0.0.1", 22, "10.0.0.2", 5555, ipproto::TCP),
            &DeniedEntry {
                last_ns: now - 7 * NS_PER_SEC,
                generation: 3,
                tcp_seq: 12345,
                flags: DENIED_SYN,
                _pad0: 0,
            },
            0,
        )
        .unwrap();
    maps.fragments
        .insert(
            &FragKey::new(
                ip_bytes(ip("10.0.0.2")),
                ip_bytes(ip("10.0.0.1")),
                777,
                ipproto::UDP,
            ),
            &FragEntry {
                allowed: 0,
                reason: DropReason::PolicyDenied as u32,
            },
            0,
        )
        .unwrap();
    maps.drops
        .set(
            drop_index(
                DropReason::PolicyDenied,
                Direction::Ingress,
                ProtoClass::Tcp,
            ),
            per_cpu(5),
            0,
        )
        .unwrap();
    maps.counters
        .set(
            allowed_index(Direction::Ingress, ProtoClass::Tcp),
            per_cpu(9),
            0,
        )
        .unwrap();
    maps.counters
        .set(Counter::EventsLost as u32, per_cpu(1), 0)
        .unwrap();
    let blocked = |dport, direction: Direction, protocol, flags| BlockedKey {
        dport,
        direction: direction as u8,
        protocol,
        flags,
    };
    maps.blocked
        .insert(
            &blocked(22, Direction::Ingress, ipproto::TCP, 0),
            per_cpu(2),
            0,
        )
        .unwrap();
    // The overflow cell the agent created at load time.
    maps.blocked
        .insert(
            &blocked(0, Direction::Egress, ipproto::UDP, BLOCKED_OVERFLOW),
            per_cpu(3),
            0,
        )
        .unwrap();
}

fn names() -> Names {
    let pod = |name: &str, node: &str, local| EndpointName::Pod {
        namespace: "shop".into(),
        name: name.into(),
        node: Some(node.into()),
        local,
    };
    let identity = |app: &str, pod: &str| IdentityName {
        namespace: "shop".into(),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        pods: vec![pod.into()],
    };
    let rule = |policy: &str, direction: &str, index| RuleName {
        policy: policy.into(),
        direction: direction.into(),
        index,
    };
    Names {
        node: Some("n1".into()),
        endpoints: BTreeMap::from([
            (ip("10.0.0.1"), pod("web-1", "n1", true)),
            (ip("fd00::1"), pod("web-1", "n1", true)),
            (ip("10.0.0.2"), pod("frontend-1", "n2", false)),
            (ip("192.168.1.10"), EndpointName::Host),
        ]),
        identities: BTreeMap::from([
            (WEB, identity("web", "shop/web-1")),
            (FRONTEND, identity("frontend", "shop/frontend-1")),
        ]),
        cidr_identities: BTreeMap::from([(
            BLOCKS,
            vec!["10.0.0.0/8 except 10.9.0.0/16".to_string()],
        )]),
        cidrs: BTreeMap::from([
            ("10.0.0.0/8".parse().unwrap(), BLOCKS),
            ("10.9.0.0/16".parse().unwrap(), IDENTITY_WORLD),
        ]),
        rules: BTreeMap::from([
            (1, rule("shop/allow-frontend", "ingress", 0)),
            (2, rule("shop/allow-range", "ingress", 1)),
            (3, rule("shop/egress-blocks", "egress", 0)),
            (4, rule("shop/dns", "egress", 0)),
        ]),
        isolating: BTreeMap::from([(
            WEB,
            Isolation {
                ingress: vec!["shop/allow-frontend".into(), "shop/allow-range".into()],
                egress: vec![],
            },
        )]),
    }
}

/// The lines of `text` in section `name` (after its `== name:` heading, up to the next).
fn section<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let heading = format!("== {name}: ");
    text.lines()
        .skip_while(|l| !l.starts_with(&heading))
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// The row of `lines` containing every one of `words`.
fn row<'a>(lines: &[&'a str], words: &[&str]) -> &'a str {
    lines
        .iter()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no row with {words:?} in:\n{}", lines.join("\n")))
}

/// Entries of `section` in a JSON dump.
fn entries<'a>(json: &'a Value, section: &str) -> &'a Vec<Value> {
    json[section]["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no {section} entries in {json:#}"))
}

fn entry<'a>(json: &'a Value, section: &str, pred: impl Fn(&Value) -> bool) -> &'a Value {
    entries(json, section)
        .iter()
        .find(|e| pred(e))
        .unwrap_or_else(|| panic!("no such {section} entry in {:#}", json[section]))
}

#[test]
fn text_dump_names_every_map() {
    let f = Fixture::new();
    let out = f.dump(&[]);
    assert!(out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "no warnings expected: {stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    println!("{text}");

    for name in [
        "endpoints",
        "interfaces",
        "identities",
        "cidrs",
        "policy",
        "conntrack",
        "fragments",
        "denied",
        "drops",
        "counters",
        "blocked",
        "events",
        "event_rate",
        "config",
    ] {
        assert!(
            text.contains(&format!("\n== {name}: ")) || text.starts_with(&format!("== {name}: ")),
            "no {name} section"
        );
    }
    assert!(text.contains("== endpoints: 4 entries (capacity 262144) =="));

    let endpoints = section(&text, "endpoints");
    row(
        &endpoints,
        &[
            "10.0.0.1 ",
            "pod shop/web-1",
            "256 shop {app=web}",
            "local,ingress_isolated",
            "1 (lo)",
        ],
    );
    row(&endpoints, &["192.168.1.10", "host"]);
    let interfaces = section(&text, "interfaces");
    row(&interfaces, &["1", "lo", "pod", "shop/web-1"]);
    let identities = section(&text, "identities");
    row(
        &identities,
        &[
            "256",
            "shop",
            "app=web",
            "shop/web-1",
            "ingress: shop/allow-frontend,shop/allow-range",
        ],
    );
    let cidrs = section(&text, "cidrs");
    row(
        &cidrs,
        &["10.0.0.0/8", "16777216", "10.0.0.0/8 except 10.9.0.0/16"],
    );
    row(&cidrs, &["10.9.0.0/16", "world"]);

    let policy = section(&text, "policy");
    assert_eq!(
        policy.len(),
        1 + 8,
        "header and 8 LPM entries:\n{}",
        policy.join("\n")
    );
    let from_frontend = |ports: &str, rule: &str| {
        row(
            &policy,
            &[
                "256 shop {app=web}",
                "shop/web-1",
                "ingress",
                "257 shop {app=frontend}",
                "tcp",
                &format!(" {ports} "),
                rule,
            ],
        );
    };
    from_frontend("8080", "shop/allow-frontend ingress[0]");
    for ports in ["8000-8063", "8064-8095", "8096-8099", "8100"] {
        from_frontend(ports, "shop/allow-range ingress[1]");
    }
    row(
        &policy,
        &[
            "egress",
            "16777216 ipBlock 10.0.0.0/8 except 10.9.0.0/16",
            "any",
            "shop/egress-blocks egress[0]",
        ],
    );
    row(&policy, &["egress", "any", "udp", "shop/dns egress[0]"]);
    assert!(row(&policy, &["ingress", "  host  "]).ends_with("host"));

    let conntrack = section(&text, "conntrack");
    let est = row(
        &conntrack,
        &[
            "tcp",
            "10.0.0.1:8080",
            "shop/web-1",
            "10.0.0.2:43210",
            "pod shop/frontend-1",
            "established",
            "syn_local,syn_remote,replied",
            "ingress",
            "2 (now 3)",
            "shop/allow-frontend ingress[0]",
        ],
    );
    // Age 100 s, idle 20 s (the dump runs within seconds).
    let cells: Vec<&str> = est.split_whitespace().collect();
    let age: u64 = cells[cells.iter().position(|c| *c == "ingress").unwrap() + 1]
        .parse()
        .unwrap();
    assert!((100..110).contains(&age), "age {age} in {est}");
    row(
        &conntrack,
        &[
            "udp",
            "10.1.2.3:53",
            "ipBlock 10.0.0.0/8",
            "new",
            "egress",
            "shop/egress-blocks",
        ],
    );
    row(
        &conntrack,
        &["udp", "8.8.8.8:53", "world", "shop/dns egress[0]"],
    );

    row(
        &section(&text, "denied"),
        &[
            "tcp",
            "10.0.0.1:22",
            "shop/web-1",
            "pod shop/frontend-1",
            "syn",
            "12345",
        ],
    );
    row(
        &section(&text, "fragments"),
        &[
            "10.0.0.2",
            "10.0.0.1",
            "777",
            "udp",
            "dropped: policy_denied",
        ],
    );
    row(
        &section(&text, "drops"),
        &["policy_denied", "ingress", "tcp", "5"],
    );
    let counters = section(&text, "counters");
    row(&counters, &["allowed_connections", "ingress", "tcp", "9"]);
    row(&counters, &["events_lost", "1"]);
    let blocked = section(&text, "blocked");
    assert_eq!(
        blocked.len(),
        3,
        "header and the 2 nonzero cells: {blocked:?}"
    );
    row(&blocked, &["ingress", "tcp", "22", "2"]);
    row(&blocked, &["egress", "udp", "other", "overflow", "3"]);
    assert!(text.contains("== events: ring buffer of 262144 bytes"));
    row(&section(&text, "config"), &["host traffic", "allow"]);
    row(&section(&text, "config"), &["unknown endpoints", "deny"]);
}

#[test]
fn json_dump_has_numbers_and_names() {
    let f = Fixture::new();
    let json = f.json(&[]);
    println!("{json:#}");
    assert_eq!(json["meta"]["names"], true);
    assert_eq!(json["meta"]["node"], "n1");
    assert_eq!(json["meta"]["bpffs"], f.bpffs().display().to_string());

    assert_eq!(json["endpoints"]["count"], 4);
    assert_eq!(json["endpoints"]["max_entries"], 262144);
    let web = entry(&json, "endpoints", |e| e["ip"] == "10.0.0.1");
    assert_eq!(web["pod"], "shop/web-1");
    assert_eq!(web["identity"], WEB);
    assert_eq!(web["identity_name"], "shop {app=web}");
    assert_eq!(web["flags"], ENDPOINT_LOCAL | ENDPOINT_INGRESS_ISOLATED);
    assert_eq!(
        web["flag_names"],
        serde_json::json!(["local", "ingress_isolated"])
    );
    assert_eq!(web["ifindex"], 1);
    assert_eq!(web["interface"], "lo");
    assert_eq!(web["generation"], 3);
    let host = entry(&json, "endpoints", |e| e["ip"] == "192.168.1.10");
    assert_eq!(host["host"], true);
    assert_eq!(host["identity_name"], "host");

    let identity = entry(&json, "identities", |e| e["identity"] == WEB);
    assert_eq!(identity["labels"]["app"], "web");
    assert_eq!(identity["pods"], serde_json::json!(["shop/web-1"]));
    assert_eq!(
        identity["isolated_ingress_by"],
        serde_json::json!(["shop/allow-frontend", "shop/allow-range"])
    );

    let cidr = entry(&json, "cidrs", |e| e["prefix"] == "10.0.0.0/8");
    assert_eq!(cidr["identity"], BLOCKS);
    assert_eq!(
        cidr["blocks"],
        serde_json::json!(["10.0.0.0/8 except 10.9.0.0/16"])
    );

    assert_eq!(json["policy"]["count"], 8);
    let range = entry(&json, "policy", |e| e["port"] == 8064);
    assert_eq!(range["end_port"], 8095);
    assert_eq!(range["ports"], "8064-8095");
    assert_eq!(range["prefix_len"], 80 + 11);
    assert_eq!(range["protocol"], ipproto::TCP);
    assert_eq!(range["protocol_name"], "tcp");
    assert_eq!(range["direction"], "ingress");
    assert_eq!(range["local_identity"], WEB);
    assert_eq!(range["local_pods"], serde_json::json!(["shop/web-1"]));
    assert_eq!(range["remote_identity"], FRONTEND);
    assert_eq!(range["remote_kind"], "pod");
    assert_eq!(range["remote_name"], "shop {app=frontend}");
    assert_eq!(range["rule"], 2);
    assert_eq!(range["rule_name"], "shop/allow-range ingress[1]");
    let any = entry(&json, "policy", |e| e["remote_kind"] == "cidr");
    assert_eq!(any["prefix_len"], 72);
    assert_eq!(any["protocol"], Value::Null);
    assert_eq!(any["protocol_name"], "any");
    assert_eq!(any["port"], Value::Null);
    assert_eq!(any["ports"], "any");
    let host_rule = entry(&json, "policy", |e| e["rule"] == RULE_HOST);
    assert_eq!(host_rule["rule_name"], "host");
    assert_eq!(host_rule["remote_kind"], "host");

    assert_eq!(json["conntrack"]["count"], 3);
    let flow = entry(&json, "conntrack", |e| e["local_port"] == 8080);
    assert_eq!(flow["local_ip"], "10.0.0.1");
    assert_eq!(flow["remote_ip"], "10.0.0.2");
    assert_eq!(flow["remote_port"], 43210);
    assert_eq!(flow["protocol_name"], "tcp");
    assert_eq!(flow["local_pod"], "shop/web-1");
    assert_eq!(flow["local_identity"], WEB);
    assert_eq!(flow["remote_pod"], "shop/frontend-1");
    assert_eq!(flow["remote_identity"], FRONTEND);
    assert_eq!(flow["state"], "established");
    assert_eq!(
        flow["flag_names"],
        serde_json::json!(["syn_local", "syn_remote", "replied"])
    );
    assert_eq!(flow["opener"], "ingress");
    assert_eq!(flow["generation"], 2);
    assert_eq!(flow["endpoint_generation"], 3);
    assert_eq!(flow["rule_name"], "shop/allow-frontend ingress[0]");
    let age = flow["age_secs"].as_u64().unwrap();
    let idle = flow["idle_secs"].as_u64().unwrap();
    assert!(
        (100..110).contains(&age) && (20..30).contains(&idle),
        "{flow}"
    );
    let expires = flow["expires_in_secs"].as_u64().unwrap();
    assert!(
        expires > 6 * 3600 - 40 && expires <= 6 * 3600 - 20,
        "{flow}"
    );
    let to_blocks = entry(&json, "conntrack", |e| e["remote_ip"] == "10.1.2.3");
    assert_eq!(to_blocks["remote_identity"], BLOCKS);
    assert_eq!(to_blocks["remote_pod"], Value::Null);
    assert_eq!(
        to_blocks["remote_name"],
        "ipBlock 10.0.0.0/8 except 10.9.0.0/16"
    );
    let to_world = entry(&json, "conntrack", |e| e["remote_ip"] == "8.8.8.8");
    assert_eq!(to_world["remote_identity"], IDENTITY_WORLD);
    assert_eq!(to_world["remote_name"], "world");

    let denied = entry(&json, "denied", |e| e["local_port"] == 22);
    assert_eq!(denied["tcp_seq"], 12345);
    assert_eq!(denied["flags"], DENIED_SYN);
    assert_eq!(denied["flag_names"], serde_json::json!(["syn"]));
    assert_eq!(denied["remote_pod"], "shop/frontend-1");
    assert!((7..17).contains(&denied["last_secs_ago"].as_u64().unwrap()));

    let frag = entry(&json, "fragments", |e| e["id"] == 777);
    assert_eq!(frag["allowed"], false);
    assert_eq!(frag["reason"], "policy_denied");

    assert_eq!(
        entries(&json, "drops"),
        &vec![serde_json::json!({
            "reason": "policy_denied", "direction": "ingress", "protocol": "tcp", "packets": 5
        })]
    );
    let allowed = entry(&json, "counters", |e| {
        e["name"] == "allowed_connections" && e["direction"] == "ingress" && e["protocol"] == "tcp"
    });
    assert_eq!(allowed["value"], 9);
    let lost = entry(&json, "counters", |e| e["name"] == "events_lost");
    assert_eq!(lost["value"], 1);
    assert_eq!(lost["direction"], Value::Null);

    assert_eq!(json["blocked"]["count"], 2);
    let overflow = entry(&json, "blocked", |e| e["port"] == "other");
    assert_eq!(overflow["dport"], Value::Null);
    assert_eq!(overflow["direction"], "egress");
    assert_eq!(overflow["protocol_name"], "udp");
    assert_eq!(overflow["flag_names"], serde_json::json!(["overflow"]));
    assert_eq!(overflow["connections"], 3);
    let port = entry(&json, "blocked", |e| e["dport"] == 22);
    assert_eq!(port["connections"], 2);

    assert_eq!(json["events"]["max_entries"], 256 * 1024);
    assert_eq!(json["events"]["count"], 0);
    assert!(!entries(&json, "event_rate").is_empty());
    let config = &entries(&json, "config")[0];
    assert_eq!(config["host_traffic"], "allow");
    assert_eq!(config["unknown_endpoints"], "deny");
    assert_eq!(config["events_per_sec"], Config::default().events_per_sec);
    assert_eq!(config["flag_names"], serde_json::json!(["allow_host"]));
}

#[test]
fn one_map_prints_only_that_map() {
    let f = Fixture::new();
    let text = f.dump_ok(&["policy"]);
    let headings: Vec<&str> = text.lines().filter(|l| l.starts_with("== ")).collect();
    assert_eq!(headings, ["== policy: 8 entries (capacity 262144) =="]);
    assert!(!text.contains("10.0.0.1"), "no endpoints in:\n{text}");

    let json = f.json(&["conntrack"]);
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["conntrack", "meta"]);
    assert_eq!(json["conntrack"]["count"], 3);
    // Peers are still resolved from the endpoints and cidrs maps.
    entry(&json, "conntrack", |e| e["remote_identity"] == BLOCKS);

    let json = f.json(&["identities"]);
    assert_eq!(json["identities"]["count"], 2);
}

#[test]
fn bad_map_name_lists_the_valid_ones() {
    let f = Fixture::new();
    let out = f.dump(&["conntrak"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid value 'conntrak'"), "{stderr}");
    for name in npc_common::map_names::ALL
        .iter()
        .chain(&["all", "identities"])
    {
        assert!(stderr.contains(name), "{name} not listed: {stderr}");
    }
}

#[test]
fn no_pins_is_a_clear_error() {
    let state = tempfile::tempdir().unwrap();
    let missing = PathBuf::from(format!(
        "/sys/fs/bpf/npc-dumptest-none-{}",
        std::process::id()
    ));
    let out = dump_in(&missing, state.path(), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no maps pinned under {}", missing.display()))
            && stderr.contains("does not exist")
            && stderr.contains("--bpffs"),
        "{stderr}"
    );
    // A directory that is no bpffs (as under `ip netns exec`).
    let out = dump_in(state.path(), state.path(), &["policy"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no maps pinned under {}", state.path().display()))
            && stderr.contains("not on a bpffs"),
        "{stderr}"
    );
}

#[test]
fn missing_map_is_named() {
    let f = Fixture::new();
    // A pin directory of an agent without the `denied` map: `all` warns and goes on, `denied`
    // alone fails.
    std::fs::remove_file(f.bpffs().join("denied")).unwrap();
    let out = f.dump(&[]);
    assert!(out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let path = f.bpffs().join("denied").display().to_string();
    assert!(
        stderr.contains("map denied is not pinned") && stderr.contains(&path),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("== denied: unavailable =="));
    let json = f.json(&[]);
    assert!(json["denied"]["error"].as_str().unwrap().contains(&path));
    let out = f.dump(&["denied"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&path));
}

#[test]
fn without_names_numbers_only() {
    let f = Fixture::new();
    let empty = tempfile::tempdir().unwrap();
    let out = dump_in(f.bpffs(), empty.path(), &[]);
    assert!(out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("names unavailable")
            && stderr.contains(&empty.path().join("names.json").display().to_string()),
        "{stderr}"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("shop/"), "no names expected:\n{text}");
    row(&section(&text, "endpoints"), &["10.0.0.1 ", "256", "local"]);
    row(
        &section(&text, "policy"),
        &["256", "257", "8064-8095", "rule 2"],
    );
    // Reserved identities need no names.
    row(&section(&text, "conntrack"), &["8.8.8.8:53", "world"]);
    assert!(text.contains("== identities: unavailable =="));

    let out = dump_in(f.bpffs(), empty.path(), &["--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["meta"]["names"], false);
    assert!(
        json["meta"]["names_error"]
            .as_str()
            .unwrap()
            .contains("names.json")
    );
    let web = entry(&json, "endpoints", |e| e["ip"] == "10.0.0.1");
    assert_eq!(web["pod"], Value::Null);
    assert_eq!(web["identity"], WEB);

    // Identities come only from the names.
    let out = dump_in(f.bpffs(), empty.path(), &["identities"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("names unavailable"));
}

#[test]
fn dump_only_reads() {
    let f = Fixture::new();
    let maps = &f.dp.dp.maps;
    let before = (
        maps.endpoint_entries().unwrap(),
        maps.policy_entries().unwrap(),
        maps.conntrack_len(),
        maps.denied_entries().unwrap(),
        maps.blocked().unwrap(),
        maps.config().unwrap(),
    );
    f.dump_ok(&[]);
    f.dump_ok(&["--json"]);
    let after = (
        maps.endpoint_entries().unwrap(),
        maps.policy_entries().unwrap(),
        maps.conntrack_len(),
        maps.denied_entries().unwrap(),
        maps.blocked().unwrap(),
        maps.config().unwrap(),
    );
    assert_eq!(before, after);
    // The descriptors the dump uses refuse writes.
    let pins = Pins::new(f.bpffs()).unwrap();
    let mut endpoints: HashMap<MapData, [u8; 16], EndpointInfo> =
        pins.open("endpoints").unwrap().unwrap().typed().unwrap();
    let err = endpoints
        .insert(&ip_bytes(ip("10.0.0.9")), &EndpointInfo::default(), 0)
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("PermissionDenied") || format!("{err}").contains("ermission"),
        "{err:?}"
    );
    assert!(maps.endpoint(ip("10.0.0.9")).is_none());
}

#[test]
fn a_full_conntrack_table_is_listed_once() {
    let mut dp = TestDatapath::new(Config::default());
    let capacity = 16_384u32;
    for i in 0..capacity {
        let key = CtKey::new(
            ip_bytes(ip("10.0.0.1")),
            npc_common::ipv4_mapped([10, 1, (i >> 8) as u8, i as u8]),
            40_000,
            443,
            ipproto::TCP,
        );
        // An LRU map may evict a few entries before it is full.
        let _ = dp.dp.maps.conntrack.insert(&key, &CtEntry::default(), 0);
    }
    let stored = dp.dp.maps.conntrack_len();
    assert!(stored > capacity as usize * 9 / 10, "{stored} flows stored");
    let state = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = dump_in(dp.dp.bpffs(), state.path(), &["conntrack", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let flows = entries(&json, "conntrack");
    assert_eq!(flows.len(), stored);
    assert_eq!(json["conntrack"]["count"], stored);
    let distinct: std::collections::BTreeSet<&str> = flows
        .iter()
        .map(|f| f["remote_ip"].as_str().unwrap())
        .collect();
    assert_eq!(distinct.len(), stored, "every flow once");
    // Linear work: a full table of 262144 flows takes about 2 s.
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
