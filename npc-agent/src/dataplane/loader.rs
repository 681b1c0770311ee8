//! Loads the eBPF object, pins its maps and attaches its programs to interfaces.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    programs::{
        LinkOrder, SchedClassifier, TcAttach, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId},
    },
    util::KernelVersion,
};
use npc_common::{Config, Direction, capacity, map_names, program_names};
use tracing::{debug, info};

use super::{
    bpffs::ensure_bpffs,
    maps::{BLOCKED_OVERFLOW_CELLS, Maps},
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

/// The loaded datapath: programs, their attachments, and the typed maps.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    bpffs: PathBuf,
    mode: AttachMode,
    attached: HashMap<u32, (AttachMode, [SchedClassifierLinkId; 2])>,
}

impl Datapath {
    /// Loads the object; maps already pinned under `opts.bpffs` (by an earlier agent) are reused
    /// with their contents, others are created and pinned.
    pub fn load(opts: &LoadOptions) -> Result<Datapath> {
        ensure_bpffs(&opts.bpffs)?;
        if OBJECT.is_empty() {
            anyhow::bail!("this binary was built with AYA_BUILD_SKIP: it has no eBPF object");
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&opts.bpffs)
            .map_max_entries(map_names::CONNTRACK, opts.conntrack_capacity)
            .map_max_entries(
                map_names::BLOCKED,
                opts.blocked_capacity.saturating_add(BLOCKED_OVERFLOW_CELLS),
            )
            .load(OBJECT)
            .with_context(|| {
                format!(
                    "loading the eBPF object with its maps under {}",
                    opts.bpffs.display()
                )
            })?;
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        let mut maps = Maps::take(|name| ebpf.take_map(name))?;
        maps.set_config(opts.config)?;
        maps.init_blocked_overflow()?;
        info!(bpffs = %opts.bpffs.display(), "datapath loaded");
        Ok(Datapath {
            ebpf,
            maps,
            bpffs: opts.bpffs.clone(),
            mode: opts.attach_mode.unwrap_or_else(|| {
                let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
                if tcx {
                    AttachMode::Tcx
                } else {
                    AttachMode::Clsact
                }
            }),
            attached: HashMap::new(),
        })
    }

    /// How this datapath attaches to interfaces.
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
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

    /// Attaches `from_pod` to the interface's ingress hook and `to_pod` to its egress hook, in
    /// the datapath's attach mode (tcx links, or cls_bpf filters under a clsact qdisc).
    /// Idempotent per ifindex.
    pub fn attach(&mut self, ifindex: u32) -> Result<AttachMode> {
        if let Some((mode, _)) = self.attached.get(&ifindex) {
            return Ok(*mode);
        }
        let mode = self.mode;
        if mode == AttachMode::Clsact {
            match tc::qdisc_add_clsact(ifindex) {
                Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
                Err(e) => return Err(e).with_context(|| format!("adding clsact to {ifindex}")),
            }
        }
        let ids = self.attach_with(ifindex, mode)?;
        debug!(ifindex, ?mode, "attached");
        self.attached.insert(ifindex, (mode, ids));
        Ok(mode)
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

    /// Detaches from an interface (a no-op when the interface is gone: its links went with it).
    pub fn detach(&mut self, ifindex: u32) {
        if let Some((_, [ingress, egress])) = self.attached.remove(&ifindex) {
            if let Ok(p) = self.program_mut(program_names::FROM_POD) {
                let _ = p.detach(ingress);
            }
            if let Ok(p) = self.program_mut(program_names::TO_POD) {
                let _ = p.detach(egress);
            }
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = (u32, AttachMode)> + '_ {
        self.attached.iter().map(|(i, (m, _))| (*i, *m))
    }
}
