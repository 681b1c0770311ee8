//! Loads the eBPF object, pins its maps and attaches its programs to interfaces through pinned
//! tcx links, which outlive the agent: a restarted or upgraded agent inherits them and swaps its
//! programs in atomically, so no packet passes unchecked in between.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfError, EbpfLoader, include_bytes_aligned,
    maps::MapError,
    programs::{
        LinkOrder, SchedClassifier, TcAttach, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId},
    },
    util::KernelVersion,
};
use npc_common::{
    CONFIG_ALLOW_HOST, CONFIG_AUDIT, CONFIG_GRANDFATHER, CONFIG_UNKNOWN_ALLOW, Config, Direction,
    capacity, map_names, program_names,
};
use tracing::{debug, info, warn};

use super::{
    bpffs::ensure_bpffs,
    maps::{BLOCKED_OVERFLOW_CELLS, Maps},
    migrate,
};

/// The datapath object, built by build.rs from npc-ebpf.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/npc"));

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where maps are pinned (a bpffs is mounted there if needed).
    pub bpffs: PathBuf,
    pub conntrack_capacity: u32,
    /// Per-port cells of the `blocked` map (denied connections per direction, protocol and
    /// port); the map gets `BLOCKED_OVERFLOW_CELLS` (24) more for the overflow cells. Connections
    /// to ports that find it full count in the overflow cell of their direction and protocol.
    pub blocked_capacity: u32,
    pub config: Config,
    /// How to attach; `None`: tcx where the kernel has it (>= 6.6), else clsact.
    pub attach_mode: Option<AttachMode>,
}

impl LoadOptions {
    pub fn new(bpffs: impl Into<PathBuf>) -> LoadOptions {
        LoadOptions {
            bpffs: bpffs.into(),
            conntrack_capacity: capacity::CONNTRACK,
            blocked_capacity: capacity::BLOCKED,
            config: Config::default(),
            attach_mode: None,
        }
    }
}

/// How the programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (kernel >= 6.6), placed first so policy runs before the CNI's programs.
    Tcx,
    /// cls_bpf filters under a clsact qdisc (older kernels).
    Clsact,
}

/// The directory under the pin directory that holds the tcx links (`<ifindex>-ingress`,
/// `<ifindex>-egress`).
pub const LINKS_DIR: &str = "links";

/// How one interface is attached.
enum Attachment {
    /// tcx links pinned at these paths: they outlive the agent, and removing the pins detaches.
    Tcx([PathBuf; 2]),
    /// tcx links pinned by a previous agent, still running its programs until
    /// [`Datapath::adopt_links`] swaps this agent's programs in (`None`: that hook had no link).
    Inherited([Option<SchedClassifierLink>; 2]),
    /// cls_bpf filters under a clsact qdisc.
    Clsact([SchedClassifierLinkId; 2]),
}

impl Attachment {
    fn mode(&self) -> AttachMode {
        match self {
            Attachment::Tcx(_) | Attachment::Inherited(_) => AttachMode::Tcx,
            Attachment::Clsact(_) => AttachMode::Clsact,
        }
    }
}

/// The two hooks, in the order of an attachment's links: `from_pod` on ingress, `to_pod` on
/// egress.
const HOOKS: [(TcAttachType, &str, &str); 2] = [
    (TcAttachType::Ingress, program_names::FROM_POD, "ingress"),
    (TcAttachType::Egress, program_names::TO_POD, "egress"),
];

/// The loaded datapath: programs, their attachments, and the typed maps.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    bpffs: PathBuf,
    mode: AttachMode,
    attached: HashMap<u32, Attachment>,
    /// Whether conntrack entries made before this agent started must be re-checked (the
    /// verdict-changing switches differ from those the maps were last written with).
    recheck_flows: bool,
}

impl Datapath {
    /// Loads the object. Maps already pinned under `opts.bpffs` (by an earlier agent) are reused
    /// with their contents; a pinned map this object cannot reuse (another layout or size) is
    /// retired and replaced by a new one holding its entries (see [`super::migrate`]); others
    /// are created and pinned. tcx links pinned by an earlier agent are inherited: they keep
    /// running its programs until [`Datapath::adopt_links`].
    pub fn load(opts: &LoadOptions) -> Result<Datapath> {
        ensure_bpffs(&opts.bpffs)?;
        if OBJECT.is_empty() {
            anyhow::bail!("this binary was built with AYA_BUILD_SKIP: it has no eBPF object");
        }
        let had_config = opts.bpffs.join(map_names::CONFIG).exists();
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&opts.bpffs)
            .map_max_entries(map_names::CONNTRACK, opts.conntrack_capacity)
            .map_max_entries(
                map_names::BLOCKED,
                opts.blocked_capacity.saturating_add(BLOCKED_OVERFLOW_CELLS),
            );
        migrate::clear_staging(&opts.bpffs)?;
        // Maps whose pins this object cannot reuse: made anew in the staging directory.
        let mut replaced: Vec<&'static str> = Vec::new();
        let mut ebpf = loop {
            match loader.load(OBJECT) {
                Ok(ebpf) => break ebpf,
                Err(EbpfError::MapError(MapError::IncompatiblePinnedMap {
                    name,
                    property,
                    expected,
                    actual,
                })) if !replaced.contains(&name.as_str()) => {
                    let name = *map_names::ALL
                        .iter()
                        .find(|n| **n == name)
                        .with_context(|| format!("unknown map {name} in the eBPF object"))?;
                    warn!(
                        map = %name,
                        property,
                        pinned = actual,
                        wanted = expected,
                        "the pinned map does not fit this agent: replacing it, its entries \
                         carried over"
                    );
                    loader.map_pin_path(name, migrate::staging_path(&opts.bpffs, name)?);
                    replaced.push(name);
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "loading the eBPF object with its maps under {}",
                            opts.bpffs.display()
                        )
                    });
                }
            }
        };
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        let mut maps = Maps::take(|name| ebpf.take_map(name))?;
        for (name, entries) in migrate::carry_over(&opts.bpffs, &mut maps, &replaced) {
            info!(map = %name, entries, "entries carried over into the new map");
        }
        migrate::install(&opts.bpffs, &replaced)?;
        let previous = maps.config()?;
        maps.set_config(opts.config)?;
        maps.init_blocked_overflow()?;
        let recheck_flows = !had_config
            || replaced.contains(&map_names::CONFIG)
            || previous.flags & VERDICT_FLAGS != opts.config.flags & VERDICT_FLAGS;
        let mode = opts.attach_mode.unwrap_or_else(|| {
            let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
            if tcx {
                AttachMode::Tcx
            } else {
                AttachMode::Clsact
            }
        });
        let attached = inherit_links(&opts.bpffs.join(LINKS_DIR));
        info!(
            bpffs = %opts.bpffs.display(),
            inherited_interfaces = attached.len(),
            replaced_maps = replaced.len(),
            "datapath loaded"
        );
        Ok(Datapath {
            ebpf,
            maps,
            bpffs: opts.bpffs.clone(),
            mode,
            attached,
            recheck_flows,
        })
    }

    /// How this datapath attaches to interfaces.
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Whether flows tracked before this agent started must be re-checked: the switches that
    /// change verdicts (audit, unknown endpoints, host traffic, grandfathering) differ from
    /// those the maps were last run with, or are unknown.
    pub fn recheck_flows(&self) -> bool {
        self.recheck_flows
    }

    /// The program enforcing `dir`: `to_pod` for ingress, `from_pod` for egress.
    pub fn program(&self, dir: Direction) -> &SchedClassifier {
        let name = match dir {
            Direction::Ingress => program_names::TO_POD,
            Direction::Egress => program_names::FROM_POD,
        };
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .expect("both programs are loaded in Datapath::load")
    }

    fn program_mut(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
    }

    fn link_pin(&self, ifindex: u32, hook: &str) -> PathBuf {
        self.bpffs.join(LINKS_DIR).join(format!("{ifindex}-{hook}"))
    }

    /// Attaches `from_pod` to the interface's ingress hook and `to_pod` to its egress hook, in
    /// the datapath's attach mode (pinned tcx links, or cls_bpf filters under a clsact qdisc).
    /// Idempotent per ifindex; an interface with inherited links keeps them (see
    /// [`Datapath::adopt_links`]).
    pub fn attach(&mut self, ifindex: u32) -> Result<AttachMode> {
        if let Some(attachment) = self.attached.get(&ifindex) {
            return Ok(attachment.mode());
        }
        let mode = self.mode;
        let attachment = match mode {
            AttachMode::Clsact => {
                match tc::qdisc_add_clsact(ifindex) {
                    Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("adding clsact to {ifindex}"));
                    }
                }
                Attachment::Clsact(self.attach_with(ifindex, mode)?)
            }
            AttachMode::Tcx => {
                let ids = self.attach_with(ifindex, mode)?;
                Attachment::Tcx(self.pin_links(ifindex, ids)?)
            }
        };
        debug!(ifindex, ?mode, "attached");
        self.attached.insert(ifindex, attachment);
        Ok(mode)
    }

    /// Pins both tcx links of an interface; on failure neither stays attached.
    fn pin_links(&mut self, ifindex: u32, ids: [SchedClassifierLinkId; 2]) -> Result<[PathBuf; 2]> {
        let mut links = Vec::with_capacity(2);
        for ((_, name, _), id) in HOOKS.iter().zip(ids) {
            links.push(self.program_mut(name)?.take_link(id)?);
        }
        std::fs::create_dir_all(self.bpffs.join(LINKS_DIR))
            .with_context(|| format!("creating {}", self.bpffs.join(LINKS_DIR).display()))?;
        let mut pinned: Vec<PathBuf> = Vec::with_capacity(2);
        for ((_, _, hook), link) in HOOKS.iter().zip(links) {
            let path = self.link_pin(ifindex, hook);
            let result = FdLink::try_from(link)
                .context("a tcx link is no fd link")
                .and_then(|fd| {
                    // A pin left at this path belongs to a link no longer attached.
                    let _ = std::fs::remove_file(&path);
                    fd.pin(&path)
                        .with_context(|| format!("pinning the link at {}", path.display()))
                });
            match result {
                Ok(_) => pinned.push(path),
                Err(e) => {
                    // Dropping the unpinned links detached them; remove the pinned ones too.
                    for p in &pinned {
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(e);
                }
            }
        }
        Ok(pinned.try_into().expect("one pin per hook"))
    }

    fn attach_with(
        &mut self,
        ifindex: u32,
        mode: AttachMode,
    ) -> Result<[SchedClassifierLinkId; 2]> {
        let how = |hook: TcAttachType| match mode {
            AttachMode::Tcx => TcAttach::Tcx {
                attach_type: hook,
                order: LinkOrder::first(),
            },
            AttachMode::Clsact => TcAttach::Netlink {
                parent: hook.into(),
                options: NlOptions::default(),
            },
        };
        let ingress = self
            .program_mut(program_names::FROM_POD)?
            .attach(ifindex, how(TcAttachType::Ingress))
            .with_context(|| format!("attaching from_pod to {ifindex}"))?;
        match self
            .program_mut(program_names::TO_POD)?
            .attach(ifindex, how(TcAttachType::Egress))
        {
            Ok(egress) => Ok([ingress, egress]),
            Err(e) => {
                // Never leave half an attachment behind.
                let _ = self.program_mut(program_names::FROM_POD)?.detach(ingress);
                Err(e).with_context(|| format!("attaching to_pod to {ifindex}"))
            }
        }
    }

    /// Swaps this agent's programs into the links inherited from the previous agent, each in
    /// one atomic `BPF_LINK_UPDATE` (no packet passes unchecked), and attaches a hook that had no
    /// inherited link. Call once this agent's maps hold the full state. Returns how many
    /// interfaces were adopted; an interface whose link vanished meanwhile is dropped (logged).
    pub fn adopt_links(&mut self) -> usize {
        let inherited = self.interfaces_where(|a| matches!(a, Attachment::Inherited(_)));
        let mut adopted = 0;
        for ifindex in inherited {
            let Some(Attachment::Inherited(links)) = self.attached.remove(&ifindex) else {
                continue;
            };
            match self.adopt(ifindex, links) {
                Ok(paths) => {
                    self.attached.insert(ifindex, Attachment::Tcx(paths));
                    adopted += 1;
                }
                Err(error) => warn!(
                    ifindex,
                    error = format!("{error:#}"),
                    "adopting the inherited links failed; the interface is attached again at \
                     its next change"
                ),
            }
        }
        adopted
    }

    fn adopt(
        &mut self,
        ifindex: u32,
        links: [Option<SchedClassifierLink>; 2],
    ) -> Result<[PathBuf; 2]> {
        let mut paths = Vec::with_capacity(2);
        for ((hook, name, hook_name), link) in HOOKS.iter().zip(links) {
            let path = self.link_pin(ifindex, hook_name);
            let prog = self.program_mut(name)?;
            let id = match link {
                Some(link) => prog.attach_to_link(link).with_context(|| {
                    format!("swapping {name} into the link pinned at {}", path.display())
                })?,
                None => prog
                    .attach(
                        ifindex,
                        TcAttach::Tcx {
                            attach_type: *hook,
                            order: LinkOrder::first(),
                        },
                    )
                    .with_context(|| format!("attaching {name} to {ifindex}"))?,
            };
            let fd = FdLink::try_from(prog.take_link(id)?).context("a tcx link is no fd link")?;
            if !path.exists() {
                fd.pin(&path)
                    .with_context(|| format!("pinning the link at {}", path.display()))?;
            }
            // Otherwise the pin holds the link; closing this descriptor keeps it attached.
            paths.push(path);
        }
        Ok(paths.try_into().expect("one pin per hook"))
    }

    /// Detaches from an interface (a no-op when the interface is gone: its links went with it):
    /// removes its link pins, or its cls_bpf filters.
    pub fn detach(&mut self, ifindex: u32) {
        match self.attached.remove(&ifindex) {
            Some(Attachment::Tcx(paths)) => {
                for path in paths {
                    let _ = std::fs::remove_file(path);
                }
            }
            Some(Attachment::Inherited(links)) => {
                for ((_, _, hook), link) in HOOKS.iter().zip(links) {
                    if link.is_some() {
                        let _ = std::fs::remove_file(self.link_pin(ifindex, hook));
                    }
                }
            }
            Some(Attachment::Clsact([ingress, egress])) => {
                if let Ok(p) = self.program_mut(program_names::FROM_POD) {
                    let _ = p.detach(ingress);
                }
                if let Ok(p) = self.program_mut(program_names::TO_POD) {
                    let _ = p.detach(egress);
                }
            }
            None => {}
        }
    }

    /// Removes the cls_bpf filters (they do not outlive the agent's intent the way pinned links
    /// do: a later agent could not adopt them); pinned tcx links stay. Returns how many
    /// interfaces keep their pinned links.
    pub fn release(&mut self) -> usize {
        let clsact = self.interfaces_where(|a| matches!(a, Attachment::Clsact(_)));
        for ifindex in clsact {
            self.detach(ifindex);
        }
        self.attached.len()
    }

    fn interfaces_where(&self, pred: impl Fn(&Attachment) -> bool) -> Vec<u32> {
        self.attached
            .iter()
            .filter(|(_, a)| pred(a))
            .map(|(i, _)| *i)
            .collect()
    }

    pub fn attached(&self) -> impl Iterator<Item = (u32, AttachMode)> + '_ {
        self.attached.iter().map(|(i, a)| (*i, a.mode()))
    }
}

/// Switches that change verdicts: flows tracked under other values must be re-checked.
const VERDICT_FLAGS: u32 =
    CONFIG_AUDIT | CONFIG_ALLOW_HOST | CONFIG_UNKNOWN_ALLOW | CONFIG_GRANDFATHER;

/// The tcx links pinned in `dir` that are still attached to their interface, by ifindex. Pins
/// of links no longer attached (their interface is gone) and unknown files are removed.
fn inherit_links(dir: &Path) -> HashMap<u32, Attachment> {
    let mut found: HashMap<u32, [Option<SchedClassifierLink>; 2]> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashMap::new();
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let parsed = name.split_once('-').and_then(|(i, hook)| {
            let slot = HOOKS.iter().position(|(_, _, h)| *h == hook)?;
            Some((i.parse::<u32>().ok()?, slot))
        });
        let result = match parsed {
            Some((ifindex, slot)) => inherit_link(&path, ifindex, HOOKS[slot].0)
                .map(|link| found.entry(ifindex).or_default()[slot] = Some(link)),
            None => Err(anyhow::anyhow!("not a link pin of this agent")),
        };
        if let Err(why) = result {
            debug!(pin = %path.display(), why = format!("{why:#}"), "stale link pin removed");
            let _ = std::fs::remove_file(&path);
        }
    }
    found
        .into_iter()
        .map(|(i, links)| (i, Attachment::Inherited(links)))
        .collect()
}

/// The link pinned at `path` if it is a tcx link still attached to `ifindex`'s `hook`.
fn inherit_link(path: &Path, ifindex: u32, hook: TcAttachType) -> Result<SchedClassifierLink> {
    let fd: FdLink = PinnedLink::from_pin(path)?.into();
    let program = fd.info()?.program_id();
    let (_, attached) = SchedClassifier::query_tcx(ifindex, hook)
        .with_context(|| format!("interface {ifindex} gone"))?;
    anyhow::ensure!(
        attached.iter().any(|p| p.id() == program),
        "no longer attached to interface {ifindex}"
    );
    Ok(SchedClassifierLink::try_from(fd)?)
}
