//! The PROXY protocol header (HAProxy's, versions 1 and 2), which a load
//! balancer that passes TCP through (HAProxy, AWS NLB, many others) puts
//! before the client's first byte to say whom the connection is from.
//!
//! Read only when `server.proxy_protocol` is on, and only from a peer in
//! `server.trusted_proxies`: like `X-Forwarded-For`, the header is a claim
//! anyone can make, so it is believed from the operator's proxies alone.
//! From them it is then required (the specification forbids guessing
//! whether it is there), and anyone else is read as plain HTTP, where a
//! forged header is only a malformed request.
//!
//! Sans-IO: [`parse`] looks at the bytes read so far and says whether the
//! header is complete, how long it is, and the client address it names.
//! `UNKNOWN` (v1) and `LOCAL` (v2, the proxy's own health checks) name no
//! client: the proxy itself is the peer then.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The longest version 1 header, `\r\n` included (the specification's
/// bound).
pub const V1_MAX_BYTES: usize = 107;

/// The v2 signature: twelve bytes no HTTP request starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest version 2 header accepted: the fixed 16 bytes, the largest
/// address block (Unix sockets, 216 bytes) and room for the TLVs proxies
/// add (AWS's VPC endpoint id, SSL facts). Longer is refused rather than
/// buffered without end.
pub const V2_MAX_BYTES: usize = 16 + 512;

/// What the bytes read so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Too few bytes to tell: read more.
    NeedMore,
    /// A whole header of `len` bytes; the request starts after it.
    /// `client` is the address it names (`None`: the proxy speaks for
    /// itself).
    Header { len: usize, client: Option<IpAddr> },
}

/// Why the bytes are not a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// Parses the PROXY header at the start of `input`.
pub fn parse(input: &[u8]) -> Result<Parsed, Invalid> {
    let prefix = input.len().min(V2_SIGNATURE.len());
    if input[..prefix] == V2_SIGNATURE[..prefix] {
        return if prefix < V2_SIGNATURE.len() { Ok(Parsed::NeedMore) } else { parse_v2(input) };
    }
    let prefix = input.len().min(6);
    if input[..prefix] == b"PROXY "[..prefix] {
        return if prefix < 6 { Ok(Parsed::NeedMore) } else { parse_v1(input) };
    }
    Err(Invalid("a trusted proxy's connection must start with a PROXY protocol header"))
}

fn parse_v1(input: &[u8]) -> Result<Parsed, Invalid> {
    let Some(end) = input.windows(2).take(V1_MAX_BYTES - 1).position(|w| w == b"\r\n") else {
        return if input.len() >= V1_MAX_BYTES {
            Err(Invalid("PROXY v1 header longer than 107 bytes"))
        } else {
            Ok(Parsed::NeedMore)
        };
    };
    let line = std::str::from_utf8(&input[6..end]).map_err(|_| Invalid("PROXY v1 header is not ASCII"))?;
    let len = end + 2;
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    if family == "UNKNOWN" {
        // The rest of the line is to be ignored (the specification).
        return Ok(Parsed::Header { len, client: None });
    }
    let (src, dst, sport, dport) =
        match (fields.next(), fields.next(), fields.next(), fields.next(), fields.next()) {
            (Some(s), Some(d), Some(sp), Some(dp), None) => (s, d, sp, dp),
            _ => return Err(Invalid("PROXY v1 header needs 4 fields after the family")),
        };
    let client: IpAddr = match family {
        "TCP4" => {
            src.parse::<Ipv4Addr>().map_err(|_| Invalid("PROXY v1 source is not an IPv4 address"))?.into()
        }
        "TCP6" => {
            src.parse::<Ipv6Addr>().map_err(|_| Invalid("PROXY v1 source is not an IPv6 address"))?.into()
        }
        _ => return Err(Invalid("PROXY v1 family is not TCP4, TCP6 or UNKNOWN")),
    };
    if dst.parse::<IpAddr>().is_err() || port(sport).is_none() || port(dport).is_none() {
        return Err(Invalid("PROXY v1 destination or port malformed"));
    }
    Ok(Parsed::Header { len, client: Some(client.to_canonical()) })
}

/// A v1 port: decimal digits, no leading zero, at most 65535 (`parse`
/// alone would take `+80`).
fn port(p: &str) -> Option<u16> {
    let digits = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    (digits && (p == "0" || !p.starts_with('0'))).then(|| p.parse().ok()).flatten()
}

fn parse_v2(input: &[u8]) -> Result<Parsed, Invalid> {
    if input.len() < 16 {
        return Ok(Parsed::NeedMore);
    }
    let (version, command) = (input[12] >> 4, input[12] & 0x0f);
    if version != 2 {
        return Err(Invalid("PROXY v2 header of an unknown version"));
    }
    let block = usize::from(u16::from_be_bytes([input[14], input[15]]));
    let len = 16 + block;
    if len > V2_MAX_BYTES {
        return Err(Invalid("PROXY v2 header too long"));
    }
    if input.len() < len {
        return Ok(Parsed::NeedMore);
    }
    let addresses = &input[16..len];
    let client = match command {
        // LOCAL: the proxy's own connection (a health check); the address
        // block, if any, is to be ignored.
        0 => None,
        1 => match input[13] >> 4 {
            // AF_UNSPEC: nothing said about the client.
            0 => None,
            1 if addresses.len() >= 12 => {
                let mut v4 = [0u8; 4];
                v4.copy_from_slice(&addresses[..4]);
                Some(IpAddr::from(v4))
            }
            2 if addresses.len() >= 36 => {
                let mut v6 = [0u8; 16];
                v6.copy_from_slice(&addresses[..16]);
                Some(IpAddr::from(v6))
            }
            // AF_UNIX: a local socket, no address to limit by.
            3 => None,
            1 | 2 => return Err(Invalid("PROXY v2 address block too short for its family")),
            _ => return Err(Invalid("PROXY v2 address family unknown")),
        },
        _ => return Err(Invalid("PROXY v2 command unknown")),
    };
    Ok(Parsed::Header { len, client: client.map(|ip| ip.to_canonical()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend((block.len() as u16).to_be_bytes());
        h.extend(block);
        h
    }

    #[test]
    fn version_1_names_the_client_and_its_length() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n";
        let len = h.iter().position(|&b| b == b'G').unwrap();
        assert_eq!(parse(h), Ok(Parsed::Header { len, client: Some("203.0.113.7".parse().unwrap()) }));
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Header { len: h.len(), client: Some("2001:db8::1".parse().unwrap()) })
        );
        assert_eq!(parse(b"PROXY UNKNOWN whatever\r\n"), Ok(Parsed::Header { len: 24, client: None }));
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n".to_vec();
        let v2 = v2(1, 0x11, &[203, 0, 113, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x01, 0xbb]);
        for h in [v1, v2] {
            for cut in 0..h.len() {
                assert_eq!(parse(&h[..cut]), Ok(Parsed::NeedMore), "{cut} bytes of {h:?}");
            }
            assert!(matches!(parse(&h), Ok(Parsed::Header { client: Some(_), .. })));
        }
    }

    #[test]
    fn version_2_names_the_client_or_leaves_the_peer() {
        let block = [203, 0, 113, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x01, 0xbb];
        let client = Some("203.0.113.7".parse().unwrap());
        assert_eq!(parse(&v2(1, 0x11, &block)), Ok(Parsed::Header { len: 28, client }));
        // TLVs after the addresses are skipped with the block.
        let mut with_tlv = block.to_vec();
        with_tlv.extend([0x04, 0x00, 0x01, 0xff]);
        assert_eq!(parse(&v2(1, 0x11, &with_tlv)), Ok(Parsed::Header { len: 32, client }));
        let mut six = [0u8; 36];
        six[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        let client6 = Some("2001:db8::7".parse().unwrap());
        assert_eq!(parse(&v2(1, 0x21, &six)), Ok(Parsed::Header { len: 52, client: client6 }));
        // A v4-mapped source is the IPv4 client.
        let mut mapped = [0u8; 36];
        mapped[..16].copy_from_slice(&Ipv4Addr::new(198, 51, 100, 9).to_ipv6_mapped().octets());
        let client4 = Some("198.51.100.9".parse().unwrap());
        assert_eq!(parse(&v2(1, 0x21, &mapped)), Ok(Parsed::Header { len: 52, client: client4 }));
        assert_eq!(parse(&v2(0, 0x11, &block)), Ok(Parsed::Header { len: 28, client: None }), "LOCAL");
        assert_eq!(parse(&v2(1, 0x00, &[])), Ok(Parsed::Header { len: 16, client: None }), "UNSPEC");
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 nowhere 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let endless = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 200]].concat();
        assert!(parse(&endless).is_err(), "no end of line within 107 bytes");
        assert!(parse(&v2(1, 0x11, &[1, 2, 3])).is_err(), "block too short");
        assert!(parse(&v2(2, 0x11, &[0; 12])).is_err(), "unknown command");
        let mut v3 = v2(1, 0x11, &[0; 12]);
        v3[12] = 0x31;
        assert!(parse(&v3).is_err(), "unknown version");
        let mut huge = v2(1, 0x11, &[0; 12]);
        huge[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert!(parse(&huge).is_err(), "refused at its length, before the bytes come");
    }
}
