//! The policy sync: cluster state in, maps out. Compiles the state, learns which host veth
//! carries which local pod, and has the reconciler write the difference. Bursts of changes are
//! coalesced by the caller (`run`), which calls `sync` at most every `COALESCE`.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use npc_common::map_names;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    compiler::{Identities, compile_on_node},
    dataplane::{Maps, node_addresses, pod_veths},
    http::Readiness,
    metrics::{Metrics, StateStats},
    model::ClusterState,
    names::Names,
    reconcile::{Reconciler, Stats},
};

/// How long a burst of changes may keep accumulating before it is applied.
pub const COALESCE: std::time::Duration = std::time::Duration::from_millis(100);

pub struct PolicySync {
    reconciler: Reconciler,
    identities: Identities,
    ready: Readiness,
    /// Where the names are published for `npc-agent dump`.
    state_dir: PathBuf,
    /// The names of what the maps hold, for the denied-connection log.
    names: watch::Sender<Arc<Names>>,
    /// Whether the names file was written since the agent started.
    published: bool,
    /// Whether `identities` holds the numbering of the adopted maps (done at the first sync).
    numbering_adopted: bool,
    metrics: Metrics,
    timings: SyncTimings,
}

/// Where the last sync spent its time.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncTimings {
    /// Compiling the state (and adopting the maps' numbering on the first sync).
    pub compile: Duration,
    /// Reading the node's addresses and learning the pod veths (netlink).
    pub learn: Duration,
    /// Writing the difference into the maps.
    pub write: Duration,
    /// From the start to the maps holding the new state: the change is enforced.
    pub maps_updated: Duration,
    /// Building the names for the deny log and publishing them for `dump` (after the maps).
    pub names: Duration,
}

impl PolicySync {
    /// Adopts what the maps hold now (left by a previous agent, or empty).
    pub fn new(
        maps: &Maps,
        ready: Readiness,
        state_dir: PathBuf,
        metrics: Metrics,
    ) -> Result<PolicySync> {
        Ok(PolicySync {
            reconciler: Reconciler::adopt(maps).context("reading the maps to adopt them")?,
            identities: Identities::default(),
            ready,
            state_dir,
            names: watch::Sender::new(Arc::new(Names::default())),
            published: false,
            numbering_adopted: false,
            metrics,
            timings: SyncTimings::default(),
        })
    }

    /// Makes the next sync re-check every flow tracked before this agent started (the datapath's
    /// verdict-changing switches changed, see `Datapath::recheck_flows`).
    pub fn recheck_all_flows(&mut self) {
        self.reconciler.recheck_all();
    }

    /// Whether a sync succeeded since the agent started.
    pub fn has_synced(&self) -> bool {
        self.ready.is_ready()
    }

    /// Where the last successful sync spent its time.
    pub fn last_timings(&self) -> SyncTimings {
        self.timings
    }

    /// The names of the last synced state (updated after every sync).
    pub fn names(&self) -> watch::Receiver<Arc<Names>> {
        self.names.subscribe()
    }

    /// Brings the maps to `state`. The first success makes the agent ready.
    pub async fn sync(&mut self, maps: &mut Maps, state: &ClusterState) -> Result<Stats> {
        let start = Instant::now();
        let result = self.sync_inner(maps, state, start).await;
        self.metrics.observe_sync(start.elapsed(), result.is_ok());
        result
    }

    async fn sync_inner(
        &mut self,
        maps: &mut Maps,
        state: &ClusterState,
        start: Instant,
    ) -> Result<Stats> {
        let node_ips = node_addresses()
            .await
            .context("reading the node's addresses")?;
        let learned = start.elapsed();
        let t = Instant::now();
        if !self.numbering_adopted {
            // Keep the identity numbers the maps hold (left by the previous agent).
            let realized = self.reconciler.realized();
            if !realized.endpoints.is_empty() || !realized.cidrs.is_empty() {
                let endpoints = realized
                    .endpoints
                    .iter()
                    .map(|(ip, e)| (*ip, e.identity))
                    .collect();
                self.identities = Identities::adopt(state, &node_ips, &endpoints, &realized.cidrs);
            }
            self.numbering_adopted = true;
        }
        let desired = compile_on_node(state, &node_ips, &mut self.identities);
        let compile = t.elapsed();
        let t = Instant::now();
        let veths = self.learn_veths().await;
        let learn = learned + t.elapsed();
        let t = Instant::now();
        let stats = self.reconciler.apply(maps, &desired, &veths)?;
        let write = t.elapsed();
        let maps_updated = start.elapsed();
        let t = Instant::now();
        self.publish_names(state, &desired);
        self.timings = SyncTimings {
            compile,
            learn,
            write,
            maps_updated,
            names: t.elapsed(),
        };
        self.metrics.set_state(&self.state_stats(&desired));
        let local_pods = desired
            .endpoints
            .values()
            .filter(|e| e.flags & npc_common::ENDPOINT_LOCAL != 0)
            .count();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        info!(
            took_ms = ms(start.elapsed()),
            compile_ms = ms(compile),
            learn_ms = ms(learn),
            write_ms = ms(write),
            names_ms = ms(self.timings.names),
            endpoints = desired.endpoints.len(),
            local_pod_addresses = local_pods,
            veths_learned = veths.len(),
            identities = desired.identities.len(),
            policy_entries = desired.policy.len(),
            cidrs = desired.cidrs.len(),
            writes = stats.writes,
            deletes = stats.deletes,
            generations_bumped = stats.bumped,
            "policy state synced"
        );
        self.ready.set_ready();
        Ok(stats)
    }

    /// What the maps hold now, for the metrics.
    fn state_stats(&self, desired: &crate::compiler::Desired) -> StateStats {
        let realized = self.reconciler.realized();
        // Pod addresses only: the node's own addresses (identity HOST) are no pod endpoint.
        let (mut local, mut remote) = (0, 0);
        for e in realized.endpoints.values() {
            if e.flags & npc_common::ENDPOINT_LOCAL != 0 {
                local += 1;
            } else if e.identity != npc_common::IDENTITY_HOST {
                remote += 1;
            }
        }
        StateStats {
            identities: (desired.identities.len() + desired.cidr_blocks.len()) as u64,
            local_endpoints: local,
            remote_endpoints: remote,
            map_entries: vec![
                (map_names::ENDPOINTS, realized.endpoints.len() as u64),
                (map_names::INTERFACES, realized.interfaces.len() as u64),
                (map_names::CIDRS, realized.cidrs.len() as u64),
                (map_names::POLICY, realized.policy.len() as u64),
            ],
        }
    }

    /// Hands the names to the deny log and publishes them for `npc-agent dump`; a failure to
    /// write the file only costs dump its names, so it is logged, not fatal.
    fn publish_names(&mut self, state: &ClusterState, desired: &crate::compiler::Desired) {
        let names = Names::build(state, desired);
        if self.published && **self.names.borrow() == names {
            return;
        }
        match names.publish(&self.state_dir) {
            Ok(()) => self.published = true,
            Err(error) => warn!(
                error = format!("{error:#}"),
                "publishing names for npc-agent dump failed"
            ),
        }
        self.names.send_replace(Arc::new(names));
    }

    async fn learn_veths(&self) -> BTreeMap<IpAddr, u32> {
        match tokio::task::spawn_blocking(pod_veths::learn).await {
            Ok(Ok(veths)) => veths,
            Ok(Err(e)) => {
                warn!(
                    error = format!("{e:#}"),
                    "learning pod veths failed; anti-spoofing waits"
                );
                BTreeMap::new()
            }
            Err(e) => {
                warn!(error = %e, "learning pod veths panicked");
                BTreeMap::new()
            }
        }
    }
}
