//! Which address a connection comes from: the TCP peer's, or, when the peer
//! is one of `server.trusted_proxies`, the one its `X-Forwarded-For` names.
//!
//! The per-address limits (`limits.new_connections_per_s_per_ip`,
//! `limits.anonymous_per_min_per_ip`) and the logs use this address.
//! Behind a load balancer every peer is the balancer, so without it one
//! busy site would share one limit; but `X-Forwarded-For` is only a header,
//! and anyone can send one, so it is believed only from a peer the operator
//! named. The list is read from the right: each trusted proxy appends the
//! address it saw, so the rightmost address that is not a trusted proxy is
//! the one no client could forge. Entries to its left are the client's own
//! claims and are ignored. If every hop is trusted, the leftmost is used;
//! an entry that is not an address stops the walk at the last good one.
//!
//! A proxy that passes TCP through instead names the client in a PROXY
//! protocol header before the request (`server.proxy_protocol`, see
//! `proxy_protocol.rs`); that address then stands where the peer's did,
//! and `X-Forwarded-For` is believed only if it is itself a trusted proxy.

use std::net::{IpAddr, SocketAddr};

/// A network, `10.0.0.0/8` or `fd00::/8`, or one address (`/32`, `/128`).
/// IPv4 is held in the IPv4-mapped IPv6 space, so one comparison serves
/// both families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: u128,
    mask: u128,
}

/// `ip` in the IPv6 space (IPv4 as `::ffff:a.b.c.d`).
fn wide(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Cidr {
    /// Parses `addr` or `addr/prefix`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = addr.trim().parse().map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let (bits, offset) = match ip {
            IpAddr::V4(_) => (32u32, 96u32),
            IpAddr::V6(_) => (128, 0),
        };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p) if p <= bits => p,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {bits}")),
            },
        };
        let len = prefix + offset;
        let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
        let net = wide(ip.to_canonical()) & mask;
        // 0.0.0.0/0 is every IPv4 address, and only those.
        Ok(Cidr { net, mask })
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        wide(ip.to_canonical()) & self.mask == self.net
    }
}

/// `server.trusted_proxies`, parsed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses each entry; the first bad one is the error.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        entries.iter().map(|e| Cidr::parse(e)).collect::<Result<_, _>>().map(TrustedProxies)
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client address of a connection from `peer` whose request carried
    /// these `X-Forwarded-For` values (in the order of the head).
    pub fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    ) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        // Later header lines were appended later: the walk starts with the
        // last line's last entry.
        let hops = forwarded_for.rev().flat_map(|v| v.rsplit(|&b| b == b','));
        for hop in hops {
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !self.contains(ip) {
                break;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `2001:db8::1`, and the forms
/// some proxies add a port to (`1.2.3.4:5678`, `[2001:db8::1]:5678`).
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(hop).ok()?.trim();
    let ip = s
        .parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| s.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn client(t: &TrustedProxies, peer: &str, xff: &[&str]) -> IpAddr {
        t.client_ip(ip(peer), xff.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn cidrs_parse_and_match_both_families() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.200.3")) && !c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")), "an IPv4-mapped peer is its IPv4 address");
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(!Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.2")));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let any4 = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(any4.contains(ip("8.8.8.8")) && !any4.contains(ip("2001:db8::1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("8.8.8.8")));
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0/8", "localhost", "10.0.0.0/x", "10.0.0.0/-1"] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forwarded_for_is_ignored_unless_the_peer_is_trusted() {
        let none = TrustedProxies::default();
        assert_eq!(client(&none, "203.0.113.9", &["198.51.100.1"]), ip("203.0.113.9"));
        let t = proxies(&["10.0.0.0/8"]);
        assert_eq!(client(&t, "203.0.113.9", &["198.51.100.1"]), ip("203.0.113.9"), "an untrusted peer");
        assert_eq!(client(&t, "10.0.0.2", &[]), ip("10.0.0.2"), "a trusted peer that names no one");
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let t = proxies(&["10.0.0.0/8", "2001:db8:ff::/48"]);
        // The client claims 1.1.1.1; the edge proxy saw 198.51.100.7 and an
        // inner proxy saw the edge proxy.
        let chain = ["1.1.1.1, 198.51.100.7, 10.0.0.3"];
        assert_eq!(client(&t, "10.0.0.2", &chain), ip("198.51.100.7"));
        // Several header lines are one list, in order.
        assert_eq!(client(&t, "10.0.0.2", &["1.1.1.1", "198.51.100.7,10.0.0.3"]), ip("198.51.100.7"));
        // Every hop trusted: the leftmost.
        assert_eq!(client(&t, "10.0.0.2", &["10.9.9.9, 10.0.0.3"]), ip("10.9.9.9"));
        // Ports and brackets, as some proxies write them.
        assert_eq!(client(&t, "10.0.0.2", &["198.51.100.7:5555"]), ip("198.51.100.7"));
        assert_eq!(client(&t, "10.0.0.2", &["[2001:db8::7]:443"]), ip("2001:db8::7"));
        assert_eq!(client(&t, "2001:db8:ff::1", &["[2001:db8::7]"]), ip("2001:db8::7"));
        // Garbage stops the walk at the last address a proxy vouched for.
        assert_eq!(client(&t, "10.0.0.2", &["unknown, 10.0.0.3"]), ip("10.0.0.3"));
        assert_eq!(client(&t, "10.0.0.2", &["1.1.1.1, garbage"]), ip("10.0.0.2"));
        assert_eq!(client(&t, "10.0.0.2", &[""]), ip("10.0.0.2"));
    }
}
