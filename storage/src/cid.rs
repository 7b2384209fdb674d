//! A client message id as a stored message holds it: packed when it is
//! made of few symbols.
//!
//! The cid is the one string of a message that only its client makes
//! sense of (it matches its sends to their acks and echoes by it), and
//! after the text the largest part of a stored message (23.7 of the
//! soak's 175.1 bytes per message, BENCHMARKS.md). Clients make cids
//! from few symbols: a counter or a timestamp (digits and a separator:
//! kefu-bench's `thread-number-due`, chat-tungstenite's sixteen digits), a
//! random hex or base64url string, or a UUID (`crypto.randomUUID()`). Such
//! a cid is stored in one of five forms, the first of these it fits:
//!
//! | form | symbols | stored as |
//! | --- | --- | --- |
//! | [`Form::Uuid`] | a canonical lowercase UUID, `8-4-4-4-12` hex digits | its 16 bytes |
//! | [`Form::Decimal`] | `0123456789+-./:_`, at most 64 | the count, then 4 bits a symbol |
//! | [`Form::Hex`] | `0123456789abcdef`, at most 64 | the count, then 4 bits a symbol |
//! | [`Form::Base64`] | `A–Z a–z 0–9 - _`, at most 64 | the count, then 6 bits a symbol |
//! | [`Form::Text`] | anything else | the length, then the UTF-8 bytes |
//!
//! Symbols are packed from the low bits of the first byte up, each as its
//! index in the form's alphabet; the bits past the last symbol are 0. A
//! cid has exactly one encoding: a reader refuses a cid stored in a form
//! other than the first it fits, and padding bits that are not 0, as
//! damage (`fuzz/`, target `log_record`, checks that what is read encodes
//! back to the same bytes).
//!
//! A packed cid cannot be borrowed from redb's page as the other strings
//! are: a reader unpacks it into a [`Cid`] on the stack (64 bytes at most,
//! `CID_BYTES_MAX` in the core's config), so reads stay free of the heap.

use crate::compact::{Cursor, put_bytes, put_varint};

/// The longest cid packed: the core's `CID_BYTES_MAX`. A longer one (a
/// record written by a test or a future config) is stored as text.
pub(crate) const PACKED_MAX: usize = 64;

const DECIMAL: &[u8; 16] = b"0123456789+-./:_";
const HEX: &[u8; 16] = b"0123456789abcdef";
const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Where a UUID's dashes are.
const UUID_DASHES: [usize; 4] = [8, 13, 18, 23];

/// How a cid is stored (its number is part of a message's first byte,
/// `compact.rs`, so never renumber).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    Text = 0,
    Decimal = 1,
    Hex = 2,
    Base64 = 3,
    Uuid = 4,
}

/// The number of forms.
pub(crate) const FORMS: u8 = 5;

impl Form {
    /// The form numbered `n` (below [`FORMS`]).
    pub(crate) fn of_number(n: u8) -> Option<Form> {
        [Form::Text, Form::Decimal, Form::Hex, Form::Base64, Form::Uuid].get(usize::from(n)).copied()
    }

    /// The form `cid` is stored in: the first of the table's it fits.
    pub(crate) fn of(cid: &str) -> Form {
        let b = cid.as_bytes();
        if is_uuid(b) {
            Form::Uuid
        } else if b.len() > PACKED_MAX {
            Form::Text
        } else if b.iter().all(|&c| DECIMAL_INDEX[usize::from(c)] != NONE) {
            Form::Decimal
        } else if b.iter().all(|&c| HEX_INDEX[usize::from(c)] != NONE) {
            Form::Hex
        } else if b.iter().all(|&c| BASE64_INDEX[usize::from(c)] != NONE) {
            Form::Base64
        } else {
            Form::Text
        }
    }

    fn alphabet(self) -> Option<(&'static [u8], &'static [u8; 256], u32)> {
        match self {
            Form::Decimal => Some((DECIMAL, &DECIMAL_INDEX, 4)),
            Form::Hex => Some((HEX, &HEX_INDEX, 4)),
            Form::Base64 => Some((BASE64, &BASE64_INDEX, 6)),
            Form::Text | Form::Uuid => None,
        }
    }
}

const NONE: u8 = u8::MAX;

/// Each byte's index in `alphabet`, [`NONE`] for a byte not in it.
const fn index_of(alphabet: &[u8]) -> [u8; 256] {
    let mut table = [NONE; 256];
    let mut i = 0;
    while i < alphabet.len() {
        table[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    table
}

const DECIMAL_INDEX: [u8; 256] = index_of(DECIMAL);
const HEX_INDEX: [u8; 256] = index_of(HEX);
const BASE64_INDEX: [u8; 256] = index_of(BASE64);

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| {
            if UUID_DASHES.contains(&i) { c == b'-' } else { HEX_INDEX[usize::from(c)] != NONE }
        })
}

/// Appends `cid` in `form` (which must be [`Form::of`] it) to `out`.
pub(crate) fn put(out: &mut Vec<u8>, form: Form, cid: &str) {
    debug_assert_eq!(form, Form::of(cid), "a cid is stored in the first form it fits");
    let b = cid.as_bytes();
    if form == Form::Uuid {
        let mut digits = b.iter().filter(|&&c| c != b'-').map(|&c| HEX_INDEX[usize::from(c)]);
        while let (Some(high), Some(low)) = (digits.next(), digits.next()) {
            out.push(high << 4 | low);
        }
        return;
    }
    let Some((_, index, bits)) = form.alphabet() else {
        put_bytes(out, b);
        return;
    };
    put_varint(out, b.len() as u64);
    let (mut acc, mut held) = (0u32, 0u32);
    for &c in b {
        acc |= u32::from(index[usize::from(c)]) << held;
        held += bits;
        while held >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            held -= 8;
        }
    }
    if held > 0 {
        out.push(acc as u8);
    }
}

/// The bytes `cid` takes when stored, without its length or count: for
/// the disk bench's account of a message's bytes.
#[doc(hidden)]
pub fn stored_bytes(cid: &str) -> usize {
    let form = Form::of(cid);
    match form.alphabet() {
        Some((_, _, bits)) => (cid.len() * bits as usize).div_ceil(8),
        None if form == Form::Uuid => 16,
        None => cid.len(),
    }
}

/// Reads a cid stored in `form`; the error is the reason the bytes are
/// damaged.
pub(crate) fn read<'a>(r: &mut Cursor<'a>, form: Form) -> Result<Cid<'a>, String> {
    let cid = match (form, form.alphabet()) {
        (_, Some((alphabet, _, bits))) => {
            let count = r.varint("cid's length")?;
            if count > PACKED_MAX as u64 {
                return Err(format!("its packed cid is {count} symbols, more than {PACKED_MAX}"));
            }
            let bytes = r.take((count * u64::from(bits)).div_ceil(8), "cid")?;
            let mask = (1u32 << bits) - 1;
            let (mut acc, mut held, mut next) = (0u32, 0u32, bytes.iter());
            let mut out = Unpacked::default();
            for _ in 0..count {
                if held < bits {
                    // Cannot run out: `bytes` holds count × bits bits.
                    acc |= u32::from(*next.next().unwrap_or(&0)) << held;
                    held += 8;
                }
                out.push(alphabet[(acc & mask) as usize]);
                acc >>= bits;
                held -= bits;
            }
            if acc != 0 {
                return Err("its packed cid has bits set past its last symbol".to_string());
            }
            Cid(Repr::Unpacked(out))
        }
        (Form::Uuid, None) => {
            let mut out = Unpacked::default();
            for _ in 0..16 {
                let byte = r.byte("cid")?;
                for digit in [byte >> 4, byte & 0xf] {
                    if UUID_DASHES.contains(&usize::from(out.len)) {
                        out.push(b'-');
                    }
                    out.push(HEX[usize::from(digit)]);
                }
            }
            Cid(Repr::Unpacked(out))
        }
        (_, None) => Cid(Repr::Borrowed(r.str("cid")?)),
    };
    match Form::of(cid.as_str()) {
        f if f == form => Ok(cid),
        f => Err(format!("its cid is stored as {form:?}, but its first form is {f:?}")),
    }
}

/// A message's cid, read: borrowed from the page, or unpacked on the stack.
#[derive(Clone, Copy)]
pub struct Cid<'a>(Repr<'a>);

#[derive(Clone, Copy)]
enum Repr<'a> {
    Borrowed(&'a str),
    Unpacked(Unpacked),
}

/// The symbols of a packed cid, all ASCII.
#[derive(Clone, Copy)]
struct Unpacked {
    len: u8,
    bytes: [u8; PACKED_MAX],
}

impl Default for Unpacked {
    fn default() -> Self {
        Unpacked { len: 0, bytes: [0; PACKED_MAX] }
    }
}

impl Unpacked {
    /// Appends an ASCII byte; the callers stop at [`PACKED_MAX`].
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.bytes.get_mut(usize::from(self.len)) {
            *slot = b;
            self.len += 1;
        }
    }
}

impl<'a> Cid<'a> {
    /// The cid as written.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Borrowed(s) => s,
            // Only alphabet bytes are pushed, all ASCII: never the fallback.
            Repr::Unpacked(u) => std::str::from_utf8(&u.bytes[..usize::from(u.len)]).unwrap_or(""),
        }
    }
}

impl<'a> From<&'a str> for Cid<'a> {
    fn from(s: &'a str) -> Self {
        Cid(Repr::Borrowed(s))
    }
}

impl PartialEq for Cid<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Cid<'_> {}

impl PartialEq<str> for Cid<'_> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl std::fmt::Debug for Cid<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(cid: &str) -> (Form, Vec<u8>) {
        let form = Form::of(cid);
        let mut out = Vec::new();
        put(&mut out, form, cid);
        (form, out)
    }

    fn read_back(form: Form, bytes: &[u8]) -> Result<String, String> {
        let mut r = Cursor { bytes };
        let cid = read(&mut r, form)?;
        r.end()?;
        Ok(cid.as_str().to_owned())
    }

    /// What the forms are for, on the cids clients make: each comes back
    /// as itself, in the bytes the table says.
    #[test]
    fn cids_clients_make_are_packed_and_read_back() {
        let cases: &[(&str, Form, usize)] = &[
            // kefu-bench: thread-number-due (ns).
            ("1-123456-98765432101234", Form::Decimal, 1 + 12),
            // chat-tungstenite: sixteen digits.
            ("0000000000012345", Form::Decimal, 1 + 8),
            ("9f86d081884c7d659a2feaa0c55ad015", Form::Hex, 1 + 16),
            ("3b241101-e2bb-4255-8caf-4136c566a962", Form::Uuid, 16),
            // The widget's: 'w', base-36 time, base-36 random.
            ("wmiabc12xk3j9q0zp7", Form::Base64, 1 + 14),
            ("cid-1", Form::Base64, 1 + 4),
            ("", Form::Decimal, 1),
            ("7", Form::Decimal, 1 + 1),
            ("你好", Form::Text, 1 + 6),
            ("a b", Form::Text, 1 + 3),
            // A UUID in capitals is not canonical: base64url, 36 × 6 bits.
            ("3B241101-E2BB-4255-8CAF-4136C566A962", Form::Base64, 1 + 27),
        ];
        for &(cid, form, len) in cases {
            let (f, bytes) = stored(cid);
            assert_eq!((f, bytes.len()), (form, len), "{cid:?}");
            let prefix = usize::from(form != Form::Uuid);
            assert_eq!(stored_bytes(cid) + prefix, len, "{cid:?}");
            assert_eq!(read_back(form, &bytes).unwrap(), cid);
        }
        let long = "1".repeat(PACKED_MAX + 1);
        assert_eq!(stored(&long).0, Form::Text, "past 64 symbols a cid is text");
        assert_eq!(read_back(Form::Text, &stored(&long).1).unwrap(), long);
        let longest = "z".repeat(PACKED_MAX);
        assert_eq!(read_back(Form::Base64, &stored(&longest).1).unwrap(), longest);
    }

    /// One encoding per cid: a cid in a later form than its first, padding
    /// bits set, a count past 64 or past the bytes are all damage.
    #[test]
    fn a_cid_has_one_encoding_and_damage_is_an_error() {
        let mut text = Vec::new();
        put_bytes(&mut text, b"123");
        assert!(read_back(Form::Text, &text).unwrap_err().contains("first form is Decimal"));
        // The nibbles of "1234" read as hex: a decimal cid stored as hex.
        assert!(read_back(Form::Hex, &stored("1234").1).unwrap_err().contains("first form is Decimal"));
        assert_eq!(read_back(Form::Hex, &stored("abc1").1).unwrap(), "abc1");
        // "7" is one nibble: the high nibble must be 0.
        assert!(read_back(Form::Decimal, &[1, 0x17]).unwrap_err().contains("past its last symbol"));
        assert!(read_back(Form::Decimal, &[65]).unwrap_err().contains("more than 64"));
        assert!(read_back(Form::Decimal, &[4, 0x21]).is_err(), "four symbols need two bytes");
        assert!(read_back(Form::Uuid, &[0; 15]).is_err());
        assert_eq!(read_back(Form::Uuid, &[0; 16]).unwrap(), "00000000-0000-0000-0000-000000000000");
        for n in 0..FORMS {
            assert!(Form::of_number(n).is_some());
        }
        assert!(Form::of_number(FORMS).is_none());
    }
}
