//! The human form of the dump: per section a heading with its entry count, then a table with
//! aligned columns (widths from a first pass over the rows, so a section is decoded twice
//! rather than held decoded in memory).
use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr},
};

use npc_common::{IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD};

use super::{Data, Dump, Listing, Section, decode::Context};

/// Pods listed in a policy row before `+N`.
const POLICY_PODS_SHOWN: usize = 3;

pub fn write(dump: &Dump, out: &mut dyn Write) -> io::Result<()> {
    for (i, (section, data)) in dump.sections.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        match data {
            Ok(data) => write_section(&dump.ctx, *section, data, out)?,
            Err(error) => {
                writeln!(out, "== {}: unavailable ==", section.name())?;
                writeln!(out, "{error}")?;
            }
        }
    }
    Ok(())
}

fn heading(out: &mut dyn Write, section: Section, what: &str) -> io::Result<()> {
    writeln!(out, "== {}: {what} ==", section.name())
}

/// `3 entries (capacity 65536)`; `noun` is `entry/entries`, singular and plural.
fn counted<R>(l: &Listing<R>, noun: &str) -> String {
    let (one, many) = noun.split_once('/').unwrap_or((noun, noun));
    let n = l.raw.len();
    let noun = if n == 1 { one } else { many };
    match l.max_entries {
        Some(max) => format!("{n} {noun} (capacity {max})"),
        None => format!("{n} {noun}"),
    }
}

/// Writes `headers` and a row per raw entry, columns padded to their widest cell (the last
/// one unpadded), two spaces apart.
fn table<R>(
    out: &mut dyn Write,
    headers: &[&str],
    raw: &[R],
    row: impl Fn(&R) -> Vec<String>,
) -> io::Result<()> {
    if raw.is_empty() {
        return writeln!(out, "(none)");
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in raw {
        for (width, cell) in widths.iter_mut().zip(row(r)) {
            *width = (*width).max(cell.chars().count());
        }
    }
    write_row(out, &widths, headers)?;
    for r in raw {
        write_row(out, &widths, &row(r))?;
    }
    Ok(())
}

fn write_row(out: &mut dyn Write, widths: &[usize], cells: &[impl AsRef<str>]) -> io::Result<()> {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        let cell = cell.as_ref();
        if i + 1 == cells.len() {
            line.push_str(cell);
        } else {
            line.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count()) + 2;
            line.extend(std::iter::repeat_n(' ', pad));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

fn or_dash(s: Option<impl ToString>) -> String {
    s.map_or_else(|| "-".to_string(), |s| s.to_string())
}

fn flags(names: &[String]) -> String {
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

/// `256 shop {app=web}`; reserved identities by name only (`any`, `world`, `host`); the number
/// alone when the names do not know it.
fn identity(id: u32, name: Option<&str>) -> String {
    match (id, name) {
        (IDENTITY_ANY | IDENTITY_WORLD | IDENTITY_HOST, Some(name)) => name.to_string(),
        (_, Some(name)) => format!("{id} {name}"),
        (_, None) => id.to_string(),
    }
}

fn addr(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// Who the remote side of a flow is: its pod, else its identity's name.
fn peer(pod: Option<&str>, id: u32, name: Option<&str>) -> String {
    match pod {
        Some(pod) => format!("pod {pod}"),
        None => identity(id, name),
    }
}

fn pods_short(pods: &[String]) -> String {
    if pods.is_empty() {
        return "-".into();
    }
    let mut s = pods
        .iter()
        .take(POLICY_PODS_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if pods.len() > POLICY_PODS_SHOWN {
        s.push_str(&format!(" +{}", pods.len() - POLICY_PODS_SHOWN));
    }
    s
}

fn write_section(
    ctx: &Context,
    section: Section,
    data: &Data,
    out: &mut dyn Write,
) -> io::Result<()> {
    match data {
        Data::Endpoints(l) => {
            heading(out, section, &counted(l, "entry/entries"))?;
            table(
                out,
                &["IP", "OWNER", "IDENTITY", "FLAGS", "IFINDEX", "GENERATION"],
                &l.raw,
                |r| {
                    let e = ctx.endpoint(r);
                    let owner = match (&e.pod, e.host) {
                        (Some(pod), _) => format!("pod {pod}"),
                        (None, true) => "host".into(),
                        (None, false) => "-".into(),
                    };
                    let ifindex = match (e.ifindex, &e.interface) {
                        (0, _) => "-".into(),
                        (i, Some(name)) => format!("{i} ({name})"),
                        (i, None) => i.to_string(),
                    };
                    vec![
                        e.ip.to_string(),
                        owner,
                        identity(e.identity, e.identity_name.as_deref()),
                        flags(&e.flag_names),
                        ifindex,
                        e.generation.to_string(),
                    ]
                },
            )
        }
        Data::Interfaces(l) => {
            heading(out, section, &counted(l, "entry/entries"))?;
            let pods = ctx.pods_by_ifindex();
            table(out, &["IFINDEX", "NAME", "FLAGS", "PODS"], &l.raw, |r| {
                let i = ctx.interface(r, &pods);
                vec![
                    i.ifindex.to_string(),
                    or_dash(i.interface),
                    flags(&i.flag_names),
                    flags(&i.pods),
                ]
            })
        }
        Data::Identities(l) => {
            heading(out, section, &counted(l, "pod identity/pod identities"))?;
            table(
                out,
                &["IDENTITY", "NAMESPACE", "LABELS", "PODS", "ISOLATED BY"],
                &l.raw,
                |&id| {
                    let Some(i) = ctx.identity(id) else {
                        return vec![id.to_string()];
                    };
                    let labels: Vec<String> =
                        i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let mut isolated = Vec::new();
                    if !i.isolated_ingress_by.is_empty() {
                        isolated.push(format!("ingress: {}", i.isolated_ingress_by.join(",")));
                    }
                    if !i.isolated_egress_by.is_empty() {
                        isolated.push(format!("egress: {}", i.isolated_egress_by.join(",")));
                    }
                    vec![
                        id.to_string(),
                        i.namespace,
                        flags(&labels),
                        flags(&i.pods),
                        if isolated.is_empty() {
                            "-".into()
                        } else {
                            isolated.join("; ")
                        },
                    ]
                },
            )
        }
        Data::Cidrs(l) => {
            heading(out, section, &counted(l, "prefix/prefixes"))?;
            table(out, &["PREFIX", "IDENTITY", "IPBLOCKS"], &l.raw, |r| {
                let c = ctx.cidr(r);
                // The identity's name is its blocks: show them once.
                let id = if c.identity == IDENTITY_WORLD {
                    "world".to_string()
                } else {
                    c.identity.to_string()
                };
                vec![
                    c.prefix,
                    id,
                    match c.blocks {
                        Some(blocks) if !blocks.is_empty() => blocks.join("; "),
                        _ => "-".into(),
                    },
                ]
            })
        }
        Data::Policy(l) => {
            heading(out, section, &counted(l, "entry/entries"))?;
            table(
                out,
                &[
                    "LOCAL",
                    "LOCAL PODS",
                    "DIRECTION",
                    "REMOTE",
                    "PROTOCOL",
                    "PORTS",
                    "RULE",
                ],
                &l.raw,
                |r| {
                    let p = ctx.policy(r);
                    vec![
                        identity(p.local_identity, p.local_name.as_deref()),
                        p.local_pods
                            .as_deref()
                            .map_or_else(|| "-".into(), pods_short),
                        p.direction,
                        identity(p.remote_identity, p.remote_name.as_deref()),
                        p.protocol_name,
                        p.ports,
                        p.rule_name.unwrap_or_else(|| format!("rule {}", p.rule)),
                    ]
                },
            )
        }
        Data::Conntrack(l) => {
            heading(out, section, &counted(l, "flow/flows"))?;
            table(
                out,
                &[
                    "PROTO",
                    "LOCAL",
                    "POD",
                    "REMOTE",
                    "PEER",
                    "STATE",
                    "FLAGS",
                    "OPENER",
                    "AGE(s)",
                    "IDLE(s)",
                    "EXPIRES(s)",
                    "GEN",
                    "RULE",
                ],
                &l.raw,
                |r| {
                    let f = ctx.flow(r);
                    let generation = match f.endpoint_generation {
                        Some(now) if now != f.generation => format!("{} (now {now})", f.generation),
                        _ => f.generation.to_string(),
                    };
                    vec![
                        f.protocol_name,
                        addr(f.local_ip, f.local_port),
                        or_dash(f.local_pod),
                        addr(f.remote_ip, f.remote_port),
                        peer(
                            f.remote_pod.as_deref(),
                            f.remote_identity,
                            f.remote_name.as_deref(),
                        ),
                        f.state.to_string(),
                        flags(&f.flag_names),
                        f.opener,
                        f.age_secs.to_string(),
                        f.idle_secs.to_string(),
                        f.expires_in_secs.to_string(),
                        generation,
                        f.rule_name.unwrap_or_else(|| format!("rule {}", f.rule)),
                    ]
                },
            )
        }
        Data::Fragments(l) => {
            heading(out, section, &counted(l, "datagram/datagrams"))?;
            table(
                out,
                &["SRC", "DST", "ID", "PROTO", "VERDICT"],
                &l.raw,
                |r| {
                    let f = ctx.fragment(r);
                    vec![
                        f.src.to_string(),
                        f.dst.to_string(),
                        f.id.to_string(),
                        f.protocol_name,
                        match f.reason {
                            None => "allowed".into(),
                            Some(reason) => format!("dropped: {reason}"),
                        },
                    ]
                },
            )
        }
        Data::Denied(l) => {
            heading(out, section, &counted(l, "flow/flows"))?;
            table(
                out,
                &[
                    "PROTO",
                    "LOCAL",
                    "POD",
                    "REMOTE",
                    "PEER",
                    "FLAGS",
                    "SYN SEQ",
                    "GEN",
                    "LAST(s ago)",
                ],
                &l.raw,
                |r| {
                    let d = ctx.denied(r);
                    vec![
                        d.protocol_name,
                        addr(d.local_ip, d.local_port),
                        or_dash(d.local_pod),
                        addr(d.remote_ip, d.remote_port),
                        peer(
                            d.remote_pod.as_deref(),
                            d.remote_identity,
                            d.remote_name.as_deref(),
                        ),
                        flags(&d.flag_names),
                        or_dash(d.tcp_seq),
                        d.generation.to_string(),
                        d.last_secs_ago.to_string(),
                    ]
                },
            )
        }
        Data::Drops(l) => {
            heading(
                out,
                section,
                &counted(l, "nonzero counter/nonzero counters"),
            )?;
            table(
                out,
                &["REASON", "DIRECTION", "PROTOCOL", "PACKETS"],
                &l.raw,
                |r| {
                    let d = ctx.drop_cell(r);
                    vec![
                        d.reason.into(),
                        d.direction.into(),
                        d.protocol.into(),
                        d.packets.to_string(),
                    ]
                },
            )
        }
        Data::Counters(l) => {
            heading(out, section, "summed over CPUs")?;
            table(
                out,
                &["NAME", "DIRECTION", "PROTOCOL", "VALUE"],
                &l.raw,
                |r| {
                    let c = ctx.counter(r);
                    vec![
                        c.name.into(),
                        or_dash(c.direction),
                        or_dash(c.protocol),
                        c.value.to_string(),
                    ]
                },
            )
        }
        Data::Blocked(l) => {
            heading(out, section, &counted(l, "nonzero cell/nonzero cells"))?;
            table(
                out,
                &["DIRECTION", "PROTOCOL", "PORT", "FLAGS", "CONNECTIONS"],
                &l.raw,
                |r| {
                    let b = ctx.blocked(r);
                    vec![
                        b.direction,
                        b.protocol_name,
                        b.port,
                        flags(&b.flag_names),
                        b.connections.to_string(),
                    ]
                },
            )
        }
        Data::Events(l) => heading(
            out,
            section,
            &format!(
                "ring buffer of {} bytes (not read: its events belong to the agent)",
                or_dash(l.max_entries)
            ),
        ),
        Data::EventRate(l) => {
            heading(out, section, &format!("{} CPUs", l.raw.len()))?;
            table(out, &["CPU", "TOKENS", "LAST(s ago)"], &l.raw, |r| {
                let e = ctx.event_rate(r);
                vec![
                    e.cpu.to_string(),
                    format!("{:.1}", e.tokens),
                    or_dash(e.last_secs_ago),
                ]
            })
        }
        Data::Config(l) => {
            heading(out, section, "runtime switches")?;
            let Some(config) = l.raw.first() else {
                return writeln!(out, "(none)");
            };
            let c = ctx.config(config);
            let rows = [
                ("flags", format!("{:#x} {}", c.flags, flags(&c.flag_names))),
                ("audit", c.audit.to_string()),
                ("unknown endpoints", c.unknown_endpoints.into()),
                ("host traffic", c.host_traffic.into()),
                ("grandfather", c.grandfather.to_string()),
                ("events per sec", c.events_per_sec.to_string()),
                ("events burst", c.events_burst.to_string()),
            ];
            table(out, &["SETTING", "VALUE"], &rows, |(k, v)| {
                vec![k.to_string(), v.clone()]
            })
        }
    }
}
