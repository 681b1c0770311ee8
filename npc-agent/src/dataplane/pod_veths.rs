//! Learns which host-side veth carries which local pod's addresses (anti-spoofing).
//!
//! The datapath's `endpoints` map records, per local pod IP, the ifindex of the host veth the
//! pod's packets arrive on, and `from_pod` drops a packet whose source endpoint is bound to
//! another veth. This module finds those bindings from the calling (node) network namespace
//! alone, with rtnetlink, without entering any other namespace:
//!
//! 1. A link dump (`RTM_GETLINK`) of the calling namespace lists its veths. For a veth whose
//!    peer is in another namespace the kernel reports the peer's ifindex (`IFLA_LINK`) and that
//!    namespace's id *as numbered by the calling namespace* (`IFLA_LINK_NETNSID`, assigned by
//!    the kernel during the dump if the namespace had none yet). A veth whose peer is in the
//!    same namespace has no `IFLA_LINK_NETNSID` and is skipped.
//! 2. For each distinct peer namespace id, an address dump of *that* namespace, asked from
//!    the calling one: `RTM_GETADDR` carrying `IFA_TARGET_NETNSID` (Linux >= 4.20), once for
//!    IPv4 and once for IPv6. The pod-side veth's addresses (except link-local, loopback and
//!    DAD-failed ones) map to the host-side ifindex.
//! 3. Then a link dump of that namespace (`RTM_GETLINK` carrying `IFLA_TARGET_NETNSID`)
//!    confirms each pair from the pod's side: the link with the peer's ifindex is a veth whose
//!    own `IFLA_LINK` is the host veth and whose `IFLA_LINK_NETNSID` is the calling namespace's
//!    id for itself. Namespace ids are reused (the lowest free one) once a namespace is gone,
//!    so an id from step 1 may name another namespace by step 2; that namespace's veth cannot
//!    point back at a host veth of the vanished one (which went with it), so the confirmation,
//!    made after the address dump, rejects the stale id. Ifindexes are per namespace and small
//!    (a pod's `eth0` is usually 2), so the ids are what keeps a host veth from being paired
//!    with the pod of another node namespace on the same machine (nested clusters, the lab).
//!
//! This works the same for bridge CNIs (the host veth is a bridge port, and the route to the
//! pod points at the bridge) and routed CNIs (`/32` route via the host veth), needs no ARP or
//! neighbour entry (so it works at startup), finds pod namespaces whether or not a runtime
//! bind-mounted them anywhere (`/run/netns`), and ignores veths that lead elsewhere.
//!
//! Kernel details this relies on (read in the sources of Linux 6.x, and checked by the tests):
//! - `IFA_TARGET_NETNSID` in an address dump is honoured only on a socket with strict
//!   checking (`NETLINK_GET_STRICT_CHK`, Linux >= 4.20); without it the IPv4 and IPv6 dumps
//!   silently ignore the attribute and answer for the calling namespace. So the socket turns
//!   strict checking on (failing loudly on older kernels), and every answer must carry the
//!   target id back (`IFA_TARGET_NETNSID` / `IFLA_TARGET_NETNSID`, which the kernel adds to
//!   each message of a targeted dump): an answer without it fails the whole scan.
//! - A targeted dump the kernel refuses ends with `NLMSG_DONE` carrying the negative errno
//!   (not with `NLMSG_ERROR`): `EINVAL` for an id it does not know, `EACCES` without
//!   `CAP_NET_ADMIN` over the target's user namespace.
//! - Reporting a pod-side veth to the calling namespace's socket gives the calling namespace
//!   an id for itself (the veth's `IFLA_LINK_NETNSID`), which `RTM_GETNSID` with a file
//!   descriptor of the calling namespace then returns: what step 3 compares with.
//! - A namespace being destroyed keeps its id for a moment (its host veths are still listed
//!   with it) but can no longer be targeted.
//!
//! Robustness: a namespace that vanishes before or while it is scanned (a targeted dump fails
//! with `EINVAL`, and `RTM_GETNSID` answers `ENOENT` for the id) is skipped silently, and so
//! are pairs that no longer confirm; any other problem with one namespace is logged as a
//! warning and the scan goes on. Only failures in the calling namespace itself (and a kernel
//! that ignores the target) are errors. An address found on two different host veths (e.g. a
//! sandbox being torn down while its replacement comes up) is left out of [`learn`]'s map with
//! a warning: an unbound endpoint is merely not checked, a wrongly bound one would lose its
//! traffic.
//!
//! Cost: one link dump of the calling namespace, and per pod namespace three small dumps (IPv4
//! addresses, IPv6 addresses, links), all on one netlink socket; no threads, no namespace
//! switches. [`learn`] blocks for that long; [`learn_async`] runs it on tokio's blocking pool.
//!
//! Needs only `CAP_NET_ADMIN` (in the user namespace owning the pods' network namespaces: the
//! kernel checks it for every targeted request, on the socket's opener and on the caller); no
//! `CAP_SYS_ADMIN`, and no namespace file but the caller's own (`/proc/thread-self/ns/net`,
//! for `RTM_GETNSID`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};
use rtnetlink::packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use tracing::{debug, warn};

/// The network namespace of the calling thread.
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// How long to wait for a netlink answer.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times a dump the kernel flagged as inconsistent (`NLM_F_DUMP_INTR`) is retried.
const DUMP_ATTEMPTS: u32 = 5;

/// A veth pair with its host side in the calling namespace and its pod side in another one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVeth {
    /// The id the calling namespace gives the pod's network namespace (what `ip netns
    /// list-id` shows there).
    pub netnsid: i32,
    /// Ifindex of the pod-side veth, in the pod's namespace.
    pub pod_ifindex: u32,
    /// Ifindex of the host-side veth, in the calling namespace (what the TC programs see).
    pub host_ifindex: u32,
    /// The pod-side veth's addresses (sorted, without link-local, loopback, DAD-failed ones);
    /// empty if the CNI has not configured any yet.
    pub addresses: Vec<IpAddr>,
}

/// Maps every local pod address to the ifindex (in the calling thread's network namespace) of
/// the host veth that carries it (see the [module documentation](self)).
///
/// Blocks for the duration of the scan; from async code use [`learn_async`].
pub fn learn() -> anyhow::Result<BTreeMap<IpAddr, u32>> {
    Ok(address_map(&scan()?))
}

/// [`learn`] without blocking the runtime: the calling namespace is the one of the thread that
/// polls this future first (its netlink socket is opened there), and the scan runs on tokio's
/// blocking pool.
pub async fn learn_async() -> anyhow::Result<BTreeMap<IpAddr, u32>> {
    let scanner = Scanner::open()?;
    tokio::task::spawn_blocking(move || scanner.scan().map(|veths| address_map(&veths)))
        .await
        .map_err(|_| anyhow!("the pod veth scan panicked"))?
}

/// The confirmed veth pairs from the calling thread's namespace to other namespaces, ordered
/// by namespace id, then host ifindex. Includes veths without addresses: every
/// [`PodVeth::host_ifindex`] is a veth that leads into another namespace.
pub fn scan() -> anyhow::Result<Vec<PodVeth>> {
    Scanner::open()?.scan()
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

/// A netlink socket of the calling namespace, and that namespace's file (to ask the kernel for
/// the id the namespace gives itself).
struct Scanner {
    rtnl: Rtnl,
    own_netns: File,
}

/// Why one pod namespace could not be scanned.
enum PeerError {
    /// The namespace is gone (its id is no longer assigned).
    Gone,
    /// Anything else: worth a warning, the scan goes on.
    Failed(anyhow::Error),
    /// A problem of the calling namespace or of the kernel: the scan fails.
    Fatal(anyhow::Error),
}

impl Scanner {
    fn open() -> anyhow::Result<Self> {
        Ok(Self {
            rtnl: Rtnl::open().context("failed to open a netlink socket")?,
            own_netns: File::open(OWN_NETNS)
                .with_context(|| format!("failed to open {OWN_NETNS}"))?,
        })
    }

    fn scan(mut self) -> anyhow::Result<Vec<PodVeth>> {
        let mut by_nsid: BTreeMap<i32, Vec<VethLink>> = BTreeMap::new();
        for veth in self
            .rtnl
            .links(None)
            .context("failed to dump the links of the calling network namespace")?
        {
            if let (Some(_), Some(nsid)) = (veth.peer_ifindex, veth.peer_nsid) {
                by_nsid.entry(nsid).or_default().push(veth);
            }
        }
        // The id the calling namespace gives itself: the pod-side veths' IFLA_LINK_NETNSID as
        // reported to this socket. Asked once, after the first targeted link dump (which makes
        // the kernel assign it if needed).
        let mut own_nsid = None;
        let mut found = Vec::new();
        for (nsid, host_veths) in by_nsid {
            match self.scan_peer(nsid, &host_veths, &mut own_nsid) {
                Ok(veths) => found.extend(veths),
                Err(PeerError::Gone) => {
                    debug!(
                        nsid,
                        "network namespace vanished during the scan; skipping it"
                    );
                }
                Err(PeerError::Failed(error)) => warn!(
                    nsid,
                    error = format!("{error:#}"),
                    "failed to look for pod veths in a network namespace; skipping it"
                ),
                Err(PeerError::Fatal(error)) => return Err(error),
            }
        }
        Ok(found)
    }

    /// The confirmed pairs between `host_veths` (whose peers are in the namespace with id
    /// `nsid`) and that namespace.
    fn scan_peer(
        &mut self,
        nsid: i32,
        host_veths: &[VethLink],
        own_nsid: &mut Option<i32>,
    ) -> Result<Vec<PodVeth>, PeerError> {
        let mut addresses: HashMap<u32, BTreeSet<IpAddr>> = HashMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            for message in self.targeted(nsid, |rtnl| rtnl.addresses(family, nsid))? {
                if let Some(ip) = pod_address(&message) {
                    addresses
                        .entry(message.header.index)
                        .or_default()
                        .insert(ip);
                }
            }
        }
        // After the addresses: see the module documentation (stale ids).
        let pod_links: HashMap<u32, VethLink> = self
            .targeted(nsid, |rtnl| rtnl.links(Some(nsid)))?
            .into_iter()
            .map(|link| (link.index, link))
            .collect();
        if !pod_links.values().any(|pod| pod.peer_nsid.is_some()) {
            // No veth there leads out of that namespace (any more): nothing to confirm.
            return Ok(Vec::new());
        }
        let own_nsid = match *own_nsid {
            Some(id) => id,
            None => match self
                .rtnl
                .nsid_of(&self.own_netns)
                .context("failed to get the id of the calling network namespace")
                .map_err(PeerError::Fatal)?
            {
                // The targeted link dump above reported the pod-side veths' peer namespaces
                // to this socket, assigning ids where needed: if one of them is the calling
                // namespace, it has an id for itself now.
                Some(id) => *own_nsid.insert(id),
                None => return Ok(Vec::new()),
            },
        };
        Ok(host_veths
            .iter()
            .filter_map(|host| {
                let pod_ifindex = host.peer_ifindex?;
                let confirmed = pod_links.get(&pod_ifindex).is_some_and(|pod| {
                    pod.peer_ifindex == Some(host.index) && pod.peer_nsid == Some(own_nsid)
                });
                if !confirmed {
                    debug!(
                        nsid,
                        pod_ifindex,
                        host_ifindex = host.index,
                        "veth pair gone or changed during the scan; ignoring it"
                    );
                    return None;
                }
                Some(PodVeth {
                    netnsid: nsid,
                    pod_ifindex,
                    host_ifindex: host.index,
                    addresses: addresses
                        .remove(&pod_ifindex)
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                })
            })
            .collect())
    }

    /// Runs a request targeted at the namespace with id `nsid`, and sorts its failures: the
    /// kernel answers `EINVAL` for an id it does not know (the namespace is gone), which
    /// `RTM_GETNSID` for that id (`ENOENT`) tells from other invalid requests.
    fn targeted<T>(
        &mut self,
        nsid: i32,
        request: impl FnOnce(&mut Rtnl) -> anyhow::Result<T>,
    ) -> Result<T, PeerError> {
        let error = match request(&mut self.rtnl) {
            Ok(answer) => return Ok(answer),
            Err(error) => error,
        };
        if error.is::<UntargetedAnswer>() {
            return Err(PeerError::Fatal(error));
        }
        if os_error(&error) != Some(libc::EINVAL) {
            return Err(PeerError::Failed(error));
        }
        match self.rtnl.nsid_exists(nsid) {
            Ok(false) => Err(PeerError::Gone),
            Ok(true) => Err(PeerError::Failed(error)),
            Err(lookup) => Err(PeerError::Failed(
                error.context(format!("and looking up the id failed: {lookup:#}")),
            )),
        }
    }
}

/// The errno of a failed request, if the kernel answered with one.
fn os_error(error: &anyhow::Error) -> Option<i32> {
    error
        .downcast_ref::<io::Error>()
        .and_then(io::Error::raw_os_error)
}

/// An answer to a targeted dump without the target id: the kernel ignored the target.
#[derive(Debug, thiserror::Error)]
#[error(
    "the kernel answered a dump targeted at network namespace id {0} without the target id: \
     it does not support IFA_TARGET_NETNSID/IFLA_TARGET_NETNSID dumps (Linux >= 4.20 needed)"
)]
struct UntargetedAnswer(i32);

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
/// unspecified, multicast, or DAD-failed). Tentative addresses (IPv6 duplicate address
/// detection still running) count: they are the pod's unless DAD fails, and a duplicate on
/// another local veth is left out as a conflict anyway.
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

/// A blocking rtnetlink socket with strict checking, of the namespace the calling thread was
/// in when it was opened.
struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        // Without it, targeted address dumps answer for the calling namespace (see the module
        // documentation); ENOPROTOOPT before Linux 4.20.
        socket.set_netlink_get_strict_chk(true).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("NETLINK_GET_STRICT_CHK (Linux >= 4.20 needed): {error}"),
            )
        })?;
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

    /// The veths of the socket's namespace, or of the namespace with id `target` in it
    /// (`IFLA_TARGET_NETNSID`, which netlink-packet-route calls `IFLA_IF_NETNSID`, its older
    /// name: same number).
    fn links(&mut self, target: Option<i32>) -> anyhow::Result<Vec<VethLink>> {
        let mut request = LinkMessage::default();
        request
            .attributes
            .extend(target.map(LinkAttribute::IfNetnsId));
        let mut veths = Vec::new();
        for answer in self.dump(RouteNetlinkMessage::GetLink(request))? {
            let RouteNetlinkMessage::NewLink(link) = answer else {
                continue;
            };
            if let Some(target) = target
                && !link
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfNetnsId(id) if *id == target))
            {
                return Err(UntargetedAnswer(target).into());
            }
            veths.extend(VethLink::from_message(&link));
        }
        Ok(veths)
    }

    /// The `family` addresses of the namespace with id `target` (`IFA_TARGET_NETNSID`, which
    /// netlink-packet-route has as a typed attribute).
    fn addresses(
        &mut self,
        family: AddressFamily,
        target: i32,
    ) -> anyhow::Result<Vec<AddressMessage>> {
        let mut request = AddressMessage::default();
        request.header.family = family;
        request
            .attributes
            .push(AddressAttribute::TargetNetNsId(target));
        let mut addresses = Vec::new();
        for answer in self.dump(RouteNetlinkMessage::GetAddress(request))? {
            let RouteNetlinkMessage::NewAddress(address) = answer else {
                continue;
            };
            if !address
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::TargetNetNsId(id) if *id == target))
            {
                return Err(UntargetedAnswer(target).into());
            }
            addresses.push(address);
        }
        Ok(addresses)
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

    /// Whether the socket's namespace has a namespace with id `nsid` (`RTM_GETNSID` with
    /// `NETNSA_NSID`: `ENOENT` when it has none).
    fn nsid_exists(&mut self, nsid: i32) -> anyhow::Result<bool> {
        let mut request = NsidMessage::default();
        request.attributes.push(NsidAttribute::Id(nsid));
        match self.request(RouteNetlinkMessage::GetNsId(request), false) {
            Ok(_) => Ok(true),
            Err(error) if os_error(&error) == Some(libc::ENOENT) => Ok(false),
            Err(error) => Err(error),
        }
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
    /// one. Also returns whether a dump was flagged `NLM_F_DUMP_INTR`. A negative answer
    /// (`NLMSG_ERROR`, or `NLMSG_DONE` with an error code) is an [`io::Error`] with the kernel's
    /// errno.
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
                    // A dump that fails (e.g. a target id the kernel does not know) ends
                    // with NLMSG_DONE carrying the negative errno, not with NLMSG_ERROR.
                    NetlinkPayload::Done(done) if done.code < 0 => {
                        return Err(anyhow!(io::Error::from_raw_os_error(-done.code)));
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

    fn veth(netnsid: i32, host_ifindex: u32, addresses: &[&str]) -> PodVeth {
        PodVeth {
            netnsid,
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
            veth(0, 5, &["10.0.0.1", "fd00::1"]),
            veth(1, 6, &["10.0.0.2", "10.0.0.1"]),
            veth(2, 7, &[]),
            // The same pair reported twice (cannot happen) agrees with itself.
            veth(3, 8, &["10.0.0.3"]),
            veth(3, 8, &["10.0.0.3"]),
        ]);
        let expected: BTreeMap<IpAddr, u32> = [("fd00::1", 5), ("10.0.0.2", 6), ("10.0.0.3", 8)]
            .into_iter()
            .map(|(ip, ifindex)| (ip.parse().unwrap(), ifindex))
            .collect();
        assert_eq!(map, expected);
    }

    /// The calling namespace's veths lead wherever they lead (the test host may have pods);
    /// scanning never fails and every pair it reports is a veth into another namespace.
    #[test]
    fn scan_of_the_calling_namespace() {
        for veth in scan().unwrap() {
            assert!(veth.netnsid >= 0, "{veth:?}");
        }
    }

    /// An id no namespace has: targeted requests fail with EINVAL, and the id is reported as
    /// gone rather than as a failure.
    #[test]
    fn unknown_namespace_ids_are_gone() {
        let mut scanner = Scanner::open().unwrap();
        let unknown = i32::MAX - 7;
        assert!(!scanner.rtnl.nsid_exists(unknown).unwrap());
        let mut own = None;
        let result = scanner.scan_peer(
            unknown,
            &[VethLink {
                index: 1,
                peer_ifindex: Some(2),
                peer_nsid: Some(unknown),
            }],
            &mut own,
        );
        match result {
            Err(PeerError::Gone) => {}
            Ok(veths) => panic!("expected Gone, got {veths:?}"),
            Err(PeerError::Failed(e) | PeerError::Fatal(e)) => {
                panic!("expected Gone, got {e:#}")
            }
        }
    }
}
