//! Compiler tests as reachability assertions: `allowed` simulates the datapath's decision from
//! `Desired` alone (the client's egress check where the client is local, the server's ingress
//! check where the server is local, LPM over `cidrs` in the datapath's 16-byte form, port
//! matching), so every test reads like the upstream e2e suite.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use npc_common::{
    Direction, ENDPOINT_AUDIT, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, ENDPOINT_LOCAL,
    IDENTITY_ANY, IDENTITY_FIRST_CIDR, IDENTITY_FIRST_POD, IDENTITY_HOST, IDENTITY_WORLD, ip_bytes,
    ipproto,
};

use super::{Desired, DesiredEndpoint, Identities, IdentityKey, RuleRef, compile};
use crate::{
    dataplane::PortMatch,
    model::{
        ClusterState, LabelSelector, Labels, NAMESPACE_NAME_LABEL, NamedPort, Namespace,
        NetworkPolicy, ObjectRef, Operator, Peer, Pod, PolicyPort, PortRef, Protocol, Requirement,
        Rule,
    },
};

const TCP: u8 = ipproto::TCP;
const UDP: u8 = ipproto::UDP;
const SCTP: u8 = ipproto::SCTP;
const ICMP: u8 = ipproto::ICMP;
const NODE: &str = "n1";
const NODE_IP: &str = "192.168.0.1";

// ---------------------------------------------------------------------------------------------
// Building states from compact descriptions.

/// `"a=b,c=d"` (empty string: no labels).
fn labels(s: &str) -> Labels {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (k, v) = t.split_once('=').expect("label k=v");
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// A selector in kubectl syntax: `k=v`, `k in (v1,v2)`, `k notin (v1,v2)`, `k` (exists), `!k`
/// (does not exist), comma-separated (ANDed). The empty string is the empty selector.
fn sel(s: &str) -> LabelSelector {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in s.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    let mut out = LabelSelector::default();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = |key: &str, operator, values: Vec<String>| Requirement {
            key: key.trim().to_string(),
            operator,
            values,
        };
        let values = |list: &str| -> Vec<String> {
            let list = list.trim().trim_start_matches('(').trim_end_matches(')');
            list.split(',').map(|v| v.trim().to_string()).collect()
        };
        if let Some(key) = term.strip_prefix('!') {
            out.match_expressions
                .push(requirement(key, Operator::DoesNotExist, vec![]));
        } else if let Some((key, list)) = term.split_once(" notin ") {
            out.match_expressions
                .push(requirement(key, Operator::NotIn, values(list)));
        } else if let Some((key, list)) = term.split_once(" in ") {
            out.match_expressions
                .push(requirement(key, Operator::In, values(list)));
        } else if let Some((k, v)) = term.split_once('=') {
            out.match_labels
                .insert(k.trim().to_string(), v.trim().to_string());
        } else {
            out.match_expressions
                .push(requirement(term, Operator::Exists, vec![]));
        }
    }
    out
}

fn ips(s: &str) -> Vec<IpAddr> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().expect("ip"))
        .collect()
}

fn net(s: &str) -> IpNet {
    s.parse().expect("cidr")
}

fn object(s: &str) -> ObjectRef {
    let (namespace, name) = s.split_once('/').expect("ns/name");
    ObjectRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn named(name: &str, port: u16, protocol: Protocol) -> NamedPort {
    NamedPort {
        name: name.into(),
        port,
        protocol,
    }
}

/// The e2e suite's container ports: 80 and 81, TCP and UDP, named `serve-<port>-<protocol>`.
fn serve_ports() -> Vec<NamedPort> {
    let mut v = vec![
        named("serve-80-tcp", 80, Protocol::Tcp),
        named("serve-80-udp", 80, Protocol::Udp),
        named("serve-81-tcp", 81, Protocol::Tcp),
        named("serve-81-udp", 81, Protocol::Udp),
    ];
    v.sort();
    v
}

/// A pod on this node: `"ns/name"`, labels, addresses.
fn pod(name: &str, pod_labels: &str, addresses: &str) -> Pod {
    let r = object(name);
    Pod {
        namespace: r.namespace,
        name: r.name,
        labels: labels(pod_labels),
        node: Some(NODE.into()),
        ips: ips(addresses),
        named_ports: vec![],
        host_network: false,
    }
}

trait PodExt {
    fn on(self, node: &str) -> Pod;
    fn ports(self, ports: Vec<NamedPort>) -> Pod;
    fn host_network(self) -> Pod;
}

impl PodExt for Pod {
    fn on(mut self, node: &str) -> Pod {
        self.node = Some(node.into());
        self
    }
    fn ports(mut self, mut ports: Vec<NamedPort>) -> Pod {
        ports.sort();
        self.named_ports = ports;
        self
    }
    fn host_network(mut self) -> Pod {
        self.host_network = true;
        self
    }
}

/// A NetworkPolicy under construction; `policyTypes` default as the API does unless `types`
/// sets them.
#[derive(Clone)]
struct Pol {
    policy: NetworkPolicy,
    types: Option<(bool, bool)>,
}

/// `"ns/name"` selecting `select` in its namespace.
fn policy(name: &str, select: &str) -> Pol {
    let r = object(name);
    Pol {
        policy: NetworkPolicy {
            namespace: r.namespace,
            name: r.name,
            pod_selector: sel(select),
            ingress_isolation: true,
            egress_isolation: false,
            ingress: vec![],
            egress: vec![],
        },
        types: None,
    }
}

impl Pol {
    fn ingress(mut self, peers: Option<Vec<Peer>>, ports: Option<Vec<PolicyPort>>) -> Pol {
        self.policy.ingress.push(Rule { peers, ports });
        self
    }
    fn egress(mut self, peers: Option<Vec<Peer>>, ports: Option<Vec<PolicyPort>>) -> Pol {
        self.policy.egress.push(Rule { peers, ports });
        self
    }
    /// Explicit `policyTypes`.
    fn types(mut self, ingress: bool, egress: bool) -> Pol {
        self.types = Some((ingress, egress));
        self
    }
    fn build(self) -> NetworkPolicy {
        let (ingress, egress) = self.types.unwrap_or((true, !self.policy.egress.is_empty()));
        NetworkPolicy {
            ingress_isolation: ingress,
            egress_isolation: egress,
            ..self.policy
        }
    }
}

/// `podSelector` only (the policy's namespace).
fn pods(pod_sel: &str) -> Peer {
    Peer::Pods {
        namespaces: None,
        pods: sel(pod_sel),
    }
}

/// `namespaceSelector` and `podSelector` in one peer (`""` for an absent `podSelector`).
fn ns_pods(ns_sel: &str, pod_sel: &str) -> Peer {
    Peer::Pods {
        namespaces: Some(sel(ns_sel)),
        pods: sel(pod_sel),
    }
}

fn block(cidr: &str, except: &[&str]) -> Peer {
    Peer::IpBlock {
        cidr: net(cidr),
        except: except.iter().map(|e| net(e)).collect(),
    }
}

fn port(protocol: Protocol, port: u16) -> PolicyPort {
    PolicyPort {
        protocol,
        port: Some(PortRef::Number(port)),
        end_port: None,
    }
}

fn tcp(p: u16) -> PolicyPort {
    port(Protocol::Tcp, p)
}

fn udp(p: u16) -> PolicyPort {
    port(Protocol::Udp, p)
}

fn range(protocol: Protocol, p: u16, end: u16) -> PolicyPort {
    PolicyPort {
        end_port: Some(end),
        ..port(protocol, p)
    }
}

fn every_port(protocol: Protocol) -> PolicyPort {
    PolicyPort {
        protocol,
        port: None,
        end_port: None,
    }
}

fn by_name(protocol: Protocol, name: &str) -> PolicyPort {
    PolicyPort {
        protocol,
        port: Some(PortRef::Name(name.into())),
        end_port: None,
    }
}

#[derive(Clone)]
struct Cluster {
    state: ClusterState,
}

impl Cluster {
    /// No namespaces, no pods; this node is `n1` with address `192.168.0.1`.
    fn new() -> Cluster {
        Cluster {
            state: ClusterState {
                node: Some(NODE.into()),
                node_ips: ips(NODE_IP),
                ..ClusterState::default()
            },
        }
    }

    /// A namespace with `ns_labels` plus `kubernetes.io/metadata.name`.
    fn ns(mut self, name: &str, ns_labels: &str) -> Cluster {
        let mut l = labels(ns_labels);
        l.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        self.state.namespaces.insert(
            name.into(),
            Namespace {
                name: name.into(),
                labels: l,
                audit: false,
            },
        );
        self
    }

    fn pod(mut self, pod: Pod) -> Cluster {
        self.state.pods.insert(
            ObjectRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            },
            pod,
        );
        self
    }

    fn policy(mut self, p: Pol) -> Cluster {
        let p = p.build();
        self.state.policies.insert(
            ObjectRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            },
            p,
        );
        self
    }

    fn policies(self, ps: Vec<Pol>) -> Cluster {
        ps.into_iter().fold(self, Cluster::policy)
    }

    /// Compiles with fresh identities.
    fn compile(&self) -> Desired {
        self.compile_with(&mut Identities::default())
    }

    /// Compiles with `ids` and checks the output's invariants.
    fn compile_with(&self, ids: &mut Identities) -> Desired {
        let d = compile(&self.state, ids);
        check_invariants(&self.state, &d);
        d
    }
}

/// The upstream e2e model: namespaces x, y, z (label `ns=<name>`), each with pods a, b, c
/// (label `pod=<name>`) serving TCP and UDP on 80 and 81, all on this node. Pod `<ns>/<p>` has
/// `10.0.<1,2,3>.<1,2,3>` and `fd00:0:<1,2,3>::<1,2,3>`.
fn e2e() -> Cluster {
    let mut c = Cluster::new();
    for (i, ns) in ["x", "y", "z"].into_iter().enumerate() {
        c = c.ns(ns, &format!("ns={ns}"));
        for (j, p) in ["a", "b", "c"].into_iter().enumerate() {
            let (i, j) = (i + 1, j + 1);
            c = c.pod(
                pod(
                    &format!("{ns}/{p}"),
                    &format!("pod={p}"),
                    &format!("10.0.{i}.{j},fd00:0:{i}::{j}"),
                )
                .ports(serve_ports()),
            );
        }
    }
    c
}

const PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

/// Every output invariant the datapath and the reconciler rely on.
fn check_invariants(state: &ClusterState, d: &Desired) {
    let local: BTreeSet<u32> = d
        .endpoints
        .values()
        .filter(|e| e.flags & ENDPOINT_LOCAL != 0)
        .map(|e| e.identity)
        .collect();
    for k in d.policy.keys() {
        assert!(
            local.contains(&k.local),
            "policy entry for a non-local identity: {k:?}"
        );
    }
    for cookie in d.policy.values() {
        assert!(d.rules.contains_key(cookie), "unknown cookie {cookie}");
    }
    assert!(!d.rules.contains_key(&0), "cookie 0 is never used");
    for (ip, e) in &d.endpoints {
        if e.identity == IDENTITY_HOST {
            assert!(state.node_ips.contains(ip), "host identity on {ip}");
        } else {
            assert!(
                d.identities.contains_key(&e.identity),
                "endpoint {ip} has an unknown identity {}",
                e.identity
            );
        }
        if e.flags & ENDPOINT_LOCAL == 0 {
            assert_eq!(e.flags, 0, "remote endpoint {ip} with flags");
        }
    }
    for id in d.identities.keys() {
        assert!((IDENTITY_FIRST_POD..IDENTITY_FIRST_CIDR).contains(id));
    }
    for (id, _) in d.isolating.keys() {
        assert!(local.contains(id), "isolating a non-local identity {id}");
    }
    for (&(ip, len), &id) in &d.cidrs {
        let n = IpNet::new(ip, len).expect("valid prefix");
        assert_eq!(n.trunc().addr(), ip, "host bits of {ip}/{len} not zeroed");
        assert!(
            id == IDENTITY_WORLD || id >= IDENTITY_FIRST_CIDR,
            "cidr identity {id}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The datapath, simulated from `Desired`.

/// The address of `who`: an IP, `"ns/pod"` (its first address) or `"ns/pod%6"` (its first IPv6
/// address).
fn addr(state: &ClusterState, who: &str) -> IpAddr {
    if let Ok(ip) = who.parse() {
        return ip;
    }
    let (name, v6) = match who.strip_suffix("%6") {
        Some(name) => (name, true),
        None => (who, false),
    };
    let pod = state
        .pods
        .get(&object(name))
        .unwrap_or_else(|| panic!("no pod {name}"));
    *pod.ips
        .iter()
        .find(|ip| !v6 || ip.is_ipv6())
        .unwrap_or_else(|| panic!("{who} has no such address"))
}

/// Whether a new flow from `from` to `to` (protocol, destination port) passes: the client's
/// egress check if the client is local, and the server's ingress check if the server is local.
fn allowed(d: &Desired, state: &ClusterState, from: &str, to: &str, proto: u8, port: u16) -> bool {
    let (src, dst) = (addr(state, from), addr(state, to));
    let check = |local: IpAddr, remote: IpAddr, dir: Direction| match d.endpoints.get(&local) {
        Some(ep) if ep.flags & ENDPOINT_LOCAL != 0 => decide(d, ep, dir, remote, proto, port),
        _ => true,
    };
    check(src, dst, Direction::Egress) && check(dst, src, Direction::Ingress)
}

/// `npc-ebpf/src/policy.rs::decide`, with host traffic allowed (the default).
fn decide(
    d: &Desired,
    ep: &DesiredEndpoint,
    dir: Direction,
    remote: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let isolated = match dir {
        Direction::Ingress => ep.flags & ENDPOINT_INGRESS_ISOLATED != 0,
        Direction::Egress => ep.flags & ENDPOINT_EGRESS_ISOLATED != 0,
    };
    if !isolated {
        return true;
    }
    let lookup = |r: u32| {
        d.policy.keys().any(|k| {
            k.local == ep.identity
                && k.remote == r
                && k.direction == dir
                && port_matches(k.ports, proto, port)
        })
    };
    let remote_identity = d.endpoints.get(&remote).map(|e| e.identity);
    if remote_identity == Some(IDENTITY_HOST) && dir == Direction::Ingress {
        return true;
    }
    if remote_identity.is_some_and(lookup) {
        return true;
    }
    if lpm(d, remote).is_some_and(lookup) {
        return true;
    }
    lookup(IDENTITY_ANY)
}

fn port_matches(m: PortMatch, proto: u8, port: u16) -> bool {
    match m {
        PortMatch::AnyProtocol => true,
        PortMatch::AnyPort { protocol } => protocol == proto,
        PortMatch::Range {
            protocol,
            port: start,
            end_port,
        } => protocol == proto && (start..=end_port).contains(&port),
    }
}

/// The `cidrs` LPM lookup as the datapath does it: one trie of 16-byte keys, IPv4 prefixes as
/// `::ffff:a.b.c.d/(96 + len)`.
fn lpm(d: &Desired, ip: IpAddr) -> Option<u32> {
    let key = u128::from_be_bytes(ip_bytes(ip));
    d.cidrs
        .iter()
        .filter_map(|(&(net, len), &id)| {
            let bits = u32::from(len) + if net.is_ipv4() { 96 } else { 0 };
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            let prefix = u128::from_be_bytes(ip_bytes(net));
            (key & mask == prefix & mask).then_some((bits, id))
        })
        .max_by_key(|&(bits, _)| bits)
        .map(|(_, id)| id)
}

fn proto_name(p: u8) -> &'static str {
    match p {
        TCP => "tcp",
        UDP => "udp",
        SCTP => "sctp",
        ICMP => "icmp",
        _ => "?",
    }
}

/// Asserts one expectation.
#[track_caller]
fn expect(
    case: &str,
    c: &Cluster,
    d: &Desired,
    from: &str,
    to: &str,
    (proto, port): (u8, u16),
    want: bool,
) {
    let got = allowed(d, &c.state, from, to, proto, port);
    assert_eq!(
        got,
        want,
        "{case}: {from} -> {to} {}/{port} should be {}",
        proto_name(proto),
        if want { "allowed" } else { "denied" }
    );
}

/// Asserts the whole e2e matrix (every pair of distinct pods; a pod reaching itself never
/// leaves it) for one protocol and port.
#[track_caller]
fn matrix(
    case: &str,
    c: &Cluster,
    d: &Desired,
    probe: (u8, u16),
    want: impl Fn(&str, &str) -> bool,
) {
    for from in PODS {
        for to in PODS.into_iter().filter(|&to| to != from) {
            expect(case, c, d, from, to, probe, want(from, to));
        }
    }
}

/// (protocol, destination port).
type Probe = (u8, u16);
/// Who may reach whom: (from, to) -> allowed.
type Reach = fn(&str, &str) -> bool;

/// One e2e case: policies, then the expected matrix for each probe.
struct Case {
    name: &'static str,
    policies: Vec<Pol>,
    expect: Vec<(Probe, Reach)>,
}

fn run(cases: Vec<Case>) {
    for case in cases {
        let c = e2e().policies(case.policies);
        let d = c.compile();
        for (probe, want) in case.expect {
            matrix(case.name, &c, &d, probe, want);
        }
    }
}

fn ns_of(p: &str) -> &str {
    p.split('/').next().unwrap_or_default()
}

const T80: (u8, u16) = (TCP, 80);
const T81: (u8, u16) = (TCP, 81);
const U80: (u8, u16) = (UDP, 80);
const U81: (u8, u16) = (UDP, 81);

// ---------------------------------------------------------------------------------------------
// The e2e model.

#[test]
fn e2e_default_deny_and_allow_all() {
    run(vec![
        Case {
            name: "no policy: everything allowed",
            policies: vec![],
            expect: vec![(T80, |_, _| true), (U81, |_, _| true)],
        },
        Case {
            name: "default deny ingress in x",
            policies: vec![policy("x/deny", "")],
            expect: vec![(T80, |_, t| ns_of(t) != "x"), (U81, |_, t| ns_of(t) != "x")],
        },
        Case {
            name: "default deny egress in x",
            policies: vec![policy("x/deny", "").types(false, true)],
            expect: vec![(T80, |f, _| ns_of(f) != "x"), (U80, |f, _| ns_of(f) != "x")],
        },
        Case {
            name: "default deny both in x",
            policies: vec![policy("x/deny", "").types(true, true)],
            expect: vec![(T80, |f, t| ns_of(f) != "x" && ns_of(t) != "x")],
        },
        Case {
            name: "allow all ingress (one empty rule) in x",
            policies: vec![policy("x/allow", "").ingress(None, None)],
            expect: vec![(T80, |_, _| true), (U81, |_, _| true)],
        },
        Case {
            name: "allow all egress (one empty rule), types defaulted to both",
            policies: vec![policy("x/allow", "").egress(None, None)],
            // Egress is allowed, but the defaulted Ingress type isolates x for ingress.
            expect: vec![(T80, |_, t| ns_of(t) != "x")],
        },
        Case {
            name: "allow all egress with policyTypes [Egress]",
            policies: vec![policy("x/allow", "").egress(None, None).types(false, true)],
            expect: vec![(T80, |_, _| true)],
        },
        Case {
            name: "deny all ingress stacked with allow all ingress",
            policies: vec![
                policy("x/deny", ""),
                policy("x/allow", "").ingress(None, None),
            ],
            expect: vec![(T80, |_, _| true)],
        },
        Case {
            name: "a policy selecting nothing isolates nothing",
            policies: vec![policy("x/deny", "pod=nothing")],
            expect: vec![(T80, |_, _| true)],
        },
    ]);
}

#[test]
fn e2e_selectors() {
    run(vec![
        Case {
            name: "podSelector: x/a from x/b",
            policies: vec![policy("x/p", "pod=a").ingress(Some(vec![pods("pod=b")]), None)],
            expect: vec![(T80, |f, t| t != "x/a" || f == "x/b")],
        },
        Case {
            name: "empty podSelector: x/a from its namespace",
            policies: vec![policy("x/p", "pod=a").ingress(Some(vec![pods("")]), None)],
            expect: vec![(T80, |f, t| t != "x/a" || ns_of(f) == "x")],
        },
        Case {
            name: "namespaceSelector: x/a from y",
            policies: vec![policy("x/p", "pod=a").ingress(Some(vec![ns_pods("ns=y", "")]), None)],
            expect: vec![(T80, |f, t| t != "x/a" || ns_of(f) == "y")],
        },
        Case {
            name: "empty namespaceSelector: x/a from every namespace",
            policies: vec![policy("x/p", "pod=a").ingress(Some(vec![ns_pods("", "")]), None)],
            expect: vec![(T80, |_, _| true)],
        },
        Case {
            name: "namespaceSelector on kubernetes.io/metadata.name",
            policies: vec![policy("x/p", "pod=a").ingress(
                Some(vec![ns_pods("kubernetes.io/metadata.name=z", "")]),
                None,
            )],
            expect: vec![(T80, |f, t| t != "x/a" || ns_of(f) == "z")],
        },
        Case {
            name: "both selectors in one peer (AND): x/a from y/b",
            policies: vec![
                policy("x/p", "pod=a").ingress(Some(vec![ns_pods("ns=y", "pod=b")]), None),
            ],
            expect: vec![(T80, |f, t| t != "x/a" || f == "y/b")],
        },
        Case {
            name: "two peers (OR): x/a from y/* or x/b",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(Some(vec![ns_pods("ns=y", ""), pods("pod=b")]), None),
            ],
            expect: vec![(T80, |f, t| t != "x/a" || ns_of(f) == "y" || f == "x/b")],
        },
        Case {
            name: "two rules (OR): x/a from z/c or x/c",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(Some(vec![ns_pods("ns=z", "pod=c")]), None)
                    .ingress(Some(vec![pods("pod=c")]), None),
            ],
            expect: vec![(T80, |f, t| t != "x/a" || f == "z/c" || f == "x/c")],
        },
        Case {
            name: "matchExpressions In: namespaces y and z",
            policies: vec![
                policy("x/p", "pod=a").ingress(Some(vec![ns_pods("ns in (y,z)", "")]), None),
            ],
            expect: vec![(T80, |f, t| t != "x/a" || ns_of(f) != "x")],
        },
        Case {
            name: "matchExpressions NotIn: pods other than b (own namespace)",
            policies: vec![policy("x/p", "pod=a").ingress(Some(vec![pods("pod notin (b)")]), None)],
            expect: vec![(T80, |f, t| t != "x/a" || f == "x/c")],
        },
        Case {
            name: "matchExpressions Exists / DoesNotExist",
            policies: vec![
                policy("x/p", "pod=a").ingress(Some(vec![ns_pods("ns", "!pod")]), None),
                policy("y/p", "pod=a").ingress(Some(vec![ns_pods("ns", "pod")]), None),
            ],
            // Every pod has a `pod` label: DoesNotExist matches none, Exists all.
            expect: vec![(T80, |_, t| t != "x/a")],
        },
        Case {
            name: "policy podSelector with matchExpressions: isolate a and b in y",
            policies: vec![policy("y/p", "pod in (a,b)")],
            expect: vec![(T80, |_, t| t != "y/a" && t != "y/b")],
        },
        Case {
            name: "peer in another namespace without namespaceSelector stays in own namespace",
            policies: vec![policy("y/p", "pod=a").ingress(Some(vec![pods("pod=b")]), None)],
            expect: vec![(T80, |f, t| t != "y/a" || f == "y/b")],
        },
    ]);
}

#[test]
fn e2e_ports_and_protocols() {
    run(vec![
        Case {
            name: "TCP 80 only",
            policies: vec![policy("x/p", "pod=a").ingress(None, Some(vec![tcp(80)]))],
            expect: vec![
                (T80, |_, _| true),
                (T81, |_, t| t != "x/a"),
                (U80, |_, t| t != "x/a"),
            ],
        },
        Case {
            name: "UDP 81 only",
            policies: vec![policy("x/p", "pod=a").ingress(None, Some(vec![udp(81)]))],
            expect: vec![
                (U81, |_, _| true),
                (U80, |_, t| t != "x/a"),
                (T81, |_, t| t != "x/a"),
            ],
        },
        Case {
            name: "ports OR'd: TCP 81 or UDP 80",
            policies: vec![policy("x/p", "pod=a").ingress(None, Some(vec![tcp(81), udp(80)]))],
            expect: vec![
                (T81, |_, _| true),
                (U80, |_, _| true),
                (T80, |_, t| t != "x/a"),
                (U81, |_, t| t != "x/a"),
            ],
        },
        Case {
            name: "every TCP port",
            policies: vec![
                policy("x/p", "pod=a").ingress(None, Some(vec![every_port(Protocol::Tcp)])),
            ],
            expect: vec![
                (T80, |_, _| true),
                (T81, |_, _| true),
                (U80, |_, t| t != "x/a"),
            ],
        },
        Case {
            name: "endPort: TCP 81-82",
            policies: vec![
                policy("x/p", "pod=a").ingress(None, Some(vec![range(Protocol::Tcp, 81, 82)])),
            ],
            expect: vec![
                (T80, |_, t| t != "x/a"),
                (T81, |_, _| true),
                ((TCP, 82), |_, _| true),
                ((TCP, 83), |_, t| t != "x/a"),
                (U81, |_, t| t != "x/a"),
            ],
        },
        Case {
            name: "peers and ports: y/b on TCP 80 only",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(Some(vec![ns_pods("ns=y", "pod=b")]), Some(vec![tcp(80)])),
            ],
            expect: vec![
                (T80, |f, t| t != "x/a" || f == "y/b"),
                (T81, |_, t| t != "x/a"),
            ],
        },
        Case {
            name: "stacked: TCP 80 from y and TCP 81 from z",
            policies: vec![
                policy("x/p1", "pod=a")
                    .ingress(Some(vec![ns_pods("ns=y", "")]), Some(vec![tcp(80)])),
                policy("x/p2", "pod=a")
                    .ingress(Some(vec![ns_pods("ns=z", "")]), Some(vec![tcp(81)])),
            ],
            expect: vec![
                (T80, |f, t| t != "x/a" || ns_of(f) == "y"),
                (T81, |f, t| t != "x/a" || ns_of(f) == "z"),
            ],
        },
    ]);
}

#[test]
fn e2e_named_ports() {
    run(vec![
        Case {
            name: "ingress named port serve-80-tcp",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(None, Some(vec![by_name(Protocol::Tcp, "serve-80-tcp")])),
            ],
            expect: vec![
                (T80, |_, _| true),
                (T81, |_, t| t != "x/a"),
                (U80, |_, t| t != "x/a"),
            ],
        },
        Case {
            name: "ingress named port serve-81-udp",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(None, Some(vec![by_name(Protocol::Udp, "serve-81-udp")])),
            ],
            expect: vec![(U81, |_, _| true), (T81, |_, t| t != "x/a")],
        },
        Case {
            name: "named port with the wrong protocol matches nothing",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(None, Some(vec![by_name(Protocol::Udp, "serve-80-tcp")])),
            ],
            expect: vec![(T80, |_, t| t != "x/a"), (U80, |_, t| t != "x/a")],
        },
        Case {
            name: "an undeclared named port matches nothing",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(None, Some(vec![by_name(Protocol::Tcp, "serve-99-tcp")])),
            ],
            expect: vec![(T80, |_, t| t != "x/a")],
        },
        Case {
            name: "egress named port to y (resolved on the peer)",
            policies: vec![
                policy("x/p", "pod=a")
                    .egress(
                        Some(vec![ns_pods("ns=y", "")]),
                        Some(vec![by_name(Protocol::Tcp, "serve-81-tcp")]),
                    )
                    .types(false, true),
            ],
            expect: vec![
                (T81, |f, t| f != "x/a" || ns_of(t) == "y"),
                (T80, |f, _| f != "x/a"),
            ],
        },
    ]);
}

#[test]
fn e2e_egress() {
    run(vec![
        Case {
            name: "egress to y/b only",
            policies: vec![
                policy("x/p", "pod=a")
                    .egress(Some(vec![ns_pods("ns=y", "pod=b")]), None)
                    .types(false, true),
            ],
            expect: vec![
                (T80, |f, t| f != "x/a" || t == "y/b"),
                (U81, |f, t| f != "x/a" || t == "y/b"),
            ],
        },
        Case {
            name: "egress UDP 80 anywhere",
            policies: vec![
                policy("x/p", "pod=a")
                    .egress(None, Some(vec![udp(80)]))
                    .types(false, true),
            ],
            expect: vec![(U80, |_, _| true), (T80, |f, _| f != "x/a")],
        },
        Case {
            name: "client egress and server ingress both apply",
            policies: vec![
                policy("x/out", "pod=a")
                    .egress(Some(vec![ns_pods("ns=y", "")]), None)
                    .types(false, true),
                policy("y/in", "pod=b").ingress(Some(vec![ns_pods("ns=z", "")]), None),
            ],
            // x/a may send only to y, and y/b accepts only from z: x/a -> y/b is denied.
            expect: vec![(T80, |f, t| {
                (f != "x/a" || ns_of(t) == "y") && (t != "y/b" || ns_of(f) == "z")
            })],
        },
        Case {
            name: "policyTypes [Egress] ignores its ingress rules",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(Some(vec![pods("pod=b")]), None)
                    .egress(Some(vec![pods("pod=c")]), None)
                    .types(false, true),
            ],
            expect: vec![(T80, |f, t| f != "x/a" || t == "x/c")],
        },
        Case {
            name: "policyTypes [Ingress] ignores its egress rules",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(Some(vec![pods("pod=b")]), None)
                    .egress(Some(vec![pods("pod=c")]), None)
                    .types(true, false),
            ],
            expect: vec![(T80, |f, t| t != "x/a" || f == "x/b")],
        },
        Case {
            name: "policyTypes defaulted with egress rules: both directions",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(Some(vec![pods("pod=b")]), None)
                    .egress(Some(vec![pods("pod=c")]), None),
            ],
            expect: vec![(T80, |f, t| {
                (t != "x/a" || f == "x/b") && (f != "x/a" || t == "x/c")
            })],
        },
    ]);
}

#[test]
fn e2e_ip_blocks() {
    run(vec![
        Case {
            name: "ingress from 10.0.0.0/16 except 10.0.2.0/24 (pod addresses)",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(Some(vec![block("10.0.0.0/16", &["10.0.2.0/24"])]), None),
            ],
            expect: vec![(T80, |f, t| t != "x/a" || ns_of(f) != "y")],
        },
        Case {
            name: "egress to y's /24 only",
            policies: vec![
                policy("x/p", "pod=a")
                    .egress(Some(vec![block("10.0.2.0/24", &[])]), None)
                    .types(false, true),
            ],
            expect: vec![(T80, |f, t| f != "x/a" || ns_of(t) == "y")],
        },
        Case {
            name: "egress to all but one pod address",
            policies: vec![
                policy("x/p", "pod=a")
                    .egress(Some(vec![block("0.0.0.0/0", &["10.0.3.2/32"])]), None)
                    .types(false, true),
            ],
            expect: vec![(T80, |f, t| f != "x/a" || t != "z/b")],
        },
        Case {
            name: "ipBlock OR pod selector in one rule",
            policies: vec![policy("x/p", "pod=a").ingress(
                Some(vec![block("10.0.3.1/32", &[]), ns_pods("ns=y", "pod=c")]),
                None,
            )],
            expect: vec![(T80, |f, t| t != "x/a" || f == "z/a" || f == "y/c")],
        },
        Case {
            name: "ipBlock with ports",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(Some(vec![block("10.0.2.0/24", &[])]), Some(vec![udp(81)])),
            ],
            expect: vec![
                (U81, |f, t| t != "x/a" || ns_of(f) == "y"),
                (T81, |_, t| t != "x/a"),
            ],
        },
        Case {
            name: "host bits in the cidr are ignored",
            policies: vec![
                policy("x/p", "pod=a")
                    .ingress(Some(vec![block("10.0.2.77/24", &["10.0.2.3/31"])]), None),
            ],
            // 10.0.2.0/24 except 10.0.2.2/31 (y/b, y/c).
            expect: vec![(T80, |f, t| t != "x/a" || f == "y/a")],
        },
    ]);
}

// ---------------------------------------------------------------------------------------------
// Beyond the matrix.

#[test]
fn named_ports_resolve_on_the_owner() {
    let http = |p| vec![named("http", p, Protocol::Tcp)];
    let c = Cluster::new()
        .ns("x", "")
        .ns("y", "")
        .pod(pod("x/client", "app=client", "10.1.0.1"))
        .pod(pod("x/other", "app=other", "10.1.0.9"))
        .pod(pod("x/web1", "app=web,v=1", "10.1.0.2").ports(http(8080)))
        .pod(pod("x/web2", "app=web,v=2", "10.1.0.3").ports(http(80)))
        .pod(pod("y/api1", "app=api", "10.2.0.1").ports(http(8080)))
        .pod(pod("y/api2", "app=api", "10.2.0.2").ports(http(80)))
        .pod(pod("y/plain", "app=api", "10.2.0.3"))
        .policy(
            policy("x/web", "app=web").ingress(None, Some(vec![by_name(Protocol::Tcp, "http")])),
        )
        .policy(
            policy("x/client", "app=client")
                .egress(
                    Some(vec![ns_pods("", "app=api")]),
                    Some(vec![by_name(Protocol::Tcp, "http")]),
                )
                .types(false, true),
        );
    let d = c.compile();
    let t = |p| (TCP, p);
    let cases = [
        (
            "ingress: selected pod web1 serves http on 8080",
            "x/other",
            "x/web1",
            t(8080),
            true,
        ),
        (
            "ingress: web1 does not serve http on 80",
            "x/other",
            "x/web1",
            t(80),
            false,
        ),
        (
            "ingress: selected pod web2 serves http on 80",
            "x/other",
            "x/web2",
            t(80),
            true,
        ),
        (
            "ingress: web2 not on 8080",
            "x/other",
            "x/web2",
            t(8080),
            false,
        ),
        (
            "egress: peer api1 serves http on 8080",
            "x/client",
            "y/api1",
            t(8080),
            true,
        ),
        ("egress: api1 not on 80", "x/client", "y/api1", t(80), false),
        (
            "egress: peer api2 serves http on 80",
            "x/client",
            "y/api2",
            t(80),
            true,
        ),
        (
            "egress: api2 not on 8080",
            "x/client",
            "y/api2",
            t(8080),
            false,
        ),
        (
            "egress: a peer without the name matches nothing",
            "x/client",
            "y/plain",
            t(80),
            false,
        ),
        (
            "egress: a peer without the name, 8080",
            "x/client",
            "y/plain",
            t(8080),
            false,
        ),
    ];
    for (case, from, to, probe, want) in cases {
        expect(case, &c, &d, from, to, probe, want);
    }
}

#[test]
fn egress_named_ports_to_any_peer_and_ip_blocks() {
    let http = |p| vec![named("http", p, Protocol::Tcp)];
    let base = Cluster::new()
        .ns("x", "")
        .ns("y", "")
        .pod(pod("x/client", "app=client", "10.1.0.1"))
        .pod(pod("y/api1", "app=api", "10.2.0.1").ports(http(8080)))
        // Two replicas of one identity: one inside the block below, one outside.
        .pod(pod("y/web-in", "app=web", "10.2.0.2").ports(http(80)))
        .pod(pod("y/web-out", "app=web", "10.3.0.2").ports(http(80)))
        .pod(pod("y/plain", "app=plain", "10.2.0.3"));
    assert_eq!(
        base.compile().endpoints[&"10.2.0.2".parse().unwrap()].identity,
        base.compile().endpoints[&"10.3.0.2".parse().unwrap()].identity,
        "the web replicas share an identity"
    );
    let t = |p| (TCP, p);

    // `to` absent: every pod declaring the name, on its own port; never a non-pod address.
    let c = base.clone().policy(
        policy("x/client", "app=client")
            .egress(None, Some(vec![by_name(Protocol::Tcp, "http")]))
            .types(false, true),
    );
    let d = c.compile();
    let cases = [
        ("any peer: api1 on 8080", "y/api1", t(8080), true),
        ("any peer: api1 not on 80", "y/api1", t(80), false),
        ("any peer: web-out on 80", "y/web-out", t(80), true),
        ("any peer: plain has no http", "y/plain", t(80), false),
        (
            "any peer: an external address is no pod",
            "8.8.8.8",
            t(80),
            false,
        ),
    ];
    for (case, to, probe, want) in cases {
        expect(case, &c, &d, "x/client", to, probe, want);
    }

    // An ipBlock: only pods inside it, each on its own port, exactly per address.
    let c = base.clone().policy(
        policy("x/client", "app=client")
            .egress(
                Some(vec![block("10.2.0.0/16", &["10.2.0.3/32"])]),
                Some(vec![by_name(Protocol::Tcp, "http"), tcp(443)]),
            )
            .types(false, true),
    );
    let d = c.compile();
    let cases = [
        ("block: api1 on 8080", "y/api1", t(8080), true),
        ("block: api1 not on 80", "y/api1", t(80), false),
        ("block: web-in on 80", "y/web-in", t(80), true),
        (
            "block: web-out is outside the block",
            "y/web-out",
            t(80),
            false,
        ),
        (
            "block: numeric port to web-out (outside)",
            "y/web-out",
            t(443),
            false,
        ),
        ("block: numeric port to api1", "y/api1", t(443), true),
        (
            "block: numeric port to a non-pod address",
            "10.2.9.9",
            t(443),
            true,
        ),
        (
            "block: no name at a non-pod address",
            "10.2.9.9",
            t(80),
            false,
        ),
        ("block: plain is excepted", "y/plain", t(443), false),
    ];
    for (case, to, probe, want) in cases {
        expect(case, &c, &d, "x/client", to, probe, want);
    }
    assert!(
        d.cidrs.contains_key(&("10.2.0.2".parse().unwrap(), 32)),
        "host prefix for a named-port pod in the block"
    );
    assert!(
        !d.cidrs.contains_key(&("10.3.0.2".parse().unwrap(), 32)),
        "no host prefix outside the block"
    );
}

#[test]
fn overlapping_ip_blocks_of_different_policies() {
    let c = Cluster::new()
        .ns("x", "")
        .pod(pod("x/a", "pod=a", "10.200.0.1"))
        .pod(pod("x/b", "pod=b", "10.200.0.2"))
        .pod(pod("x/c", "pod=c", "10.200.0.3"))
        .policy(
            policy("x/wide", "pod=a")
                .ingress(Some(vec![block("10.0.0.0/8", &["10.1.0.0/16"])]), None),
        )
        .policy(policy("x/narrow", "pod=b").ingress(Some(vec![block("10.1.2.0/24", &[])]), None))
        .policy(
            // The same block as x/wide (another policy): the same CIDR identity.
            policy("x/same", "pod=c")
                .ingress(Some(vec![block("10.0.0.0/8", &["10.1.0.0/16"])]), None),
        );
    let d = c.compile();
    let cases = [
        ("10.2.0.1 is in the wide block", "10.2.0.1", "x/a", true),
        (
            "10.2.0.1 is not in the narrow block",
            "10.2.0.1",
            "x/b",
            false,
        ),
        (
            "10.1.2.5 is excepted from the wide block",
            "10.1.2.5",
            "x/a",
            false,
        ),
        ("10.1.2.5 is in the narrow block", "10.1.2.5", "x/b", true),
        ("10.1.3.5 is in neither", "10.1.3.5", "x/a", false),
        ("10.1.3.5 is in neither (narrow)", "10.1.3.5", "x/b", false),
        ("the same block in two policies", "10.2.0.1", "x/c", true),
        (
            "the same block in two policies, excepted",
            "10.1.2.5",
            "x/c",
            false,
        ),
        ("outside every block", "11.0.0.1", "x/a", false),
    ];
    for (case, from, to, want) in cases {
        expect(case, &c, &d, from, to, (TCP, 80), want);
    }
    let p = |s: &str| {
        let n = net(s);
        d.cidrs[&(n.addr(), n.prefix_len())]
    };
    assert_eq!(d.cidrs.len(), 3, "three distinct prefixes: {:?}", d.cidrs);
    assert!(p("10.0.0.0/8") >= IDENTITY_FIRST_CIDR, "wide");
    assert_eq!(
        p("10.1.0.0/16"),
        IDENTITY_WORLD,
        "the except belongs to no block"
    );
    assert!(p("10.1.2.0/24") >= IDENTITY_FIRST_CIDR, "narrow");
    assert_ne!(p("10.0.0.0/8"), p("10.1.2.0/24"), "different sets");
}

#[test]
fn nested_ip_blocks_share_prefixes() {
    // A: 10.0.0.0/8 except 10.1.0.0/16; B: 10.1.0.0/16 except 10.1.2.0/24; C: 10.1.2.0/24.
    let c = Cluster::new()
        .ns("x", "")
        .pod(pod("x/a", "pod=a", "192.0.2.1"))
        .pod(pod("x/b", "pod=b", "192.0.2.2"))
        .pod(pod("x/c", "pod=c", "192.0.2.3"))
        .policy(
            policy("x/a", "pod=a").ingress(Some(vec![block("10.0.0.0/8", &["10.1.0.0/16"])]), None),
        )
        .policy(
            policy("x/b", "pod=b")
                .ingress(Some(vec![block("10.1.0.0/16", &["10.1.2.0/24"])]), None),
        )
        .policy(policy("x/c", "pod=c").ingress(Some(vec![block("10.1.2.0/24", &[])]), None));
    let d = c.compile();
    for (from, allowed_to) in [
        ("10.9.0.1", "x/a"),
        ("10.1.9.1", "x/b"),
        ("10.1.2.9", "x/c"),
    ] {
        for to in ["x/a", "x/b", "x/c"] {
            expect(
                "nested blocks",
                &c,
                &d,
                from,
                to,
                (TCP, 80),
                to == allowed_to,
            );
        }
    }
    let ids: BTreeSet<u32> = d.cidrs.values().copied().collect();
    assert_eq!(ids.len(), 3, "one identity per distinct set: {:?}", d.cidrs);
}

#[test]
fn ipv6_blocks_and_pods() {
    let c = e2e()
        .policy(
            policy("x/v6", "pod=a")
                .ingress(Some(vec![block("fd00::/16", &["fd00:0:2::/48"])]), None),
        )
        .policy(policy("x/all6", "pod=b").ingress(Some(vec![block("::/0", &[])]), None))
        .policy(policy("x/all4", "pod=c").ingress(Some(vec![block("0.0.0.0/0", &[])]), None));
    let d = c.compile();
    let cases = [
        ("v6 block: from z over IPv6", "z/a%6", "x/a%6", true),
        ("v6 block: y's /48 is excepted", "y/a%6", "x/a%6", false),
        ("v6 block does not match IPv4", "z/a", "x/a", false),
        ("::/0 matches every IPv6 pod", "y/b%6", "x/b%6", true),
        (
            "::/0 does not match IPv4 (IPv4-mapped in the trie)",
            "y/b",
            "x/b",
            false,
        ),
        (
            "::/0 does not match IPv4 external addresses",
            "8.8.8.8",
            "x/b",
            false,
        ),
        ("0.0.0.0/0 matches IPv4", "y/c", "x/c", true),
        ("0.0.0.0/0 does not match IPv6", "y/c%6", "x/c%6", false),
        ("0.0.0.0/0 external", "8.8.8.8", "x/c", true),
    ];
    for (case, from, to, want) in cases {
        expect(case, &c, &d, from, to, (TCP, 80), want);
    }

    // Without an IPv4 block, `0.0.0.0/0` is still inserted (WORLD) to shadow `::/0`.
    let c = e2e().policy(policy("x/all6", "pod=a").ingress(Some(vec![block("::/0", &[])]), None));
    let d = c.compile();
    expect("::/0 only: IPv6", &c, &d, "y/a%6", "x/a%6", T80, true);
    expect("::/0 only: IPv4 pod", &c, &d, "y/a", "x/a", T80, false);
    expect(
        "::/0 only: IPv4 external",
        &c,
        &d,
        "8.8.8.8",
        "x/a",
        T80,
        false,
    );
    assert_eq!(
        d.cidrs.get(&("0.0.0.0".parse().unwrap(), 0)),
        Some(&IDENTITY_WORLD),
        "IPv4 shadow entry"
    );
}

#[test]
fn host_addresses_and_unaddressed_pods() {
    let c = Cluster::new()
        .ns("x", "")
        .pod(pod("x/a", "pod=a", "10.0.0.1"))
        .pod(pod("x/pending", "pod=a", ""))
        .pod(pod("x/hostnet", "pod=a", NODE_IP).host_network())
        .policy(policy("x/deny", ""));
    let d = c.compile();
    assert_eq!(d.endpoints.len(), 2, "x/a and the node: {:?}", d.endpoints);
    assert_eq!(
        d.endpoints[&NODE_IP.parse().unwrap()],
        DesiredEndpoint {
            identity: IDENTITY_HOST,
            flags: 0
        },
        "the node's address has the host identity"
    );
    expect(
        "the node reaches an isolated local pod",
        &c,
        &d,
        NODE_IP,
        "x/a",
        (TCP, 80),
        true,
    );
    expect(
        "another address does not",
        &c,
        &d,
        "10.9.9.9",
        "x/a",
        (TCP, 80),
        false,
    );
}

#[test]
fn pods_on_other_nodes() {
    let c = Cluster::new()
        .ns("x", "")
        .ns("y", "")
        .pod(pod("x/a", "app=a", "10.0.0.1"))
        .pod(pod("x/a-remote", "app=a", "10.0.1.1").on("n2"))
        .pod(pod("x/b-remote", "app=b", "10.0.1.2").on("n2"))
        .pod(pod("y/c-remote", "app=c", "10.0.2.1").on("n3"))
        .policy(policy("x/a", "app=a").ingress(Some(vec![pods("app=b")]), None))
        .policy(policy("x/b", "app=b").ingress(
            Some(vec![pods("app=nothing"), block("172.16.0.0/12", &[])]),
            None,
        ))
        .policy(policy("y/c", "").types(true, true));
    let d = c.compile();
    let id = |ip: &str| d.endpoints[&ip.parse().unwrap()];
    assert_eq!(
        id("10.0.0.1").identity,
        id("10.0.1.1").identity,
        "replicas share an identity"
    );
    assert_eq!(
        id("10.0.0.1").flags,
        ENDPOINT_LOCAL | ENDPOINT_INGRESS_ISOLATED,
        "local pod: local and isolated"
    );
    assert_eq!(id("10.0.1.1").flags, 0, "remote replica: no flags");
    assert_eq!(id("10.0.1.2").flags, 0, "remote pod: no flags");
    let local = id("10.0.0.1").identity;
    assert!(
        d.policy.keys().all(|k| k.local == local),
        "entries only for the local identity: {:?}",
        d.policy
    );
    assert!(d.isolating.keys().all(|&(id, _)| id == local));
    assert!(!d.isolating.is_empty());
    assert!(
        d.cidrs.is_empty(),
        "no prefixes from policies without local pods: {:?}",
        d.cidrs
    );
    assert_eq!(
        d.rules.len(),
        1,
        "only rules of policies selecting local pods: {:?}",
        d.rules
    );
    let cases = [
        ("remote peer matched by selector", "x/b-remote", "x/a", true),
        ("remote pod not matched", "y/c-remote", "x/a", false),
        (
            "a remote server's ingress is not checked here",
            "x/a",
            "x/b-remote",
            true,
        ),
        (
            "remote to remote is not our business",
            "y/c-remote",
            "x/b-remote",
            true,
        ),
    ];
    for (case, from, to, want) in cases {
        expect(case, &c, &d, from, to, (TCP, 80), want);
    }
}

#[test]
fn relabel_pod_and_namespace() {
    let mut ids = Identities::default();
    let base = e2e().policy(
        policy("x/p", "pod=a").ingress(Some(vec![ns_pods("ns=y", "pod=b"), pods("pod=b")]), None),
    );
    let d0 = base.compile_with(&mut ids);
    let id = |d: &Desired, c: &Cluster, p: &str| d.endpoints[&addr(&c.state, p)].identity;
    expect(
        "before: y/b reaches x/a",
        &base,
        &d0,
        "y/b",
        "x/a",
        T80,
        true,
    );
    expect(
        "before: x/b reaches x/a",
        &base,
        &d0,
        "x/b",
        "x/a",
        T80,
        true,
    );

    // Relabel pod x/b.
    let mut c1 = base.clone();
    c1.state.pods.get_mut(&object("x/b")).unwrap().labels = labels("pod=bb");
    let d1 = c1.compile_with(&mut ids);
    expect(
        "relabelled pod: x/b no longer matches",
        &c1,
        &d1,
        "x/b",
        "x/a",
        T80,
        false,
    );
    expect(
        "relabelled pod: y/b still does",
        &c1,
        &d1,
        "y/b",
        "x/a",
        T80,
        true,
    );
    assert_ne!(
        id(&d0, &base, "x/b"),
        id(&d1, &c1, "x/b"),
        "x/b got a new identity"
    );
    for p in PODS.into_iter().filter(|&p| p != "x/b") {
        assert_eq!(id(&d0, &base, p), id(&d1, &c1, p), "{p} keeps its identity");
    }

    // Relabel namespace y.
    let mut c2 = c1.clone();
    c2.state
        .namespaces
        .get_mut("y")
        .unwrap()
        .labels
        .insert("ns".into(), "yy".into());
    let d2 = c2.compile_with(&mut ids);
    expect(
        "relabelled namespace: y/b no longer matches",
        &c2,
        &d2,
        "y/b",
        "x/a",
        T80,
        false,
    );
    for p in PODS {
        let changed = ns_of(p) == "y";
        assert_eq!(
            id(&d1, &c1, p) != id(&d2, &c2, p),
            changed,
            "{p}: identity changes iff its namespace was relabelled"
        );
    }

    // Undo: the state equals the first one again, the output is the same up to renumbering.
    let d3 = base.compile_with(&mut ids);
    expect(
        "relabelled back: y/b matches again",
        &base,
        &d3,
        "y/b",
        "x/a",
        T80,
        true,
    );
    expect(
        "relabelled back: x/b matches again",
        &base,
        &d3,
        "x/b",
        "x/a",
        T80,
        true,
    );
    assert_eq!(
        id(&d3, &base, "x/a"),
        id(&d0, &base, "x/a"),
        "x/a never changed"
    );
}

#[test]
fn identities_are_stable_and_grouped() {
    let c = e2e()
        .pod(pod("x/a2", "pod=a", "10.0.1.11").ports(serve_ports()))
        .pod(pod("x/a3", "pod=a", "10.0.1.12"));
    let mut ids = Identities::default();
    let d = c.compile_with(&mut ids);
    let id = |p: &str| d.endpoints[&addr(&c.state, p)].identity;
    assert_eq!(id("x/a"), id("x/a2"), "replicas share an identity");
    assert_ne!(
        id("x/a"),
        id("x/a3"),
        "different named ports: different identity"
    );
    assert_ne!(
        id("x/a"),
        id("y/a"),
        "different namespace: different identity"
    );
    assert_eq!(
        d.endpoints[&addr(&c.state, "x/a%6")].identity,
        id("x/a"),
        "every address of a pod"
    );
    assert_eq!(d.identities.len(), 10, "9 e2e identities plus x/a3");
    assert_eq!(
        *d.identities[&id("y/b")],
        IdentityKey {
            namespace: "y".into(),
            pod_labels: labels("pod=b"),
            namespace_labels: labels("ns=y,kubernetes.io/metadata.name=y"),
            named_ports: serve_ports(),
        }
    );

    // An unrelated change (a new pod, a policy) keeps every number.
    let c2 = c
        .clone()
        .pod(pod("w/new", "pod=new", "10.9.0.1"))
        .policy(policy("x/p", "").ingress(Some(vec![pods("pod=b")]), None));
    let d2 = c2.compile_with(&mut ids);
    for p in PODS {
        assert_eq!(
            d2.endpoints[&addr(&c2.state, p)].identity,
            id(p),
            "{p} keeps its number"
        );
    }
    assert_eq!(ids.pods.len(), 11);

    // Removing a pod's last replica releases its identity.
    let mut c3 = c2.clone();
    c3.state.pods.remove(&object("w/new"));
    let d3 = c3.compile_with(&mut ids);
    assert_eq!(d3.identities.len(), 10);
    assert_eq!(ids.pods.len(), 10, "the vanished key is forgotten");
}

#[test]
fn deterministic_output() {
    let c = e2e()
        .policy(policy("x/p", "pod=a").ingress(
            Some(vec![ns_pods("ns in (y,z)", "pod=b")]),
            Some(vec![tcp(80)]),
        ))
        .policy(policy("y/q", "").egress(Some(vec![block("10.0.0.0/16", &["10.0.1.0/24"])]), None))
        .policy(
            policy("z/r", "pod=c")
                .ingress(None, Some(vec![by_name(Protocol::Udp, "serve-81-udp")])),
        );
    let d1 = c.compile();
    let d2 = c.compile();
    assert_eq!(d1, d2, "two fresh histories give the same output");
    let mut ids = Identities::default();
    let d3 = c.compile_with(&mut ids);
    let d4 = c.compile_with(&mut ids);
    assert_eq!(d3, d4, "compiling again changes nothing");
    assert_eq!(d1, d3);
    // The same state built in another order (maps are keyed, so this is the same value).
    let mut shuffled = Cluster::new();
    for (_, p) in c.state.pods.iter().rev() {
        shuffled = shuffled.pod(p.clone());
    }
    shuffled.state.namespaces = c.state.namespaces.clone();
    shuffled.state.policies = c.state.policies.clone();
    assert_eq!(shuffled.compile(), d1, "insertion order does not matter");
}

#[test]
fn rules_cookies_and_isolating() {
    let c = e2e()
        .policy(
            policy("x/p", "pod=a")
                .ingress(Some(vec![pods("pod=b")]), Some(vec![tcp(80)]))
                // The same entry again, from a later rule.
                .ingress(
                    Some(vec![pods("pod=b"), pods("pod=c")]),
                    Some(vec![tcp(80)]),
                ),
        )
        .policy(policy("x/q", "pod in (a,b)").types(true, true));
    let d = c.compile();
    let rule = |policy: &str, direction, index| RuleRef {
        policy: object(policy),
        direction,
        index,
    };
    assert_eq!(
        d.rules,
        BTreeMap::from([
            (1, rule("x/p", Direction::Ingress, 0)),
            (2, rule("x/p", Direction::Ingress, 1)),
        ]),
        "cookies from 1, in policy and rule order"
    );
    let id = |p: &str| d.endpoints[&addr(&c.state, p)].identity;
    let entry = |remote| super::PolicyEntryKey {
        local: id("x/a"),
        remote,
        direction: Direction::Ingress,
        ports: PortMatch::Range {
            protocol: TCP,
            port: 80,
            end_port: 80,
        },
    };
    assert_eq!(
        d.policy[&entry(id("x/b"))],
        1,
        "two rules: the smallest cookie"
    );
    assert_eq!(d.policy[&entry(id("x/c"))], 2, "only the second rule");
    assert_eq!(d.policy.len(), 2);
    let isolating = |p: &str, dir| d.isolating.get(&(id(p), dir)).cloned().unwrap_or_default();
    assert_eq!(
        isolating("x/a", Direction::Ingress),
        BTreeSet::from([object("x/p"), object("x/q")])
    );
    assert_eq!(
        isolating("x/a", Direction::Egress),
        BTreeSet::from([object("x/q")]),
        "x/p isolates ingress only"
    );
    assert_eq!(
        isolating("x/b", Direction::Ingress),
        BTreeSet::from([object("x/q")])
    );
    assert!(isolating("x/c", Direction::Ingress).is_empty());
    assert!(isolating("x/c", Direction::Egress).is_empty());
    assert_eq!(
        d.endpoints[&addr(&c.state, "x/b")].flags,
        ENDPOINT_LOCAL | ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED
    );
    assert_eq!(d.endpoints[&addr(&c.state, "x/c")].flags, ENDPOINT_LOCAL);
}

#[test]
fn protocols_without_ports() {
    let c = e2e()
        .policy(policy("x/all", "pod=a").ingress(Some(vec![pods("pod=b")]), None))
        .policy(policy("x/tcp", "pod=b").ingress(None, Some(vec![every_port(Protocol::Tcp)])))
        .policy(policy("x/sctp", "pod=c").ingress(None, Some(vec![port(Protocol::Sctp, 80)])));
    let d = c.compile();
    let cases = [
        ("no ports: ICMP allowed", "x/b", "x/a", (ICMP, 0), true),
        ("no ports: SCTP allowed", "x/b", "x/a", (SCTP, 5000), true),
        ("TCP only: ICMP denied", "x/a", "x/b", (ICMP, 0), false),
        ("TCP only: any TCP port", "x/a", "x/b", (TCP, 65535), true),
        ("SCTP 80", "x/a", "x/c", (SCTP, 80), true),
        ("SCTP 80 is not TCP 80", "x/a", "x/c", (TCP, 80), false),
    ];
    for (case, from, to, probe, want) in cases {
        expect(case, &c, &d, from, to, probe, want);
    }
}

#[test]
fn edge_cases() {
    // A namespace the state lacks: labelled with its name, as the API server does.
    let c = Cluster::new()
        .ns("x", "")
        .pod(pod("x/a", "pod=a", "10.0.0.1"))
        .pod(pod("ghost/g", "pod=g", "10.0.0.2"))
        .policy(policy("x/p", "pod=a").ingress(
            Some(vec![ns_pods("kubernetes.io/metadata.name=ghost", "")]),
            None,
        ));
    let d = c.compile();
    expect(
        "namespace without object",
        &c,
        &d,
        "ghost/g",
        "x/a",
        T80,
        true,
    );

    // Explicitly empty lists behave like absent ones (all peers, all ports).
    let c = e2e().policy(policy("x/p", "pod=a").ingress(Some(vec![]), Some(vec![])));
    let d = c.compile();
    matrix("empty from and ports lists", &c, &d, U81, |_, _| true);

    // An address claimed twice (a stale status): the local pod wins.
    let c = Cluster::new()
        .ns("x", "")
        .pod(pod("x/a-old", "pod=old", "10.0.0.1").on("n2"))
        .pod(pod("x/b-new", "pod=new", "10.0.0.1"));
    let d = c.compile();
    assert_eq!(
        d.endpoints[&"10.0.0.1".parse().unwrap()].flags,
        ENDPOINT_LOCAL,
        "duplicate address: the local pod"
    );

    // Every pod local when the agent has no node name (manifests mode without --node-name).
    let mut c = e2e().policy(policy("x/deny", ""));
    c.state.node = None;
    let d = c.compile();
    let local = d
        .endpoints
        .values()
        .filter(|e| e.flags & ENDPOINT_LOCAL != 0)
        .count();
    assert_eq!(local, 18, "every pod address is local");
}

#[test]
fn audit_namespaces_flag_their_local_endpoints() {
    let mut c = e2e().policy(policy("x/p", "pod=a").ingress(None, None));
    c.state
        .namespaces
        .get_mut("x")
        .expect("e2e has namespace x")
        .audit = true;
    let d = c.compile();
    for p in ["x/a", "x/b"] {
        let flags = d.endpoints[&addr(&c.state, p)].flags;
        assert_ne!(flags & ENDPOINT_AUDIT, 0, "{p} is in an audit namespace");
    }
    let flags = d.endpoints[&addr(&c.state, "x/a")].flags;
    assert_ne!(
        flags & ENDPOINT_INGRESS_ISOLATED,
        0,
        "audit keeps isolation"
    );
    assert_eq!(
        d.endpoints[&addr(&c.state, "y/a")].flags & ENDPOINT_AUDIT,
        0,
        "y is enforced"
    );
}

#[test]
fn cidr_identities_name_their_blocks() {
    let c = e2e().policy(policy("x/p", "pod=a").types(false, true).egress(
        Some(vec![
            block("10.0.0.0/8", &["10.1.0.0/16"]),
            block("10.1.2.0/24", &[]),
        ]),
        None,
    ));
    let d = c.compile();
    let id_of = |ip: &str| lpm(&d, ip.parse().expect("address"));
    let names = |id: u32| -> Vec<String> {
        d.cidr_blocks[&id]
            .iter()
            .map(|b| {
                let except: Vec<String> = b.except.iter().map(|e| e.to_string()).collect();
                format!("{} except {:?}", b.cidr, except)
            })
            .collect()
    };
    let outer = id_of("10.2.0.1").expect("in 10/8");
    assert_eq!(names(outer), ["10.0.0.0/8 except [\"10.1.0.0/16\"]"]);
    let inner = id_of("10.1.2.3").expect("in 10.1.2/24");
    assert_eq!(names(inner), ["10.1.2.0/24 except []"]);
    let hole = id_of("10.1.3.1").expect("in the except");
    assert!(
        !d.cidr_blocks.contains_key(&hole),
        "an except outside every block is WORLD"
    );
    for id in d.cidr_blocks.keys() {
        assert!(d.cidrs.values().any(|v| v == id), "{id} is used");
    }
}

/// A restarted agent numbers identities as the maps its predecessor wrote do, whatever order the
/// predecessor learned them in; identities that changed while no agent ran get numbers the maps
/// do not hold.
#[test]
fn a_restarted_agent_keeps_the_numbers_in_the_maps() {
    let policies = vec![
        policy("x/p", "pod=a").ingress(Some(vec![block("10.0.0.0/16", &["10.0.2.0/24"])]), None),
        policy("y/q", "pod=b").ingress(Some(vec![block("10.0.3.0/24", &[])]), None),
    ];
    let full = e2e().policies(policies.clone());
    // The predecessor saw namespace z and the second policy first, then the rest.
    let mut early = e2e().policy(policies[1].clone());
    early.state.pods.retain(|r, _| r.namespace == "z");
    let mut history = Identities::default();
    early.compile_with(&mut history);
    let held = full.compile_with(&mut history);
    assert_ne!(
        held.endpoints,
        full.compile().endpoints,
        "the history must number differently than a fresh start, or this test checks nothing"
    );
    let endpoints: BTreeMap<IpAddr, u32> = held
        .endpoints
        .iter()
        .map(|(ip, e)| (*ip, e.identity))
        .collect();

    let mut adopted = Identities::adopt(&full.state, &full.state.node_ips, &endpoints, &held.cidrs);
    let again = full.compile_with(&mut adopted);
    assert_eq!(again.endpoints, held.endpoints);
    assert_eq!(again.cidrs, held.cidrs);
    assert_eq!(again.identities, held.identities);
    let entries = |d: &Desired| d.policy.keys().copied().collect::<BTreeSet<_>>();
    assert_eq!(entries(&again), entries(&held), "the same policy entries");

    // While no agent ran, x/b was relabelled, and x/c got y/c's labels in namespace y's place
    // (a new pod there): x/b alone held its number and keeps it (its one identity changed, as a
    // relabel changes it: the policy entries follow); the new y/d shares y/c's key and number.
    let mut changed = full.clone();
    for (r, p) in changed.state.pods.iter_mut() {
        if r.namespace == "x" && r.name == "b" {
            p.labels = labels("pod=new");
        }
    }
    changed = changed.pod(pod("y/d", "pod=c", "10.0.2.4").ports(serve_ports()));
    let mut adopted = Identities::adopt(
        &changed.state,
        &changed.state.node_ips,
        &endpoints,
        &held.cidrs,
    );
    let after = changed.compile_with(&mut adopted);
    let ip_b = addr(&full.state, "x/b");
    assert_eq!(
        after.endpoints[&ip_b].identity,
        held.endpoints[&ip_b].identity
    );
    let ip_yc = addr(&full.state, "y/c");
    assert_eq!(
        after.endpoints[&addr(&changed.state, "y/d")].identity,
        held.endpoints[&ip_yc].identity
    );
    for who in ["x/a", "y/b", "z/c"] {
        let ip = addr(&full.state, who);
        assert_eq!(
            after.endpoints[&ip], held.endpoints[&ip],
            "{who} keeps its number"
        );
    }

    // A new identity never takes a number the maps hold: x/b's old number stays with the
    // replica that kept the old labels, the relabelled replica gets a fresh one.
    let twins = full
        .clone()
        .pod(pod("x/b2", "pod=b", "10.0.1.5").ports(serve_ports()));
    let mut history = Identities::default();
    let held = twins.compile_with(&mut history);
    let endpoints: BTreeMap<IpAddr, u32> = held
        .endpoints
        .iter()
        .map(|(ip, e)| (*ip, e.identity))
        .collect();
    let mut split = twins.clone();
    for (r, p) in split.state.pods.iter_mut() {
        if r.namespace == "x" && r.name == "b2" {
            p.labels = labels("pod=new");
        }
    }
    // Two addresses each (v4 and v6) for x/b, one for x/b2: the old labels win the number.
    let mut adopted =
        Identities::adopt(&split.state, &split.state.node_ips, &endpoints, &held.cidrs);
    let after = split.compile_with(&mut adopted);
    let ip_b2 = addr(&split.state, "x/b2");
    let max_held = endpoints.values().max().copied().unwrap();
    assert!(after.endpoints[&ip_b2].identity > max_held, "fresh number");
    assert_eq!(after.endpoints[&ip_b], held.endpoints[&ip_b]);
}
