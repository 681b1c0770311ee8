//! The traffic itself: servers in the server pod, clients in the client pod, each a thread of
//! this process inside the pod's network namespace (see `npc_tests::lab::in_netns`), pinned to
//! a CPU of its own when asked. The forwarding work of each direction runs in softirq context on
//! the sender's CPU (veth transmit), so pinning also keeps the two directions apart.
use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use npc_tests::lab::try_in_netns;

/// Request and reply of a connection-rate transaction.
const REQUEST: [u8; 64] = [b'q'; 64];
const REPLY: [u8; 64] = [b'r'; 64];
/// Size of each write of the throughput client.
const WRITE: usize = 128 * 1024;
/// An admitted connection gets this long to connect, and each read or write this long: far
/// beyond what a healthy lab needs, short enough to fail a stuck run.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Pins the calling thread to `cpu` (no-op for `None`).
pub fn pin(cpu: Option<usize>) -> io::Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET indexes within it (checked
    // below); sched_setaffinity(0) acts on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(io::Error::other(format!("CPU {cpu} out of range")));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The two servers (connection rate, throughput) in the server pod; stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    listeners: Vec<Arc<TcpListener>>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Listens on `rate_port` and `stream_port` in `netns`; the serving threads run on `cpu`.
    pub fn start(
        netns: &str,
        rate_port: u16,
        stream_port: u16,
        cpu: Option<usize>,
    ) -> Result<Servers> {
        let mut servers = Servers {
            stop: Arc::new(AtomicBool::new(false)),
            listeners: Vec::new(),
            threads: Vec::new(),
        };
        for (port, serve) in [
            (rate_port, serve_rate as fn(TcpStream) -> io::Result<()>),
            (stream_port, serve_stream),
        ] {
            let listener = try_in_netns(netns, || TcpListener::bind(("0.0.0.0", port)))?
                .with_context(|| format!("listening on port {port} in {netns}"))?;
            let listener = Arc::new(listener);
            servers.listeners.push(listener.clone());
            let stop = servers.stop.clone();
            let thread = thread::Builder::new()
                .name(format!("bench-server-{port}"))
                .spawn(move || {
                    if let Err(e) = pin(cpu) {
                        eprintln!("server on port {port}: cannot pin to CPU {cpu:?}: {e}");
                    }
                    while !stop.load(Ordering::SeqCst) {
                        match listener.accept() {
                            // One at a time: the clients are sequential. Errors are the
                            // client's business (probes connect and leave).
                            Ok((stream, _)) => {
                                let _ = serve(stream);
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) if stop.load(Ordering::SeqCst) => {
                                let _ = e;
                                break;
                            }
                            Err(e) => {
                                eprintln!("server on port {port}: accept: {e}");
                                thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                })?;
            servers.threads.push(thread);
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for l in &self.listeners {
            // SAFETY: valid fd (we hold the listener); shutdown wakes a blocked accept().
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads the request, answers and closes (the server closes first, as HTTP/1.0 servers do, so
/// TIME_WAIT stays on the server's side and the client's ports are free again at once).
fn serve_rate(mut s: TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut req = [0u8; REQUEST.len()];
    s.read_exact(&mut req)?;
    s.write_all(&REPLY)
}

/// Counts the bytes until the client's end of stream, then sends the count back.
fn serve_stream(mut s: TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; WRITE];
    let mut total: u64 = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    s.write_all(&total.to_le_bytes())
}

/// One transaction: connect, request, reply, the server's close, close.
fn transaction(dst: SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(&REQUEST)?;
    let mut reply = Vec::with_capacity(REPLY.len());
    s.read_to_end(&mut reply)?;
    if reply != REPLY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply of {} bytes, expected {}", reply.len(), REPLY.len()),
        ));
    }
    Ok(())
}

/// Completed transactions per second from `netns` to `dst` over `dur` (one connection at a
/// time). Any failed transaction fails the measurement: the client is admitted.
pub fn connection_rate(
    netns: &str,
    dst: SocketAddr,
    dur: Duration,
    cpu: Option<usize>,
) -> Result<f64> {
    try_in_netns(netns, || -> Result<f64> {
        pin(cpu).with_context(|| format!("pinning the client to CPU {cpu:?}"))?;
        let start = Instant::now();
        let mut done = 0u64;
        while start.elapsed() < dur {
            transaction(dst).with_context(|| format!("connection {} to {dst} failed", done + 1))?;
            done += 1;
        }
        Ok(done as f64 / start.elapsed().as_secs_f64())
    })?
}

/// Gbit/s of one TCP stream from `netns` to `dst` over `dur`: bytes the server received, over
/// the time from the first write to the server's count.
pub fn throughput(netns: &str, dst: SocketAddr, dur: Duration, cpu: Option<usize>) -> Result<f64> {
    try_in_netns(netns, || -> Result<f64> {
        pin(cpu).with_context(|| format!("pinning the client to CPU {cpu:?}"))?;
        let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)
            .with_context(|| format!("connecting to {dst}"))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let buf = vec![0x5au8; WRITE];
        let start = Instant::now();
        while start.elapsed() < dur {
            s.write_all(&buf)
                .with_context(|| format!("writing to {dst}"))?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count)
            .with_context(|| format!("reading the byte count from {dst}"))?;
        let secs = start.elapsed().as_secs_f64();
        Ok(u64::from_le_bytes(count) as f64 * 8.0 / secs / 1e9)
    })?
}

/// How a connection attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Connected,
    /// No answer: the SYN (or SYN-ACK) was dropped.
    TimedOut,
    /// RST: rejected, or no listener.
    Refused,
    Failed(String),
}

/// One connect (no data) from `netns` to `dst` within `timeout`.
pub fn probe(netns: &str, dst: SocketAddr, timeout: Duration) -> Result<Probe> {
    let res = try_in_netns(netns, || TcpStream::connect_timeout(&dst, timeout))?;
    Ok(match res {
        Ok(_) => Probe::Connected,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            Probe::TimedOut
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Probe::Refused,
        Err(e) => Probe::Failed(e.to_string()),
    })
}

/// Checks that a transaction from `netns` to the rate server `dst` works.
pub fn check_transaction(netns: &str, dst: SocketAddr) -> Result<()> {
    match try_in_netns(netns, || transaction(dst))? {
        Ok(()) => Ok(()),
        Err(e) => bail!("a transaction to {dst} failed: {e}"),
    }
}
