//! `dataplane::pod_veths` in network-namespace labs (see `npc_tests::lab`): it maps every pod
//! address to the pod's host veth for bridge and routed pods, dual-stack; it never pairs a
//! node with the pods of another node (labs built alike have the same ifindexes); and it keeps
//! going while namespaces appear and vanish under `/run/netns`.
//!
//! Needs root (network namespaces, `setns`, bind mounts). `/run/netns` also holds the
//! namespaces of tests running concurrently: they must never show up in a result.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
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

fn learn_in(netns: &str, dirs: &[PathBuf]) -> BTreeMap<IpAddr, u32> {
    in_netns(netns, || pod_veths::learn(dirs)).unwrap()
}

fn netns_dirs() -> Vec<PathBuf> {
    vec![PathBuf::from(NETNS_DIR)]
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
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

    let learned_a = learn_in(lab_a.node_netns(), &netns_dirs());
    assert_eq!(learned_a, expected(&pods_a));
    let learned_b = learn_in(lab_b.node_netns(), &netns_dirs());
    assert_eq!(learned_b, expected(&pods_b));

    // `scan` reports the pod side too.
    let scanned = in_netns(lab_a.node_netns(), || pod_veths::scan(&netns_dirs())).unwrap();
    let mut want: Vec<PodVeth> = pods_a
        .iter()
        .map(|pod| {
            let mut addresses = pod.ips();
            addresses.sort();
            PodVeth {
                netns: netns_path(&pod.netns),
                pod_ifindex: pod.ifindex,
                host_ifindex: pod.host_ifindex,
                addresses,
            }
        })
        .collect();
    want.sort_by(|x, y| x.netns.cmp(&y.netns));
    assert_eq!(scanned, want);

    // The async variant, on a runtime living in the node namespace.
    let learned_async = in_netns(lab_a.node_netns(), || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(pod_veths::learn_async(netns_dirs()))
    })
    .unwrap();
    assert_eq!(learned_async, expected(&pods_a));

    // From a pod's namespace: its own file is skipped, the other veths lead elsewhere.
    assert_eq!(learn_in(&pods_a[0].netns, &netns_dirs()), BTreeMap::new());

    // From the root namespace (which may have pods of its own): none of the labs' addresses.
    let root = pod_veths::learn(&netns_dirs()).unwrap();
    for pod in pods_a.iter().chain(&pods_b) {
        for ip in pod.ips() {
            assert!(
                !root.contains_key(&ip),
                "{ip} learned in the root namespace"
            );
        }
    }
    drop(lab_b);
    assert_eq!(learn_in(lab_a.node_netns(), &netns_dirs()), learned_a);
}

/// Unmounts a bind mount and removes its directory on drop.
struct TempNetnsDir {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
}

impl TempNetnsDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("npc-pod-veths-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self {
            dir,
            mounts: Vec::new(),
        }
    }

    /// Another name for a namespace file, as `ip netns attach` or a runtime's own directory
    /// would give it.
    fn alias(&mut self, name: &str, netns: &Path) {
        let alias = self.dir.join(name);
        fs::write(&alias, b"").unwrap();
        run(&[
            "mount",
            "--bind",
            netns.to_str().unwrap(),
            alias.to_str().unwrap(),
        ])
        .unwrap();
        self.mounts.push(alias);
    }
}

impl Drop for TempNetnsDir {
    fn drop(&mut self) {
        for mount in &self.mounts {
            let _ = run(&["umount", mount.to_str().unwrap()]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Extra addresses on the pod side count, link-local ones do not; interfaces other than a veth
/// to the node (a bridge, a veth pair inside the pod) are ignored; a namespace reached under two
/// names counts once; files that are no namespaces are skipped.
#[test]
fn addresses_interfaces_and_odd_files() {
    let (lab, pods) = lab(65);
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

    let mut want = expected(&pods);
    want.insert(Ipv4Addr::new(10, 66, 0, 99).into(), routed.host_ifindex);

    let mut extra = TempNetnsDir::new("odd");
    extra.alias("alias-of-r1", &netns_path(&routed.netns));
    extra.alias("alias-of-node", &netns_path(lab.node_netns()));
    fs::write(extra.dir.join("plain-file"), b"").unwrap();
    fs::create_dir(extra.dir.join("subdir")).unwrap();
    let dirs = vec![
        extra.dir.clone(),
        PathBuf::from(NETNS_DIR),
        PathBuf::from("/nonexistent/npc-netns"),
    ];
    assert_eq!(learn_in(lab.node_netns(), &dirs), want);
    let scanned = in_netns(lab.node_netns(), || pod_veths::scan(&dirs)).unwrap();
    // r1 found first under its alias (the directories are scanned in order), and only then.
    let r1: Vec<&PodVeth> = scanned
        .iter()
        .filter(|veth| veth.host_ifindex == routed.host_ifindex)
        .collect();
    assert_eq!(r1.len(), 1, "{scanned:?}");
    assert_eq!(r1[0].netns, extra.dir.join("alias-of-r1"));
    assert_eq!(scanned.len(), pods.len(), "{scanned:?}");
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
        let learned = in_netns(&node, || pod_veths::learn(&netns_dirs()))
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
