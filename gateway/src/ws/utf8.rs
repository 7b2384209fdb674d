//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! A text message may be split across frames (fragmentation) and each frame
//! across reads, and the split can fall inside a multi-byte character. RFC
//! 6455 §8.1 says an endpoint must fail the connection (1007) as soon as the
//! text is not valid UTF-8, and the Autobahn TestSuite (cases 6.x) checks
//! that an endpoint does so *fast*: on the first chunk that makes the
//! message impossible to complete validly, not when the message ends. So a
//! truncated sequence at the end of a chunk must be checked as a prefix:
//! `F4 90` can never become a valid character (it would be above U+10FFFF),
//! nor `ED A0` (a UTF-16 surrogate), so both fail at once.
//!
//! The validator keeps only the 0 to 3 bytes of a character that a chunk
//! boundary cut, so it is 4 bytes in every connection. The bulk of the work
//! is `std::str::from_utf8`, which is fast, and which already checks a
//! truncated tail as a prefix: its `Utf8Error::error_len()` is `None` only
//! when the tail could still be completed by more input.

use std::fmt;

/// The text is not valid UTF-8 (close code 1007).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidUtf8;

impl fmt::Display for InvalidUtf8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid UTF-8")
    }
}

impl std::error::Error for InvalidUtf8 {}

/// Validates one text message fed in arbitrary chunks.
///
/// Call [`feed`](Utf8Validator::feed) with each chunk in order and
/// [`finish`](Utf8Validator::finish) when the message ends. After an error
/// the state is unspecified: call [`reset`](Utf8Validator::reset) (the
/// decoder instead fails the whole connection).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Utf8Validator {
    /// The leading bytes of a character that the last chunk cut short.
    /// Always a prefix that can still become a valid character.
    pending: [u8; 3],
    /// How many bytes of `pending` are used (0 to 3).
    pending_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Utf8Validator {
        Utf8Validator { pending: [0; 3], pending_len: 0 }
    }

    /// Validates the next chunk of the message. Fails as soon as the bytes
    /// seen so far cannot be the start of valid UTF-8, including when the
    /// chunk ends in a sequence that no continuation could make valid.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            // Complete the character the previous chunk cut, on a small stack
            // copy, then go on with the rest of the chunk.
            let have = usize::from(self.pending_len).min(self.pending.len());
            let need = sequence_len(self.pending[0]);
            let take = need.saturating_sub(have).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            let mut joined = [0u8; 4];
            joined[..have].copy_from_slice(&self.pending[..have]);
            joined[have..have + take].copy_from_slice(head);
            let joined = &joined[..have + take];
            match std::str::from_utf8(joined) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() && rest.is_empty() => {
                    // Still a valid prefix and the chunk is used up.
                    return self.keep_pending(joined);
                }
                Err(_) => return Err(InvalidUtf8),
            }
            bytes = rest;
        }
        // Valid text, the common case, is checked with SIMD (the standard
        // library's check was a tenth of the shard's time echoing 16 KiB
        // texts); only a failure is looked at again for where it failed.
        if simdutf8::basic::from_utf8(bytes).is_ok() {
            return Ok(());
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                self.keep_pending(bytes.get(e.valid_up_to()..).unwrap_or(&[]))
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Ends the message: fails if it stopped in the middle of a character.
    /// Either way the validator is ready for the next message.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let complete = self.pending_len == 0;
        self.reset();
        if complete { Ok(()) } else { Err(InvalidUtf8) }
    }

    /// Forgets any partial character, ready for a new message.
    pub fn reset(&mut self) {
        self.pending_len = 0;
    }

    /// Whether the bytes fed so far end on a character boundary.
    pub fn is_complete(&self) -> bool {
        self.pending_len == 0
    }

    fn keep_pending(&mut self, tail: &[u8]) -> Result<(), InvalidUtf8> {
        // `from_utf8` reports an incomplete (not invalid) tail only for a
        // prefix of a 2- to 4-byte character, so at most 3 bytes; anything
        // else would be a broken assumption, and is refused, not panicked on.
        let Some(slot) = self.pending.get_mut(..tail.len()) else {
            return Err(InvalidUtf8);
        };
        slot.copy_from_slice(tail);
        // Lossless: tail.len() <= 3.
        self.pending_len = tail.len() as u8;
        Ok(())
    }
}

/// The length of the character a (valid) leading byte starts.
fn sequence_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `bytes` is valid UTF-8 or a valid UTF-8 text cut short: the
    /// exact condition under which a fail-fast validator must not fail yet.
    fn is_valid_prefix(bytes: &[u8]) -> bool {
        match std::str::from_utf8(bytes) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        }
    }

    fn validate_in_chunks(bytes: &[u8], cuts: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut at = 0;
        for &cut in cuts {
            v.feed(&bytes[at..cut])?;
            at = cut;
        }
        v.feed(&bytes[at..])?;
        v.finish()
    }

    fn samples() -> Vec<Vec<u8>> {
        let mut s: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"Hello-\xc2\xb5@\xc3\x9f\xc3\xb6\xc3\xa4\xc3\xbc\xc3\xa0\xc3\xa1-UTF-8!!".to_vec(),
            "κόσμε".as_bytes().to_vec(),
            "客服 🎧 ok".as_bytes().to_vec(),
            "\u{10ffff}\u{ffff}\u{fffd}\u{7f}\u{80}\u{7ff}\u{800}\u{d7ff}\u{e000}".as_bytes().to_vec(),
            // Autobahn 6.x style failures.
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80\x65\x64\x69\x74\x65\x64".to_vec(),
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80\x65\x64\x69\x74\x65\x64".to_vec(),
            b"\xf4\x90\x80\x80".to_vec(),
            b"\xed\xa0\x80".to_vec(),
            b"\xed\xbf\xbf".to_vec(),
            b"\xc0\xaf".to_vec(),
            b"\xc1\xbf".to_vec(),
            b"\xe0\x80\xaf".to_vec(),
            b"\xe0\x9f\xbf".to_vec(),
            b"\xf0\x80\x80\xaf".to_vec(),
            b"\xf0\x8f\xbf\xbf".to_vec(),
            b"\xf5\x80\x80\x80".to_vec(),
            b"\xf8\x88\x80\x80\x80".to_vec(),
            b"\xfe".to_vec(),
            b"\xff".to_vec(),
            b"\x80".to_vec(),
            b"\xbf".to_vec(),
            b"a\xc2".to_vec(),
            b"a\xe2\x82".to_vec(),
            b"a\xf0\x9f\x8e".to_vec(),
            b"\xe2\x82\x41".to_vec(),
            b"\xf0\x9f\x41\x41".to_vec(),
            b"\xc2\xc2\xa9".to_vec(),
        ];
        // Every 1-, 2- and 3-byte combination from a set of interesting
        // bytes: boundaries of every UTF-8 rule.
        let edge = [
            0x00u8, 0x41, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xe1, 0xec,
            0xed, 0xee, 0xef, 0xf0, 0xf1, 0xf3, 0xf4, 0xf5, 0xff,
        ];
        for &a in &edge {
            s.push(vec![a]);
            for &b in &edge {
                s.push(vec![a, b]);
                for &c in &edge {
                    s.push(vec![a, b, c, 0x80]);
                }
            }
        }
        s
    }

    #[test]
    fn agrees_with_std_for_every_split_into_up_to_three_chunks() {
        for bytes in samples() {
            let expected = std::str::from_utf8(&bytes).is_ok();
            for i in 0..=bytes.len() {
                assert_eq!(validate_in_chunks(&bytes, &[i]).is_ok(), expected, "{bytes:x?} cut at {i}");
                if bytes.len() <= 12 {
                    for j in i..=bytes.len() {
                        assert_eq!(
                            validate_in_chunks(&bytes, &[i, j]).is_ok(),
                            expected,
                            "{bytes:x?} cut at {i} and {j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fails_on_exactly_the_first_byte_that_makes_the_text_impossible() {
        for bytes in samples() {
            let mut v = Utf8Validator::new();
            let failed_at = (0..bytes.len()).find(|&i| v.feed(&bytes[i..=i]).is_err());
            let expected = (0..bytes.len()).find(|&i| !is_valid_prefix(&bytes[..=i]));
            assert_eq!(failed_at, expected, "{bytes:x?}");
        }
    }

    #[test]
    fn a_hopeless_partial_sequence_at_a_chunk_end_fails_at_once() {
        for bad in [&b"\xf4\x90"[..], b"\xed\xa0", b"\xe0\x80", b"\xf0\x80", b"\xc0", b"\xf5"] {
            let mut v = Utf8Validator::new();
            assert_eq!(v.feed(b"ok "), Ok(()));
            assert_eq!(v.feed(bad), Err(InvalidUtf8), "{bad:x?}");
        }
        // The same split over two chunks.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xf4"), Ok(()));
        assert_eq!(v.feed(b"\x90"), Err(InvalidUtf8));
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xed"), Ok(()));
        assert_eq!(v.feed(b"\xa0"), Err(InvalidUtf8));
    }

    #[test]
    fn a_character_split_byte_by_byte_is_accepted() {
        let text = "a€𝄞b";
        let mut v = Utf8Validator::new();
        for (i, b) in text.as_bytes().iter().enumerate() {
            assert_eq!(v.feed(std::slice::from_ref(b)), Ok(()), "byte {i}");
        }
        assert!(v.is_complete());
        assert_eq!(v.finish(), Ok(()));
    }

    #[test]
    fn empty_chunks_change_nothing() {
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b""), Ok(()));
        assert_eq!(v.feed(b"\xe2"), Ok(()));
        assert_eq!(v.feed(b""), Ok(()));
        assert!(!v.is_complete());
        assert_eq!(v.feed(b"\x82"), Ok(()));
        assert_eq!(v.feed(b""), Ok(()));
        assert_eq!(v.feed(b"\xac"), Ok(()));
        assert_eq!(v.finish(), Ok(()));
    }

    #[test]
    fn finish_fails_on_a_cut_character_and_resets() {
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed("é".as_bytes().split_at(1).0), Ok(()));
        assert_eq!(v.finish(), Err(InvalidUtf8));
        // Ready for the next message.
        assert_eq!(v.feed(b"fine"), Ok(()));
        assert_eq!(v.finish(), Ok(()));
    }

    #[test]
    fn reset_forgets_a_partial_character() {
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xf0\x9f"), Ok(()));
        v.reset();
        assert!(v.is_complete());
        assert_eq!(v.feed(b"\x41"), Ok(()));
        assert_eq!(v.finish(), Ok(()));
        assert_eq!(InvalidUtf8.to_string(), "invalid UTF-8");
    }
}
