//! Datapath: cost per packet through BPF_PROG_TEST_RUN, next to an empty TC program loaded in
//! the same run. Scenarios are interleaved round by round (A B C ... A B C ...) so drift on a
//! shared machine hits them alike. Three scales, each a freshly loaded datapath filled with
//! spread-out policy entries, endpoints and CIDRs; a last table compares the largest scale with
//! the smallest (the goal: flat, within 10%).
//!
//! Two kinds of scenario. "repeat N": one packet run N times in one BPF_PROG_TEST_RUN call, the
//! per-call overhead amortised (compared with the empty program at repeat N). "repeat=1":
//! distinct packets, one run each, because each one changes the maps (a conntrack or `denied`
//! insert, a re-check); its figure includes the kernel's per-call timer overhead, so it is
//! compared with the empty program measured the same way.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::Result;
use npc_agent::dataplane::PortMatch;
use npc_common::{
    Config, CtKey, Direction::*, ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED,
    ENDPOINT_LOCAL, EndpointInfo, IDENTITY_ANY, IDENTITY_FIRST_CIDR, capacity, ip_bytes, ipproto,
};
use npc_tests::{
    datapath::{TestDatapath, ip},
    packets::*,
};

use crate::{Args, empty::EmptyProgram, stats::stats};

/// (policy entries, endpoints) of each scale.
const SCALES: [(usize, usize); 3] = [(10, 100), (10_000, 10_000), (100_000, 100_000)];

/// What each scenario measures, in table order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Repeat,
    Once,
}

const SCENARIOS: [(&str, Kind); 11] = [
    ("empty TC program", Kind::Repeat),
    ("established v4 (conntrack hit)", Kind::Repeat),
    ("established v6 (conntrack hit)", Kind::Repeat),
    ("new flow denied, repeated SYN (verdict)", Kind::Repeat),
    ("empty TC program, repeat=1", Kind::Once),
    ("established v4, repeat=1", Kind::Once),
    ("new flow denied, first denial (+denied insert)", Kind::Once),
    ("new allowed by pod identity (+ct insert)", Kind::Once),
    ("new allowed by ANY, 3rd lookup (+ct insert)", Kind::Once),
    ("re-check after generation bump", Kind::Once),
    ("new allowed v6 by pod identity (+ct insert)", Kind::Once),
];

/// Addresses of the probed flows: clients A, C (identity 256), server B (257, isolated both
/// ways). `C` opens the flows the re-check scenario re-checks.
struct Probe {
    a: IpAddr,
    b: IpAddr,
    c: IpAddr,
    a6: IpAddr,
    b6: IpAddr,
}

const SERVER: u32 = 257;
const CLIENT: u32 = 256;
const FIRST_FILLER_IDENTITY: u32 = 1000;

pub fn run(args: &Args) -> Result<()> {
    let empty = EmptyProgram::load()?;
    let per_round = if args.quick { 300 } else { 2000 };
    println!(
        "datapath, BPF_PROG_TEST_RUN: {} rounds; repeat-N scenarios {} runs per call; repeat=1 \
         scenarios {per_round} distinct packets per round",
        args.rounds, args.repeat
    );
    let mut medians: Vec<Vec<f64>> = Vec::new();
    for &(policy, endpoints) in &SCALES {
        medians.push(run_scale(args, &empty, policy, endpoints, per_round)?);
    }
    println!();
    println!(
        "flatness: median at {} policy entries / {} endpoints over median at {} / {} (goal: \
         within 10%)",
        SCALES[2].0, SCALES[2].1, SCALES[0].0, SCALES[0].1
    );
    println!(
        "{:<48} {:>9} {:>9} {:>7}",
        "scenario", "small ns", "large ns", "ratio"
    );
    for (i, (name, _)) in SCENARIOS.iter().enumerate() {
        let (small, large) = (medians[0][i], medians[2][i]);
        println!(
            "{name:<48} {small:>9.1} {large:>9.1} {:>7.3}",
            large / small
        );
    }
    Ok(())
}

/// A small deterministic generator (xorshift64*), so every run fills the same keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Loads a datapath and fills it: the probe endpoints and policy, then filler endpoints
/// (10 pods per identity, 1 in 10 IPv6, 1 in 100 local and isolated), CIDR prefixes (one per 10
/// policy entries, IPv4 /16../28 and IPv6 /48../64) and policy entries until the `policy` map
/// holds `policy` keys: local identities (the local pods', up to 100, the server's among them)
/// x remote identities (pod and CIDR) x direction x a mix of single ports, aligned and unaligned
/// ranges (several LPM keys each), any port and any protocol.
fn fill(policy: usize, endpoints: usize) -> Result<(TestDatapath, Probe)> {
    let mut t = TestDatapath::with_options(
        Config {
            events_per_sec: 100,
            ..Config::default()
        },
        // Full-size conntrack, as the agent runs it.
        |opts| opts.conntrack_capacity = capacity::CONNTRACK,
    );
    let p = Probe {
        a: ip("10.0.1.1"),
        b: ip("10.0.1.2"),
        c: ip("10.0.1.3"),
        a6: ip("fd00::1"),
        b6: ip("fd00::2"),
    };
    let isolated = ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED;
    for (addr, id, flags) in [
        (p.a, CLIENT, 0),
        (p.c, CLIENT, 0),
        (p.a6, CLIENT, 0),
        (p.b, SERVER, isolated),
        (p.b6, SERVER, isolated),
    ] {
        let info = EndpointInfo {
            identity: id,
            flags: ENDPOINT_LOCAL | flags,
            ifindex: 0,
            generation: 1,
        };
        t.dp.maps.set_endpoint(addr, info)?;
    }
    let tcp80 = PortMatch::Range {
        protocol: ipproto::TCP,
        port: 80,
        end_port: 80,
    };
    let udp53 = PortMatch::Range {
        protocol: ipproto::UDP,
        port: 53,
        end_port: 53,
    };
    t.dp.maps.allow(SERVER, CLIENT, Ingress, tcp80, 1)?;
    t.dp.maps.allow(SERVER, IDENTITY_ANY, Ingress, udp53, 2)?;
    let mut keys = 2usize;

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let filler = endpoints.saturating_sub(5);
    let pod_identities = (filler / 10).max(1) as u32;
    let mut locals = vec![SERVER];
    for i in 0..filler as u32 {
        let id = FIRST_FILLER_IDENTITY + i % pod_identities;
        let addr = if i % 10 == 9 {
            IpAddr::V6(Ipv6Addr::from(0xfd00_0064_u128 << 96 | u128::from(i)))
        } else {
            IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + i))
        };
        let local = i % 100 == 0;
        if local && locals.len() < 100 && !locals.contains(&id) {
            locals.push(id);
        }
        let flags = if local { ENDPOINT_LOCAL | isolated } else { 0 };
        let info = EndpointInfo {
            identity: id,
            flags,
            ifindex: 0,
            generation: 1,
        };
        t.dp.maps.set_endpoint(addr, info)?;
    }

    let cidrs = (policy / 10).clamp(1, 10_000) as u32;
    for i in 0..cidrs {
        let id = IDENTITY_FIRST_CIDR + i;
        if i % 4 == 3 {
            let len = 48 + (i % 17) as u8;
            let addr = Ipv6Addr::from((0x2001_0db8_u128 << 96) | (u128::from(i) << 64));
            t.dp.maps.set_cidr(IpAddr::V6(addr), len, id)?;
        } else {
            let len = 16 + (i % 13) as u8;
            // 172.16.0.0 upwards in /16 steps (A, B, C live in 10.0.0.0/8: no CIDR covers them).
            let base = 0xac10_0000u32.wrapping_add(i << 16) & (u32::MAX << (32 - len));
            t.dp.maps
                .set_cidr(IpAddr::V4(Ipv4Addr::from(base)), len, id)?;
        }
    }

    let mut seen = HashSet::new();
    while keys < policy {
        let local = locals[rng.below(locals.len() as u64) as usize];
        let remote = if rng.below(5) == 0 {
            IDENTITY_FIRST_CIDR + rng.below(u64::from(cidrs)) as u32
        } else {
            FIRST_FILLER_IDENTITY + rng.below(u64::from(pod_identities)) as u32
        };
        let dir = if rng.below(2) == 0 { Ingress } else { Egress };
        let protocol =
            [ipproto::TCP, ipproto::TCP, ipproto::UDP, ipproto::SCTP][rng.below(4) as usize];
        let ports = match rng.below(10) {
            0..=5 => {
                let port = [80, 443, 8080, 5432, 6379, 9090, 3306, 11211][rng.below(8) as usize]
                    + rng.below(4) as u16;
                PortMatch::Range {
                    protocol,
                    port,
                    end_port: port,
                }
            }
            6 => PortMatch::Range {
                protocol,
                port: 9000,
                end_port: 9099,
            },
            7 => {
                let port = 1024 * (1 + rng.below(60) as u16);
                PortMatch::Range {
                    protocol,
                    port,
                    end_port: port + 1023,
                }
            }
            8 => PortMatch::AnyPort { protocol },
            _ => PortMatch::AnyProtocol,
        };
        for key in ports.keys(local, remote, dir) {
            if keys >= policy {
                break;
            }
            if seen.insert((key.prefix_len(), key.data())) {
                t.dp.maps.insert_policy_raw(
                    key.prefix_len(),
                    key.data(),
                    npc_common::PolicyEntry {
                        rule: 100 + keys as u32,
                        flags: 0,
                    },
                )?;
                keys += 1;
            }
        }
    }
    Ok((t, p))
}

/// Times `frames` one run each; mean ns per run.
fn once(frames: impl Iterator<Item = Vec<u8>>, mut time: impl FnMut(&[u8]) -> f64) -> f64 {
    let (mut total, mut n) = (0.0, 0u32);
    for f in frames {
        total += time(&f);
        n += 1;
    }
    total / f64::from(n)
}

fn run_scale(
    args: &Args,
    empty: &EmptyProgram,
    policy: usize,
    endpoints: usize,
    n: usize,
) -> Result<Vec<f64>> {
    let start = Instant::now();
    let (mut t, p) = fill(policy, endpoints)?;
    let filled = start.elapsed().as_secs_f64();
    let (a, b, c, a6, b6) = (p.a, p.b, p.c, p.a6, p.b6);

    let est4 = tcp(a, 40000, b, 80, ACK);
    let est6 = tcp(a6, 40000, b6, 80, ACK);
    let open_established = |t: &TestDatapath| {
        for syn in [tcp(a, 40000, b, 80, SYN), tcp(a6, 40000, b6, 80, SYN)] {
            t.run(Ingress, &syn);
        }
    };
    open_established(&t);
    // Every lookup misses (pod identity, CIDR, ANY); the `denied` entry is a hit after the
    // first run.
    let denied = tcp(a, 40000, b, 8080, SYN);
    // The flows the re-check scenario re-checks: tracked once, re-checked every round.
    let recheck_ports = 1..=n as u16;
    for port in recheck_ports.clone() {
        t.run(Ingress, &tcp(c, port, b, 80, SYN));
    }
    let recheck: Vec<Vec<u8>> = recheck_ports
        .clone()
        .map(|port| tcp(c, port, b, 80, ACK))
        .collect();
    let ports = || 1..=n as u16;

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); SCENARIOS.len()];
    let timing = Instant::now();
    // The server's policy generation, bumped once a round (it starts at 1).
    for generation in (2..).take(args.rounds) {
        samples[0].push(empty.time(&est4, args.repeat));
        samples[1].push(t.time(Ingress, &est4, args.repeat));
        samples[2].push(t.time(Ingress, &est6, args.repeat));
        samples[3].push(t.time(Ingress, &denied, args.repeat));
        samples[4].push(once(ports().map(|_| est4.clone()), |f| empty.time(f, 1)));
        samples[5].push(once(ports().map(|_| est4.clone()), |f| {
            t.time(Ingress, f, 1)
        }));
        samples[6].push(once(ports().map(|s| tcp(a, s, b, 8080, SYN)), |f| {
            t.time(Ingress, f, 1)
        }));
        samples[7].push(once(ports().map(|s| tcp(a, s, b, 80, SYN)), |f| {
            t.time(Ingress, f, 1)
        }));
        samples[8].push(once(ports().map(|s| udp(a, s, b, 53)), |f| {
            t.time(Ingress, f, 1)
        }));
        let info = EndpointInfo {
            generation,
            ..t.dp.maps.endpoint(b).expect("server endpoint")
        };
        t.dp.maps.set_endpoint(b, info)?;
        samples[9].push(once(recheck.iter().cloned(), |f| t.time(Ingress, f, 1)));
        samples[10].push(once(ports().map(|s| tcp(a6, s, b6, 80, SYN)), |f| {
            t.time(Ingress, f, 1)
        }));
        // Forget this round's new flows and denials, so every round inserts into tables of the
        // same size.
        for s in ports() {
            for (local, remote, lport, proto) in [
                (b, a, 80, ipproto::TCP),
                (b, a, 53, ipproto::UDP),
                (b6, a6, 80, ipproto::TCP),
            ] {
                let key = CtKey::new(ip_bytes(local), ip_bytes(remote), lport, s, proto);
                let _ = t.dp.maps.conntrack.remove(&key);
            }
            let key = CtKey::new(ip_bytes(b), ip_bytes(a), 8080, s, ipproto::TCP);
            let _ = t.dp.maps.denied.remove(&key);
        }
        // The probed established flows (port 40000) are untouched by the above.
    }
    let took = timing.elapsed().as_secs_f64();

    let empty_repeat = stats(samples[0].clone()).0;
    let empty_once = stats(samples[4].clone()).0;
    println!();
    println!(
        "scale: {policy} policy entries, {endpoints} endpoints ({} cidrs); filled in {filled:.1}s \
         (load + {} map writes), measured in {took:.1}s",
        (policy / 10).clamp(1, 10_000),
        policy + endpoints + (policy / 10).clamp(1, 10_000),
    );
    println!(
        "{:<48} {:>9} {:>9} {:>9} {:>8}",
        "scenario", "median ns", "min", "max", "x empty"
    );
    let mut medians = Vec::new();
    for ((name, kind), s) in SCENARIOS.iter().zip(samples) {
        let (median, min, max) = stats(s);
        let (base, label) = match kind {
            Kind::Repeat => (empty_repeat, ""),
            Kind::Once => (empty_once, " (x empty repeat=1)"),
        };
        println!(
            "{name:<48} {median:>9.1} {min:>9.1} {max:>9.1} {:>8.2}{label}",
            median / base
        );
        medians.push(median);
    }
    Ok(medians)
}
