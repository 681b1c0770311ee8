//! Conversion of Kubernetes API objects (k8s-openapi types) into the model, with the API server's
//! defaulting and validation of every field the model uses. Every source goes through here: the
//! manifests directory and the Kubernetes watch.
//!
//! What is checked and how it is defaulted follows the API server (`pkg/apis/core/validation`,
//! `pkg/apis/networking/validation`, the `v1` defaulting and conversion functions), with these
//! deliberate differences:
//! - IP addresses and CIDRs with leading zeros in an IPv4 octet (`010.0.0.1`) and IPv4-mapped IPv6
//!   addresses (`::ffff:10.0.0.1`) are rejected: the API server still accepts them with a warning
//!   ("will be considered invalid in a future Kubernetes release"), and both are ambiguous (octal;
//!   IPv4 or IPv6), which a policy enforcer must not guess at. These are the `StrictIPCIDRValidation`
//!   rules.
//! - An ipBlock `cidr` or `except` with host bits set (`10.0.0.1/24`) is accepted, as the API
//!   server does, and normalized to its network (`10.0.0.0/24`), as the API server's own
//!   implementation (`ParseCIDRSloppy`) interprets it.
//! - A named port declared by two containers of one pod with different numbers or protocols is
//!   rejected (the API only rejects duplicates within one container): a name must mean one port.
//!   The same name declared twice with the same number and protocol counts once.
//!
//! Fields the model does not use (images, resources, ...) are not validated.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{core::v1 as core, networking::v1 as networking},
    apimachinery::pkg::{apis::meta::v1 as meta, util::intstr::IntOrString},
};

use super::{
    ENFORCEMENT_ANNOTATION, LabelSelector, Labels, NAMESPACE_NAME_LABEL, NamedPort, Namespace,
    NetworkPolicy, Operator, Peer, Pod, PolicyPort, PortRef, Protocol, Requirement, Rule,
};

/// The kinds of API object the model is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy];

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }

    /// The `apiVersion` objects of this kind are read in.
    pub const fn api_version(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Pod => "v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
        }
    }

    pub fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    /// Namespaces are cluster-scoped; the others live in a namespace.
    pub const fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One invalid field: its path in the API object (`spec.ingress[0].from[1].ipBlock.except[0]`)
/// and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// An object that failed validation, with every invalid field (like the API server, all of
/// them, not just the first).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConvertError {
    pub kind: Kind,
    /// `None` for cluster-scoped objects (Namespaces).
    pub namespace: Option<String>,
    /// Empty when the object has no name.
    pub name: String,
    /// Never empty.
    pub errors: Vec<FieldError>,
}

impl ConvertError {
    /// `namespace/name`, or `name` for Namespaces.
    pub fn object(&self) -> String {
        let name = if self.name.is_empty() {
            "<unnamed>"
        } else {
            &self.name
        };
        match &self.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: ", self.kind, self.object())?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A field path under construction.
#[derive(Clone, Debug)]
struct Path(String);

impl Path {
    fn root(name: &str) -> Path {
        Path(name.to_string())
    }

    fn child(&self, name: &str) -> Path {
        Path(format!("{}.{name}", self.0))
    }

    fn index(&self, i: usize) -> Path {
        Path(format!("{}[{i}]", self.0))
    }

    fn key(&self, key: &str) -> Path {
        Path(format!("{}[{key}]", self.0))
    }
}

/// Collects the field errors of one object.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: &Path, message: impl Into<String>) {
        self.0.push(FieldError {
            field: path.0.clone(),
            message: message.into(),
        });
    }

    fn finish<T>(self, meta: &meta::ObjectMeta, kind: Kind, value: T) -> Result<T, ConvertError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConvertError {
                kind,
                namespace: kind
                    .is_namespaced()
                    .then(|| meta.namespace.clone().unwrap_or_default()),
                name: meta.name.clone().unwrap_or_default(),
                errors: self.0,
            })
        }
    }
}

/// A Namespace. `kubernetes.io/metadata.name` is set to the name, overwriting any other value, as
/// the API server does.
pub fn namespace(ns: &core::Namespace) -> Result<Namespace, ConvertError> {
    let mut errs = Errors::default();
    let meta = &ns.metadata;
    let name = object_name(meta, is_dns1123_label, DNS1123_LABEL_MSG, &mut errs);
    let mut labels = object_labels(meta, &mut errs);
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
    let audit = enforcement(meta, &mut errs);
    errs.finish(
        meta,
        Kind::Namespace,
        Namespace {
            name,
            labels,
            audit,
        },
    )
}

/// The namespace's [`ENFORCEMENT_ANNOTATION`]: `audit` -> true; `enforce` or absent -> false.
fn enforcement(meta: &meta::ObjectMeta, errs: &mut Errors) -> bool {
    let value = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ENFORCEMENT_ANNOTATION));
    match value.map(String::as_str) {
        None | Some("enforce") => false,
        Some("audit") => true,
        Some(other) => {
            errs.add(
                &Path::root("metadata")
                    .child("annotations")
                    .key(ENFORCEMENT_ANNOTATION),
                format!("invalid value {other:?}: must be \"enforce\" or \"audit\""),
            );
            false
        }
    }
}

/// A Pod: addresses from `status.podIPs`/`status.podIP`, node from `spec.nodeName`,
/// `spec.hostNetwork`, and the named ports of every container (and of every sidecar, an init
/// container with `restartPolicy: Always`, as the endpoints controller does).
///
/// A pod in phase `Succeeded` or `Failed` has no addresses.
///
/// When `status.podIP` is set and differs from `status.podIPs[0]` (or `podIPs` is empty),
/// `podIP` is authoritative and the only address, as in the API server's v1 conversion.
pub fn pod(pod: &core::Pod) -> Result<Pod, ConvertError> {
    let mut errs = Errors::default();
    let meta = &pod.metadata;
    let name = object_name(meta, is_dns1123_subdomain, DNS1123_SUBDOMAIN_MSG, &mut errs);
    let namespace = object_namespace(meta, &mut errs);
    let labels = object_labels(meta, &mut errs);

    let spec = pod.spec.as_ref();
    let node = spec
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty());
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let named_ports = spec.map(|s| named_ports(s, &mut errs)).unwrap_or_default();
    let mut ips = pod
        .status
        .as_ref()
        .map(|s| pod_ips(s, &mut errs))
        .unwrap_or_default();
    // A pod that ran to completion has released its address, which may already be another
    // pod's (the kubelet reports it until the pod is deleted): it is no endpoint.
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        ips.clear();
    }

    errs.finish(
        meta,
        Kind::Pod,
        Pod {
            namespace,
            name,
            labels,
            node,
            ips,
            named_ports,
            host_network,
        },
    )
}

fn named_ports(spec: &core::PodSpec, errs: &mut Errors) -> Vec<NamedPort> {
    let spec_path = Path::root("spec");
    let containers = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (spec_path.child("containers").index(i), c));
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
        .map(|(i, c)| (spec_path.child("initContainers").index(i), c));

    // Name -> (port, protocol, where it was first declared).
    let mut seen: HashMap<String, (u16, Protocol, Path)> = HashMap::new();
    let mut ports = Vec::new();
    for (container_path, container) in containers.chain(sidecars) {
        let mut in_container = HashSet::new();
        for (j, port) in container.ports.iter().flatten().enumerate() {
            let path = container_path.child("ports").index(j);
            let number = match port.container_port {
                0 => {
                    errs.add(&path.child("containerPort"), "Required value");
                    None
                }
                n => valid_port_number(n, &path.child("containerPort"), errs),
            };
            let protocol = protocol(port.protocol.as_deref(), &path.child("protocol"), errs);
            let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let name_path = path.child("name");
            if let Some(msg) = port_name_error(name) {
                errs.add(&name_path, format!("invalid value {name:?}: {msg}"));
                continue;
            }
            if !in_container.insert(name) {
                errs.add(&name_path, format!("duplicate value {name:?}"));
                continue;
            }
            let (Some(number), Some(protocol)) = (number, protocol) else {
                continue;
            };
            match seen.get(name) {
                Some((n, p, _)) if *n == number && *p == protocol => {}
                Some((n, p, first)) => errs.add(
                    &name_path,
                    format!(
                        "duplicate value {name:?}: declared as {number}/{} here and as {n}/{} at \
                         {}; a port name must refer to one port of the pod",
                        protocol_name(protocol),
                        protocol_name(*p),
                        first.0
                    ),
                ),
                None => {
                    seen.insert(name.to_string(), (number, protocol, path.clone()));
                    ports.push(NamedPort {
                        name: name.to_string(),
                        port: number,
                        protocol,
                    });
                }
            }
        }
    }
    ports.sort();
    ports
}

fn pod_ips(status: &core::PodStatus, errs: &mut Errors) -> Vec<IpAddr> {
    let status_path = Path::root("status");
    let pod_ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty());
    let pod_ips: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    // v1 -> internal conversion: podIP is authoritative when the two disagree.
    if let Some(ip) = pod_ip
        && pod_ips.first() != Some(&ip)
    {
        return parse_ip(ip, &status_path.child("podIP"), errs)
            .into_iter()
            .collect();
    }
    let list_path = status_path.child("podIPs");
    let mut ips: Vec<IpAddr> = Vec::new();
    for (i, ip) in pod_ips.iter().enumerate() {
        let path = list_path.index(i).child("ip");
        let Some(ip) = parse_ip(ip, &path, errs) else {
            continue;
        };
        if ips.contains(&ip) {
            errs.add(&list_path.index(i), format!("duplicate value {ip}"));
            continue;
        }
        ips.push(ip);
    }
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
    if v4 > 1 || ips.len() - v4 > 1 {
        errs.add(
            &list_path,
            "may specify no more than one IP for each IP family",
        );
    }
    ips
}

/// A NetworkPolicy, with `policyTypes` defaulted as the API server does: when absent or empty,
/// Ingress, plus Egress when `spec.egress` is non-empty. An explicit list is honoured: rules of
/// a direction it does not name are kept in the model but do not apply.
pub fn network_policy(np: &networking::NetworkPolicy) -> Result<NetworkPolicy, ConvertError> {
    let mut errs = Errors::default();
    let meta = &np.metadata;
    let name = object_name(meta, is_dns1123_subdomain, DNS1123_SUBDOMAIN_MSG, &mut errs);
    let namespace = object_namespace(meta, &mut errs);
    let default_spec = networking::NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let spec_path = Path::root("spec");

    let pod_selector = spec
        .pod_selector
        .as_ref()
        .map(|s| label_selector(s, &spec_path.child("podSelector"), &mut errs))
        .unwrap_or_default();

    let ingress: Vec<Rule> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let path = spec_path.child("ingress").index(i);
            rule(
                r.from.as_deref(),
                "from",
                r.ports.as_deref(),
                &path,
                &mut errs,
            )
        })
        .collect();
    let egress: Vec<Rule> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let path = spec_path.child("egress").index(i);
            rule(r.to.as_deref(), "to", r.ports.as_deref(), &path, &mut errs)
        })
        .collect();

    let (ingress_isolation, egress_isolation) = match spec.policy_types.as_deref() {
        None | Some([]) => (true, !egress.is_empty()),
        Some(types) => {
            let path = spec_path.child("policyTypes");
            if types.len() > 2 {
                errs.add(&path, "may not specify more than two policyTypes");
            }
            let (mut ingress, mut egress) = (false, false);
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => errs.add(
                        &path.index(i),
                        format!(
                            "unsupported value {other:?}: supported values: \"Ingress\", \"Egress\""
                        ),
                    ),
                }
            }
            (ingress, egress)
        }
    };

    errs.finish(
        meta,
        Kind::NetworkPolicy,
        NetworkPolicy {
            namespace,
            name,
            pod_selector,
            ingress_isolation,
            egress_isolation,
            ingress,
            egress,
        },
    )
}

fn rule(
    peers: Option<&[networking::NetworkPolicyPeer]>,
    peers_field: &str,
    ports: Option<&[networking::NetworkPolicyPort]>,
    path: &Path,
    errs: &mut Errors,
) -> Rule {
    let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
        peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| peer(p, &path.child(peers_field).index(i), errs))
            .collect()
    });
    let ports = ports.filter(|p| !p.is_empty()).map(|ports| {
        ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| policy_port(p, &path.child("ports").index(i), errs))
            .collect()
    });
    Rule { peers, ports }
}

fn peer(peer: &networking::NetworkPolicyPeer, path: &Path, errs: &mut Errors) -> Option<Peer> {
    let pods = peer
        .pod_selector
        .as_ref()
        .map(|s| label_selector(s, &path.child("podSelector"), errs));
    let namespaces = peer
        .namespace_selector
        .as_ref()
        .map(|s| label_selector(s, &path.child("namespaceSelector"), errs));
    match &peer.ip_block {
        Some(_) if pods.is_some() || namespaces.is_some() => {
            errs.add(path, "may not specify both ipBlock and another peer");
            None
        }
        Some(block) => ip_block(block, &path.child("ipBlock"), errs),
        None if pods.is_none() && namespaces.is_none() => {
            errs.add(
                path,
                "must specify a peer (podSelector, namespaceSelector or ipBlock)",
            );
            None
        }
        None => Some(Peer::Pods {
            namespaces,
            pods: pods.unwrap_or_default(),
        }),
    }
}

fn ip_block(block: &networking::IPBlock, path: &Path, errs: &mut Errors) -> Option<Peer> {
    let cidr_path = path.child("cidr");
    if block.cidr.is_empty() {
        errs.add(&cidr_path, "Required value");
        return None;
    }
    let cidr = parse_cidr(&block.cidr, &cidr_path, errs)?;
    let mut except = Vec::new();
    for (i, e) in block.except.iter().flatten().enumerate() {
        let path = path.child("except").index(i);
        let Some(net) = parse_cidr(e, &path, errs) else {
            continue;
        };
        if !cidr.contains(&net.network()) || net.prefix_len() <= cidr.prefix_len() {
            errs.add(
                &path,
                format!("invalid value {e:?}: must be a strict subset of `cidr` ({cidr})"),
            );
            continue;
        }
        except.push(net);
    }
    Some(Peer::IpBlock { cidr, except })
}

fn policy_port(
    port: &networking::NetworkPolicyPort,
    path: &Path,
    errs: &mut Errors,
) -> Option<PolicyPort> {
    let protocol = protocol(port.protocol.as_deref(), &path.child("protocol"), errs);
    let end_path = path.child("endPort");
    let (port_ref, end_port) = match &port.port {
        Some(IntOrString::Int(n)) => {
            let number = valid_port_number(*n, &path.child("port"), errs);
            let end = port.end_port.and_then(|end| {
                let end_number = valid_port_number(end, &end_path, errs);
                if end < *n {
                    errs.add(
                        &end_path,
                        format!(
                            "invalid value {end}: must be greater than or equal to `port` ({n})"
                        ),
                    );
                    return None;
                }
                end_number
            });
            (number.map(PortRef::Number), end)
        }
        Some(IntOrString::String(name)) => {
            if let Some(end) = port.end_port {
                errs.add(
                    &end_path,
                    format!("invalid value {end}: may not be specified when `port` is non-numeric"),
                );
            }
            let name = match port_name_error(name) {
                Some(msg) => {
                    errs.add(
                        &path.child("port"),
                        format!("invalid value {name:?}: {msg}"),
                    );
                    None
                }
                None => Some(PortRef::Name(name.clone())),
            };
            (name, None)
        }
        None => {
            if let Some(end) = port.end_port {
                errs.add(
                    &end_path,
                    format!(
                        "invalid value {end}: may not be specified when `port` is not specified"
                    ),
                );
            }
            return protocol.map(|protocol| PolicyPort {
                protocol,
                port: None,
                end_port: None,
            });
        }
    };
    Some(PolicyPort {
        protocol: protocol?,
        port: Some(port_ref?),
        end_port,
    })
}

fn label_selector(selector: &meta::LabelSelector, path: &Path, errs: &mut Errors) -> LabelSelector {
    let match_labels = labels(
        selector.match_labels.as_ref(),
        &path.child("matchLabels"),
        errs,
    );
    let mut match_expressions = Vec::new();
    for (i, req) in selector.match_expressions.iter().flatten().enumerate() {
        let path = path.child("matchExpressions").index(i);
        if let Some(msg) = qualified_name_error(&req.key) {
            errs.add(
                &path.child("key"),
                format!("invalid value {:?}: {msg}", req.key),
            );
        }
        let values = req.values.clone().unwrap_or_default();
        let values_path = path.child("values");
        let operator = match req.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                errs.add(
                    &path.child("operator"),
                    format!(
                        "unsupported value {other:?}: supported values: \"In\", \"NotIn\", \
                         \"Exists\", \"DoesNotExist\""
                    ),
                );
                continue;
            }
        };
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => errs.add(
                &values_path,
                "must be specified when `operator` is 'In' or 'NotIn'",
            ),
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => errs.add(
                &values_path,
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            ),
            _ => {}
        }
        for (j, v) in values.iter().enumerate() {
            if let Some(msg) = label_value_error(v) {
                errs.add(&values_path.index(j), format!("invalid value {v:?}: {msg}"));
            }
        }
        match_expressions.push(Requirement {
            key: req.key.clone(),
            operator,
            values,
        });
    }
    LabelSelector {
        match_labels,
        match_expressions,
    }
}

fn object_name(
    meta: &meta::ObjectMeta,
    valid: fn(&str) -> bool,
    rule: &str,
    errs: &mut Errors,
) -> String {
    let path = Path::root("metadata").child("name");
    match meta.name.as_deref() {
        None | Some("") => errs.add(&path, "Required value: name is required"),
        Some(name) if !valid(name) => errs.add(&path, format!("invalid value {name:?}: {rule}")),
        Some(_) => {}
    }
    meta.name.clone().unwrap_or_default()
}

fn object_namespace(meta: &meta::ObjectMeta, errs: &mut Errors) -> String {
    let path = Path::root("metadata").child("namespace");
    match meta.namespace.as_deref() {
        None | Some("") => errs.add(&path, "Required value"),
        Some(ns) if !is_dns1123_label(ns) => {
            errs.add(&path, format!("invalid value {ns:?}: {DNS1123_LABEL_MSG}"))
        }
        Some(_) => {}
    }
    meta.namespace.clone().unwrap_or_default()
}

fn object_labels(meta: &meta::ObjectMeta, errs: &mut Errors) -> Labels {
    labels(
        meta.labels.as_ref(),
        &Path::root("metadata").child("labels"),
        errs,
    )
}

fn labels(labels: Option<&BTreeMap<String, String>>, path: &Path, errs: &mut Errors) -> Labels {
    let Some(labels) = labels else {
        return Labels::new();
    };
    for (k, v) in labels {
        if let Some(msg) = qualified_name_error(k) {
            errs.add(path, format!("invalid label key {k:?}: {msg}"));
        }
        if let Some(msg) = label_value_error(v) {
            errs.add(&path.key(k), format!("invalid value {v:?}: {msg}"));
        }
    }
    labels.clone()
}

fn protocol(protocol: Option<&str>, path: &Path, errs: &mut Errors) -> Option<Protocol> {
    match protocol {
        None | Some("TCP") => Some(Protocol::Tcp),
        Some("UDP") => Some(Protocol::Udp),
        Some("SCTP") => Some(Protocol::Sctp),
        Some(other) => {
            errs.add(
                path,
                format!(
                    "unsupported value {other:?}: supported values: \"SCTP\", \"TCP\", \"UDP\""
                ),
            );
            None
        }
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

fn valid_port_number(n: i32, path: &Path, errs: &mut Errors) -> Option<u16> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            errs.add(
                path,
                format!("invalid value {n}: must be between 1 and 65535, inclusive"),
            );
            None
        }
    }
}

fn parse_ip(s: &str, path: &Path, errs: &mut Errors) -> Option<IpAddr> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => {
            errs.add(
                path,
                format!("invalid value {s:?}: must not be an IPv4-mapped IPv6 address"),
            );
            None
        }
        Ok(ip) => Some(ip),
        Err(_) => {
            errs.add(
                path,
                format!(
                    "invalid value {s:?}: must be a valid IP address without leading zeros \
                     (e.g. 10.9.8.7 or 2001:db8::ffff)"
                ),
            );
            None
        }
    }
}

/// A CIDR, normalized to its network (host bits cleared).
fn parse_cidr(s: &str, path: &Path, errs: &mut Errors) -> Option<IpNet> {
    match s.parse::<IpNet>() {
        Ok(IpNet::V6(v6)) if v6.addr().to_ipv4_mapped().is_some() => {
            errs.add(
                path,
                format!("invalid value {s:?}: must not have an IPv4-mapped IPv6 address"),
            );
            None
        }
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            errs.add(
                path,
                format!(
                    "invalid value {s:?}: must be a valid CIDR value without leading zeros \
                     (e.g. 10.9.8.0/24 or 2001:db8::/64)"
                ),
            );
            None
        }
    }
}

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case \
    alphanumeric characters or '-', start and end with an alphanumeric character, and be at most \
    63 characters";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
    alphanumeric characters, '-' or '.', must start and end with an alphanumeric character, and \
    be at most 253 characters";

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// `IsValidPortName`: an IANA_SVC_NAME.
fn port_name_error(name: &str) -> Option<&'static str> {
    if name.len() > 15 {
        Some("must be no more than 15 characters")
    } else if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        Some("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    } else if !name.bytes().any(|c| c.is_ascii_lowercase()) {
        Some("must contain at least one letter (a-z)")
    } else if name.contains("--") {
        Some("must not contain consecutive hyphens")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("must not begin or end with a hyphen")
    } else {
        None
    }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63 characters (empty allowed: callers
/// decide).
fn is_label_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric)
}

/// `IsQualifiedName`: a label key (`[prefix/]name`).
fn qualified_name_error(key: &str) -> Option<&'static str> {
    const MSG: &str = "must be a qualified name: an optional DNS subdomain prefix and '/' \
        (e.g. 'example.com/MyName') and a name of at most 63 alphanumeric characters, '-', '_' \
        or '.', starting and ending with an alphanumeric character";
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(is_dns1123_subdomain);
    (name.is_empty() || name.contains('/') || !is_label_name_part(name) || !prefix_ok)
        .then_some(MSG)
}

/// `IsValidLabelValue`.
fn label_value_error(value: &str) -> Option<&'static str> {
    (!is_label_name_part(value)).then_some(
        "a valid label value must be an empty string or at most 63 alphanumeric characters, \
         '-', '_' or '.', starting and ending with an alphanumeric character",
    )
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use serde_json::{Value, json};

    use super::*;

    fn ns(v: Value) -> Result<Namespace, ConvertError> {
        namespace(&serde_json::from_value(v).unwrap())
    }

    fn pod_of(v: Value) -> Result<Pod, ConvertError> {
        pod(&serde_json::from_value(v).unwrap())
    }

    fn np_spec(spec: Value) -> Result<NetworkPolicy, ConvertError> {
        network_policy(
            &serde_json::from_value(json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "np", "namespace": "ns"},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    fn pod_spec(spec: Value, status: Value) -> Result<Pod, ConvertError> {
        pod_of(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "a"}},
            "spec": spec,
            "status": status,
        }))
    }

    /// Asserts the error names the object and exactly this field, with a message containing
    /// `msg`.
    #[track_caller]
    fn assert_err<T: fmt::Debug>(r: Result<T, ConvertError>, object: &str, field: &str, msg: &str) {
        let e = r.expect_err("expected a validation error");
        let text = e.to_string();
        assert!(
            text.starts_with(object),
            "{text:?} does not start with {object:?}"
        );
        assert!(
            e.errors
                .iter()
                .any(|f| f.field == field && f.message.contains(msg)),
            "{text:?} has no error for field {field:?} containing {msg:?}"
        );
        assert!(text.contains(&format!("{field}: ")), "{text}");
    }

    fn ingress_port(port: Value) -> Result<NetworkPolicy, ConvertError> {
        np_spec(json!({"ingress": [{"ports": [port]}]}))
    }

    fn ingress_peer(peer: Value) -> Result<NetworkPolicy, ConvertError> {
        np_spec(json!({"ingress": [{"from": [{"podSelector": {}}, peer]}]}))
    }

    // ---- Namespace ----

    #[test]
    fn namespace_gets_its_name_label() {
        let n = ns(json!({"metadata": {"name": "prod", "labels": {"team": "a"}}})).unwrap();
        assert_eq!(n.name, "prod");
        assert_eq!(n.labels.get(NAMESPACE_NAME_LABEL).unwrap(), "prod");
        assert_eq!(n.labels.get("team").unwrap(), "a");
    }

    #[test]
    fn namespace_name_label_is_overwritten() {
        let n =
            ns(json!({"metadata": {"name": "prod", "labels": {NAMESPACE_NAME_LABEL: "other"}}}))
                .unwrap();
        assert_eq!(n.labels.get(NAMESPACE_NAME_LABEL).unwrap(), "prod");
    }

    #[test]
    fn namespace_enforcement_annotation() {
        let with = |value: &str| {
            ns(json!({"metadata": {"name": "prod",
                "annotations": {ENFORCEMENT_ANNOTATION: value}}}))
        };
        assert!(!ns(json!({"metadata": {"name": "prod"}})).unwrap().audit);
        assert!(!with("enforce").unwrap().audit);
        assert!(with("audit").unwrap().audit);
        assert_err(
            with("Audit"),
            "Namespace prod",
            "metadata.annotations[npc.dev/enforcement]",
            "must be \"enforce\" or \"audit\"",
        );
    }

    #[test]
    fn namespace_name_required_and_valid() {
        assert_err(
            ns(json!({"metadata": {}})),
            "Namespace <unnamed>",
            "metadata.name",
            "Required",
        );
        assert_err(
            ns(json!({"metadata": {"name": "Prod"}})),
            "Namespace Prod",
            "metadata.name",
            "RFC 1123 label",
        );
    }

    #[test]
    fn invalid_labels_are_rejected() {
        assert_err(
            ns(json!({"metadata": {"name": "x", "labels": {"app": "-bad"}}})),
            "Namespace x",
            "metadata.labels[app]",
            "label value",
        );
        assert_err(
            ns(json!({"metadata": {"name": "x", "labels": {"bad key": "v"}}})),
            "Namespace x",
            "metadata.labels",
            "qualified name",
        );
        assert!(
            ns(json!({"metadata": {"name": "x", "labels": {"example.com/a_b.c": "", "k": "V_1"}}}))
                .is_ok()
        );
    }

    // ---- Pod ----

    #[test]
    fn completed_pods_have_no_address() {
        for phase in ["Succeeded", "Failed"] {
            let p = pod_spec(
                json!({"containers": [{"name": "c"}]}),
                json!({"phase": phase, "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}),
            )
            .unwrap();
            assert!(p.ips.is_empty(), "{phase}: {:?}", p.ips);
        }
        for phase in ["Pending", "Running", "Unknown"] {
            let p = pod_spec(
                json!({"containers": [{"name": "c"}]}),
                json!({"phase": phase, "podIP": "10.0.0.1"}),
            )
            .unwrap();
            assert_eq!(p.ips, [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))], "{phase}");
        }
    }

    #[test]
    fn pod_basic_fields() {
        let p = pod_spec(
            json!({"nodeName": "node-1", "containers": [{"name": "c"}]}),
            json!({"podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}),
        )
        .unwrap();
        assert_eq!(p.namespace, "ns");
        assert_eq!(p.name, "p");
        assert_eq!(p.labels.get("app").unwrap(), "a");
        assert_eq!(p.node.as_deref(), Some("node-1"));
        assert!(!p.host_network);
        assert_eq!(
            p.ips,
            vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
                IpAddr::V6("fd00::5".parse::<Ipv6Addr>().unwrap())
            ]
        );
    }

    #[test]
    fn pod_without_spec_or_status() {
        let p = pod_of(json!({"metadata": {"name": "p", "namespace": "ns"}})).unwrap();
        assert_eq!(p.node, None);
        assert!(p.ips.is_empty() && p.named_ports.is_empty() && !p.host_network);
    }

    #[test]
    fn pod_ip_only() {
        let p = pod_spec(json!({"containers": []}), json!({"podIP": "fd00::1"})).unwrap();
        assert_eq!(p.ips, vec!["fd00::1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn pod_ip_is_authoritative_when_it_disagrees() {
        let p = pod_spec(
            json!({"containers": []}),
            json!({"podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.5"}]}),
        )
        .unwrap();
        assert_eq!(p.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn pod_host_network() {
        let p = pod_spec(json!({"hostNetwork": true, "containers": []}), json!({})).unwrap();
        assert!(p.host_network);
    }

    #[test]
    fn pod_bad_ips() {
        assert_err(
            pod_spec(json!({"containers": []}), json!({"podIP": "10.0.0.300"})),
            "Pod ns/p",
            "status.podIP",
            "valid IP",
        );
        assert_err(
            pod_spec(
                json!({"containers": []}),
                json!({"podIPs": [{"ip": "10.0.0.1"}, {"ip": "nope"}]}),
            ),
            "Pod ns/p",
            "status.podIPs[1].ip",
            "valid IP",
        );
        assert_err(
            pod_spec(json!({"containers": []}), json!({"podIP": "010.0.0.1"})),
            "Pod ns/p",
            "status.podIP",
            "leading zeros",
        );
        assert_err(
            pod_spec(
                json!({"containers": []}),
                json!({"podIP": "::ffff:10.0.0.1"}),
            ),
            "Pod ns/p",
            "status.podIP",
            "IPv4-mapped",
        );
        assert_err(
            pod_spec(
                json!({"containers": []}),
                json!({"podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]}),
            ),
            "Pod ns/p",
            "status.podIPs",
            "one IP for each IP family",
        );
        assert_err(
            pod_spec(
                json!({"containers": []}),
                json!({"podIPs": [{"ip": "fd00::1"}, {"ip": "fd00::1"}]}),
            ),
            "Pod ns/p",
            "status.podIPs[1]",
            "duplicate",
        );
    }

    #[test]
    fn pod_named_ports_sorted_and_defaulted() {
        let p = pod_spec(
            json!({
                "containers": [
                    {"name": "a", "ports": [
                        {"containerPort": 8080, "name": "http"},
                        {"containerPort": 53, "name": "dns", "protocol": "UDP"},
                        {"containerPort": 9999}
                    ]},
                    {"name": "b", "ports": [
                        {"containerPort": 8080, "name": "http", "protocol": "TCP"},
                        {"containerPort": 3868, "name": "diameter", "protocol": "SCTP"}
                    ]}
                ],
                "initContainers": [
                    {"name": "sidecar", "restartPolicy": "Always",
                     "ports": [{"containerPort": 15090, "name": "metrics"}]},
                    {"name": "init", "ports": [{"containerPort": 1, "name": "ignored"}]}
                ]
            }),
            json!({}),
        )
        .unwrap();
        let np = |name: &str, port, protocol| NamedPort {
            name: name.into(),
            port,
            protocol,
        };
        assert_eq!(
            p.named_ports,
            vec![
                np("diameter", 3868, Protocol::Sctp),
                np("dns", 53, Protocol::Udp),
                np("http", 8080, Protocol::Tcp),
                np("metrics", 15090, Protocol::Tcp),
            ]
        );
    }

    #[test]
    fn pod_conflicting_named_ports() {
        assert_err(
            pod_spec(
                json!({"containers": [
                    {"name": "a", "ports": [{"containerPort": 8080, "name": "http"}]},
                    {"name": "b", "ports": [{"containerPort": 8081, "name": "http"}]}
                ]}),
                json!({}),
            ),
            "Pod ns/p",
            "spec.containers[1].ports[0].name",
            "spec.containers[0].ports[0]",
        );
        assert_err(
            pod_spec(
                json!({"containers": [{"name": "a", "ports": [
                    {"containerPort": 8080, "name": "http"},
                    {"containerPort": 8080, "name": "http", "protocol": "UDP"}
                ]}]}),
                json!({}),
            ),
            "Pod ns/p",
            "spec.containers[0].ports[1].name",
            "duplicate",
        );
    }

    #[test]
    fn pod_bad_container_ports() {
        let one = |port: Value| {
            pod_spec(
                json!({"containers": [{"name": "a", "ports": [port]}]}),
                json!({}),
            )
        };
        assert_err(
            one(json!({"containerPort": 70000, "name": "http"})),
            "Pod ns/p",
            "spec.containers[0].ports[0].containerPort",
            "between 1 and 65535",
        );
        assert_err(
            one(json!({"containerPort": 0})),
            "Pod ns/p",
            "spec.containers[0].ports[0].containerPort",
            "Required",
        );
        assert_err(
            one(json!({"containerPort": 80, "protocol": "ICMP"})),
            "Pod ns/p",
            "spec.containers[0].ports[0].protocol",
            "unsupported value \"ICMP\"",
        );
        assert_err(
            one(json!({"containerPort": 80, "name": "HTTP"})),
            "Pod ns/p",
            "spec.containers[0].ports[0].name",
            "alpha-numeric",
        );
    }

    #[test]
    fn pod_namespace_and_name_required() {
        assert_err(
            pod_of(json!({"metadata": {"name": "p"}})),
            "Pod /p",
            "metadata.namespace",
            "Required",
        );
        assert_err(
            pod_of(json!({"metadata": {"name": "P_1", "namespace": "ns"}})),
            "Pod ns/P_1",
            "metadata.name",
            "RFC 1123 subdomain",
        );
    }

    // ---- NetworkPolicy: policyTypes ----

    #[test]
    fn policy_types_default() {
        let p = np_spec(json!({"podSelector": {}})).unwrap();
        assert!(p.ingress_isolation && !p.egress_isolation);
        let p = np_spec(json!({"egress": [{}]})).unwrap();
        assert!(p.ingress_isolation && p.egress_isolation);
        // An empty egress list adds no Egress.
        let p = np_spec(json!({"egress": [], "ingress": [{}]})).unwrap();
        assert!(p.ingress_isolation && !p.egress_isolation);
        // An empty policyTypes list is defaulted like an absent one.
        let p = np_spec(json!({"policyTypes": [], "egress": [{}]})).unwrap();
        assert!(p.ingress_isolation && p.egress_isolation);
        // No spec at all: selects every pod, denies all ingress.
        let p = network_policy(
            &serde_json::from_value(json!({"metadata": {"name": "np", "namespace": "ns"}}))
                .unwrap(),
        )
        .unwrap();
        assert!(p.ingress_isolation && !p.egress_isolation);
        assert_eq!(p.pod_selector, LabelSelector::default());
    }

    #[test]
    fn policy_types_explicit() {
        let p = np_spec(json!({"policyTypes": ["Egress"], "ingress": [{}]})).unwrap();
        assert!(!p.ingress_isolation && p.egress_isolation);
        assert_eq!(
            p.ingress.len(),
            1,
            "rules are kept, isolation says they apply"
        );
        let p = np_spec(json!({"policyTypes": ["Ingress"], "egress": [{}]})).unwrap();
        assert!(p.ingress_isolation && !p.egress_isolation);
        let p = np_spec(json!({"policyTypes": ["Ingress", "Egress"]})).unwrap();
        assert!(p.ingress_isolation && p.egress_isolation);
    }

    #[test]
    fn policy_types_invalid() {
        assert_err(
            np_spec(json!({"policyTypes": ["Ingress", "Sideways"]})),
            "NetworkPolicy ns/np",
            "spec.policyTypes[1]",
            "unsupported value \"Sideways\"",
        );
        assert_err(
            np_spec(json!({"policyTypes": ["Ingress", "Egress", "Ingress"]})),
            "NetworkPolicy ns/np",
            "spec.policyTypes",
            "more than two",
        );
    }

    // ---- Rules and peers ----

    #[test]
    fn absent_or_empty_peers_and_ports_match_all() {
        let p = np_spec(json!({
            "ingress": [{}, {"from": [], "ports": []}],
            "egress": [{"to": [], "ports": []}]
        }))
        .unwrap();
        assert_eq!(p.ingress, vec![Rule::default(), Rule::default()]);
        assert_eq!(p.egress, vec![Rule::default()]);
    }

    #[test]
    fn peers_pod_and_namespace_selectors() {
        let p = np_spec(json!({"ingress": [{"from": [
            {"podSelector": {"matchLabels": {"app": "web"}}},
            {"namespaceSelector": {"matchLabels": {"team": "a"}}},
            {"podSelector": {}, "namespaceSelector": {}}
        ]}]}))
        .unwrap();
        let peers = p.ingress[0].peers.as_ref().unwrap();
        let sel = |k: &str, v: &str| LabelSelector {
            match_labels: [(k.to_string(), v.to_string())].into(),
            match_expressions: vec![],
        };
        assert_eq!(
            peers,
            &vec![
                Peer::Pods {
                    namespaces: None,
                    pods: sel("app", "web")
                },
                Peer::Pods {
                    namespaces: Some(sel("team", "a")),
                    pods: LabelSelector::default()
                },
                Peer::Pods {
                    namespaces: Some(LabelSelector::default()),
                    pods: LabelSelector::default()
                },
            ]
        );
    }

    #[test]
    fn peer_must_specify_something() {
        assert_err(
            ingress_peer(json!({})),
            "NetworkPolicy ns/np",
            "spec.ingress[0].from[1]",
            "must specify a peer",
        );
        assert_err(
            np_spec(json!({"egress": [{"to": [{}]}]})),
            "NetworkPolicy ns/np",
            "spec.egress[0].to[0]",
            "must specify a peer",
        );
    }

    #[test]
    fn ip_block_with_selector_is_invalid() {
        assert_err(
            ingress_peer(json!({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}})),
            "NetworkPolicy ns/np",
            "spec.ingress[0].from[1]",
            "both ipBlock and another peer",
        );
        assert_err(
            ingress_peer(json!({"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}})),
            "NetworkPolicy ns/np",
            "spec.ingress[0].from[1]",
            "both ipBlock and another peer",
        );
    }

    #[test]
    fn ip_block_parsed_and_normalized() {
        let p = np_spec(json!({"egress": [{"to": [
            {"ipBlock": {"cidr": "10.0.0.1/8", "except": ["10.1.2.3/16", "10.2.0.0/24"]}},
            {"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48"]}},
            {"ipBlock": {"cidr": "0.0.0.0/0"}}
        ]}]}))
        .unwrap();
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            p.egress[0].peers.as_ref().unwrap(),
            &vec![
                Peer::IpBlock {
                    cidr: n("10.0.0.0/8"),
                    except: vec![n("10.1.0.0/16"), n("10.2.0.0/24")]
                },
                Peer::IpBlock {
                    cidr: n("2001:db8::/32"),
                    except: vec![n("2001:db8:1::/48")]
                },
                Peer::IpBlock {
                    cidr: n("0.0.0.0/0"),
                    except: vec![]
                },
            ]
        );
    }

    #[test]
    fn ip_block_invalid() {
        let block = |b: Value| ingress_peer(json!({"ipBlock": b}));
        let obj = "NetworkPolicy ns/np";
        assert_err(
            block(json!({"cidr": "10.0.0.0/33"})),
            obj,
            "spec.ingress[0].from[1].ipBlock.cidr",
            "valid CIDR",
        );
        assert_err(
            block(json!({"cidr": "10.0.0.1"})),
            obj,
            "spec.ingress[0].from[1].ipBlock.cidr",
            "valid CIDR",
        );
        assert_err(
            block(json!({"cidr": ""})),
            obj,
            "spec.ingress[0].from[1].ipBlock.cidr",
            "Required",
        );
        assert_err(
            block(json!({"cidr": "::ffff:10.0.0.0/104"})),
            obj,
            "spec.ingress[0].from[1].ipBlock.cidr",
            "IPv4-mapped",
        );
        assert_err(
            block(json!({"cidr": "10.0.0.0/8", "except": ["10.0.0.0/16", "bogus"]})),
            obj,
            "spec.ingress[0].from[1].ipBlock.except[1]",
            "valid CIDR",
        );
        // Outside the cidr.
        assert_err(
            block(json!({"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]})),
            obj,
            "spec.ingress[0].from[1].ipBlock.except[0]",
            "strict subset",
        );
        // Equal to the cidr: not strictly smaller.
        assert_err(
            block(json!({"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]})),
            obj,
            "spec.ingress[0].from[1].ipBlock.except[0]",
            "strict subset",
        );
        // Larger than the cidr.
        assert_err(
            block(json!({"cidr": "10.0.0.0/8", "except": ["10.0.0.0/7"]})),
            obj,
            "spec.ingress[0].from[1].ipBlock.except[0]",
            "strict subset",
        );
        // Other family.
        assert_err(
            block(json!({"cidr": "10.0.0.0/8", "except": ["fd00::/8"]})),
            obj,
            "spec.ingress[0].from[1].ipBlock.except[0]",
            "strict subset",
        );
    }

    // ---- Ports ----

    #[test]
    fn ports_parsed() {
        let p = np_spec(json!({"ingress": [{"ports": [
            {"port": 80},
            {"protocol": "UDP", "port": 53},
            {"protocol": "SCTP"},
            {"port": "http"},
            {"port": 32000, "endPort": 32768},
            {"port": 65535, "endPort": 65535}
        ]}]}))
        .unwrap();
        let pp = |protocol, port, end_port| PolicyPort {
            protocol,
            port,
            end_port,
        };
        assert_eq!(
            p.ingress[0].ports.as_ref().unwrap(),
            &vec![
                pp(Protocol::Tcp, Some(PortRef::Number(80)), None),
                pp(Protocol::Udp, Some(PortRef::Number(53)), None),
                pp(Protocol::Sctp, None, None),
                pp(Protocol::Tcp, Some(PortRef::Name("http".into())), None),
                pp(Protocol::Tcp, Some(PortRef::Number(32000)), Some(32768)),
                pp(Protocol::Tcp, Some(PortRef::Number(65535)), Some(65535)),
            ]
        );
    }

    #[test]
    fn port_protocol_invalid() {
        assert_err(
            ingress_port(json!({"protocol": "ICMP", "port": 1})),
            "NetworkPolicy ns/np",
            "spec.ingress[0].ports[0].protocol",
            "unsupported value \"ICMP\"",
        );
        assert_err(
            ingress_port(json!({"protocol": "tcp"})),
            "NetworkPolicy ns/np",
            "spec.ingress[0].ports[0].protocol",
            "unsupported value \"tcp\"",
        );
    }

    #[test]
    fn port_number_out_of_range() {
        for bad in [0, -1, 65536] {
            assert_err(
                ingress_port(json!({"port": bad})),
                "NetworkPolicy ns/np",
                "spec.ingress[0].ports[0].port",
                "between 1 and 65535",
            );
        }
    }

    #[test]
    fn port_names() {
        for good in ["http", "a", "h2c", "web-1", "abcdefghijklmno"] {
            assert!(ingress_port(json!({"port": good})).is_ok(), "{good}");
        }
        for (bad, msg) in [
            ("abcdefghijklmnop", "15 characters"),
            ("HTTP", "alpha-numeric"),
            ("my_port", "alpha-numeric"),
            ("8080", "at least one letter"),
            ("web--1", "consecutive hyphens"),
            ("-web", "begin or end with a hyphen"),
            ("web-", "begin or end with a hyphen"),
            ("", "at least one letter"),
        ] {
            assert_err(
                ingress_port(json!({"port": bad})),
                "NetworkPolicy ns/np",
                "spec.ingress[0].ports[0].port",
                msg,
            );
        }
    }

    #[test]
    fn end_port_rules() {
        let obj = "NetworkPolicy ns/np";
        let field = "spec.ingress[0].ports[0].endPort";
        assert_err(
            ingress_port(json!({"port": 100, "endPort": 99})),
            obj,
            field,
            "greater than or equal to `port`",
        );
        assert_err(
            ingress_port(json!({"port": 100, "endPort": 65536})),
            obj,
            field,
            "between 1 and 65535",
        );
        assert_err(
            ingress_port(json!({"port": "http", "endPort": 100})),
            obj,
            field,
            "non-numeric",
        );
        assert_err(
            ingress_port(json!({"endPort": 100})),
            obj,
            field,
            "not specified",
        );
        assert_err(
            np_spec(json!({"egress": [{"ports": [{"port": 1}, {"port": 10, "endPort": 5}]}]})),
            obj,
            "spec.egress[0].ports[1].endPort",
            "greater than or equal",
        );
    }

    // ---- Selectors ----

    #[test]
    fn selector_expressions() {
        let p = np_spec(json!({"podSelector": {
            "matchLabels": {"app": "db"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "env", "operator": "NotIn", "values": ["prod"]},
                {"key": "x", "operator": "Exists"},
                {"key": "y", "operator": "DoesNotExist", "values": []}
            ]
        }}))
        .unwrap();
        let s = &p.pod_selector;
        assert_eq!(s.match_labels.get("app").unwrap(), "db");
        let ops: Vec<_> = s.match_expressions.iter().map(|r| r.operator).collect();
        assert_eq!(
            ops,
            vec![
                Operator::In,
                Operator::NotIn,
                Operator::Exists,
                Operator::DoesNotExist
            ]
        );
        assert_eq!(s.match_expressions[0].values, vec!["a", "b"]);
    }

    #[test]
    fn selector_invalid() {
        let obj = "NetworkPolicy ns/np";
        let expr = |e: Value| ingress_peer(json!({"namespaceSelector": {"matchExpressions": [e]}}));
        assert_err(
            expr(json!({"key": "a", "operator": "In"})),
            obj,
            "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].values",
            "must be specified",
        );
        assert_err(
            expr(json!({"key": "a", "operator": "NotIn", "values": []})),
            obj,
            "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].values",
            "must be specified",
        );
        assert_err(
            expr(json!({"key": "a", "operator": "Exists", "values": ["x"]})),
            obj,
            "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].values",
            "may not be specified",
        );
        assert_err(
            expr(json!({"key": "a", "operator": "DoesNotExist", "values": ["x"]})),
            obj,
            "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].values",
            "may not be specified",
        );
        assert_err(
            expr(json!({"key": "a", "operator": "Equals", "values": ["x"]})),
            obj,
            "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].operator",
            "unsupported value \"Equals\"",
        );
        assert_err(
            expr(json!({"key": "a b", "operator": "Exists"})),
            obj,
            "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].key",
            "qualified name",
        );
        assert_err(
            expr(json!({"key": "a", "operator": "In", "values": ["ok", "not ok"]})),
            obj,
            "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].values[1]",
            "label value",
        );
        assert_err(
            np_spec(json!({"podSelector": {"matchLabels": {"app": "a b"}}})),
            obj,
            "spec.podSelector.matchLabels[app]",
            "label value",
        );
    }

    #[test]
    fn all_errors_are_reported() {
        let e =
            np_spec(json!({"ingress": [{"ports": [{"port": 0}, {"protocol": "X"}]}]})).unwrap_err();
        assert_eq!(e.errors.len(), 2, "{e}");
        assert_eq!(
            e.to_string(),
            "NetworkPolicy ns/np: spec.ingress[0].ports[0].port: invalid value 0: must be \
             between 1 and 65535, inclusive; spec.ingress[0].ports[1].protocol: unsupported \
             value \"X\": supported values: \"SCTP\", \"TCP\", \"UDP\""
        );
    }

    #[test]
    fn name_validators() {
        assert!(is_dns1123_label("a-1"));
        assert!(!is_dns1123_label("a.b"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(qualified_name_error("app.kubernetes.io/name").is_none());
        assert!(qualified_name_error("a/b/c").is_some());
        assert!(qualified_name_error("/b").is_some());
        assert!(qualified_name_error("Example.com/b").is_some());
        assert!(label_value_error("").is_none());
        assert!(label_value_error("_a").is_some());
    }
}
