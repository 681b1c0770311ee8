//! Control plane: how long compiling and writing a cluster's policy takes, how long one change
//! takes to reach the maps, and what it costs in memory (the agent's and the maps').
//!
//! The clusters are generated as manifests (`cluster::write`) and read back with the agent's
//! own manifests reader, so the agent run and the in-process measurements see the same state.
use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use npc_agent::{
    compiler::{Identities, compile_on_node},
    http::Readiness,
    metrics::Metrics,
    model::{ClusterState, ObjectRef, Pod, PolicyPort, PortRef},
    reconcile::Reconciler,
    sources::manifests::{LastGood, load_dir},
    sync::{COALESCE, PolicySync},
};
use npc_common::{Config, map_names};
use npc_tests::datapath::TestDatapath;

use crate::{
    TempDir,
    stats::{quantile, stats},
};

mod agent;
mod cluster;

use cluster::Scale;

/// The cluster sizes of the issue: pods, policies (10 pods and one policy per namespace).
const SCALES: [Scale; 3] = [
    Scale {
        pods: 1_000,
        policies: 100,
    },
    Scale {
        pods: 10_000,
        policies: 1_000,
    },
    Scale {
        pods: 50_000,
        policies: 5_000,
    },
];

/// The node the agent runs as: 1 in 100 pods runs there.
const NODE: &str = "node-0";

pub fn run(args: &crate::Args) -> Result<()> {
    let rounds = if args.quick {
        3
    } else {
        args.rounds.clamp(5, 11)
    };
    let changes = if args.quick { 30 } else { 300 };
    let scales: &[Scale] = if args.quick { &SCALES[..2] } else { &SCALES };
    println!("control plane: generated clusters ({NODE} runs 1 in 100 pods), {rounds} rounds");
    // What killed runs left (namespaces, pins), then a scratch directory of this run.
    npc_tests::lab::cleanup_stale(crate::LAB)?;
    crate::agent::cleanup_stale(&crate::agent_binary()?)?;
    let dir = TempDir::new("npc-bench-control")?;

    println!(
        "{:<20} {:>8} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "pods/policies",
        "load ms",
        "compile",
        "min",
        "max",
        "write",
        "endpoints",
        "entries",
        "agent RSS",
        "agent HWM",
        "1st sync"
    );
    let mut memory = Vec::new();
    for scale in scales {
        let manifests = dir.0.join(format!("{}-{}", scale.pods, scale.policies));
        cluster::write(&manifests, *scale)?;
        let t = Instant::now();
        let state = load(&manifests)?;
        let load_ms = ms(t.elapsed());

        let node_ips = node_ips();
        let mut ids = Identities::default();
        let mut desired = compile_on_node(&state, &node_ips, &mut ids);
        let mut times = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            desired = compile_on_node(&state, &node_ips, &mut ids);
            times.push(ms(t.elapsed()));
        }
        let (compile, min, max) = stats(times);

        // Written from empty: a fresh datapath's maps, every entry one update.
        let mut dp = datapath();
        let before = map_memory(dp.pin_dir())?;
        let mut reconciler = Reconciler::adopt(&dp.dp.maps)?;
        let t = Instant::now();
        reconciler.apply(&mut dp.dp.maps, &desired, &Default::default())?;
        let write = ms(t.elapsed());
        let after = map_memory(dp.pin_dir())?;
        memory.push((
            *scale,
            before,
            after,
            desired.endpoints.len(),
            desired.policy.len(),
        ));
        drop(dp);

        let agent = agent::measure(&manifests, NODE, &dir.0)?;
        println!(
            "{:<20} {load_ms:>8.0} {compile:>9.1} {min:>9.1} {max:>7.1} {write:>7.0} {:>9} {:>9} {:>9.1} {:>9.1} {:>9.0}",
            format!("{}/{}", scale.pods, scale.policies),
            desired.endpoints.len(),
            desired.policy.len(),
            agent.rss_mib,
            agent.hwm_mib,
            agent.first_sync_ms,
        );
    }
    println!(
        "(ms; load: the manifests read and parsed; compile: median of {rounds} compiles for \
         {NODE} after a first one; write: the compiled state into empty maps; agent: the \
         npc-agent binary on these manifests in a network namespace of its own, resident and \
         peak memory after its first sync, and how long that sync took by its log)"
    );

    println!();
    println!("BPF map memory (the kernel's own accounting, /proc/PID/fdinfo memlock)");
    println!(
        "{:<20} {:>14} {:>14} {:>16} {:>16}",
        "pods/policies", "endpoints B", "per endpoint", "policy B", "per policy entry"
    );
    for (scale, before, after, endpoints, entries) in &memory {
        let ep = after.endpoints.saturating_sub(before.endpoints);
        let pol = after.policy.saturating_sub(before.policy);
        println!(
            "{:<20} {:>14} {:>14.0} {:>16} {:>16.0}",
            format!("{}/{}", scale.pods, scale.policies),
            ep,
            ep as f64 / (*endpoints).max(1) as f64,
            pol,
            pol as f64 / (*entries).max(1) as f64,
        );
    }
    if let Some((_, before, ..)) = memory.first() {
        println!(
            "(every other map is preallocated or fixed: {:.1} MiB whatever the cluster, \
             conntrack at {} entries in this run)",
            before.fixed as f64 / (1 << 20) as f64,
            CONNTRACK_CAPACITY
        );
    }

    println!();
    changes_at(&dir.0, SCALES[1], changes)
}

/// Conntrack capacity of the datapaths loaded here (the agent's default is larger; conntrack is
/// preallocated, so its memory does not depend on the cluster).
const CONNTRACK_CAPACITY: u32 = 16_384;

/// One change after another at `scale`, each synced as the agent syncs (compile, learn the
/// veths, write the difference, publish the names): time from the new state to the maps
/// holding it.
fn changes_at(dir: &Path, scale: Scale, changes: usize) -> Result<()> {
    let manifests = dir.join(format!("{}-{}", scale.pods, scale.policies));
    if !manifests.exists() {
        cluster::write(&manifests, scale)?;
    }
    let mut state = load(&manifests)?;
    let mut dp = datapath();
    let maps = &mut dp.dp.maps;
    let state_dir = TempDir::new("npc-bench-state")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut sync = PolicySync::new(
        maps,
        Readiness::default(),
        state_dir.0.clone(),
        Metrics::without_datapath(),
    )?;
    runtime.block_on(sync.sync(maps, &state))?;

    println!(
        "one change at {} pods / {} policies ({NODE}): time from the new state to the maps \
         holding it, {changes} changes each",
        scale.pods, scale.policies
    );
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "change", "p50 ms", "p99 ms", "min", "max", "writes", "compile", "learn", "write", "names"
    );
    let kinds: [(&str, Change); 4] = [
        (
            "policy port changed (selects a local pod)",
            change_policy_port,
        ),
        ("pod relabelled (a peer of local pods)", relabel_pod),
        ("pod added or deleted (elsewhere, a replica)", add_pod),
        ("pod added or deleted (on this node)", add_local_pod),
    ];
    // Per kind: the time to the maps updated, and its parts.
    let mut times: Vec<[Vec<f64>; 5]> = vec![Default::default(); kinds.len()];
    let mut writes = vec![0usize; kinds.len()];
    // Interleaved: one change of each kind per round.
    for i in 0..changes {
        for (k, (_, change)) in kinds.iter().enumerate() {
            change(&mut state, i);
            let s = runtime.block_on(sync.sync(maps, &state))?;
            let t = sync.last_timings();
            for (v, d) in
                times[k]
                    .iter_mut()
                    .zip([t.maps_updated, t.compile, t.learn, t.write, t.names])
            {
                v.push(ms(d));
            }
            writes[k] += s.writes + s.deletes;
        }
    }
    for (k, (name, _)) in kinds.iter().enumerate() {
        let [total, compile, learn, write, names] = &mut times[k];
        let (p50, p99) = (quantile(total, 0.5), quantile(total, 0.99));
        println!(
            "{name:<44} {p50:>8.2} {p99:>8.2} {:>8.2} {:>8.2} {:>7.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            total[0],
            total[total.len() - 1],
            writes[k] as f64 / changes as f64,
            quantile(compile, 0.5),
            quantile(learn, 0.5),
            quantile(write, 0.5),
            quantile(names, 0.5),
        );
    }
    println!(
        "(p50/p99/min/max: from the new state to the maps holding it; then the medians of its \
         parts: compile, learn (node addresses and pod veths, netlink), write (the difference \
         into the maps); names: building and publishing the names for the deny log and dump, \
         after the maps. writes: map updates and deletes per change. A source applies a burst \
         of changes at most every {} ms (the agent's coalescing window), which comes on top)",
        COALESCE.as_millis()
    );
    Ok(())
}

type Change = fn(&mut ClusterState, usize);

/// Toggles the port of the first ingress rule of `policy-0` (it selects `p-0` of `ns-0`, which
/// runs on this node).
fn change_policy_port(state: &mut ClusterState, i: usize) {
    let key = ObjectRef {
        namespace: "ns-0".into(),
        name: "policy-0".into(),
    };
    let policy = state.policies.get_mut(&key).expect("generated policy-0");
    policy.ingress[0].ports = Some(vec![PolicyPort {
        protocol: npc_agent::model::Protocol::Tcp,
        port: Some(PortRef::Number(8000 + (i % 2) as u16)),
        end_port: None,
    }]);
}

/// Moves `ns-1/p-1` between `app1` (a peer of policy-0's ingress rule) and `app5` (new).
fn relabel_pod(state: &mut ClusterState, i: usize) {
    let pod = pod_mut(state, "ns-1", "p-1");
    let app = if i.is_multiple_of(2) { "app5" } else { "app1" };
    pod.labels.insert("app".into(), app.into());
}

/// Adds a replica of `ns-0/p-0` on another node, or deletes it again (every other change), so
/// the cluster keeps its size.
fn add_pod(state: &mut ClusterState, i: usize) {
    add_or_delete(state, i, "node-1", Ipv4Addr::new(11, 0, 0, 1));
}

/// The same on this node.
fn add_local_pod(state: &mut ClusterState, i: usize) {
    add_or_delete(state, i, NODE, Ipv4Addr::new(11, 0, 0, 2));
}

fn add_or_delete(state: &mut ClusterState, i: usize, node: &str, ip: Ipv4Addr) {
    let key = ObjectRef {
        namespace: "ns-0".into(),
        name: format!("added-{node}"),
    };
    if i % 2 == 1 {
        state.pods.remove(&key);
        return;
    }
    let template = pod_mut(state, "ns-0", "p-0").clone();
    let pod = Pod {
        name: key.name.clone(),
        node: Some(node.into()),
        ips: vec![IpAddr::V4(ip)],
        ..template
    };
    state.pods.insert(key, pod);
}

fn pod_mut<'a>(state: &'a mut ClusterState, namespace: &str, name: &str) -> &'a mut Pod {
    let key = ObjectRef {
        namespace: namespace.into(),
        name: name.into(),
    };
    state.pods.get_mut(&key).expect("generated pod")
}

/// The state of a manifests directory, as the agent's manifests source reads it for `NODE`.
fn load(dir: &Path) -> Result<ClusterState> {
    let (mut state, errors) = load_dir(dir, &mut LastGood::default());
    ensure!(
        errors.is_empty(),
        "generated manifests rejected: {}",
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    );
    state.node = Some(NODE.into());
    Ok(state)
}

fn node_ips() -> Vec<IpAddr> {
    vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1))]
}

fn datapath() -> TestDatapath {
    TestDatapath::with_options(Config::default(), |o| {
        o.conntrack_capacity = CONNTRACK_CAPACITY;
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Memory of the maps of a loaded datapath, by the kernel's accounting.
struct MapMemory {
    endpoints: u64,
    policy: u64,
    /// Every other map.
    fixed: u64,
}

/// The memory of the maps pinned in `dir`.
fn map_memory(dir: &Path) -> Result<MapMemory> {
    let mut m = MapMemory {
        endpoints: 0,
        policy: 0,
        fixed: 0,
    };
    for name in map_names::ALL {
        let bytes = memlock(&dir.join(name))?;
        match name {
            map_names::ENDPOINTS => m.endpoints = bytes,
            map_names::POLICY => m.policy = bytes,
            _ => m.fixed += bytes,
        }
    }
    Ok(m)
}

/// The `memlock` line of a pinned map's fdinfo: the kernel's count of the map's memory (its
/// `map_mem_usage`, actual elements for maps allocated on update).
fn memlock(pin: &Path) -> Result<u64> {
    let map =
        aya::maps::MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .context("reading the map's fdinfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock in the fdinfo of {}", pin.display()))
}
