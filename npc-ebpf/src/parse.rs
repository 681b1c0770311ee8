//! Packet parsing: Ethernet, IPv4 (options, fragments), IPv6 (extension headers), and the
//! TCP/UDP/SCTP ports or ICMP type. Reads are direct packet accesses checked against the end of
//! the data (see `read`), so a truncated packet fails the read instead of being read out of
//! bounds, and headers outside a non-linear skb's linear area are pulled in on demand.
use aya_ebpf::{EbpfContext, bindings::__sk_buff, programs::TcContext};
use npc_common::{DropReason, IpBytes, ipproto};

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

/// Headers further into the packet than this are not read (an IPv6 extension chain that long is
/// dropped as malformed).
const MAX_HEADER_OFF: usize = 1024;

/// Bytes of IPv6 extension headers (and the L4 header after them) we make linear.
const MAX_IPV6_EXT_BYTES: usize = 256;

/// Longest IPv6 extension header chain we walk before giving up.
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// TCP flags (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment (offset 0, more to come): carries the L4 header.
    First,
    /// A later fragment: no L4 header.
    Later,
}

/// An ICMP error's quoted packet, reduced to what identifies its flow.
pub struct Quoted {
    pub src: IpBytes,
    pub dst: IpBytes,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

/// An IP packet, reduced to what the verdict needs. Aligned to 8 so zeroing and copying it are
/// a few word stores, not a call to the byte-loop `memset`/`memcpy` of a BPF `core`.
///
/// Fields are ordered so no padding is needed: 56 bytes (the stack is 512 for the whole chain).
#[repr(C, align(8))]
pub struct Packet {
    pub src: IpBytes,
    pub dst: IpBytes,
    /// The L4 protocol (after IPv6 extension headers).
    pub protocol: u8,
    pub tcp_flags: u8,
    /// Host byte order. For ICMP echo both carry the identifier; 0 for portless protocols.
    pub sport: u16,
    pub dport: u16,
    pub fragment: Fragment,
    /// The protocol fragments of this datagram are recorded under: the IPv4 protocol, or the
    /// header after the IPv6 fragment header.
    pub frag_protocol: u8,
    /// IPv4 identification or IPv6 fragment identification (when `fragment != None`).
    pub frag_id: u32,
    /// TCP sequence number (host byte order; 0 for other protocols). Only a denied SYN's is
    /// used: a retransmission repeats its ISN, a new attempt on the same tuple does not.
    pub tcp_seq: u32,
    /// IPv6 hop limit (neighbour discovery must arrive with 255, MLD with 1).
    pub hop_limit: u8,
    /// The packet is an ICMP/ICMPv6 error (see `parse_quoted`).
    pub is_error: bool,
    pub v6: bool,
    /// ICMPv6 neighbour discovery or multicast listener messages: link plumbing, not policy.
    pub link_local_control: bool,
    /// Where the L4 header starts and the IP payload ends.
    pub l4_off: u16,
    pub end: u16,
}
const _: () = assert!(core::mem::size_of::<Packet>() == 56);

impl Packet {
    pub const fn empty() -> Packet {
        Packet {
            src: [0; 16],
            dst: [0; 16],
            protocol: 0,
            tcp_flags: 0,
            sport: 0,
            dport: 0,
            fragment: Fragment::None,
            frag_protocol: 0,
            frag_id: 0,
            tcp_seq: 0,
            hop_limit: 0,
            is_error: false,
            v6: false,
            link_local_control: false,
            l4_off: 0,
            end: 0,
        }
    }

    /// Whether `sport`/`dport` are real ports (policy may name them).
    #[inline(always)]
    pub fn has_ports(&self) -> bool {
        matches!(self.protocol, ipproto::TCP | ipproto::UDP | ipproto::SCTP)
    }
}

pub enum Parsed {
    Ip,
    /// ARP: passes (pods need it, and policy does not apply to it).
    Arp,
}

/// Reads a `T` at `off` by direct packet access (no helper call). A read past the end of the
/// linear data fails, so truncated packets never read out of bounds; `ensure_linear` first makes
/// the headers of a non-linear skb linear.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let len = core::mem::size_of::<T>();
    let start = ctx.data();
    // The bound on `off` lets the verifier prove the access is inside the checked range.
    if off <= MAX_HEADER_OFF && start + off + len <= ctx.data_end() {
        Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    } else {
        None
    }
}

/// Makes the first `upto` bytes (or the whole packet, if shorter) linear, so `read` sees them.
/// A no-op, one comparison, for the usual skb whose headers are linear already.
#[inline(always)]
fn ensure_linear(ctx: &TcContext, upto: usize) {
    let last = upto - 1;
    if last <= MAX_HEADER_OFF {
        let probe = ctx.data() + last;
        if probe < ctx.data_end() {
            // A volatile probe of the last byte: without a load behind it LLVM rewrites the
            // check into pointer arithmetic the verifier refuses.
            unsafe { core::ptr::read_volatile(probe as *const u8) };
            return;
        }
    }
    let n = upto.min(ctx.len() as usize);
    let _ = ctx.pull_data(n as u32);
}

#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize, reason: DropReason) -> Result<T, DropReason> {
    read(ctx, off).ok_or(reason)
}

/// Loads an address into `dst`: IPv6 whole, IPv4 into the last 4 bytes of the mapped form.
#[inline(always)]
fn load_addr(ctx: &TcContext, off: usize, dst: &mut IpBytes, v6: bool) -> Result<(), ()> {
    if v6 {
        *dst = read::<[u8; 16]>(ctx, off).ok_or(())?;
    } else {
        let v4 = read::<[u8; 4]>(ctx, off).ok_or(())?;
        dst[10] = 0xff;
        dst[11] = 0xff;
        dst[12..16].copy_from_slice(&v4);
    }
    Ok(())
}

/// IPv4 header up to the addresses.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Head {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    protocol: u8,
    check: [u8; 2],
}

/// Parses the packet into `pkt`. Not inlined: its buffers leave the stack before the verdict runs.
#[inline(never)]
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, DropReason> {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // A tag the kernel moved out of the frame (hardware-accelerated VLAN).
    if unsafe { (*skb).vlan_present } != 0 {
        return Err(DropReason::VlanTagged);
    }
    ensure_linear(ctx, ETH_HLEN + 40);
    let ethertype: [u8; 2] = load(ctx, 12, DropReason::TruncatedEthernet)?;
    match u16::from_be_bytes(ethertype) {
        ETH_P_IPV4 => parse_ipv4(ctx, pkt)?,
        ETH_P_IPV6 => parse_ipv6(ctx, pkt)?,
        ETH_P_ARP => return Ok(Parsed::Arp),
        ETH_P_8021Q | ETH_P_8021AD => return Err(DropReason::VlanTagged),
        _ => return Err(DropReason::UnsupportedL3),
    }
    Ok(Parsed::Ip)
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, pkt: &mut Packet) -> Result<(), DropReason> {
    let h: Ipv4Head = load(ctx, ETH_HLEN, DropReason::MalformedIpv4)?;
    let ihl = (h.version_ihl & 0x0f) as usize * 4;
    let total = u16::from_be_bytes(h.total_len) as usize;
    if h.version_ihl >> 4 != 4 || ihl < 20 || total < ihl || ETH_HLEN + total > ctx.len() as usize {
        return Err(DropReason::MalformedIpv4);
    }
    load_addr(ctx, ETH_HLEN + 12, &mut pkt.src, false).map_err(|()| DropReason::MalformedIpv4)?;
    load_addr(ctx, ETH_HLEN + 16, &mut pkt.dst, false).map_err(|()| DropReason::MalformedIpv4)?;
    let frag_off = u16::from_be_bytes(h.frag_off);
    pkt.fragment = if frag_off & 0x1fff != 0 {
        Fragment::Later
    } else if frag_off & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    pkt.protocol = h.protocol;
    pkt.frag_protocol = h.protocol;
    pkt.frag_id = u16::from_be_bytes(h.id) as u32;
    if pkt.fragment != Fragment::Later {
        parse_l4(ctx, pkt, ETH_HLEN + ihl, ETH_HLEN + total, false)?;
    }
    Ok(())
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, pkt: &mut Packet) -> Result<(), DropReason> {
    // Version/class/flow (4), payload length (2), next header (1), hop limit (1).
    let h: [u8; 8] = load(ctx, ETH_HLEN, DropReason::MalformedIpv6)?;
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    // Payload length 0 would be a jumbogram, which no veth carries.
    if h[0] >> 4 != 6 || payload == 0 || ETH_HLEN + 40 + payload > ctx.len() as usize {
        return Err(DropReason::MalformedIpv6);
    }
    load_addr(ctx, ETH_HLEN + 8, &mut pkt.src, true).map_err(|()| DropReason::MalformedIpv6)?;
    load_addr(ctx, ETH_HLEN + 24, &mut pkt.dst, true).map_err(|()| DropReason::MalformedIpv6)?;
    // IPv4-mapped addresses never appear on the wire (RFC 4291); here they would alias the
    // IPv4 endpoints the maps store in that form.
    if is_v4_mapped(&pkt.src) || is_v4_mapped(&pkt.dst) {
        return Err(DropReason::MalformedIpv6);
    }
    pkt.hop_limit = h[7];
    let end = ETH_HLEN + 40 + payload;
    pkt.protocol = h[6];
    pkt.frag_protocol = h[6];
    let mut off = ETH_HLEN + 40;
    if is_extension(pkt.protocol) {
        // Extension headers are rare: make room for a long chain at once (a constant length:
        // the verifier rejects what LLVM makes of a variable one in this loop).
        ensure_linear(ctx, ETH_HLEN + 40 + MAX_IPV6_EXT_BYTES);
    }
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match pkt.protocol {
            // Hop-by-hop, routing, destination options: length in 8-byte units, after the first 8.
            0 | 43 | 60 => {
                let e: [u8; 2] = load(ctx, off, DropReason::Ipv6ExtensionChain)?;
                pkt.protocol = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            // Fragment header: next header, reserved, offset and M flag, identification.
            44 => {
                let e: [u8; 8] = load(ctx, off, DropReason::Ipv6ExtensionChain)?;
                pkt.protocol = e[0];
                // Fragments of one datagram are matched on what follows the fragment header,
                // which every fragment carries (the L4 protocol may sit behind more headers).
                pkt.frag_protocol = e[0];
                let frag_off = u16::from_be_bytes([e[2], e[3]]);
                pkt.frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                off += 8;
                if off > end {
                    return Err(DropReason::Ipv6ExtensionChain);
                }
                if frag_off & 0xfff8 != 0 {
                    // A later fragment carries no further headers.
                    pkt.fragment = Fragment::Later;
                    return Ok(());
                }
                if frag_off & 1 != 0 {
                    pkt.fragment = Fragment::First;
                }
            }
            // Authentication header: length in 4-byte units, after the first 8.
            51 => {
                let e: [u8; 2] = load(ctx, off, DropReason::Ipv6ExtensionChain)?;
                pkt.protocol = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            _ => break,
        }
        if off > end {
            return Err(DropReason::Ipv6ExtensionChain);
        }
    }
    // After at most MAX_IPV6_EXT_HEADERS headers, the L4 protocol.
    if is_extension(pkt.protocol) {
        return Err(DropReason::Ipv6ExtensionChain);
    }
    parse_l4(ctx, pkt, off, end, true)
}

#[inline(always)]
fn is_extension(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 51 | 60)
}

#[inline(always)]
fn is_v4_mapped(a: &IpBytes) -> bool {
    a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff
}

/// Reads the ports (or ICMP type and identifier) at `off`; `end` is where the IP payload ends.
#[inline(always)]
fn parse_l4(
    ctx: &TcContext,
    pkt: &mut Packet,
    off: usize,
    end: usize,
    v6: bool,
) -> Result<(), DropReason> {
    pkt.v6 = v6;
    pkt.l4_off = off as u16;
    pkt.end = end as u16;
    ensure_linear(ctx, off + 20);
    match pkt.protocol {
        ipproto::TCP => {
            // Ports (4), sequence (4), acknowledgment (4), data offset (1), flags (1).
            let t: [u8; 14] = load(ctx, off, DropReason::MalformedL4)?;
            let doff = (t[12] >> 4) as usize * 4;
            if doff < 20 || off + doff > end {
                return Err(DropReason::MalformedL4);
            }
            pkt.sport = u16::from_be_bytes([t[0], t[1]]);
            pkt.dport = u16::from_be_bytes([t[2], t[3]]);
            pkt.tcp_flags = t[13];
            pkt.tcp_seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        }
        ipproto::UDP | ipproto::SCTP => {
            // UDP header or SCTP common header: both start with the two ports.
            let hlen = if pkt.protocol == ipproto::UDP { 8 } else { 12 };
            if off + hlen > end {
                return Err(DropReason::MalformedL4);
            }
            let p: [u8; 4] = load(ctx, off, DropReason::MalformedL4)?;
            pkt.sport = u16::from_be_bytes([p[0], p[1]]);
            pkt.dport = u16::from_be_bytes([p[2], p[3]]);
        }
        ipproto::ICMP | ipproto::ICMPV6 => {
            if (pkt.protocol == ipproto::ICMPV6) != v6 || off + 8 > end {
                return Err(DropReason::MalformedL4);
            }
            // Type, code, checksum, identifier (echo).
            let i: [u8; 6] = load(ctx, off, DropReason::MalformedL4)?;
            let ty = i[0];
            let (echo, error) = if v6 {
                // Neighbour discovery only counts as such with hop limit 255 (RFC 4861), and
                // MLD with hop limit 1 from a link-local source (RFC 2710, 3810): anything else
                // is policed like any ICMPv6.
                pkt.link_local_control = match ty {
                    133..=137 => pkt.hop_limit == 255,
                    130..=132 | 143 => {
                        pkt.hop_limit == 1 && pkt.src[0] == 0xfe && pkt.src[1] & 0xc0 == 0x80
                    }
                    _ => false,
                };
                (ty == 128 || ty == 129, (1..=4).contains(&ty))
            } else {
                (ty == 8 || ty == 0, matches!(ty, 3 | 4 | 11 | 12))
            };
            if echo {
                // Request and reply share the identifier: both "ports" carry it so the two
                // directions map to one conntrack entry.
                let id = u16::from_be_bytes([i[4], i[5]]);
                pkt.sport = id;
                pkt.dport = id;
            } else if error {
                pkt.is_error = true;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The packet an ICMP error quotes (after the 8-byte ICMP header): its addresses and ports, if
/// they can be read. Parsed only when an error is checked, off the hot path.
#[inline(always)]
pub fn parse_quoted(ctx: &TcContext, pkt: &Packet, q: &mut Quoted) -> Result<(), ()> {
    let (off, end, v6) = (pkt.l4_off as usize + 8, pkt.end as usize, pkt.v6);
    // The quoted IP header (at most 60 bytes for IPv4, 40 for IPv6) and 8 bytes of its payload.
    ensure_linear(ctx, off + 68);
    let l4 = if v6 {
        let h: [u8; 8] = read(ctx, off).ok_or(())?;
        q.protocol = h[6];
        load_addr(ctx, off + 8, &mut q.src, true)?;
        load_addr(ctx, off + 24, &mut q.dst, true)?;
        off + 40
    } else {
        let h: Ipv4Head = read(ctx, off).ok_or(())?;
        let ihl = (h.version_ihl & 0x0f) as usize * 4;
        if ihl < 20 {
            return Err(());
        }
        q.protocol = h.protocol;
        load_addr(ctx, off + 12, &mut q.src, false)?;
        load_addr(ctx, off + 16, &mut q.dst, false)?;
        off + ihl
    };
    if l4 + 8 > end {
        return Err(());
    }
    let p: [u8; 6] = read(ctx, l4).ok_or(())?;
    match q.protocol {
        ipproto::TCP | ipproto::UDP | ipproto::SCTP => {
            q.sport = u16::from_be_bytes([p[0], p[1]]);
            q.dport = u16::from_be_bytes([p[2], p[3]]);
        }
        // A quoted echo request: its identifier, as in `parse_l4`.
        ipproto::ICMP | ipproto::ICMPV6 => {
            let id = u16::from_be_bytes([p[4], p[5]]);
            q.sport = id;
            q.dport = id;
        }
        _ => return Err(()),
    }
    Ok(())
}
