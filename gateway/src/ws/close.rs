//! Close status codes and the close frame payload (RFC 6455 §5.5.1, §7.4).
//!
//! A close frame's payload is either empty or a 2-byte big-endian status
//! code followed by a UTF-8 reason. The code tells the other side why the
//! connection ends; it is how a client learns it was, say, replaced by a
//! newer tab ([`REPLACED`]) rather than just dropped.
//!
//! Codes come in ranges: 1000-2999 belong to the RFC and the IANA registry,
//! 3000-3999 to registered libraries and frameworks, 4000-4999 to
//! applications (kefu's own codes live there). Some values must never appear
//! on the wire: 1005 ("no status") and 1006 ("abnormal closure") are what an
//! endpoint reports to itself when there was no code or no close frame at
//! all, and 1015 is the same for a TLS failure. A peer that sends one of
//! those, or an unassigned value, is broken, and we fail the connection with
//! 1002 as the Autobahn TestSuite (cases 7.7.x, 7.9.x) expects.

use super::decoder::ProtocolError;

/// The purpose for which the connection was established has been fulfilled.
pub const NORMAL: u16 = 1000;
/// The endpoint is going away: a server shutting down, a browser tab closing.
pub const GOING_AWAY: u16 = 1001;
/// The peer broke the framing protocol.
pub const PROTOCOL_ERROR: u16 = 1002;
/// The peer sent a kind of data the endpoint cannot accept (e.g. binary
/// frames on the JSON subprotocol).
pub const UNSUPPORTED: u16 = 1003;
/// Reserved: a close frame that had no status code. Never sent.
pub const NO_STATUS: u16 = 1005;
/// Reserved: the connection closed without a close frame. Never sent.
pub const ABNORMAL: u16 = 1006;
/// A message's data did not match its type (invalid UTF-8 in a text frame).
pub const INVALID_PAYLOAD: u16 = 1007;
/// The peer violated a policy (generic; used when no better code fits).
pub const POLICY: u16 = 1008;
/// A frame or message exceeded a size limit.
pub const TOO_BIG: u16 = 1009;
/// (Client to server only.) The server did not negotiate an extension the
/// client requires.
pub const MANDATORY_EXT: u16 = 1010;
/// The server hit an unexpected condition.
pub const INTERNAL: u16 = 1011;
/// (IANA) The server is short of something for now: reconnect later.
pub const TRY_AGAIN_LATER: u16 = 1013;

/// kefu's own codes (4000-4999): part of the client protocol, so they live
/// with it.
pub use kefu_proto::ws::close::{BLOCKED, REPLACED, SERVER_SHUTDOWN, SLOW_CONSUMER, UNAUTHORIZED};

/// Whether `code` may appear in a close frame received from a peer
/// (RFC 6455 §7.4, the IANA registry, and the Autobahn TestSuite 7.7.x and
/// 7.9.x cases).
///
/// Valid: 1000-1003, 1007-1011, the later IANA registrations 1012 (service
/// restart), 1013 (try again later) and 1014 (bad gateway), and 3000-4999.
/// Invalid: 0-999 (unused), 1004 (reserved), 1005, 1006 and 1015 (local
/// reporting only), 1016-2999 (unassigned), and 5000 and above (undefined).
pub fn is_valid_received_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Parses and validates a received close frame's (already unmasked)
/// payload.
///
/// Returns `Ok(None)` for an empty payload (no status code), otherwise the
/// code and the reason text. A 1-byte payload or a code no peer may send is a
/// protocol error (1002); a reason that is not UTF-8 is 1007.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(u16, &str)>, ProtocolError> {
    let (code, reason) = match payload {
        [] => return Ok(None),
        [_] => {
            return Err(ProtocolError::new(PROTOCOL_ERROR, "close payload of 1 byte (a code needs 2)"));
        }
        [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), reason),
    };
    if !is_valid_received_code(code) {
        return Err(ProtocolError::new(PROTOCOL_ERROR, "invalid close code"));
    }
    match std::str::from_utf8(reason) {
        Ok(reason) => Ok(Some((code, reason))),
        Err(_) => Err(ProtocolError::new(INVALID_PAYLOAD, "close reason is not valid UTF-8")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_autobahn_valid_codes_are_accepted() {
        // Case 7.7.x, plus kefu's own codes.
        for code in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
            assert!(is_valid_received_code(code), "{code}");
        }
        for code in [SERVER_SHUTDOWN, SLOW_CONSUMER, REPLACED, UNAUTHORIZED, BLOCKED] {
            assert!(is_valid_received_code(code), "{code}");
        }
        // Registered with IANA after the RFC.
        for code in [1012, 1013, 1014] {
            assert!(is_valid_received_code(code), "{code}");
        }
    }

    #[test]
    fn the_autobahn_invalid_codes_are_rejected() {
        // Cases 7.9.x, 7.13.x, and the local-only codes.
        for code in [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert!(!is_valid_received_code(code), "{code}");
        }
    }

    #[test]
    fn validity_matches_the_ranges_for_every_code() {
        for code in 0..=u16::MAX {
            let expected = (1000..=1003).contains(&code)
                || (1007..=1014).contains(&code)
                || (3000..5000).contains(&code);
            assert_eq!(is_valid_received_code(code), expected, "{code}");
        }
    }

    #[test]
    fn empty_payload_has_no_code() {
        assert_eq!(parse_close_payload(&[]), Ok(None));
    }

    #[test]
    fn one_byte_payload_is_a_protocol_error() {
        assert_eq!(parse_close_payload(&[0x03]).unwrap_err().code, PROTOCOL_ERROR);
    }

    #[test]
    fn code_and_reason_are_parsed() {
        assert_eq!(parse_close_payload(&[0x03, 0xe8]), Ok(Some((1000, ""))));
        let mut p = vec![0x0f, 0xa2];
        p.extend_from_slice("replaced ✓".as_bytes());
        assert_eq!(parse_close_payload(&p), Ok(Some((REPLACED, "replaced ✓"))));
    }

    #[test]
    fn invalid_code_is_a_protocol_error_even_with_a_fine_reason() {
        for code in [0u16, 1005, 1006, 1015, 2000, 5000] {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(b"why");
            assert_eq!(parse_close_payload(&p).unwrap_err().code, PROTOCOL_ERROR, "{code}");
        }
    }

    #[test]
    fn invalid_utf8_reason_is_invalid_payload() {
        for reason in [
            &[0xff][..],
            &[0xc3, 0x28],
            &[0xe2, 0x82],       // truncated
            &[0xed, 0xa0, 0x80], // surrogate
            &[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80],
        ] {
            let mut p = vec![0x03, 0xe8];
            p.extend_from_slice(reason);
            assert_eq!(parse_close_payload(&p).unwrap_err().code, INVALID_PAYLOAD, "{reason:x?}");
        }
    }
}
