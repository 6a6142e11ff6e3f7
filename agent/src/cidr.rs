//! IPv4 CIDRs: parsing with actionable errors, containment, overlap.

use std::{fmt, net::Ipv4Addr, str::FromStr};

/// An IPv4 network, e.g. `198.19.1.0/24`. Host bits are always zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

/// Why a string is not a usable CIDR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("`{0}` is not a CIDR: write it as ADDRESS/PREFIX, e.g. 10.244.1.0/24")]
    Syntax(String),
    #[error("`{0}`: the prefix length must be a number from 0 to 32")]
    Prefix(String),
    #[error("`{input}` has host bits set; did you mean {suggestion}?")]
    HostBits { input: String, suggestion: String },
}

impl Ipv4Cidr {
    /// A CIDR from a network address and prefix; host bits are cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask as an address (e.g. 255.255.255.0).
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    pub fn overlaps(&self, other: &Self) -> bool {
        let m = mask(self.prefix.min(other.prefix));
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }

    /// Number of addresses in the network.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The `n`-th address of the network (0 = network address), if inside it.
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + n as u32))
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !mask(self.prefix))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.into()))?;
        let addr: Ipv4Addr = addr
            .trim()
            .parse()
            .map_err(|_| CidrError::Syntax(s.into()))?;
        let prefix: u8 = prefix
            .trim()
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| CidrError::Prefix(s.into()))?;
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

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Ipv4Cidr {
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
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "banana".parse::<Ipv4Cidr>(),
            Err(CidrError::Syntax(_))
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
}
