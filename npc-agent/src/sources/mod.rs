//! Where the cluster state comes from. Every source turns API objects into the model with
//! [`crate::model::convert`] and hands the agent [`ClusterState`] updates:
//!
//! - [`manifests`]: a watched directory of YAML/JSON manifests (no cluster needed);
//! - [`kube`]: the Kubernetes API server.
use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::watch;

use crate::model::ClusterState;

pub mod kube;
pub mod manifests;

/// The state a source has now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// `node_ips` is left empty (the agent has its own). Shared with the source: the Kubernetes
    /// source copies its state only when it changes while a sync still holds this one.
    pub state: Arc<ClusterState>,
    /// Objects that could not be used, by kind (`file` for manifests that are no object), for
    /// `npc_invalid_objects{kind}`; every kind is present.
    pub invalid_objects: BTreeMap<String, u64>,
}

/// The running policy source.
pub enum Source {
    Manifests(watch::Receiver<manifests::Snapshot>),
    Kube(kube::KubeWatch),
}

impl Source {
    /// Waits until the source has a state worth a sync (at once for a state not yet taken).
    /// Errors when the source stopped for good.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        match self {
            Source::Manifests(rx) => rx.changed().await,
            Source::Kube(watch) => watch.changed().await,
        }
    }

    /// The state now.
    pub fn current(&mut self) -> Update {
        match self {
            Source::Manifests(rx) => {
                let snapshot = rx.borrow_and_update();
                Update {
                    state: Arc::clone(&snapshot.state),
                    invalid_objects: snapshot.invalid_objects(),
                }
            }
            Source::Kube(watch) => watch.current(),
        }
    }
}
