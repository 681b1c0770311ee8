//! The denied-connection log: one structured `tracing` line (target `npc::denied`, level INFO)
//! per [`DenyEvent`] the datapath sends through its `events` ring buffer.
//!
//! The datapath reports each denied new connection once (not each retransmission), rate-limits
//! events per CPU and counts what it suppressed or could not queue; this side only has to drain
//! the ring quickly. Numbers are named with the latest [`Names`] (pods, the host, ipBlocks, the
//! policies isolating the pod).
//!
//! With `--log-format text` a line reads (peers are quoted: they contain spaces):
//!
//! ```text
//! 2025-05-04T10:00:00.000000Z  INFO npc::denied: connection denied direction=ingress protocol=tcp reason=policy_denied audit=false src=10.0.2.7:40000 dst=10.0.1.2:80 src_peer="pod shop/frontend" dst_peer="pod shop/web-1" pod=shop/web-1 policies=shop/allow-frontend,shop/deny-all ifindex=7
//! ```
//!
//! and with `--log-format json` each field is a key of its own:
//!
//! ```text
//! {"timestamp":"2025-05-04T10:00:00.000000Z","level":"INFO","message":"connection denied","direction":"ingress","protocol":"tcp","reason":"policy_denied","audit":false,"src":"10.0.2.7:40000","dst":"10.0.1.2:80","src_peer":"pod shop/frontend","dst_peer":"pod shop/web-1","pod":"shop/web-1","policies":"shop/allow-frontend,shop/deny-all","ifindex":7,"target":"npc::denied"}
//! ```
//!
//! In audit mode the connection passed; the message is then
//! `connection would be denied (audit)` and `audit=true`. The lines can be silenced with
//! `RUST_LOG=info,npc::denied=off`.
//!
//! # Source and destination
//!
//! An event describes the flow from the local pod's point of view: `local`/`remote` addresses,
//! and `local_port`/`remote_port`, the local pod's and the remote's port (taken from the
//! packet's source or destination port according to the way the packet travelled, so they are
//! the same for every packet of the flow, requests and replies alike). `direction` is whose
//! policy decided:
//!
//! - `policy_denied`: the packet opened a new connection, so its direction is the opener's: for
//!   `ingress` the remote connected to the local pod, for `egress` the local pod connected out.
//! - `policy_revoked`: the packet may be a reply, but `direction` is the direction that opened
//!   the tracked connection (the one whose policy no longer admits it).
//!
//! In both cases `src`/`dst` name the connection's client and server, not the packet that
//! triggered the event: `ingress` is `src = remote:remote_port`, `dst = local:local_port`;
//! `egress` is `src = local:local_port`, `dst = remote:remote_port`. (A direction number the
//! agent does not know, from a buggy or newer datapath, is printed as the number, with the local
//! side as `src` and the policies `unknown`.) Protocols without ports (ICMP, ICMPv6, anything
//! but TCP, UDP and SCTP) print the bare address.
use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use npc_common::{DenyEvent, Direction, DropReason, EVENT_AUDIT, ip_from_bytes, ipproto};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
    task::JoinHandle,
};

use crate::names::{EndpointName, Names, protocol_name};

/// The `tracing` target of the log lines.
pub const TARGET: &str = "npc::denied";

/// Events taken off the ring that were handled in one go before the reader yields to the other
/// tasks (the agent runs on a single-threaded runtime).
const BATCH: usize = 256;

static EVENTS_READ: AtomicU64 = AtomicU64::new(0);
static EVENTS_MALFORMED: AtomicU64 = AtomicU64::new(0);

/// Events read from the ring buffer since the agent started (malformed ones included).
pub fn events_read() -> u64 {
    EVENTS_READ.load(Ordering::Relaxed)
}

/// Ring buffer records that were not a [`DenyEvent`] (wrong size: a datapath of another
/// version), skipped without a log line.
pub fn events_malformed() -> u64 {
    EVENTS_MALFORMED.load(Ordering::Relaxed)
}

/// Spawns the reader: one log line per event, names from the latest `names`.
///
/// Must be called within a tokio runtime (an error otherwise). The task runs until the runtime
/// shuts down or it is aborted.
pub fn spawn(ring: RingBuf<MapData>, names: watch::Receiver<Arc<Names>>) -> Result<JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current()
        .context("the denied-connection log needs a tokio runtime")?;
    let _entered = runtime.enter();
    // SAFETY: the ring buffer owns its map's file descriptor: it stays open, and `as_raw_fd`
    // returns that same descriptor, for as long as the `AsyncFd` owns the ring buffer.
    let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("polling the events ring buffer")?;
    Ok(runtime.spawn(read(ring, names)))
}

/// Drains the ring whenever it becomes readable.
async fn read(mut ring: AsyncFd<RingBuf<MapData>>, names: watch::Receiver<Arc<Names>>) {
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::error!(
                    %error,
                    "polling the events ring buffer failed: denied connections are no longer logged"
                );
                return;
            }
        };
        // The names as they are now: a sync may have named the addresses of these events.
        let current = Arc::clone(&names.borrow());
        let mut handled = 0;
        let drained = loop {
            if handled == BATCH {
                break false;
            }
            let Some(item) = guard.get_inner_mut().next() else {
                break true;
            };
            handle(&item, &current);
            handled += 1;
            // Dropping `item` hands its space back to the datapath.
        };
        if drained {
            // Readiness that arrived while draining is kept (tokio clears only what it saw).
            guard.clear_ready();
        } else {
            // Still readable: let the other tasks run, then come back for the rest.
            drop(guard);
            tokio::task::yield_now().await;
        }
    }
}

/// Logs one ring buffer record.
fn handle(record: &[u8], names: &Names) {
    EVENTS_READ.fetch_add(1, Ordering::Relaxed);
    match decode(record) {
        Some(event) => DeniedConnection::new(&event, names).log(),
        None => {
            let n = EVENTS_MALFORMED.fetch_add(1, Ordering::Relaxed) + 1;
            // The first, then ever more rarely: a version mismatch would repeat on every event.
            if n.is_power_of_two() {
                tracing::warn!(
                    len = record.len(),
                    expected = size_of::<DenyEvent>(),
                    malformed = n,
                    "skipping an events ring buffer record of the wrong size"
                );
            }
        }
    }
}

/// The event in a ring buffer record, if the record has a [`DenyEvent`]'s size.
pub fn decode(record: &[u8]) -> Option<DenyEvent> {
    if record.len() != size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: the record has the size of a `DenyEvent`, a `repr(C)` struct of integers without
    // padding (`assert_layout!`), for which every bit pattern is valid; the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<DenyEvent>()) })
}

/// A denied (or, in audit mode, would-be-denied) connection, decoded and named: the fields of
/// its log line (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedConnection {
    /// `ingress` or `egress`: whose policy decided (or the number, if unknown).
    pub direction: Cow<'static, str>,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`, or the protocol number.
    pub protocol: Cow<'static, str>,
    /// `policy_denied`, `policy_revoked` ([`DropReason::as_str`]), or the number.
    pub reason: Cow<'static, str>,
    /// Audit mode: the connection passed.
    pub audit: bool,
    /// The connection's client: `ip:port`, `[ipv6]:port`, or the bare address without ports.
    pub src: String,
    /// The connection's server.
    pub dst: String,
    /// Who the client is: `pod ns/name`, `host`, `ipBlock ...`, `world`, or `unknown`.
    pub src_peer: String,
    /// Who the server is.
    pub dst_peer: String,
    /// The local pod whose policy decided (`ns/name`, or `unknown`).
    pub pod: String,
    /// The NetworkPolicies isolating that pod in that direction, comma-separated (`none` if
    /// none does, `unknown` if the direction is unknown).
    pub policies: String,
    /// The interface the packet was seen on.
    pub ifindex: u32,
}

impl DeniedConnection {
    /// Decodes `event` and names its numbers with `names`. Never fails: numbers the agent does
    /// not know are printed as numbers.
    pub fn new(event: &DenyEvent, names: &Names) -> DeniedConnection {
        let direction = Direction::from_u8(event.direction);
        let local_ip = ip_from_bytes(event.local);
        let remote_ip = ip_from_bytes(event.remote);
        let ports = has_ports(event.protocol);
        let local = address(local_ip, event.local_port, ports);
        let remote = address(remote_ip, event.remote_port, ports);
        let local_peer = match names.endpoint(local_ip) {
            Some(_) => names.peer(local_ip).to_string(),
            None => UNKNOWN.to_string(),
        };
        // With no names at all (before the first sync) every address would look like the world.
        let remote_peer = if names.endpoints.is_empty() {
            UNKNOWN.to_string()
        } else {
            names.peer(remote_ip).to_string()
        };
        let pod = match names.endpoint(local_ip) {
            Some(EndpointName::Pod {
                namespace, name, ..
            }) => format!("{namespace}/{name}"),
            Some(EndpointName::Host) => "host".to_string(),
            None => UNKNOWN.to_string(),
        };
        let policies = match direction {
            Some(dir) => {
                let list = names.isolating(event.local_identity, dir);
                if list.is_empty() {
                    "none".to_string()
                } else {
                    list.join(",")
                }
            }
            None => UNKNOWN.to_string(),
        };
        let ((src, src_peer), (dst, dst_peer)) = match direction {
            Some(Direction::Ingress) => ((remote, remote_peer), (local, local_peer)),
            Some(Direction::Egress) | None => ((local, local_peer), (remote, remote_peer)),
        };
        DeniedConnection {
            direction: match direction {
                Some(dir) => Cow::Borrowed(dir.as_str()),
                None => Cow::Owned(event.direction.to_string()),
            },
            protocol: protocol_name(event.protocol),
            reason: match DropReason::from_u8(event.reason) {
                Some(reason) => Cow::Borrowed(reason.as_str()),
                None => Cow::Owned(event.reason.to_string()),
            },
            audit: event.flags & EVENT_AUDIT != 0,
            src,
            dst,
            src_peer,
            dst_peer,
            pod,
            policies,
            ifindex: event.ifindex,
        }
    }

    /// Writes the log line (target [`TARGET`], level INFO).
    pub fn log(&self) {
        // One call site per message (a message must be a literal), with the same fields.
        macro_rules! line {
            ($message:literal) => {
                tracing::info!(
                    target: TARGET,
                    direction = %self.direction,
                    protocol = %self.protocol,
                    reason = %self.reason,
                    audit = self.audit,
                    src = %self.src,
                    dst = %self.dst,
                    src_peer = self.src_peer.as_str(),
                    dst_peer = self.dst_peer.as_str(),
                    pod = %self.pod,
                    policies = %self.policies,
                    ifindex = self.ifindex,
                    $message
                )
            };
        }
        if self.audit {
            line!("connection would be denied (audit)");
        } else {
            line!("connection denied");
        }
    }
}

const UNKNOWN: &str = "unknown";

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, ipproto::TCP | ipproto::UDP | ipproto::SCTP)
}

/// `ip:port` (`[v6]:port`), or the bare address for a protocol without ports.
fn address(ip: IpAddr, port: u16, ports: bool) -> String {
    if ports {
        SocketAddr::new(ip, port).to_string()
    } else {
        ip.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use npc_common::{IDENTITY_FIRST_CIDR, IDENTITY_HOST, IDENTITY_WORLD, ip_bytes};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;
    use crate::names::Isolation;

    const WEB: u32 = 256;
    const CLIENT: u32 = 257;
    const CIDR: u32 = IDENTITY_FIRST_CIDR;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod(namespace: &str, name: &str, local: bool) -> EndpointName {
        EndpointName::Pod {
            namespace: namespace.into(),
            name: name.into(),
            node: Some(if local { "n1" } else { "n2" }.into()),
            local,
        }
    }

    /// shop/web-1 (local, v4 and v6) is isolated both ways; shop/frontend runs on another node;
    /// 192.168.1.10 is the node; 10.0.0.0/8 except 10.9.0.0/16 is an ipBlock.
    fn names() -> Names {
        let mut n = Names {
            node: Some("n1".into()),
            ..Names::default()
        };
        n.endpoints
            .insert(ip("10.0.1.2"), pod("shop", "web-1", true));
        n.endpoints
            .insert(ip("fd00::1:2"), pod("shop", "web-1", true));
        n.endpoints
            .insert(ip("10.0.2.7"), pod("shop", "frontend", false));
        n.endpoints
            .insert(ip("fd00::2:7"), pod("shop", "frontend", false));
        n.endpoints.insert(ip("192.168.1.10"), EndpointName::Host);
        n.cidrs.insert("10.0.0.0/8".parse().unwrap(), CIDR);
        n.cidrs
            .insert("10.9.0.0/16".parse().unwrap(), IDENTITY_WORLD);
        n.cidr_identities
            .insert(CIDR, vec!["10.0.0.0/8 except 10.9.0.0/16".into()]);
        n.isolating.insert(
            WEB,
            Isolation {
                ingress: vec!["shop/allow-frontend".into(), "shop/deny-all".into()],
                egress: vec!["shop/egress-dns-only".into()],
            },
        );
        n
    }

    /// A denied TCP SYN from shop/frontend:40000 to shop/web-1:80, seen at web-1's `to_pod`.
    fn ingress_tcp() -> DenyEvent {
        DenyEvent {
            timestamp_ns: 1,
            local: ip_bytes(ip("10.0.1.2")),
            remote: ip_bytes(ip("10.0.2.7")),
            local_port: 80,
            remote_port: 40000,
            local_identity: WEB,
            remote_identity: CLIENT,
            remote_cidr_identity: CIDR,
            ifindex: 7,
            protocol: ipproto::TCP,
            direction: Direction::Ingress as u8,
            reason: DropReason::PolicyDenied as u8,
            flags: 0,
        }
    }

    /// shop/web-1:41000 sending to `remote`:`port` over `protocol`, denied at its `from_pod`.
    fn egress(remote: &str, port: u16, protocol: u8) -> DenyEvent {
        DenyEvent {
            local: ip_bytes(ip("10.0.1.2")),
            remote: ip_bytes(ip(remote)),
            local_port: 41000,
            remote_port: port,
            remote_identity: IDENTITY_WORLD,
            protocol,
            direction: Direction::Egress as u8,
            ..ingress_tcp()
        }
    }

    #[test]
    fn ingress_tcp_from_a_pod() {
        let c = DeniedConnection::new(&ingress_tcp(), &names());
        assert_eq!(
            c,
            DeniedConnection {
                direction: "ingress".into(),
                protocol: "tcp".into(),
                reason: "policy_denied".into(),
                audit: false,
                src: "10.0.2.7:40000".into(),
                dst: "10.0.1.2:80".into(),
                src_peer: "pod shop/frontend".into(),
                dst_peer: "pod shop/web-1".into(),
                pod: "shop/web-1".into(),
                policies: "shop/allow-frontend,shop/deny-all".into(),
                ifindex: 7,
            }
        );
    }

    #[test]
    fn egress_udp_to_an_ip_block() {
        let c = DeniedConnection::new(&egress("10.200.0.53", 53, ipproto::UDP), &names());
        assert_eq!(c.direction, "egress");
        assert_eq!(c.protocol, "udp");
        assert_eq!(c.src, "10.0.1.2:41000", "the local pod opened it");
        assert_eq!(c.dst, "10.200.0.53:53");
        assert_eq!(c.src_peer, "pod shop/web-1");
        assert_eq!(c.dst_peer, "ipBlock 10.0.0.0/8 except 10.9.0.0/16");
        assert_eq!(c.pod, "shop/web-1");
        assert_eq!(c.policies, "shop/egress-dns-only");
    }

    #[test]
    fn egress_to_the_world_and_the_host() {
        let n = names();
        let c = DeniedConnection::new(&egress("8.8.8.8", 443, ipproto::TCP), &n);
        assert_eq!(
            (c.dst.as_str(), c.dst_peer.as_str()),
            ("8.8.8.8:443", "world")
        );
        // In an ipBlock's except: the world.
        let c = DeniedConnection::new(&egress("10.9.1.1", 443, ipproto::TCP), &n);
        assert_eq!(c.dst_peer, "world");
        let mut e = egress("192.168.1.10", 10250, ipproto::TCP);
        e.remote_identity = IDENTITY_HOST;
        let c = DeniedConnection::new(&e, &n);
        assert_eq!(c.dst_peer, "host");
    }

    #[test]
    fn icmp_has_no_ports() {
        let mut e = ingress_tcp();
        e.protocol = ipproto::ICMP;
        // Whatever the datapath stored in the port fields (the echo identifier), none is shown.
        e.local_port = 0x1234;
        e.remote_port = 0x1234;
        let c = DeniedConnection::new(&e, &names());
        assert_eq!(c.protocol, "icmp");
        assert_eq!((c.src.as_str(), c.dst.as_str()), ("10.0.2.7", "10.0.1.2"));
        let mut e = egress("fd00::2:7", 0, ipproto::ICMPV6);
        e.local = ip_bytes(ip("fd00::1:2"));
        let c = DeniedConnection::new(&e, &names());
        assert_eq!(c.protocol, "icmpv6");
        assert_eq!((c.src.as_str(), c.dst.as_str()), ("fd00::1:2", "fd00::2:7"));
        assert_eq!(c.dst_peer, "pod shop/frontend");
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let mut e = ingress_tcp();
        e.local = ip_bytes(ip("fd00::1:2"));
        e.remote = ip_bytes(ip("fd00::2:7"));
        e.protocol = ipproto::SCTP;
        let c = DeniedConnection::new(&e, &names());
        assert_eq!(c.protocol, "sctp");
        assert_eq!(c.src, "[fd00::2:7]:40000");
        assert_eq!(c.dst, "[fd00::1:2]:80");
        assert_eq!(c.src_peer, "pod shop/frontend");
        assert_eq!(c.pod, "shop/web-1");
    }

    #[test]
    fn audit_flag() {
        let mut e = ingress_tcp();
        e.flags = EVENT_AUDIT;
        let c = DeniedConnection::new(&e, &names());
        assert!(c.audit);
        assert!(!DeniedConnection::new(&ingress_tcp(), &names()).audit);
        // Unknown flag bits are not audit.
        e.flags = 0x80;
        assert!(!DeniedConnection::new(&e, &names()).audit);
    }

    #[test]
    fn revoked_connection_is_named_by_its_opener() {
        // web-1 connected out to frontend:8080 and its egress policy changed; the packet that
        // found out is frontend's reply, seen at web-1's `to_pod`. The event carries the opener
        // direction (egress) and the ports as the local pod sees them.
        let mut e = egress("10.0.2.7", 8080, ipproto::TCP);
        e.reason = DropReason::PolicyRevoked as u8;
        let c = DeniedConnection::new(&e, &names());
        assert_eq!(c.reason, "policy_revoked");
        assert_eq!(c.direction, "egress");
        assert_eq!(c.src, "10.0.1.2:41000");
        assert_eq!(c.dst, "10.0.2.7:8080");
        assert_eq!(c.src_peer, "pod shop/web-1");
        assert_eq!(c.dst_peer, "pod shop/frontend");
        assert_eq!(c.policies, "shop/egress-dns-only");
        // Revoked under ingress: frontend is still the client.
        let mut e = ingress_tcp();
        e.reason = DropReason::PolicyRevoked as u8;
        let c = DeniedConnection::new(&e, &names());
        assert_eq!(
            (c.src.as_str(), c.dst.as_str()),
            ("10.0.2.7:40000", "10.0.1.2:80")
        );
    }

    #[test]
    fn unknown_numbers_are_printed_as_numbers() {
        let mut e = ingress_tcp();
        e.direction = 9;
        e.reason = 200;
        e.protocol = 47; // GRE: no ports
        let c = DeniedConnection::new(&e, &names());
        assert_eq!(c.direction, "9");
        assert_eq!(c.reason, "200");
        assert_eq!(c.protocol, "47");
        // Unknown direction: the local side first, the policies cannot be told.
        assert_eq!((c.src.as_str(), c.dst.as_str()), ("10.0.1.2", "10.0.2.7"));
        assert_eq!(c.src_peer, "pod shop/web-1");
        assert_eq!(c.policies, "unknown");
        // A reason the datapath does not report in events, but knows: its name.
        e.reason = DropReason::SpoofedSource as u8;
        assert_eq!(DeniedConnection::new(&e, &names()).reason, "spoofed_source");
        // A stale identity isolated by nothing.
        let mut e = ingress_tcp();
        e.local_identity = 999;
        assert_eq!(DeniedConnection::new(&e, &names()).policies, "none");
        // Zeroed event: no panic.
        let c = DeniedConnection::new(&DenyEvent::default(), &names());
        assert_eq!(c.direction, "ingress");
        assert_eq!(c.protocol, "0");
        assert_eq!(c.reason, "0");
        assert_eq!(
            c.src, "::",
            "all-zero bytes are the IPv6 unspecified address"
        );
    }

    #[test]
    fn missing_names_say_unknown() {
        // Before the first sync: no names at all.
        let c = DeniedConnection::new(&ingress_tcp(), &Names::default());
        assert_eq!(c.src_peer, "unknown", "not `world`: nothing is named yet");
        assert_eq!(c.dst_peer, "unknown");
        assert_eq!(c.pod, "unknown");
        assert_eq!(c.policies, "none");
        assert_eq!(c.src, "10.0.2.7:40000");
        // Names without this local address (a pod gone since): the remote is still named.
        let mut n = names();
        n.endpoints.remove(&ip("10.0.1.2"));
        let c = DeniedConnection::new(&ingress_tcp(), &n);
        assert_eq!(c.src_peer, "pod shop/frontend");
        assert_eq!(c.dst_peer, "unknown");
        assert_eq!(c.pod, "unknown");
    }

    #[test]
    fn decode_checks_the_size() {
        let e = ingress_tcp();
        // SAFETY: `DenyEvent` is plain integers without padding.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(e) };
        assert_eq!(decode(&bytes), Some(e));
        // Unaligned.
        let mut shifted = vec![0u8; 65];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(decode(&shifted[1..]), Some(e));
        assert_eq!(decode(&bytes[..63]), None);
        assert_eq!(decode(&shifted), None);
        assert_eq!(decode(&[]), None);
    }

    #[test]
    fn handle_counts_and_skips_malformed_records() {
        let read = events_read();
        let malformed = events_malformed();
        let (lines, ()) = capture(true, || handle(&[0u8; 10], &names()));
        assert!(events_read() > read);
        assert!(events_malformed() > malformed);
        assert!(
            lines.iter().all(|l| l["target"] != TARGET),
            "no denied line: {lines:?}"
        );
    }

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Runs `f` with a subscriber writing JSON lines (configured as `main.rs` does for
    /// `--log-format json`), parsed; or text lines as JSON strings.
    fn capture<T>(json: bool, f: impl FnOnce() -> T) -> (Vec<serde_json::Value>, T) {
        let buf = Buffer::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE);
        let out = if json {
            let subscriber = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish();
            tracing::subscriber::with_default(subscriber, f)
        } else {
            tracing::subscriber::with_default(builder.finish(), f)
        };
        let text = buf.text();
        eprintln!("{text}");
        let lines = text
            .lines()
            .map(|l| {
                if json {
                    serde_json::from_str(l).unwrap()
                } else {
                    serde_json::Value::String(l.to_string())
                }
            })
            .collect();
        (lines, out)
    }

    #[test]
    fn log_line_has_every_field_as_a_json_key() {
        let (lines, ()) = capture(true, || {
            DeniedConnection::new(&ingress_tcp(), &names()).log()
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert_eq!(l["target"], "npc::denied");
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["message"], "connection denied");
        assert_eq!(l["direction"], "ingress");
        assert_eq!(l["protocol"], "tcp");
        assert_eq!(l["reason"], "policy_denied");
        assert_eq!(l["audit"], false);
        assert_eq!(l["src"], "10.0.2.7:40000");
        assert_eq!(l["dst"], "10.0.1.2:80");
        assert_eq!(l["src_peer"], "pod shop/frontend");
        assert_eq!(l["dst_peer"], "pod shop/web-1");
        assert_eq!(l["pod"], "shop/web-1");
        assert_eq!(l["policies"], "shop/allow-frontend,shop/deny-all");
        assert_eq!(l["ifindex"], 7);

        let mut e = ingress_tcp();
        e.flags = EVENT_AUDIT;
        let (lines, ()) = capture(true, || DeniedConnection::new(&e, &names()).log());
        assert_eq!(lines[0]["message"], "connection would be denied (audit)");
        assert_eq!(lines[0]["audit"], true);
    }

    #[test]
    fn log_line_reads_as_key_value_text() {
        let (lines, ()) = capture(false, || {
            DeniedConnection::new(&ingress_tcp(), &names()).log()
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = lines[0].as_str().unwrap();
        let expected = "INFO npc::denied: connection denied direction=ingress protocol=tcp \
            reason=policy_denied audit=false src=10.0.2.7:40000 dst=10.0.1.2:80 \
            src_peer=\"pod shop/frontend\" dst_peer=\"pod shop/web-1\" pod=shop/web-1 \
            policies=shop/allow-frontend,shop/deny-all ifindex=7";
        assert!(l.ends_with(expected), "{l}");
    }
}
