//! IPv4 header checksum (RFC 1071) and its incremental update (RFC 1624).

/// Checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> [u8; 2] {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([hdr[i], hdr[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// New checksum after the TTL byte (high byte of its 16-bit word) dropped by one.
#[inline(always)]
pub fn after_ttl_decrement(check: [u8; 2]) -> [u8; 2] {
    // HC' = ~(~HC + ~m + m') with m' = m - 0x0100, i.e. HC + 0x0100 folded.
    let sum = u16::from_be_bytes(check) as u32 + 0x0100;
    ((sum + (sum >> 16)) as u16).to_be_bytes()
}
