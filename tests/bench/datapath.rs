//! Datapath: cost per packet through BPF_PROG_TEST_RUN, next to an empty TC program loaded in
//! the same run. Scenarios are interleaved round by round (A B C ... A B C ...) so drift on a
//! shared machine hits them alike.
use std::{net::IpAddr, time::Instant};

use anyhow::Result;
use npc_agent::dataplane::PortMatch;
use npc_common::{
    Config, Direction::*, ENDPOINT_INGRESS_ISOLATED, ENDPOINT_LOCAL, EndpointInfo, IDENTITY_ANY,
    IDENTITY_FIRST_CIDR, ipproto,
};
use npc_tests::{
    datapath::{TestDatapath, ip},
    packets::*,
};

use crate::{Args, empty, stats::stats};

pub fn run(args: &Args) -> Result<()> {
    let empty = empty::EmptyProgram::load()?;

    // A client A and an ingress-isolated server B that accepts A on TCP 80, plus
    // `extra` filler identities with policy entries, endpoints and CIDRs so lookups run in
    // populated maps.
    let mut t = TestDatapath::new(Config {
        events_per_sec: 100,
        ..Config::default()
    });
    let (a, b, a6, b6) = (ip("10.0.1.1"), ip("10.0.1.2"), ip("fd00::1"), ip("fd00::2"));
    for (addr, id, flags) in [
        (a, 256, 0),
        (a6, 256, 0),
        (b, 257, ENDPOINT_INGRESS_ISOLATED),
        (b6, 257, ENDPOINT_INGRESS_ISOLATED),
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
    t.dp.maps.allow(257, 256, Ingress, tcp80, 1)?;
    let fill = 10_000u32;
    for i in 0..fill {
        let id = 1000 + i;
        let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a64_0000 + i));
        t.dp.maps.set_endpoint(
            addr,
            EndpointInfo {
                identity: id,
                flags: 0,
                ifindex: 0,
                generation: 1,
            },
        )?;
        t.dp.maps.allow(
            257,
            id,
            Ingress,
            PortMatch::Range {
                protocol: ipproto::TCP,
                port: 1000,
                end_port: 1099,
            },
            2,
        )?;
        t.dp.maps.set_cidr(
            IpAddr::V4(std::net::Ipv4Addr::from(0xc000_0000 + (i << 8))),
            24,
            IDENTITY_FIRST_CIDR + i,
        )?;
    }
    t.dp.maps.allow(
        257,
        IDENTITY_ANY,
        Ingress,
        PortMatch::Range {
            protocol: ipproto::UDP,
            port: 53,
            end_port: 53,
        },
        3,
    )?;

    // Established flows (conntrack hits), v4 and v6.
    let est4 = tcp(a, 40000, b, 80, ACK);
    let est6 = tcp(a6, 40000, b6, 80, ACK);
    for syn in [tcp(a, 40000, b, 80, SYN), tcp(a6, 40000, b6, 80, SYN)] {
        t.run(Ingress, &syn);
    }
    // A denied new flow: the full lookup chain (pod identity, CIDR, ANY), counters, event check.
    let denied = tcp(a, 40000, b, 8080, SYN);

    let scenarios = [
        "empty TC program",
        "established v4 (conntrack hit)",
        "established v6 (conntrack hit)",
        "new flow denied (3 policy lookups)",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len() + 1];
    let mut next_port = 1u16;
    let start = Instant::now();
    for _ in 0..args.rounds {
        samples[0].push(empty.time(&est4, args.repeat));
        samples[1].push(t.time(Ingress, &est4, args.repeat));
        samples[2].push(t.time(Ingress, &est6, args.repeat));
        samples[3].push(t.time(Ingress, &denied, args.repeat));
        // New flows allowed, with their conntrack insert: distinct packets, one run each.
        let mut total = 0.0;
        let n = 2000;
        for _ in 0..n {
            next_port = next_port.wrapping_add(1).max(1);
            total += t.time(Ingress, &tcp(a, next_port, b, 80, SYN), 1);
        }
        samples[scenarios.len()].push(total / f64::from(n));
        // Forget them so every round inserts into a table of the same size.
        t.dp.maps.gc_conntrack(u64::MAX)?;
        for syn in [tcp(a, 40000, b, 80, SYN), tcp(a6, 40000, b6, 80, SYN)] {
            t.run(Ingress, &syn);
        }
    }
    let names: Vec<&str> = scenarios
        .iter()
        .copied()
        .chain(["new flow allowed (+conntrack insert, repeat=1)"])
        .collect();
    let (empty_median, _, _) = stats(samples[0].clone());
    println!(
        "datapath, BPF_PROG_TEST_RUN, {} rounds x {} repeats, {} filler identities/endpoints/CIDRs",
        args.rounds, args.repeat, fill
    );
    println!("(shared 2-core machine: expect +-20% between runs)");
    println!(
        "{:<48} {:>9} {:>9} {:>9} {:>8}",
        "scenario", "median ns", "min", "max", "x empty"
    );
    for (name, s) in names.iter().zip(samples) {
        let (median, min, max) = stats(s);
        println!(
            "{name:<48} {median:>9.1} {min:>9.1} {max:>9.1} {:>8.2}",
            median / empty_median
        );
    }
    println!("took {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
