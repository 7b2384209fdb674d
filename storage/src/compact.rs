//! The compact format of a logged message: the packed format (a first
//! byte with bit 7 set, schema version 13 on; its last string bare since
//! 16), and format 2 before it.
//!
//! Messages are nearly all of the log, and their rkyv archive (format 1)
//! spends 77 bytes on fixed fields before any text: three 8-byte numbers,
//! three 8-byte string headers, option and enum tags, and 17 bytes for an
//! attachment that is almost never there. This format writes the same
//! fields with variable-length numbers and lengths, and nothing for what is
//! absent: about 17 bytes of framing for a 100-byte text (BENCHMARKS.md,
//! "The compact message format").
//!
//! It departs from DESIGN.md's "the record is an rkyv archive" for
//! messages (and, in `compact_state.rs`, for conversation states,
//! profiles and read marks), and keeps what that rule is for: a reader gets a
//! [`MessageView`] borrowing every string straight from redb's page (no
//! copy; a packed cid is unpacked on the stack), and corrupt bytes are an
//! error, never a panic. Every other record
//! stays an rkyv archive, and messages stored in format 1 read as before.
//!
//! ```text
//! head  conv  seq  ts_ms  cid  sender_id  sender_name  [text]  [mime  bytes]
//! head  conv  seq  ts_ms  cid  back                    [text]  [mime  bytes]
//! ```
//!
//! Numbers are unsigned LEB128 (at most 10 bytes, no bits beyond 64, no
//! padding: a last byte of 0 only for the number 0 itself); every string
//! and the attachment's bytes are a LEB128 length then the bytes, strings
//! UTF-8, but the last: the attachment's bytes if there are any, else the
//! text, which runs to the value's end without a length (schema version
//! 16 on: a byte a message, redb keeps the value's length anyway; versions
//! 13 to 15 wrote that length too, and the upgrade to 16 rewrote every
//! such message, `repack_v15`, so a reader never has to tell them
//! apart). `head` is one byte: bit 7 set (no other format's first byte has
//! it), the flags in bits 4 to 6, and in bits 0 to 3 the role (0 visitor,
//! 1 agent, 2 bot) × 5 + the cid's form (0 text, 1 decimal, 2 hex, 3
//! base64url, 4 UUID: `cid.rs`, which says how `cid` is stored in each).
//! The flags: bit 0 a text, bit 1 an attachment, bit 2 a sender stored
//! elsewhere. A value cut short reads as an error up to its last string,
//! and within it as a shorter string: the record trusts redb's own length
//! of the value there, as it trusts redb's key.
//!
//! Schema versions 6 to 12 wrote format 2, which every reader still reads:
//!
//! ```text
//! 2  conv  seq  ts_ms  role  flags  cid  sender_id  sender_name  [text]  [mime  bytes]
//! 2  conv  seq  ts_ms  role  flags  cid  back                    [text]  [mime  bytes]
//! ```
//!
//! with `role` and `flags` a byte each (flags as above, in bits 0 to 2,
//! and no other bit) and the cid a string. The head byte and the packed
//! cid (schema version 13) took a message from 17 bytes beyond its
//! strings to 15, and kefu-bench's 23-byte cid to 13 bytes; the bare last
//! string (16) to 14.
//!
//! With bit 2 (schema version 12 on), the sender's id and name are those
//! of the message `back` (≥ 1) log records before this one, which holds
//! them itself and has the same role: the writer names a sender in full
//! once and points back at that record after (`senders.rs`), since the id
//! and name were ~49 of a soak's ~225 bytes per message. Log records are
//! never removed, and the writer forgets where senders were named
//! whenever a commit may have been lost (`senders.rs`), so the record
//! pointed at is there; [`access_log_in`](crate::record::access_log_in)
//! follows the pointer, and every view a reader hands out has its sender
//! in place.

use kefu_proto::client::Msg;
use kefu_proto::ids::Role;

use crate::cid::{self, Cid, Form};
use crate::error::StorageError;
use crate::record::{Attachment, MessageRecord, Sender};

/// The format byte of a message in this format.
pub(crate) const FORMAT_COMPACT_MESSAGE: u8 = 2;

/// The first byte of a message in the packed format (schema version 13
/// on) has this bit set; no other format's byte does.
const PACKED: u8 = 0x80;

const HAS_TEXT: u8 = 1;
const HAS_ATTACHMENT: u8 = 2;
const SENDER_BEFORE: u8 = 4;

/// A stored message, its strings borrowed from the bytes it was read from.
/// Both formats read into it, so readers need not know which one a
/// message was stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageView<'a> {
    /// The conversation.
    pub conv: u64,
    /// Position in the conversation: from 1, no gaps.
    pub seq: u64,
    /// Milliseconds since the epoch, set by the gateway.
    pub ts_ms: u64,
    /// The client's message id.
    pub cid: Cid<'a>,
    /// The author's role.
    pub role: Role,
    /// The author's user id.
    pub sender_id: &'a str,
    /// The author's display name at the time of writing.
    pub sender_name: &'a str,
    /// `Some(n)`: the sender's id and name are the message's `n` log
    /// records before this one, and `sender_id` and `sender_name` are
    /// empty until they are read from there. Never `Some` in a view a
    /// [`Reader`](crate::Reader) hands out.
    pub sender_back: Option<u64>,
    /// The text, if any.
    pub text: Option<&'a str>,
    /// The attachment, if any.
    pub attachment: Option<AttachmentView<'a>>,
}

/// A stored attachment, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachmentView<'a> {
    /// Its MIME type, as the sender declared it.
    pub mime: &'a str,
    /// The raw bytes.
    pub bytes: &'a [u8],
}

impl<'a> MessageView<'a> {
    /// The view of a message about to be stored at `seq`.
    pub(crate) fn of_msg(msg: &'a Msg, seq: u64) -> Self {
        MessageView {
            conv: msg.conv.0,
            seq,
            ts_ms: msg.ts,
            cid: Cid::from(msg.cid.as_str()),
            role: msg.from.role,
            sender_id: &msg.from.id,
            sender_name: &msg.from.name,
            sender_back: None,
            text: msg.text.as_deref(),
            attachment: msg.attachment.as_ref().map(|a| AttachmentView { mime: &a.mime, bytes: &a.data }),
        }
    }

    /// The view of an owned record.
    pub(crate) fn of_record(m: &'a MessageRecord) -> Self {
        MessageView {
            conv: m.conv,
            seq: m.seq,
            ts_ms: m.ts_ms,
            cid: Cid::from(m.cid.as_str()),
            role: m.from.role,
            sender_id: &m.from.id,
            sender_name: &m.from.name,
            sender_back: None,
            text: m.text.as_deref(),
            attachment: m.attachment.as_ref().map(|a| AttachmentView { mime: &a.mime, bytes: &a.bytes }),
        }
    }

    /// An owned copy. Of a view whose sender is still elsewhere
    /// (`sender_back`), the error: only a view read in place has one.
    pub fn to_record(&self) -> Result<MessageRecord, StorageError> {
        if let Some(back) = self.sender_back {
            return Err(StorageError::Corrupt {
                table: "log",
                key: format!("({}, {})", self.conv, self.seq),
                message: format!("its sender is in the record {back} before it, which was not read"),
            });
        }
        Ok(MessageRecord {
            conv: self.conv,
            seq: self.seq,
            cid: self.cid.as_str().to_owned(),
            from: Sender {
                role: self.role,
                id: self.sender_id.to_owned(),
                name: self.sender_name.to_owned(),
            },
            ts_ms: self.ts_ms,
            text: self.text.map(str::to_owned),
            attachment: self
                .attachment
                .map(|a| Attachment { mime: a.mime.to_owned(), bytes: a.bytes.to_vec() }),
        })
    }

    /// Writes the message to `out` (cleared first) in the packed format,
    /// reusing its capacity.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        let form = Form::of(self.cid.as_str());
        out.push(PACKED | self.flags() << 4 | (role_byte(self.role) * cid::FORMS + form as u8));
        put_varint(out, self.conv);
        put_varint(out, self.seq);
        put_varint(out, self.ts_ms);
        cid::put(out, form, self.cid.as_str());
        self.put_strings(out, true);
    }

    /// Writes the message to `out` (cleared first) in format 2, as builds
    /// before schema version 13 stored it: for the round trip of a message
    /// read in that format.
    pub(crate) fn encode_v2_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(FORMAT_COMPACT_MESSAGE);
        put_varint(out, self.conv);
        put_varint(out, self.seq);
        put_varint(out, self.ts_ms);
        out.push(role_byte(self.role));
        out.push(self.flags());
        put_bytes(out, self.cid.as_str().as_bytes());
        self.put_strings(out, false);
    }

    /// Writes the message to `out` (cleared first) in the packed format
    /// of schema versions 13 to 15, whose last string kept its length: for
    /// tests that make an older store.
    #[cfg(test)]
    pub(crate) fn encode_v15_into(&self, out: &mut Vec<u8>) {
        self.encode_into(out);
        out.truncate(out.len() - self.last_len());
        self.put_last(out, false);
    }

    /// The bytes of the message's last string (see [`Self::put_last`]).
    #[cfg(test)]
    fn last_len(&self) -> usize {
        match (self.text, self.attachment) {
            (_, Some(a)) => a.bytes.len(),
            (Some(t), None) => t.len(),
            (None, None) => 0,
        }
    }

    fn flags(&self) -> u8 {
        let bit = |set: bool, bit: u8| if set { bit } else { 0 };
        bit(self.text.is_some(), HAS_TEXT)
            | bit(self.attachment.is_some(), HAS_ATTACHMENT)
            | bit(self.sender_back.is_some(), SENDER_BEFORE)
    }

    /// What follows the cid in every format; with `last_to_end`, the
    /// message's last string has no length (see the module's doc).
    fn put_strings(&self, out: &mut Vec<u8>, last_to_end: bool) {
        match self.sender_back {
            Some(back) => put_varint(out, back),
            None => {
                put_bytes(out, self.sender_id.as_bytes());
                put_bytes(out, self.sender_name.as_bytes());
            }
        }
        if let (Some(text), Some(_)) = (self.text, self.attachment) {
            put_bytes(out, text.as_bytes());
        }
        if let Some(a) = self.attachment {
            put_bytes(out, a.mime.as_bytes());
        }
        self.put_last(out, last_to_end);
    }

    /// The message's last string: the attachment's bytes if it has one,
    /// else its text (if any), bare with `to_end`, else after its length.
    fn put_last(&self, out: &mut Vec<u8>, to_end: bool) {
        let last = match (self.text, self.attachment) {
            (_, Some(a)) => a.bytes,
            (Some(t), None) => t.as_bytes(),
            (None, None) => return,
        };
        if to_end {
            out.extend_from_slice(last);
        } else {
            put_bytes(out, last);
        }
    }

    /// Reads a message in the packed format whose first byte is `head`
    /// (`bytes`: the rest). The error is the reason, for
    /// [`StorageError::Corrupt`](crate::StorageError::Corrupt).
    pub(crate) fn decode_packed(head: u8, bytes: &'a [u8]) -> Result<Self, String> {
        Self::decode_packed_as(head, bytes, true)
    }

    /// [`Self::decode_packed`], with `last_to_end` false: the packed
    /// format of schema versions 13 to 15, whose last string kept its
    /// length.
    fn decode_packed_as(head: u8, bytes: &'a [u8], last_to_end: bool) -> Result<Self, String> {
        debug_assert!(is_packed(head));
        let (flags, low) = ((head & !PACKED) >> 4, head & 0x0f);
        let (role, form) = (role_of_byte(low / cid::FORMS)?, low % cid::FORMS);
        let form = Form::of_number(form).ok_or_else(|| format!("cid form {form} is unknown"))?;
        let mut r = Cursor { bytes };
        let conv = r.varint("conv")?;
        let seq = r.varint("seq")?;
        let ts_ms = r.varint("ts_ms")?;
        let cid = cid::read(&mut r, form)?;
        Self::decode_strings(r, (conv, seq, ts_ms, cid, role), flags, last_to_end)
    }

    /// Reads a message in format 2 (`bytes` without its format byte).
    /// The error is the reason, for [`StorageError::Corrupt`](crate::StorageError::Corrupt).
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self, String> {
        let mut r = Cursor { bytes };
        let conv = r.varint("conv")?;
        let seq = r.varint("seq")?;
        let ts_ms = r.varint("ts_ms")?;
        let role = role_of_byte(r.byte("role")?)?;
        let flags = r.byte("flags")?;
        let cid = Cid::from(r.str("cid")?);
        Self::decode_strings(r, (conv, seq, ts_ms, cid, role), flags, false)
    }

    /// What follows the cid in every format, and the view; with
    /// `last_to_end`, the last string is the rest of the value.
    fn decode_strings(
        mut r: Cursor<'a>,
        (conv, seq, ts_ms, cid, role): (u64, u64, u64, Cid<'a>, Role),
        flags: u8,
        last_to_end: bool,
    ) -> Result<Self, String> {
        if flags & !(HAS_TEXT | HAS_ATTACHMENT | SENDER_BEFORE) != 0 {
            return Err(format!("flags {flags:#04x} has unknown bits"));
        }
        let (sender_id, sender_name, sender_back) = if flags & SENDER_BEFORE != 0 {
            match r.varint("sender's record")? {
                0 => return Err("its sender's record is itself".to_string()),
                back => ("", "", Some(back)),
            }
        } else {
            (r.str("sender id")?, r.str("sender name")?, None)
        };
        let attached = flags & HAS_ATTACHMENT != 0;
        let text = match flags & HAS_TEXT != 0 {
            false => None,
            true if last_to_end && !attached => Some(utf8(r.rest(), "text")?),
            true => Some(r.str("text")?),
        };
        let attachment = match attached {
            false => None,
            true => {
                let mime = r.str("attachment mime")?;
                let bytes = if last_to_end { r.rest() } else { r.bytes("attachment bytes")? };
                Some(AttachmentView { mime, bytes })
            }
        };
        r.end()?;
        Ok(MessageView { conv, seq, ts_ms, cid, role, sender_id, sender_name, sender_back, text, attachment })
    }
}

/// `value` (a log record, format byte included) as schema version 16
/// stores it: a message in the packed format of versions 13 to 15 is
/// written again with its last string bare (`Some`); any other record is
/// stored as it is (`None`). For the upgrade to version 16 and the replay
/// of a version 15 write-ahead log. The error is the reason, for
/// [`StorageError::Corrupt`](crate::StorageError::Corrupt).
#[doc(hidden)]
pub fn repack_v15(value: &[u8]) -> Result<Option<Vec<u8>>, String> {
    match value.split_first() {
        Some((&head, rest)) if is_packed(head) => {
            let mut out = Vec::with_capacity(value.len());
            MessageView::decode_packed_as(head, rest, false)?.encode_into(&mut out);
            Ok(Some(out))
        }
        _ => Ok(None),
    }
}

/// `value` as schema versions 13 to 15 stored it: the inverse of
/// [`repack_v15`], for tests that make an older store.
#[cfg(test)]
pub(crate) fn as_v15(value: &[u8]) -> Vec<u8> {
    match value.split_first() {
        Some((&head, rest)) if is_packed(head) => {
            let mut out = Vec::new();
            MessageView::decode_packed(head, rest).unwrap().encode_v15_into(&mut out);
            out
        }
        _ => value.to_vec(),
    }
}

fn utf8<'a>(bytes: &'a [u8], field: &str) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("its {field} is not UTF-8: {e}"))
}

/// Whether a value whose first byte is `b` is a message in the packed
/// format.
pub(crate) fn is_packed(b: u8) -> bool {
    b & PACKED != 0
}

/// Reads `value` as a compact message (format byte included) and writes
/// it again, a pointer back for its sender included: the fuzz target's
/// view of what a read takes apart before the log completes it (an
/// encoding is unique, so an accepted value comes back byte for byte).
#[doc(hidden)]
pub fn message_round_trip(value: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(value.len());
    match value.split_first() {
        Some((&FORMAT_COMPACT_MESSAGE, rest)) => MessageView::decode(rest)?.encode_v2_into(&mut out),
        Some((&head, rest)) if is_packed(head) => {
            MessageView::decode_packed(head, rest)?.encode_into(&mut out)
        }
        _ => return Err("not a compact message".to_string()),
    }
    Ok(out)
}

pub(crate) fn role_byte(role: Role) -> u8 {
    match role {
        Role::Visitor => 0,
        Role::Agent => 1,
        Role::Bot => 2,
    }
}

pub(crate) fn role_of_byte(b: u8) -> Result<Role, String> {
    match b {
        0 => Ok(Role::Visitor),
        1 => Ok(Role::Agent),
        2 => Ok(Role::Bot),
        b => Err(format!("role byte {b} is none of 0, 1, 2")),
    }
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What is left of a value being read.
pub(crate) struct Cursor<'a> {
    pub(crate) bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn byte(&mut self, field: &str) -> Result<u8, String> {
        let (&b, rest) = self.bytes.split_first().ok_or_else(|| format!("ends before its {field}"))?;
        self.bytes = rest;
        Ok(b)
    }

    pub(crate) fn varint(&mut self, field: &str) -> Result<u64, String> {
        let mut n = 0u64;
        for i in 0..10 {
            let b = self.byte(field)?;
            let bits = u64::from(b & 0x7f);
            // The tenth byte may carry one bit (bit 63) and no more.
            if i == 9 && b > 1 {
                return Err(format!("its {field} does not fit in 64 bits"));
            }
            n |= bits << (7 * i);
            if b & 0x80 == 0 {
                // A last byte of 0 after the first only pads: refused, so
                // that a record has one encoding and padding reads as damage.
                if i > 0 && b == 0 {
                    return Err(format!("its {field} is padded"));
                }
                return Ok(n);
            }
        }
        unreachable!("the tenth byte returns or fails above")
    }

    /// Eight bytes, little-endian: for numbers spread over all 64 bits
    /// (hashes), which a varint would make longer.
    pub(crate) fn u64_le(&mut self, field: &str) -> Result<u64, String> {
        let Some((head, rest)) = self.bytes.split_first_chunk::<8>() else {
            return Err(format!("ends before its {field}"));
        };
        self.bytes = rest;
        Ok(u64::from_le_bytes(*head))
    }

    /// Two bytes, little-endian: a dedupe slot in an index run.
    pub(crate) fn u16_le(&mut self, field: &str) -> Result<u16, String> {
        let Some((head, rest)) = self.bytes.split_first_chunk::<2>() else {
            return Err(format!("ends before its {field}"));
        };
        self.bytes = rest;
        Ok(u16::from_le_bytes(*head))
    }

    /// Four bytes, little-endian: a dedupe slot in an index run of schema
    /// versions 11 to 13.
    pub(crate) fn u32_le(&mut self, field: &str) -> Result<u32, String> {
        let Some((head, rest)) = self.bytes.split_first_chunk::<4>() else {
            return Err(format!("ends before its {field}"));
        };
        self.bytes = rest;
        Ok(u32::from_le_bytes(*head))
    }

    pub(crate) fn bytes(&mut self, field: &str) -> Result<&'a [u8], String> {
        let len = self.varint(field)?;
        self.take(len, field)
    }

    /// The next `len` bytes.
    pub(crate) fn take(&mut self, len: u64, field: &str) -> Result<&'a [u8], String> {
        if len > self.bytes.len() as u64 {
            return Err(format!("its {field} is {len} bytes, {} are left", self.bytes.len()));
        }
        let (head, rest) = self.bytes.split_at(len as usize);
        self.bytes = rest;
        Ok(head)
    }

    pub(crate) fn str(&mut self, field: &str) -> Result<&'a str, String> {
        let bytes = self.bytes(field)?;
        utf8(bytes, field)
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// A value ends exactly where its last field does.
    pub(crate) fn end(&self) -> Result<(), String> {
        match self.bytes.len() {
            0 => Ok(()),
            n => Err(format!("{n} bytes after the last field")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::message_record as message;

    /// Encoded as the writer stores a message.
    fn encode_message(record: &MessageRecord) -> Vec<u8> {
        crate::encode_log_record(&crate::LogRecord::Message(record.clone())).unwrap()
    }

    /// Read as every reader reads a log value; anything but a message is
    /// an error here.
    fn decode(bytes: &[u8]) -> Result<MessageRecord, String> {
        match crate::decode_log_record(bytes) {
            Ok(crate::LogRecord::Message(m)) => Ok(m),
            Ok(other) => Err(format!("not a message: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn messages_round_trip_with_and_without_text_and_attachment() {
        let full = message();
        let mut shapes = vec![full.clone()];
        shapes.push(MessageRecord { attachment: None, ..full.clone() });
        shapes.push(MessageRecord { text: None, ..full.clone() });
        shapes.push(MessageRecord { text: None, attachment: None, cid: String::new(), ..full.clone() });
        shapes.push(MessageRecord {
            conv: u64::MAX,
            seq: u64::MAX,
            ts_ms: 0,
            from: Sender { role: Role::Bot, id: String::new(), name: "x".repeat(300) },
            ..full.clone()
        });
        shapes.push(MessageRecord { from: Sender { role: Role::Visitor, ..full.from.clone() }, ..full });
        for m in shapes {
            assert_eq!(decode(&encode_message(&m)).unwrap(), m);
        }
    }

    /// What the format is for: a 100-byte text with kefu-bench's shapes
    /// (its 23-byte cid, a 37-byte sender id, a 12-byte name) costs 14
    /// bytes beyond its strings, the cid packed into 12 (15 in versions 13
    /// to 15, the text's length among them); format 2 took 17 and the cid
    /// whole, the rkyv archive 77.
    #[test]
    fn a_text_message_costs_14_bytes_beyond_its_strings() {
        let m = MessageRecord {
            conv: 12_345,
            seq: 1_234,
            cid: "1-123456-98765432101234".into(),
            from: Sender { role: Role::Visitor, id: "v".repeat(37), name: "n".repeat(12) },
            ts_ms: 1_796_000_000_000,
            text: Some("t".repeat(100)),
            attachment: None,
        };
        let strings = 37 + 12 + 100;
        assert_eq!(encode_message(&m).len() - strings, 14 + 12);
        let mut v15 = Vec::new();
        MessageView::of_record(&m).encode_v15_into(&mut v15);
        assert_eq!(v15.len() - strings, 15 + 12);
        let mut v2 = Vec::new();
        MessageView::of_record(&m).encode_v2_into(&mut v2);
        assert_eq!(v2.len() - strings, 17 + 23);
        assert_eq!(decode(&v2).unwrap(), m, "format 2 still reads");
        let archived = crate::record::encode(&crate::LogRecord::Message(m)).unwrap();
        assert_eq!(archived.len() - strings - 23, 1 + 76, "format byte + the archive's fixed part");
    }

    /// A message that points back for its sender: the pointer in place of
    /// the id and name, 48 bytes fewer for kefu-bench's shapes; read
    /// alone it has no sender yet, and only the log completes it.
    #[test]
    fn a_sender_pointed_at_takes_its_pointer_not_its_strings() {
        let record = MessageRecord {
            from: Sender { role: Role::Agent, id: "a".repeat(37), name: "n".repeat(12) },
            ..message()
        };
        let in_full = encode_message(&record);
        let view = MessageView::of_record(&record);
        let mut pointing = Vec::new();
        MessageView { sender_back: Some(300), ..view }.encode_into(&mut pointing);
        assert_eq!(in_full.len() - pointing.len(), 37 + 12 + 2 - 2, "two lengths out, a two-byte pointer in");
        let read = MessageView::decode_packed(pointing[0], &pointing[1..]).unwrap();
        assert_eq!(
            read,
            MessageView { sender_id: "", sender_name: "", sender_back: Some(300), ..view },
            "the role stays in the record"
        );
        assert!(read.to_record().is_err(), "a view without its sender is not a record");
        assert!(decode(&pointing).unwrap_err().contains("not read"));
        // A pointer of 0 would be the record itself.
        let mut zero = Vec::new();
        MessageView { sender_back: Some(0), ..view }.encode_into(&mut zero);
        assert!(MessageView::decode_packed(zero[0], &zero[1..]).unwrap_err().contains("itself"));
        // The pointer is a seed the fuzzer starts from, in both formats.
        let seed = include_bytes!("../../fuzz/corpus/log_record/seed-packed-sender-pointed-at");
        assert_eq!(&pointing[..], seed);
        assert_eq!(message_round_trip(seed).unwrap(), seed);
        let seed = include_bytes!("../../fuzz/corpus/log_record/seed-sender-pointed-at");
        assert_eq!(decode(seed).unwrap_err(), decode(&pointing).unwrap_err(), "the same message in format 2");
        assert_eq!(message_round_trip(seed).unwrap(), seed);
    }

    /// The fuzzer's seeds for this format (`fuzz/corpus/log_record`): the
    /// `seed-packed-v15-*` were written by hand, from the layout in this
    /// module's doc as versions 13 to 15 had it, and the `seed-packed-*`
    /// are those repacked ([`repack_v15`]). They must read as the messages
    /// they were meant to be, and encode back to the same bytes; the
    /// format 2 seeds read as the same messages.
    #[test]
    fn the_layout_in_the_doc_is_the_layout_read() {
        let seed = include_bytes!("../../fuzz/corpus/log_record/seed-packed-message");
        assert_eq!(decode(seed).unwrap(), message());
        assert_eq!(encode_message(&message()), seed);
        for (old, new) in [
            (&include_bytes!("../../fuzz/corpus/log_record/seed-packed-v15-message")[..], &seed[..]),
            (
                include_bytes!("../../fuzz/corpus/log_record/seed-packed-v15-uuid-text"),
                include_bytes!("../../fuzz/corpus/log_record/seed-packed-uuid-text"),
            ),
            (
                include_bytes!("../../fuzz/corpus/log_record/seed-packed-v15-decimal-text"),
                include_bytes!("../../fuzz/corpus/log_record/seed-packed-decimal-text"),
            ),
            (
                include_bytes!("../../fuzz/corpus/log_record/seed-packed-v15-sender-pointed-at"),
                include_bytes!("../../fuzz/corpus/log_record/seed-packed-sender-pointed-at"),
            ),
        ] {
            assert_eq!(repack_v15(old).unwrap().as_deref(), Some(new));
            assert_eq!(new.len(), old.len() - 1, "the last string's length, one byte, is gone");
        }
        let v2 = include_bytes!("../../fuzz/corpus/log_record/seed-compact-message");
        assert_eq!(decode(v2).unwrap(), message());
        assert_eq!(message_round_trip(v2).unwrap(), v2);
        let text = include_bytes!("../../fuzz/corpus/log_record/seed-compact-text");
        let m = decode(text).unwrap();
        assert_eq!(
            (m.conv, m.seq, m.from.role, m.text.as_ref().map(String::len)),
            (12_345, 1, Role::Visitor, Some(100))
        );
        assert_eq!(message_round_trip(text).unwrap(), text);
        for (seed, cid) in [
            (
                &include_bytes!("../../fuzz/corpus/log_record/seed-packed-uuid-text")[..],
                "3b241101-e2bb-4255-8caf-4136c566a962",
            ),
            (
                &include_bytes!("../../fuzz/corpus/log_record/seed-packed-decimal-text")[..],
                "1-123456-98765432101234",
            ),
        ] {
            let m = decode(seed).unwrap();
            assert_eq!(
                (m.conv, m.seq, m.cid.as_str(), m.from.id.as_str(), m.text.as_ref().map(String::len)),
                (12_345, 1, cid, "v-1", Some(100))
            );
            assert_eq!(encode_message(&m), seed);
        }
    }

    /// Every shape of a version 15 message repacks to what this version
    /// writes, one byte shorter (two for a last string of 128 bytes or
    /// more); a record in another format is left as it is.
    #[test]
    fn a_version_15_message_repacks_to_this_versions_bytes() {
        let full = message();
        let view = MessageView::of_record(&full);
        let long = "长".repeat(50);
        let shapes = [
            view,
            MessageView { attachment: None, ..view },
            MessageView { text: None, ..view },
            MessageView { text: None, attachment: None, ..view },
            MessageView { sender_id: "", sender_name: "", sender_back: Some(7), attachment: None, ..view },
            MessageView { text: Some(long.as_str()), attachment: None, ..view },
        ];
        for (i, m) in shapes.into_iter().enumerate() {
            let (mut old, mut new) = (Vec::new(), Vec::new());
            m.encode_v15_into(&mut old);
            m.encode_into(&mut new);
            assert_eq!(repack_v15(&old).unwrap(), Some(new.clone()), "shape {i}");
            let saved = match (m.text, m.attachment) {
                (None, None) => 0,
                (Some(t), None) if t.len() >= 128 => 2,
                _ => 1,
            };
            assert_eq!(old.len() - new.len(), saved, "shape {i}");
            assert_eq!(MessageView::decode_packed(new[0], &new[1..]).unwrap(), m, "shape {i}");
        }
        let mut v2 = Vec::new();
        view.encode_v2_into(&mut v2);
        assert_eq!(repack_v15(&v2).unwrap(), None);
        assert!(repack_v15(&[PACKED]).is_err(), "a damaged message is an error");
    }

    #[test]
    fn varints_take_every_width_and_refuse_more_than_64_bits() {
        for n in [0, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, 1 << 63, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            assert_eq!(Cursor { bytes: &out }.varint("n").unwrap(), n);
        }
        // Eleven bytes, and a tenth byte with more than bit 63.
        assert!(Cursor { bytes: &[0x80; 11] }.varint("n").is_err());
        // Padded: 7 and 0 in more bytes than they take.
        assert!(Cursor { bytes: &[0x87, 0x80, 0x00] }.varint("n").unwrap_err().contains("padded"));
        assert!(Cursor { bytes: &[0x80, 0x00] }.varint("n").is_err());
        let mut too_big = vec![0xff; 9];
        too_big.push(0x02);
        assert!(Cursor { bytes: &too_big }.varint("n").is_err());
    }

    #[test]
    fn corrupt_bytes_are_an_error_not_a_panic() {
        let packed = encode_message(&message());
        let mut v2 = Vec::new();
        MessageView::of_record(&message()).encode_v2_into(&mut v2);
        assert!(decode(&[]).is_err());
        assert!(decode(&[FORMAT_COMPACT_MESSAGE]).is_err());
        assert!(decode(&[PACKED]).is_err());
        // Format 2 and a message of versions 13 to 15: every truncation
        // fails, the last field ends the value.
        let mut v15 = Vec::new();
        MessageView::of_record(&message()).encode_v15_into(&mut v15);
        let old = |b: &[u8]| MessageView::decode_packed_as(b[0], &b[1..], false).map(|_| ());
        for len in 1..v15.len() {
            assert!(old(&v15[..len]).is_err(), "a version 15 value cut at {len} read");
        }
        for len in 0..v2.len() {
            assert!(decode(&v2[..len]).is_err(), "a format 2 value cut at {len} read");
        }
        // Packed: the last string is the rest of the value (redb keeps
        // the value's length), so a cut before it fails and one within it
        // reads shorter.
        let last = message().attachment.unwrap().bytes.len();
        for len in 0..packed.len() - last {
            assert!(decode(&packed[..len]).is_err(), "a value cut at {len} read");
        }
        assert_eq!(decode(&packed[..packed.len() - 1]).unwrap().attachment.unwrap().bytes.len(), last - 1);
        for bytes in [&packed, &v2] {
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode(&longer).is_err(), bytes == &v2, "a byte more is an error in format 2 only");
            // Single-bit flips anywhere: an error or a well-formed record.
            for b in crate::testkit::bit_flips(bytes, 5000) {
                let _ = decode(&b);
            }
        }
        // Packed: a head whose role is 3; a sender id that is not UTF-8
        // (after head, conv, seq, ts and the cid's 5 bytes).
        let mut b = packed.clone();
        b[0] = PACKED | 0x0f;
        assert!(decode(&b).unwrap_err().contains("role byte 3"));
        let mut b = packed.clone();
        b[1 + 1 + 1 + 6 + 5 + 1] = 0xff;
        assert!(decode(&b).unwrap_err().contains("not UTF-8"));
        // Format 2: a bad role, unknown flags, a string that is not UTF-8.
        let at_role = 1 + 1 + 1 + 6;
        let mut b = v2.clone();
        b[at_role] = 3;
        assert!(decode(&b).unwrap_err().contains("role byte 3"));
        let mut b = v2.clone();
        b[at_role + 1] = 8;
        assert!(decode(&b).unwrap_err().contains("unknown bits"));
        let mut b = v2.clone();
        b[at_role + 3] = 0xff;
        assert!(decode(&b).unwrap_err().contains("not UTF-8"));
    }
}
