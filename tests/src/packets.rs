//! Crafted packets for BPF_PROG_TEST_RUN: well-formed ones built with etherparse, and the
//! malformed ones tests need, made by editing those bytes.
use std::net::IpAddr;

use etherparse::{IpNumber, PacketBuilder, TcpHeader, UdpHeader};

pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
pub const ETH_HLEN: usize = 14;

/// TCP flags of a crafted segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tcp {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

pub const SYN: Tcp = Tcp {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const SYN_ACK: Tcp = Tcp {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
pub const ACK: Tcp = Tcp {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
pub const FIN_ACK: Tcp = Tcp {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
};
pub const RST: Tcp = Tcp {
    syn: false,
    ack: false,
    fin: false,
    rst: true,
};

/// The L4 part of a packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: Tcp,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// SCTP common header and an INIT chunk (the kernel has no SCTP: crafted only).
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP / ICMPv6 echo request or reply.
    Echo {
        id: u16,
        reply: bool,
    },
    /// Any other IP protocol, with raw bytes.
    Raw {
        protocol: u8,
        payload: Vec<u8>,
    },
}

impl L4 {
    pub fn protocol(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Sctp { .. } => 132,
            L4::Echo { .. } => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            L4::Raw { protocol, .. } => *protocol,
        }
    }

    /// The L4 header and a small payload, as bytes (checksums are not checked by the datapath).
    pub fn bytes(&self, v6: bool) -> Vec<u8> {
        match self {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = TcpHeader::new(*sport, *dport, 1000, 64240);
                h.syn = flags.syn;
                h.ack = flags.ack;
                h.fin = flags.fin;
                h.rst = flags.rst;
                h.to_bytes().to_vec()
            }
            L4::Udp { sport, dport } => {
                let mut v = UdpHeader {
                    source_port: *sport,
                    destination_port: *dport,
                    length: 12,
                    checksum: 0,
                }
                .to_bytes()
                .to_vec();
                v.extend_from_slice(b"ping");
                v
            }
            L4::Sctp { sport, dport } => {
                let mut v = Vec::new();
                v.extend_from_slice(&sport.to_be_bytes());
                v.extend_from_slice(&dport.to_be_bytes());
                v.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // verification tag
                v.extend_from_slice(&0u32.to_be_bytes()); // checksum
                // INIT chunk: type 1, flags 0, length 20, initiate tag, a_rwnd, streams, TSN.
                v.extend_from_slice(&[1, 0, 0, 20]);
                v.extend_from_slice(&[0, 0, 0, 1, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
                v
            }
            L4::Echo { id, reply } => {
                let ty = match (v6, reply) {
                    (false, false) => 8,
                    (false, true) => 0,
                    (true, false) => 128,
                    (true, true) => 129,
                };
                let mut v = vec![ty, 0, 0, 0];
                v.extend_from_slice(&id.to_be_bytes());
                v.extend_from_slice(&1u16.to_be_bytes());
                v.extend_from_slice(b"echo");
                v
            }
            L4::Raw { payload, .. } => payload.clone(),
        }
    }
}

/// An Ethernet frame carrying `src -> dst` with `l4` (both addresses of one family).
pub fn packet(src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    let v6 = src.is_ipv6();
    ip_packet(src, dst, l4.protocol(v6), &l4.bytes(v6))
}

/// An Ethernet frame with an IP header of `protocol` and `payload` after it.
pub fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(POD_MAC, GW_MAC);
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            eth.ipv4(s.octets(), d.octets(), 64)
                .write(&mut out, IpNumber(protocol), payload)
        }
        // Hop limit 255, as neighbour discovery requires (and any pod may send).
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            eth.ipv6(s.octets(), d.octets(), 255)
                .write(&mut out, IpNumber(protocol), payload)
        }
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
    .expect("writing a crafted packet");
    out
}

pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: Tcp) -> Vec<u8> {
    packet(
        src,
        dst,
        &L4::Tcp {
            sport,
            dport,
            flags,
        },
    )
}

pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    packet(src, dst, &L4::Udp { sport, dport })
}

pub fn sctp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    packet(src, dst, &L4::Sctp { sport, dport })
}

pub fn echo(src: IpAddr, dst: IpAddr, id: u16, reply: bool) -> Vec<u8> {
    packet(src, dst, &L4::Echo { id, reply })
}

/// An ICMP(v6) error from `src` to `dst` quoting `quoted` (an Ethernet frame; its IP part and
/// the first 8 bytes of its payload are quoted). `kind` is (type, code).
pub fn icmp_error(src: IpAddr, dst: IpAddr, kind: (u8, u8), quoted: &[u8]) -> Vec<u8> {
    let ip = &quoted[ETH_HLEN..];
    let ip_hlen = if src.is_ipv6() {
        40
    } else {
        usize::from(ip[0] & 0x0f) * 4
    };
    let take = (ip_hlen + 8).min(ip.len());
    let mut payload = vec![kind.0, kind.1, 0, 0, 0, 0, 0, 0];
    payload.extend_from_slice(&ip[..take]);
    let protocol = if src.is_ipv6() { 58 } else { 1 };
    ip_packet(src, dst, protocol, &payload)
}

/// Byte offset of the IPv4 flags/fragment-offset field in a frame.
const V4_FRAG_OFF: usize = ETH_HLEN + 6;

/// An IPv4 fragment of datagram `id`: `offset_units` in 8-byte units, `more` fragments follow.
/// With offset 0 the payload is `l4`'s header; later fragments carry opaque bytes.
pub fn ipv4_fragment(
    src: IpAddr,
    dst: IpAddr,
    l4: &L4,
    id: u16,
    offset_units: u16,
    more: bool,
) -> Vec<u8> {
    let mut p = if offset_units == 0 {
        packet(src, dst, l4)
    } else {
        ip_packet(src, dst, l4.protocol(false), &[0xab; 24])
    };
    p[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&id.to_be_bytes());
    let field = offset_units | if more { 0x2000 } else { 0 };
    p[V4_FRAG_OFF..V4_FRAG_OFF + 2].copy_from_slice(&field.to_be_bytes());
    p
}

/// An IPv6 packet whose payload starts with the given extension headers (each `(type, bytes)`,
/// bytes including the next-header byte, which is filled in) and then `l4`.
pub fn ipv6_with_extensions(src: IpAddr, dst: IpAddr, exts: &[(u8, Vec<u8>)], l4: &L4) -> Vec<u8> {
    let mut payload = Vec::new();
    for (i, (_, bytes)) in exts.iter().enumerate() {
        let mut b = bytes.clone();
        b[0] = exts.get(i + 1).map_or(l4.protocol(true), |(t, _)| *t);
        payload.extend_from_slice(&b);
    }
    payload.extend_from_slice(&l4.bytes(true));
    let first = exts.first().map_or(l4.protocol(true), |(t, _)| *t);
    // Built as "no next header" and patched: etherparse insists on modelling extension headers
    // it is told about, and these are raw bytes.
    let mut frame = ip_packet(src, dst, 59, &payload);
    frame[ETH_HLEN + 6] = first;
    frame
}

/// An 8-byte IPv6 hop-by-hop or destination-options header (PadN only).
pub fn ipv6_opts_header() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header: `offset_units` in 8-byte units, `more` fragments follow.
pub fn ipv6_frag_header(id: u32, offset_units: u16, more: bool) -> Vec<u8> {
    let field = (offset_units << 3) | u16::from(more);
    let mut v = vec![0, 0];
    v.extend_from_slice(&field.to_be_bytes());
    v.extend_from_slice(&id.to_be_bytes());
    v
}

/// Inserts an 802.1Q tag (VLAN 100) after the MAC addresses.
pub fn vlan_tagged(frame: &[u8]) -> Vec<u8> {
    let mut v = frame[..12].to_vec();
    v.extend_from_slice(&[0x81, 0x00, 0x00, 100]);
    v.extend_from_slice(&frame[12..]);
    v
}
