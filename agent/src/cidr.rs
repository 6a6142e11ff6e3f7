//! IP CIDRs of both families: parsing with actionable errors, containment,
//! overlap. One type, [`Cidr`], over the address family ([`Ipv4Cidr`],
//! [`Ipv6Cidr`]).

use std::{
    fmt,
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An address family's address type, as [`Cidr`] computes with it: a
/// number of `BITS` bits held in a `u128`.
pub trait Family: Copy + Ord + Hash + fmt::Debug + fmt::Display + FromStr {
    /// Address width in bits (32 or 128).
    const BITS: u8;
    /// A CIDR of this family, for error messages.
    const EXAMPLE: &'static str;
    fn to_bits(self) -> u128;
    fn from_bits(bits: u128) -> Self;
}

impl Family for Ipv4Addr {
    const BITS: u8 = 32;
    const EXAMPLE: &'static str = "10.244.1.0/24";
    fn to_bits(self) -> u128 {
        u128::from(u32::from(self))
    }
    fn from_bits(bits: u128) -> Self {
        Ipv4Addr::from(bits as u32)
    }
}

impl Family for Ipv6Addr {
    const BITS: u8 = 128;
    const EXAMPLE: &'static str = "fd00:10:244:1::/64";
    fn to_bits(self) -> u128 {
        u128::from(self)
    }
    fn from_bits(bits: u128) -> Self {
        Ipv6Addr::from(bits)
    }
}

/// An IP network of family `A`, e.g. `198.19.1.0/24` or `fd00:198:19:1::/64`.
/// Host bits are always zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr<A> {
    addr: A,
    prefix: u8,
}

/// An IPv4 network.
pub type Ipv4Cidr = Cidr<Ipv4Addr>;
/// An IPv6 network.
pub type Ipv6Cidr = Cidr<Ipv6Addr>;

/// The cluster's pod networks: IPv4, IPv6 or both (at least one). Every
/// pod address, and every node's pod CIDR of a family, lies in that
/// family's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterCidrs {
    pub v4: Option<Ipv4Cidr>,
    pub v6: Option<Ipv6Cidr>,
}

impl From<Ipv4Cidr> for ClusterCidrs {
    /// An IPv4-only cluster.
    fn from(v4: Ipv4Cidr) -> Self {
        Self {
            v4: Some(v4),
            v6: None,
        }
    }
}

impl fmt::Display for ClusterCidrs {
    /// `10.244.0.0/16`, `10.244.0.0/16,fd00:10:244::/56` or
    /// `fd00:10:244::/56`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v4 = self.v4.map(|c| c.to_string());
        let v6 = self.v6.map(|c| c.to_string());
        let both: Vec<String> = v4.into_iter().chain(v6).collect();
        f.write_str(&both.join(","))
    }
}

impl From<Ipv6Cidr> for ClusterCidrs {
    /// An IPv6-only cluster.
    fn from(v6: Ipv6Cidr) -> Self {
        Self {
            v4: None,
            v6: Some(v6),
        }
    }
}

/// A pod CIDR of either family, as the node maps are keyed (IPv4 ones
/// sort first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnyCidr {
    V4(Ipv4Cidr),
    V6(Ipv6Cidr),
}

impl From<Ipv4Cidr> for AnyCidr {
    fn from(c: Ipv4Cidr) -> Self {
        Self::V4(c)
    }
}

impl From<Ipv6Cidr> for AnyCidr {
    fn from(c: Ipv6Cidr) -> Self {
        Self::V6(c)
    }
}

impl fmt::Display for AnyCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(c) => c.fmt(f),
            Self::V6(c) => c.fmt(f),
        }
    }
}

/// Why a string is not a usable CIDR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("`{input}` is not a CIDR: write it as ADDRESS/PREFIX, e.g. {example}")]
    Syntax {
        input: String,
        example: &'static str,
    },
    #[error("`{input}`: the prefix length must be a number from 0 to {max}")]
    Prefix { input: String, max: u8 },
    #[error("`{input}` has host bits set; did you mean {suggestion}?")]
    HostBits { input: String, suggestion: String },
}

impl<A: Family> Cidr<A> {
    /// A CIDR from a network address and prefix; host bits are cleared.
    pub fn new(addr: A, prefix: u8) -> Self {
        let prefix = prefix.min(A::BITS);
        Self {
            addr: A::from_bits(addr.to_bits() & mask::<A>(prefix)),
            prefix,
        }
    }

    pub fn addr(&self) -> A {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask as an address (e.g. 255.255.255.0).
    pub fn netmask(&self) -> A {
        A::from_bits(mask::<A>(self.prefix))
    }

    pub fn contains(&self, ip: A) -> bool {
        ip.to_bits() & mask::<A>(self.prefix) == self.addr.to_bits()
    }

    pub fn overlaps(&self, other: &Self) -> bool {
        let m = mask::<A>(self.prefix.min(other.prefix));
        self.addr.to_bits() & m == other.addr.to_bits() & m
    }

    /// Number of addresses in the network (`u64::MAX` for an IPv6 network
    /// of more).
    pub fn size(&self) -> u64 {
        let host_bits = u32::from(A::BITS - self.prefix);
        if host_bits >= 64 {
            u64::MAX
        } else {
            1u64 << host_bits
        }
    }

    /// The `n`-th address of the network (0 = network address), if inside it.
    pub fn nth(&self, n: u64) -> Option<A> {
        (n < self.size()).then(|| A::from_bits(self.addr.to_bits() + u128::from(n)))
    }

    /// The last address (IPv4's broadcast address).
    pub fn broadcast(&self) -> A {
        A::from_bits(self.addr.to_bits() | (!mask::<A>(self.prefix) & mask::<A>(A::BITS)))
    }
}

/// The mask of a `prefix`-bit network of family `A`, in the low `A::BITS`
/// bits of a `u128`.
fn mask<A: Family>(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        (u128::MAX << (128 - u32::from(prefix))) >> (128 - u32::from(A::BITS))
    }
}

impl<A: Family> FromStr for Cidr<A> {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax {
            input: s.into(),
            example: A::EXAMPLE,
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: A = addr.trim().parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix
            .trim()
            .parse()
            .ok()
            .filter(|p| *p <= A::BITS)
            .ok_or_else(|| CidrError::Prefix {
                input: s.into(),
                max: A::BITS,
            })?;
        let cidr = Self::new(addr, prefix);
        if cidr.addr != addr {
            return Err(CidrError::HostBits {
                input: s.into(),
                suggestion: cidr.to_string(),
            });
        }
        Ok(cidr)
    }
}

impl<A: Family> fmt::Display for Cidr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<A: Family> serde::Serialize for Cidr<A> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, A: Family> serde::Deserialize<'de> for Cidr<A> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let c: Ipv4Cidr = "198.19.1.0/24".parse().unwrap();
        assert_eq!(c.addr(), Ipv4Addr::new(198, 19, 1, 0));
        assert_eq!(c.prefix(), 24);
        assert_eq!(c.broadcast(), Ipv4Addr::new(198, 19, 1, 255));
        assert_eq!(c.nth(1), Some(Ipv4Addr::new(198, 19, 1, 1)));
        assert_eq!(c.nth(256), None);
        assert!(matches!(
            "198.19.1.5/24".parse::<Ipv4Cidr>(),
            Err(CidrError::HostBits { .. })
        ));
        assert!(matches!(
            "198.19.1.0/33".parse::<Ipv4Cidr>(),
            Err(CidrError::Prefix { max: 32, .. })
        ));
        assert!(matches!(
            "banana".parse::<Ipv4Cidr>(),
            Err(CidrError::Syntax { .. })
        ));
        let err = "198.19.1.5/24".parse::<Ipv4Cidr>().unwrap_err().to_string();
        assert!(err.contains("did you mean 198.19.1.0/24"), "{err}");
    }

    #[test]
    fn overlap_and_contains() {
        let a: Ipv4Cidr = "198.19.0.0/16".parse().unwrap();
        let b: Ipv4Cidr = "198.19.4.0/24".parse().unwrap();
        let c: Ipv4Cidr = "198.18.4.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(a.contains(Ipv4Addr::new(198, 19, 200, 1)));
        assert!(!b.contains(Ipv4Addr::new(198, 19, 5, 1)));
        assert_eq!(
            Ipv4Cidr::new(Ipv4Addr::new(1, 2, 3, 4), 0).netmask(),
            Ipv4Addr::UNSPECIFIED
        );
    }

    #[test]
    fn ipv6_parses_contains_and_rejects() {
        let c: Ipv6Cidr = "fd00:198:19:1::/64".parse().unwrap();
        assert_eq!(c.prefix(), 64);
        assert_eq!(c.nth(1), Some("fd00:198:19:1::1".parse().unwrap()));
        assert_eq!(c.size(), u64::MAX);
        assert!(c.contains("fd00:198:19:1::abcd".parse().unwrap()));
        assert!(!c.contains("fd00:198:19:2::1".parse().unwrap()));
        assert_eq!(
            c.netmask(),
            "ffff:ffff:ffff:ffff::".parse::<Ipv6Addr>().unwrap()
        );
        let wide: Ipv6Cidr = "fd00:198:19::/48".parse().unwrap();
        assert!(wide.overlaps(&c) && c.overlaps(&wide));
        assert_eq!(
            "fd00:198:19:1::/129".parse::<Ipv6Cidr>(),
            Err(CidrError::Prefix {
                input: "fd00:198:19:1::/129".into(),
                max: 128
            })
        );
        let err = "fd00::5/64".parse::<Ipv6Cidr>().unwrap_err().to_string();
        assert!(err.contains("did you mean fd00::/64"), "{err}");
        let err = "198.19.0.0/16".parse::<Ipv6Cidr>().unwrap_err().to_string();
        assert!(err.contains("fd00:10:244:1::/64"), "{err}");
        let small: Ipv6Cidr = "fd00::/120".parse().unwrap();
        assert_eq!(small.size(), 256);
        assert_eq!(small.broadcast(), "fd00::ff".parse::<Ipv6Addr>().unwrap());
    }
}
