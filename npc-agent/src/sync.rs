//! The policy sync: cluster state in, maps out. Compiles the state, learns which host veth
//! carries which local pod, and has the reconciler write the difference. Bursts of changes are
//! coalesced by the caller (`run`), which calls `sync` at most every `COALESCE`.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

use crate::{
    compiler::{Identities, compile},
    dataplane::{Maps, node_addresses, pod_veths},
    http::Readiness,
    model::ClusterState,
    reconcile::{Reconciler, Stats},
};

/// How long a burst of changes may keep accumulating before it is applied.
pub const COALESCE: std::time::Duration = std::time::Duration::from_millis(100);

pub struct PolicySync {
    reconciler: Reconciler,
    identities: Identities,
    /// Where the pods' network namespaces are (to learn their host veths).
    netns_dirs: Vec<PathBuf>,
    ready: Readiness,
}

impl PolicySync {
    /// Adopts what the maps hold now (left by a previous agent, or empty).
    pub fn new(maps: &Maps, netns_dirs: Vec<PathBuf>, ready: Readiness) -> Result<PolicySync> {
        Ok(PolicySync {
            reconciler: Reconciler::adopt(maps).context("reading the maps to adopt them")?,
            identities: Identities::default(),
            netns_dirs,
            ready,
        })
    }

    /// Brings the maps to `state`. The first success makes the agent ready.
    pub async fn sync(&mut self, maps: &mut Maps, state: &ClusterState) -> Result<Stats> {
        let start = Instant::now();
        let mut state = state.clone();
        state.node_ips = node_addresses()
            .await
            .context("reading the node's addresses")?;
        let desired = compile(&state, &mut self.identities);
        let veths = self.learn_veths().await;
        let stats = self.reconciler.apply(maps, &desired, &veths)?;
        let local_pods = desired
            .endpoints
            .values()
            .filter(|e| e.flags & npc_common::ENDPOINT_LOCAL != 0)
            .count();
        info!(
            took_ms = start.elapsed().as_secs_f64() * 1e3,
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

    async fn learn_veths(&self) -> BTreeMap<IpAddr, u32> {
        let dirs = self.netns_dirs.clone();
        match tokio::task::spawn_blocking(move || pod_veths::learn(&dirs)).await {
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
