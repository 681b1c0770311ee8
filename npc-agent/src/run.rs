//! The agent's subcommands: [`run`] (load the datapath, attach it to the pod interfaces, wait
//! for a signal) and [`cleanup`] (remove the pins).
use std::{
    collections::HashMap,
    fmt, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures::StreamExt as _;
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use npc_common::{CONFIG_ALLOW_HOST, CONFIG_AUDIT, CONFIG_UNKNOWN_ALLOW};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use tokio::time::Instant;

use crate::{
    cli::Glob,
    dataplane::{
        AttachMode, Datapath, LoadOptions,
        gc::spawn_conntrack_gc,
        links::{Link, LinkEvent, watch_links},
        migrate,
    },
    deny_log,
    http::{self, Readiness},
    metrics::Metrics,
    sources::{Source, kube::KubeWatch, manifests::ManifestsSource},
    sync::{COALESCE, PolicySync},
};

/// What [`run`] does; built from the command line by [`crate::cli::RunArgs::into_options`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Where Namespaces, Pods and NetworkPolicies come from.
    pub source: PolicySource,
    /// This node's name (pods with this `spec.nodeName` are local); required in Kubernetes mode.
    pub node_name: Option<String>,
    /// The HTTP endpoint (/healthz, /readyz).
    pub metrics_addr: std::net::SocketAddr,
    /// Where the agent publishes its names (`names.json`) for `npc-agent dump`.
    pub state_dir: PathBuf,
    /// Where and how to load the datapath (pin directory, conntrack size, runtime switches).
    pub load: LoadOptions,
    /// Which interfaces to attach to.
    pub interfaces: InterfaceFilter,
}

/// Where the agent takes the cluster state from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    /// The Kubernetes API server (in-cluster config or `KUBECONFIG`).
    Kubernetes,
    /// A watched directory of manifests.
    Manifests(PathBuf),
    /// None: only the datapath's defaults apply (every pod is an unknown endpoint).
    DatapathOnly,
}

/// Which interfaces of the agent's network namespace get the datapath.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum InterfaceFilter {
    /// Every veth (the host side of a pod's interface, with every common CNI).
    #[default]
    Veths,
    /// Every interface whose name matches one of the patterns, whatever its kind.
    Names(Vec<Glob>),
}

impl InterfaceFilter {
    pub fn selects(&self, link: &Link) -> bool {
        match self {
            InterfaceFilter::Veths => link.is_veth(),
            InterfaceFilter::Names(globs) => globs.iter().any(|g| g.matches(&link.name)),
        }
    }
}

impl fmt::Display for InterfaceFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterfaceFilter::Veths => f.write_str("every veth"),
            InterfaceFilter::Names(globs) => {
                f.write_str("names matching ")?;
                for (i, g) in globs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{g}")?;
                }
                Ok(())
            }
        }
    }
}

/// `npc-agent run`: loads the datapath, attaches it to every selected interface (present now or
/// created later) and keeps it attached until a signal (SIGTERM, SIGINT) arrives. The tcx links
/// stay pinned when the agent stops, so enforcement goes on with the maps as they are until the
/// next agent adopts them (`npc-agent cleanup` detaches); cls_bpf filters (kernels without tcx)
/// are removed.
///
/// Watches the network namespace of the calling thread. Errors when the datapath cannot be
/// loaded or the interface watch cannot be started or stops; a failure to attach to one
/// interface is only logged.
pub async fn run(opts: Options) -> Result<()> {
    // First, so that a signal during the (possibly slow) load still ends in a clean shutdown.
    let mut signals = Signals::install()?;
    let config = opts.load.config;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        bpffs = %opts.load.bpffs.display(),
        interfaces = %opts.interfaces,
        unknown_endpoints = %if config.flags & CONFIG_UNKNOWN_ALLOW != 0 { "allow" } else { "deny" },
        host_traffic = %if config.flags & CONFIG_ALLOW_HOST != 0 { "allow" } else { "policy" },
        audit = config.flags & CONFIG_AUDIT != 0,
        conntrack_size = opts.load.conntrack_capacity,
        events_per_sec = config.events_per_sec,
        events_burst = config.events_burst,
        "starting"
    );
    // Kubernetes mode's settings are checked before anything is loaded.
    let kube = match &opts.source {
        PolicySource::Kubernetes => Some(kube_client(opts.node_name.as_deref()).await?),
        _ => None,
    };
    let ready = Readiness::default();
    let datapath = Datapath::load(&opts.load)?;
    let metrics = Metrics::new(&opts.load.bpffs)?;
    http::serve(opts.metrics_addr, ready.clone(), metrics.clone()).await?;
    let mut links = watch_links()
        .await
        .context("watching the network interfaces")?;
    let mut attacher = Attacher::new(datapath, opts.interfaces);

    let mut source = match &opts.source {
        PolicySource::Manifests(dir) => {
            info!(dir = %dir.display(), node = ?opts.node_name, "policy source: manifests");
            let manifests = ManifestsSource::new(dir.clone(), opts.node_name.clone());
            Some(Source::Manifests(
                manifests.watch().await.context("reading the manifests")?,
            ))
        }
        PolicySource::Kubernetes => {
            let (client, node) = kube.expect("made above in Kubernetes mode");
            info!(node = %node, "policy source: Kubernetes API");
            Some(Source::Kube(KubeWatch::start(
                client,
                node,
                metrics.clone(),
            )))
        }
        PolicySource::DatapathOnly => {
            warn!("no policy source (--datapath-only): only the datapath's defaults apply");
            ready.set_ready();
            None
        }
    };
    // Links inherited from a previous agent keep running its programs (with its maps) until
    // this agent's maps hold the full state: the first sync, or now without a source.
    let mut adopted = false;
    if source.is_none() {
        attacher.adopt_links();
        adopted = true;
    }
    let mut sync = PolicySync::new(
        &attacher.datapath.maps,
        ready.clone(),
        opts.state_dir.clone(),
        metrics.clone(),
    )?;
    if attacher.datapath.recheck_flows() {
        sync.recheck_all_flows();
    }
    let ring = attacher
        .datapath
        .maps
        .events
        .take()
        .context("the events ring buffer was already taken")?;
    let _deny_log = deny_log::spawn(ring, sync.names()).context("reading deny events")?;
    let _gc = spawn_conntrack_gc(
        opts.load.bpffs.clone(),
        CONNTRACK_GC_INTERVAL,
        metrics.clone(),
    );
    // When the next sync is due: a burst of changes (policies, pods, new veths) is applied once.
    // The first is due when the source has its initial state.
    let mut due: Option<Instant> = None;

    let result = loop {
        let next_sync = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            signal = signals.recv() => {
                info!(signal, "shutting down");
                break Ok(());
            }
            event = links.next() => match event {
                Some(event) => {
                    attacher.handle(event);
                    metrics.set_attached_interfaces(attacher.attached.len() as u64);
                    // A new veth may be a pod's: learn it (anti-spoofing).
                    if source.is_some() && sync.has_synced() {
                        due.get_or_insert(Instant::now() + COALESCE);
                    }
                }
                None => break Err(anyhow!("the network interface watch stopped")),
            },
            changed = async { source.as_mut().expect("guarded").changed().await }, if source.is_some() => {
                if changed.is_err() {
                    break Err(anyhow!("the policy source stopped"));
                }
                // The initial state at once, later changes coalesced.
                let delay = if sync.has_synced() { COALESCE } else { std::time::Duration::ZERO };
                due.get_or_insert(Instant::now() + delay);
            }
            () = next_sync => {
                due = None;
                let update = source.as_mut().expect("a sync is only due with a source").current();
                metrics.set_invalid_objects(&update.invalid_objects);
                let synced = sync.sync(&mut attacher.datapath.maps, &update.state).await;
                drop(update);
                release_freed_memory();
                match synced {
                    Ok(_) if !adopted => {
                        attacher.adopt_links();
                        adopted = true;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        // The maps keep their last good contents; try again shortly.
                        warn!(error = format!("{error:#}"), "policy sync failed; retrying in 1 s");
                        due = Some(Instant::now() + std::time::Duration::from_secs(1));
                    }
                }
            }
        }
    };
    attacher.release();
    result
}

/// Hands the heap's free pages back to the kernel. A sync and a source reload free large
/// transient allocations (a parsed manifests file is several times its size) that glibc would
/// otherwise keep as resident memory.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Kubernetes mode's client and node name: in-cluster config or `KUBECONFIG` (no connection is
/// made yet).
async fn kube_client(node_name: Option<&str>) -> Result<(kube::Client, String)> {
    let node = node_name.filter(|n| !n.is_empty()).context(
        "Kubernetes mode needs this node's name: set --node-name or NODE_NAME (from the \
         downward API's spec.nodeName), or use --manifests DIR",
    )?;
    let client = kube::Client::try_default().await.context(
        "Kubernetes mode: no usable API credentials (neither an in-cluster ServiceAccount nor \
         KUBECONFIG); use --manifests DIR without a cluster",
    )?;
    Ok((client, node.to_string()))
}

/// How often expired conntrack entries are deleted (and `npc_conntrack_entries` refreshed).
const CONNTRACK_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// SIGTERM and SIGINT.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    /// The name of the next signal received.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// An interface the datapath is attached to.
struct Attached {
    name: String,
    mode: AttachMode,
}

/// Keeps the datapath attached to the selected interfaces, following link events. Owns the
/// datapath.
struct Attacher {
    datapath: Datapath,
    filter: InterfaceFilter,
    attached: HashMap<u32, Attached>,
}

impl Attacher {
    fn new(datapath: Datapath, filter: InterfaceFilter) -> Attacher {
        Attacher {
            datapath,
            filter,
            attached: HashMap::new(),
        }
    }

    /// Applies one link event. `Added` is idempotent (it is repeated for every change of a
    /// link), `Removed` may name a link never seen.
    fn handle(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Added(link) if self.filter.selects(&link) => self.attach(link),
            LinkEvent::Added(link) => {
                // Renamed so that it is no longer selected, or inherited from an agent that
                // selected other interfaces.
                self.datapath.detach(link.index);
                if let Some(was) = self.attached.remove(&link.index) {
                    info!(
                        ifindex = link.index,
                        name = %link.name,
                        old_name = %was.name,
                        mode = %mode_name(was.mode),
                        "detached: renamed, no longer selected"
                    );
                }
            }
            LinkEvent::Removed { index, .. } => {
                // Harmless for an interface the datapath is not attached to, and for a gone
                // one (its links went with it).
                self.datapath.detach(index);
                if let Some(was) = self.attached.remove(&index) {
                    info!(
                        ifindex = index,
                        name = %was.name,
                        mode = %mode_name(was.mode),
                        "detached: interface removed"
                    );
                }
            }
        }
    }

    fn attach(&mut self, link: Link) {
        match self.datapath.attach(link.index) {
            Ok(mode) => {
                let was = self.attached.insert(
                    link.index,
                    Attached {
                        name: link.name.clone(),
                        mode,
                    },
                );
                match was {
                    None => info!(
                        ifindex = link.index,
                        name = %link.name,
                        mode = %mode_name(mode),
                        "attached"
                    ),
                    Some(was) if was.name != link.name => info!(
                        ifindex = link.index,
                        name = %link.name,
                        old_name = %was.name,
                        mode = %mode_name(mode),
                        "attached interface renamed"
                    ),
                    Some(_) => {}
                }
            }
            // Typically the interface vanished between its event and now (its `Removed` event
            // follows). Otherwise the next event about it retries.
            Err(error) => warn!(
                ifindex = link.index,
                name = %link.name,
                error = format!("{error:#}"),
                "attach failed"
            ),
        }
    }

    /// Swaps this agent's programs into the links inherited from the previous agent, then
    /// carries over the flows its programs tracked until then (when maps were replaced) and
    /// removes the maps it used.
    fn adopt_links(&mut self) {
        let adopted = self.datapath.adopt_links();
        let bpffs = self.datapath.bpffs().to_path_buf();
        let flows = migrate::carry_over_flows(&bpffs, &mut self.datapath.maps);
        if let Err(error) = migrate::remove_retired(&bpffs) {
            warn!(
                error = format!("{error:#}"),
                "removing the retired maps failed"
            );
        }
        if adopted > 0 || flows > 0 {
            info!(
                interfaces = adopted,
                flows_carried_over = flows,
                "adopted the previous agent's links"
            );
        }
    }

    /// At shutdown: pinned tcx links stay (enforcement goes on); cls_bpf filters are removed.
    fn release(&mut self) {
        let clsact = self
            .attached
            .values()
            .filter(|a| a.mode == AttachMode::Clsact)
            .count();
        let kept = self.datapath.release();
        if clsact > 0 {
            warn!(
                interfaces = clsact,
                "cls_bpf filters removed: without tcx (kernel < 6.6) pods are not enforced \
                 until the next agent attaches"
            );
        }
        if kept > 0 {
            info!(
                interfaces = kept,
                "tcx links stay pinned: enforcement goes on with the current maps until the next \
             agent adopts them (`npc-agent cleanup` detaches)"
            );
        }
    }
}

fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Tcx => "tcx",
        AttachMode::Clsact => "clsact",
    }
}

/// `npc-agent cleanup`: removes everything pinned under `dir` and `dir` itself (kept when it is
/// a mount point), and returns the removed paths, parents after their contents. A missing `dir`
/// is nothing to do. Refuses to touch a directory that is not on a bpffs.
pub fn cleanup(dir: &Path) -> Result<Vec<PathBuf>> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", dir.display())),
        Ok(m) if !m.is_dir() => bail!("{} is not a directory", dir.display()),
        Ok(_) => {}
    }
    let on_bpffs = statfs(dir)
        .with_context(|| format!("inspecting {}", dir.display()))?
        .filesystem_type()
        == BPF_FS_MAGIC;
    if !on_bpffs {
        bail!(
            "{} is not on a bpffs, so it holds no pins: refusing to remove anything there \
             (note that `ip netns exec` hides the host's /sys/fs/bpf)",
            dir.display()
        );
    }
    let mut removed = Vec::new();
    remove_contents(dir, &mut removed)?;
    match std::fs::remove_dir(dir) {
        Ok(()) => removed.push(dir.to_path_buf()),
        // A bpffs mounted on the directory itself.
        Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
    }
    Ok(removed)
}

fn remove_contents(dir: &Path, removed: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    for path in entries {
        let is_dir = std::fs::symlink_metadata(&path)
            .with_context(|| format!("inspecting {}", path.display()))?
            .is_dir();
        if is_dir {
            remove_contents(&path, removed)?;
            std::fs::remove_dir(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("removing {}", path.display()))?;
        removed.push(path);
    }
    Ok(())
}
