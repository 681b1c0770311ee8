//! Reading a manifests directory the way the agent's manifests mode does: every `*.yaml`,
//! `*.yml` and `*.json` file directly in the directory, hidden ones excepted (multi-document
//! YAML, concatenated JSON values; a `List` or typed list contributes its `items`), kinds
//! Namespace, Pod and NetworkPolicy (other kinds are ignored).
//! A pod's addresses come from `status.podIPs` (or `status.podIP`), its namespace defaults to
//! `default`, its ports are the `containerPort`s of its containers (protocol default TCP).
//!
//! The lab only needs the pods' addresses and ports (to build namespaces and responders) and to
//! know which files hold policies (for the demo); the agent does the rest.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A transport protocol of a container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Whether the lab runs responders for it and probes it (std has no SCTP sockets).
    pub fn probed(self) -> bool {
        self != Protocol::Sctp
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A declared container port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Port {
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A pod as the lab sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// Sorted, without duplicates (same port and protocol in two containers).
    pub ports: Vec<Port>,
    pub host_network: bool,
    /// The file it came from.
    pub file: PathBuf,
}

impl ManifestPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What one file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileSummary {
    pub path: PathBuf,
    /// Objects per kind (including ignored kinds).
    pub kinds: BTreeMap<String, usize>,
}

impl FileSummary {
    pub fn has(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }
}

/// Everything read from a manifests directory.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Namespace name -> labels (as written; the agent adds `kubernetes.io/metadata.name`).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// In the order of the files (sorted by name) and of the objects in them.
    pub pods: Vec<ManifestPod>,
    /// `namespace/name` of every NetworkPolicy.
    pub policies: Vec<String>,
    pub files: Vec<FileSummary>,
}

/// The manifest files of `dir` (not recursive), sorted by name: regular files (or symlinks to
/// them) named `*.yaml`, `*.yml`, `*.json`, not hidden (`.` first).
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if matches!(ext, "yaml" | "yml" | "json") && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every manifest file in `dir`.
pub fn load_dir(dir: &Path) -> Result<Cluster> {
    let files = manifest_files(dir)?;
    ensure!(
        !files.is_empty(),
        "{} holds no manifests (*.yaml, *.yml, *.json)",
        dir.display()
    );
    let mut cluster = Cluster::default();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        add_file(&mut cluster, &file, &text)?;
    }
    let mut seen: BTreeMap<String, &Path> = BTreeMap::new();
    for pod in &cluster.pods {
        if let Some(first) = seen.insert(pod.key(), &pod.file) {
            bail!(
                "pod {} is defined twice ({} and {})",
                pod.key(),
                first.display(),
                pod.file.display()
            );
        }
    }
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    for pod in cluster.pods.iter().filter(|p| !p.host_network) {
        for ip in &pod.ips {
            if let Some(other) = owners.insert(*ip, pod.key()) {
                bail!("pods {other} and {} both have the address {ip}", pod.key());
            }
        }
    }
    Ok(cluster)
}

/// The objects of one file's text: YAML (several documents) or JSON, `List`s flattened.
pub fn parse_objects(file: &Path, text: &str) -> Result<Vec<Value>> {
    let is_json = file.extension().is_some_and(|e| e == "json");
    let mut docs = Vec::new();
    if is_json {
        let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        for (i, doc) in stream.enumerate() {
            docs.push(doc.with_context(|| format!("{}: JSON value {}", file.display(), i + 1))?);
        }
    } else {
        docs = serde_saphyr::from_multiple::<Value>(text)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("{}: invalid YAML", file.display()))?;
    }
    let mut objects = Vec::new();
    for doc in docs {
        flatten(doc, &mut objects);
    }
    Ok(objects)
}

/// A `List` (or a typed list, `PodList`, whose items may leave out `kind`) contributes its
/// items.
fn flatten(doc: Value, out: &mut Vec<Value>) {
    let Value::Object(mut map) = doc else {
        if !doc.is_null() {
            out.push(doc);
        }
        return;
    };
    let kind = map.get("kind").and_then(Value::as_str).map(str::to_string);
    if let Some(item_kind) = kind.as_deref().and_then(|k| k.strip_suffix("List"))
        && let Some(Value::Array(items)) = map.remove("items")
    {
        for mut item in items {
            if !item_kind.is_empty()
                && let Some(m) = item.as_object_mut()
            {
                m.entry("kind")
                    .or_insert_with(|| Value::String(item_kind.to_string()));
            }
            flatten(item, out);
        }
        return;
    }
    out.push(Value::Object(map));
}

/// Adds the objects of one file.
pub fn add_file(cluster: &mut Cluster, file: &Path, text: &str) -> Result<()> {
    let mut summary = FileSummary {
        path: file.to_path_buf(),
        ..FileSummary::default()
    };
    for (i, obj) in parse_objects(file, text)?.into_iter().enumerate() {
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        *summary.kinds.entry(kind.clone()).or_default() += 1;
        let meta: Meta = match obj.get("metadata") {
            Some(m) => serde_json::from_value(m.clone()).with_context(|| {
                format!("{}: object {} ({kind}): metadata", file.display(), i + 1)
            })?,
            None => Meta::default(),
        };
        let what = || {
            format!(
                "{}: {kind} {}",
                file.display(),
                if meta.name.is_empty() {
                    format!("#{}", i + 1)
                } else {
                    format!("{}/{}", meta.namespace(), meta.name)
                }
            )
        };
        match kind.as_str() {
            "Namespace" => {
                ensure!(
                    !meta.name.is_empty(),
                    "{}: metadata.name is missing",
                    what()
                );
                cluster
                    .namespaces
                    .insert(meta.name.clone(), meta.labels.clone());
            }
            "NetworkPolicy" => {
                ensure!(
                    !meta.name.is_empty(),
                    "{}: metadata.name is missing",
                    what()
                );
                cluster
                    .policies
                    .push(format!("{}/{}", meta.namespace(), meta.name));
            }
            "Pod" => {
                ensure!(
                    !meta.name.is_empty(),
                    "{}: metadata.name is missing",
                    what()
                );
                let pod = parse_pod(&obj, meta.clone(), file).with_context(what)?;
                cluster.pods.push(pod);
            }
            _ => {}
        }
    }
    cluster.files.push(summary);
    Ok(())
}

#[derive(Clone, Debug, Default, Deserialize)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Meta {
    fn namespace(&self) -> &str {
        match self.namespace.as_deref() {
            None | Some("") => "default",
            Some(ns) => ns,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    containers: Vec<Container>,
    #[serde(default)]
    host_network: bool,
}

#[derive(Debug, Default, Deserialize)]
struct Container {
    #[serde(default)]
    ports: Vec<ContainerPort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    container_port: i64,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIp>,
}

#[derive(Debug, Deserialize)]
struct PodIp {
    ip: String,
}

fn parse_pod(obj: &Value, meta: Meta, file: &Path) -> Result<ManifestPod> {
    let spec: PodSpec = match obj.get("spec") {
        Some(s) => serde_json::from_value(s.clone()).context("spec")?,
        None => PodSpec::default(),
    };
    let status: PodStatus = match obj.get("status") {
        Some(s) => serde_json::from_value(s.clone()).context("status")?,
        None => PodStatus::default(),
    };
    // podIPs wins; podIP alone is the single-stack form (when both are set, podIP is podIPs[0]).
    let mut texts: Vec<&str> = status.pod_ips.iter().map(|p| p.ip.as_str()).collect();
    if texts.is_empty()
        && let Some(ip) = status.pod_ip.as_deref()
        && !ip.is_empty()
    {
        texts.push(ip);
    }
    let mut ips = Vec::new();
    for t in texts {
        let ip: IpAddr = t
            .parse()
            .with_context(|| format!("status.podIPs: {t:?} is no IP address"))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = BTreeSet::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (p, port) in container.ports.iter().enumerate() {
            let field = format!("spec.containers[{c}].ports[{p}]");
            let number = u16::try_from(port.container_port)
                .ok()
                .filter(|n| *n != 0)
                .with_context(|| {
                    format!(
                        "{field}.containerPort: {} is out of range (1-65535)",
                        port.container_port
                    )
                })?;
            let protocol = match port.protocol.as_deref() {
                None | Some("") => Protocol::Tcp,
                Some(p) => Protocol::parse(p).with_context(|| {
                    format!("{field}.protocol: {p:?} is none of TCP, UDP, SCTP")
                })?,
            };
            ports.insert(Port {
                port: number,
                protocol,
                name: port.name.clone().filter(|n| !n.is_empty()),
            });
        }
    }
    // The same port and protocol twice (two containers, or a named and an unnamed
    // declaration) is one responder: keep the first (named ones sort after unnamed ones,
    // prefer a name).
    let mut dedup: Vec<Port> = Vec::new();
    for port in ports {
        match dedup.last_mut() {
            Some(last) if last.port == port.port && last.protocol == port.protocol => {
                if last.name.is_none() {
                    last.name = port.name;
                }
            }
            _ => dedup.push(port),
        }
    }
    Ok(ManifestPod {
        namespace: meta.namespace().to_string(),
        name: meta.name,
        labels: meta.labels,
        ips,
        ports: dedup,
        host_network: spec.host_network,
        file: file.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_documents_lists_and_defaults() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {team: a}
---
# an empty document
---
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  containers:
  - name: c
    ports:
    - containerPort: 80
    - {containerPort: 53, protocol: UDP, name: dns}
  - name: d
    ports:
    - {containerPort: 80, name: http}
status:
  podIP: 10.1.0.2
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: PodList
  items:
  - metadata: {name: db, namespace: shop}
    spec: {containers: [{name: c}]}
    status:
      podIP: 10.1.0.3
      podIPs: [{ip: 10.1.0.3}, {ip: "fd00::3"}]
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: deny, namespace: shop}
  spec: {podSelector: {}}
- {apiVersion: v1, kind: Service, metadata: {name: s}}
"#;
        let mut c = Cluster::default();
        add_file(&mut c, Path::new("a.yaml"), text).unwrap();
        assert_eq!(c.namespaces["shop"]["team"], "a");
        assert_eq!(c.policies, vec!["shop/deny".to_string()]);
        assert_eq!(c.pods.len(), 2);
        let web = &c.pods[0];
        assert_eq!(web.key(), "default/web");
        assert_eq!(web.ips, vec!["10.1.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            web.ports,
            vec![
                Port {
                    port: 53,
                    protocol: Protocol::Udp,
                    name: Some("dns".into())
                },
                Port {
                    port: 80,
                    protocol: Protocol::Tcp,
                    name: Some("http".into())
                },
            ]
        );
        let db = &c.pods[1];
        assert_eq!(db.key(), "shop/db");
        assert_eq!(db.ips.len(), 2);
        assert!(db.ports.is_empty());
        let f = &c.files[0];
        assert!(f.has("NetworkPolicy") && f.has("Pod") && f.has("Service"));
        assert_eq!(f.kinds["Pod"], 2);
    }

    #[test]
    fn json_and_errors() {
        let json = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},
            "spec":{"containers":[{"name":"c","ports":[{"containerPort":8080}]}]},
            "status":{"podIPs":[{"ip":"10.2.0.2"}]}}"#;
        let mut c = Cluster::default();
        add_file(&mut c, Path::new("p.json"), json).unwrap();
        assert_eq!(c.pods[0].ports[0].port, 8080);

        for (bad, want) in [
            (
                "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{ports: [{containerPort: 70000}]}]}",
                "containerPort: 70000 is out of range",
            ),
            (
                "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{ports: [{containerPort: 1, protocol: ICMP}]}]}",
                "\"ICMP\" is none of TCP, UDP, SCTP",
            ),
            (
                "kind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.300}",
                "is no IP address",
            ),
            ("kind: Pod\nmetadata: {}\n", "metadata.name is missing"),
            ("kind: [", "invalid YAML"),
        ] {
            let mut c = Cluster::default();
            let e = add_file(&mut c, Path::new("bad.yaml"), bad).unwrap_err();
            let msg = format!("{e:#}");
            assert!(msg.contains(want), "{msg}");
            assert!(msg.contains("bad.yaml"), "{msg}");
        }
    }

    /// The agent's manifests source reads the examples without a single error, and sees the
    /// pods, addresses, named ports and policies the lab sees.
    #[test]
    fn the_examples_are_valid_for_the_agent() {
        use npc_agent::sources::manifests::{LastGood, load_dir as agent_load_dir};
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for ex in [
            "sock-shop",
            "pricing-api",
            "pricing-api/and-form",
            "hollowdb",
            "banking",
        ] {
            let dir = examples.join(ex);
            let (state, errors) = agent_load_dir(&dir, &mut LastGood::default());
            assert!(errors.is_empty(), "{ex}: {errors:?}");
            let ours = load_dir(&dir).unwrap();
            assert_eq!(state.pods.len(), ours.pods.len(), "{ex}");
            assert_eq!(state.policies.len(), ours.policies.len(), "{ex}");
            for pod in &ours.pods {
                let theirs = state
                    .pods
                    .values()
                    .find(|p| p.namespace == pod.namespace && p.name == pod.name)
                    .unwrap_or_else(|| panic!("{ex}: the agent has no pod {}", pod.key()));
                assert_eq!(theirs.ips, pod.ips, "{ex}: {}", pod.key());
                let named: Vec<(String, u16)> = pod
                    .ports
                    .iter()
                    .filter_map(|p| p.name.clone().map(|n| (n, p.port)))
                    .collect();
                let mut their_named: Vec<(String, u16)> = theirs
                    .named_ports
                    .iter()
                    .map(|p| (p.name.clone(), p.port))
                    .collect();
                their_named.sort();
                let mut named = named;
                named.sort();
                assert_eq!(their_named, named, "{ex}: {}", pod.key());
            }
        }
    }

    #[test]
    fn the_examples_parse() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for ex in [
            "sock-shop",
            "pricing-api",
            "pricing-api/and-form",
            "hollowdb",
            "banking",
        ] {
            let c = load_dir(&examples.join(ex)).unwrap_or_else(|e| panic!("{ex}: {e:#}"));
            assert!(c.pods.len() >= 3, "{ex}");
            assert!(!c.policies.is_empty(), "{ex}");
            for p in &c.pods {
                assert!(!p.ips.is_empty(), "{ex}: {}", p.key());
                assert!(c.namespaces.contains_key(&p.namespace), "{ex}: {}", p.key());
            }
        }
    }
}
