//! `dataplane::pod_veths` in network-namespace labs (see `npc_tests::lab`): it maps every pod
//! address to the pod's host veth for bridge and routed pods, dual-stack; it never pairs a
//! node with the pods of another node (labs built alike have the same ifindexes); it finds pod
//! namespaces that have no name; it keeps going while namespaces appear and vanish; and it
//! needs nothing but `CAP_NET_ADMIN`.
//!
//! Needs root (network namespaces, `setns` into the labs' node namespaces). The machine also
//! holds the namespaces of tests running concurrently: they must never show up in a result.
use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use npc_agent::dataplane::pod_veths::{self, PodVeth};
use npc_tests::lab::{Lab, NETNS_DIR, Pod, in_netns, list_netns, run};

/// A lab with two dual-stack pods on a bridge and two dual-stack routed pods. `n` picks the
/// address ranges (10.n.0.0/24 and fd00:n::/64 on the bridge, 10.n+1.0.x routed), so that
/// labs can be told apart by their addresses.
fn lab(n: u8) -> (Lab, Vec<Pod>) {
    let lab = Lab::new("pv").unwrap();
    let bridge = lab
        .add_bridge(
            "br0",
            &format!("10.{n}.0.1/24"),
            Some(&format!("fd00:{n}::1/64")),
        )
        .unwrap();
    let routed = n + 1;
    let pods = vec![
        lab.add_pod_on_bridge(
            &bridge,
            "b1",
            format!("10.{n}.0.2").parse().unwrap(),
            Some(format!("fd00:{n}::2").parse().unwrap()),
        )
        .unwrap(),
        lab.add_pod_on_bridge(
            &bridge,
            "b2",
            format!("10.{n}.0.3").parse().unwrap(),
            Some(format!("fd00:{n}::3").parse().unwrap()),
        )
        .unwrap(),
        lab.add_routed_pod(
            "r1",
            format!("10.{routed}.0.5").parse().unwrap(),
            Some(format!("fd00:{routed}::5").parse().unwrap()),
        )
        .unwrap(),
        lab.add_routed_pod(
            "r2",
            format!("10.{routed}.0.6").parse().unwrap(),
            Some(format!("fd00:{routed}::6").parse().unwrap()),
        )
        .unwrap(),
    ];
    (lab, pods)
}

/// Every address of `pods` -> its host veth's ifindex.
fn expected(pods: &[Pod]) -> BTreeMap<IpAddr, u32> {
    pods.iter()
        .flat_map(|pod| pod.ips().into_iter().map(|ip| (ip, pod.host_ifindex)))
        .collect()
}

fn learn_in(netns: &str) -> BTreeMap<IpAddr, u32> {
    in_netns(netns, pod_veths::learn).unwrap()
}

/// The ifindex of `ifname` in `netns`.
fn ifindex(netns: &str, ifname: &str) -> u32 {
    let out = run(&["ip", "-n", netns, "-o", "link", "show", "dev", ifname]).unwrap();
    out.split(':').next().unwrap().trim().parse().unwrap()
}

/// The namespace ids `netns` has assigned, by the name of the namespace under `/run/netns`
/// (`ip netns list-id`, which finds the names by asking the kernel for the id of each file:
/// independent of how `pod_veths` gets them).
fn nsids_by_name(netns: &str) -> BTreeMap<String, i32> {
    let out = run(&["ip", "-n", netns, "netns", "list-id"]).unwrap();
    out.lines()
        .filter_map(|line| {
            // nsid 3 (iproute2 netns name: pv-1234-0-b1)
            let rest = line.strip_prefix("nsid ")?;
            let (id, rest) = rest.split_once(' ')?;
            let name = rest
                .strip_prefix("(iproute2 netns name: ")?
                .strip_suffix(')')?;
            Some((name.to_string(), id.parse().ok()?))
        })
        .collect()
}

/// Two labs built alike: the same ifindexes on both sides of every veth, different addresses.
/// Each node learns exactly its own pods; a pod namespace and the root namespace learn none of
/// them; `scan` and `learn_async` agree.
#[test]
fn bridge_and_routed_pods_of_two_alike_labs() {
    let (lab_a, pods_a) = lab(61);
    let (lab_b, pods_b) = lab(63);
    // What makes ifindex matching alone wrong: the same pairs of ifindexes in both labs.
    for (a, b) in pods_a.iter().zip(&pods_b) {
        assert_eq!(
            (a.ifindex, a.host_ifindex),
            (b.ifindex, b.host_ifindex),
            "{} vs {}: this kernel numbers interfaces globally, the labs differ",
            a.netns,
            b.netns
        );
    }

    let learned_a = learn_in(lab_a.node_netns());
    assert_eq!(learned_a, expected(&pods_a));
    let learned_b = learn_in(lab_b.node_netns());
    assert_eq!(learned_b, expected(&pods_b));

    // `scan` reports the pod side too, with the ids the node gives the pods' namespaces.
    let scanned = in_netns(lab_a.node_netns(), pod_veths::scan).unwrap();
    let nsids = nsids_by_name(lab_a.node_netns());
    let mut want: Vec<PodVeth> = pods_a
        .iter()
        .map(|pod| {
            let mut addresses = pod.ips();
            addresses.sort();
            PodVeth {
                netnsid: *nsids
                    .get(&pod.netns)
                    .unwrap_or_else(|| panic!("no id for {} in {nsids:?}", pod.netns)),
                pod_ifindex: pod.ifindex,
                host_ifindex: pod.host_ifindex,
                addresses,
            }
        })
        .collect();
    want.sort_by_key(|veth| (veth.netnsid, veth.host_ifindex));
    assert_eq!(scanned, want);
    // What the confirmation from the pods' side relies on: reporting a pod-side veth's peer
    // (the node) to the node's socket gave the node an id for itself.
    assert!(
        nsids.contains_key(lab_a.node_netns()),
        "the node has no id for itself: {nsids:?}"
    );

    // The async variant, on a runtime living in the node namespace.
    let learned_async = in_netns(lab_a.node_netns(), || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(pod_veths::learn_async())
    })
    .unwrap();
    assert_eq!(learned_async, expected(&pods_a));

    // From a pod's namespace: its veth leads to the node, whose side of it carries no pod
    // address (a bridge port; a routed veth's gateways are link-local).
    assert_eq!(learn_in(&pods_a[0].netns), BTreeMap::new());
    assert_eq!(learn_in(&pods_a[2].netns), BTreeMap::new());

    // From the root namespace (which may have pods of its own): none of the labs' addresses.
    let root = pod_veths::learn().unwrap();
    for pod in pods_a.iter().chain(&pods_b) {
        for ip in pod.ips() {
            assert!(
                !root.contains_key(&ip),
                "{ip} learned in the root namespace"
            );
        }
    }
    drop(lab_b);
    assert_eq!(learn_in(lab_a.node_netns()), learned_a);
}

/// Extra addresses on the pod side count, link-local ones do not; interfaces other than a veth
/// to the node (a bridge, a veth pair inside the pod, a veth pair inside the node) are
/// ignored; a pod namespace with two veths to the node gives each its own addresses.
#[test]
fn addresses_and_interfaces() {
    let (lab, pods) = lab(65);
    let node = lab.node_netns();
    let routed = &pods[2];
    let bridged = &pods[0];
    let exec = |pod: &Pod, argv: &[&str]| lab.exec(&pod.netns, argv).unwrap();
    exec(
        routed,
        &["ip", "addr", "add", "10.66.0.99/32", "dev", "eth0"],
    );
    exec(
        routed,
        &["ip", "addr", "add", "169.254.7.7/32", "dev", "eth0"],
    );
    exec(
        bridged,
        &[
            "ip", "link", "add", "in0", "type", "veth", "peer", "name", "in1",
        ],
    );
    exec(
        bridged,
        &["ip", "addr", "add", "10.67.0.1/32", "dev", "in0"],
    );
    exec(bridged, &["ip", "link", "set", "in0", "up"]);
    exec(bridged, &["ip", "link", "add", "br9", "type", "bridge"]);
    exec(
        bridged,
        &["ip", "addr", "add", "10.67.0.2/32", "dev", "br9"],
    );
    // A veth pair with both ends in the node: no IFLA_LINK_NETNSID, skipped.
    let ip_node = |args: &[&str]| {
        let mut argv = vec!["ip", "-n", node];
        argv.extend_from_slice(args);
        run(&argv).unwrap()
    };
    ip_node(&[
        "link", "add", "pvn0", "type", "veth", "peer", "name", "pvn1",
    ]);
    ip_node(&["addr", "add", "10.67.0.3/32", "dev", "pvn0"]);
    ip_node(&["addr", "add", "10.67.0.4/32", "dev", "pvn1"]);
    // A second veth from the node into the routed pod, with an address of its own.
    ip_node(&[
        "link",
        "add",
        "pvx-r1b",
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        &routed.netns,
    ]);
    exec(
        routed,
        &["ip", "addr", "add", "10.66.1.1/32", "dev", "eth1"],
    );
    exec(
        routed,
        &[
            "ip",
            "addr",
            "add",
            "fd00:66:1::1/128",
            "dev",
            "eth1",
            "nodad",
        ],
    );
    let second_ifindex = ifindex(node, "pvx-r1b");

    let mut want = expected(&pods);
    want.insert(Ipv4Addr::new(10, 66, 0, 99).into(), routed.host_ifindex);
    want.insert(Ipv4Addr::new(10, 66, 1, 1).into(), second_ifindex);
    want.insert("fd00:66:1::1".parse().unwrap(), second_ifindex);
    assert_eq!(learn_in(node), want);

    let scanned = in_netns(node, pod_veths::scan).unwrap();
    assert_eq!(scanned.len(), pods.len() + 1, "{scanned:?}");
    let r1: Vec<&PodVeth> = scanned
        .iter()
        .filter(|veth| veth.netnsid == scanned_nsid(&scanned, routed.host_ifindex))
        .collect();
    assert_eq!(r1.len(), 2, "{scanned:?}");
    assert_eq!(
        r1[0].host_ifindex.min(r1[1].host_ifindex),
        routed.host_ifindex
    );
    assert_eq!(r1[0].host_ifindex.max(r1[1].host_ifindex), second_ifindex);
}

fn scanned_nsid(scanned: &[PodVeth], host_ifindex: u32) -> i32 {
    scanned
        .iter()
        .find(|veth| veth.host_ifindex == host_ifindex)
        .unwrap_or_else(|| panic!("no veth {host_ifindex} in {scanned:?}"))
        .netnsid
}

/// A pod network namespace with no name anywhere (a runtime need not bind-mount its pod
/// namespaces under `/run/netns`): a thread `unshare`s it and holds it until dropped (also while
/// a failed assertion unwinds), which destroys it and the veth pair with it.
struct UnnamedPod {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UnnamedPod {
    /// `eth0` with `address` in a fresh namespace, peered with `host_veth` in `node`.
    fn start(node: &str, host_veth: &str, address: &str) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let (ready_tx, ready) = mpsc::channel();
        let (node, host_veth, address) =
            (node.to_string(), host_veth.to_string(), address.to_string());
        let thread = thread::spawn(move || {
            let setup = (|| -> anyhow::Result<()> {
                // SAFETY: plain syscall; it changes only this thread.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error().into());
                }
                // Commands started from this thread run in its namespace.
                run(&[
                    "ip", "link", "add", "eth0", "type", "veth", "peer", "name", &host_veth,
                    "netns", &node,
                ])?;
                run(&["ip", "addr", "add", &address, "dev", "eth0"])?;
                run(&["ip", "link", "set", "eth0", "up"])?;
                Ok(())
            })();
            let _ = ready_tx.send(setup.map_err(|e| format!("{e:#}")));
            // Until the sender is dropped.
            let _ = stopped.recv();
        });
        let pod = Self {
            stop: Some(stop),
            thread: Some(thread),
        };
        ready.recv().unwrap().unwrap();
        pod
    }
}

impl Drop for UnnamedPod {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The pod's namespace has no file anywhere: learned all the same.
#[test]
fn unnamed_pod_namespaces() {
    let (lab, pods) = lab(71);
    let node = lab.node_netns();
    let unnamed = UnnamedPod::start(node, "pvu-0", "10.72.9.9/32");
    let mut want = expected(&pods);
    want.insert(Ipv4Addr::new(10, 72, 9, 9).into(), ifindex(node, "pvu-0"));
    assert_eq!(learn_in(node), want);
    drop(unnamed);
    // The namespace goes away asynchronously, and its veth pair with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let learned = learn_in(node);
        if learned == expected(&pods) {
            break;
        }
        assert!(Instant::now() < deadline, "still learned: {learned:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

const CAP_NET_ADMIN: u32 = 12;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Leaves the calling thread (only: capabilities are per thread) with `keep` alone (a bit per
/// capability): every other capability leaves its bounding set, then its effective and
/// permitted sets are set to `keep` and its inheritable set emptied (which also empties its
/// ambient set).
fn keep_only_caps(keep: u64) -> io::Result<()> {
    let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .map_err(io::Error::other)?;
    for cap in (0..=last).filter(|&cap| keep & (1 << cap) == 0) {
        // SAFETY: plain per-thread syscall with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [keep as u32, (keep >> 32) as u32].map(|bits| CapData {
        effective: bits,
        permitted: bits,
        inheritable: 0,
    });
    // SAFETY: the header and the two data structs of version 3 outlive the call.
    if unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The capability sets of the calling thread, as `/proc/thread-self/status` shows them.
fn thread_caps() -> BTreeMap<String, String> {
    fs::read_to_string("/proc/thread-self/status")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.starts_with("Cap")
                .then(|| (key.to_string(), value.trim().to_string()))
        })
        .collect()
}

/// Learning works on a thread that holds `CAP_NET_ADMIN` and no other capability (it could
/// not even enter a pod's namespace, which the learning never does); without `CAP_NET_ADMIN`
/// the kernel refuses the targeted dumps (each namespace is skipped with a warning), so
/// nothing is learned.
#[test]
fn only_cap_net_admin_is_needed() {
    let (lab, pods) = lab(73);
    let pod_netns = format!("{NETNS_DIR}/{}", pods[0].netns);
    let (caps, setns_error, learned) = in_netns(lab.node_netns(), || {
        // Opened while still privileged, to show that setns is refused afterwards.
        let pod_ns = fs::File::open(&pod_netns).unwrap();
        keep_only_caps(1 << CAP_NET_ADMIN).unwrap();
        let caps = thread_caps();
        // SAFETY: plain syscall; if it succeeded it would change only this (fresh) thread.
        let setns =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&pod_ns), libc::CLONE_NEWNET) };
        let setns_error = (setns != 0).then(io::Error::last_os_error);
        (caps, setns_error, pod_veths::learn())
    });
    let net_admin_only = format!("{:016x}", 1u64 << CAP_NET_ADMIN);
    for (set, value) in [
        ("CapEff", &net_admin_only),
        ("CapPrm", &net_admin_only),
        ("CapBnd", &net_admin_only),
        ("CapInh", &format!("{:016x}", 0)),
        ("CapAmb", &format!("{:016x}", 0)),
    ] {
        assert_eq!(caps.get(set), Some(value), "{caps:?}");
    }
    assert_eq!(
        setns_error.and_then(|e| e.raw_os_error()),
        Some(libc::EPERM),
        "setns without CAP_SYS_ADMIN"
    );
    assert_eq!(learned.unwrap(), expected(&pods));

    let (caps, learned) = in_netns(lab.node_netns(), || {
        keep_only_caps(0).unwrap();
        (thread_caps(), pod_veths::learn())
    });
    assert_eq!(caps.get("CapEff"), Some(&format!("{:016x}", 0)), "{caps:?}");
    assert_eq!(learned.unwrap(), BTreeMap::new());
}

/// Creates and deletes namespaces with a veth to a node in a loop, on a thread of its own,
/// until dropped (also while a failed assertion unwinds, so that nothing is left behind).
struct Churn {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<anyhow::Result<u32>>>,
}

impl Churn {
    /// Namespaces `<prefix><i>`, each with `eth0` carrying 10.70.x.y/32, peered with `c<i>`
    /// in `node`.
    fn start(node: &str, prefix: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, node, prefix) = (stop.clone(), node.to_string(), prefix.to_string());
            thread::spawn(move || -> anyhow::Result<u32> {
                let mut i = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let netns = format!("{prefix}{i}");
                    let veth = format!("c{i}");
                    let address = format!("10.70.{}.{}/32", i / 250, i % 250 + 1);
                    let created = (|| -> anyhow::Result<()> {
                        run(&["ip", "netns", "add", &netns])?;
                        run(&[
                            "ip", "-n", &node, "link", "add", &veth, "type", "veth", "peer",
                            "name", "eth0", "netns", &netns,
                        ])?;
                        run(&["ip", "-n", &netns, "addr", "add", &address, "dev", "eth0"])?;
                        Ok(())
                    })();
                    // Deleting the namespace takes the veth pair with it.
                    run(&["ip", "netns", "del", &netns])?;
                    created?;
                    i += 1;
                }
                Ok(i)
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the loop; returns how many namespaces came and went.
    fn stop(mut self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Namespaces with veths to the node are created and deleted in a loop while the node scans
/// again and again: every scan succeeds and finds the stable pods; what else it finds is one of
/// the short-lived namespaces.
#[test]
fn namespaces_vanishing_during_scans() {
    let (lab, pods) = lab(68);
    let node = lab.node_netns().to_string();
    let churn_prefix = format!("{}-c", lab.name());
    let churn = Churn::start(&node, &churn_prefix);

    let want = expected(&pods);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut scans = 0;
    let mut seen_alive = 0;
    while Instant::now() < deadline || scans < 20 {
        let learned = in_netns(&node, pod_veths::learn)
            .unwrap_or_else(|e| panic!("scan {scans} failed: {e:#}"));
        for (ip, host_ifindex) in &want {
            assert_eq!(learned.get(ip), Some(host_ifindex), "{ip} in scan {scans}");
        }
        for ip in learned.keys().filter(|ip| !want.contains_key(ip)) {
            match ip {
                IpAddr::V4(v4) if v4.octets()[..2] == [10, 70] => seen_alive += 1,
                _ => panic!("unexpected {ip} in scan {scans}"),
            }
        }
        scans += 1;
    }
    let churned = churn.stop();
    eprintln!("{scans} scans while {churned} namespaces came and went; {seen_alive} seen alive");
    assert!(churned > 0);
    let left: Vec<String> = list_netns()
        .unwrap()
        .into_iter()
        .filter(|name| name.starts_with(&churn_prefix))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}
