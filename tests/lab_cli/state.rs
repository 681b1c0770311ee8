//! The state file of a persistent lab, `/run/npc-lab/<name>.json`, and the processes it
//! records (identified by pid and start time, so a recycled pid is never signalled).
use std::{
    fs,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::manifests::Port;

/// Where state files and logs live.
pub const STATE_DIR: &str = "/run/npc-lab";
/// Version of the state file format.
pub const STATE_VERSION: u32 = 1;

/// How far `up` got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// State file created; the responder process may be starting.
    Starting,
    /// Namespaces and responders are up; the agent may be starting.
    Lab,
    /// Everything is up (with the agent unless `--no-agent`).
    Up,
}

/// A process the lab started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks after boot).
    pub start_time: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub process: Option<Proc>,
    pub bin: PathBuf,
    /// The agent's pins (`--bpffs`), removed by `down`.
    pub bpffs: PathBuf,
    /// `--metrics-addr`, in the node namespace.
    pub metrics_addr: SocketAddr,
    /// The agent's stdout and stderr.
    pub log: PathBuf,
}

/// A pod as built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub lab_name: String,
    pub netns: String,
    /// IPv4, then IPv6 if any.
    pub ips: Vec<IpAddr>,
    pub ports: Vec<Port>,
    pub host_veth: String,
    pub host_ifindex: u32,
    pub host_mac: String,
    pub mac: String,
    pub ifindex: u32,
    /// Bridge name, or `None` when routed.
    pub bridge: Option<String>,
}

impl PodState {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The state file's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// `--name`.
    pub name: String,
    pub phase: Phase,
    /// The manifests directory (absolute) the agent watches.
    pub manifests: PathBuf,
    pub routed: bool,
    /// Seconds since the epoch when `up` started.
    pub created_unix: u64,
    /// The `npc-lab serve` process that owns the namespaces and runs the responders.
    pub responder: Option<Proc>,
    /// Its log (stderr).
    pub responder_log: PathBuf,
    /// The lab name (`<prefix>-<pid>-0`, namespaces `<lab>-*`), known once the responder
    /// process is spawned.
    pub lab: Option<String>,
    pub node_netns: Option<String>,
    pub agent: Option<AgentState>,
    pub pods: Vec<PodState>,
}

impl State {
    pub fn new(name: &str, manifests: &Path, routed: bool) -> State {
        State {
            version: STATE_VERSION,
            name: name.to_string(),
            phase: Phase::Starting,
            manifests: manifests.to_path_buf(),
            routed,
            created_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            responder: None,
            responder_log: log_path(name, "serve"),
            lab: None,
            node_netns: None,
            agent: None,
            pods: Vec::new(),
        }
    }

    /// Any recorded process still running.
    pub fn alive(&self) -> bool {
        self.responder.is_some_and(|p| p.alive())
            || self
                .agent
                .as_ref()
                .and_then(|a| a.process)
                .is_some_and(|p| p.alive())
    }
}

/// Checks a lab name: it names files and namespaces.
pub fn check_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-'),
        "lab name {name:?}: use 1 to 32 lowercase ASCII letters, digits and '-'"
    );
    Ok(())
}

pub fn state_path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.json"))
}

/// `/run/npc-lab/<name>.<what>.log`.
pub fn log_path(name: &str, what: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.{what}.log"))
}

/// `/run/npc-lab/<name>.agent-state`: the agent's `--state-dir` (the names `npc-agent dump`
/// reads).
pub fn agent_state_dir(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.agent-state"))
}

/// The lab's own directory (e.g. the demo's manifests).
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name)
}

/// Reads the state of lab `name`; `None` when there is none.
pub fn read(name: &str) -> Result<Option<State>> {
    let path = state_path(name);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let state: State =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    ensure!(
        state.version == STATE_VERSION,
        "{}: state version {} (this npc-lab writes {STATE_VERSION})",
        path.display(),
        state.version
    );
    Ok(Some(state))
}

/// Creates the state file; fails if it exists (another `up` of the same name).
pub fn create(state: &State) -> Result<()> {
    fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    let path = state_path(&state.name);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&serde_json::to_vec_pretty(state)?)?;
    f.write_all(b"\n")?;
    Ok(())
}

/// Replaces the state file atomically.
pub fn write(state: &State) -> Result<()> {
    let path = state_path(&state.name);
    let tmp = path.with_extension("json.tmp");
    let mut text = serde_json::to_vec_pretty(state)?;
    text.push(b'\n');
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn remove(name: &str) -> Result<()> {
    for path in [
        state_path(name),
        state_path(name).with_extension("json.tmp"),
    ] {
        remove_file(&path)?;
    }
    Ok(())
}

/// Removes a file; absent is fine.
pub fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes a directory tree; absent is fine.
pub fn remove_dir(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The last `lines` lines of a log, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        format!("({} is empty)", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// State letter and start time from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl Proc {
    pub fn of(pid: u32) -> Result<Proc> {
        let (_, start_time) =
            proc_stat(pid).with_context(|| format!("process {pid} is already gone"))?;
        Ok(Proc { pid, start_time })
    }

    /// Still running (a zombie counts as gone: orphans may never be reaped here).
    pub fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((s, t)) if t == self.start_time && s != 'Z' && s != 'X')
    }

    fn signal(&self, sig: libc::c_int) {
        if self.alive() {
            // SAFETY: plain syscall; the pid was just checked to be this process.
            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        }
    }

    /// SIGTERM, then SIGKILL if it is still running after `grace`. Ok once it is gone.
    pub fn terminate(&self, grace: Duration) -> Result<()> {
        if !self.alive() {
            return Ok(());
        }
        self.signal(libc::SIGTERM);
        if self.wait_gone(grace) {
            return Ok(());
        }
        eprintln!(
            "npc-lab: process {} ignored SIGTERM for {grace:?}: SIGKILL",
            self.pid
        );
        self.signal(libc::SIGKILL);
        if self.wait_gone(Duration::from_secs(5)) {
            return Ok(());
        }
        bail!("process {} survives SIGKILL", self.pid)
    }

    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.alive() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process() {
        let me = Proc::of(std::process::id()).unwrap();
        assert!(me.alive());
        let other = Proc {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.alive(), "a recycled pid is not ours");
        assert!(Proc::of(4_194_305).is_err());
    }

    #[test]
    fn names_and_json() {
        check_name("demo").unwrap();
        check_name("a-1").unwrap();
        for bad in ["", "A", "a/b", "-a", "a.b", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let s = State::new("t", Path::new("/x"), true);
        let back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(
            serde_json::to_string(&s)
                .unwrap()
                .contains("\"phase\":\"starting\"")
        );
    }
}
