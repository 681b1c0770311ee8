//! `deny_log` through a real ring buffer: a datapath loaded with its own pins (removed on drop),
//! a denied SYN run through `to_pod` with BPF_PROG_TEST_RUN, and the reader's log line.
//!
//! Needs root (BPF, bpffs).
use std::{
    io,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use npc_agent::{
    deny_log,
    names::{EndpointName, Isolation, Names},
};
use npc_common::{Config, Direction, ENDPOINT_INGRESS_ISOLATED, ENDPOINT_LOCAL, EndpointInfo};
use npc_tests::{
    datapath::{TestDatapath, Verdict},
    packets::{SYN, tcp},
};
use tracing_subscriber::fmt::MakeWriter;

const CLIENT: u32 = 256;
const SERVER: u32 = 257;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

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
    /// The `npc::denied` lines written so far.
    fn denied(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["target"] == deny_log::TARGET)
            .collect()
    }
}

fn pod(name: &str) -> EndpointName {
    EndpointName::Pod {
        namespace: "shop".into(),
        name: name.into(),
        node: None,
        local: true,
    }
}

/// A current-thread runtime: the reader task runs on this thread, under this thread's
/// subscriber.
#[tokio::test(flavor = "current_thread")]
async fn denied_syn_is_logged() {
    let buf = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(buf.clone())
        .json()
        .flatten_event(true)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut t = TestDatapath::new(Config::default());
    let (client, server) = ("10.0.1.1", "10.0.1.2");
    let ep = |identity, flags| EndpointInfo {
        identity,
        flags: ENDPOINT_LOCAL | flags,
        ifindex: 0,
        generation: 1,
    };
    t.dp.maps.set_endpoint(ip(client), ep(CLIENT, 0)).unwrap();
    t.dp.maps
        .set_endpoint(ip(server), ep(SERVER, ENDPOINT_INGRESS_ISOLATED))
        .unwrap();
    let ring = t.dp.maps.events.take().expect("the events ring buffer");

    let mut names = Names::default();
    names.endpoints.insert(ip(client), pod("frontend"));
    names.endpoints.insert(ip(server), pod("web-1"));
    names.isolating.insert(
        SERVER,
        Isolation {
            ingress: vec!["shop/deny-all".into()],
            egress: Vec::new(),
        },
    );
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Names::default()));
    // Names published after the reader started are the ones it uses.
    let before = deny_log::events_read();
    let reader = deny_log::spawn(ring, rx).unwrap();
    tx.send(Arc::new(names)).unwrap();

    let syn = tcp(ip(client), 40000, ip(server), 80, SYN);
    assert_eq!(t.run(Direction::Ingress, &syn), Verdict::Drop);

    let deadline = Instant::now() + Duration::from_secs(5);
    while deny_log::events_read() == before {
        assert!(Instant::now() < deadline, "no event read from the ring");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reader.abort();
    let _ = reader.await;

    let lines = buf.denied();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert_eq!(l["message"], "connection denied");
    assert_eq!(l["direction"], "ingress");
    assert_eq!(l["protocol"], "tcp");
    assert_eq!(l["reason"], "policy_denied");
    assert_eq!(l["audit"], false);
    assert_eq!(l["src"], "10.0.1.1:40000");
    assert_eq!(l["dst"], "10.0.1.2:80");
    assert_eq!(l["src_peer"], "pod shop/frontend");
    assert_eq!(l["dst_peer"], "pod shop/web-1");
    assert_eq!(l["pod"], "shop/web-1");
    assert_eq!(l["policies"], "shop/deny-all");
    assert!(l["ifindex"].is_u64(), "{l}");
    assert_eq!(deny_log::events_malformed(), 0);
}
