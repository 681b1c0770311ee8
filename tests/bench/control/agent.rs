//! The agent binary on a manifests directory, in a lab node namespace of its own (no pods: it
//! loads, compiles and writes the maps, attaching nowhere): its memory after the first sync.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use npc_tests::lab::{Lab, in_netns};

pub struct AgentMemory {
    pub rss_mib: f64,
    pub hwm_mib: f64,
    /// How long the first sync took, by the agent's log.
    pub first_sync_ms: f64,
}

/// A running agent, stopped and its pins removed on drop.
struct Running {
    child: Child,
    binary: PathBuf,
    bpffs: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if self.child.wait().is_err() {
            let _ = self.child.kill();
        }
        let _ = Command::new(&self.binary)
            .arg("cleanup")
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

pub fn measure(manifests: &Path, node: &str) -> Result<AgentMemory> {
    let binary = crate::agent_binary()?;
    let lab = Lab::new("npcb")?;
    let id = format!("npc-bench-agent-{}", std::process::id());
    let bpffs = Path::new("/sys/fs/bpf").join(&id);
    let state_dir = std::env::temp_dir().join(&id);
    let mut cmd = Command::new(&binary);
    cmd.arg("--bpffs")
        .arg(&bpffs)
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--manifests")
        .arg(manifests)
        .args(["--node-name", node, "--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The child inherits the network namespace of the thread that spawns it.
    let mut child =
        in_netns(lab.node_netns(), move || cmd.spawn()).context("starting npc-agent")?;
    let stderr = child.stderr.take().context("agent stderr")?;
    let agent = Running {
        child,
        binary,
        bpffs,
        state_dir,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let synced = loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.contains("policy state synced") => break line,
            Ok(line) => log.push(line),
            Err(_) => bail!(
                "npc-agent did not sync within 120 s; its log:\n{}",
                log.join("\n")
            ),
        }
    };
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id()))
        .context("reading the agent's /proc status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    Ok(AgentMemory {
        rss_mib: field("VmRSS:"),
        hwm_mib: field("VmHWM:"),
        first_sync_ms: took_ms(&synced).unwrap_or(f64::NAN),
    })
}

/// The `took_ms` field of a log line (plain tracing format: `took_ms=12.3`).
fn took_ms(line: &str) -> Option<f64> {
    let rest = &line[line.find("took_ms=")? + "took_ms=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}
