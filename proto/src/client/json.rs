//! `kefu.v1.json`: one JSON object per WebSocket text frame.
//!
//! ```text
//! {"type":"send","id":7,"conv":"c42","cid":"m-1","text":"hi"}
//! {"type":"ack","id":7,"cid":"m-1","conv":"c42","seq":12,"ts":1767225600000}
//! ```
//!
//! `"type"` comes first and `"id"` second when present; every other field
//! sits beside them, optional ones omitted when absent. A `null` counts as
//! absent; unknown fields are ignored (so clients may be newer than the
//! gateway); of a key given twice the last wins, as in `JSON.parse`.
//! Attachment bytes are base64, standard alphabet, padded when written and
//! padding optional when read. `history.messages` entries are full `msg`
//! objects, `"type":"msg"` included.
//!
//! Decoding takes two steps so every error is precise and the command's
//! `id` survives most of them: the frame is first split into its top-level
//! fields as borrowed raw JSON (no copies, unknown keys skipped), then only
//! the fields the `"type"` needs are parsed, each with its own message.
//!
//! Encoding writes straight into the caller's buffer, never through an
//! intermediate value: the gateway encodes an event once and sends the same
//! bytes to every participant.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::check::{self, R, invalid, missing};
use super::*;
use crate::ids::{ConvId, ConvStatus, ErrorCode, PresenceStatus, Role};

/// Standard alphabet; writes padding, reads with or without it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Decodes a client's text frame (gateway side).
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    decode_client_reusing(bytes, &mut SpareStrings::new())
}

/// [`decode_client`], copying a `send`'s cid and text into `spare`'s buffers.
pub fn decode_client_reusing(bytes: &[u8], spare: &mut SpareStrings) -> Result<ClientFrame, DecodeError> {
    let (obj, id) = frame(bytes)?;
    let ty = obj.frame_type().map_err(|e| e.with_id(id.as_ref().ok().copied().flatten()))?;
    let parse: fn(&Obj<'_>, &mut SpareStrings) -> R<Command> = match ty.as_ref() {
        "connect" => |o, _| connect(o),
        "open" => |o, _| open(o),
        "send" => send,
        "read" => |o, _| read_cmd(o),
        "typing" => |o, _| Ok(Command::Typing { conv: o.conv(F::Conv)? }),
        "history" => |o, _| history_cmd(o),
        "presence" => |o, _| presence_cmd(o),
        "accept" => |o, _| Ok(Command::Accept { conv: o.conv(F::Conv)? }),
        "transfer" => |o, _| transfer(o),
        "close" => |o, _| Ok(Command::Close { conv: o.conv(F::Conv)? }),
        "ping" => |_, _| Ok(Command::Ping),
        "canned" => |_, _| Ok(Command::Canned),
        other => {
            let id = id.as_ref().ok().copied().flatten();
            return Err(FieldError::frame(format!("unknown command type {other:?}")).with_id(id));
        }
    };
    let id = id.map_err(|e| e.with_id(None))?;
    let body = parse(&obj, spare).map_err(|e| e.with_id(id))?;
    Ok(ClientFrame { id, body })
}

/// Decodes a gateway's text frame (client side: tests, `kefu-bench`, SDKs).
pub fn decode_server(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    let (obj, id) = frame(bytes)?;
    let ty = obj.frame_type().map_err(|e| e.with_id(id.as_ref().ok().copied().flatten()))?;
    let parse: fn(&Obj<'_>) -> R<Event> = match ty.as_ref() {
        "connected" => connected,
        "conversation" => conversation,
        "ack" => ack,
        "msg" => |o: &Obj<'_>| Ok(Event::Msg(msg(o)?)),
        "read" => |o: &Obj<'_>| {
            Ok(Event::Read { conv: o.conv(F::Conv)?, seq: o.req(F::Seq, U64)?, by: o.string(F::By)? })
        },
        "typing" => |o: &Obj<'_>| Ok(Event::Typing { conv: o.conv(F::Conv)?, by: o.string(F::By)? }),
        "history" => history_evt,
        "resumed" => |o: &Obj<'_>| {
            Ok(Event::Resumed { conv: o.conv(F::Conv)?, from: o.req(F::From, U64)?, to: o.req(F::To, U64)? })
        },
        "presence" => |o: &Obj<'_>| {
            Ok(Event::Presence {
                agent: o.string(F::Agent)?,
                status: o.req(F::Status, PRESENCE)?,
                name: o.opt(F::Name, STR)?.map(Cow::into_owned),
            })
        },
        "error" => |o: &Obj<'_>| {
            Ok(Event::Error { code: o.req(F::Code, ERROR_CODE)?, message: o.string(F::Message)? })
        },
        "pong" => |_: &Obj<'_>| Ok(Event::Pong),
        "canned" => canned_evt,
        other => {
            let id = id.as_ref().ok().copied().flatten();
            return Err(FieldError::frame(format!("unknown event type {other:?}")).with_id(id));
        }
    };
    let id = id.map_err(|e| e.with_id(None))?;
    let body = parse(&obj).map_err(|e| e.with_id(id))?;
    Ok(ServerFrame { id, body })
}

/// Splits a frame into its fields and reads its `id` (kept apart: a bad
/// `id` is reported only once the `type` is known to be good).
fn frame(bytes: &[u8]) -> Result<(Obj<'_>, R<Option<i64>>), DecodeError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| FieldError::frame(format!("not UTF-8 text: {e}")).with_id(None))?;
    let obj: Obj<'_> = serde_json::from_str(text).map_err(|e| {
        let why = if e.is_data() { "not a JSON object" } else { "not JSON" };
        FieldError::frame(format!("{why}: {e}")).with_id(None)
    })?;
    let id = obj.opt(F::Id, I64);
    Ok((obj, id))
}

fn connect(o: &Obj<'_>) -> R<Command> {
    let token = o.opt(F::Token, STR)?;
    let visitor_id = o.opt(F::VisitorId, STR)?;
    let visitor_key = o.opt(F::VisitorKey, STR)?;
    let mut resume = BTreeMap::new();
    if let Some(raw) = o.raw(F::Resume) {
        let map = bounded_map(raw, RESUME_ENTRIES_MAX)
            .ok_or_else(|| invalid("resume", "expected an object of conversation id to last seen seq"))?;
        check::resume_len(map.total)?;
        for (conv, seq) in map.entries {
            let conv = check::conv("resume", &conv)?;
            let seq = U64.parse(seq).ok_or_else(|| {
                invalid("resume", format_args!("last seen seq of {conv} must be a non-negative integer"))
            })?;
            resume.insert(conv, seq);
        }
    }
    Ok(Command::Connect {
        token: check::opt_name("token", token.as_deref(), TOKEN_BYTES_MAX)?,
        visitor_id: check::opt_name("visitor_id", visitor_id.as_deref(), ID_BYTES_MAX)?,
        visitor_key: check::opt_name("visitor_key", visitor_key.as_deref(), ID_BYTES_MAX)?,
        resume,
    })
}

fn open(o: &Obj<'_>) -> R<Command> {
    let group = o.opt(F::Group, STR)?;
    Ok(Command::Open {
        group: check::opt_name("group", group.as_deref(), GROUP_BYTES_MAX)?,
        meta: o.meta(F::Meta, "meta", true)?.unwrap_or_default(),
    })
}

fn send(o: &Obj<'_>, spare: &mut SpareStrings) -> R<Command> {
    let conv = o.conv(F::Conv)?;
    let cid = o.req(F::Cid, STR)?;
    check::cid(&cid)?;
    let text = o.opt(F::Text, STR)?;
    let attachment = match o.object(F::Attachment, "attachment.")? {
        None => None,
        Some(a) => {
            let mime = a.req(F::Mime, STR)?;
            check::mime("attachment.mime", &mime)?;
            let data = a.req(F::Data, STR)?;
            let data = BASE64.decode(data.as_bytes()).map_err(|e| {
                invalid("attachment.data", format_args!("not base64 (standard alphabet): {e}"))
            })?;
            Some(Attachment { mime: mime.into_owned(), data })
        }
    };
    let keep_text = check::send_content(text.as_deref(), attachment.is_some())?.is_some();
    let text = text.filter(|_| keep_text).map(|t| owned(t, spare));
    Ok(Command::Send { conv, cid: owned(cid, spare), text, attachment })
}

/// A string as the frame owns it: one with escapes was unescaped into its
/// own `String` already; a plain one is copied into a spare buffer.
fn owned(s: Cow<'_, str>, spare: &mut SpareStrings) -> String {
    match s {
        Cow::Borrowed(b) => spare.copy(b),
        Cow::Owned(o) => o,
    }
}

fn read_cmd(o: &Obj<'_>) -> R<Command> {
    Ok(Command::Read { conv: o.conv(F::Conv)?, seq: o.req(F::Seq, U64)? })
}

fn history_cmd(o: &Obj<'_>) -> R<Command> {
    Ok(Command::History {
        conv: o.conv(F::Conv)?,
        before: o.opt(F::Before, U64)?,
        limit: o.opt(F::Limit, U32)?,
    })
}

fn presence_cmd(o: &Obj<'_>) -> R<Command> {
    Ok(Command::Presence { status: o.req(F::Status, PRESENCE)?, capacity: o.opt(F::Capacity, U32)? })
}

fn transfer(o: &Obj<'_>) -> R<Command> {
    let conv = o.conv(F::Conv)?;
    let to = o.req(F::To, STR)?;
    Ok(Command::Transfer { conv, to: check::transfer_to(&to)? })
}

fn connected(o: &Obj<'_>) -> R<Event> {
    let user = o.object(F::User, "user.")?.ok_or_else(|| missing("user"))?;
    let mut conversations = Vec::new();
    for (i, c) in o.array(F::Conversations)?.ok_or_else(|| missing("conversations"))?.into_iter().enumerate()
    {
        let c = Obj::nested(c, format!("conversations[{i}]."))?;
        conversations.push(ConvSummary {
            conv: c.conv(F::Conv)?,
            status: c.req(F::Status, CONV_STATUS)?,
            last_seq: c.req(F::LastSeq, U64)?,
        });
    }
    Ok(Event::Connected {
        session: o.string(F::Session)?,
        role: o.req(F::Role, ROLE)?,
        user: user_of(&user)?,
        visitor_key: o.opt(F::VisitorKey, STR)?.map(Cow::into_owned),
        conversations,
        heartbeat_s: o.req(F::HeartbeatS, U32)?,
        text_bytes_max: o.opt(F::TextBytesMax, U32)?,
        attachment_bytes_max: o.opt(F::AttachmentBytesMax, U32)?,
        groups: match o.array(F::Groups)? {
            None => None,
            Some(groups) => Some(
                groups
                    .into_iter()
                    .enumerate()
                    .map(|(i, g)| {
                        STR.parse(g)
                            .map(Cow::into_owned)
                            .ok_or_else(|| invalid(&format!("groups[{i}]"), STR.expected()))
                    })
                    .collect::<R<Vec<String>>>()?,
            ),
        },
    })
}

fn conversation(o: &Obj<'_>) -> R<Event> {
    let agent = match o.object(F::Agent, "agent.")? {
        None => None,
        Some(a) => Some(AgentRef { id: a.string(F::Id)?, name: a.string(F::Name)? }),
    };
    let visitor = o.object(F::Visitor, "visitor.")?.ok_or_else(|| missing("visitor"))?;
    Ok(Event::Conversation {
        conv: o.conv(F::Conv)?,
        status: o.req(F::Status, CONV_STATUS)?,
        agent,
        group: o.opt(F::Group, STR)?.map(Cow::into_owned),
        visitor: user_of(&visitor)?,
        queue_position: o.opt(F::QueuePosition, U32)?,
        agents_online: o.opt(F::AgentsOnline, BOOL)?,
        since: o.opt(F::Since, U64)?,
    })
}

fn ack(o: &Obj<'_>) -> R<Event> {
    Ok(Event::Ack {
        cid: o.string(F::Cid)?,
        conv: o.conv(F::Conv)?,
        seq: o.req(F::Seq, U64)?,
        ts: o.req(F::Ts, U64)?,
        duplicate: o.opt(F::Duplicate, BOOL)?.unwrap_or(false),
    })
}

fn history_evt(o: &Obj<'_>) -> R<Event> {
    let conv = o.conv(F::Conv)?;
    let mut messages = Vec::new();
    for (i, m) in o.array(F::Messages)?.ok_or_else(|| missing("messages"))?.into_iter().enumerate() {
        let m = Obj::nested(m, format!("messages[{i}]."))?;
        if let Some(ty) = m.opt(F::Type, STR)?
            && ty != "msg"
        {
            return Err(invalid(&m.name(F::Type), format_args!("expected \"msg\", got {ty:?}")));
        }
        messages.push(msg(&m)?);
    }
    Ok(Event::History { conv, messages })
}

fn canned_evt(o: &Obj<'_>) -> R<Event> {
    let mut replies = Vec::new();
    for (i, r) in o.array(F::Replies)?.ok_or_else(|| missing("replies"))?.into_iter().enumerate() {
        let r = Obj::nested(r, format!("replies[{i}]."))?;
        replies.push(CannedReply { name: r.string(F::Name)?, text: r.string(F::Text)? });
    }
    Ok(Event::Canned { replies })
}

fn msg(o: &Obj<'_>) -> R<Msg> {
    let prefix = o.prefix.as_ref();
    let from = o.object(F::From, format!("{prefix}from."))?.ok_or_else(|| missing(&o.name(F::From)))?;
    let attachment = match o.object(F::Attachment, format!("{prefix}attachment."))? {
        None => None,
        Some(a) => {
            let data = a.req(F::Data, STR)?;
            let data = BASE64.decode(data.as_bytes()).map_err(|e| {
                invalid(&a.name(F::Data), format_args!("not base64 (standard alphabet): {e}"))
            })?;
            Some(Attachment { mime: a.string(F::Mime)?, data })
        }
    };
    Ok(Msg {
        conv: o.conv(F::Conv)?,
        seq: o.req(F::Seq, U64)?,
        cid: o.string(F::Cid)?,
        from: Sender { role: from.req(F::Role, ROLE)?, id: from.string(F::Id)?, name: from.string(F::Name)? },
        text: o.opt(F::Text, STR)?.map(Cow::into_owned),
        attachment,
        ts: o.req(F::Ts, U64)?,
    })
}

fn user_of(o: &Obj<'_>) -> R<User> {
    let field = o.name(F::Meta);
    Ok(User {
        id: o.string(F::Id)?,
        name: o.string(F::Name)?,
        meta: o.meta(F::Meta, &field, false)?.ok_or_else(|| missing(&field))?,
    })
}

// ---- field access ----------------------------------------------------------

macro_rules! fields {
    ($($variant:ident = $name:literal),+ $(,)?) => {
        /// Every field name any frame or nested object of the protocol uses.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum F { $($variant),+ }

        const FIELD_NAMES: &[&str] = &[$($name),+];

        impl F {
            fn from_name(name: &str) -> Option<F> {
                match name {
                    $($name => Some(F::$variant),)+
                    _ => None,
                }
            }

            fn as_str(self) -> &'static str {
                FIELD_NAMES[self as usize]
            }
        }
    };
}

fields! {
    Type = "type", Id = "id", Token = "token", VisitorId = "visitor_id", VisitorKey = "visitor_key",
    Resume = "resume", Group = "group", Meta = "meta", Conv = "conv", Cid = "cid", Text = "text",
    Attachment = "attachment", Mime = "mime", Data = "data", Seq = "seq", Before = "before",
    Limit = "limit", Status = "status", Capacity = "capacity", To = "to", Session = "session",
    Role = "role", User = "user", Name = "name", Conversations = "conversations", LastSeq = "last_seq",
    HeartbeatS = "heartbeat_s", Agent = "agent", Visitor = "visitor", QueuePosition = "queue_position",
    Ts = "ts", Duplicate = "duplicate", From = "from", By = "by", Messages = "messages", Code = "code",
    Message = "message", Replies = "replies", AgentsOnline = "agents_online",
    TextBytesMax = "text_bytes_max", AttachmentBytesMax = "attachment_bytes_max", Since = "since",
    Groups = "groups",
}

/// A JSON object split into the fields kefu knows, each as the raw JSON
/// text of its value, borrowed from the input.
struct Obj<'a> {
    raw: [Option<&'a RawValue>; FIELD_NAMES.len()],
    /// Path of this object inside the frame (`""`, `"attachment."`, ...),
    /// for error messages.
    prefix: Cow<'static, str>,
}

impl<'a> Obj<'a> {
    fn nested(raw: &'a RawValue, prefix: impl Into<Cow<'static, str>>) -> R<Obj<'a>> {
        let prefix = prefix.into();
        let mut obj: Obj<'a> = serde_json::from_str(raw.get()).map_err(|_| {
            let path = prefix.strip_suffix('.').unwrap_or(&prefix);
            invalid(path, "expected an object")
        })?;
        obj.prefix = prefix;
        Ok(obj)
    }

    /// The field's full name, for messages.
    fn name(&self, f: F) -> Cow<'static, str> {
        match &self.prefix {
            Cow::Borrowed("") => Cow::Borrowed(f.as_str()),
            p => Cow::Owned(format!("{p}{}", f.as_str())),
        }
    }

    /// The field's raw value; `null` counts as absent.
    fn raw(&self, f: F) -> Option<&'a RawValue> {
        self.raw[f as usize].filter(|r| r.get() != "null")
    }

    fn frame_type(&self) -> R<Cow<'a, str>> {
        let raw = self.raw(F::Type).ok_or_else(|| FieldError::frame("missing `type`"))?;
        STR.parse(raw).ok_or_else(|| FieldError::frame("`type` must be a string"))
    }

    fn opt<P: Parse<'a>>(&self, f: F, kind: P) -> R<Option<P::Out>> {
        match self.raw(f) {
            None => Ok(None),
            Some(raw) => kind.parse(raw).map(Some).ok_or_else(|| invalid(&self.name(f), kind.expected())),
        }
    }

    fn req<P: Parse<'a>>(&self, f: F, kind: P) -> R<P::Out> {
        self.opt(f, kind)?.ok_or_else(|| missing(&self.name(f)))
    }

    fn string(&self, f: F) -> R<String> {
        self.req(f, STR).map(Cow::into_owned)
    }

    fn conv(&self, f: F) -> R<ConvId> {
        check::conv(&self.name(f), &self.req(f, STR)?)
    }

    fn object(&self, f: F, prefix: impl Into<Cow<'static, str>>) -> R<Option<Obj<'a>>> {
        self.raw(f).map(|raw| Obj::nested(raw, prefix)).transpose()
    }

    fn array(&self, f: F) -> R<Option<Vec<&'a RawValue>>> {
        match self.raw(f) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|_| invalid(&self.name(f), "expected an array")),
        }
    }

    /// A string-to-string map; `bounded` applies the limits on what clients send.
    fn meta(&self, f: F, field: &str, bounded: bool) -> R<Option<Meta>> {
        let Some(raw) = self.raw(f) else { return Ok(None) };
        let limit = if bounded { META_ENTRIES_MAX } else { usize::MAX };
        let map = bounded_map(raw, limit).ok_or_else(|| invalid(field, "expected an object of strings"))?;
        if bounded {
            check::meta_len(field, map.total)?;
        }
        let mut meta = Meta::new();
        for (key, value) in map.entries {
            let value = STR
                .parse(value)
                .ok_or_else(|| invalid(field, format_args!("value of {key:?} must be a string")))?;
            if bounded {
                check::meta_entry(field, &key, &value)?;
            }
            meta.insert(key.into_owned(), value.into_owned());
        }
        Ok(Some(meta))
    }
}

/// How to read one kind of value, and what to say when it is something else.
trait Parse<'a>: Copy {
    type Out;
    fn parse(self, raw: &'a RawValue) -> Option<Self::Out>;
    fn expected(self) -> &'static str;
}

/// A scalar that owns nothing borrowed.
struct Kind<T> {
    parse: fn(&RawValue) -> Option<T>,
    expected: &'static str,
}

impl<T> Clone for Kind<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Kind<T> {}

impl<'a, T> Parse<'a> for Kind<T> {
    type Out = T;
    fn parse(self, raw: &'a RawValue) -> Option<T> {
        (self.parse)(raw)
    }
    fn expected(self) -> &'static str {
        self.expected
    }
}

/// A string: borrowed from the input unless it contains escapes.
#[derive(Clone, Copy)]
struct StrKind;
const STR: StrKind = StrKind;

impl<'a> Parse<'a> for StrKind {
    type Out = Cow<'a, str>;
    fn parse(self, raw: &'a RawValue) -> Option<Cow<'a, str>> {
        let s = raw.get();
        let inner = s.strip_prefix('"')?.strip_suffix('"')?;
        if inner.contains('\\') {
            // Escapes (and lone surrogates, which serde_json refuses) need a real parse.
            serde_json::from_str::<String>(s).ok().map(Cow::Owned)
        } else {
            // A RawValue is valid JSON, and a JSON string without escapes has
            // no quotes or control characters inside: its text is its value.
            Some(Cow::Borrowed(inner))
        }
    }
    fn expected(self) -> &'static str {
        "expected a string"
    }
}

fn num<T: serde::de::DeserializeOwned>(raw: &RawValue) -> Option<T> {
    serde_json::from_str(raw.get()).ok()
}
const U64: Kind<u64> = Kind { parse: num::<u64>, expected: "expected a non-negative integer" };
const U32: Kind<u32> = Kind { parse: num::<u32>, expected: "expected a non-negative integer below 2^32" };
const I64: Kind<i64> = Kind { parse: num::<i64>, expected: "expected an integer (64-bit)" };
const BOOL: Kind<bool> = Kind { parse: num::<bool>, expected: "expected true or false" };

fn named<T>(raw: &RawValue, parse: fn(&str) -> Option<T>) -> Option<T> {
    STR.parse(raw).and_then(|s| parse(&s))
}
const ROLE: Kind<Role> =
    Kind { parse: |r| named(r, Role::parse), expected: "expected \"visitor\", \"agent\" or \"bot\"" };
const CONV_STATUS: Kind<ConvStatus> = Kind {
    parse: |r| named(r, ConvStatus::parse),
    expected: "expected \"queued\", \"assigned\" or \"closed\"",
};
const PRESENCE: Kind<PresenceStatus> = Kind {
    parse: |r| named(r, PresenceStatus::parse),
    expected: "expected \"online\", \"away\" or \"offline\"",
};
const ERROR_CODE: Kind<ErrorCode> =
    Kind { parse: |r| named(r, ErrorCode::parse), expected: "expected an error code (PROTOCOL.md, Errors)" };

// ---- serde glue -----------------------------------------------------------

impl<'de> Deserialize<'de> for Obj<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Obj<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Obj<'de>, M::Error> {
                let mut raw = [None; FIELD_NAMES.len()];
                while let Some(Key(field)) = map.next_key()? {
                    match field {
                        Some(f) => raw[f as usize] = Some(map.next_value::<&'de RawValue>()?),
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Obj { raw, prefix: Cow::Borrowed("") })
            }
        }
        d.deserialize_map(V)
    }
}

/// An object key: a field kefu knows, or `None`.
struct Key(Option<F>);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(F::from_name(v)))
            }
        }
        d.deserialize_identifier(V)
    }
}

/// The entries of an arbitrary-keyed object, keeping at most `limit`
/// distinct keys (the rest are skipped, only counted, so a huge map costs no
/// memory). Of a repeated key the last value wins, as in `JSON.parse`.
struct BoundedMap<'a> {
    entries: BTreeMap<Cow<'a, str>, &'a RawValue>,
    total: usize,
}

fn bounded_map(raw: &RawValue, limit: usize) -> Option<BoundedMap<'_>> {
    struct Seed(usize);
    impl<'de> de::DeserializeSeed<'de> for Seed {
        type Value = BoundedMap<'de>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Seed {
        type Value = BoundedMap<'de>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut entries = BTreeMap::new();
            let mut skipped = 0;
            while let Some(CowKey(k)) = map.next_key()? {
                let v: &'de RawValue = map.next_value()?;
                if entries.len() < self.0 || entries.contains_key(&k) {
                    entries.insert(k, v);
                } else {
                    skipped += 1;
                }
            }
            let total = entries.len() + skipped;
            Ok(BoundedMap { entries, total })
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de::DeserializeSeed::deserialize(Seed(limit), &mut de).ok()
}

/// A map key, borrowed when it has no escapes.
struct CowKey<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for CowKey<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowKey<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowKey(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowKey(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowKey(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Appends `frame` as one JSON object to `out` (gateway side). Allocates
/// nothing but `out`'s growth.
pub fn encode_server(frame: &ServerFrame, out: &mut Vec<u8>) {
    begin(out, frame.body.name(), frame.id);
    match &frame.body {
        Event::Connected {
            session,
            role,
            user,
            visitor_key,
            conversations,
            heartbeat_s,
            text_bytes_max,
            attachment_bytes_max,
            groups,
        } => {
            str_field(out, "session", session);
            str_field(out, "role", role.as_str());
            key(out, "user");
            user_obj(out, user);
            if let Some(k) = visitor_key {
                str_field(out, "visitor_key", k);
            }
            key(out, "conversations");
            out.push(b'[');
            for (i, c) in conversations.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"conv\":");
                conv_value(out, c.conv);
                str_field(out, "status", c.status.as_str());
                u64_field(out, "last_seq", c.last_seq);
                out.push(b'}');
            }
            out.push(b']');
            u64_field(out, "heartbeat_s", u64::from(*heartbeat_s));
            if let Some(max) = text_bytes_max {
                u64_field(out, "text_bytes_max", u64::from(*max));
            }
            if let Some(max) = attachment_bytes_max {
                u64_field(out, "attachment_bytes_max", u64::from(*max));
            }
            if let Some(groups) = groups {
                key(out, "groups");
                out.push(b'[');
                for (i, g) in groups.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    string(out, g);
                }
                out.push(b']');
            }
        }
        Event::Conversation { conv, status, agent, group, visitor, queue_position, agents_online, since } => {
            conv_field(out, *conv);
            str_field(out, "status", status.as_str());
            if let Some(a) = agent {
                key(out, "agent");
                out.extend_from_slice(b"{\"id\":");
                string(out, &a.id);
                str_field(out, "name", &a.name);
                out.push(b'}');
            }
            if let Some(g) = group {
                str_field(out, "group", g);
            }
            key(out, "visitor");
            user_obj(out, visitor);
            if let Some(p) = queue_position {
                u64_field(out, "queue_position", u64::from(*p));
            }
            if let Some(online) = agents_online {
                key(out, "agents_online");
                out.extend_from_slice(if *online { b"true" } else { b"false" });
            }
            if let Some(ms) = since {
                u64_field(out, "since", *ms);
            }
        }
        Event::Ack { cid, conv, seq, ts, duplicate } => {
            str_field(out, "cid", cid);
            conv_field(out, *conv);
            u64_field(out, "seq", *seq);
            u64_field(out, "ts", *ts);
            if *duplicate {
                out.extend_from_slice(b",\"duplicate\":true");
            }
        }
        Event::Msg(m) => msg_fields(out, m),
        Event::Read { conv, seq, by } => {
            conv_field(out, *conv);
            u64_field(out, "seq", *seq);
            str_field(out, "by", by);
        }
        Event::Typing { conv, by } => {
            conv_field(out, *conv);
            str_field(out, "by", by);
        }
        Event::History { conv, messages } => {
            conv_field(out, *conv);
            key(out, "messages");
            out.push(b'[');
            for (i, m) in messages.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                begin(out, "msg", None);
                msg_fields(out, m);
                out.push(b'}');
            }
            out.push(b']');
        }
        Event::Resumed { conv, from, to } => {
            conv_field(out, *conv);
            u64_field(out, "from", *from);
            u64_field(out, "to", *to);
        }
        Event::Presence { agent, status, name } => {
            str_field(out, "agent", agent);
            str_field(out, "status", status.as_str());
            if let Some(name) = name {
                str_field(out, "name", name);
            }
        }
        Event::Error { code, message } => {
            str_field(out, "code", code.as_str());
            str_field(out, "message", message);
        }
        Event::Pong => {}
        Event::Canned { replies } => {
            key(out, "replies");
            out.push(b'[');
            for (i, r) in replies.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"name\":");
                string(out, &r.name);
                str_field(out, "text", &r.text);
                out.push(b'}');
            }
            out.push(b']');
        }
    }
    out.push(b'}');
}

/// Appends `frame` as one JSON object to `out` (client side).
pub fn encode_client(frame: &ClientFrame, out: &mut Vec<u8>) {
    begin(out, frame.body.name(), frame.id);
    match &frame.body {
        Command::Connect { token, visitor_id, visitor_key, resume } => {
            for (name, v) in [("token", token), ("visitor_id", visitor_id), ("visitor_key", visitor_key)] {
                if let Some(v) = v {
                    str_field(out, name, v);
                }
            }
            if !resume.is_empty() {
                key(out, "resume");
                out.push(b'{');
                for (i, (conv, seq)) in resume.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    conv_value(out, *conv);
                    out.push(b':');
                    push_u64(out, *seq);
                }
                out.push(b'}');
            }
        }
        Command::Open { group, meta } => {
            if let Some(g) = group {
                str_field(out, "group", g);
            }
            if !meta.is_empty() {
                key(out, "meta");
                meta_obj(out, meta);
            }
        }
        Command::Send { conv, cid, text, attachment } => {
            conv_field(out, *conv);
            str_field(out, "cid", cid);
            if let Some(t) = text {
                str_field(out, "text", t);
            }
            if let Some(a) = attachment {
                key(out, "attachment");
                attachment_obj(out, a);
            }
        }
        Command::Read { conv, seq } => {
            conv_field(out, *conv);
            u64_field(out, "seq", *seq);
        }
        Command::Typing { conv } | Command::Accept { conv } | Command::Close { conv } => {
            conv_field(out, *conv)
        }
        Command::History { conv, before, limit } => {
            conv_field(out, *conv);
            if let Some(b) = before {
                u64_field(out, "before", *b);
            }
            if let Some(l) = limit {
                u64_field(out, "limit", u64::from(*l));
            }
        }
        Command::Presence { status, capacity } => {
            str_field(out, "status", status.as_str());
            if let Some(c) = capacity {
                u64_field(out, "capacity", u64::from(*c));
            }
        }
        Command::Transfer { conv, to } => {
            conv_field(out, *conv);
            key(out, "to");
            out.push(b'"');
            match to {
                TransferTarget::Agent(id) => escaped(out, id),
                TransferTarget::Group(name) => {
                    out.extend_from_slice(TransferTarget::GROUP_PREFIX.as_bytes());
                    escaped(out, name);
                }
            }
            out.push(b'"');
        }
        Command::Ping | Command::Canned => {}
    }
    out.push(b'}');
}

/// `{"type":"NAME"` and `,"id":N` when there is one.
fn begin(out: &mut Vec<u8>, ty: &str, id: Option<i64>) {
    out.extend_from_slice(b"{\"type\":");
    string(out, ty);
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        if id < 0 {
            out.push(b'-');
        }
        push_u64(out, id.unsigned_abs());
    }
}

fn msg_fields(out: &mut Vec<u8>, m: &Msg) {
    conv_field(out, m.conv);
    u64_field(out, "seq", m.seq);
    str_field(out, "cid", &m.cid);
    key(out, "from");
    out.extend_from_slice(b"{\"role\":");
    string(out, m.from.role.as_str());
    str_field(out, "id", &m.from.id);
    str_field(out, "name", &m.from.name);
    out.push(b'}');
    if let Some(t) = &m.text {
        str_field(out, "text", t);
    }
    if let Some(a) = &m.attachment {
        key(out, "attachment");
        attachment_obj(out, a);
    }
    u64_field(out, "ts", m.ts);
}

fn user_obj(out: &mut Vec<u8>, u: &User) {
    out.extend_from_slice(b"{\"id\":");
    string(out, &u.id);
    str_field(out, "name", &u.name);
    key(out, "meta");
    meta_obj(out, &u.meta);
    out.push(b'}');
}

fn meta_obj(out: &mut Vec<u8>, meta: &Meta) {
    out.push(b'{');
    for (i, (k, v)) in meta.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, k);
        out.push(b':');
        string(out, v);
    }
    out.push(b'}');
}

fn attachment_obj(out: &mut Vec<u8>, a: &Attachment) {
    out.extend_from_slice(b"{\"mime\":");
    string(out, &a.mime);
    out.extend_from_slice(b",\"data\":\"");
    let start = out.len();
    let len = base64::encoded_len(a.data.len(), true).expect("attachment size fits in usize as base64");
    out.resize(start + len, 0);
    let written = BASE64.encode_slice(&a.data, &mut out[start..]).expect("buffer sized by encoded_len");
    debug_assert_eq!(written, len);
    out.extend_from_slice(b"\"}");
}

/// `,"NAME":` (every field after `type` follows another).
fn key(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn str_field(out: &mut Vec<u8>, name: &str, value: &str) {
    key(out, name);
    string(out, value);
}

fn u64_field(out: &mut Vec<u8>, name: &str, value: u64) {
    key(out, name);
    push_u64(out, value);
}

fn conv_field(out: &mut Vec<u8>, conv: ConvId) {
    key(out, "conv");
    conv_value(out, conv);
}

fn conv_value(out: &mut Vec<u8>, conv: ConvId) {
    out.extend_from_slice(b"\"c");
    push_u64(out, conv.0);
    out.push(b'"');
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A JSON string literal.
fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    escaped(out, s);
    out.push(b'"');
}

/// The body of a JSON string literal: `"`, `\` and control characters
/// escaped, everything else (UTF-8 included) as is.
fn escaped(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        run = i + 1;
        if short.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.extend_from_slice(short);
        }
    }
    out.extend_from_slice(&bytes[run..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_matches_serde_json() {
        for s in [
            "",
            "plain",
            "q\"b\\s",
            "line\nbreak\ttab\r",
            "\u{0}\u{1}\u{1f}\u{7f}",
            "中文 émoji 🎉",
            "\u{2028}",
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(String::from_utf8(out.clone()).unwrap(), serde_json::to_string(s).unwrap());
            assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), s);
        }
    }

    #[test]
    fn integers_print_like_display() {
        for n in [0, 1, 9, 10, 99, 100, 12345, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for id in [i64::MIN, -1, 0, 1, i64::MAX] {
            let mut out = Vec::new();
            begin(&mut out, "x", Some(id));
            assert_eq!(String::from_utf8(out).unwrap(), format!("{{\"type\":\"x\",\"id\":{id}"));
        }
    }

    #[test]
    fn field_names_are_unique_and_round_trip() {
        for (i, name) in FIELD_NAMES.iter().enumerate() {
            let f = F::from_name(name).unwrap();
            assert_eq!(f as usize, i);
            assert_eq!(f.as_str(), *name);
        }
    }

    #[test]
    fn bounded_map_keeps_the_last_of_repeated_keys_and_counts_the_rest() {
        let raw: &RawValue = serde_json::from_str(r#"{"a":"1","b":"2","a":"3"}"#).unwrap();
        let map = bounded_map(raw, 10).unwrap();
        let got: Vec<_> = map.entries.iter().map(|(k, v)| (k.as_ref(), v.get())).collect();
        assert_eq!(got, [("a", "\"3\""), ("b", "\"2\"")]);
        assert_eq!(map.total, 2);
        let raw: &RawValue = serde_json::from_str(r#"{"a":1,"b":2,"c":3,"d":4}"#).unwrap();
        let map = bounded_map(raw, 2).unwrap();
        assert_eq!((map.entries.len(), map.total), (2, 4));
    }
}
