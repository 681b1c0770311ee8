//! The agent binary on a manifests directory, in a lab node namespace of its own (no pods: it
//! loads, compiles and writes the maps, attaching nowhere): its memory after the first sync.
use std::path::Path;

use anyhow::{Context as _, Result};
use npc_tests::lab::Lab;

use crate::agent::Agent;

pub struct AgentMemory {
    pub rss_mib: f64,
    pub hwm_mib: f64,
    /// How long the first sync took, by the agent's log.
    pub first_sync_ms: f64,
}

/// Starts the agent on `manifests` as `node`, reads its memory once it is ready (its first sync
/// is done), and stops it; `work` holds its log and state.
pub fn measure(manifests: &Path, node: &str, work: &Path) -> Result<AgentMemory> {
    let binary = crate::agent_binary()?;
    let lab = Lab::new(crate::LAB)?;
    let agent = Agent::start(&binary, lab.node_netns(), manifests, node, work)?;
    let pid = agent.pid().context("the agent is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading the agent's /proc status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    let first_sync_ms = agent
        .log()
        .lines()
        .find(|l| l.contains("policy state synced"))
        .and_then(took_ms)
        .unwrap_or(f64::NAN);
    let memory = AgentMemory {
        rss_mib: field("VmRSS:"),
        hwm_mib: field("VmHWM:"),
        first_sync_ms,
    };
    agent.stop()?;
    Ok(memory)
}

/// The `took_ms` field of a log line (plain tracing format: `took_ms=12.3`).
fn took_ms(line: &str) -> Option<f64> {
    let rest = &line[line.find("took_ms=")? + "took_ms=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}
