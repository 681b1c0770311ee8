//! Shared helpers: where the workspace is, how to run child commands, timing.

use std::{
    env,
    ffi::OsString,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The workspace root: xtask lives one level below it. Child cargo commands run from here so the
/// toolchain pinned in `rust-toolchain.toml` applies whatever the caller's current directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
}

/// Where cargo puts build outputs: `CARGO_TARGET_DIR`, else `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Where `cargo install` (bpf-linker) and rustup's proxies live; not on PATH in every shell
/// (e.g. `sudo`, CI images).
pub fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|cargo_home| cargo_home.join("bin"))
}

/// PATH with `dirs` moved to the front, so what they hold wins over same-named programs elsewhere.
pub fn path_with(dirs: &[PathBuf]) -> OsString {
    let rest: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).filter(|d| !dirs.contains(d)).collect())
        .unwrap_or_default();
    env::join_paths(dirs.iter().chain(&rest)).expect("PATH entries contain no ':'")
}

/// A command that runs from the workspace root with the cargo bin directory on PATH.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd.env(
        "PATH",
        path_with(&cargo_bin_dir().into_iter().collect::<Vec<_>>()),
    );
    cmd
}

/// `program arg1 arg2`, for messages.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        write!(s, " {}", arg.to_string_lossy()).unwrap();
    }
    s
}

/// Runs `cmd` with its output going straight to ours (long builds must show progress); fails if
/// it cannot start or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` like `run`, echoing its stdout line by line and handing each line to `on_line`
/// (to tally test results without hiding progress).
pub fn run_tee(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", display(cmd)))?;
    let stdout = child.stdout.take().context("child stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading child output")?;
        println!("{line}");
        on_line(&line);
    }
    let status = child.wait().context("waiting for child")?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` and captures stdout and stderr; `None` if the program does not exist.
pub fn output(cmd: &mut Command) -> anyhow::Result<Option<Output>> {
    match cmd.output() {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot run `{}`", display(cmd))),
    }
}

/// Runs one step of `task` and prints one line: what it did (`f`'s message) and how long it
/// took; a failure names the step.
pub fn step(
    task: &str,
    name: &str,
    f: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let (result, took) = timed(f);
    match result {
        Ok(done) => {
            println!("{task}: {name}: {done} ({})", secs(took));
            Ok(())
        }
        Err(e) => {
            println!("{task}: {name}: FAILED ({})", secs(took));
            Err(e.context(format!("{task} step `{name}`")))
        }
    }
}

/// Runs `f` and returns its result with how long it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let result = f();
    (result, start.elapsed())
}

/// Seconds with one decimal, the unit of every duration we print.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Whether we run with effective uid 0. Read from /proc (npc is Linux-only anyway) so xtask
/// needs no libc binding.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            // Real, effective, saved, filesystem: the effective one decides.
            uids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}
