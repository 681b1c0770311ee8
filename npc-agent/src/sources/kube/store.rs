//! The kube source's view of the cluster: watch events of the three kinds in, the
//! [`ClusterState`] out. Pure (no I/O but logging), so every event sequence a watcher can produce
//! is unit-tested without a server.
//!
//! Rules (the same as the manifests source's, so both modes enforce alike):
//! - An object that fails validation keeps its last valid version in force (or stays absent) and
//!   is counted in [`Store::invalid_objects`] until it is fixed or deleted.
//! - A relist (the watcher's `Init` .. `InitDone`, after a 410 Gone or a lost watch) is buffered
//!   and swapped in whole at `InitDone`: the state never passes through a partial list, and
//!   nothing is flushed while the API server is away.
//! - Nothing is published before every kind finished its initial list, so the first sync, the
//!   one that makes the agent ready, sees the whole cluster.
use std::{
    collections::BTreeMap,
    fmt::{Debug, Display},
    sync::Arc,
};

use k8s_openapi::api::{core::v1 as core, networking::v1 as networking};
use kube::runtime::watcher::Event;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::model::{
    ClusterState, ObjectRef,
    convert::{self, ConvertError, Kind},
};

/// One of the watched API kinds: how to key, convert and store it.
pub trait Watched:
    kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: Kind;
    /// The API resource (`pods`): the `resource` label of `npc_kube_watch_errors_total`.
    const RESOURCE: &'static str;
    type Key: Ord + Clone + Display + Send;
    type Model: Clone + PartialEq + Send;

    fn key(&self) -> Self::Key;
    fn convert(&self) -> Result<Self::Model, ConvertError>;
    /// Where the models of this kind live in the state.
    fn models(state: &mut ClusterState) -> &mut BTreeMap<Self::Key, Self::Model>;
    fn models_of(state: &ClusterState) -> &BTreeMap<Self::Key, Self::Model>;
    fn tracker(store: &mut Trackers) -> &mut Tracker<Self>;
}

fn namespaced_key(meta: &kube::api::ObjectMeta) -> ObjectRef {
    ObjectRef {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    }
}

impl Watched for core::Namespace {
    const KIND: Kind = Kind::Namespace;
    const RESOURCE: &'static str = "namespaces";
    type Key = String;
    type Model = crate::model::Namespace;

    fn key(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }
    fn convert(&self) -> Result<Self::Model, ConvertError> {
        convert::namespace(self)
    }
    fn models(state: &mut ClusterState) -> &mut BTreeMap<String, Self::Model> {
        &mut state.namespaces
    }
    fn models_of(state: &ClusterState) -> &BTreeMap<String, Self::Model> {
        &state.namespaces
    }
    fn tracker(t: &mut Trackers) -> &mut Tracker<Self> {
        &mut t.namespaces
    }
}

impl Watched for core::Pod {
    const KIND: Kind = Kind::Pod;
    const RESOURCE: &'static str = "pods";
    type Key = ObjectRef;
    type Model = crate::model::Pod;

    fn key(&self) -> ObjectRef {
        namespaced_key(&self.metadata)
    }
    fn convert(&self) -> Result<Self::Model, ConvertError> {
        convert::pod(self)
    }
    fn models(state: &mut ClusterState) -> &mut BTreeMap<ObjectRef, Self::Model> {
        &mut state.pods
    }
    fn models_of(state: &ClusterState) -> &BTreeMap<ObjectRef, Self::Model> {
        &state.pods
    }
    fn tracker(t: &mut Trackers) -> &mut Tracker<Self> {
        &mut t.pods
    }
}

impl Watched for networking::NetworkPolicy {
    const KIND: Kind = Kind::NetworkPolicy;
    const RESOURCE: &'static str = "networkpolicies";
    type Key = ObjectRef;
    type Model = crate::model::NetworkPolicy;

    fn key(&self) -> ObjectRef {
        namespaced_key(&self.metadata)
    }
    fn convert(&self) -> Result<Self::Model, ConvertError> {
        convert::network_policy(self)
    }
    fn models(state: &mut ClusterState) -> &mut BTreeMap<ObjectRef, Self::Model> {
        &mut state.policies
    }
    fn models_of(state: &ClusterState) -> &BTreeMap<ObjectRef, Self::Model> {
        &state.policies
    }
    fn tracker(t: &mut Trackers) -> &mut Tracker<Self> {
        &mut t.policies
    }
}

/// The objects of a list, converted.
type Listed<K> = BTreeMap<<K as Watched>::Key, Result<<K as Watched>::Model, ConvertError>>;

/// The bookkeeping of one kind besides its models.
pub struct Tracker<K: Watched> {
    /// Objects whose current version is invalid (their last valid version, if any, is in force).
    invalid: BTreeMap<K::Key, ConvertError>,
    /// The objects of a relist in progress (`Init` seen, `InitDone` not yet).
    relist: Option<Listed<K>>,
    /// Completed lists: 0 until the initial one is done.
    lists: u64,
}

impl<K: Watched> Default for Tracker<K> {
    fn default() -> Self {
        Tracker {
            invalid: BTreeMap::new(),
            relist: None,
            lists: 0,
        }
    }
}

#[derive(Default)]
pub struct Trackers {
    namespaces: Tracker<core::Namespace>,
    pods: Tracker<core::Pod>,
    policies: Tracker<networking::NetworkPolicy>,
}

/// The cluster as the watchers have seen it.
pub struct Store {
    /// Shared with the sync in progress, if any ([`Store::shared_state`]); copied on write then.
    state: Arc<ClusterState>,
    trackers: Trackers,
    /// Whether the complete state was handed out once (see [`Store::apply`]).
    announced: bool,
}

impl Store {
    /// `node`: this agent's node (its pods are local).
    pub fn new(node: String) -> Store {
        Store {
            state: Arc::new(ClusterState {
                node: Some(node),
                ..ClusterState::default()
            }),
            trackers: Trackers::default(),
            announced: false,
        }
    }

    /// Applies one watch event. Returns whether the state is worth a sync now: it changed and
    /// every kind has finished its initial list, or that list just finished.
    pub fn apply<K: Watched>(&mut self, event: Event<K>) -> bool {
        let changed = match event {
            Event::Init => {
                let tracker = K::tracker(&mut self.trackers);
                if tracker.lists > 0 {
                    info!(
                        resource = K::RESOURCE,
                        "relisting (the watch was restarted); the current state stays in force until the list completes"
                    );
                }
                tracker.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let key = object.key();
                let converted = object.convert();
                match &mut K::tracker(&mut self.trackers).relist {
                    Some(buffer) => {
                        buffer.insert(key, converted);
                        false
                    }
                    // Not produced by the watcher; taken as an update.
                    None => self.update::<K>(key, converted),
                }
            }
            Event::InitDone => self.finish_list::<K>(),
            Event::Apply(object) => self.update::<K>(object.key(), object.convert()),
            Event::Delete(object) => self.delete::<K>(&object.key()),
        };
        if !self.is_synced() {
            return false;
        }
        let announce = !self.announced;
        self.announced = true;
        changed || announce
    }

    /// Every kind has completed its initial list.
    pub fn is_synced(&self) -> bool {
        let t = &self.trackers;
        t.namespaces.lists > 0 && t.pods.lists > 0 && t.policies.lists > 0
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The state, shared: the next change copies it if the caller still holds it.
    pub fn shared_state(&self) -> Arc<ClusterState> {
        self.state.clone()
    }

    /// Objects whose current version could not be used, by kind (`npc_invalid_objects{kind}`);
    /// every kind is present.
    pub fn invalid_objects(&self) -> BTreeMap<String, u64> {
        let t = &self.trackers;
        [
            (Kind::Namespace, t.namespaces.invalid.len()),
            (Kind::Pod, t.pods.invalid.len()),
            (Kind::NetworkPolicy, t.policies.invalid.len()),
        ]
        .into_iter()
        .map(|(kind, n)| (kind.as_str().to_string(), n as u64))
        .collect()
    }

    /// An added or modified object.
    fn update<K: Watched>(
        &mut self,
        key: K::Key,
        converted: Result<K::Model, ConvertError>,
    ) -> bool {
        let tracker = K::tracker(&mut self.trackers);
        match converted {
            Ok(model) => {
                if tracker.invalid.remove(&key).is_some() {
                    info!(kind = %K::KIND, object = %key, "object is valid again");
                }
                if K::models_of(&self.state).get(&key) == Some(&model) {
                    return false;
                }
                K::models(Arc::make_mut(&mut self.state)).insert(key, model);
                true
            }
            Err(error) => {
                let kept = K::models_of(&self.state).contains_key(&key);
                report_invalid(&error, kept, tracker.invalid.get(&key));
                tracker.invalid.insert(key, error);
                false
            }
        }
    }

    fn delete<K: Watched>(&mut self, key: &K::Key) -> bool {
        K::tracker(&mut self.trackers).invalid.remove(key);
        if !K::models_of(&self.state).contains_key(key) {
            return false;
        }
        K::models(Arc::make_mut(&mut self.state)).remove(key);
        true
    }

    /// `InitDone`: the relisted objects replace the kind's models (an invalid object keeps its
    /// last valid version); objects not listed are gone.
    fn finish_list<K: Watched>(&mut self) -> bool {
        let tracker = K::tracker(&mut self.trackers);
        let Some(listed) = tracker.relist.take() else {
            return false;
        };
        tracker.lists += 1;
        let models = K::models(Arc::make_mut(&mut self.state));
        let mut old = std::mem::take(models);
        let mut invalid = BTreeMap::new();
        let mut changed = false;
        for (key, converted) in listed {
            match converted {
                Ok(model) => {
                    changed |= old.remove(&key).as_ref() != Some(&model);
                    models.insert(key, model);
                }
                Err(error) => {
                    let last_good = old.remove(&key);
                    report_invalid(&error, last_good.is_some(), tracker.invalid.get(&key));
                    if let Some(model) = last_good {
                        models.insert(key.clone(), model);
                    }
                    invalid.insert(key, error);
                }
            }
        }
        for key in tracker.invalid.keys() {
            if !invalid.contains_key(key) {
                info!(kind = %K::KIND, object = %key, "object is valid again or gone");
            }
        }
        tracker.invalid = invalid;
        info!(
            resource = K::RESOURCE,
            objects = models.len(),
            invalid = tracker.invalid.len(),
            gone = old.len(),
            "listed"
        );
        // Anything left in `old` was not listed: deleted while the watch was away.
        changed || !old.is_empty()
    }
}

/// Logs an invalid object once per distinct problem (a relist or an unrelated update of the
/// same invalid version says nothing new).
fn report_invalid(error: &ConvertError, kept: bool, before: Option<&ConvertError>) {
    if before == Some(error) {
        return;
    }
    let consequence = if kept {
        "its last valid version stays in force"
    } else {
        "it is ignored"
    };
    warn!(
        kind = %error.kind,
        object = %error.object(),
        error = %error,
        "invalid object: {consequence}"
    );
}
