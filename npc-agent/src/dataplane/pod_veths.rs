//! Learns which host-side veth carries which local pod's addresses (anti-spoofing).
//!
//! The datapath's `endpoints` map records, per local pod IP, the ifindex of the host veth the
//! pod's packets arrive on, and `from_pod` drops a packet whose source endpoint is bound to
//! another veth. This module finds those bindings by looking at the pods' side of the veths:
//!
//! 1. Every network namespace file in the given directories (container runtimes keep pod
//!    namespaces under `/run/netns`: containerd and CRI-O as `cni-<uuid>`; the test lab as
//!    `<lab>-<pod>`) is entered on a dedicated thread (`setns(CLONE_NEWNET)`), and a netlink
//!    socket created there dumps the namespace's links and addresses.
//! 2. A veth in that namespace whose peer is in another namespace reports the peer's ifindex
//!    (`IFLA_LINK`) and that namespace's id (`IFLA_LINK_NETNSID`, as numbered by the pod's
//!    namespace). The veth counts only if that id is the id of the *calling* namespace, as
//!    `RTM_GETNSID` with a file descriptor of the calling namespace tells.
//! 3. At the end, a link dump of the calling namespace confirms each binding from the other
//!    side: a veth with ifindex `IFLA_LINK` exists there, its own `IFLA_LINK` is the pod-side
//!    ifindex, and its `IFLA_LINK_NETNSID` is the id of the pod's namespace. Ifindexes are per
//!    namespace and small (a pod's `eth0` is usually 2), so matching ifindexes alone would
//!    happily pair a host veth with the pod of another node namespace on the same machine
//!    (nested clusters, the lab); the namespace ids make the match exact.
//! 4. The pod-side veth's addresses (IPv4 and IPv6, except link-local, loopback and
//!    DAD-failed ones) map to the host-side ifindex.
//!
//! This works the same for bridge CNIs (the host veth is a bridge port, and the route to the
//! pod points at the bridge) and routed CNIs (`/32` route via the host veth), needs no ARP or
//! neighbour entry (so it works at startup), and ignores namespaces whose veths lead elsewhere:
//! `/run/netns` may hold namespaces of other node namespaces, and the calling namespace itself.
//!
//! Robustness: a namespace that vanishes while it is scanned (its file is gone, or is no longer
//! a namespace mount) is skipped silently; any other problem with one namespace is logged as a
//! warning and the scan goes on. Only failures in the calling namespace itself are errors.
//! An address found on two different host veths (e.g. a sandbox being torn down while its
//! replacement comes up) is left out of [`learn`]'s map with a warning: an unbound endpoint is
//! merely not checked, a wrongly bound one would lose its traffic.
//!
//! Cost: one short-lived thread per call, and per namespace one `setns` and three or four small
//! netlink round trips (well under a millisecond), plus a link dump of the calling namespace.
//! [`learn`] blocks for that long; [`learn_async`] runs it on its own thread.
//!
//! Needs `CAP_SYS_ADMIN` (`setns`) and read access to the namespace files.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};
use rtnetlink::packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use tracing::{debug, warn};

/// Where `ip netns`, containerd and CRI-O keep their network namespace files (`/var/run/netns`
/// is usually a symlink to it).
pub const NETNS_DIR: &str = "/run/netns";

/// The network namespace of the calling thread.
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// How long to wait for a netlink answer before giving up on a namespace.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times a dump the kernel flagged as inconsistent (`NLM_F_DUMP_INTR`) is retried.
const DUMP_ATTEMPTS: u32 = 5;

/// A veth pair with its pod side in a scanned namespace and its host side in the calling one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVeth {
    /// The namespace file the pod side was found through.
    pub netns: PathBuf,
    /// Ifindex of the pod-side veth, in the pod's namespace.
    pub pod_ifindex: u32,
    /// Ifindex of the host-side veth, in the calling namespace (what the TC programs see).
    pub host_ifindex: u32,
    /// The pod-side veth's addresses (sorted, without link-local, loopback, DAD-failed ones);
    /// empty if the CNI has not configured any yet.
    pub addresses: Vec<IpAddr>,
}

/// Maps every local pod address to the ifindex (in the calling thread's network namespace) of
/// the host veth that carries it, by scanning the network namespace files in `netns_dirs` (see
/// the [module documentation](self)). Missing directories are skipped.
///
/// Blocks for the duration of the scan (it runs on a thread of its own, so the calling
/// thread's namespace is never changed); from async code use [`learn_async`].
pub fn learn<P: AsRef<Path>>(netns_dirs: &[P]) -> anyhow::Result<BTreeMap<IpAddr, u32>> {
    Ok(address_map(&scan(netns_dirs)?))
}

/// [`learn`] without blocking the runtime: the calling namespace is the one of the thread that
/// polls this future first (every thread of the agent is in the node's namespace), and the scan
/// runs on a dedicated thread.
pub async fn learn_async(netns_dirs: Vec<PathBuf>) -> anyhow::Result<BTreeMap<IpAddr, u32>> {
    let home = open_own_netns()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("npc-pod-veths".into())
        .spawn(move || {
            let _ = tx.send(scan_on_this_thread(&home, &netns_dirs).map(|v| address_map(&v)));
        })
        .context("failed to start the pod veth scan thread")?;
    rx.await
        .map_err(|_| anyhow!("the pod veth scan thread panicked"))?
}

/// The veth pairs from the namespaces in `netns_dirs` to the calling thread's namespace, in
/// the order the namespaces were scanned (directories in order, files by name). Includes veths
/// without addresses: every [`PodVeth::host_ifindex`] is a veth that belongs to a pod.
pub fn scan<P: AsRef<Path>>(netns_dirs: &[P]) -> anyhow::Result<Vec<PodVeth>> {
    let home = open_own_netns()?;
    let dirs: Vec<PathBuf> = netns_dirs.iter().map(|d| d.as_ref().to_owned()).collect();
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("npc-pod-veths".into())
            .spawn_scoped(s, || scan_on_this_thread(&home, &dirs))
            .context("failed to start the pod veth scan thread")?
            .join()
            .map_err(|_| anyhow!("the pod veth scan thread panicked"))?
    })
}

/// The inode number of the calling thread's network namespace (what `ip netns identify` and
/// `stat -L /run/netns/X` compare).
pub fn own_netns_ino() -> io::Result<u64> {
    Ok(std::fs::metadata(OWN_NETNS)?.ino())
}

/// Folds scanned veths into address -> host ifindex, leaving out (with a warning) addresses
/// found behind more than one host veth.
fn address_map(veths: &[PodVeth]) -> BTreeMap<IpAddr, u32> {
    let mut seen: BTreeMap<IpAddr, BTreeSet<u32>> = BTreeMap::new();
    for veth in veths {
        for address in &veth.addresses {
            seen.entry(*address).or_default().insert(veth.host_ifindex);
        }
    }
    seen.into_iter()
        .filter_map(|(address, ifindexes)| {
            if ifindexes.len() == 1 {
                ifindexes.first().map(|ifindex| (address, *ifindex))
            } else {
                warn!(
                    %address,
                    ?ifindexes,
                    "pod address found behind several host veths; leaving it unbound"
                );
                None
            }
        })
        .collect()
}

fn open_own_netns() -> anyhow::Result<File> {
    File::open(OWN_NETNS).with_context(|| format!("failed to open {OWN_NETNS}"))
}

/// A namespace file's identity: (device, inode) of the nsfs inode.
type NsId = (u64, u64);

fn ns_id(file: &File) -> io::Result<NsId> {
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// Joins the network namespace `ns` on the calling thread.
fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; it changes only the calling thread, which is a
    // dedicated thread of this module.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pod-side veth whose peer claims to be in the calling namespace, to be confirmed there.
struct Candidate {
    veth: PodVeth,
    /// The id of the pod's namespace as numbered by the calling namespace.
    pod_nsid: i32,
}

/// The scan itself. Changes the calling thread's network namespace: run it only on a
/// dedicated thread that ends afterwards.
fn scan_on_this_thread(home: &File, dirs: &[PathBuf]) -> anyhow::Result<Vec<PodVeth>> {
    let home_id = ns_id(home).context("failed to stat the calling network namespace")?;
    // Threads start in the namespace of the thread that spawned them, usually the calling one.
    let here = std::fs::metadata(OWN_NETNS).map(|meta| (meta.dev(), meta.ino()));
    if here.ok() != Some(home_id) {
        enter(home).context("failed to enter the calling network namespace")?;
    }
    // Created now, the socket stays in the calling namespace while the thread moves on.
    let mut home_rtnl = Rtnl::open().context("failed to open a netlink socket")?;

    let mut seen = HashSet::from([home_id]);
    let mut candidates = Vec::new();
    for dir in dirs {
        for path in namespace_files(dir) {
            match scan_netns(&path, home, &mut home_rtnl, &mut seen) {
                Ok(found) => candidates.extend(found),
                Err(error) => warn!(
                    netns = %path.display(),
                    error = format!("{error:#}"),
                    "failed to look for pod veths in a network namespace; skipping it"
                ),
            }
        }
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }

    // Dumped last so that host veths deleted meanwhile are dropped, not reported.
    let home_links: HashMap<u32, VethLink> = home_rtnl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .context("failed to dump the links of the calling network namespace")?
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewLink(link) => VethLink::from_message(link),
            _ => None,
        })
        .map(|link| (link.index, link))
        .collect();
    Ok(candidates
        .into_iter()
        .filter_map(|Candidate { veth, pod_nsid }| {
            let confirmed = home_links.get(&veth.host_ifindex).is_some_and(|host| {
                host.peer_ifindex == Some(veth.pod_ifindex) && host.peer_nsid == Some(pod_nsid)
            });
            if !confirmed {
                debug!(
                    netns = %veth.netns.display(),
                    pod_ifindex = veth.pod_ifindex,
                    host_ifindex = veth.host_ifindex,
                    "host veth gone or changed during the scan; ignoring it"
                );
            }
            confirmed.then_some(veth)
        })
        .collect())
}

/// The entries of a namespace directory, sorted; a missing directory has none, an unreadable
/// one is logged.
fn namespace_files(dir: &Path) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            debug!(dir = %dir.display(), "network namespace directory does not exist");
            return Vec::new();
        }
        Err(error) => {
            warn!(
                dir = %dir.display(),
                %error,
                "failed to read a network namespace directory; skipping it"
            );
            return Vec::new();
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| match entry {
            Ok(entry) if entry.file_type().is_ok_and(|t| t.is_dir()) => None,
            Ok(entry) => Some(entry.path()),
            Err(error) => {
                warn!(dir = %dir.display(), %error, "failed to read a directory entry");
                None
            }
        })
        .collect();
    paths.sort();
    paths
}

/// Scans one namespace file: its veths whose peer is in the calling namespace, with their
/// addresses. `Ok(empty)` for files that are not (or no longer) namespaces, for namespaces
/// already seen (the calling one, or another name for a scanned one) and for namespaces with
/// no such veth.
fn scan_netns(
    path: &Path,
    home: &File,
    home_rtnl: &mut Rtnl,
    seen: &mut HashSet<NsId>,
) -> anyhow::Result<Vec<Candidate>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            debug!(netns = %path.display(), "network namespace vanished before it was scanned");
            return Ok(Vec::new());
        }
        Err(error) => return Err(error).context("failed to open it"),
    };
    if !seen.insert(ns_id(&file).context("failed to stat it")?) {
        return Ok(Vec::new());
    }
    match enter(&file) {
        Ok(()) => {}
        // A plain file: a namespace being created (`ip netns add` creates the file, then mounts
        // the namespace on it) or deleted (unmounted, not yet removed); or not a network
        // namespace at all.
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            debug!(netns = %path.display(), "not a network namespace (now); skipping it");
            return Ok(Vec::new());
        }
        Err(error) => return Err(error).context("failed to enter it"),
    }
    let mut rtnl = Rtnl::open().context("failed to open a netlink socket in it")?;

    let links = rtnl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .context("failed to dump its links")?;
    let veths: Vec<VethLink> = links
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewLink(link) => VethLink::from_message(link),
            _ => None,
        })
        .filter(|veth| veth.peer_ifindex.is_some() && veth.peer_nsid.is_some())
        .collect();
    if veths.is_empty() {
        return Ok(Vec::new());
    }
    // Asked after the link dump, which assigns ids to the namespaces of veth peers.
    let Some(home_nsid) = rtnl
        .nsid_of(home)
        .context("failed to get the id of the calling namespace")?
    else {
        // The calling namespace has no id here: no veth of this namespace leads to it.
        return Ok(Vec::new());
    };
    let veths: Vec<VethLink> = veths
        .into_iter()
        .filter(|veth| veth.peer_nsid == Some(home_nsid))
        .collect();
    if veths.is_empty() {
        return Ok(Vec::new());
    }
    let Some(pod_nsid) = home_rtnl
        .nsid_of(&file)
        .context("failed to get its id in the calling namespace")?
    else {
        // Its veths lead to the calling namespace, which should hence have an id for it; it
        // was probably deleted meanwhile.
        debug!(netns = %path.display(), "network namespace has no id in the calling one");
        return Ok(Vec::new());
    };

    let mut addresses: HashMap<u32, BTreeSet<IpAddr>> = HashMap::new();
    for message in rtnl
        .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .context("failed to dump its addresses")?
    {
        if let RouteNetlinkMessage::NewAddress(address) = message
            && let Some(ip) = pod_address(&address)
        {
            addresses
                .entry(address.header.index)
                .or_default()
                .insert(ip);
        }
    }
    Ok(veths
        .into_iter()
        .filter_map(|veth| {
            Some(Candidate {
                veth: PodVeth {
                    netns: path.to_owned(),
                    pod_ifindex: veth.index,
                    host_ifindex: veth.peer_ifindex?,
                    addresses: addresses
                        .remove(&veth.index)
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                },
                pod_nsid,
            })
        })
        .collect())
}

/// What matters of a veth: its index, and its peer's index and namespace id (`None` when the
/// peer is in the same namespace).
#[derive(Debug)]
struct VethLink {
    index: u32,
    peer_ifindex: Option<u32>,
    peer_nsid: Option<i32>,
}

impl VethLink {
    /// The veth described by an `RTM_NEWLINK` message, `None` for other links.
    fn from_message(message: &LinkMessage) -> Option<Self> {
        let mut is_veth = false;
        let mut peer_ifindex = None;
        let mut peer_nsid = None;
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::LinkInfo(infos) => {
                    is_veth |= infos
                        .iter()
                        .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Veth)));
                }
                LinkAttribute::Link(index) if *index != 0 => peer_ifindex = Some(*index),
                LinkAttribute::LinkNetNsId(id) if *id >= 0 => peer_nsid = Some(*id),
                _ => {}
            }
        }
        is_veth.then_some(Self {
            index: message.header.index,
            peer_ifindex,
            peer_nsid,
        })
    }
}

/// The address of an `RTM_NEWADDR` message if it can be a pod's (not link-local, loopback,
/// unspecified, multicast, or DAD-failed).
fn pod_address(message: &AddressMessage) -> Option<IpAddr> {
    let mut local = None;
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the same, or the peer's
            // on point-to-point links (and the only one IPv6 sends).
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            AddressAttribute::Flags(flags) if flags.contains(AddressFlags::Dadfailed) => {
                return None;
            }
            _ => {}
        }
    }
    local.or(address).filter(|ip| is_pod_ip(*ip))
}

fn is_pod_ip(ip: IpAddr) -> bool {
    !ip.is_unspecified()
        && !ip.is_loopback()
        && !ip.is_multicast()
        && match ip {
            IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_broadcast(),
            IpAddr::V6(v6) => !v6.is_unicast_link_local() && v6.to_ipv4_mapped().is_none(),
        }
}

/// A blocking rtnetlink socket of the namespace the calling thread was in when it was opened.
struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        let timeout = libc::timeval {
            tv_sec: NETLINK_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `timeout` outlives the call and its size is passed along.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// The id the socket's namespace gives the namespace `ns` (`RTM_GETNSID`), `None` if it
    /// has none.
    fn nsid_of(&mut self, ns: &File) -> anyhow::Result<Option<i32>> {
        let mut request = NsidMessage::default();
        request
            .attributes
            .push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
        let (replies, _) = self.request(RouteNetlinkMessage::GetNsId(request), false)?;
        replies
            .iter()
            .find_map(|reply| match reply {
                RouteNetlinkMessage::NewNsId(message) => {
                    message
                        .attributes
                        .iter()
                        .find_map(|attribute| match attribute {
                            NsidAttribute::Id(id) => Some((*id >= 0).then_some(*id)),
                            _ => None,
                        })
                }
                _ => None,
            })
            .context("no NETNSA_NSID in the RTM_GETNSID answer")
    }

    /// A complete dump, retried while the kernel flags it as inconsistent.
    fn dump(&mut self, request: RouteNetlinkMessage) -> anyhow::Result<Vec<RouteNetlinkMessage>> {
        for _ in 0..DUMP_ATTEMPTS {
            let (messages, interrupted) = self.request(request.clone(), true)?;
            if !interrupted {
                return Ok(messages);
            }
            debug!("netlink dump interrupted by concurrent changes; retrying");
        }
        bail!("the dump was interrupted by concurrent changes {DUMP_ATTEMPTS} times in a row")
    }

    /// Sends `request` and collects the answers: until `NLMSG_DONE` for a dump, else the first
    /// one. Also returns whether a dump was flagged `NLM_F_DUMP_INTR`.
    fn request(
        &mut self,
        request: RouteNetlinkMessage,
        dump: bool,
    ) -> anyhow::Result<(Vec<RouteNetlinkMessage>, bool)> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut message = NetlinkMessage::from(request);
        message.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        message.header.sequence_number = self.sequence;
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        self.socket
            .send_to(&buffer, &SocketAddr::new(0, 0), 0)
            .context("netlink send failed")?;

        let mut answers = Vec::new();
        let mut interrupted = false;
        loop {
            let (datagram, _) = self.socket.recv_from_full().map_err(|error| {
                if error.kind() == io::ErrorKind::WouldBlock {
                    anyhow!("no netlink answer within {NETLINK_TIMEOUT:?}")
                } else {
                    anyhow!(error).context("netlink receive failed")
                }
            })?;
            let mut offset = 0;
            while offset < datagram.len() {
                let bytes = &datagram[offset..];
                let length = NetlinkBuffer::new_checked(bytes)
                    .context("malformed netlink message")?
                    .length() as usize;
                offset += length.next_multiple_of(4);
                let message =
                    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..length]) {
                        Ok(message) => message,
                        Err(error) => {
                            warn!(%error, "skipping a netlink message that does not parse");
                            continue;
                        }
                    };
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                interrupted |= message.header.flags & NLM_F_DUMP_INTR != 0;
                match message.payload {
                    NetlinkPayload::InnerMessage(answer) => {
                        answers.push(answer);
                        if !dump {
                            return Ok((answers, false));
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok((answers, interrupted)),
                    NetlinkPayload::Error(error) if error.code.is_some() => {
                        return Err(anyhow!(error.to_io()));
                    }
                    // An acknowledgement; `request` does not ask for them.
                    NetlinkPayload::Error(_) if !dump => return Ok((answers, false)),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veth(netns: &str, host_ifindex: u32, addresses: &[&str]) -> PodVeth {
        PodVeth {
            netns: netns.into(),
            pod_ifindex: 2,
            host_ifindex,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn pod_ips() {
        for ip in ["10.0.0.1", "192.168.1.1", "fd00::1", "2001:db8::5"] {
            assert!(is_pod_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "169.254.1.1",
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "fe80::1",
            "::1",
            "::",
            "ff02::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_pod_ip(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn conflicting_addresses_are_left_out() {
        let map = address_map(&[
            veth("a", 5, &["10.0.0.1", "fd00::1"]),
            veth("b", 6, &["10.0.0.2", "10.0.0.1"]),
            veth("c", 7, &[]),
            // The same namespace reached twice (cannot happen: deduplicated) agrees with itself.
            veth("d", 8, &["10.0.0.3"]),
            veth("d", 8, &["10.0.0.3"]),
        ]);
        let expected: BTreeMap<IpAddr, u32> = [("fd00::1", 5), ("10.0.0.2", 6), ("10.0.0.3", 8)]
            .into_iter()
            .map(|(ip, ifindex)| (ip.parse().unwrap(), ifindex))
            .collect();
        assert_eq!(map, expected);
    }

    /// Neither a missing directory nor a file that is no network namespace is an error.
    #[test]
    fn missing_directories_and_plain_files() {
        let dir = std::env::temp_dir().join(format!("npc-pod-veths-unit-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("subdir")).unwrap();
        std::fs::write(dir.join("plain-file"), b"").unwrap();
        let result = learn(&[dir.as_path(), Path::new("/nonexistent/npc")]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(result.unwrap(), BTreeMap::new());
    }

    /// `/proc/self/ns` holds the calling network namespace (skipped as the calling one) and
    /// namespaces of other kinds (not network namespaces). Needs `CAP_SYS_ADMIN`, which the
    /// agent's tests have.
    #[test]
    fn own_and_other_kinds_of_namespaces_are_skipped() {
        assert!(own_netns_ino().unwrap() > 0);
        assert_eq!(scan(&["/proc/self/ns"]).unwrap(), Vec::new());
    }
}
