//! The iptables + ipset arm: a rule set generated from the same parsed policy state the agent
//! enforces, built the way iptables-based enforcers build theirs (modelled on kube-router's
//! network policy controller):
//!
//! ```text
//! FORWARD -> NPC-FW:  -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT   (first)
//!                     -d <pod> -j NPC-IN-<pod>     per local pod isolated for ingress
//!                     -s <pod> -j NPC-EG-<pod>     per local pod isolated for egress
//! NPC-IN-<pod>:       clear mark 0x10000; -j NPC-PI-<policy> per policy selecting the pod;
//!                     -m mark ! --mark 0x10000/0x10000 -j DROP
//! NPC-PI-<policy>:    per rule, peer set and port: -m set --match-set <peers> src
//!                     -m set --match-set <targets> dst -p tcp --dport P -j MARK --set-xmark
//!                     0x10000/0x10000, then the same matches with -m mark ... -j RETURN
//! ```
//!
//! Peer sets are `hash:ip` ipsets of pod addresses (`hash:net` for ipBlocks, excepts as
//! `nomatch`), one per rule; each policy also has a set of the local pods it selects. Established
//! packets cost one conntrack match; a new connection walks every policy chain of its
//! destination (and source) pod. Denied packets are dropped, never rejected. IPv4 only (the lab's
//! pods have no IPv6).
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use npc_agent::model::{
    ClusterState, LabelSelector, NetworkPolicy, Peer, PolicyPort, PortRef, Protocol, Rule,
};
use npc_tests::lab::{self, try_in_netns};

/// The mark a policy chain sets on what it admits.
const MARK: &str = "0x10000/0x10000";

/// A generated rule set, in the input formats of `ipset restore` and `iptables-restore`.
pub struct Ruleset {
    pub ipsets: String,
    pub rules: String,
}

impl Ruleset {
    /// `-A` lines.
    pub fn rule_count(&self) -> usize {
        self.rules.lines().filter(|l| l.starts_with("-A ")).count()
    }

    /// User-defined chains.
    pub fn chain_count(&self) -> usize {
        self.rules
            .lines()
            .filter(|l| l.starts_with(':') && l.contains(" - "))
            .count()
    }

    pub fn set_count(&self) -> usize {
        self.ipsets
            .lines()
            .filter(|l| l.starts_with("create "))
            .count()
    }

    pub fn entry_count(&self) -> usize {
        self.ipsets
            .lines()
            .filter(|l| l.starts_with("add "))
            .count()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// Letter in chain and set names.
    fn tag(self) -> char {
        match self {
            Direction::Ingress => 'I',
            Direction::Egress => 'E',
        }
    }

    /// Which end of the packet the peer is (`--match-set NAME src|dst`).
    fn peer_end(self) -> &'static str {
        match self {
            Direction::Ingress => "src",
            Direction::Egress => "dst",
        }
    }

    fn pod_end(self) -> &'static str {
        match self {
            Direction::Ingress => "dst",
            Direction::Egress => "src",
        }
    }

    /// The address option selecting a pod's packets in the top chain.
    fn pod_flag(self) -> &'static str {
        match self {
            Direction::Ingress => "-d",
            Direction::Egress => "-s",
        }
    }
}

fn v4(ips: &[IpAddr]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    ips.iter().filter_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}

/// Addresses of the pods a `Pods` peer selects, seen from a policy in `policy_ns`.
fn peer_pods(
    state: &ClusterState,
    policy_ns: &str,
    namespaces: Option<&LabelSelector>,
    pods: &LabelSelector,
) -> BTreeSet<Ipv4Addr> {
    state
        .pods
        .values()
        .filter(|p| !p.host_network && pods.matches(&p.labels))
        .filter(|p| match namespaces {
            None => p.namespace == policy_ns,
            Some(sel) => state
                .namespaces
                .get(&p.namespace)
                .is_some_and(|ns| sel.matches(&ns.labels)),
        })
        .flat_map(|p| v4(&p.ips))
        .collect()
}

fn port_match(port: &PolicyPort) -> Result<String> {
    let proto = match port.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    };
    Ok(match (&port.port, port.end_port) {
        (None, _) => format!("-p {proto}"),
        (Some(PortRef::Number(p)), None) => format!("-p {proto} --dport {p}"),
        (Some(PortRef::Number(p)), Some(end)) => format!("-p {proto} --dport {p}:{end}"),
        (Some(PortRef::Name(name)), _) => bail!(
            "named port {name:?}: not generated for iptables (the benchmark's policies use numbers)"
        ),
    })
}

/// Builds the rule set for the local pods of `state` (pods on `state.node`).
pub fn generate(state: &ClusterState) -> Result<Ruleset> {
    let mut sets = String::new();
    let mut chains = String::new();
    let mut rules = String::new();
    let mut top = String::new();

    let local: Vec<_> = state
        .pods
        .values()
        .filter(|p| state.is_local(p) && !p.host_network && !p.ips.is_empty())
        .collect();

    // Policy chains, for the policies selecting a local pod: (chain, selected pods, direction).
    let mut by_pod: Vec<(Vec<String>, Vec<String>)> = vec![(Vec::new(), Vec::new()); local.len()];
    for (i, policy) in state.policies.values().enumerate() {
        let selected: Vec<usize> = local
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.namespace == policy.namespace && policy.pod_selector.matches(&p.labels)
            })
            .map(|(k, _)| k)
            .collect();
        if selected.is_empty() {
            continue;
        }
        let targets = format!("NPC-T{i:04}");
        let _ = writeln!(sets, "create {targets} hash:ip family inet");
        for &k in &selected {
            for ip in v4(&local[k].ips) {
                let _ = writeln!(sets, "add {targets} {ip}");
            }
        }
        for (dir, isolated, policy_rules) in [
            (
                Direction::Ingress,
                policy.ingress_isolation,
                &policy.ingress,
            ),
            (Direction::Egress, policy.egress_isolation, &policy.egress),
        ] {
            if !isolated {
                continue;
            }
            let chain = format!("NPC-P{}{i:04}", dir.tag());
            let _ = writeln!(chains, ":{chain} - [0:0]");
            for (j, rule) in policy_rules.iter().enumerate() {
                policy_rule(
                    &mut sets, &mut rules, state, policy, rule, dir, &chain, &targets, i, j,
                )?;
            }
            for &k in &selected {
                match dir {
                    Direction::Ingress => by_pod[k].0.push(chain.clone()),
                    Direction::Egress => by_pod[k].1.push(chain.clone()),
                }
            }
        }
    }

    // Pod chains, and the jumps to them.
    for (k, pod) in local.iter().enumerate() {
        for (dir, policy_chains) in [
            (Direction::Ingress, &by_pod[k].0),
            (Direction::Egress, &by_pod[k].1),
        ] {
            if policy_chains.is_empty() {
                continue;
            }
            let chain = format!("NPC-{}{k:04}", dir.tag());
            let _ = writeln!(chains, ":{chain} - [0:0]");
            let _ = writeln!(rules, "-A {chain} -j MARK --set-xmark 0x0/0x10000");
            for pc in policy_chains {
                let _ = writeln!(rules, "-A {chain} -j {pc}");
            }
            let _ = writeln!(rules, "-A {chain} -m mark ! --mark {MARK} -j DROP");
            for ip in v4(&pod.ips) {
                let flag = dir.pod_flag();
                let _ = writeln!(top, "-A NPC-FW {flag} {ip}/32 -j {chain}");
            }
        }
    }

    let mut out = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:NPC-FW - [0:0]\n",
    );
    out.push_str(&chains);
    out.push_str("-A FORWARD -j NPC-FW\n");
    out.push_str("-A NPC-FW -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str(&top);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    Ok(Ruleset {
        ipsets: sets,
        rules: out,
    })
}

/// The MARK and RETURN rules of one policy rule, and its peer sets.
#[allow(clippy::too_many_arguments)]
fn policy_rule(
    sets: &mut String,
    rules: &mut String,
    state: &ClusterState,
    policy: &NetworkPolicy,
    rule: &Rule,
    dir: Direction,
    chain: &str,
    targets: &str,
    i: usize,
    j: usize,
) -> Result<()> {
    let targets_match = format!("-m set --match-set {targets} {}", dir.pod_end());
    let mut peer_matches = Vec::new();
    match &rule.peers {
        None => peer_matches.push(String::new()),
        Some(peers) => {
            let mut pods = BTreeSet::new();
            let mut blocks = Vec::new();
            let mut any_pods = false;
            for peer in peers {
                match peer {
                    Peer::Pods {
                        namespaces,
                        pods: sel,
                    } => {
                        any_pods = true;
                        pods.extend(peer_pods(
                            state,
                            &policy.namespace,
                            namespaces.as_ref(),
                            sel,
                        ));
                    }
                    Peer::IpBlock { cidr, except } if cidr.addr().is_ipv4() => {
                        blocks.push((cidr, except))
                    }
                    Peer::IpBlock { .. } => {}
                }
            }
            if any_pods {
                let name = format!("NPC-{}{i:04}-{j}P", dir.tag());
                let _ = writeln!(sets, "create {name} hash:ip family inet");
                for ip in &pods {
                    let _ = writeln!(sets, "add {name} {ip}");
                }
                peer_matches.push(format!("-m set --match-set {name} {}", dir.peer_end()));
            }
            if !blocks.is_empty() {
                let name = format!("NPC-{}{i:04}-{j}C", dir.tag());
                let _ = writeln!(sets, "create {name} hash:net family inet");
                for (cidr, except) in blocks {
                    let _ = writeln!(sets, "add {name} {cidr}");
                    for e in except {
                        let _ = writeln!(sets, "add {name} {e} nomatch");
                    }
                }
                peer_matches.push(format!("-m set --match-set {name} {}", dir.peer_end()));
            }
        }
    }
    let port_matches = match &rule.ports {
        None => vec![String::new()],
        Some(ports) => ports.iter().map(port_match).collect::<Result<_>>()?,
    };
    for peer in &peer_matches {
        for port in &port_matches {
            let m = [peer.as_str(), &targets_match, port]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(rules, "-A {chain} {m} -j MARK --set-xmark {MARK}");
            let _ = writeln!(rules, "-A {chain} {m} -m mark --mark {MARK} -j RETURN");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Loading and removing
// ---------------------------------------------------------------------------------------------

/// Which backend `iptables` uses (`nf_tables` or `legacy`), from `iptables --version`.
pub fn backend() -> Result<String> {
    let version = lab::run(&["iptables", "--version"])?;
    let backend = version
        .split('(')
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or("legacy");
    Ok(format!("{backend} ({})", version.trim()))
}

/// Runs `argv` in `netns` with `input` on its stdin.
fn pipe(netns: &str, argv: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", argv.join(" ")))?;
    // Written before waiting; the tools read all of it before they answer.
    let written = child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` in {netns} failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    written.with_context(|| format!("writing to `{}`", argv.join(" ")))
}

/// The rule set loaded in a namespace; removed by [`Active::unload`] or on drop.
pub struct Active {
    netns: String,
    loaded: bool,
}

/// Loads `rs` into `netns` (the lab's node namespace, which holds no other rules or sets).
pub fn load(netns: &str, rs: &Ruleset) -> Result<Active> {
    // Created first: a half-loaded set is removed on the way out.
    let active = Active {
        netns: netns.to_string(),
        loaded: true,
    };
    pipe(netns, &["ipset", "restore"], &rs.ipsets)?;
    pipe(netns, &["iptables-restore"], &rs.rules)?;
    Ok(active)
}

impl Active {
    pub fn unload(mut self) -> Result<()> {
        self.loaded = false;
        remove(&self.netns)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.loaded
            && let Err(e) = remove(&self.netns)
        {
            eprintln!("removing the iptables rules from {}: {e:#}", self.netns);
        }
    }
}

/// Removes every rule, chain and set from `netns`, and the filter table itself where the nft
/// backend allows it (an empty table's hooks would still cost the other arms a little), and
/// empties the conntrack table (so that every arm starts with an empty one).
fn remove(netns: &str) -> Result<()> {
    let empty =
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    let mut errors = Vec::new();
    if let Err(e) = pipe(netns, &["iptables-restore"], empty) {
        errors.push(format!("{e:#}"));
    }
    let delete_table = [
        "ip", "netns", "exec", netns, "nft", "delete", "table", "ip", "filter",
    ];
    if nft_table_exists(netns)
        && let Err(e) = lab::run(&delete_table)
    {
        errors.push(format!("{e:#}"));
    }
    // Only after the rules that refer to them are gone. The namespace holds no other sets.
    if let Err(e) = lab::run(&["ip", "netns", "exec", netns, "ipset", "destroy"]) {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = flush_conntrack(netns) {
        errors.push(format!("flushing conntrack in {netns}: {e:#}"));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

/// Whether `nft` exists and lists an `ip filter` table in `netns` (the nft backend's).
fn nft_table_exists(netns: &str) -> bool {
    lab::run(&["ip", "netns", "exec", netns, "nft", "list", "tables"])
        .is_ok_and(|out| out.lines().any(|l| l.trim() == "table ip filter"))
}

/// What is left in `netns` of the rule set (empty when clean): rules or chains naming `NPC-`
/// (`nft list ruleset` where nft exists, else `iptables-save`) and ipsets (`ipset list -n`).
/// Without nft, the nft backend's emptied `filter` table stays, and is not counted.
pub fn leftovers(netns: &str) -> Result<String> {
    let rules = lab::run(&["ip", "netns", "exec", netns, "nft", "list", "ruleset"])
        .or_else(|_| lab::run(&["ip", "netns", "exec", netns, "iptables-save"]))?;
    let sets = lab::run(&["ip", "netns", "exec", netns, "ipset", "list", "-n"])?;
    let mut left: Vec<&str> = rules.lines().filter(|l| l.contains("NPC-")).collect();
    left.extend(sets.lines().filter(|l| !l.trim().is_empty()));
    Ok(left.join("\n"))
}

/// Empties the conntrack table of `netns` (`conntrack -F` without the tool): an
/// `IPCTNL_MSG_CT_DELETE` without attributes over ctnetlink.
pub fn flush_conntrack(netns: &str) -> Result<()> {
    try_in_netns(netns, || -> io::Result<()> {
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        const NFNL_SUBSYS_CTNETLINK: u16 = 1;
        const IPCTNL_MSG_CT_DELETE: u16 = 2;
        let mut msg = [0u8; 20];
        msg[0..4].copy_from_slice(&20u32.to_ne_bytes());
        msg[4..6]
            .copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        msg[6..8].copy_from_slice(&flags.to_ne_bytes());
        msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // nfgenmsg: family AF_INET, version NFNETLINK_V0, res_id 0.
        msg[16] = libc::AF_INET as u8;
        // SAFETY: valid buffer and length; the kernel is the default destination.
        let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        // SAFETY: valid buffer and length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let kind = (n >= 20).then(|| u16::from_ne_bytes([buf[4], buf[5]]));
        if kind != Some(libc::NLMSG_ERROR as u16) {
            return Err(io::Error::other("no netlink acknowledgement"));
        }
        let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        // ENOENT: nothing to flush.
        if errno != 0 && -errno != libc::ENOENT {
            return Err(io::Error::from_raw_os_error(-errno));
        }
        Ok(())
    })?
    .map_err(Into::into)
}
