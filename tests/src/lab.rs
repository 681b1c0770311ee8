//! Network-namespace lab: emulates pods on a node, for integration tests and `cargo xtask lab`.
//!
//! # Layout
//!
//! A [`Lab`] never changes the host's root network namespace. It creates:
//!
//! * a **node** namespace `<lab>-node` standing in for the Kubernetes node: it holds the
//!   bridges, the pods' host-side veths (where the TC programs attach), the routes to the pods,
//!   and has IPv4 and IPv6 forwarding on. Run the BPF attachment there with
//!   [`in_netns`]`(lab.node_netns(), ..)`;
//! * one namespace `<lab>-<pod>` per pod, with the pod side of its veth named `eth0`.
//!
//! `<lab>` is `<prefix>-<pid>-<n>` (for example `npc-4242-3`): unique per lab within a process
//! (counter) and across processes (pid). Interface names only need to be unique within the
//! node namespace, so they are short and fixed: host veths are `npc<i>-<pod>` (truncated to 15
//! bytes), bridges keep the name the test chooses.
//!
//! Two pod topologies, mixable in one lab, with routing between them in the node namespace:
//!
//! * **bridge** ([`Lab::add_bridge`], [`Lab::add_pod_on_bridge`]): the host veth is a port of
//!   a Linux bridge that carries the gateway addresses; the pod has an address in the bridge's
//!   subnet and a default route via the gateway.
//! * **routed** ([`Lab::add_routed_pod`], Calico/ptp style): the pod has `ip/32` (`ip/128`) and
//!   a default route via the link-local gateway [`ROUTED_GATEWAY_V4`] (`169.254.1.1`, on-link)
//!   / [`ROUTED_GATEWAY_V6`] (`fe80::1`). Every routed host veth carries those gateway
//!   addresses itself (so it answers ARP/ND for them; no proxy ARP needed) and the node
//!   namespace has a `/32` (`/128`) route to the pod via the host veth.
//!
//! DAD is off in every lab namespace (and addresses are added `nodad`), so IPv6 works at once.
//!
//! # Cleanup
//!
//! Dropping the `Lab` (also while unwinding from a panic) deletes the host veths and bridges,
//! then the pod and node namespaces. [`cleanup_stale`] removes namespaces left by crashed
//! processes (their pid no longer exists); [`Lab::new`] also removes leftovers carrying its own
//! name (a crashed earlier process that had the same pid).
//!
//! # Running code in a namespace
//!
//! [`in_netns`] runs a closure on a fresh thread that has `setns`'d into the namespace: sockets
//! it creates belong to that namespace and stay there whichever thread uses them later.
//! Threads spawned from inside the closure inherit the namespace. The mount namespace is not
//! changed (`/sys/class/net` still shows the root namespace; use netlink, ioctls or
//! [`Lab::exec`]).
//!
//! Netlink sockets follow the same rule: a netlink socket (e.g. aya's TC attach/detach, or a
//! `rtnetlink` handle) must be created inside `in_netns(node)` to act on the node namespace's
//! ifindexes.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";
/// Prefix of every lab's names when [`Lab::new`] gets an empty hint.
pub const DEFAULT_PREFIX: &str = "npc";
/// IPv4 gateway of routed pods (on-link, carried by every routed host veth).
pub const ROUTED_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// IPv6 gateway of routed pods (link-local, carried by every routed host veth).
pub const ROUTED_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Longest Linux interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

const NODE_SUFFIX: &str = "node";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// Commands and namespaces
// ---------------------------------------------------------------------------------------------

/// Runs a command and returns its stdout; the error names the command, its status and stderr.
pub fn run(argv: &[&str]) -> Result<String> {
    let (prog, args) = argv.split_first().context("empty command")?;
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{}`", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if out.stdout.is_empty() {
                String::new()
            } else {
                format!(" (stdout: {})", String::from_utf8_lossy(&out.stdout).trim())
            }
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n <netns> <args>`.
fn ip(netns: &str, args: &[&str]) -> Result<String> {
    let mut argv = vec!["ip", "-n", netns];
    argv.extend_from_slice(args);
    run(&argv)
}

/// Names of the namespaces in [`NETNS_DIR`].
pub fn list_netns() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    let mut names = Vec::new();
    for entry in dir {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Whether `/run/netns/<name>` exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

fn del_netns(name: &str) -> Result<()> {
    if netns_exists(name) {
        run(&["ip", "netns", "del", name])?;
    }
    Ok(())
}

/// Runs `f` on a fresh thread that first joins the network namespace `/run/netns/<netns>`
/// (`setns(CLONE_NEWNET)`), and returns its result. Panics if the namespace cannot be entered;
/// a panic in `f` is propagated. See [`try_in_netns`].
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    match try_in_netns(netns, f) {
        Ok(v) => v,
        Err(e) => panic!("{e:#}"),
    }
}

/// [`in_netns`] that returns an error instead of panicking when the namespace cannot be
/// entered.
pub fn try_in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = Path::new(NETNS_DIR).join(netns);
    let file = File::open(&path).with_context(|| format!("network namespace {path:?}"))?;
    let joined = thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // SAFETY: plain syscall on a valid fd; it only changes this (fresh) thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("setns into {path:?}"));
            }
            drop(file);
            Ok(f())
        })
        .join()
    });
    match joined {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Writes a sysctl under `/proc/sys/` (key with dots or slashes) in a namespace. Net sysctls
/// resolve against the writing thread's namespace.
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    try_in_netns(netns, || std::fs::write(&path, value))?
        .with_context(|| format!("sysctl {key}={value} in {netns}"))
}

/// Reads a sysctl in a namespace (trimmed).
pub fn read_sysctl(netns: &str, key: &str) -> Result<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let v = try_in_netns(netns, || std::fs::read_to_string(&path))?
        .with_context(|| format!("sysctl {key} in {netns}"))?;
    Ok(v.trim().to_string())
}

/// Splits a lab namespace name `<prefix>-<pid>-<n>-<rest>` into (prefix, pid, n, rest); the
/// prefix is `npc` followed by ASCII lowercase letters and digits.
fn parse_lab_netns(name: &str) -> Option<(&str, u32, u32, &str)> {
    let mut it = name.splitn(4, '-');
    let prefix = it.next()?;
    if !prefix.starts_with(DEFAULT_PREFIX)
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return None;
    }
    let pid = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    let rest = it.next()?;
    Some((prefix, pid, n, rest))
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes lab namespaces named `<p>-<pid>-<n>-*`, where `<p>` starts with `prefix`, whose
/// process `pid` is gone (left by crashed or killed runs): `cleanup_stale("npc")` cleans up
/// after every lab prefix. `prefix` must start with `npc`. Returns the deleted names.
/// Namespaces of live processes (including this one) are left alone.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
    ensure!(
        prefix.starts_with(DEFAULT_PREFIX),
        "refusing to clean namespaces whose prefix {prefix:?} does not start with {DEFAULT_PREFIX:?}"
    );
    let mut deleted = Vec::new();
    let mut errors = Vec::new();
    for name in list_netns()? {
        let Some((p, pid, _, _)) = parse_lab_netns(&name) else {
            continue;
        };
        if !p.starts_with(prefix) || pid_alive(pid) {
            continue;
        }
        match del_netns(&name) {
            Ok(()) => deleted.push(name),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("cleanup_stale: {}", errors.join("; "));
    }
    Ok(deleted)
}

/// Deletes every namespace of the lab named `lab_name` (`<prefix>-<pid>-<n>`), e.g. one kept by
/// [`Lab::persist`].
pub fn destroy_lab(lab_name: &str) -> Result<Vec<String>> {
    ensure!(
        lab_name.starts_with(DEFAULT_PREFIX) && lab_name.matches('-').count() >= 2,
        "{lab_name:?} is no lab name"
    );
    let prefix = format!("{lab_name}-");
    let node = format!("{lab_name}-{NODE_SUFFIX}");
    let mut names: Vec<String> = list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // Pods first, then the node.
    names.sort_by_key(|n| *n == node);
    for n in &names {
        del_netns(n)?;
    }
    Ok(names)
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

/// Parses `a.b.c.d/len` or `x::y/len`.
fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let (addr, len) = s
        .split_once('/')
        .with_context(|| format!("{s:?}: expected ADDRESS/PREFIXLEN"))?;
    let addr: IpAddr = addr
        .parse()
        .with_context(|| format!("{s:?}: bad address"))?;
    let len: u8 = len
        .parse()
        .with_context(|| format!("{s:?}: bad prefix length"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    ensure!(len <= max, "{s:?}: prefix length > {max}");
    Ok((addr, len))
}

fn same_subnet(a: IpAddr, b: IpAddr, len: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Parses the ifindex and MAC address from `ip -o link show dev X`.
fn parse_link(out: &str) -> Result<(u32, [u8; 6])> {
    let ifindex = out
        .split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no ifindex in {out:?}"))?;
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no link/ether in {out:?}"))?;
    Ok((ifindex, parse_mac(mac)?))
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().with_context(|| format!("bad MAC {s:?}"))?;
        *b = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {s:?}"))?;
    }
    ensure!(parts.next().is_none(), "bad MAC {s:?}");
    Ok(mac)
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_info(netns: &str, dev: &str) -> Result<(u32, [u8; 6])> {
    parse_link(&ip(netns, &["-o", "link", "show", "dev", dev])?)
        .with_context(|| format!("link {dev} in {netns}"))
}

fn check_name(what: &str, name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.'),
        "{what} name {name:?}: use ASCII letters, digits, '_' or '.'"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Lab
// ---------------------------------------------------------------------------------------------

/// A bridge in the node namespace (see [`Lab::add_bridge`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    /// Ifindex in the node namespace.
    pub ifindex: u32,
    pub gateway_v4: Ipv4Addr,
    pub prefix_len_v4: u8,
    /// Gateway and prefix length.
    pub gateway_v6: Option<(Ipv6Addr, u8)>,
    pub mac: [u8; 6],
}

/// How a pod is connected to the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Host veth is a port of this bridge.
    Bridge(String),
    /// Host veth is routed (`/32` route in the node namespace).
    Routed,
}

/// A pod of a [`Lab`]. Cheap to clone; it does not keep the lab alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    /// The pod's network namespace.
    pub netns: String,
    /// The node namespace holding [`Pod::host_veth`].
    pub node_netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    /// Host-side veth, in the node namespace.
    pub host_veth: String,
    /// Ifindex of the host veth in the node namespace (what the TC programs and the
    /// `interfaces` map see).
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    /// MAC of the pod's `eth0`.
    pub mac: [u8; 6],
    /// Ifindex of `eth0` in the pod namespace.
    pub ifindex: u32,
    pub attachment: Attachment,
}

#[derive(Default)]
struct LabState {
    /// Pod namespaces, in creation order.
    pod_netns: Vec<String>,
    /// Links created in the node namespace (host veths, bridges), in creation order.
    node_links: Vec<String>,
    pods: Vec<Pod>,
    bridges: Vec<Bridge>,
    next_veth: u32,
}

/// One lab: a node namespace, its bridges and pods. Everything is removed on drop.
pub struct Lab {
    name: String,
    node: String,
    state: Mutex<LabState>,
    keep: bool,
}

impl Lab {
    /// Creates a lab and its node namespace (forwarding on, DAD off, `lo` up).
    ///
    /// `prefix_hint` tags the lab's names: lowercased, reduced to `[a-z0-9]`, prefixed with
    /// `npc` unless it already starts with it, at most 12 bytes; empty gives `npc`. Names are
    /// `<prefix>-<pid>-<n>` for the lab, `<lab>-node` and `<lab>-<pod>` for its namespaces.
    pub fn new(prefix_hint: &str) -> Result<Self> {
        let prefix = lab_prefix(prefix_hint);
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let node = format!("{name}-{NODE_SUFFIX}");
        let lab = Self {
            name,
            node,
            state: Mutex::new(LabState::default()),
            keep: false,
        };
        // Leftovers of a crashed earlier process that had our pid: ours to remove.
        destroy_lab(&lab.name).context("removing leftovers of an earlier lab of this name")?;
        run(&["ip", "netns", "add", &lab.node])?;
        lab.prepare_netns(&lab.node)?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.default.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            sysctl(&lab.node, key, value)?;
        }
        Ok(lab)
    }

    /// The lab's name, `<prefix>-<pid>-<n>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node namespace (bridges, host veths, routes; where TC programs attach).
    pub fn node_netns(&self) -> &str {
        &self.node
    }

    /// The pods created so far.
    pub fn pods(&self) -> Vec<Pod> {
        self.state().pods.clone()
    }

    /// The bridges created so far.
    pub fn bridges(&self) -> Vec<Bridge> {
        self.state().bridges.clone()
    }

    /// All the lab's namespaces: pods, then the node.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = self.state().pod_netns.clone();
        names.push(self.node.clone());
        names
    }

    /// Runs `ip netns exec <netns> <argv>` and returns its stdout.
    pub fn exec(&self, netns: &str, argv: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", netns];
        full.extend_from_slice(argv);
        run(&full)
    }

    /// Creates a bridge in the node namespace carrying the gateway address(es), e.g.
    /// `add_bridge("br0", "10.1.0.1/24", Some("fd00:1::1/64"))`.
    pub fn add_bridge(
        &self,
        name: &str,
        gateway_cidr_v4: &str,
        gateway_cidr_v6: Option<&str>,
    ) -> Result<Bridge> {
        check_name("bridge", name)?;
        ensure!(name.len() <= IFNAME_MAX, "bridge name {name:?} is too long");
        let (gw4, len4) = parse_cidr(gateway_cidr_v4)?;
        let IpAddr::V4(gw4) = gw4 else {
            bail!("{gateway_cidr_v4:?} is no IPv4 CIDR");
        };
        let gw6 = match gateway_cidr_v6 {
            None => None,
            Some(c) => match parse_cidr(c)? {
                (IpAddr::V6(a), len) => Some((a, len)),
                _ => bail!("{c:?} is no IPv6 CIDR"),
            },
        };
        let node = &self.node;
        ip(node, &["link", "add", name, "type", "bridge"])?;
        self.state().node_links.push(name.to_string());
        ip(node, &["addr", "add", gateway_cidr_v4, "dev", name])?;
        if let Some(c) = gateway_cidr_v6 {
            ip(node, &["-6", "addr", "add", c, "dev", name, "nodad"])?;
        }
        ip(node, &["link", "set", name, "up"])?;
        let (ifindex, mac) = link_info(node, name)?;
        let bridge = Bridge {
            name: name.to_string(),
            ifindex,
            gateway_v4: gw4,
            prefix_len_v4: len4,
            gateway_v6: gw6,
            mac,
        };
        self.state().bridges.push(bridge.clone());
        Ok(bridge)
    }

    /// Creates a pod whose host veth is a port of `bridge`: `eth0` gets `ipv4` (and `ipv6`)
    /// with the bridge's prefix lengths and default routes via the bridge's gateways.
    pub fn add_pod_on_bridge(
        &self,
        bridge: &Bridge,
        pod_name: &str,
        ipv4: Ipv4Addr,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<Pod> {
        ensure!(
            same_subnet(bridge.gateway_v4.into(), ipv4.into(), bridge.prefix_len_v4),
            "{ipv4} is not in {}/{}",
            bridge.gateway_v4,
            bridge.prefix_len_v4
        );
        if let Some(v6) = ipv6 {
            let (gw6, len6) = bridge
                .gateway_v6
                .with_context(|| format!("bridge {} has no IPv6 gateway", bridge.name))?;
            ensure!(
                same_subnet(gw6.into(), v6.into(), len6),
                "{v6} is not in {gw6}/{len6}"
            );
        }
        let (pod_ns, veth) = self.create_pod_netns_and_veth(pod_name)?;
        let node = &self.node;
        ip(node, &["link", "set", &veth, "master", &bridge.name])?;
        ip(node, &["link", "set", &veth, "up"])?;

        let a4 = format!("{ipv4}/{}", bridge.prefix_len_v4);
        ip(&pod_ns, &["addr", "add", &a4, "dev", "eth0"])?;
        ip(&pod_ns, &["link", "set", "eth0", "up"])?;
        let gw4 = bridge.gateway_v4.to_string();
        ip(
            &pod_ns,
            &["route", "add", "default", "via", &gw4, "dev", "eth0"],
        )?;
        if let (Some(v6), Some((gw6, len6))) = (ipv6, bridge.gateway_v6) {
            let a6 = format!("{v6}/{len6}");
            ip(&pod_ns, &["-6", "addr", "add", &a6, "dev", "eth0", "nodad"])?;
            let gw6 = gw6.to_string();
            ip(
                &pod_ns,
                &["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"],
            )?;
        }
        self.finish_pod(
            pod_name,
            pod_ns,
            veth,
            ipv4,
            ipv6,
            Attachment::Bridge(bridge.name.clone()),
        )
    }

    /// Creates a routed pod: `eth0` gets `ipv4/32` (and `ipv6/128`) and default routes via
    /// [`ROUTED_GATEWAY_V4`] / [`ROUTED_GATEWAY_V6`] on-link; the host veth carries those
    /// gateway addresses and the node namespace routes the pod's addresses to it.
    pub fn add_routed_pod(
        &self,
        pod_name: &str,
        ipv4: Ipv4Addr,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<Pod> {
        let (pod_ns, veth) = self.create_pod_netns_and_veth(pod_name)?;
        let node = &self.node;
        let gw4 = ROUTED_GATEWAY_V4.to_string();
        let gw6 = ROUTED_GATEWAY_V6.to_string();

        // Host side.
        ip(node, &["addr", "add", &format!("{gw4}/32"), "dev", &veth])?;
        if ipv6.is_some() {
            let a = format!("{gw6}/64");
            ip(node, &["-6", "addr", "add", &a, "dev", &veth, "nodad"])?;
        }
        ip(node, &["link", "set", &veth, "up"])?;
        let r4 = format!("{ipv4}/32");
        ip(node, &["route", "add", &r4, "dev", &veth, "scope", "link"])?;
        if let Some(v6) = ipv6 {
            let r6 = format!("{v6}/128");
            ip(node, &["-6", "route", "add", &r6, "dev", &veth])?;
        }

        // Pod side.
        ip(&pod_ns, &["addr", "add", &r4, "dev", "eth0"])?;
        ip(&pod_ns, &["link", "set", "eth0", "up"])?;
        ip(
            &pod_ns,
            &["route", "add", &gw4, "dev", "eth0", "scope", "link"],
        )?;
        ip(
            &pod_ns,
            &["route", "add", "default", "via", &gw4, "dev", "eth0"],
        )?;
        if let Some(v6) = ipv6 {
            let a6 = format!("{v6}/128");
            ip(&pod_ns, &["-6", "addr", "add", &a6, "dev", "eth0", "nodad"])?;
            ip(
                &pod_ns,
                &["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"],
            )?;
        }
        self.finish_pod(pod_name, pod_ns, veth, ipv4, ipv6, Attachment::Routed)
    }

    /// Keeps the lab's namespaces after this `Lab` is gone (for `cargo xtask lab`); returns
    /// the lab name to pass to [`destroy_lab`] later.
    pub fn persist(mut self) -> String {
        self.keep = true;
        self.name.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LabState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `lo` up and DAD off, before any other interface appears in `netns`.
    fn prepare_netns(&self, netns: &str) -> Result<()> {
        ip(netns, &["link", "set", "lo", "up"])?;
        for key in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            sysctl(netns, key, "0")?;
        }
        Ok(())
    }

    /// Creates the pod namespace and the veth pair: host end in the node namespace, `eth0` in
    /// the pod namespace (both down, unconfigured).
    fn create_pod_netns_and_veth(&self, pod_name: &str) -> Result<(String, String)> {
        check_name("pod", pod_name)?;
        ensure!(
            pod_name != NODE_SUFFIX,
            "pod name {NODE_SUFFIX:?} is reserved"
        );
        let pod_ns = format!("{}-{pod_name}", self.name);
        let veth = {
            let mut st = self.state();
            ensure!(
                !st.pod_netns.contains(&pod_ns),
                "pod {pod_name:?} already exists"
            );
            let i = st.next_veth;
            st.next_veth += 1;
            let mut v = format!("npc{i}-{pod_name}");
            v.truncate(IFNAME_MAX);
            v
        };
        run(&["ip", "netns", "add", &pod_ns])?;
        self.state().pod_netns.push(pod_ns.clone());
        self.prepare_netns(&pod_ns)?;
        ip(
            &self.node,
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns,
            ],
        )?;
        self.state().node_links.push(veth.clone());
        Ok((pod_ns, veth))
    }

    fn finish_pod(
        &self,
        pod_name: &str,
        pod_ns: String,
        veth: String,
        ipv4: Ipv4Addr,
        ipv6: Option<Ipv6Addr>,
        attachment: Attachment,
    ) -> Result<Pod> {
        let (host_ifindex, host_mac) = link_info(&self.node, &veth)?;
        let (ifindex, mac) = link_info(&pod_ns, "eth0")?;
        let pod = Pod {
            name: pod_name.to_string(),
            netns: pod_ns,
            node_netns: self.node.clone(),
            ipv4,
            ipv6,
            host_veth: veth,
            host_ifindex,
            host_mac,
            mac,
            ifindex,
            attachment,
        };
        self.state().pods.push(pod.clone());
        Ok(pod)
    }

    fn teardown(&mut self) -> Result<()> {
        let st = std::mem::take(&mut *self.state());
        let mut errors = Vec::new();
        if netns_exists(&self.node) {
            // Veths first (takes the pod ends with them even if a socket still pins a pod
            // namespace), then bridges.
            for link in st.node_links.iter().rev() {
                if let Err(e) = ip(&self.node, &["link", "del", link]) {
                    // Already gone with its peer's namespace, or never fully created.
                    if !format!("{e:#}").contains("Cannot find device") {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        for ns in st.pod_netns.iter().chain(std::iter::once(&self.node)) {
            if let Err(e) = del_netns(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(errors.join("; ")))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!("lab {}: cleanup failed: {e:#}", self.name);
        }
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("name", &self.name)
            .field("node", &self.node)
            .field("pods", &self.state().pods)
            .finish()
    }
}

/// The prefix [`Lab::new`] derives from `hint`: a lab made with [`Lab::new`]`(hint)` as the
/// `n`-th lab (from 0) of process `pid` is named `<lab_prefix(hint)>-<pid>-<n>`. Lets a
/// process that spawned a lab-owning child know the lab's name before the child reports it.
pub fn lab_prefix(hint: &str) -> String {
    let clean: String = hint
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let mut p = if clean.starts_with(DEFAULT_PREFIX) {
        clean
    } else {
        format!("{DEFAULT_PREFIX}{clean}")
    };
    p.truncate(12);
    p
}

/// Whether `GET /readyz` on `addr` in namespace `netns` answers 200 (an agent that has synced).
pub fn readyz(netns: &str, addr: SocketAddr) -> bool {
    let t = Duration::from_millis(500);
    let Ok(Ok(mut s)) = try_in_netns(netns, || TcpStream::connect_timeout(&addr, t)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(t));
    let _ = s.set_write_timeout(Some(t));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    head.starts_with("HTTP/") && head.split_whitespace().nth(1) == Some("200")
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// Result of [`Pod::connect_tcp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Handshake done and a payload echoed back.
    Connected,
    /// No answer within the timeout (SYN or SYN-ACK dropped).
    TimedOut,
    /// The peer answered with a RST (no listener, or a policy that rejects).
    Refused,
    /// Anything else (unreachable, echo mismatch, ...).
    Other(String),
}

impl ConnectOutcome {
    pub fn is_connected(&self) -> bool {
        *self == Self::Connected
    }
}

/// An echo server running in a pod's namespace; stops (and joins its threads) on drop.
pub struct ServerHandle {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// The TCP listener, kept to shut it down (wakes `accept`).
    listener: Option<Arc<TcpListener>>,
    thread: Option<JoinHandle<()>>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ServerHandle {
    /// The bound address (the unspecified address: `[::]` or `0.0.0.0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn port(&self) -> u16 {
        self.local.port()
    }

    /// TCP: connections accepted; UDP: datagrams received (and echoed). Both are counted before
    /// the client can see an answer.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Peers seen (IPv4-mapped addresses shown as IPv4), in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(l) = &self.listener {
            // SAFETY: the fd is valid (we hold an Arc of the listener); shutdown of a listening
            // TCP socket wakes a blocked accept(), which then fails.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

/// How often server loops look at their stop flag.
const POLL: Duration = Duration::from_millis(50);

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn bind_dual<T>(port: u16, bind: impl Fn(SocketAddr) -> io::Result<T>) -> io::Result<T> {
    // `[::]` takes IPv4 too (bindv6only is 0 in a fresh namespace); fall back to IPv4 only.
    bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
        .or_else(|_| bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)))
}

fn echo_loop(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(POLL));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Unique payload for echo checks.
fn payload(tag: &str) -> Vec<u8> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "npc-lab {tag} {} {}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

/// A TCP connection opened from a pod (see [`Pod::open_tcp`]); usable from any thread.
#[derive(Debug)]
pub struct TcpConn {
    pub stream: TcpStream,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl TcpConn {
    /// Sends `data` and reads it back from an echo server, within `timeout` per direction.
    /// Errors: `TimedOut`/`WouldBlock` when nothing came back, `InvalidData` on a mismatch,
    /// `ConnectionReset`/`UnexpectedEof` when the connection died.
    pub fn echo(&mut self, data: &[u8], timeout: Duration) -> io::Result<()> {
        echo_check(&mut self.stream, data, timeout)
    }

    /// [`TcpConn::echo`] with a fresh small payload.
    pub fn check(&mut self, timeout: Duration) -> io::Result<()> {
        self.echo(&payload("conn"), timeout)
    }

    pub fn into_inner(self) -> TcpStream {
        self.stream
    }
}

fn echo_check(stream: &mut TcpStream, data: &[u8], timeout: Duration) -> io::Result<()> {
    let timeout = timeout.max(Duration::from_millis(1));
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(data)?;
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back)?;
    if back != data {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "echo returned different bytes",
        ));
    }
    Ok(())
}

impl Pod {
    /// Runs `f` in the pod's namespace (see [`in_netns`]).
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.netns, f)
    }

    /// The pod's addresses: IPv4, then IPv6 if any.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.ipv4)];
        v.extend(self.ipv6.map(IpAddr::V6));
        v
    }

    /// Starts a TCP echo server on `port` (all addresses, IPv4 and IPv6) in the pod.
    pub fn serve_tcp(&self, port: u16) -> Result<ServerHandle> {
        let listener = try_in_netns(&self.netns, || bind_dual(port, TcpListener::bind))?
            .with_context(|| format!("pod {}: bind TCP port {port}", self.name))?;
        let local = listener.local_addr()?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let workers = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (listener, stop, count, peers, workers) = (
                listener.clone(),
                stop.clone(),
                count.clone(),
                peers.clone(),
                workers.clone(),
            );
            thread::Builder::new()
                .name(format!("tcp-echo-{}", self.name))
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match listener.accept() {
                            Ok((stream, peer)) => {
                                if stop.load(Ordering::SeqCst) {
                                    break;
                                }
                                count.fetch_add(1, Ordering::SeqCst);
                                peers
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(canonical(peer));
                                let stop = stop.clone();
                                let w = thread::spawn(move || echo_loop(stream, &stop));
                                let mut ws = workers.lock().unwrap_or_else(|e| e.into_inner());
                                ws.retain(|h: &JoinHandle<()>| !h.is_finished());
                                ws.push(w);
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    io::ErrorKind::ConnectionAborted
                                        | io::ErrorKind::ConnectionReset
                                ) => {}
                            Err(_) => break,
                        }
                    }
                })?
        };
        Ok(ServerHandle {
            local,
            stop,
            count,
            peers,
            listener: Some(listener),
            thread: Some(thread),
            workers,
        })
    }

    /// Starts a UDP echo server on `port` (all addresses, IPv4 and IPv6) in the pod.
    pub fn serve_udp(&self, port: u16) -> Result<ServerHandle> {
        let sock = try_in_netns(&self.netns, || bind_dual(port, UdpSocket::bind))?
            .with_context(|| format!("pod {}: bind UDP port {port}", self.name))?;
        let local = sock.local_addr()?;
        sock.set_read_timeout(Some(POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, count, peers) = (stop.clone(), count.clone(), peers.clone());
            thread::Builder::new()
                .name(format!("udp-echo-{}", self.name))
                .spawn(move || {
                    let mut buf = [0u8; 65536];
                    while !stop.load(Ordering::SeqCst) {
                        // Errors are timeouts (stop flag check) or ICMP errors of earlier
                        // replies reported on this socket: keep serving.
                        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                            // Counted before echoing: a client that got its echo sees it.
                            count.fetch_add(1, Ordering::SeqCst);
                            peers
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(canonical(peer));
                            let _ = sock.send_to(&buf[..n], peer);
                        }
                    }
                })?
        };
        Ok(ServerHandle {
            local,
            stop,
            count,
            peers,
            listener: None,
            thread: Some(thread),
            workers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Connects from the pod to `dst:port` within `timeout`; when connected, also sends a small
    /// payload and expects it echoed back within `timeout` (so reply traffic is checked too).
    pub fn connect_tcp(&self, dst: IpAddr, port: u16, timeout: Duration) -> ConnectOutcome {
        let addr = SocketAddr::new(dst, port);
        let res = try_in_netns(&self.netns, || TcpStream::connect_timeout(&addr, timeout));
        let mut stream = match res {
            Err(e) => return ConnectOutcome::Other(format!("{e:#}")),
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return classify(&e),
        };
        match echo_check(&mut stream, &payload(&self.name), timeout) {
            Ok(()) => ConnectOutcome::Connected,
            Err(e) => ConnectOutcome::Other(format!("connected, but echo failed: {e}")),
        }
    }

    /// Sends a datagram from the pod to `dst:port` and waits for the same bytes back within
    /// `timeout` (the datagram is resent every 200 ms meanwhile). False on timeout or on an
    /// ICMP error (port unreachable, ...).
    pub fn udp_roundtrip(&self, dst: IpAddr, port: u16, timeout: Duration) -> bool {
        self.try_udp_roundtrip(dst, port, timeout).unwrap_or(false)
    }

    /// [`Pod::udp_roundtrip`] that reports why it failed: `Ok(false)` on timeout, `Err` on
    /// socket errors (ICMP unreachable surfaces as `ConnectionRefused`, ...).
    pub fn try_udp_roundtrip(&self, dst: IpAddr, port: u16, timeout: Duration) -> Result<bool> {
        let bind: SocketAddr = match dst {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = try_in_netns(&self.netns, || UdpSocket::bind(bind))??;
        sock.connect((dst, port))?;
        let data = payload(&self.name);
        let deadline = Instant::now() + timeout;
        let resend = Duration::from_millis(200);
        let mut buf = [0u8; 2048];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            sock.send(&data)?;
            let until = (now + resend).min(deadline);
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                sock.set_read_timeout(Some(left))?;
                match sock.recv(&mut buf) {
                    Ok(n) if buf[..n] == data[..] => return Ok(true),
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    /// Opens a TCP connection from the pod (the socket lives in the pod's namespace and can be
    /// used from any thread), for tests of long-lived connections.
    pub fn open_tcp(&self, dst: IpAddr, port: u16, timeout: Duration) -> Result<TcpConn> {
        let addr = SocketAddr::new(dst, port);
        let stream = try_in_netns(&self.netns, || TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("pod {}: connect to {addr}", self.name))?;
        Ok(TcpConn {
            local: stream.local_addr()?,
            peer: stream.peer_addr()?,
            stream,
        })
    }
}

fn classify(e: &io::Error) -> ConnectOutcome {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ConnectOutcome::TimedOut,
        io::ErrorKind::ConnectionRefused => ConnectOutcome::Refused,
        _ => ConnectOutcome::Other(e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests (need root and iproute2)
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);
    const TCP_PORT: u16 = 8080;
    const UDP_PORT: u16 = 5353;
    const CLOSED_PORT: u16 = 8081;

    fn lab_namespaces(lab_name: &str) -> Vec<String> {
        let prefix = format!("{lab_name}-");
        list_netns()
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    /// Two bridge pods and two routed pods, dual-stack: every ordered pair talks TCP and UDP
    /// over both families; closed ports are refused; nothing is left after drop.
    #[test]
    fn mixed_lab_all_pairs() {
        let lab = Lab::new("t").unwrap();
        let name = lab.name().to_string();
        let br = lab
            .add_bridge("br0", "10.10.0.1/24", Some("fd00:10::1/64"))
            .unwrap();
        let pods = vec![
            lab.add_pod_on_bridge(
                &br,
                "b1",
                "10.10.0.2".parse().unwrap(),
                Some("fd00:10::2".parse().unwrap()),
            )
            .unwrap(),
            lab.add_pod_on_bridge(
                &br,
                "b2",
                "10.10.0.3".parse().unwrap(),
                Some("fd00:10::3".parse().unwrap()),
            )
            .unwrap(),
            lab.add_routed_pod(
                "r1",
                "10.20.0.5".parse().unwrap(),
                Some("fd00:20::5".parse().unwrap()),
            )
            .unwrap(),
            lab.add_routed_pod(
                "r2",
                "10.20.0.6".parse().unwrap(),
                Some("fd00:20::6".parse().unwrap()),
            )
            .unwrap(),
        ];
        assert_eq!(lab_namespaces(&name).len(), 5);

        // Handles: distinct veths with ifindexes as seen in the node namespace.
        for p in &pods {
            assert!(p.host_veth.len() <= IFNAME_MAX);
            let idx = in_netns(lab.node_netns(), || {
                let c = std::ffi::CString::new(p.host_veth.clone()).unwrap();
                // SAFETY: valid C string.
                unsafe { libc::if_nametoindex(c.as_ptr()) }
            });
            assert_eq!(idx, p.host_ifindex, "{}", p.host_veth);
            assert_ne!(p.mac, [0; 6]);
            let out = lab
                .exec(&p.netns, &["ip", "-o", "link", "show", "eth0"])
                .unwrap();
            assert!(out.contains(&format_mac(&p.mac)), "{out}");
        }

        let servers: Vec<_> = pods
            .iter()
            .map(|p| {
                (
                    p.serve_tcp(TCP_PORT).unwrap(),
                    p.serve_udp(UDP_PORT).unwrap(),
                )
            })
            .collect();

        let mut checks = 0;
        for (i, from) in pods.iter().enumerate() {
            for (j, to) in pods.iter().enumerate() {
                if i == j {
                    continue;
                }
                for dst in to.ips() {
                    let out = from.connect_tcp(dst, TCP_PORT, T);
                    assert_eq!(out, ConnectOutcome::Connected, "{} -> {dst}", from.name);
                    assert!(
                        from.try_udp_roundtrip(dst, UDP_PORT, T).unwrap(),
                        "udp {} -> {dst}",
                        from.name
                    );
                    let out = from.connect_tcp(dst, CLOSED_PORT, T);
                    assert_eq!(
                        out,
                        ConnectOutcome::Refused,
                        "{} -> {dst}:closed",
                        from.name
                    );
                    checks += 1;
                }
            }
        }
        assert_eq!(checks, 4 * 3 * 2);
        for (p, (tcp, udp)) in pods.iter().zip(&servers) {
            assert_eq!(tcp.count(), 3 * 2, "{}", p.name);
            assert!(udp.count() >= 3 * 2, "{}", p.name);
            // Peers are seen with their real addresses (no NAT anywhere).
            for peer in tcp.peers() {
                assert!(
                    pods.iter()
                        .any(|q| q.name != p.name && q.ips().contains(&peer.ip())),
                    "{} saw {peer}",
                    p.name
                );
            }
        }

        drop(servers);
        drop(lab);
        assert_eq!(lab_namespaces(&name), Vec::<String>::new());
    }

    /// Long-lived connection used from another thread; TimedOut vs Refused; routed-only lab,
    /// IPv4 only.
    #[test]
    fn routed_lab_long_lived_and_timeout() {
        let root_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
        let lab = Lab::new("t").unwrap();
        let name = lab.name().to_string();
        let a = lab
            .add_routed_pod("a", "10.30.0.1".parse().unwrap(), None)
            .unwrap();
        let b = lab
            .add_routed_pod("b", "10.30.0.2".parse().unwrap(), None)
            .unwrap();
        let srv = b.serve_tcp(9000).unwrap();
        let mut conn = a.open_tcp(b.ipv4.into(), 9000, T).unwrap();
        assert_eq!(conn.peer, SocketAddr::from((b.ipv4, 9000)));
        assert_eq!(conn.local.ip(), IpAddr::V4(a.ipv4));
        conn.check(T).unwrap();
        let conn = thread::spawn(move || {
            conn.check(T).unwrap();
            conn
        })
        .join()
        .unwrap();
        assert_eq!(srv.count(), 1);
        drop(conn);

        // Both directions, UDP.
        let _u = a.serve_udp(9001).unwrap();
        assert!(b.udp_roundtrip(a.ipv4.into(), 9001, T));
        // No UDP server: ICMP port unreachable -> false, quickly.
        let t0 = Instant::now();
        assert!(!b.udp_roundtrip(a.ipv4.into(), 9002, T));
        assert!(t0.elapsed() < T);

        // Packets to a blackhole route in the node namespace are dropped silently (forwarded
        // packets get no ICMP): TimedOut, not Refused.
        let node = lab.node_netns();
        lab.exec(node, &["ip", "route", "add", "blackhole", "10.99.0.1/32"])
            .unwrap();
        let t0 = Instant::now();
        let out = a.connect_tcp("10.99.0.1".parse().unwrap(), 80, Duration::from_millis(500));
        assert_eq!(out, ConnectOutcome::TimedOut);
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(!a.udp_roundtrip("10.99.0.1".parse().unwrap(), 80, Duration::from_millis(300)));
        assert_eq!(
            a.connect_tcp(b.ipv4.into(), 9999, T),
            ConnectOutcome::Refused
        );

        // The node namespace forwards; the root namespace was not touched.
        assert_eq!(read_sysctl(node, "net.ipv4.ip_forward").unwrap(), "1");
        assert_eq!(
            read_sysctl(node, "net.ipv6.conf.all.forwarding").unwrap(),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
            root_forward
        );
        drop(srv);
        drop(lab);
        assert_eq!(lab_namespaces(&name), Vec::<String>::new());
    }

    /// A panic while the lab exists still removes it.
    #[test]
    fn cleanup_on_panic() {
        let (tx, rx) = std::sync::mpsc::channel();
        let r = std::panic::catch_unwind(move || {
            let lab = Lab::new("t").unwrap();
            let br = lab.add_bridge("br0", "10.40.0.1/24", None).unwrap();
            lab.add_pod_on_bridge(&br, "p", "10.40.0.2".parse().unwrap(), None)
                .unwrap();
            tx.send(lab.name().to_string()).unwrap();
            assert_eq!(lab_namespaces(lab.name()).len(), 2);
            panic!("boom");
        });
        assert!(r.is_err());
        let name = rx.recv().unwrap();
        assert_eq!(lab_namespaces(&name), Vec::<String>::new());
    }

    #[test]
    fn bad_input_is_rejected_and_cleaned() {
        let lab = Lab::new("t").unwrap();
        let name = lab.name().to_string();
        let br = lab.add_bridge("br0", "10.50.0.1/24", None).unwrap();
        assert!(
            lab.add_pod_on_bridge(&br, "x", "10.51.0.2".parse().unwrap(), None)
                .is_err()
        );
        assert!(
            lab.add_pod_on_bridge(
                &br,
                "x",
                "10.50.0.2".parse().unwrap(),
                Some("fd00::2".parse().unwrap())
            )
            .is_err()
        );
        assert!(
            lab.add_routed_pod("node", "10.52.0.1".parse().unwrap(), None)
                .is_err()
        );
        assert!(
            lab.add_routed_pod("a-b", "10.52.0.1".parse().unwrap(), None)
                .is_err()
        );
        lab.add_routed_pod("a", "10.52.0.1".parse().unwrap(), None)
            .unwrap();
        assert!(
            lab.add_routed_pod("a", "10.52.0.2".parse().unwrap(), None)
                .is_err()
        );
        // A failure half-way (duplicate route) still leaves the namespace registered.
        assert!(
            lab.add_routed_pod("c", "10.52.0.1".parse().unwrap(), None)
                .is_err()
        );
        assert!(lab.netns_names().iter().any(|n| n.ends_with("-c")));
        drop(lab);
        assert_eq!(lab_namespaces(&name), Vec::<String>::new());
    }

    #[test]
    fn stale_namespaces_are_removed() {
        // A prefix of our own, so that concurrent test processes do not clean ours. pid 4194305
        // exceeds the largest pid_max: never alive.
        let prefix = format!("npcs{}x", std::process::id());
        let stale = format!("{prefix}-4194305-0-node");
        let live = format!("{prefix}-{}-0-node", std::process::id());
        run(&["ip", "netns", "add", &stale]).unwrap();
        run(&["ip", "netns", "add", &live]).unwrap();
        let deleted = cleanup_stale(&prefix).unwrap();
        let live_left = netns_exists(&live);
        del_netns(&live).unwrap();
        assert_eq!(deleted, vec![stale.clone()]);
        assert!(!netns_exists(&stale));
        assert!(live_left);
        assert!(cleanup_stale("foo").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(lab_prefix(""), "npc");
        assert_eq!(lab_prefix("Lab-1"), "npclab1");
        assert_eq!(lab_prefix("npcxyz"), "npcxyz");
        assert_eq!(lab_prefix("averyveryverylonghint"), "npcaveryvery");
        assert_eq!(
            parse_lab_netns("npc-12-3-node"),
            Some(("npc", 12, 3, "node"))
        );
        assert_eq!(
            parse_lab_netns("npcx1-12-3-a-b"),
            Some(("npcx1", 12, 3, "a-b"))
        );
        assert_eq!(parse_lab_netns("npcX-12-3-node"), None);
        assert_eq!(parse_lab_netns("foo-12-3-node"), None);
        assert_eq!(parse_lab_netns("npc-a-3-node"), None);
        assert_eq!(parse_lab_netns("npc-1-3"), None);
        assert!(same_subnet(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.200".parse().unwrap(),
            24
        ));
        assert!(!same_subnet(
            "10.0.0.1".parse().unwrap(),
            "10.0.1.1".parse().unwrap(),
            24
        ));
        assert!(same_subnet(
            "fd00::1".parse().unwrap(),
            "fd00::ffff".parse().unwrap(),
            64
        ));
        assert_eq!(
            parse_link("7: npc0-a@if2: <BROADCAST> mtu 1500 qdisc noop state DOWN mode DEFAULT group default qlen 1000\\    link/ether 2a:0b:3c:4d:5e:6f brd ff:ff:ff:ff:ff:ff link-netns x").unwrap(),
            (7, [0x2a, 0x0b, 0x3c, 0x4d, 0x5e, 0x6f])
        );
    }
}
