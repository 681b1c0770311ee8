//! The `npc-agent` binary as a test guard: started in a lab's node namespace, its output
//! collected line by line, killed (SIGKILL) and its bpffs directory removed on drop.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use npc_agent::dataplane::Maps;

pub mod apiserver;
pub mod cluster;
pub mod kube;
pub mod scrape;
use npc_tests::lab::{Lab, in_netns};

pub const AGENT: &str = env!("CARGO_BIN_EXE_npc-agent");
/// How long the agent may take to log an expected line (loading includes the verifier).
pub const LOG_WAIT: Duration = Duration::from_secs(10);
/// How long the agent may take to exit after a signal.
pub const EXIT_WAIT: Duration = Duration::from_secs(5);
// ---------------------------------------------------------------------------------------------
// The agent process, as a guard
// ---------------------------------------------------------------------------------------------

/// How the agent enters the lab's node namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enter {
    /// Only the network namespace (`setns` before exec): the agent sees the host's
    /// /sys/fs/bpf, so its pins are visible to the test and to `cleanup`.
    Netns,
    /// `ip netns exec NODE npc-agent ...`: a private mount namespace where /sys is remounted
    /// and /sys/fs/bpf is no bpffs, so the agent mounts its own (gone when it exits).
    IpNetnsExec,
}

/// Everything the agent wrote on stdout and stderr, line by line.
#[derive(Default)]
pub struct Output {
    pub state: Mutex<OutputState>,
    pub changed: Condvar,
}

impl Output {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
pub struct OutputState {
    pub lines: Vec<String>,
    /// Streams at end of file (2: the agent is gone).
    pub closed: usize,
}

/// A running `npc-agent run`; killed (SIGKILL) on drop, and its bpffs directory removed unless
/// the test passed one in ([`Agent::start_in`]).
pub struct Agent {
    pub child: Child,
    /// Set once the agent was reaped.
    pub status: Option<ExitStatus>,
    pub output: Arc<Output>,
    pub readers: Vec<JoinHandle<()>>,
    pub bpffs: PathBuf,
    pub owns_bpffs: bool,
    /// Its `--state-dir` (names for dump), removed on drop.
    pub state_dir: PathBuf,
    pub json: bool,
}

/// A bpffs directory shared by several agents in turn; removed on drop.
pub struct BpffsDir(pub PathBuf);

impl Drop for BpffsDir {
    fn drop(&mut self) {
        remove_bpffs(&self.0);
    }
}

pub fn remove_bpffs(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("removing {}: {e}", dir.display());
    }
}

/// A bpffs directory of its own for each agent: `/sys/fs/bpf/npc-agenttest-<pid>-<n>`.
pub fn unique_bpffs() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    PathBuf::from(format!(
        "/sys/fs/bpf/npc-agenttest-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A state directory of its own for each agent: `/tmp/npc-agenttest-state-<pid>-<n>`.
pub fn unique_state_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "npc-agenttest-state-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Agent {
    /// Starts `npc-agent --bpffs <unique> <args>` in the lab's node namespace.
    pub fn start(lab: &Lab, enter: Enter, args: &[&str]) -> Agent {
        Agent::spawn(lab, enter, unique_bpffs(), true, args)
    }

    /// Starts `npc-agent --bpffs <dir> <args>`: several agents in turn may use `dir`.
    pub fn start_in(lab: &Lab, dir: &BpffsDir, args: &[&str]) -> Agent {
        Agent::spawn(lab, Enter::Netns, dir.0.clone(), false, args)
    }

    pub fn spawn(
        lab: &Lab,
        enter: Enter,
        bpffs: PathBuf,
        owns_bpffs: bool,
        args: &[&str],
    ) -> Agent {
        Agent::spawn_env(lab, enter, bpffs, owns_bpffs, args, &[])
    }

    /// [`Agent::spawn`] with environment variables added (`KUBECONFIG`).
    pub fn spawn_env(
        lab: &Lab,
        enter: Enter,
        bpffs: PathBuf,
        owns_bpffs: bool,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Agent {
        Agent::spawn_wrapped(lab, enter, bpffs, owns_bpffs, args, env, &[])
    }

    /// [`Agent::spawn_env`] with the agent's command line after `wrapper` (e.g. `setpriv ...
    /// --`), which must exec the agent so that the child's pid is the agent's.
    pub fn spawn_wrapped(
        lab: &Lab,
        enter: Enter,
        bpffs: PathBuf,
        owns_bpffs: bool,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        wrapper: &[&str],
    ) -> Agent {
        let mut cmd = match enter {
            Enter::Netns => match wrapper.split_first() {
                None => Command::new(AGENT),
                Some((program, rest)) => {
                    let mut cmd = Command::new(program);
                    cmd.args(rest).arg(AGENT);
                    cmd
                }
            },
            Enter::IpNetnsExec => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", lab.node_netns()])
                    .args(wrapper)
                    .arg(AGENT);
                cmd
            }
        };
        let state_dir = unique_state_dir();
        cmd.arg("--bpffs")
            .arg(&bpffs)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = match enter {
            // The child inherits the network namespace of the thread that spawns it.
            Enter::Netns => in_netns(lab.node_netns(), move || cmd.spawn()),
            Enter::IpNetnsExec => cmd.spawn(),
        };
        let mut child = spawned.expect("spawning npc-agent");
        let output = Arc::new(Output::default());
        let readers = [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ]
        .into_iter()
        .map(|stream| {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    output.lock().lines.push(line);
                    output.changed.notify_all();
                }
                output.lock().closed += 1;
                output.changed.notify_all();
            })
        })
        .collect();
        Agent {
            child,
            status: None,
            output,
            readers,
            bpffs,
            owns_bpffs,
            state_dir,
            json: args.windows(2).any(|w| w == ["--log-format", "json"]),
        }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// The output so far, for failure messages.
    pub fn log(&self) -> String {
        self.output.lock().lines.join("\n")
    }

    /// Waits until a line satisfies `pred` and returns it; panics when none does within
    /// [`LOG_WAIT`] or the agent exited (the guard then prints the agent's output).
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LOG_WAIT;
        let mut state = self.output.lock();
        let why = loop {
            if let Some(line) = state.lines.iter().find(|l| pred(l)) {
                return line.clone();
            }
            let now = Instant::now();
            if state.closed == 2 {
                break "the agent exited";
            }
            if now >= deadline {
                break "timed out";
            }
            state = self
                .output
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        // Never panic holding the lock: the guard needs it.
        drop(state);
        panic!("waiting for {what}: {why}");
    }

    /// Whether `line` is the log event `message` about interface `name`.
    pub fn is_event(&self, line: &str, message: &str, name: &str) -> bool {
        if self.json {
            line.contains(&format!(r#""message":"{message}""#))
                && line.contains(&format!(r#""name":"{name}""#))
        } else {
            // `... INFO npc_agent::run: attached ifindex=5 name=npc0-a mode=tcx`
            line.contains(&format!(": {message} "))
                && line.split_whitespace().any(|w| w == format!("name={name}"))
        }
    }

    pub fn wait_attached(&self, veth: &str) -> String {
        self.wait_for(&format!("the agent to attach to {veth}"), |l| {
            self.is_event(l, "attached", veth)
        })
    }

    pub fn wait_detached(&self, veth: &str) -> String {
        self.wait_for(&format!("the agent to detach from {veth}"), |l| {
            self.is_event(l, "detached: interface removed", veth)
        })
    }

    pub fn has_attached(&self, veth: &str) -> bool {
        self.output
            .lock()
            .lines
            .iter()
            .any(|l| self.is_event(l, "attached", veth))
    }

    pub fn signal(&self, signal: libc::c_int) {
        assert!(self.status.is_none(), "the agent already exited");
        // SAFETY: a plain syscall; the child is not reaped yet, so its pid is still its own.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the agent to exit, within [`EXIT_WAIT`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                self.status = Some(status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {EXIT_WAIT:?}; its output:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        self.status.is_none()
            && self
                .child
                .try_wait()
                .expect("waiting for the agent")
                .is_none()
    }

    /// The agent's maps, opened from their pins (only with [`Enter::Netns`]).
    pub fn maps(&self) -> Maps {
        Maps::open(&self.bpffs).expect("opening the agent's pinned maps")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        if self.owns_bpffs {
            remove_bpffs(&self.bpffs);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        if std::thread::panicking() {
            eprintln!("npc-agent output:\n{}", self.log());
        }
    }
}

/// Runs the agent binary to completion (for `cleanup` and bad input) in the test's namespaces.
pub fn agent_command(args: &[&str]) -> std::process::Output {
    Command::new(AGENT)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("running npc-agent")
}
