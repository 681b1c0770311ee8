//! The Kubernetes source: Namespaces, Pods and networking.k8s.io/v1 NetworkPolicies from the
//! API server, through kube-rs watchers (one per kind), into the same [`ClusterState`] the
//! manifests source produces.
//!
//! - Credentials: in-cluster config (the pod's ServiceAccount) or `KUBECONFIG`; the agent needs
//!   get, list and watch on those three resources only.
//! - The watchers list, then watch; after a 410 Gone (an expired resourceVersion) or a lost
//!   connection they relist, with exponential backoff (kube-runtime's default: 0.8 s doubling
//!   to 30 s, jittered). Every error is logged and counted in
//!   `npc_kube_watch_errors_total{resource}`; the state in force stays as it is meanwhile (see
//!   [`store`]).
//! - Memory: only the model of each object is kept (for a Pod: name, namespace, labels, node,
//!   addresses, named ports), never the API objects.
//! - Servers from Kubernetes 1.20 on: fields an older server does not know (`endPort`) are just
//!   absent, and the `kubernetes.io/metadata.name` namespace label is set when the server does
//!   not set it.
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1 as core, networking::v1 as networking};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::warn;

use super::Update;
use crate::metrics::Metrics;

pub mod store;

#[cfg(test)]
mod tests;

use store::{Store, Watched};

/// The API resources watched (the `resource` label values).
pub const RESOURCES: [&str; 3] = [
    <core::Namespace as Watched>::RESOURCE,
    <core::Pod as Watched>::RESOURCE,
    <networking::NetworkPolicy as Watched>::RESOURCE,
];

/// The running watchers and what they have seen. Dropping it stops them.
pub struct KubeWatch {
    store: Arc<Mutex<Store>>,
    /// Bumped whenever the state is worth a sync (see [`Store::apply`]).
    changes: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeWatch {
    /// Starts one watcher per kind on `client`'s cluster; `node` is this agent's node.
    pub fn start(client: Client, node: String, metrics: Metrics) -> KubeWatch {
        let store = Arc::new(Mutex::new(Store::new(node)));
        let (tx, changes) = watch::channel(0);
        metrics.init_kube_watch_errors(&RESOURCES);
        let tasks = vec![
            spawn_watcher::<core::Namespace>(&client, &store, &tx, &metrics),
            spawn_watcher::<core::Pod>(&client, &store, &tx, &metrics),
            spawn_watcher::<networking::NetworkPolicy>(&client, &store, &tx, &metrics),
        ];
        KubeWatch {
            store,
            changes,
            tasks,
        }
    }

    /// Waits until the state is worth a sync: first when every kind has been listed, then on
    /// every change. Errors only when the watchers are gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.changes.changed().await
    }

    /// The state now (shared: a watcher that changes it while the caller holds it copies it).
    pub fn current(&mut self) -> Update {
        self.changes.borrow_and_update();
        let store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        Update {
            state: store.shared_state(),
            invalid_objects: store.invalid_objects(),
        }
    }
}

impl Drop for KubeWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn spawn_watcher<K: Watched>(
    client: &Client,
    store: &Arc<Mutex<Store>>,
    tx: &watch::Sender<u64>,
    metrics: &Metrics,
) -> JoinHandle<()> {
    let api = Api::<K>::all(client.clone());
    let (store, tx, metrics) = (store.clone(), tx.clone(), metrics.clone());
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    let worth_a_sync = store
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .apply(event);
                    if worth_a_sync {
                        tx.send_modify(|n| *n += 1);
                    }
                }
                Err(error) => {
                    metrics.observe_kube_watch_error(K::RESOURCE);
                    warn!(
                        resource = K::RESOURCE,
                        error = %error,
                        "watch failed; the current state stays in force, retrying with backoff"
                    );
                }
            }
        }
        // The watcher's stream never ends; if it does, the receiver sees the channel close
        // once every watcher is gone.
        warn!(resource = K::RESOURCE, "watch ended");
    })
}
