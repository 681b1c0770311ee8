//! The `npc-lab` binary end to end, without the agent (nothing enforces, so every declared port
//! answers): `up` from an example directory, `probe --json`, `down`, and nothing left behind:
//! no namespace of the lab, no process it started, no state file or log. Also: a failed `up`
//! (agent that dies, agent never ready) leaves nothing either.
//!
//! Needs root. Every command is bounded in time; a guard runs `npc-lab down` if a test fails
//! half-way. This process becomes a child subreaper, so the lab's processes, orphaned when
//! `npc-lab up` exits, are reparented here and can be reaped and checked for.
use std::{
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Once,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_npc-lab");
const STATE_DIR: &str = "/run/npc-lab";
const CMD_TIMEOUT: Duration = Duration::from_secs(90);

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A lab name of this process's own.
fn lab_name(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

fn subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: plain prctl on this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
    });
}

/// Runs `npc-lab ARGS` within [`CMD_TIMEOUT`] (killed after it).
fn npc_lab(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning npc-lab");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut o = Vec::new();
        let _ = out.read_to_end(&mut o);
        o
    });
    let err_reader = thread::spawn(move || {
        let mut e = Vec::new();
        let _ = err.read_to_end(&mut e);
        e
    });
    let deadline = Instant::now() + CMD_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`npc-lab {}` took more than {CMD_TIMEOUT:?}",
                args.join(" ")
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

fn ok(args: &[&str]) -> String {
    let out = npc_lab(args);
    assert!(
        out.status.success(),
        "`npc-lab {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `npc-lab down --name NAME` on drop (a test that failed half-way).
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let out = npc_lab(&["down", "--name", &self.0]);
        if !out.status.success() {
            eprintln!("down {}: {}", self.0, String::from_utf8_lossy(&out.stderr));
        }
    }
}

fn state(name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(format!("{STATE_DIR}/{name}.json")).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

/// Pids recorded in a state file.
fn pids(st: &Value) -> Vec<i32> {
    let mut v = Vec::new();
    if let Some(p) = st["responder"]["pid"].as_i64() {
        v.push(p as i32);
    }
    if let Some(p) = st["agent"]["process"]["pid"].as_i64() {
        v.push(p as i32);
    }
    v
}

/// Reaps `pid` if it is our (adopted) zombie; true once no such process exists.
fn gone(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: plain syscall.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Nothing of lab `name` (namespaces `lab-*`, processes `pids`) is left.
fn assert_nothing_left(name: &str, lab: Option<&str>, pids: &[i32]) {
    assert!(state(name).is_none(), "state file of {name} left");
    let files: Vec<String> = std::fs::read_dir(STATE_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with(&format!("{name}.")) || f == name)
                .collect()
        })
        .unwrap_or_default();
    assert!(files.is_empty(), "files left in {STATE_DIR}: {files:?}");
    if let Some(lab) = lab {
        let prefix = format!("{lab}-");
        let left: Vec<String> = npc_tests::lab::list_netns()
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(left.is_empty(), "namespaces left: {left:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for &pid in pids {
        while !gone(pid) {
            assert!(Instant::now() < deadline, "process {pid} still exists");
            thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(
        !Path::new(&format!("/sys/fs/bpf/npc-lab-{name}")).exists(),
        "bpffs directory left"
    );
}

/// Up without agent, probe: every client reaches every declared port of every other pod, on
/// each of its addresses; down leaves nothing.
fn full_reachability(example: &str, tag: &str, extra: &[&str], pods: usize, probes: usize) {
    subreaper();
    let name = lab_name(tag);
    let dir = examples().join(example);
    let guard = Down(name.clone());
    let mut args = vec!["up", "--no-agent", "--name", &name];
    args.extend_from_slice(extra);
    let dir_s = dir.to_string_lossy().into_owned();
    args.push(&dir_s);
    let summary = ok(&args);
    assert!(
        summary.contains(&format!("lab {name} is up: {pods} pods")),
        "{summary}"
    );

    let st = state(&name).expect("state file");
    assert_eq!(st["phase"], "up");
    assert_eq!(st["pods"].as_array().unwrap().len(), pods);
    let lab = st["lab"].as_str().unwrap().to_string();
    let node = st["node_netns"].as_str().unwrap();
    assert!(npc_tests::lab::netns_exists(node));
    let pids = pids(&st);
    assert_eq!(pids.len(), 1, "one responder process, no agent");

    // A second `up` of the same name is refused and leaves the first alone.
    let again = npc_lab(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    let t0 = Instant::now();
    let json = ok(&["probe", "--name", &name, "--json", "--timeout-ms", "2000"]);
    let took = t0.elapsed();
    let m: Value = serde_json::from_str(&json).unwrap();
    let list = m["probes"].as_array().unwrap();
    assert_eq!(list.len(), probes, "{json}");
    for p in list {
        assert_eq!(p["ok"], true, "{p}");
        assert_ne!(p["from"], p["to"]);
    }
    // Every (client, server, port) of the manifests was probed.
    let cols = m["columns"].as_array().unwrap().len();
    let mut seen = std::collections::BTreeSet::new();
    for p in list {
        seen.insert((
            p["from"].to_string(),
            p["to"].to_string(),
            p["port"].to_string(),
            p["protocol"].to_string(),
        ));
    }
    let clients = m["clients"].as_array().unwrap().len();
    let own_ports: usize = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["ports"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|q| q["protocol"] != "SCTP")
                .count()
        })
        .sum();
    assert_eq!(seen.len(), clients * cols - own_ports);
    assert!(took < Duration::from_secs(10), "probe took {took:?}");

    let table = ok(&["probe", "--name", &name]);
    assert!(
        table
            .lines()
            .filter(|l| !l.starts_with(". connected"))
            .all(|l| !l.contains('X')),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "({} of {} connections open",
            seen.len(),
            seen.len()
        )),
        "{table}"
    );

    let out = ok(&["down", "--name", &name]);
    assert!(out.contains("removed"), "{out}");
    std::mem::forget(guard);
    assert_nothing_left(&name, Some(&lab), &pids);
    // Idempotent.
    assert!(ok(&["down", "--name", &name]).contains("nothing to do"));
}

#[test]
fn sock_shop_on_bridges() {
    // 10 pods; 15 ports (TCP), each probed from the 9 other pods.
    full_reachability("sock-shop", "sock", &[], 10, 15 * 9);
}

#[test]
fn banking_routed_dual_stack_with_udp() {
    // 4 pods, all dual-stack; 4 ports (one UDP), each probed from the 3 other pods over IPv4
    // and IPv6.
    full_reachability("banking", "bank", &["--routed"], 4, 4 * 3 * 2);
}

/// Writes an executable fake agent: `--help` mentions `--manifests`, running does `body`.
fn fake_agent(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-agent");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --help ]; then echo '--manifests DIR'; exit 0; fi\n{body}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `up` fails after the namespaces exist (the agent dies; the agent never gets ready): all of
/// it is removed. An agent without manifests mode, and unusable manifests, are refused before
/// anything is created.
#[test]
fn failed_up_leaves_nothing() {
    subreaper();
    let tmp = std::env::temp_dir().join(format!("npc-lab-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let dir = examples().join("hollowdb");
    let dir = dir.to_string_lossy().into_owned();
    let name = lab_name("fail");
    let _guard = Down(name.clone());
    let prefix = format!("{}-", npc_tests::lab::lab_prefix(&name));
    let ours = || -> Vec<String> {
        npc_tests::lab::list_netns()
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    };
    let pid_file = tmp.join("agent.pid");
    let cases = [
        (
            "echo dying >&2; exit 3",
            "exited (exit status: 3) before it was ready",
        ),
        // The shell execs sleep: the recorded pid is the sleeping agent, stopped by the cleanup.
        ("exec sleep 600", "was not ready"),
    ];
    for (body, want) in cases {
        let body = format!("echo $$ > {}\n{body}", pid_file.display());
        let agent = fake_agent(&tmp, &body);
        let agent = agent.to_string_lossy().into_owned();
        let out = npc_lab(&[
            "up",
            "--name",
            &name,
            "--agent",
            &agent,
            "--ready-timeout",
            "1",
            &dir,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(want), "{stderr}");
        if body.contains("dying") {
            // The agent's log is quoted in the error.
            assert!(stderr.contains("dying"), "{stderr}");
        }
        let agent_pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_nothing_left(&name, None, &[agent_pid]);
        assert_eq!(ours(), Vec::<String>::new());
    }

    let agent = tmp.join("no-manifests");
    std::fs::write(&agent, "#!/bin/sh\necho usage: agent --bpffs DIR\n").unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = npc_lab(&[
        "up",
        "--name",
        &name,
        "--agent",
        &agent.to_string_lossy(),
        &dir,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("has no manifests mode"), "{stderr}");
    assert_nothing_left(&name, None, &[]);
    assert_eq!(ours(), Vec::<String>::new());

    // Unusable manifests.
    let bad = tmp.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("a.yaml"),
        "kind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n---\n\
         kind: Pod\nmetadata: {name: b}\nstatus: {podIP: 10.0.0.1}\n",
    )
    .unwrap();
    let out = npc_lab(&["up", "--no-agent", "--name", &name, &bad.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("both have the address 10.0.0.1"),
        "{stderr}"
    );
    assert_nothing_left(&name, None, &[]);
    assert_eq!(ours(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `demo` without the agent: both matrices, no change, and the lab is gone afterwards.
#[test]
fn demo_without_agent() {
    subreaper();
    let name = lab_name("demo");
    let _guard = Down(name.clone());
    let dir = examples().join("sock-shop");
    let out = ok(&[
        "demo",
        "--no-agent",
        "--name",
        &name,
        "--settle-ms",
        "0",
        &dir.to_string_lossy(),
    ]);
    for want in [
        "==> reachability without policies",
        "NetworkPolicy sock-shop/allow-monitoring",
        "==> reachability with policies",
        "no connection was closed",
        &format!("lab {name} removed"),
    ] {
        assert!(out.contains(want), "{want:?} missing in:\n{out}");
    }
    assert_nothing_left(&name, None, &[]);
    assert!(
        !Path::new(STATE_DIR).join(&name).exists(),
        "demo directory left"
    );
}

/// The agent next to npc-lab, if it has the manifests mode (else the agent tests are skipped:
/// e.g. `cargo test -p npc-tests` does not build it, and AYA_BUILD_SKIP builds one without
/// its eBPF object).
fn agent() -> Option<PathBuf> {
    let agent = Path::new(BIN).with_file_name("npc-agent");
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        eprintln!("skipped: AYA_BUILD_SKIP is set (the agent would have no eBPF object)");
        return None;
    }
    let help = Command::new(&agent).arg("--help").output();
    match help {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("--manifests") => Some(agent),
        _ => {
            eprintln!(
                "skipped: no agent with a manifests mode at {} (build it: cargo build -p npc-agent)",
                agent.display()
            );
            None
        }
    }
}

/// The matrix printed in an example's README (the code block with `client \ server`).
fn readme_matrix(example: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(examples().join(example).join("README.md")).unwrap();
    let blocks: Vec<&str> = readme.split("```").collect();
    let block = blocks
        .iter()
        .skip(1)
        .step_by(2)
        .find(|b| b.contains("client \\ server"))
        .unwrap_or_else(|| panic!("{example}/README.md has no matrix"));
    block
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// With the real agent, every example's matrix is the one its README promises (the AND form
/// of the pricing API: only the critical consumer), and the demo closes the sock-shop's
/// connections.
#[test]
fn examples_enforced_by_the_agent() {
    let Some(agent) = agent() else { return };
    let agent = agent.to_string_lossy().into_owned();
    subreaper();
    let and_form = [
        "                                prices-api",
        "client \\ server                 8080",
        "pricing-ns/prices-api           -",
        "pricing-ns/prices-api-consumer  X",
        "pricing-ns/web                  X",
        "critical-ns/critical-consumer   .",
        "critical-ns/critical-batch      X",
        "other-ns/other-consumer         X",
    ];
    let cases: Vec<(&str, Vec<String>, &[&str])> = vec![
        ("sock-shop", readme_matrix("sock-shop"), &[]),
        ("pricing-api", readme_matrix("pricing-api"), &[]),
        (
            "pricing-api/and-form",
            and_form.iter().map(|s| s.to_string()).collect(),
            &[],
        ),
        ("hollowdb", readme_matrix("hollowdb"), &["--routed"]),
        ("banking", readme_matrix("banking"), &[]),
    ];
    for (example, want, extra) in cases {
        let name = lab_name("agent");
        let guard = Down(name.clone());
        let dir = examples().join(example).to_string_lossy().into_owned();
        let mut args = vec!["up", "--name", &name, "--agent", &agent];
        args.extend_from_slice(extra);
        args.push(&dir);
        let summary = ok(&args);
        assert!(summary.contains("agent: pid"), "{summary}");
        let st = state(&name).unwrap();
        let lab = st["lab"].as_str().unwrap().to_string();
        let pids = pids(&st);
        assert_eq!(pids.len(), 2, "responder and agent");
        // Generous: an allowed connection must not time out on a loaded machine.
        let table = ok(&["probe", "--name", &name, "--timeout-ms", "1000"]);
        let got: Vec<String> = table
            .lines()
            .take_while(|l| !l.starts_with(". connected"))
            .map(|l| l.trim_end().to_string())
            .collect();
        assert_eq!(got, want, "{example}:\n{table}");
        drop(guard);
        assert_nothing_left(&name, Some(&lab), &pids);
    }

    let name = lab_name("agentdemo");
    let _guard = Down(name.clone());
    let dir = examples().join("sock-shop").to_string_lossy().into_owned();
    let out = ok(&["demo", "--name", &name, "--agent", &agent, &dir]);
    assert!(out.contains("102 connections are now blocked"), "{out}");
    assert!(
        out.contains("catalogue-db:3306  blocked from front-end, carts, carts-db, orders, payment, user, prometheus, curl; open to catalogue"),
        "{out}"
    );
    assert_nothing_left(&name, None, &[]);
}
