//! `npc-agent` in a lab's node namespace, watching a manifests directory, as the DaemonSet runs
//! it (the npc arm of the traffic part, the memory of the control part). Only the network
//! namespace is entered (not `ip netns exec`, which hides /sys/fs/bpf): the pins stay visible,
//! so `npc-agent cleanup` can detach after the agent stops (SIGTERM leaves the pinned tcx links
//! enforcing, by design).
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use npc_tests::lab::{readyz, try_in_netns};

/// The agent's HTTP endpoint, inside the node namespace.
const METRICS_ADDR: &str = "127.0.0.1:9400";
/// How long the agent may take to load, attach and sync (verifier included).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pin directories of this benchmark: `<prefix><pid>-<n>`.
const BPFFS_PREFIX: &str = "/sys/fs/bpf/npc-bench-";

/// Removes the pin directories of earlier runs whose process is gone (killed runs), detaching
/// what they still hold.
pub fn cleanup_stale(agent: &Path) -> Result<()> {
    let Ok(dir) = fs::read_dir("/sys/fs/bpf") else {
        return Ok(());
    };
    let prefix = Path::new(BPFFS_PREFIX)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        eprintln!("removing {} (left by process {pid})", path.display());
        cleanup(agent, &path, None)?;
    }
    Ok(())
}

/// `npc-agent --bpffs DIR cleanup` (in `netns`, when given), then removes DIR.
fn cleanup(agent: &Path, bpffs: &Path, netns: Option<&str>) -> Result<()> {
    let mut cmd = Command::new(agent);
    cmd.arg("--bpffs")
        .arg(bpffs)
        .arg("cleanup")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    let out = match netns {
        Some(ns) => try_in_netns(ns, move || cmd.output())?,
        None => cmd.output(),
    }
    .context("running npc-agent cleanup")?;
    ensure!(
        out.status.success(),
        "npc-agent --bpffs {} cleanup failed ({}): {}",
        bpffs.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    match fs::remove_dir_all(bpffs) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", bpffs.display()))
        }
        _ => Ok(()),
    }
}

/// A running agent; on drop (also while unwinding) it is killed and `cleanup` detaches it.
pub struct Agent {
    agent: PathBuf,
    netns: String,
    child: Option<Child>,
    bpffs: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent on `manifests` in `netns` and waits until `/readyz` answers 200 (the
    /// initial policy state is in the maps). `work` holds its log and state directory.
    pub fn start(
        agent: &Path,
        netns: &str,
        manifests: &Path,
        node: &str,
        work: &Path,
    ) -> Result<Agent> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let bpffs = PathBuf::from(format!("{BPFFS_PREFIX}{}-{n}", std::process::id()));
        let state_dir = work.join(format!("agent-state-{n}"));
        let log = work.join(format!("agent-{n}.log"));
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(agent);
        cmd.arg("--bpffs")
            .arg(&bpffs)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--manifests")
            .arg(manifests)
            .args(["--node-name", node, "--metrics-addr", METRICS_ADDR])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // The guard exists before the process: whatever happens next, drop cleans up.
        let mut guard = Agent {
            agent: agent.to_path_buf(),
            netns: netns.to_string(),
            child: None,
            bpffs,
            state_dir,
            log,
        };
        // The child inherits the network namespace of the spawning thread.
        guard.child = Some(
            try_in_netns(netns, move || cmd.spawn())?
                .with_context(|| format!("starting {}", agent.display()))?,
        );
        guard.wait_ready()?;
        Ok(guard)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let addr: SocketAddr = METRICS_ADDR.parse()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "the agent exited ({status}) before it was ready\n{}",
                    self.log_tail()
                );
            }
            if readyz(&self.netns, addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent was not ready within {READY_TIMEOUT:?}\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the agent's log.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("agent log ({}):\n{tail}", self.log.display())
    }

    /// SIGTERM, then `cleanup` (which detaches); fails if the agent does not exit cleanly.
    pub fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().context("the agent is not running")?;
        // SAFETY: plain syscall on our unreaped child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the agent did not exit within {EXIT_TIMEOUT:?} of SIGTERM\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            status.success(),
            "the agent exited with {status}\n{}",
            self.log_tail()
        );
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let result = cleanup(&self.agent, &self.bpffs, Some(&self.netns));
        let _ = fs::remove_dir_all(&self.state_dir);
        result
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.bpffs.exists() && self.child.is_none() {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!("stopping the agent: {e:#}");
        }
    }
}
