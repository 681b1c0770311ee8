//! `npc-lab up` and `npc-lab down`: the lifecycle of a persistent lab.
//!
//! `up DIR`: reads and plans the manifests (nothing is created if they are unusable), checks the
//! agent binary, creates the state file, spawns the responder process (`npc-lab serve`, which
//! owns the namespaces), records it, then starts the agent in the node namespace and waits for
//! its `/readyz`. Any failure, and SIGINT/SIGTERM/SIGHUP meanwhile, runs [`teardown`].
//!
//! `down`: [`teardown`]: the agent (SIGTERM, then SIGKILL), the responder process (which removes
//! the namespaces on SIGTERM), whatever namespaces are left, the agent's bpffs directory, the
//! logs and the state file. Idempotent, and works on a half-created lab.
use std::{
    fs,
    io::Write as _,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use npc_tests::lab::{self, readyz, try_in_netns};

use crate::{
    manifests, plan,
    serve::{self, Report},
    state::{self, AgentState, Phase, Proc, State},
};

/// The agent's metrics address, inside the lab's node namespace (each lab has its own).
pub const METRICS_ADDR: &str = "127.0.0.1:9400";
/// How long the responder process may take to build the lab.
const BUILD_TIMEOUT: Duration = Duration::from_secs(120);
const AGENT_GRACE: Duration = Duration::from_secs(5);
const RESPONDER_GRACE: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct UpOptions {
    pub dir: PathBuf,
    pub name: String,
    pub routed: bool,
    /// `None`: no agent.
    pub agent: Option<PathBuf>,
    pub ready_timeout: Duration,
    /// Print the summary of what was built.
    pub verbose: bool,
}

// ---------------------------------------------------------------------------------------------
// Signals: clean up when interrupted
// ---------------------------------------------------------------------------------------------

/// Held while a process is spawned and recorded, and by the signal handler while it tears the
/// lab down: a process is either recorded before the teardown reads the state, or never
/// spawned.
static LIFECYCLE: Mutex<()> = Mutex::new(());

pub fn lifecycle() -> MutexGuard<'static, ()> {
    LIFECYCLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT, SIGTERM or SIGHUP: tear down lab `name`, run `extra`, exit with status 130.
/// Call before spawning any thread (the signals are blocked in every thread and taken by a
/// watcher thread); children spawned with [`detach`] start with an empty mask.
pub fn cleanup_on_signal(name: &str, extra: impl FnOnce() + Send + 'static) -> Result<()> {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask on this thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        ensure!(rc == 0, "pthread_sigmask failed");
        set
    };
    let name = name.to_string();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: valid set and out pointer.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            eprintln!("npc-lab: interrupted (signal {sig}): removing lab {name}");
            let _held = lifecycle();
            if let Err(e) = teardown(&name) {
                eprintln!("npc-lab: {e:#}");
            }
            extra();
            std::process::exit(130);
        })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// up
// ---------------------------------------------------------------------------------------------

/// Brings lab `opts.name` up; on failure nothing is left.
pub fn up(opts: &UpOptions) -> Result<State> {
    state::check_name(&opts.name)?;
    let dir = fs::canonicalize(&opts.dir)
        .with_context(|| format!("manifests directory {}", opts.dir.display()))?;
    ensure!(dir.is_dir(), "{} is no directory", dir.display());
    let cluster = manifests::load_dir(&dir)?;
    let (plan, notes) = plan::plan(&opts.name, &cluster, opts.routed)?;
    for note in &notes {
        eprintln!("npc-lab: note: {note}");
    }
    if let Some(agent) = &opts.agent {
        check_agent(agent)?;
    }

    if let Some(old) = state::read(&opts.name)? {
        if old.alive() {
            bail!(
                "lab {:?} is already up (state in {}); `npc-lab down --name {}` first",
                opts.name,
                state::state_path(&opts.name).display(),
                opts.name
            );
        }
        eprintln!(
            "npc-lab: removing what is left of an earlier lab {:?}",
            opts.name
        );
        teardown(&opts.name)?;
    }
    let mut st = State::new(&opts.name, &dir, opts.routed);
    {
        let _held = lifecycle();
        state::create(&st)?;
    }
    match bring_up(opts, &plan, &mut st) {
        Ok(()) => Ok(st),
        Err(e) => {
            let _held = lifecycle();
            if let Err(t) = teardown(&opts.name) {
                eprintln!("npc-lab: cleaning up after the failure: {t:#}");
            }
            Err(e)
        }
    }
}

fn bring_up(opts: &UpOptions, plan: &plan::Plan, st: &mut State) -> Result<()> {
    // The responder process: owns the namespaces and runs the echo servers.
    let exe = std::env::current_exe().context("locating npc-lab")?;
    let log = open_log(&st.responder_log)?;
    let mut child = {
        let _held = lifecycle();
        let mut cmd = Command::new(&exe);
        cmd.args(["serve", "--name", &opts.name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .current_dir("/");
        detach(&mut cmd);
        let mut child = cmd.spawn().context("spawning `npc-lab serve`")?;
        st.responder = Some(Proc::of(child.id())?);
        st.lab = Some(serve::lab_name_for(&opts.name, child.id()));
        state::write(st)?;
        let mut stdin = child.stdin.take().context("responder stdin")?;
        stdin.write_all(&serde_json::to_vec(plan)?)?;
        drop(stdin);
        child
    };
    let stdout = child.stdout.take().context("responder stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(serve::read_report(stdout));
    });
    let report = match rx.recv_timeout(BUILD_TIMEOUT) {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "the responder process took more than {BUILD_TIMEOUT:?} to build the lab"
        )),
    };
    let built = match report {
        Ok(Report::Ok(built)) => built,
        Ok(Report::Error(e)) => {
            let _ = child.wait();
            bail!("building the lab: {e}");
        }
        Err(e) => {
            let _ = child.try_wait();
            bail!("{e:#}\n{}", state::log_tail(&st.responder_log, 20));
        }
    };
    ensure!(
        Some(&built.lab) == st.lab.as_ref(),
        "the responder built lab {}, expected {:?}",
        built.lab,
        st.lab
    );
    st.node_netns = Some(built.node_netns.clone());
    st.pods = built.pods;
    st.phase = Phase::Lab;
    state::write(st)?;
    // It lives on after we exit; the Child handle just goes away (not killed on drop).
    drop(child);

    if let Some(agent) = &opts.agent {
        start_agent(opts, agent, st)?;
    }
    st.phase = Phase::Up;
    state::write(st)?;
    if opts.verbose {
        print_summary(st, built.responders);
    }
    Ok(())
}

/// Own session: not hit by the terminal's Ctrl-C, not hung up with it. And no blocked
/// signals: std lets children inherit the mask, and [`cleanup_on_signal`] blocks SIGTERM (the
/// agent must see it).
fn detach(cmd: &mut Command) {
    // SAFETY: setsid, sigemptyset and pthread_sigmask are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
}

fn open_log(path: &Path) -> Result<fs::File> {
    fs::create_dir_all(state::STATE_DIR)?;
    fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// The agent's `--help` must list `--manifests`.
pub fn check_agent(agent: &Path) -> Result<()> {
    let out = Command::new(agent)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{} --help`", agent.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    ensure!(
        help.contains("--manifests"),
        "the agent {} has no manifests mode (its --help lists no --manifests option): \
         build a newer npc-agent, or run the lab without enforcement (--no-agent)",
        agent.display()
    );
    Ok(())
}

/// The agent binary to use when none was given: `npc-agent` next to this binary.
pub fn default_agent() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating npc-lab")?;
    let candidate = exe.with_file_name("npc-agent");
    ensure!(
        candidate.is_file(),
        "no agent binary at {} (build it with `cargo build --release -p npc-agent`): pass \
         --agent PATH, or --no-agent for a lab without enforcement",
        candidate.display()
    );
    Ok(candidate)
}

fn start_agent(opts: &UpOptions, agent: &Path, st: &mut State) -> Result<()> {
    let node = st.node_netns.clone().context("no node namespace")?;
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npc-lab-{}", opts.name));
    state::remove_dir(&bpffs)?;
    let metrics: SocketAddr = METRICS_ADDR.parse().expect("valid address");
    let log_path = state::log_path(&opts.name, "agent");
    let log = open_log(&log_path)?;
    let mut agent_state = AgentState {
        process: None,
        bin: agent.to_path_buf(),
        bpffs: bpffs.clone(),
        metrics_addr: metrics,
        log: log_path.clone(),
    };
    let mut child: Child = {
        let _held = lifecycle();
        st.agent = Some(agent_state.clone());
        state::write(st)?;
        let mut cmd = Command::new(agent);
        cmd.arg("--bpffs")
            .arg(&bpffs)
            .arg("--state-dir")
            .arg(state::agent_state_dir(&opts.name))
            .arg("--manifests")
            .arg(&st.manifests)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .current_dir("/");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        detach(&mut cmd);
        // Only the network namespace: the agent keeps the host's /sys/fs/bpf, so `down` sees
        // and removes its pins. The child inherits the spawning thread's namespace.
        let child = try_in_netns(&node, move || cmd.spawn())?
            .with_context(|| format!("starting {}", agent.display()))?;
        agent_state.process = Some(Proc::of(child.id())?);
        st.agent = Some(agent_state);
        state::write(st)?;
        child
    };
    let deadline = Instant::now() + opts.ready_timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the agent exited ({status}) before it was ready\n{}",
                state::log_tail(&log_path, 30)
            );
        }
        if readyz(&node, metrics) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the agent was not ready (/readyz on {metrics} in {node}) within {:?}\n{}",
                opts.ready_timeout,
                state::log_tail(&log_path, 30)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn print_summary(st: &State, responders: usize) {
    println!(
        "lab {} is up: {} pods, {} responders, {}",
        st.name,
        st.pods.len(),
        responders,
        if st.routed {
            "routed (/32 routes)"
        } else {
            "on bridges"
        }
    );
    let width = st.pods.iter().map(|p| p.key().len()).max().unwrap_or(0);
    for p in &st.pods {
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        let ports: Vec<String> = p
            .ports
            .iter()
            .map(|q| format!("{}/{}", q.port, q.protocol))
            .collect();
        let line = format!(
            "  {:width$}  {:<28}  {}",
            p.key(),
            ips.join(" "),
            ports.join(" ")
        );
        println!("{}", line.trim_end());
    }
    println!("  namespaces: {}-*", st.lab.as_deref().unwrap_or("?"));
    if st
        .pods
        .iter()
        .any(|p| p.ports.iter().any(|q| !q.protocol.probed()))
    {
        println!("  SCTP ports get no responder and are not probed");
    }
    match &st.agent {
        Some(a) => {
            println!(
                "  agent: pid {}, watching {}, log {}",
                a.process.map_or(0, |p| p.pid),
                st.manifests.display(),
                a.log.display()
            );
            println!(
                "  metrics: ip netns exec {} curl -s http://{}/metrics",
                st.node_netns.as_deref().unwrap_or("?"),
                a.metrics_addr
            );
        }
        None => println!("  agent: none (--no-agent): nothing is enforced"),
    }
}

// ---------------------------------------------------------------------------------------------
// down
// ---------------------------------------------------------------------------------------------

/// Reaps whichever of our children have exited: the responder and the agent, when this
/// process (`up` failing, `demo`) started them; left alone they would stay zombies.
fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: plain syscall.
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            break;
        }
    }
}

/// What [`teardown`] did.
#[derive(Debug, Default)]
pub struct Removed {
    pub existed: bool,
    pub namespaces: Vec<String>,
}

/// Removes lab `name` and everything it started. Keeps the state file when something could
/// not be removed, so that another `down` can finish.
pub fn teardown(name: &str) -> Result<Removed> {
    let Some(st) = state::read(name)? else {
        return Ok(Removed::default());
    };
    let mut errors = Vec::new();
    let mut removed = Removed {
        existed: true,
        ..Removed::default()
    };
    if let Some(p) = st.agent.as_ref().and_then(|a| a.process)
        && let Err(e) = p.terminate(AGENT_GRACE)
    {
        errors.push(format!("stopping the agent: {e:#}"));
    }
    if let Some(p) = st.responder
        && let Err(e) = p.terminate(RESPONDER_GRACE)
    {
        errors.push(format!("stopping the responders: {e:#}"));
    }
    reap_children();
    if let Some(lab_name) = &st.lab {
        match lab::destroy_lab(lab_name) {
            Ok(left) => removed.namespaces = left,
            Err(e) => errors.push(format!("removing namespaces {lab_name}-*: {e:#}")),
        }
    }
    if let Some(agent) = &st.agent {
        if let Err(e) = state::remove_dir(&agent.bpffs) {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = state::remove_dir(&state::agent_state_dir(name)) {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = state::remove_file(&agent.log) {
            errors.push(format!("{e:#}"));
        }
    }
    if let Err(e) = state::remove_file(&st.responder_log) {
        errors.push(format!("{e:#}"));
    }
    if !errors.is_empty() {
        bail!(
            "lab {name}: {} (state kept in {})",
            errors.join("; "),
            state::state_path(name).display()
        );
    }
    state::remove(name)?;
    Ok(removed)
}
