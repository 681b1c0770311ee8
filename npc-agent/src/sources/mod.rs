//! Where the cluster state comes from. Every source turns API objects into the model with
//! [`crate::model::convert`] and publishes [`ClusterState`](crate::model::ClusterState) snapshots.
//!
//! - [`manifests`]: a watched directory of YAML/JSON manifests (no cluster needed).
pub mod manifests;
