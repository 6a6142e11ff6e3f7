//! Header layouts and the one bounds-checked accessor every parser uses.
//!
//! Multi-byte fields are byte arrays in network order: packet data is not
//! aligned, and arrays keep the byte order visible at every use.

use core::mem::size_of;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const UDP_HLEN: usize = 8;
pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];
pub const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 next header: a fragment header follows.
pub const NEXTHDR_FRAGMENT: u8 = 44;

/// Ethernet II header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// EtherType, network order.
    pub proto: [u8; 2],
}

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    /// Flags (DF = 0x40 in byte 0, MF = 0x20) and fragment offset.
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Hdr {
    /// Header length in bytes (IHL × 4).
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }

    #[inline(always)]
    pub fn is_valid(&self) -> bool {
        self.version_ihl >> 4 == 4 && self.header_len() >= IPV4_HLEN
    }

    /// True for any fragment but the first-and-only (MF set or offset ≠ 0).
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        (self.frag_off[0] & 0x3f) != 0 || self.frag_off[1] != 0
    }
}

/// IPv6 fixed header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class, flow label.
    pub vtc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl Ipv6Hdr {
    #[inline(always)]
    pub fn is_valid(&self) -> bool {
        self.vtc_flow[0] >> 4 == 6
    }
}

/// Whether an IPv6 address is one a pod's stack uses on its link only:
/// link-local (fe80::/10), multicast (ff00::/8) or unspecified (`::`, the
/// source of duplicate address detection). Neighbour discovery and MLD use
/// these; they are the node's business, never forwarded by weft.
#[inline(always)]
pub fn ipv6_link_scoped(a: &[u8; 16]) -> bool {
    (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || a[0] == 0xff || {
        let (hi, lo) = ipv6_halves(a);
        hi | lo == 0
    }
}

/// Whether the Ethernet frame in `[start, end)` says IPv6 (its EtherType):
/// the family counters file a frame under when nothing more is known.
#[inline(always)]
pub fn says_ipv6(start: usize, end: usize) -> bool {
    // SAFETY: ptr_at checked bounds.
    ptr_at::<[u8; 2]>(start, end, 12).is_ok_and(|p| unsafe { *p } == ETH_P_IPV6)
}

/// An IPv6 address as two `u64`s (in memory order): compared and masked in
/// two steps rather than sixteen.
#[inline(always)]
pub fn ipv6_halves(a: &[u8; 16]) -> (u64, u64) {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&a[..8]);
    lo.copy_from_slice(&a[8..]);
    (u64::from_ne_bytes(hi), u64::from_ne_bytes(lo))
}

/// UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// VXLAN header (RFC 7348): flags (I = 0x08), 24 reserved bits, VNI, 8 reserved bits.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    pub flags: u8,
    pub _reserved1: [u8; 3],
    pub vni: [u8; 3],
    pub _reserved2: u8,
}

/// The I flag: the VNI field is valid.
pub const VXLAN_FLAG_I: u8 = 0x08;

/// The packet ends before the header asked for.
#[derive(Clone, Copy, Debug)]
pub struct Truncated;

/// A header cut short, where the packet is already known to be weft's to
/// judge: dropped as malformed (with `?` in a handler).
impl From<Truncated> for weft_common::DropReason {
    #[inline(always)]
    fn from(_: Truncated) -> Self {
        Self::Malformed
    }
}

/// Pointer to a `T` at `off` bytes into `[start, end)`, or `Err` when it does
/// not fit. The one place packet bounds are checked.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, off: usize) -> Result<*mut T, Truncated> {
    if start + off + size_of::<T>() > end {
        return Err(Truncated);
    }
    Ok((start + off) as *mut T)
}
