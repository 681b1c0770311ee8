//! `npc-lab serve --name NAME` (internal): the long-lived process of a lab. `up` spawns it
//! detached (own session) and writes the [`Plan`] on its stdin; it creates the lab
//! ([`Lab::new`], so the namespaces carry its pid: `cleanup_stale` treats them as live while it
//! runs), starts a TCP or UDP echo responder on every declared port of every pod, answers with
//! one JSON line on stdout ([`Report`]), and then waits for SIGTERM, SIGINT or SIGHUP, on which
//! it stops the responders and removes the namespaces. Its stderr is the lab's log.
use std::io::{self, BufRead as _, Read as _, Write as _};

use anyhow::{Context as _, Result, anyhow, ensure};
use npc_tests::lab::{Attachment, Lab, ServerHandle, format_mac, lab_prefix};
use serde::{Deserialize, Serialize};

use crate::{
    manifests::Protocol,
    plan::Plan,
    state::{PodState, STATE_VERSION},
};

/// The answer to `up`.
#[derive(Debug, Serialize, Deserialize)]
pub enum Report {
    Ok(Built),
    Error(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Built {
    pub version: u32,
    pub lab: String,
    pub node_netns: String,
    pub pods: Vec<PodState>,
    pub responders: usize,
}

/// The lab name the responder process with `pid` creates for lab `name` (its first and only
/// [`Lab`]).
pub fn lab_name_for(name: &str, pid: u32) -> String {
    format!("{}-{pid}-0", lab_prefix(name))
}

/// The signals that end the lab. Blocked in every thread (they are waited for with
/// `sigwait`); must happen before the first thread is spawned.
fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        ensure!(
            rc == 0,
            "pthread_sigmask: {}",
            io::Error::from_raw_os_error(rc)
        );
        Ok(set)
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    loop {
        // SAFETY: valid set and out pointer.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            return sig;
        }
    }
}

pub fn run(name: &str) -> Result<()> {
    let set = block_signals()?;
    let mut input = String::new();
    io::stdin()
        .lock()
        .read_to_string(&mut input)
        .context("reading the plan")?;
    let plan: Plan = serde_json::from_str(&input).context("parsing the plan")?;
    ensure!(plan.name == name, "plan for {:?}, not {name:?}", plan.name);

    eprintln!(
        "npc-lab serve {name}: pid {}, {} pods",
        std::process::id(),
        plan.pods.len()
    );
    let built = build(name, &plan);
    let (lab, servers, report) = match built {
        Ok((lab, servers, built)) => (Some(lab), servers, Report::Ok(built)),
        Err(e) => {
            eprintln!("npc-lab serve {name}: {e:#}");
            (None, Vec::new(), Report::Error(format!("{e:#}")))
        }
    };
    let answered = answer(&report);
    let failed = matches!(report, Report::Error(_));
    if let Err(e) = &answered {
        // `up` is gone before it learned about the lab: nobody would ever remove it.
        eprintln!("npc-lab serve {name}: cannot report to `up` ({e:#}): removing the lab");
    }
    if failed || answered.is_err() {
        drop(servers);
        drop(lab);
        return Err(anyhow!("lab {name} not built"));
    }
    let sig = wait_signal(&set);
    eprintln!("npc-lab serve {name}: signal {sig}: stopping responders, removing the lab");
    drop(servers);
    drop(lab);
    eprintln!("npc-lab serve {name}: done");
    Ok(())
}

/// Writes the report line, then points stdout at /dev/null: `up` closes its end when it exits.
fn answer(report: &Report) -> Result<()> {
    let mut line = serde_json::to_string(report)?;
    line.push('\n');
    let mut out = io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.flush()?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    // SAFETY: dup2 of valid fds; stdout's Rust buffer is flushed and locked.
    unsafe {
        use std::os::fd::AsRawFd as _;
        libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
    }
    Ok(())
}

fn build(name: &str, plan: &Plan) -> Result<(Lab, Vec<ServerHandle>, Built)> {
    let lab = Lab::new(name)?;
    let expected = lab_name_for(name, std::process::id());
    ensure!(
        lab.name() == expected,
        "lab named {:?}, expected {expected:?}",
        lab.name()
    );
    let mut bridges = Vec::new();
    for b in &plan.bridges {
        bridges.push(
            lab.add_bridge(&b.name, &b.gateway_v4, b.gateway_v6.as_deref())
                .with_context(|| format!("bridge {}", b.name))?,
        );
    }
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    for p in &plan.pods {
        let what = || format!("pod {}/{}", p.namespace, p.name);
        let pod = match &p.bridge {
            Some(br) => {
                let bridge = bridges
                    .iter()
                    .find(|b| &b.name == br)
                    .with_context(|| format!("{}: no bridge {br}", what()))?;
                lab.add_pod_on_bridge(bridge, &p.lab_name, p.ipv4, p.ipv6)
            }
            None => lab.add_routed_pod(&p.lab_name, p.ipv4, p.ipv6),
        }
        .with_context(what)?;
        for port in &p.ports {
            let server = match port.protocol {
                Protocol::Tcp => pod.serve_tcp(port.port),
                Protocol::Udp => pod.serve_udp(port.port),
                Protocol::Sctp => continue,
            };
            servers.push(server.with_context(what)?);
        }
        pods.push(PodState {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            lab_name: p.lab_name.clone(),
            netns: pod.netns.clone(),
            ips: pod.ips(),
            ports: p.ports.clone(),
            host_veth: pod.host_veth.clone(),
            host_ifindex: pod.host_ifindex,
            host_mac: format_mac(&pod.host_mac),
            mac: format_mac(&pod.mac),
            ifindex: pod.ifindex,
            bridge: match &pod.attachment {
                Attachment::Bridge(b) => Some(b.clone()),
                Attachment::Routed => None,
            },
        });
    }
    eprintln!(
        "npc-lab serve {name}: lab {} with {} pods and {} responders",
        lab.name(),
        pods.len(),
        servers.len()
    );
    let built = Built {
        version: STATE_VERSION,
        lab: lab.name().to_string(),
        node_netns: lab.node_netns().to_string(),
        responders: servers.len(),
        pods,
    };
    Ok((lab, servers, built))
}

/// Reads the responder's report line (on `up`'s side).
pub fn read_report(stdout: impl io::Read) -> Result<Report> {
    let mut line = String::new();
    io::BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the responder's report")?;
    ensure!(
        !line.trim().is_empty(),
        "the responder process exited without a report"
    );
    serde_json::from_str(&line).with_context(|| format!("bad report {line:?}"))
}
