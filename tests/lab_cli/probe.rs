//! `npc-lab probe`: the reachability matrix. Every pod tries every declared TCP and UDP port of
//! every other pod, on each of the server's addresses of a family the client has: TCP connects
//! and checks an echo, UDP checks a round trip. Probes run concurrently, each bounded by the
//! timeout (a dropped SYN shows as a timeout), so a matrix takes about
//! `ceil(blocked probes / parallelism) * timeout`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use npc_tests::lab::{self, Attachment, ConnectOutcome};
use serde::{Deserialize, Serialize};

use crate::{
    manifests::Protocol,
    state::{PodState, State},
};

/// One connection attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Client `namespace/name`.
    pub from: String,
    /// Server `namespace/name`.
    pub to: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub ok: bool,
    /// `connected`, `timeout`, `refused`, or an error.
    pub outcome: String,
    pub ms: u64,
}

/// A whole matrix (what `probe --json` prints).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Matrix {
    pub lab: String,
    pub timeout_ms: u64,
    pub elapsed_ms: u64,
    /// Client pods (rows), in order.
    pub clients: Vec<String>,
    /// Server ports (columns), in order.
    pub columns: Vec<Column>,
    pub probes: Vec<Probe>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub pod: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A connection across address families: what a matrix cell shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    /// Every address answered.
    Ok,
    /// No address answered.
    Blocked,
    /// Some addresses answered, some did not.
    Partial,
    /// Client and server are the same pod (not probed).
    Same,
    /// No address of a family the client has.
    NoPath,
}

impl Cell {
    pub fn symbol(self) -> char {
        match self {
            Cell::Ok => '.',
            Cell::Blocked => 'X',
            Cell::Partial => '!',
            Cell::Same => '-',
            Cell::NoPath => ' ',
        }
    }
}

fn lab_pod(p: &PodState, node: &str) -> lab::Pod {
    let mut v4 = Ipv4Addr::UNSPECIFIED;
    let mut v6: Option<Ipv6Addr> = None;
    for ip in &p.ips {
        match ip {
            IpAddr::V4(a) => v4 = *a,
            IpAddr::V6(a) => v6 = Some(*a),
        }
    }
    let mac = |s: &str| {
        let mut m = [0u8; 6];
        for (b, part) in m.iter_mut().zip(s.split(':')) {
            *b = u8::from_str_radix(part, 16).unwrap_or(0);
        }
        m
    };
    lab::Pod {
        name: p.lab_name.clone(),
        netns: p.netns.clone(),
        node_netns: node.to_string(),
        ipv4: v4,
        ipv6: v6,
        host_veth: p.host_veth.clone(),
        host_ifindex: p.host_ifindex,
        host_mac: mac(&p.host_mac),
        mac: mac(&p.mac),
        ifindex: p.ifindex,
        attachment: match &p.bridge {
            Some(b) => Attachment::Bridge(b.clone()),
            None => Attachment::Routed,
        },
    }
}

/// The columns: every TCP and UDP port of every pod, pods in state order.
pub fn columns(st: &State) -> Vec<Column> {
    st.pods
        .iter()
        .flat_map(|p| {
            p.ports
                .iter()
                .filter(|q| q.protocol.probed())
                .map(|q| Column {
                    pod: p.key(),
                    port: q.port,
                    protocol: q.protocol,
                })
        })
        .collect()
}

/// Probes the matrix of a lab.
pub fn run(st: &State, timeout: Duration, parallel: usize) -> Result<Matrix> {
    let node = st
        .node_netns
        .clone()
        .context("the lab has no node namespace")?;
    let pods: Vec<lab::Pod> = st.pods.iter().map(|p| lab_pod(p, &node)).collect();
    let cols = columns(st);
    struct Task {
        client: usize,
        server: usize,
        address: IpAddr,
        port: u16,
        protocol: Protocol,
    }
    let mut tasks = Vec::new();
    for (ci, client) in st.pods.iter().enumerate() {
        for col in &cols {
            let si = st
                .pods
                .iter()
                .position(|p| p.key() == col.pod)
                .expect("column of a pod");
            if si == ci {
                continue;
            }
            for &address in &st.pods[si].ips {
                if client.ips.iter().any(|a| a.is_ipv4() == address.is_ipv4()) {
                    tasks.push(Task {
                        client: ci,
                        server: si,
                        address,
                        port: col.port,
                        protocol: col.protocol,
                    });
                }
            }
        }
    }
    let results: Mutex<Vec<Option<Probe>>> = Mutex::new(vec![None; tasks.len()]);
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..parallel.clamp(1, tasks.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(t) = tasks.get(i) else { break };
                    let t0 = Instant::now();
                    let client = &pods[t.client];
                    let (ok, outcome) = match t.protocol {
                        Protocol::Tcp => match client.connect_tcp(t.address, t.port, timeout) {
                            ConnectOutcome::Connected => (true, "connected".to_string()),
                            ConnectOutcome::TimedOut => (false, "timeout".to_string()),
                            ConnectOutcome::Refused => (false, "refused".to_string()),
                            ConnectOutcome::Other(e) => (false, e),
                        },
                        Protocol::Udp => {
                            match client.try_udp_roundtrip(t.address, t.port, timeout) {
                                Ok(true) => (true, "connected".to_string()),
                                Ok(false) => (false, "timeout".to_string()),
                                Err(e) => {
                                    let msg = format!("{e:#}");
                                    if msg.contains("refused") {
                                        (false, "refused".to_string())
                                    } else {
                                        (false, msg)
                                    }
                                }
                            }
                        }
                        Protocol::Sctp => (false, "not probed".to_string()),
                    };
                    let probe = Probe {
                        from: st.pods[t.client].key(),
                        to: st.pods[t.server].key(),
                        address: t.address,
                        port: t.port,
                        protocol: t.protocol,
                        ok,
                        outcome,
                        ms: t0.elapsed().as_millis() as u64,
                    };
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(probe);
                }
            });
        }
    });
    let probes = results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|p| p.expect("every task ran"))
        .collect();
    Ok(Matrix {
        lab: st.name.clone(),
        timeout_ms: timeout.as_millis() as u64,
        elapsed_ms: start.elapsed().as_millis() as u64,
        clients: st.pods.iter().map(PodState::key).collect(),
        columns: cols,
        probes,
    })
}

/// (from, to, port, protocol) -> (addresses ok, addresses probed).
type Cells = BTreeMap<(String, String, u16, Protocol), (usize, usize)>;

fn cells(m: &Matrix) -> Cells {
    let mut cells = Cells::new();
    for p in &m.probes {
        let c = cells
            .entry((p.from.clone(), p.to.clone(), p.port, p.protocol))
            .or_default();
        c.1 += 1;
        if p.ok {
            c.0 += 1;
        }
    }
    cells
}

impl Matrix {
    #[cfg(test)]
    pub fn cell(&self, client: &str, col: &Column) -> Cell {
        cell_of(&cells(self), client, col)
    }

    /// Connections (client, column) whose cell is not [`Cell::Same`]/[`Cell::NoPath`].
    pub fn connections(&self) -> Vec<(String, Column, Cell)> {
        let cells = cells(self);
        let mut out = Vec::new();
        for client in &self.clients {
            for col in &self.columns {
                let c = cell_of(&cells, client, col);
                if !matches!(c, Cell::Same | Cell::NoPath) {
                    out.push((client.clone(), col.clone(), c));
                }
            }
        }
        out
    }
}

fn cell_of(cells: &Cells, client: &str, col: &Column) -> Cell {
    if client == col.pod {
        return Cell::Same;
    }
    match cells.get(&(client.to_string(), col.pod.clone(), col.port, col.protocol)) {
        None | Some((_, 0)) => Cell::NoPath,
        Some((ok, n)) if ok == n => Cell::Ok,
        Some((0, _)) => Cell::Blocked,
        Some(_) => Cell::Partial,
    }
}

/// How a pod is shown in headers: its name when no other pod has it, else `namespace/name`.
pub fn short_names(keys: &[String]) -> BTreeMap<String, String> {
    let name = |k: &str| k.split_once('/').map_or(k, |(_, n)| n).to_string();
    keys.iter()
        .map(|k| {
            let n = name(k);
            let unique = keys.iter().filter(|o| name(o) == n).count() == 1;
            (k.clone(), if unique { n } else { k.clone() })
        })
        .collect()
}

pub fn port_label(port: u16, protocol: Protocol) -> String {
    match protocol {
        Protocol::Tcp => port.to_string(),
        other => format!("{port}/{}", other.as_str().to_lowercase()),
    }
}

/// The matrix as a table: rows are clients, columns are server ports grouped by server.
pub fn render(m: &Matrix) -> String {
    let cells = cells(m);
    // Column groups: consecutive columns of one pod.
    let mut groups: Vec<(String, Vec<&Column>)> = Vec::new();
    for col in &m.columns {
        match groups.last_mut() {
            Some((pod, cols)) if *pod == col.pod => cols.push(col),
            _ => groups.push((col.pod.clone(), vec![col])),
        }
    }
    let mut all_keys = m.clients.clone();
    all_keys.extend(groups.iter().map(|g| g.0.clone()));
    all_keys.sort();
    all_keys.dedup();
    let short = short_names(&all_keys);
    let label_w = m
        .clients
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max("client \\ server".len());
    // Widths of every port column, widened so that each group fits its header.
    let mut widths: Vec<Vec<usize>> = Vec::new();
    for (pod, cols) in &groups {
        let mut w: Vec<usize> = cols
            .iter()
            .map(|c| port_label(c.port, c.protocol).len())
            .collect();
        let inner = w.iter().sum::<usize>() + w.len() - 1;
        let need = short[pod].len();
        if need > inner {
            *w.last_mut().expect("a group has columns") += need - inner;
        }
        widths.push(w);
    }
    let group_w = |w: &Vec<usize>| w.iter().sum::<usize>() + w.len() - 1;
    let mut out = String::new();
    let mut line = format!("{:label_w$}", "");
    for ((pod, _), w) in groups.iter().zip(&widths) {
        write!(line, "  {:gw$}", short[pod], gw = group_w(w)).unwrap();
    }
    out.push_str(line.trim_end());
    out.push('\n');
    let mut line = format!("{:label_w$}", "client \\ server");
    for ((_, cols), w) in groups.iter().zip(&widths) {
        line.push_str("  ");
        let labels: Vec<String> = cols
            .iter()
            .zip(w)
            .map(|(c, w)| format!("{:w$}", port_label(c.port, c.protocol)))
            .collect();
        line.push_str(&labels.join(" "));
    }
    out.push_str(line.trim_end());
    out.push('\n');
    let mut seen = BTreeMap::new();
    for client in &m.clients {
        let mut line = format!("{client:label_w$}");
        for ((_, cols), w) in groups.iter().zip(&widths) {
            line.push_str("  ");
            let cs: Vec<String> = cols
                .iter()
                .zip(w)
                .map(|(c, w)| {
                    let cell = cell_of(&cells, client, c);
                    *seen.entry(cell.symbol()).or_insert(0usize) += 1;
                    format!("{:w$}", cell.symbol())
                })
                .collect();
            line.push_str(&cs.join(" "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let mut legend = vec![". connected", "X blocked", "- same pod"];
    if seen.contains_key(&'!') {
        legend.push("! some addresses only");
    }
    let ok = m.connections().iter().filter(|c| c.2 == Cell::Ok).count();
    let total = m.connections().len();
    writeln!(
        out,
        "{}   ({ok} of {total} connections open; {} probes, timeout {} ms, {:.2} s)",
        legend.join("   "),
        m.probes.len(),
        m.timeout_ms,
        m.elapsed_ms as f64 / 1000.0
    )
    .unwrap();
    // Failures other than a silent drop deserve a word: they are no policy's doing.
    let odd: Vec<&Probe> = m
        .probes
        .iter()
        .filter(|p| !p.ok && p.outcome != "timeout")
        .collect();
    if !odd.is_empty() {
        writeln!(
            out,
            "note: {} probes failed otherwise than by a timeout (a dropped packet):",
            odd.len()
        )
        .unwrap();
        for p in odd.iter().take(10) {
            writeln!(
                out,
                "  {} -> {}:{}/{} ({}): {}",
                p.from, p.to, p.port, p.protocol, p.address, p.outcome
            )
            .unwrap();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(from: &str, to: &str, address: &str, port: u16, ok: bool) -> Probe {
        Probe {
            from: from.into(),
            to: to.into(),
            address: address.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            ok,
            outcome: if ok { "connected" } else { "timeout" }.into(),
            ms: 1,
        }
    }

    #[test]
    fn table() {
        let m = Matrix {
            lab: "t".into(),
            timeout_ms: 300,
            elapsed_ms: 1234,
            clients: vec!["a/front-end".into(), "a/db".into(), "b/db".into()],
            columns: vec![
                Column {
                    pod: "a/front-end".into(),
                    port: 8079,
                    protocol: Protocol::Tcp,
                },
                Column {
                    pod: "a/db".into(),
                    port: 3306,
                    protocol: Protocol::Tcp,
                },
                Column {
                    pod: "a/db".into(),
                    port: 53,
                    protocol: Protocol::Udp,
                },
            ],
            probes: vec![
                probe("a/db", "a/front-end", "10.0.0.1", 8079, true),
                probe("b/db", "a/front-end", "10.0.0.1", 8079, false),
                probe("a/front-end", "a/db", "10.0.0.2", 3306, true),
                probe("a/front-end", "a/db", "fd00::2", 3306, false),
                probe("b/db", "a/db", "10.0.0.2", 3306, false),
                Probe {
                    protocol: Protocol::Udp,
                    ..probe("b/db", "a/db", "10.0.0.2", 53, true)
                },
            ],
        };
        let t = render(&m);
        let want = [
            "                 front-end  a/db",
            "client \\ server  8079       3306 53/udp",
            "a/front-end      -          !",
            "a/db             .          -    -",
            "b/db             X          X    .",
            ". connected   X blocked   - same pod   ! some addresses only   \
             (2 of 5 connections open; 6 probes, timeout 300 ms, 1.23 s)",
            "",
        ]
        .join("\n");
        assert_eq!(t, want, "\n{t}");
        let col = &m.columns[0];
        assert_eq!(m.cell("b/db", col), Cell::Blocked);
        assert_eq!(m.cell("a/front-end", col), Cell::Same);
        assert_eq!(m.cell("a/front-end", &m.columns[2]), Cell::NoPath);
        assert_eq!(m.connections().len(), 5);
        let back: Matrix = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back.probes, m.probes);
    }
}
