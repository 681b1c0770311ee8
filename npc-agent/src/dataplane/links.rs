//! Watches the network interfaces of the agent's network namespace through netlink.
//!
//! The agent attaches its TC programs to every veth, including veths created after it started.
//! [`watch_links`] learns about them from rtnetlink link notifications (the `RTNLGRP_LINK`
//! multicast group), never by polling:
//!
//! 1. it subscribes to the group *first*,
//! 2. then dumps the existing links (`RTM_GETLINK` with `NLM_F_DUMP`), so a link created between
//!    the two steps is reported by the dump, by a notification, or by both, but never missed;
//! 3. then yields every dumped link as [`LinkEvent::Added`], followed by the live changes.
//!
//! Semantics consumers must rely on:
//!
//! - [`LinkEvent::Added`] means "this link exists, with this name and kind" — not "this link is
//!   new". The same index is reported again whenever the kernel sends an `RTM_NEWLINK` for it
//!   (flags or MTU change, rename, enslavement, ...) or after a re-dump, so handle it
//!   idempotently, keyed by [`Link::index`] (a rename keeps the index and changes the name).
//! - [`LinkEvent::Removed`] may name a link that was never reported as added (it was created and
//!   deleted while a dump was in flight); ignore those.
//! - If the netlink socket's receive buffer overflows (`ENOBUFS`), notifications were lost: the
//!   watcher logs a warning, dumps the links again, reports every present link as `Added` and
//!   synthesizes `Removed` for every previously reported link that is gone.
//! - The stream only ends if the watcher cannot go on (the netlink socket failed, or a re-dump
//!   failed); this is logged with `tracing::error`. Call [`watch_links`] again to restart.
//!
//! Only the namespace the calling thread is in when [`watch_links`] is called is watched: the
//! netlink socket belongs to that namespace for its whole life.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures::channel::mpsc::UnboundedReceiver;
use futures::{Stream, StreamExt};
use netlink_packet_route::link::{LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use rtnetlink::{Handle, MulticastGroup};
use tracing::{debug, error, warn};

/// A network interface of the watched namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Link {
    /// The interface index (`ifindex`); the stable identity of the link.
    pub index: u32,
    /// The interface name (`IFLA_IFNAME`), e.g. `veth1a2b3c`.
    pub name: String,
    /// The link kind (`IFLA_INFO_KIND`), e.g. `"veth"`, `"dummy"`, `"bridge"`; `None` for links
    /// without one, such as `lo` or physical NICs.
    pub kind: Option<String>,
}

impl Link {
    /// Whether this link is one end of a veth pair.
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }

    /// The link described by an `RTM_NEWLINK` message, or `None` if the message is not about a
    /// network device as such (see [`is_device_message`]) or carries no name.
    fn from_message(message: &LinkMessage) -> Option<Self> {
        if !is_device_message(message) {
            return None;
        }
        let Some(name) = if_name(message) else {
            debug!(
                index = message.header.index,
                "ignoring link message without IFLA_IFNAME"
            );
            return None;
        };
        let kind = message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                }),
                _ => None,
            });
        Some(Self {
            index: message.header.index,
            name,
            kind,
        })
    }
}

/// A change of the links of the watched namespace; see the [module documentation](self) for the
/// exact semantics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The link exists (it is new, or it changed, or it is being reported again). Idempotent.
    Added(Link),
    /// The link is gone (deleted, or moved to another network namespace).
    Removed { index: u32, name: String },
}

/// Subscribes to the link notifications of the current network namespace, then dumps its
/// existing links, and yields them as [`LinkEvent::Added`] followed by the live changes.
///
/// Must be called from within a tokio runtime (it spawns the netlink connection on it). The
/// returned stream stops the watch when dropped.
pub async fn watch_links() -> anyhow::Result<impl Stream<Item = LinkEvent> + Unpin + Send + 'static>
{
    let watcher = LinkWatcher::start(RECEIVE_BUFFER_BYTES).await?;
    Ok(Box::pin(futures::stream::unfold(
        watcher,
        |mut watcher| async move {
            let event = watcher.next().await?;
            Some((event, watcher))
        },
    )))
}

/// The receive buffer requested for the notification socket. Large enough to absorb bursts of
/// pod churn on a busy node (each notification is ~1–4 KiB of buffer); overflows are still
/// handled by re-dumping.
const RECEIVE_BUFFER_BYTES: usize = 4 << 20;

/// How many times a dump the kernel flagged as inconsistent (`NLM_F_DUMP_INTR`: links were added
/// or removed while it ran) is retried before giving up.
const DUMP_ATTEMPTS: u32 = 10;

type Notifications = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// The state behind the stream [`watch_links`] returns.
struct LinkWatcher {
    /// Sends the dump requests on the subscribed socket.
    handle: Handle,
    /// The unsolicited messages of the socket: link notifications and overrun markers.
    notifications: Notifications,
    /// The task driving the netlink socket; aborted when the watcher is dropped.
    connection: tokio::task::JoinHandle<()>,
    /// Events decided but not yet yielded.
    pending: VecDeque<LinkEvent>,
    /// The links reported as present so far (index → name), to synthesize `Removed` events
    /// after a re-dump.
    known: HashMap<u32, String>,
    /// How many times notifications were lost and the links re-dumped.
    resyncs: u64,
}

impl Drop for LinkWatcher {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl LinkWatcher {
    /// Subscribes, then dumps the links into `pending`. `receive_buffer` is the `SO_RCVBUF` to
    /// request for the socket.
    async fn start(receive_buffer: usize) -> anyhow::Result<Self> {
        // Binding the socket to RTMGRP_LINK before anything is dumped is what guarantees that no
        // link is missed.
        let (mut connection, handle, notifications) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .context("failed to open a netlink socket subscribed to link notifications")?;
        // Lets `dump` see the NLMSG_DONE that ends a dump (and the NLM_F_DUMP_INTR flag it may
        // carry); the connection's handle is used for nothing else.
        connection.set_forward_done(true);
        set_receive_buffer(connection.socket_mut().socket_ref(), receive_buffer);
        let connection = tokio::spawn(connection);

        let mut watcher = Self {
            handle,
            notifications,
            connection,
            pending: VecDeque::new(),
            known: HashMap::new(),
            resyncs: 0,
        };
        let links = watcher.dump().await?;
        watcher.report_dump(links);
        Ok(watcher)
    }

    /// The next event, or `None` if the watcher cannot go on (logged).
    async fn next(&mut self) -> Option<LinkEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let Some((message, _)) = self.notifications.next().await else {
                error!("the netlink link notification socket closed; stopping the link watch");
                return None;
            };
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(message)) => {
                    if let Some(link) = Link::from_message(&message) {
                        self.known.insert(link.index, link.name.clone());
                        self.pending.push_back(LinkEvent::Added(link));
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(message)) => {
                    if is_device_message(&message) {
                        let index = message.header.index;
                        let known_name = self.known.remove(&index);
                        let name = if_name(&message).or(known_name).unwrap_or_default();
                        self.pending.push_back(LinkEvent::Removed { index, name });
                    }
                }
                NetlinkPayload::Overrun(_) => {
                    warn!(
                        "netlink receive buffer overflowed (ENOBUFS): link notifications were \
                         lost; dumping the links again"
                    );
                    if let Err(error) = self.resync().await {
                        error!(
                            error = format!("{error:#}"),
                            "failed to dump the links again; stopping the link watch"
                        );
                        return None;
                    }
                }
                NetlinkPayload::Error(message) => {
                    warn!(%message, "unexpected netlink error on the link notification socket");
                }
                other => debug!(?other, "ignoring netlink message"),
            }
        }
    }

    /// Dumps the links again after notifications were lost, and reports the differences.
    async fn resync(&mut self) -> anyhow::Result<()> {
        self.resyncs += 1;
        let links = self.dump().await?;
        self.report_dump(links);
        Ok(())
    }

    /// Queues `Removed` for the known links missing from `links`, then `Added` for all of
    /// `links`. Events still queued in the socket after the dump are applied after these, which
    /// is correct: they all happened after the subscription, and the last event about an index
    /// always describes its current state.
    fn report_dump(&mut self, links: Vec<Link>) {
        let present: HashSet<u32> = links.iter().map(|link| link.index).collect();
        let mut gone: Vec<(u32, String)> = self
            .known
            .iter()
            .filter(|(index, _)| !present.contains(index))
            .map(|(index, name)| (*index, name.clone()))
            .collect();
        gone.sort_unstable();
        for (index, name) in gone {
            self.known.remove(&index);
            self.pending.push_back(LinkEvent::Removed { index, name });
        }
        for link in links {
            self.known.insert(link.index, link.name.clone());
            self.pending.push_back(LinkEvent::Added(link));
        }
    }

    /// Dumps the links, retrying while the kernel flags the dump as inconsistent.
    async fn dump(&mut self) -> anyhow::Result<Vec<Link>> {
        for attempt in 1..=DUMP_ATTEMPTS {
            if let Some(links) = self.dump_once().await? {
                return Ok(links);
            }
            debug!(
                attempt,
                "link dump interrupted by concurrent changes; retrying"
            );
            tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
        }
        bail!("the link dump was interrupted by concurrent changes {DUMP_ATTEMPTS} times in a row")
    }

    /// One dump of the links, or `None` if the kernel flagged it as inconsistent
    /// (`NLM_F_DUMP_INTR`: a link may have been skipped).
    async fn dump_once(&mut self) -> anyhow::Result<Option<Vec<Link>>> {
        let mut request =
            NetlinkMessage::from(RouteNetlinkMessage::GetLink(LinkMessage::default()));
        request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut responses = self
            .handle
            .request(request)
            .context("failed to send the link dump request")?;
        let mut links = Vec::new();
        let mut interrupted = false;
        while let Some(response) = responses.next().await {
            interrupted |= response.header.flags & NLM_F_DUMP_INTR != 0;
            match response.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(message)) => {
                    links.extend(Link::from_message(&message));
                }
                NetlinkPayload::Done(_) => return Ok((!interrupted).then_some(links)),
                NetlinkPayload::Error(message) => {
                    return Err(anyhow!(message.to_io()).context("the link dump failed"));
                }
                other => debug!(?other, "ignoring unexpected message in the link dump"),
            }
        }
        // The response channel closes without NLMSG_DONE only if the connection died.
        bail!("the netlink connection closed during the link dump")
    }
}

/// Whether a link message is about a network device as such. The bridge driver also sends
/// `RTM_NEWLINK`/`RTM_DELLINK` with family `AF_BRIDGE` to the link group when a port joins or
/// leaves a bridge (e.g. a pod's host-side veth with the bridge CNI); that `RTM_DELLINK` does not
/// mean the device is gone.
fn is_device_message(message: &LinkMessage) -> bool {
    message.header.interface_family == AddressFamily::Unspec
}

fn if_name(message: &LinkMessage) -> Option<String> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
}

/// Requests `bytes` of receive buffer: `SO_RCVBUFFORCE` ignores `net.core.rmem_max` but needs
/// `CAP_NET_ADMIN` (which the agent has anyway); `SO_RCVBUF` is capped by `rmem_max`. Best
/// effort: a small buffer only means more overflows, which are handled.
fn set_receive_buffer(socket: &impl AsRawFd, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: `value` is a c_int that outlives the call, and its size is passed along.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result == 0 {
            return;
        }
    }
    warn!(
        bytes,
        error = %std::io::Error::last_os_error(),
        "failed to set the receive buffer of the link notification socket"
    );
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    use futures::TryStreamExt as _;
    use rtnetlink::{LinkBridge, LinkDummy, LinkIfb, LinkUnspec, LinkVeth};

    use super::*;

    /// How long any single expected event may take to arrive.
    const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Runs `test` on a dedicated thread that first moves into a fresh, private network
    /// namespace (`unshare(CLONE_NEWNET)`), then drives a current-thread tokio runtime (so every
    /// socket and task stays on that thread, in that namespace).
    ///
    /// Cleanup, also when the test fails: the namespace has no name (nothing in /run/netns) and
    /// its only users are this thread, the sockets it opens and the `ip` processes it waits for.
    /// When the thread ends — normally or by unwinding, which drops the runtime and closes the
    /// sockets — the kernel destroys the namespace together with every link created in it. The
    /// host's interfaces are never touched: the thread refuses to go on if it is still in the
    /// process's namespace.
    fn in_fresh_netns<F, Fut>(test: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let thread = std::thread::Builder::new()
            .name("npc-linktest".into())
            .spawn(move || {
                // SAFETY: plain syscall; CLONE_NEWNET only moves the calling thread.
                let result = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(
                    result,
                    0,
                    "unshare(CLONE_NEWNET) failed (these tests need CAP_SYS_ADMIN): {}",
                    std::io::Error::last_os_error()
                );
                let process_netns = std::fs::read_link("/proc/self/ns/net").unwrap();
                let thread_netns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
                assert_ne!(
                    process_netns, thread_netns,
                    "the test thread is still in the process's network namespace"
                );
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    tokio::time::timeout(Duration::from_secs(60), test())
                        .await
                        .expect("the test timed out");
                });
            })
            .unwrap();
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// Creates and deletes links in the test's namespace through a netlink connection of its own.
    struct Links {
        handle: Handle,
    }

    impl Links {
        fn new() -> Self {
            let (connection, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(connection);
            Self { handle }
        }

        async fn add(&self, message: LinkMessage) {
            self.handle.link().add(message).execute().await.unwrap();
        }

        /// Adds a link that is not a veth, and returns its kind: a dummy, or an ifb if the kernel
        /// has no dummy driver (as some minimal VM kernels).
        async fn add_non_veth(&self, name: &str) -> &'static str {
            let dummy = LinkDummy::new(name).build();
            match self.handle.link().add(dummy).execute().await {
                Ok(()) => "dummy",
                Err(rtnetlink::Error::NetlinkError(error))
                    if error.raw_code() == -libc::EOPNOTSUPP =>
                {
                    eprintln!("no dummy driver in this kernel; using an ifb link instead");
                    self.add(LinkIfb::new(name).build()).await;
                    "ifb"
                }
                Err(error) => panic!("failed to add the dummy link {name}: {error}"),
            }
        }

        async fn set(&self, message: LinkMessage) {
            self.handle.link().set(message).execute().await.unwrap();
        }

        async fn del(&self, index: u32) {
            self.handle.link().del(index).execute().await.unwrap();
        }

        async fn index(&self, name: &str) -> u32 {
            let message = self
                .handle
                .link()
                .get()
                .match_name(name)
                .execute()
                .try_next()
                .await
                .unwrap()
                .unwrap();
            message.header.index
        }

        /// The links as the kernel sees them now.
        async fn dump(&self) -> HashMap<u32, String> {
            self.handle
                .link()
                .get()
                .execute()
                .map_ok(|message| (message.header.index, if_name(&message).unwrap()))
                .try_collect()
                .await
                .unwrap()
        }
    }

    /// What a consumer knows after applying the events it received, plus the events themselves.
    #[derive(Default)]
    struct Seen {
        links: HashMap<u32, Link>,
        events: Vec<LinkEvent>,
    }

    impl Seen {
        fn apply(&mut self, event: LinkEvent) {
            match &event {
                LinkEvent::Added(link) => {
                    self.links.insert(link.index, link.clone());
                }
                LinkEvent::Removed { index, .. } => {
                    self.links.remove(index);
                }
            }
            self.events.push(event);
        }

        fn named(&self, name: &str) -> Option<&Link> {
            self.links.values().find(|link| link.name == name)
        }

        fn names(&self) -> HashMap<u32, String> {
            self.links
                .iter()
                .map(|(index, link)| (*index, link.name.clone()))
                .collect()
        }

        /// Applies events from `events` until `done` holds, for at most `EVENT_TIMEOUT`.
        async fn wait(
            &mut self,
            events: &mut (impl Stream<Item = LinkEvent> + Unpin),
            what: &str,
            done: impl Fn(&Self) -> bool,
        ) {
            let result = tokio::time::timeout(EVENT_TIMEOUT, async {
                while !done(self) {
                    match events.next().await {
                        Some(event) => self.apply(event),
                        None => panic!("the link stream ended while waiting for {what}"),
                    }
                }
            })
            .await;
            assert!(
                result.is_ok(),
                "timed out waiting for {what}; events so far: {:#?}",
                self.events
            );
        }
    }

    #[test]
    fn reports_existing_links_then_live_changes() {
        in_fresh_netns(|| async {
            let links = Links::new();
            links.add(LinkVeth::new("npc-va", "npc-vb").build()).await;
            let other_kind = links.add_non_veth("npc-other").await;

            let mut events = watch_links().await.unwrap();
            let mut seen = Seen::default();
            seen.wait(&mut events, "the initial links", |seen| {
                ["lo", "npc-va", "npc-vb", "npc-other"]
                    .iter()
                    .all(|name| seen.named(name).is_some())
            })
            .await;
            for name in ["npc-va", "npc-vb"] {
                let link = seen.named(name).unwrap();
                assert_eq!(link.kind.as_deref(), Some("veth"), "{link:?}");
                assert!(link.is_veth(), "{link:?}");
            }
            let other = seen.named("npc-other").unwrap();
            assert_eq!(other.kind.as_deref(), Some(other_kind));
            assert!(!other.is_veth());
            let lo = seen.named("lo").unwrap();
            assert_eq!(lo.kind, None);
            assert!(!lo.is_veth());
            assert_eq!(seen.names(), links.dump().await);

            // A veth pair created after the subscription.
            links.add(LinkVeth::new("npc-vc", "npc-vd").build()).await;
            seen.wait(&mut events, "the new veth pair", |seen| {
                seen.named("npc-vc").is_some() && seen.named("npc-vd").is_some()
            })
            .await;
            assert!(seen.named("npc-vc").unwrap().is_veth());
            assert!(seen.named("npc-vd").unwrap().is_veth());
            let vc = seen.named("npc-vc").unwrap().index;
            let vd = seen.named("npc-vd").unwrap().index;
            assert_eq!(vc, links.index("npc-vc").await);

            // Deleting one end deletes both.
            let removed_before = seen.events.len();
            links.del(vc).await;
            seen.wait(&mut events, "the removal of the veth pair", |seen| {
                seen.named("npc-vc").is_none() && seen.named("npc-vd").is_none()
            })
            .await;
            let removed = &seen.events[removed_before..];
            for (index, name) in [(vc, "npc-vc"), (vd, "npc-vd")] {
                let expected = LinkEvent::Removed {
                    index,
                    name: name.to_string(),
                };
                assert!(removed.contains(&expected), "{removed:#?}");
            }
            assert_eq!(seen.names(), links.dump().await);
        });
    }

    /// The bridge driver sends an `AF_BRIDGE` `RTM_DELLINK` when a port leaves a bridge: the
    /// port still exists and must not be reported as removed.
    #[test]
    fn leaving_a_bridge_is_not_a_removal() {
        in_fresh_netns(|| async {
            let links = Links::new();
            links.add(LinkBridge::new("npc-br").build()).await;
            links
                .add(LinkVeth::new("npc-port", "npc-peer").build())
                .await;
            let bridge = links.index("npc-br").await;
            let port = links.index("npc-port").await;

            // A raw subscription, to check the kernel really sends the AF_BRIDGE RTM_DELLINK.
            let (connection, _raw_handle, mut raw) =
                rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).unwrap();
            tokio::spawn(connection);

            let mut events = watch_links().await.unwrap();
            let mut seen = Seen::default();
            seen.wait(&mut events, "the initial links", |seen| {
                seen.named("npc-port").is_some() && seen.named("npc-br").is_some()
            })
            .await;

            links
                .set(LinkUnspec::new_with_index(port).controller(bridge).build())
                .await;
            links
                .set(LinkUnspec::new_with_index(port).nocontroller().build())
                .await;
            // Events arrive in order: once the marker is seen, the bridge events have been too.
            links
                .add(LinkVeth::new("npc-marker", "npc-marker-peer").build())
                .await;
            seen.wait(&mut events, "the marker link", |seen| {
                seen.named("npc-marker").is_some()
            })
            .await;
            assert!(
                !seen
                    .events
                    .iter()
                    .any(|event| matches!(event, LinkEvent::Removed { .. })),
                "{:#?}",
                seen.events
            );
            assert!(seen.named("npc-port").unwrap().is_veth());

            let mut bridge_dellink = false;
            tokio::time::timeout(EVENT_TIMEOUT, async {
                while let Some((message, _)) = raw.next().await {
                    if let NetlinkPayload::InnerMessage(message) = message.payload {
                        match message {
                            RouteNetlinkMessage::DelLink(message) => {
                                bridge_dellink |= message.header.index == port
                                    && message.header.interface_family == AddressFamily::Bridge;
                            }
                            RouteNetlinkMessage::NewLink(message)
                                if if_name(&message).as_deref() == Some("npc-marker") =>
                            {
                                break;
                            }
                            _ => {}
                        }
                    }
                }
            })
            .await
            .unwrap();
            assert!(
                bridge_dellink,
                "the kernel sent no AF_BRIDGE RTM_DELLINK: this test checks nothing"
            );
        });
    }

    /// Notifications lost to a full receive buffer are recovered by a re-dump: links created
    /// meanwhile are reported, and a link deleted meanwhile is reported as removed.
    #[test]
    fn overflow_is_recovered_by_a_redump() {
        in_fresh_netns(|| async {
            let links = Links::new();
            links
                .add(LinkVeth::new("npc-gone", "npc-gone-peer").build())
                .await;

            // A tiny buffer (the kernel enforces a minimum of a few KiB) so that it overflows.
            let mut watcher = LinkWatcher::start(1).await.unwrap();
            let mut seen = Seen::default();
            {
                let mut events = Box::pin(futures::stream::unfold(&mut watcher, |watcher| async {
                    let event = watcher.next().await?;
                    Some((event, watcher))
                }));
                seen.wait(&mut events, "the initial links", |seen| {
                    seen.named("npc-gone").is_some()
                })
                .await;

                // Change the links while the runtime (hence the task reading the socket) is
                // blocked: `ip` runs in this thread's namespace since it is spawned from it. The
                // deletion comes last so that its notification is lost too.
                let mut script: String = (0..64)
                    .map(|i| format!("link add npc-v{i} type veth peer name npc-p{i}\n"))
                    .collect();
                script.push_str("link del npc-gone\n");
                let mut ip = Command::new("ip")
                    .args(["-batch", "-"])
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("failed to run ip (iproute2)");
                ip.stdin
                    .take()
                    .unwrap()
                    .write_all(script.as_bytes())
                    .unwrap();
                assert!(ip.wait().unwrap().success());

                seen.wait(
                    &mut events,
                    "the links changed during the overflow",
                    |seen| {
                        seen.named("npc-gone").is_none()
                            && seen.named("npc-gone-peer").is_none()
                            && (0..64).all(|i| {
                                seen.named(&format!("npc-v{i}")).is_some()
                                    && seen.named(&format!("npc-p{i}")).is_some()
                            })
                    },
                )
                .await;
            }
            assert!(watcher.resyncs >= 1, "the receive buffer did not overflow");
            assert_eq!(seen.names(), links.dump().await);
        });
    }
}
