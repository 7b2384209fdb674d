//! The client protocol: what visitors and agents say to the gateway
//! ([`Command`]) and what it says back ([`Event`]), and the two encodings
//! they travel in.
//!
//! # One set of types, two encodings
//!
//! Every WebSocket message is one frame. A frame is an optional `id` (an
//! integer the client picks; the gateway echoes it on the direct reply or
//! error to that command) and a body. Clients send [`ClientFrame`]s, the
//! gateway sends [`ServerFrame`]s. The subprotocol the client negotiated
//! picks the encoding, a [`Codec`]:
//!
//! - `kefu.v1.json` ([`json`]): text frames, one JSON object each, with a
//!   `"type"` naming the command or event in snake_case and every other field
//!   at the top level: `{"type":"send","id":7,"conv":"c42","cid":"m-1","text":"hi"}`.
//!   Optional fields are omitted when absent; attachment bytes are base64.
//! - `kefu.v1.fb` ([`fb`]): binary frames, one FlatBuffers `Envelope` each
//!   (schema: `proto/schema/kefu.fbs`), with the same fields under the same
//!   names; attachment bytes are raw.
//!
//! The rest of kefu never sees either encoding: the gateway decodes into
//! these types, the chat core works on them, and an event is encoded once per
//! encoding in use and the bytes fanned out to every connection that speaks it.
//!
//! # Decoding is validation
//!
//! Client bytes are untrusted, so decoding is where shape is checked, and a
//! [`ClientFrame`] that decoded is well-formed: conversation ids parse, every
//! required field is there with the right type, strings that get stored or
//! indexed are within the bounds below. What a decoder cannot know (does the
//! conversation exist, may this user do that, is the attachment under the
//! configured size) is the chat core's. A failure is a [`DecodeError`] whose
//! code tells the client what went wrong:
//!
//! - `bad_frame`: not a frame at all: not JSON, not an object, no or an
//!   unknown `"type"`, a FlatBuffers buffer that does not verify, an event
//!   where a command belongs;
//! - `bad_command`: a known command with a field missing, of the wrong type
//!   or malformed; the message names the field (`field `conv`: ...`);
//! - `too_large`: a field over one of the bounds below.
//!
//! The error carries the command's `id` whenever it could still be read, so
//! the `error` reply ([`DecodeError::reply`]) lands on the right request.
//!
//! # Bounds
//!
//! The size of a whole message is the WebSocket layer's (`limits.max_message_bytes`);
//! the size of `text` and of attachments is the chat core's (configured). The
//! decoder bounds what is stored, indexed or echoed to others, in bytes of
//! UTF-8: [`CID_BYTES_MAX`], [`ID_BYTES_MAX`], [`GROUP_BYTES_MAX`],
//! [`MIME_BYTES_MAX`], [`TOKEN_BYTES_MAX`], [`META_ENTRIES_MAX`] (with
//! [`META_KEY_BYTES_MAX`], [`META_VALUE_BYTES_MAX`]) and
//! [`RESUME_ENTRIES_MAX`]. `history.limit` is not an error when large: it is
//! clamped ([`history_limit`]). Frames the gateway sends are not checked
//! against these bounds when a client decodes them.
//!
//! # Allocation
//!
//! Encoding appends to a buffer the caller keeps ([`json::encode_server`]) or
//! reuses a `FlatBufferBuilder` ([`fb::encode_server`]); once those have grown
//! to the size of the largest frame, encoding the per-message events (`msg`,
//! `ack`, `read`, `typing`, `presence`, `resumed`, `error`, `pong`) allocates
//! nothing. Decoding allocates the strings and bytes the frame owns, except
//! a `send`'s cid and text when it is given spare buffers for them
//! ([`Codec::decode_client_reusing`], [`SpareStrings`]).

use std::collections::BTreeMap;

use crate::ids::{ConvId, ConvStatus, ErrorCode, PresenceStatus, Role};

pub mod fb;
pub mod json;
mod spare;
#[cfg(test)]
mod tests;

pub use spare::{SPARE_STRING_BYTES_MAX, SPARE_STRINGS_MAX, SpareStrings};

pub use fb::{
    decode_client as decode_fb, decode_server as decode_server_fb, encode_client as encode_client_fb,
    encode_server as encode_fb,
};
pub use json::{
    decode_client as decode_json, decode_server as decode_server_json, encode_client as encode_client_json,
    encode_server as encode_json,
};

/// Subprotocol name of the JSON encoding.
pub const SUBPROTOCOL_JSON: &str = "kefu.v1.json";
/// Subprotocol name of the FlatBuffers encoding.
pub const SUBPROTOCOL_FB: &str = "kefu.v1.fb";

/// Longest `cid`, in bytes. A cid is the client's idempotency key for one
/// message (a UUID is 36 bytes); it is stored in the dedupe index.
pub const CID_BYTES_MAX: usize = 64;
/// Longest user id in a command (`connect.visitor_id`, an agent id in
/// `transfer.to`) and longest `visitor_key`, in bytes.
pub const ID_BYTES_MAX: usize = 128;
/// Longest skill group name (`open.group`, `transfer.to = "group:NAME"`), in bytes.
pub const GROUP_BYTES_MAX: usize = 64;
/// Longest attachment MIME type, in bytes (RFC 6838 allows 127 + 1 + 127).
pub const MIME_BYTES_MAX: usize = 255;
/// Longest `connect.token`, in bytes. Tokens are verified (HMAC) before
/// anything else; the bound keeps that cheap.
pub const TOKEN_BYTES_MAX: usize = 16 * 1024;
/// Most entries in a `meta` map a client sends (`open.meta`).
pub const META_ENTRIES_MAX: usize = 64;
/// Longest `meta` key, in bytes.
pub const META_KEY_BYTES_MAX: usize = 64;
/// Longest `meta` value, in bytes.
pub const META_VALUE_BYTES_MAX: usize = 1024;
/// Most conversations one `connect.resume` may name.
pub const RESUME_ENTRIES_MAX: usize = 1024;
/// `history.limit` when the command has none.
pub const HISTORY_LIMIT_DEFAULT: u32 = 50;
/// Largest `history.limit` honoured; larger ones are clamped to it.
pub const HISTORY_LIMIT_MAX: u32 = 200;

/// How many messages a `history` command gets: its `limit`, or
/// [`HISTORY_LIMIT_DEFAULT`], at most [`HISTORY_LIMIT_MAX`]. A `limit` of 0
/// asks for (and gets) no messages.
pub fn history_limit(limit: Option<u32>) -> u32 {
    limit.unwrap_or(HISTORY_LIMIT_DEFAULT).min(HISTORY_LIMIT_MAX)
}

/// A string map shown to agents (`meta`): sorted, so encodings are stable.
pub type Meta = BTreeMap<String, String>;

/// A frame from a client: a command and the `id` the client gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    /// Echoed on the direct reply or error.
    pub id: Option<i64>,
    /// What the client asks for.
    pub body: Command,
}

/// A frame from the gateway: an event and, when it answers a command, that
/// command's `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    /// The `id` of the command this answers; `None` for pushed events.
    pub id: Option<i64>,
    /// What happened.
    pub body: Event,
}

impl ServerFrame {
    /// An event pushed without a command to answer (`id` absent).
    pub fn push(body: Event) -> Self {
        ServerFrame { id: None, body }
    }

    /// The reply to a command with `id`.
    pub fn reply(id: Option<i64>, body: Event) -> Self {
        ServerFrame { id, body }
    }

    /// An `error` reply.
    pub fn error(id: Option<i64>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame { id, body: Event::Error { code, message: message.into() } }
    }
}

/// A file sent with a message. Base64 (standard alphabet, padded) in JSON,
/// raw bytes in FlatBuffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// MIME type, e.g. `image/png`; not empty, at most [`MIME_BYTES_MAX`] bytes.
    pub mime: String,
    /// The file.
    pub data: Vec<u8>,
}

/// Where `transfer` sends a conversation. On the wire a string: an agent id,
/// or `group:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TransferTarget {
    /// To this agent (`"a7"`).
    Agent(String),
    /// Back to the queue of this skill group (`"group:billing"`).
    Group(String),
}

impl TransferTarget {
    /// The prefix that makes a `transfer.to` a group.
    pub const GROUP_PREFIX: &'static str = "group:";

    /// Reads the wire form. Empty names and over-long ones are refused
    /// (the message says why); an agent id may not itself start with `group:`.
    pub fn parse(to: &str) -> Result<Self, String> {
        check::transfer_to(to).map_err(|e| e.message)
    }
}

impl std::fmt::Display for TransferTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransferTarget::Agent(id) => f.write_str(id),
            TransferTarget::Group(name) => write!(f, "{}{name}", Self::GROUP_PREFIX),
        }
    }
}

/// A command, client to gateway (PROTOCOL.md, "Client → gateway").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The first frame of every connection: who this is, and what it saw
    /// before. Empty `token`, `visitor_id`, `visitor_key` strings count as
    /// absent.
    Connect {
        /// A JWT (agents, known visitors).
        token: Option<String>,
        /// An anonymous visitor coming back: the id from its first `connected`.
        visitor_id: Option<String>,
        /// ... and the key that came with it.
        visitor_key: Option<String>,
        /// Conversation → last `seq` the client saw there; the gateway
        /// replays what came after. Empty when absent.
        resume: BTreeMap<ConvId, u64>,
    },
    /// A visitor opens a conversation (or gets its open one back).
    Open {
        /// Skill group asked for; an empty string counts as absent.
        group: Option<String>,
        /// Shown to agents. Empty when absent.
        meta: Meta,
    },
    /// A message. At least one of `text` (non-empty) and `attachment`.
    Send {
        /// Where.
        conv: ConvId,
        /// The client's idempotency key: 1 to [`CID_BYTES_MAX`] bytes. The
        /// same cid again in the same conversation from the same user gets
        /// the first `ack` again.
        cid: String,
        /// The text; never `Some("")` after decoding.
        text: Option<String>,
        /// A file.
        attachment: Option<Attachment>,
    },
    /// Everything up to `seq` is read.
    Read {
        /// Where.
        conv: ConvId,
        /// Last message read.
        seq: u64,
    },
    /// The user is typing.
    Typing {
        /// Where.
        conv: ConvId,
    },
    /// Up to `limit` messages with `seq < before` (the newest without
    /// `before`), ascending. See [`history_limit`].
    History {
        /// Where.
        conv: ConvId,
        /// Exclusive upper bound on `seq`.
        before: Option<u64>,
        /// As sent; use [`history_limit`] for the number to return.
        limit: Option<u32>,
    },
    /// An agent's availability.
    Presence {
        /// New status.
        status: PresenceStatus,
        /// How many conversations the agent takes at once; absent keeps the
        /// configured default.
        capacity: Option<u32>,
    },
    /// An agent takes a queued conversation.
    Accept {
        /// Which.
        conv: ConvId,
    },
    /// An agent hands a conversation on.
    Transfer {
        /// Which.
        conv: ConvId,
        /// To whom.
        to: TransferTarget,
    },
    /// End a conversation.
    Close {
        /// Which.
        conv: ConvId,
    },
    /// Application-level keepalive; answered by `pong`.
    Ping,
    /// An agent asks for the canned replies of the config (`rules.canned`);
    /// answered by [`Event::Canned`].
    Canned,
}

impl Command {
    /// The JSON `"type"`.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Connect { .. } => "connect",
            Command::Open { .. } => "open",
            Command::Send { .. } => "send",
            Command::Read { .. } => "read",
            Command::Typing { .. } => "typing",
            Command::History { .. } => "history",
            Command::Presence { .. } => "presence",
            Command::Accept { .. } => "accept",
            Command::Transfer { .. } => "transfer",
            Command::Close { .. } => "close",
            Command::Ping => "ping",
            Command::Canned => "canned",
        }
    }

    /// The conversation the command is about, if it names one.
    pub fn conv(&self) -> Option<ConvId> {
        match self {
            Command::Send { conv, .. }
            | Command::Read { conv, .. }
            | Command::Typing { conv }
            | Command::History { conv, .. }
            | Command::Accept { conv }
            | Command::Transfer { conv, .. }
            | Command::Close { conv } => Some(*conv),
            Command::Connect { .. }
            | Command::Open { .. }
            | Command::Presence { .. }
            | Command::Ping
            | Command::Canned => None,
        }
    }
}

/// A user as others see them (`connected.user`, `conversation.visitor`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    /// User id (JWT `sub`, or a server-issued visitor id).
    pub id: String,
    /// Display name; may be empty.
    pub name: String,
    /// Profile shown to agents; always present on the wire (`{}` when empty).
    pub meta: Meta,
}

/// `conversation.agent`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRef {
    /// Agent id.
    pub id: String,
    /// Display name.
    pub name: String,
}

/// `msg.from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    /// `visitor`, `agent` or `bot`.
    pub role: Role,
    /// User id (for a bot, whatever the hook or business system called itself).
    pub id: String,
    /// Display name.
    pub name: String,
}

/// One entry of `connected.conversations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSummary {
    /// Which.
    pub conv: ConvId,
    /// Where it is in its life.
    pub status: ConvStatus,
    /// Its newest `seq` (0 when it has no message yet).
    pub last_seq: u64,
}

/// A chat message: the `msg` event, and each of `history.messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Where.
    pub conv: ConvId,
    /// Position in the conversation, from 1, without gaps.
    pub seq: u64,
    /// The sender's `cid`.
    pub cid: String,
    /// Who.
    pub from: Sender,
    /// The text.
    pub text: Option<String>,
    /// A file.
    pub attachment: Option<Attachment>,
    /// When the gateway took it, milliseconds since the epoch.
    pub ts: u64,
}

/// An event, gateway to client (PROTOCOL.md, "Gateway → client").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Reply to `connect`.
    Connected {
        /// This connection's session id (opaque).
        session: String,
        /// The role the identity carries.
        role: Role,
        /// Who the client is.
        user: User,
        /// Only to a new anonymous visitor, once: the key to come back with.
        visitor_key: Option<String>,
        /// The user's current conversations.
        conversations: Vec<ConvSummary>,
        /// The gateway's heartbeat period, seconds.
        heartbeat_s: u32,
        /// The largest `text` a `send` may carry, in UTF-8 bytes
        /// (`messages.max_text_bytes`), so a client can check before sending.
        text_bytes_max: Option<u32>,
        /// The largest attachment, decoded bytes (`messages.max_attachment_bytes`).
        attachment_bytes_max: Option<u32>,
        /// To an agent: the skill groups it serves, empty for every group,
        /// so that a console can drop a waiting conversation transferred
        /// to a queue it does not serve.
        groups: Option<Vec<String>>,
    },
    /// A conversation's state: reply to `open`, and pushed on every change.
    Conversation {
        /// Which.
        conv: ConvId,
        /// Where it is in its life.
        status: ConvStatus,
        /// The assigned agent.
        agent: Option<AgentRef>,
        /// The skill group it is (or was) queued in.
        group: Option<String>,
        /// The visitor, with the profile agents see.
        visitor: User,
        /// 1-based place in the queue while `queued`.
        queue_position: Option<u32>,
        /// While `queued`: whether an agent serving its group is online
        /// (the widget's offline notice when not).
        agents_online: Option<bool>,
        /// When the state this frame describes was decided (ms since the
        /// epoch): how long a queued one has waited.
        since: Option<u64>,
    },
    /// A `send` is durable.
    Ack {
        /// The `cid` of the send.
        cid: String,
        /// Where.
        conv: ConvId,
        /// The message's `seq`.
        seq: u64,
        /// The message's `ts`.
        ts: u64,
        /// The send repeated an earlier one (same cid); on the wire only when true.
        duplicate: bool,
    },
    /// A message, to every participant.
    Msg(Msg),
    /// Someone read up to `seq`.
    Read {
        /// Where.
        conv: ConvId,
        /// Up to which message.
        seq: u64,
        /// User id of the reader.
        by: String,
    },
    /// Someone is typing.
    Typing {
        /// Where.
        conv: ConvId,
        /// User id.
        by: String,
    },
    /// Reply to `history`: messages in ascending `seq`.
    History {
        /// Where.
        conv: ConvId,
        /// The page.
        messages: Vec<Msg>,
    },
    /// A resume replay of `conv` is complete: `from` = last seen + 1, `to` =
    /// last seq at replay time (`from > to` when nothing was missed).
    Resumed {
        /// Where.
        conv: ConvId,
        /// First replayed seq.
        from: u64,
        /// Last replayed seq.
        to: u64,
    },
    /// An agent's status (reply to `presence`, and pushed to agents).
    Presence {
        /// Agent id.
        agent: String,
        /// Status.
        status: PresenceStatus,
        /// The agent's display name, when the gateway knows it (a console
        /// lists agents to transfer to by name).
        name: Option<String>,
    },
    /// A command failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// For humans.
        message: String,
    },
    /// Reply to `ping`.
    Pong,
    /// Reply to `canned`: the canned replies, in config order.
    Canned {
        /// The replies.
        replies: Vec<CannedReply>,
    },
}

/// A named text an agent inserts from the console (`canned.replies`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CannedReply {
    /// Short name, typed after `/` in the console.
    pub name: String,
    /// The text inserted.
    pub text: String,
}

impl Event {
    /// The JSON `"type"`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Connected { .. } => "connected",
            Event::Conversation { .. } => "conversation",
            Event::Ack { .. } => "ack",
            Event::Msg(_) => "msg",
            Event::Read { .. } => "read",
            Event::Typing { .. } => "typing",
            Event::History { .. } => "history",
            Event::Resumed { .. } => "resumed",
            Event::Presence { .. } => "presence",
            Event::Error { .. } => "error",
            Event::Pong => "pong",
            Event::Canned { .. } => "canned",
        }
    }
}

/// A frame that could not be decoded, and what to tell the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    /// `bad_frame`, `bad_command` or `too_large` (see the module docs).
    pub code: ErrorCode,
    /// Names the field at fault, when one is.
    pub message: String,
    /// The frame's `id`, when it could still be read.
    pub id: Option<i64>,
}

impl DecodeError {
    /// The `error` frame that answers the undecodable one.
    pub fn reply(&self) -> ServerFrame {
        ServerFrame::error(self.id, self.code, self.message.clone())
    }
}

/// A failure inside a frame, before the `id` is attached. Both codecs build
/// these with the same helpers so the same mistake reads the same in both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl FieldError {
    pub(crate) fn frame(message: impl Into<String>) -> Self {
        FieldError { code: ErrorCode::BadFrame, message: message.into() }
    }

    pub(crate) fn with_id(self, id: Option<i64>) -> DecodeError {
        DecodeError { code: self.code, message: self.message, id }
    }
}

/// Validation shared by both decoders: one rule, one message.
pub(crate) mod check {
    use super::*;

    pub(crate) type R<T> = Result<T, FieldError>;

    pub(crate) fn missing(field: &str) -> FieldError {
        FieldError { code: ErrorCode::BadCommand, message: format!("field `{field}`: missing") }
    }

    pub(crate) fn invalid(field: &str, why: impl std::fmt::Display) -> FieldError {
        FieldError { code: ErrorCode::BadCommand, message: format!("field `{field}`: {why}") }
    }

    pub(crate) fn too_large(field: &str, why: impl std::fmt::Display) -> FieldError {
        FieldError { code: ErrorCode::TooLarge, message: format!("field `{field}`: {why}") }
    }

    /// A string at most `max` bytes long.
    pub(crate) fn bounded(field: &str, s: &str, max: usize) -> R<()> {
        if s.len() > max {
            return Err(too_large(field, format_args!("longer than {max} bytes")));
        }
        Ok(())
    }

    pub(crate) fn conv(field: &str, s: &str) -> R<ConvId> {
        s.parse()
            .map_err(|_| invalid(field, format_args!("not a conversation id: {s:?} (expected c<number>)")))
    }

    pub(crate) fn cid(s: &str) -> R<()> {
        if s.is_empty() {
            return Err(invalid("cid", "must not be empty"));
        }
        bounded("cid", s, CID_BYTES_MAX)
    }

    /// An optional identity string of `connect`/`open`: empty means absent.
    pub(crate) fn opt_name(field: &str, s: Option<&str>, max: usize) -> R<Option<String>> {
        match s {
            None | Some("") => Ok(None),
            Some(s) => {
                bounded(field, s, max)?;
                Ok(Some(s.to_string()))
            }
        }
    }

    pub(crate) fn mime(field: &str, s: &str) -> R<()> {
        if s.is_empty() {
            return Err(invalid(field, "must not be empty"));
        }
        bounded(field, s, MIME_BYTES_MAX)
    }

    pub(crate) fn transfer_to(s: &str) -> R<TransferTarget> {
        if let Some(group) = s.strip_prefix(TransferTarget::GROUP_PREFIX) {
            if group.is_empty() {
                return Err(invalid("to", "empty group name after `group:`"));
            }
            bounded("to", group, GROUP_BYTES_MAX)?;
            Ok(TransferTarget::Group(group.to_string()))
        } else {
            if s.is_empty() {
                return Err(invalid("to", "must not be empty (an agent id or `group:NAME`)"));
            }
            bounded("to", s, ID_BYTES_MAX)?;
            Ok(TransferTarget::Agent(s.to_string()))
        }
    }

    pub(crate) fn meta_len(field: &str, entries: usize) -> R<()> {
        if entries > META_ENTRIES_MAX {
            return Err(too_large(field, format_args!("more than {META_ENTRIES_MAX} entries")));
        }
        Ok(())
    }

    pub(crate) fn meta_entry(field: &str, key: &str, value: &str) -> R<()> {
        if key.len() > META_KEY_BYTES_MAX {
            return Err(too_large(field, format_args!("a key is longer than {META_KEY_BYTES_MAX} bytes")));
        }
        if value.len() > META_VALUE_BYTES_MAX {
            return Err(too_large(
                field,
                format_args!("value of {key:?} is longer than {META_VALUE_BYTES_MAX} bytes"),
            ));
        }
        Ok(())
    }

    pub(crate) fn resume_len(entries: usize) -> R<()> {
        if entries > RESUME_ENTRIES_MAX {
            return Err(too_large("resume", format_args!("more than {RESUME_ENTRIES_MAX} conversations")));
        }
        Ok(())
    }

    /// `send` with neither text nor attachment says nothing. Returns the
    /// text to keep (none if empty).
    pub(crate) fn send_content(text: Option<&str>, has_attachment: bool) -> R<Option<&str>> {
        let text = text.filter(|t| !t.is_empty());
        if text.is_none() && !has_attachment {
            return Err(invalid("text", "a send needs a non-empty `text` or an `attachment`"));
        }
        Ok(text)
    }
}

/// The client protocol's encodings, one per WebSocket subprotocol. The
/// gateway picks one per connection at the handshake and then only calls
/// through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// `kefu.v1.json`: text frames.
    Json,
    /// `kefu.v1.fb`: binary frames.
    FlatBuffers,
}

impl Codec {
    /// Both, JSON first.
    pub const ALL: [Codec; 2] = [Codec::Json, Codec::FlatBuffers];

    /// The codec a `Sec-WebSocket-Protocol` token names (exact match).
    pub fn from_subprotocol(name: &str) -> Option<Codec> {
        match name {
            SUBPROTOCOL_JSON => Some(Codec::Json),
            SUBPROTOCOL_FB => Some(Codec::FlatBuffers),
            _ => None,
        }
    }

    /// The subprotocol token.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::Json => SUBPROTOCOL_JSON,
            Codec::FlatBuffers => SUBPROTOCOL_FB,
        }
    }

    /// Whether frames travel as binary WebSocket messages (else text).
    pub fn is_binary(self) -> bool {
        self == Codec::FlatBuffers
    }

    /// Decodes a client's message.
    pub fn decode_client(self, bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
        self.decode_client_reusing(bytes, &mut SpareStrings::new())
    }

    /// [`Self::decode_client`], copying a `send`'s cid and text into
    /// `spare`'s buffers rather than allocating.
    pub fn decode_client_reusing(
        self,
        bytes: &[u8],
        spare: &mut SpareStrings,
    ) -> Result<ClientFrame, DecodeError> {
        match self {
            Codec::Json => json::decode_client_reusing(bytes, spare),
            Codec::FlatBuffers => fb::decode_client_reusing(bytes, spare),
        }
    }

    /// Encodes a gateway frame into `enc`'s buffer for this codec and returns
    /// the bytes (valid until `enc` is used again).
    pub fn encode_server<'e>(self, frame: &ServerFrame, enc: &'e mut Encoder) -> &'e [u8] {
        match self {
            Codec::Json => {
                enc.json.clear();
                json::encode_server(frame, &mut enc.json);
                &enc.json
            }
            Codec::FlatBuffers => fb::encode_server(frame, &mut enc.fb),
        }
    }

    /// Client side: decodes a gateway message.
    pub fn decode_server(self, bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
        match self {
            Codec::Json => json::decode_server(bytes),
            Codec::FlatBuffers => fb::decode_server(bytes),
        }
    }

    /// Client side: encodes a command.
    pub fn encode_client<'e>(self, frame: &ClientFrame, enc: &'e mut Encoder) -> &'e [u8] {
        match self {
            Codec::Json => {
                enc.json.clear();
                json::encode_client(frame, &mut enc.json);
                &enc.json
            }
            Codec::FlatBuffers => fb::encode_client(frame, &mut enc.fb),
        }
    }
}

/// Reusable output buffers for both codecs: keep one per thread (or per
/// shard) and encode every frame through it, so steady-state encoding does
/// not allocate.
#[derive(Default)]
pub struct Encoder {
    json: Vec<u8>,
    fb: flatbuffers::FlatBufferBuilder<'static>,
}

impl Encoder {
    /// Empty buffers; they grow to the largest frame encoded.
    pub fn new() -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("json_capacity", &self.json.capacity()).finish_non_exhaustive()
    }
}
