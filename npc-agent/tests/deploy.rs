//! `deploy/` as users install it (`kubectl apply -k deploy/`, docs/install.md):
//!
//! - kustomize renders `deploy/` into the objects of its files (the image set by `images:`): the
//!   RBAC objects the Kubernetes-mode tests run the agent with and the DaemonSet; and
//!   `deploy/cleanup/` into the cleanup DaemonSet;
//! - a real API server (1.20) accepts every rendered object: kubectl validates them against the
//!   server's own OpenAPI schema with unknown fields as errors (a 1.20 server cannot reject
//!   unknown fields itself; checked with an object carrying a bogus field), the server dry-runs
//!   them through its admission and validation, then creates them and returns every field as
//!   written;
//! - least privilege: read-only RBAC, no privileged container, no capability beyond the agent's
//!   three (each of which is needed: without any one the agent fails), read-only root
//!   filesystem, no privilege escalation, the runtime's seccomp filter;
//! - the DaemonSet's own arguments, port and probes: the real agent, started with them in a lab,
//!   answers its startup, liveness and readiness probes and serves the annotated metrics path;
//! - its capabilities suffice: the agent as uid 0 with exactly the DaemonSet's added
//!   capabilities (and no_new_privs) becomes ready, attaches, learns the pods' veths, enforces
//!   an allow and a deny and logs no warning; `npc-agent cleanup` with the cleanup DaemonSet's
//!   capabilities (none) then removes its pins.
//!
//! The kustomize and API server tests need kubectl with kustomize (any version from 1.14;
//! `cargo xtask setup` installs Debian's when there is none, `KUBECTL` picks another binary):
//! without one they are skipped with a message, except under CI (`CI` set), where they fail.
//! The API server test needs the binaries of `cargo xtask kube-apiserver`; the lab tests root.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, Probe},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use npc_tests::lab::{Lab, Pod, ServerHandle, in_netns};
use serde_json::{Value, json};

mod support;
use support::{
    AGENT, Agent, Enter, LOG_WAIT,
    apiserver::{ApiServer, deploy_rbac},
    cluster::{
        Manifests, PodDecl, add_abc, blocked, cluster_yaml, endpoint_until, policy, reaches,
    },
    unique_bpffs,
};

/// The capabilities the agent may be given, and gets: see deploy/daemonset.yaml for why each.
const AGENT_CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

/// The only host paths the DaemonSets may mount.
const HOST_PATHS: [&str; 2] = ["/sys/fs/bpf", "/run/npc"];

// ---------------------------------------------------------------------------------------------
// The files
// ---------------------------------------------------------------------------------------------

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The documents of a YAML file or stream, as JSON values.
fn documents(text: &str, what: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The one DaemonSet of a file under deploy/ (as written, before kustomize).
fn daemonset_file(file: &str) -> DaemonSet {
    let path = deploy_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let [doc] = <[Value; 1]>::try_from(documents(&text, file))
        .unwrap_or_else(|docs| panic!("{file}: {} documents, want 1", docs.len()));
    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// deploy/daemonset.yaml: the agent.
fn agent_daemonset() -> DaemonSet {
    daemonset_file("daemonset.yaml")
}

/// deploy/cleanup/daemonset.yaml.
fn cleanup_daemonset() -> DaemonSet {
    daemonset_file("cleanup/daemonset.yaml")
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .expect("a pod template with a spec")
}

/// The DaemonSet's only container.
fn container(ds: &DaemonSet) -> &Container {
    let containers = &pod_spec(ds).containers;
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// Every container and init container.
fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

/// The value of `--flag=VALUE` among the container's arguments (the only form the DaemonSets
/// use, so that a test can drop or replace one argument).
fn flag<'a>(c: &'a Container, flag: &str) -> Option<&'a str> {
    let args = c.args.as_deref().unwrap_or_default();
    assert!(
        !args.iter().any(|a| a == flag),
        "{flag} must be written {flag}=VALUE"
    );
    args.iter()
        .find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

/// The agent's `--metrics-addr`.
fn metrics_addr(c: &Container) -> SocketAddr {
    flag(c, "--metrics-addr")
        .expect("the agent's --metrics-addr")
        .parse()
        .expect("--metrics-addr: an address")
}

/// The port a probe (or annotation) names: a number, or a container port's name.
fn port_of(c: &Container, port: &IntOrString) -> u16 {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).expect("a port number"),
        IntOrString::String(name) => {
            let port = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no container port named {name}"));
            u16::try_from(port.container_port).unwrap()
        }
    }
}

/// An HTTP GET probe's path and port.
fn http_probe(c: &Container, probe: Option<&Probe>, what: &str) -> (String, u16) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{what}: an httpGet probe"));
    let path = get.path.clone().unwrap_or_else(|| panic!("{what}: a path"));
    (path, port_of(c, &get.port))
}

/// The container's environment variables with literal values (the downward API's are left to
/// the test).
fn literal_env(c: &Container) -> Vec<(String, String)> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

fn added_capabilities(c: &Container) -> Vec<String> {
    c.security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|caps| caps.add.clone())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// kubectl
// ---------------------------------------------------------------------------------------------

struct Kubectl {
    program: PathBuf,
    /// The client's minor version: 1.25 brought `--validate=strict`.
    minor: u32,
    /// kubectl's discovery and HTTP caches (`--cache-dir`), not the user's ~/.kube.
    cache: tempfile::TempDir,
}

impl Kubectl {
    /// `KUBECTL`, else `kubectl` on PATH. `None` when there is none: the caller skips its test,
    /// except under CI (`CI` set), where a missing kubectl fails it.
    fn find(test: &str) -> Option<Kubectl> {
        let program = std::env::var_os("KUBECTL").map_or_else(|| "kubectl".into(), PathBuf::from);
        let out = match Command::new(&program)
            .args(["version", "--client", "-o", "json"])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let why = format!(
                    "{test}: no kubectl ({}): install one with kustomize (`cargo xtask setup` \
                     installs Debian's kubernetes-client) or set KUBECTL",
                    program.display()
                );
                assert!(std::env::var_os("CI").is_none(), "under CI: {why}");
                // Past the test harness' capture: a skipped test still reports `ok`.
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
                return None;
            }
            Err(e) => panic!("running {}: {e}", program.display()),
        };
        assert!(
            out.status.success(),
            "{} version --client failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let version: Value = serde_json::from_slice(&out.stdout).expect("kubectl version JSON");
        let minor = version["clientVersion"]["minor"]
            .as_str()
            .map(|m| m.trim_end_matches(|c: char| !c.is_ascii_digit()))
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("no minor version in {version}"));
        assert!(
            minor >= 14,
            "kubectl 1.{minor} has no `kubectl kustomize` (1.14 and later have)"
        );
        eprintln!(
            "kubectl: {} (1.{minor}, kustomize {})",
            program.display(),
            version["kustomizeVersion"]
                .as_str()
                .unwrap_or("v2.0.3, built in")
        );
        Some(Kubectl {
            program,
            minor,
            cache: tempfile::tempdir().expect("a temporary directory"),
        })
    }

    /// Runs kubectl with `args`, `stdin` as its input.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(&self.program)
            .arg("--cache-dir")
            .arg(self.cache.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.program.display()));
        let mut input = child.stdin.take().unwrap();
        let text = stdin.unwrap_or_default().to_owned();
        // Written from a thread: kubectl may answer before it has read everything.
        let writer = std::thread::spawn(move || input.write_all(text.as_bytes()));
        let out = child.wait_with_output().expect("waiting for kubectl");
        let _ = writer.join();
        out
    }

    /// `run`, which must succeed; its stdout.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("kubectl's output is UTF-8")
    }

    /// `kubectl kustomize DIR`: the rendered stream and its documents. kustomize must not warn
    /// (v5 warns about fields it deprecated, which v2.0.3 needs others of).
    fn kustomize(&self, dir: &Path) -> (String, Vec<Value>) {
        let dir = dir.to_str().unwrap();
        let out = self.run(&["kustomize", dir], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kubectl kustomize {dir} failed ({}): {stderr}",
            out.status
        );
        assert!(
            stderr.trim().is_empty(),
            "kubectl kustomize {dir} warned: {stderr}"
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let docs = documents(&text, &format!("kubectl kustomize {dir}"));
        (text, docs)
    }

    /// The strictest client-or-server schema validation this kubectl has: `strict` (unknown and
    /// duplicate fields are errors; against a server older than 1.25, which cannot validate
    /// fields itself, kubectl validates against the server's OpenAPI schema), or `true` before
    /// 1.25 (the server's OpenAPI schema, unknown fields are errors).
    fn validate_flag(&self) -> &'static str {
        if self.minor >= 25 {
            "--validate=strict"
        } else {
            "--validate=true"
        }
    }
}

/// Objects as one `v1` List, in JSON (kubectl reads a stream of JSON documents only without
/// `---` separators).
fn list(docs: &[Value]) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": docs}).to_string()
}

/// Where `written` is not part of `read`: each field written must be there with the same value
/// (a server adds defaults; it must not drop or change a field).
fn not_kept(written: &Value, read: &Value, path: &str, out: &mut Vec<String>) {
    match (written, read) {
        (Value::Object(w), Value::Object(r)) => {
            for (key, value) in w {
                let path = format!("{path}.{key}");
                match r.get(key) {
                    Some(got) => not_kept(value, got, &path, out),
                    None => out.push(format!("{path}: dropped")),
                }
            }
        }
        (Value::Array(w), Value::Array(r)) if w.len() == r.len() => {
            for (i, (value, got)) in w.iter().zip(r).enumerate() {
                not_kept(value, got, &format!("{path}[{i}]"), out);
            }
        }
        _ if written == read => {}
        _ => out.push(format!("{path}: wrote {written}, read {read}")),
    }
}

fn kind_and_name(doc: &Value) -> String {
    format!(
        "{} {}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

// ---------------------------------------------------------------------------------------------
// kustomize and the API server
// ---------------------------------------------------------------------------------------------

/// `kubectl kustomize deploy/` gives exactly the RBAC objects the Kubernetes-mode tests run the
/// agent with and the DaemonSet as written, in kube-system, with the image of this version;
/// `deploy/cleanup/` gives the cleanup DaemonSet with the same image.
#[test]
fn kustomize_renders_the_files() {
    let Some(kubectl) = Kubectl::find("kustomize_renders_the_files") else {
        return;
    };
    let (_, docs) = kubectl.kustomize(&deploy_dir());
    let kinds: Vec<String> = docs.iter().map(kind_and_name).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount npc-agent",
            "ClusterRole npc-agent",
            "ClusterRoleBinding npc-agent",
            "DaemonSet npc-agent"
        ]
    );
    for doc in &docs {
        if matches!(doc["kind"].as_str(), Some("ServiceAccount" | "DaemonSet")) {
            assert_eq!(doc["metadata"]["namespace"], "kube-system", "{doc}");
        }
    }

    // RBAC: what deploy_rbac() reads (and `apiserver.rs`'s deploy_rbac_is_read_only checks).
    let (account, role, binding) = deploy_rbac();
    assert_eq!(docs[0], serde_json::to_value(&account).unwrap());
    assert_eq!(docs[1], serde_json::to_value(&role).unwrap());
    assert_eq!(docs[2], serde_json::to_value(&binding).unwrap());
    let role: ClusterRole = serde_json::from_value(docs[1].clone()).unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(docs[2].clone()).unwrap();
    assert_read_only(&role, &binding);

    // The DaemonSet: the file's, with the image set.
    let image = format!("npc-agent:{}", env!("CARGO_PKG_VERSION"));
    let rendered: DaemonSet = serde_json::from_value(docs[3].clone()).unwrap();
    let mut written = agent_daemonset();
    pod_spec_mut(&mut written).containers[0].image = Some(image.clone());
    assert_eq!(rendered, written, "the rendered DaemonSet is the file's");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        pod_spec(&rendered).service_account_name.as_deref(),
        Some(subject.name.as_str())
    );
    assert_eq!(
        rendered.metadata.namespace.as_deref(),
        subject.namespace.as_deref()
    );

    let (_, docs) = kubectl.kustomize(&deploy_dir().join("cleanup"));
    let kinds: Vec<String> = docs.iter().map(kind_and_name).collect();
    assert_eq!(kinds, ["DaemonSet npc-cleanup"]);
    let rendered: DaemonSet = serde_json::from_value(docs[0].clone()).unwrap();
    let mut written = cleanup_daemonset();
    pod_spec_mut(&mut written).init_containers.as_mut().unwrap()[0].image = Some(image);
    assert_eq!(
        rendered, written,
        "the rendered cleanup DaemonSet is the file's"
    );
}

fn pod_spec_mut(ds: &mut DaemonSet) -> &mut PodSpec {
    ds.spec.template.spec.as_mut().unwrap()
}

/// The role only reads pods, namespaces and NetworkPolicies, and the binding gives it to the
/// agent's ServiceAccount.
fn assert_read_only(role: &ClusterRole, binding: &ClusterRoleBinding) {
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{rule:?}");
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    assert_eq!(
        granted,
        BTreeSet::from([
            "/namespaces".to_owned(),
            "/pods".to_owned(),
            "networking.k8s.io/networkpolicies".to_owned()
        ])
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
}

/// A real API server (1.20) validates every rendered object of `deploy/` and `deploy/cleanup/`
/// (its OpenAPI schema with unknown fields as errors, checked with a bogus field; then a
/// server-side dry run), creates them and returns every field written.
#[test]
fn api_server_accepts_the_rendered_objects() {
    let Some(kubectl) = Kubectl::find("api_server_accepts_the_rendered_objects") else {
        return;
    };
    let (install, mut docs) = kubectl.kustomize(&deploy_dir());
    let (cleanup, cleanup_docs) = kubectl.kustomize(&deploy_dir().join("cleanup"));
    docs.extend(cleanup_docs);
    let server = ApiServer::start("deploy");
    let kubeconfig = server.admin_kubeconfig();
    let kubeconfig = kubeconfig.to_str().unwrap();
    let validate = kubectl.validate_flag();
    // What users apply: the rendered YAML.
    let all = format!("{install}\n---\n{cleanup}");

    // Dry run: the server's admission (e.g. the priority class must exist) and validation.
    let dry_run = [
        "--kubeconfig",
        kubeconfig,
        "apply",
        "--dry-run=server",
        validate,
        "-f",
        "-",
    ];
    let out = kubectl.ok(&dry_run, Some(&all));
    // `daemonset.apps/npc-agent created (server dry run)`, one line per object.
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("(server dry run)"))
            .count(),
        docs.len(),
        "{out}"
    );

    // The same validation rejects an unknown field: a misspelt field would not slip through.
    // (The objects as they are pass, in this form too.)
    kubectl.ok(&dry_run, Some(&list(&docs)));
    let mut bogus = docs.clone();
    let daemonset = bogus.iter_mut().find(|d| d["kind"] == "DaemonSet").unwrap();
    daemonset["spec"]["template"]["spec"]["containers"][0]["bogus"] = json!(true);
    let out = kubectl.run(&dry_run, Some(&list(&bogus)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("bogus"),
        "an unknown field must be rejected ({}): {stderr}",
        out.status
    );
    eprintln!("unknown field rejected: {}", stderr.trim());

    // Created for real, then read back: nothing dropped or changed.
    kubectl.ok(
        &["--kubeconfig", kubeconfig, "apply", validate, "-f", "-"],
        Some(&all),
    );
    let list: Value = serde_json::from_str(&kubectl.ok(
        &["--kubeconfig", kubeconfig, "get", "-o", "json", "-f", "-"],
        Some(&all),
    ))
    .expect("kubectl get -o json");
    let items = list["items"].as_array().expect("a List");
    assert_eq!(items.len(), docs.len());
    for (written, read) in docs.iter().zip(items) {
        assert_eq!(kind_and_name(written), kind_and_name(read));
        let mut diff = Vec::new();
        not_kept(written, read, "", &mut diff);
        assert!(
            diff.is_empty(),
            "{}: not as written:\n{}",
            kind_and_name(written),
            diff.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Least privilege (the files as written; kustomize changes only the image)
// ---------------------------------------------------------------------------------------------

/// Checks every container of a DaemonSet: not privileged, no privilege escalation, read-only
/// root, every capability dropped and at most `allowed` added, the runtime's seccomp filter, no
/// host namespace but the network, host paths only from [`HOST_PATHS`]. Returns each
/// container's added capabilities.
fn assert_least_privilege(ds: &DaemonSet, allowed: &[&str]) -> Vec<Vec<String>> {
    let spec = pod_spec(ds);
    assert_ne!(spec.host_pid, Some(true), "hostPID");
    assert_ne!(spec.host_ipc, Some(true), "hostIPC");
    if let Some(pod) = &spec.security_context {
        assert!(pod.sysctls.is_none(), "no sysctls");
    }
    for volume in spec.volumes.iter().flatten() {
        if let Some(host) = &volume.host_path {
            assert!(
                HOST_PATHS.contains(&host.path.as_str()),
                "host path {}",
                host.path
            );
        }
    }
    all_containers(spec)
        .map(|c| {
            let what = &c.name;
            let sc = c
                .security_context
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: a securityContext"));
            assert_eq!(sc.privileged, Some(false), "{what}: privileged");
            assert_eq!(
                sc.allow_privilege_escalation,
                Some(false),
                "{what}: allowPrivilegeEscalation"
            );
            assert_eq!(
                sc.read_only_root_filesystem,
                Some(true),
                "{what}: readOnlyRootFilesystem"
            );
            assert!(sc.proc_mount.is_none(), "{what}: procMount");
            let caps = sc
                .capabilities
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: capabilities"));
            assert_eq!(
                caps.drop.as_deref(),
                Some(&["ALL".to_owned()][..]),
                "{what}: drop ALL"
            );
            let added = caps.add.clone().unwrap_or_default();
            for cap in &added {
                assert!(allowed.contains(&cap.as_str()), "{what}: adds {cap}");
            }
            assert_eq!(
                sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
                Some("RuntimeDefault"),
                "{what}: seccompProfile"
            );
            let resources = c
                .resources
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: resources"));
            for (kind, list) in [
                ("requests", &resources.requests),
                ("limits", &resources.limits),
            ] {
                assert!(
                    list.as_ref().is_some_and(|l| l.contains_key("memory")),
                    "{what}: memory {kind}"
                );
            }
            added
        })
        .collect()
}

#[test]
fn agent_daemonset_is_least_privilege() {
    let ds = agent_daemonset();
    let added = assert_least_privilege(&ds, &AGENT_CAPABILITIES);
    assert_eq!(
        added,
        [AGENT_CAPABILITIES.map(String::from).to_vec()],
        "the agent gets exactly its three capabilities"
    );
    let spec = pod_spec(&ds);
    let c = container(&ds);
    let sc = c.security_context.as_ref().unwrap();
    // uid 0 on purpose (see the file); the three capabilities are root's only.
    assert_eq!(sc.run_as_user, Some(0));
    assert!(c.command.is_none(), "the image's entrypoint runs");

    // The node agent: every node, first, on the node's network.
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("npc-agent"));
    let strategy = ds.spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::Int(1))
    );
    assert!(spec.termination_grace_period_seconds.is_some());

    // NODE_NAME from the downward API.
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );

    // The pins and the names on the host, where the mounts put them.
    let mounts: Vec<(&str, &str)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == m.name)
                .unwrap();
            let host = volume.host_path.as_ref().expect("a host path");
            assert!(m.read_only != Some(true), "{} is written", m.mount_path);
            (m.mount_path.as_str(), host.path.as_str())
        })
        .collect();
    for (flag_name, default) in [("--bpffs", "/sys/fs/bpf/npc"), ("--state-dir", "/run/npc")] {
        let dir = flag(c, flag_name).unwrap_or(default);
        assert!(
            mounts
                .iter()
                .any(|(mount, host)| Path::new(dir).starts_with(mount) && mount == host),
            "{flag_name}={dir} is on a host path mounted at the same place: {mounts:?}"
        );
    }
    let bpffs = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.host_path.as_ref().filter(|h| h.path == "/sys/fs/bpf"))
        .unwrap();
    assert_eq!(
        bpffs.type_.as_deref(),
        Some("Directory"),
        "the host's bpffs"
    );

    // Probes and scrape annotations on the metrics port.
    let port = metrics_addr(c).port();
    let metrics_port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(metrics_port.container_port, i32::from(port));
    for (probe, path) in [
        (&c.startup_probe, "/healthz"),
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        assert_eq!(http_probe(c, probe.as_ref(), path), (path.to_owned(), port));
    }
    let annotations = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .expect("scrape annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

#[test]
fn cleanup_daemonset_is_least_privilege() {
    let ds = cleanup_daemonset();
    let added = assert_least_privilege(&ds, &[]);
    assert!(added.iter().all(Vec::is_empty), "no capability: {added:?}");
    let spec = pod_spec(&ds);
    assert_ne!(spec.host_network, Some(true));
    assert_eq!(spec.automount_service_account_token, Some(false));
    let cleanup = &spec.init_containers.as_ref().expect("the cleanup")[0];
    assert_eq!(cleanup.args.as_ref().unwrap()[0], "cleanup");
    // The agent's pins.
    assert_eq!(
        flag(cleanup, "--bpffs"),
        flag(container(&agent_daemonset()), "--bpffs")
    );
    assert_eq!(cleanup.image, container(&agent_daemonset()).image);
}

// ---------------------------------------------------------------------------------------------
// The real agent with the DaemonSet's settings, in a lab
// ---------------------------------------------------------------------------------------------

/// Pods a and b (ns-x, on a bridge) and c (ns-y, routed), each serving TCP 80, declared in a
/// manifests directory for the agent.
struct LabCluster {
    _servers: Vec<ServerHandle>,
    a: Pod,
    b: Pod,
    c: Pod,
    manifests: Manifests,
    lab: Lab,
}

fn lab_cluster(name: &str) -> LabCluster {
    let lab = Lab::new("deploy").expect("lab");
    let (a, b, c) = add_abc(&lab);
    let servers = [&a, &b, &c]
        .iter()
        .map(|p| p.serve_tcp(80).unwrap())
        .collect();
    let decl = |ns: &str, pod: &Pod, labels: &str| PodDecl {
        ns: ns.to_owned(),
        name: pod.name.clone(),
        labels: labels.to_owned(),
        ports: "[{name: http, containerPort: 80}]".to_owned(),
        ip: IpAddr::V4(pod.ipv4),
    };
    let pods = [
        decl("ns-x", &a, "{app: a}"),
        decl("ns-x", &b, "{app: b}"),
        decl("ns-y", &c, "{app: c}"),
    ];
    let namespaces = [
        ("ns-x".to_owned(), "{team: red}".to_owned()),
        ("ns-y".to_owned(), "{team: blue}".to_owned()),
    ];
    let manifests = Manifests::new(&format!("deploy-{name}"));
    manifests.write("cluster.yaml", &cluster_yaml(&namespaces, &pods));
    LabCluster {
        _servers: servers,
        a,
        b,
        c,
        manifests,
        lab,
    }
}

/// The DaemonSet container's arguments for a lab: `--bpffs` and `--state-dir` are the test's
/// (the support passes its own), and the policy source is the lab's manifests directory
/// (without a node name: every pod is local). Everything else, `--metrics-addr` included, is the
/// DaemonSet's.
fn lab_args(c: &Container, manifests: &Path) -> Vec<String> {
    let mut args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .filter(|a| !a.starts_with("--bpffs=") && !a.starts_with("--state-dir="))
        .cloned()
        .collect();
    args.push(format!("--manifests={}", manifests.display()));
    args
}

/// `GET path` on `127.0.0.1:port` in the lab's node namespace: the status code and the body.
fn http_get(lab: &Lab, port: u16, path: &str) -> Option<(u16, String)> {
    in_netns(lab.node_netns(), || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    })
}

/// Polls `GET path` until it answers 200, within [`LOG_WAIT`]; returns the body.
fn wait_200(lab: &Lab, agent: &Agent, port: u16, path: &str) -> String {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let got = http_get(lab, port, path);
        if let Some((200, body)) = got {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} on port {port}: {got:?}; the agent's log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent in `k`'s lab with container `c`'s arguments (see [`lab_args`]) and literal
/// environment, its command after `wrapper`. Enter::Netns: the host's /sys/fs/bpf is a bpffs,
/// as the DaemonSet's volume gives it.
fn spawn_as_in_daemonset(k: &LabCluster, c: &Container, wrapper: &[&str]) -> Agent {
    let args = lab_args(c, k.manifests.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = literal_env(c);
    let env: Vec<(&str, &std::ffi::OsStr)> = env
        .iter()
        .map(|(k, v)| (k.as_str(), std::ffi::OsStr::new(v)))
        .collect();
    Agent::spawn_wrapped(
        &k.lab,
        Enter::Netns,
        unique_bpffs(),
        true,
        &args,
        &env,
        wrapper,
    )
}

/// The agent started with the DaemonSet's arguments, port and environment answers the
/// DaemonSet's startup, liveness and readiness probes with 200 (readiness once ready), and
/// serves the annotated metrics path on the annotated port.
#[test]
fn probes_answer_on_the_daemonsets_port() {
    let ds = agent_daemonset();
    let c = container(&ds);
    let k = lab_cluster("probes");
    let agent = spawn_as_in_daemonset(&k, c, &[]);

    let (ready_path, ready_port) = http_probe(c, c.readiness_probe.as_ref(), "readiness");
    let body = wait_200(&k.lab, &agent, ready_port, &ready_path);
    assert_eq!(body.trim(), "ready");
    for (probe, what) in [
        (&c.startup_probe, "startup"),
        (&c.liveness_probe, "liveness"),
    ] {
        let (path, port) = http_probe(c, probe.as_ref(), what);
        assert_eq!(
            http_get(&k.lab, port, &path).map(|(status, _)| status),
            Some(200),
            "{what} probe: GET {path} on {port}"
        );
    }
    let annotations = ds.spec.template.metadata.as_ref().unwrap();
    let annotations = annotations.annotations.as_ref().unwrap();
    let port: u16 = annotations["prometheus.io/port"].parse().unwrap();
    let body = wait_200(&k.lab, &agent, port, &annotations["prometheus.io/path"]);
    assert!(body.contains("npc_build_info"), "{body}");
    // Served on every address of the node, as the DaemonSet's 0.0.0.0 says: also on b's
    // gateway address (the bridge's), not only on loopback.
    if metrics_addr(c).ip().is_unspecified() {
        let got = in_netns(k.lab.node_netns(), || {
            std::net::TcpStream::connect(("10.66.0.1", ready_port)).is_ok()
        });
        assert!(got, "the agent listens on the node's addresses");
    }
}

/// Capability numbers (linux/capability.h) of the names Kubernetes uses.
fn capability_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its number here"),
    }
}

/// `setpriv` arguments that start a command as the container runtime starts a container's
/// process with `securityContext` `runAsUser`/`runAsGroup` (0), `capabilities: {drop: [ALL],
/// add: caps}` and `allowPrivilegeEscalation: false`: uid and gid 0, no supplementary groups,
/// exactly `caps` in the bounding set (so, as root, in the permitted and effective sets), none
/// inheritable or ambient, no_new_privs.
fn setpriv(container: &Container, caps: &[String]) -> Vec<String> {
    let sc = container.security_context.as_ref().unwrap();
    let uid = sc.run_as_user.expect("runAsUser");
    let gid = sc.run_as_group.expect("runAsGroup");
    let mut bounding = String::from("-all");
    for cap in caps {
        bounding.push_str(&format!(",+{}", cap.to_lowercase()));
    }
    vec![
        "setpriv".into(),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        format!("--bounding-set={bounding}"),
        "--".into(),
    ]
}

/// A `CapXxx:` or `NoNewPrivs:` line of /proc/PID/status.
fn proc_status(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The agent as the DaemonSet runs it (uid 0, only the added capabilities, no_new_privs, the
/// host's bpffs already mounted) loads the datapath, becomes ready, attaches to the pods'
/// veths, learns which veth carries which pod, enforces an allowed and a denied connection and
/// logs no warning or error. Then `npc-agent cleanup` with the cleanup DaemonSet's capabilities
/// (none) removes its pins.
#[test]
fn agent_enforces_with_only_the_daemonsets_capabilities() {
    let ds = agent_daemonset();
    let c = container(&ds);
    let caps = added_capabilities(c);
    let k = lab_cluster("caps");
    let wrapper = setpriv(c, &caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut agent = spawn_as_in_daemonset(&k, c, &wrapper);
    agent.wait_for("the agent to start", |l| l.contains("starting"));

    // The process has exactly these capabilities, and no_new_privs.
    let want: u64 = caps.iter().map(|c| 1u64 << capability_bit(c)).sum();
    let pid = agent.pid();
    for key in ["CapPrm", "CapEff", "CapBnd"] {
        let got = u64::from_str_radix(&proc_status(pid, key), 16).unwrap();
        assert_eq!(got, want, "{key} of the agent: {got:#x}, want {want:#x}");
    }
    for key in ["CapInh", "CapAmb"] {
        assert_eq!(u64::from_str_radix(&proc_status(pid, key), 16).unwrap(), 0);
    }
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");

    let (ready_path, ready_port) = http_probe(c, c.readiness_probe.as_ref(), "readiness");
    wait_200(&k.lab, &agent, ready_port, &ready_path);
    for pod in [&k.a, &k.b, &k.c] {
        agent.wait_attached(&pod.host_veth);
        // Learnt from the node's namespace with netlink (anti-spoofing binds the address to
        // the veth), which needs CAP_NET_ADMIN only.
        endpoint_until(&agent, pod, "the pod's veth learnt", |e| {
            e.is_local() && e.ifindex == pod.host_ifindex
        });
    }
    reaches(&k.c, &k.b, 80, "no policy: open");
    k.manifests.write(
        "policy.yaml",
        &policy(
            "ns-x",
            "b-from-a",
            "{podSelector: {matchLabels: {app: b}}, ingress: [{from: [\
             {podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}]}]}",
        ),
    );
    blocked(&k.c, &k.b, 80, "denied: c is not app=a");
    reaches(&k.a, &k.b, 80, "allowed: a");

    let log = agent.log();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("error:"))
        .collect();
    assert!(
        complaints.is_empty(),
        "the agent warned or failed with the DaemonSet's capabilities:\n{}",
        complaints.join("\n")
    );
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit();
    assert!(status.success(), "the agent exited with {status}:\n{log}");

    // The cleanup, as the cleanup DaemonSet runs it.
    let cleanup_ds = cleanup_daemonset();
    let cleanup = &pod_spec(&cleanup_ds).init_containers.as_ref().unwrap()[0];
    let wrapper = setpriv(cleanup, &added_capabilities(cleanup));
    let mut args: Vec<String> = cleanup
        .args
        .iter()
        .flatten()
        .filter(|a| !a.starts_with("--bpffs="))
        .cloned()
        .collect();
    args.push(format!("--bpffs={}", agent.bpffs.display()));
    assert!(agent.bpffs.exists(), "the agent's pins are there");
    let out = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(AGENT)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("running npc-agent cleanup");
    assert!(
        out.status.success(),
        "npc-agent cleanup with the cleanup DaemonSet's capabilities failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !agent.bpffs.exists(),
        "cleanup removed {}",
        agent.bpffs.display()
    );
}

/// No capability is superfluous: without any one of the DaemonSet's, the agent stops with an
/// error instead of becoming ready.
#[test]
fn each_capability_is_needed() {
    let ds = agent_daemonset();
    let c = container(&ds);
    let caps = added_capabilities(c);
    let lab = Lab::new("deploy").expect("lab");
    let manifests = Manifests::new("deploy-needed");
    let args = lab_args(c, manifests.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    for missing in &caps {
        let others: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let wrapper = setpriv(c, &others);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let mut agent = Agent::spawn_wrapped(
            &lab,
            Enter::Netns,
            unique_bpffs(),
            true,
            &args,
            &[],
            &wrapper,
        );
        let error = agent.wait_for(&format!("the agent without {missing} to fail"), |l| {
            l.contains("npc-agent: error:")
        });
        let status = agent.wait_exit();
        assert!(!status.success(), "without {missing}: {status}");
        eprintln!("without {missing}: {error}");
    }
}
