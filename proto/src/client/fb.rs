//! `kefu.v1.fb`: one FlatBuffers `Envelope` per WebSocket binary frame.
//!
//! The schema is `proto/schema/kefu.fbs`; the Rust code flatc makes from it
//! is in `crate::generated` (see `tools/gen-flatbuffers.sh`). An `Envelope`
//! holds the command's `id` and a union `body` of every command and event
//! table, with the fields of the JSON encoding under the same names. This
//! module converts between those tables and [`ClientFrame`] / [`ServerFrame`]:
//! nothing outside it touches generated code.
//!
//! Decoding first *verifies* the buffer (every offset in bounds, every string
//! UTF-8, depth and table count bounded) — client bytes are untrusted and
//! generated accessors are only sound on verified buffers. A buffer that does
//! not verify is `bad_frame`; its `id` is still recovered when the `id` field
//! alone reads back (the schema's `EnvelopeHead`). After that the same rules
//! as for JSON apply, through the same `check` helpers, so a mistake reads
//! the same in both encodings. FlatBuffers cannot tell an absent scalar from
//! a zero unless the schema says `= null`; the fields a command must carry
//! are declared so, and their absence is a `bad_command` naming them.
//!
//! Encoding resets the caller's `FlatBufferBuilder` and builds into it; its
//! buffer is reused from frame to frame. Vectors of tables (`meta`,
//! `conversations`, `messages`) need their elements' offsets gathered
//! before the vector is written; they go through one scratch vector per
//! thread, so encoding allocates nothing once buffers have grown.

use std::cell::Cell;

use flatbuffers::{FlatBufferBuilder, ForwardsUOffset, Vector, VerifierOptions, WIPOffset};

use super::check::{self, R, invalid, missing};
use super::*;
use crate::generated as g;
use crate::ids::{ConvId, ConvStatus, ErrorCode, PresenceStatus, Role};

/// Bounds for verifying a client's frame. A command is a handful of tables
/// plus at most [`RESUME_ENTRIES_MAX`] or [`META_ENTRIES_MAX`] entries; the
/// table bound leaves room for those (so too many entries is `too_large`,
/// not a verification failure) and caps the work a hostile buffer causes.
const CLIENT_FRAME_VERIFY: VerifierOptions = VerifierOptions {
    max_depth: 16,
    max_tables: 16 * 1024,
    max_apparent_size: 64 << 20,
    ignore_missing_null_terminator: false,
};

/// Bounds for verifying a gateway's frame (client side): `history` and
/// `connected` carry lists.
const SERVER_FRAME_VERIFY: VerifierOptions = VerifierOptions {
    max_depth: 16,
    max_tables: 1 << 20,
    max_apparent_size: 1 << 31,
    ignore_missing_null_terminator: false,
};

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Decodes a client's binary frame (gateway side).
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    decode_client_reusing(bytes, &mut SpareStrings::new())
}

/// [`decode_client`], copying a `send`'s cid and text into `spare`'s buffers.
pub fn decode_client_reusing(bytes: &[u8], spare: &mut SpareStrings) -> Result<ClientFrame, DecodeError> {
    let env = verify(bytes, &CLIENT_FRAME_VERIFY)?;
    let id = env.id();
    let body = command(&env, spare).map_err(|e| e.with_id(id))?;
    Ok(ClientFrame { id, body })
}

/// Decodes a gateway's binary frame (client side: tests, `kefu-bench`, SDKs).
pub fn decode_server(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    let env = verify(bytes, &SERVER_FRAME_VERIFY)?;
    let id = env.id();
    let body = event(&env).map_err(|e| e.with_id(id))?;
    Ok(ServerFrame { id, body })
}

fn verify<'b>(bytes: &'b [u8], opts: &VerifierOptions) -> Result<g::Envelope<'b>, DecodeError> {
    flatbuffers::root_with_opts::<g::Envelope>(opts, bytes).map_err(|e| {
        let id = flatbuffers::root::<g::EnvelopeHead>(bytes).ok().and_then(|head| head.id());
        FieldError::frame(format!("not a kefu.v1.fb Envelope: {e}")).with_id(id)
    })
}

fn body_name(t: g::Body) -> String {
    match t.variant_name() {
        Some(name) => name.to_string(),
        None => format!("body type {}", t.0),
    }
}

/// The union member, present when `body_type` says so.
fn body<T>(table: Option<T>, t: g::Body) -> R<T> {
    table.ok_or_else(|| FieldError::frame(format!("{} without its table", body_name(t))))
}

fn command(env: &g::Envelope<'_>, spare: &mut SpareStrings) -> R<Command> {
    use g::Body as B;
    let t = env.body_type();
    match t {
        B::NONE => Err(FieldError::frame("envelope without a body")),
        B::ConnectCmd => connect(body(env.body_as_connect_cmd(), t)?),
        B::OpenCmd => {
            let o = body(env.body_as_open_cmd(), t)?;
            Ok(Command::Open {
                group: check::opt_name("group", o.group(), GROUP_BYTES_MAX)?,
                meta: meta("meta", o.meta(), true)?,
            })
        }
        B::SendCmd => send(body(env.body_as_send_cmd(), t)?, spare),
        B::ReadCmd => {
            let o = body(env.body_as_read_cmd(), t)?;
            Ok(Command::Read { conv: conv("conv", o.conv())?, seq: o.seq().ok_or_else(|| missing("seq"))? })
        }
        B::TypingCmd => {
            Ok(Command::Typing { conv: conv("conv", body(env.body_as_typing_cmd(), t)?.conv())? })
        }
        B::HistoryCmd => {
            let o = body(env.body_as_history_cmd(), t)?;
            Ok(Command::History { conv: conv("conv", o.conv())?, before: o.before(), limit: o.limit() })
        }
        B::PresenceCmd => {
            let o = body(env.body_as_presence_cmd(), t)?;
            let status = o.status().ok_or_else(|| missing("status"))?;
            Ok(Command::Presence { status: presence_from(status)?, capacity: o.capacity() })
        }
        B::AcceptCmd => {
            Ok(Command::Accept { conv: conv("conv", body(env.body_as_accept_cmd(), t)?.conv())? })
        }
        B::TransferCmd => {
            let o = body(env.body_as_transfer_cmd(), t)?;
            let conv = conv("conv", o.conv())?;
            let to = o.to().ok_or_else(|| missing("to"))?;
            Ok(Command::Transfer { conv, to: check::transfer_to(to)? })
        }
        B::CloseCmd => Ok(Command::Close { conv: conv("conv", body(env.body_as_close_cmd(), t)?.conv())? }),
        B::PingCmd => {
            body(env.body_as_ping_cmd(), t)?;
            Ok(Command::Ping)
        }
        B::CannedCmd => {
            body(env.body_as_canned_cmd(), t)?;
            Ok(Command::Canned)
        }
        _ if t.variant_name().is_some() => {
            Err(FieldError::frame(format!("{} is an event, not a command", body_name(t))))
        }
        _ => Err(FieldError::frame(format!("unknown command ({})", body_name(t)))),
    }
}

fn connect(o: g::ConnectCmd<'_>) -> R<Command> {
    let mut resume = BTreeMap::new();
    if let Some(entries) = o.resume() {
        check::resume_len(entries.len())?;
        for e in entries {
            let c =
                conv("resume", Some(e.conv().ok_or_else(|| invalid("resume", "an entry without `conv`"))?))?;
            let seq = e
                .last_seen_seq()
                .ok_or_else(|| invalid("resume", format_args!("the entry of {c} has no `last_seen_seq`")))?;
            resume.insert(c, seq);
        }
    }
    Ok(Command::Connect {
        token: check::opt_name("token", o.token(), TOKEN_BYTES_MAX)?,
        visitor_id: check::opt_name("visitor_id", o.visitor_id(), ID_BYTES_MAX)?,
        visitor_key: check::opt_name("visitor_key", o.visitor_key(), ID_BYTES_MAX)?,
        resume,
    })
}

fn send(o: g::SendCmd<'_>, spare: &mut SpareStrings) -> R<Command> {
    let conv = conv("conv", o.conv())?;
    let cid = o.cid().ok_or_else(|| missing("cid"))?;
    check::cid(cid)?;
    let attachment = match o.attachment() {
        None => None,
        Some(a) => {
            let mime = a.mime().ok_or_else(|| missing("attachment.mime"))?;
            check::mime("attachment.mime", mime)?;
            let data = a.data().ok_or_else(|| missing("attachment.data"))?;
            Some(Attachment { mime: mime.to_string(), data: data.bytes().to_vec() })
        }
    };
    let text = check::send_content(o.text(), attachment.is_some())?.map(|t| spare.copy(t));
    Ok(Command::Send { conv, cid: spare.copy(cid), text, attachment })
}

fn event(env: &g::Envelope<'_>) -> R<Event> {
    use g::Body as B;
    let t = env.body_type();
    Ok(match t {
        B::NONE => return Err(FieldError::frame("envelope without a body")),
        B::ConnectedEvt => {
            let o = body(env.body_as_connected_evt(), t)?;
            let mut conversations = Vec::new();
            for c in o.conversations().into_iter().flatten() {
                conversations.push(ConvSummary {
                    conv: conv("conversations[].conv", c.conv())?,
                    status: conv_status_from(c.status())?,
                    last_seq: c.last_seq(),
                });
            }
            Event::Connected {
                session: string("session", o.session())?,
                role: role_from(o.role())?,
                user: user("user", o.user())?,
                visitor_key: o.visitor_key().map(str::to_string),
                conversations,
                heartbeat_s: o.heartbeat_s(),
                text_bytes_max: o.text_bytes_max(),
                attachment_bytes_max: o.attachment_bytes_max(),
                groups: o.groups().map(|gs| gs.iter().map(str::to_string).collect()),
            }
        }
        B::ConversationEvt => {
            let o = body(env.body_as_conversation_evt(), t)?;
            let agent = match o.agent() {
                None => None,
                Some(a) => {
                    Some(AgentRef { id: string("agent.id", a.id())?, name: string("agent.name", a.name())? })
                }
            };
            Event::Conversation {
                conv: conv("conv", o.conv())?,
                status: conv_status_from(o.status())?,
                agent,
                group: o.group().map(str::to_string),
                visitor: user("visitor", o.visitor())?,
                queue_position: o.queue_position(),
                agents_online: o.agents_online(),
                since: o.since(),
            }
        }
        B::AckEvt => {
            let o = body(env.body_as_ack_evt(), t)?;
            Event::Ack {
                cid: string("cid", o.cid())?,
                conv: conv("conv", o.conv())?,
                seq: o.seq(),
                ts: o.ts(),
                duplicate: o.duplicate(),
            }
        }
        B::MsgEvt => Event::Msg(msg_from(body(env.body_as_msg_evt(), t)?)?),
        B::ReadEvt => {
            let o = body(env.body_as_read_evt(), t)?;
            Event::Read { conv: conv("conv", o.conv())?, seq: o.seq(), by: string("by", o.by())? }
        }
        B::TypingEvt => {
            let o = body(env.body_as_typing_evt(), t)?;
            Event::Typing { conv: conv("conv", o.conv())?, by: string("by", o.by())? }
        }
        B::HistoryEvt => {
            let o = body(env.body_as_history_evt(), t)?;
            let mut messages = Vec::new();
            for m in o.messages().into_iter().flatten() {
                messages.push(msg_from(m)?);
            }
            Event::History { conv: conv("conv", o.conv())?, messages }
        }
        B::ResumedEvt => {
            let o = body(env.body_as_resumed_evt(), t)?;
            Event::Resumed { conv: conv("conv", o.conv())?, from: o.from(), to: o.to() }
        }
        B::PresenceEvt => {
            let o = body(env.body_as_presence_evt(), t)?;
            Event::Presence {
                agent: string("agent", o.agent())?,
                status: presence_from(o.status())?,
                name: o.name().map(str::to_string),
            }
        }
        B::ErrorEvt => {
            let o = body(env.body_as_error_evt(), t)?;
            Event::Error { code: error_code_from(o.code())?, message: string("message", o.message())? }
        }
        B::PongEvt => {
            body(env.body_as_pong_evt(), t)?;
            Event::Pong
        }
        B::CannedEvt => {
            let o = body(env.body_as_canned_evt(), t)?;
            let mut replies = Vec::new();
            for r in o.replies().into_iter().flatten() {
                replies
                    .push(CannedReply { name: string("name", r.name())?, text: string("text", r.text())? });
            }
            Event::Canned { replies }
        }
        _ if t.variant_name().is_some() => {
            return Err(FieldError::frame(format!("{} is a command, not an event", body_name(t))));
        }
        _ => return Err(FieldError::frame(format!("unknown event ({})", body_name(t)))),
    })
}

fn msg_from(o: g::MsgEvt<'_>) -> R<Msg> {
    let from = o.from().ok_or_else(|| missing("from"))?;
    let attachment = match o.attachment() {
        None => None,
        Some(a) => Some(Attachment {
            mime: string("attachment.mime", a.mime())?,
            data: a.data().map(|d| d.bytes().to_vec()).unwrap_or_default(),
        }),
    };
    Ok(Msg {
        conv: conv("conv", o.conv())?,
        seq: o.seq(),
        cid: string("cid", o.cid())?,
        from: Sender {
            role: role_from(from.role())?,
            id: string("from.id", from.id())?,
            name: string("from.name", from.name())?,
        },
        text: o.text().map(str::to_string),
        attachment,
        ts: o.ts(),
    })
}

fn user(field: &str, u: Option<g::User<'_>>) -> R<User> {
    let u = u.ok_or_else(|| missing(field))?;
    Ok(User {
        id: string(&format!("{field}.id"), u.id())?,
        name: u.name().unwrap_or_default().to_string(),
        meta: meta(&format!("{field}.meta"), u.meta(), false)?,
    })
}

type MetaVector<'a> = Vector<'a, ForwardsUOffset<g::Meta<'a>>>;

/// A `meta` vector as a map; `bounded` applies the limits on what clients send.
fn meta(field: &str, v: Option<MetaVector<'_>>, bounded: bool) -> R<Meta> {
    let mut meta = Meta::new();
    let Some(v) = v else { return Ok(meta) };
    if bounded {
        check::meta_len(field, v.len())?;
    }
    for e in v {
        let key = e.key().ok_or_else(|| invalid(field, "an entry without `key`"))?;
        let value = e.value().ok_or_else(|| invalid(field, format_args!("{key:?} has no `value`")))?;
        if bounded {
            check::meta_entry(field, key, value)?;
        }
        meta.insert(key.to_string(), value.to_string());
    }
    Ok(meta)
}

fn string(field: &str, s: Option<&str>) -> R<String> {
    s.map(str::to_string).ok_or_else(|| missing(field))
}

fn conv(field: &str, s: Option<&str>) -> R<ConvId> {
    check::conv(field, s.ok_or_else(|| missing(field))?)
}

// ---- enums: ids.rs declaration order is the schema's numbering --------------

fn role_from(v: g::Role) -> R<Role> {
    Role::ALL
        .get(usize::from(v.0))
        .copied()
        .ok_or_else(|| invalid("role", format_args!("unknown role {}", v.0)))
}

fn conv_status_from(v: g::ConvStatus) -> R<ConvStatus> {
    ConvStatus::ALL
        .get(usize::from(v.0))
        .copied()
        .ok_or_else(|| invalid("status", format_args!("unknown conversation status {}", v.0)))
}

fn presence_from(v: g::PresenceStatus) -> R<PresenceStatus> {
    PresenceStatus::ALL
        .get(usize::from(v.0))
        .copied()
        .ok_or_else(|| invalid("status", format_args!("unknown presence status {}", v.0)))
}

fn error_code_from(v: g::ErrorCode) -> R<ErrorCode> {
    ErrorCode::ALL
        .get(usize::from(v.0))
        .copied()
        .ok_or_else(|| invalid("code", format_args!("unknown error code {}", v.0)))
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Builds `frame` as an `Envelope` in `b` (reset first) and returns the
/// finished bytes (gateway side).
pub fn encode_server<'b>(frame: &ServerFrame, b: &'b mut FlatBufferBuilder<'_>) -> &'b [u8] {
    use g::Body as B;
    b.reset();
    let (body_type, body) = match &frame.body {
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
            let session = b.create_string(session);
            let user = user_table(b, user);
            let visitor_key = visitor_key.as_deref().map(|k| b.create_string(k));
            let conversations = Some(table_vector(b, conversations.iter(), |b, c| {
                let conv = conv_string(b, c.conv);
                g::ConvSummary::create(
                    b,
                    &g::ConvSummaryArgs {
                        conv: Some(conv),
                        status: g::ConvStatus(c.status as u8),
                        last_seq: c.last_seq,
                    },
                )
            }));
            let groups = groups.as_ref().map(|gs| table_vector(b, gs.iter(), |b, g| b.create_string(g)));
            let args = g::ConnectedEvtArgs {
                groups,
                session: Some(session),
                role: g::Role(*role as u8),
                user: Some(user),
                visitor_key,
                conversations,
                heartbeat_s: *heartbeat_s,
                text_bytes_max: *text_bytes_max,
                attachment_bytes_max: *attachment_bytes_max,
            };
            (B::ConnectedEvt, g::ConnectedEvt::create(b, &args).as_union_value())
        }
        Event::Conversation { conv, status, agent, group, visitor, queue_position, agents_online, since } => {
            let conv = conv_string(b, *conv);
            let agent = agent.as_ref().map(|a| {
                let id = b.create_string(&a.id);
                let name = b.create_string(&a.name);
                g::AgentRef::create(b, &g::AgentRefArgs { id: Some(id), name: Some(name) })
            });
            let group = group.as_deref().map(|s| b.create_string(s));
            let visitor = user_table(b, visitor);
            let args = g::ConversationEvtArgs {
                conv: Some(conv),
                status: g::ConvStatus(*status as u8),
                agent,
                group,
                visitor: Some(visitor),
                queue_position: *queue_position,
                agents_online: *agents_online,
                since: *since,
            };
            (B::ConversationEvt, g::ConversationEvt::create(b, &args).as_union_value())
        }
        Event::Ack { cid, conv, seq, ts, duplicate } => {
            let cid = b.create_string(cid);
            let conv = conv_string(b, *conv);
            let args =
                g::AckEvtArgs { cid: Some(cid), conv: Some(conv), seq: *seq, ts: *ts, duplicate: *duplicate };
            (B::AckEvt, g::AckEvt::create(b, &args).as_union_value())
        }
        Event::Msg(m) => (B::MsgEvt, msg_table(b, m).as_union_value()),
        Event::Read { conv, seq, by } => {
            let conv = conv_string(b, *conv);
            let by = b.create_string(by);
            let args = g::ReadEvtArgs { conv: Some(conv), seq: *seq, by: Some(by) };
            (B::ReadEvt, g::ReadEvt::create(b, &args).as_union_value())
        }
        Event::Typing { conv, by } => {
            let conv = conv_string(b, *conv);
            let by = b.create_string(by);
            (
                B::TypingEvt,
                g::TypingEvt::create(b, &g::TypingEvtArgs { conv: Some(conv), by: Some(by) })
                    .as_union_value(),
            )
        }
        Event::History { conv, messages } => {
            let conv = conv_string(b, *conv);
            let messages = Some(table_vector(b, messages.iter(), msg_table));
            (
                B::HistoryEvt,
                g::HistoryEvt::create(b, &g::HistoryEvtArgs { conv: Some(conv), messages }).as_union_value(),
            )
        }
        Event::Resumed { conv, from, to } => {
            let conv = conv_string(b, *conv);
            let args = g::ResumedEvtArgs { conv: Some(conv), from: *from, to: *to };
            (B::ResumedEvt, g::ResumedEvt::create(b, &args).as_union_value())
        }
        Event::Presence { agent, status, name } => {
            let agent = b.create_string(agent);
            let name = name.as_deref().map(|n| b.create_string(n));
            let status = g::PresenceStatus(*status as u8);
            let args = g::PresenceEvtArgs { agent: Some(agent), status, name };
            (B::PresenceEvt, g::PresenceEvt::create(b, &args).as_union_value())
        }
        Event::Error { code, message } => {
            let message = b.create_string(message);
            let args = g::ErrorEvtArgs { code: g::ErrorCode(*code as u8), message: Some(message) };
            (B::ErrorEvt, g::ErrorEvt::create(b, &args).as_union_value())
        }
        Event::Pong => (B::PongEvt, g::PongEvt::create(b, &g::PongEvtArgs {}).as_union_value()),
        Event::Canned { replies } => {
            let replies = Some(table_vector(b, replies.iter(), |b, r| {
                let name = Some(b.create_string(&r.name));
                let text = Some(b.create_string(&r.text));
                g::CannedReply::create(b, &g::CannedReplyArgs { name, text })
            }));
            (B::CannedEvt, g::CannedEvt::create(b, &g::CannedEvtArgs { replies }).as_union_value())
        }
    };
    finish(b, frame.id, body_type, body)
}

/// Builds `frame` as an `Envelope` in `b` (reset first) and returns the
/// finished bytes (client side).
pub fn encode_client<'b>(frame: &ClientFrame, b: &'b mut FlatBufferBuilder<'_>) -> &'b [u8] {
    use g::Body as B;
    b.reset();
    let (body_type, body) = match &frame.body {
        Command::Connect { token, visitor_id, visitor_key, resume } => {
            let token = token.as_deref().map(|s| b.create_string(s));
            let visitor_id = visitor_id.as_deref().map(|s| b.create_string(s));
            let visitor_key = visitor_key.as_deref().map(|s| b.create_string(s));
            let resume = (!resume.is_empty()).then(|| {
                table_vector(b, resume.iter(), |b, (c, seq)| {
                    let conv = conv_string(b, *c);
                    g::ResumeEntry::create(
                        b,
                        &g::ResumeEntryArgs { conv: Some(conv), last_seen_seq: Some(*seq) },
                    )
                })
            });
            let args = g::ConnectCmdArgs { token, visitor_id, visitor_key, resume };
            (B::ConnectCmd, g::ConnectCmd::create(b, &args).as_union_value())
        }
        Command::Open { group, meta } => {
            let group = group.as_deref().map(|s| b.create_string(s));
            let meta = (!meta.is_empty()).then(|| meta_vector(b, meta));
            (B::OpenCmd, g::OpenCmd::create(b, &g::OpenCmdArgs { group, meta }).as_union_value())
        }
        Command::Send { conv, cid, text, attachment } => {
            let conv = conv_string(b, *conv);
            let cid = b.create_string(cid);
            let text = text.as_deref().map(|s| b.create_string(s));
            let attachment = attachment.as_ref().map(|a| attachment_table(b, a));
            let args = g::SendCmdArgs { conv: Some(conv), cid: Some(cid), text, attachment };
            (B::SendCmd, g::SendCmd::create(b, &args).as_union_value())
        }
        Command::Read { conv, seq } => {
            let conv = conv_string(b, *conv);
            (
                B::ReadCmd,
                g::ReadCmd::create(b, &g::ReadCmdArgs { conv: Some(conv), seq: Some(*seq) }).as_union_value(),
            )
        }
        Command::Typing { conv } => {
            let conv = Some(conv_string(b, *conv));
            (B::TypingCmd, g::TypingCmd::create(b, &g::TypingCmdArgs { conv }).as_union_value())
        }
        Command::History { conv, before, limit } => {
            let conv = Some(conv_string(b, *conv));
            let args = g::HistoryCmdArgs { conv, before: *before, limit: *limit };
            (B::HistoryCmd, g::HistoryCmd::create(b, &args).as_union_value())
        }
        Command::Presence { status, capacity } => {
            let args =
                g::PresenceCmdArgs { status: Some(g::PresenceStatus(*status as u8)), capacity: *capacity };
            (B::PresenceCmd, g::PresenceCmd::create(b, &args).as_union_value())
        }
        Command::Accept { conv } => {
            let conv = Some(conv_string(b, *conv));
            (B::AcceptCmd, g::AcceptCmd::create(b, &g::AcceptCmdArgs { conv }).as_union_value())
        }
        Command::Transfer { conv, to } => {
            let conv = Some(conv_string(b, *conv));
            let to = Some(b.create_string(&to.to_string()));
            (B::TransferCmd, g::TransferCmd::create(b, &g::TransferCmdArgs { conv, to }).as_union_value())
        }
        Command::Close { conv } => {
            let conv = Some(conv_string(b, *conv));
            (B::CloseCmd, g::CloseCmd::create(b, &g::CloseCmdArgs { conv }).as_union_value())
        }
        Command::Ping => (B::PingCmd, g::PingCmd::create(b, &g::PingCmdArgs {}).as_union_value()),
        Command::Canned => (B::CannedCmd, g::CannedCmd::create(b, &g::CannedCmdArgs {}).as_union_value()),
    };
    finish(b, frame.id, body_type, body)
}

fn finish<'b>(
    b: &'b mut FlatBufferBuilder<'_>,
    id: Option<i64>,
    body_type: g::Body,
    body: WIPOffset<flatbuffers::UnionWIPOffset>,
) -> &'b [u8] {
    let env = g::Envelope::create(b, &g::EnvelopeArgs { id, body_type, body: Some(body) });
    b.finish_minimal(env);
    b.finished_data()
}

fn msg_table<'f>(b: &mut FlatBufferBuilder<'f>, m: &Msg) -> WIPOffset<g::MsgEvt<'f>> {
    let conv = conv_string(b, m.conv);
    let cid = b.create_string(&m.cid);
    let id = b.create_string(&m.from.id);
    let name = b.create_string(&m.from.name);
    let from = g::Sender::create(
        b,
        &g::SenderArgs { role: g::Role(m.from.role as u8), id: Some(id), name: Some(name) },
    );
    let text = m.text.as_deref().map(|s| b.create_string(s));
    let attachment = m.attachment.as_ref().map(|a| attachment_table(b, a));
    let args = g::MsgEvtArgs {
        conv: Some(conv),
        seq: m.seq,
        cid: Some(cid),
        from: Some(from),
        text,
        attachment,
        ts: m.ts,
    };
    g::MsgEvt::create(b, &args)
}

fn attachment_table<'f>(b: &mut FlatBufferBuilder<'f>, a: &Attachment) -> WIPOffset<g::Attachment<'f>> {
    let mime = b.create_string(&a.mime);
    let data = b.create_vector(&a.data);
    g::Attachment::create(b, &g::AttachmentArgs { mime: Some(mime), data: Some(data) })
}

fn user_table<'f>(b: &mut FlatBufferBuilder<'f>, u: &User) -> WIPOffset<g::User<'f>> {
    let id = b.create_string(&u.id);
    let name = b.create_string(&u.name);
    let meta = meta_vector(b, &u.meta);
    g::User::create(b, &g::UserArgs { id: Some(id), name: Some(name), meta: Some(meta) })
}

fn meta_vector<'f>(b: &mut FlatBufferBuilder<'f>, meta: &Meta) -> WIPOffset<MetaVector<'f>> {
    table_vector(b, meta.iter(), |b, (k, v)| {
        let key = b.create_string(k);
        let value = b.create_string(v);
        g::Meta::create(b, &g::MetaArgs { key: Some(key), value: Some(value) })
    })
}

/// `c<n>` as a FlatBuffers string, formatted on the stack.
fn conv_string<'f>(b: &mut FlatBufferBuilder<'f>, conv: ConvId) -> WIPOffset<&'f str> {
    let mut buf = [0u8; 21];
    let mut i = buf.len();
    let mut n = conv.0;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    i -= 1;
    buf[i] = b'c';
    let s = std::str::from_utf8(&buf[i..]).expect("ASCII digits");
    b.create_string(s)
}

/// A vector of tables built one per item. The elements' offsets are gathered
/// in a per-thread scratch vector (taken out while in use, so a nested call
/// would merely get a fresh one) and then written in reverse, as FlatBuffers
/// builds back to front.
fn table_vector<'f, T, I>(
    b: &mut FlatBufferBuilder<'f>,
    items: I,
    mut build: impl FnMut(&mut FlatBufferBuilder<'f>, I::Item) -> WIPOffset<T>,
) -> WIPOffset<Vector<'f, ForwardsUOffset<T>>>
where
    I: Iterator,
{
    thread_local! {
        static SCRATCH: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    }
    let mut offsets = SCRATCH.take();
    offsets.clear();
    for item in items {
        offsets.push(build(b, item).value());
    }
    b.start_vector::<WIPOffset<T>>(offsets.len());
    for &o in offsets.iter().rev() {
        b.push(WIPOffset::<T>::new(o));
    }
    let v = b.end_vector::<ForwardsUOffset<T>>(offsets.len());
    SCRATCH.set(offsets);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `X as u8` on an ids.rs enum must be the schema's value of the same name.
    #[test]
    fn enum_numbering_matches_the_schema() {
        fn snake(camel: &str) -> String {
            let mut s = String::new();
            for (i, ch) in camel.chars().enumerate() {
                if ch.is_ascii_uppercase() && i > 0 {
                    s.push('_');
                }
                s.push(ch.to_ascii_lowercase());
            }
            s
        }
        for &v in Role::ALL {
            assert_eq!(snake(g::Role(v as u8).variant_name().unwrap()), v.as_str());
            assert_eq!(role_from(g::Role(v as u8)).unwrap(), v);
        }
        for &v in ConvStatus::ALL {
            assert_eq!(snake(g::ConvStatus(v as u8).variant_name().unwrap()), v.as_str());
        }
        for &v in PresenceStatus::ALL {
            assert_eq!(snake(g::PresenceStatus(v as u8).variant_name().unwrap()), v.as_str());
        }
        for &v in ErrorCode::ALL {
            assert_eq!(snake(g::ErrorCode(v as u8).variant_name().unwrap()), v.as_str());
        }
        assert_eq!(g::ErrorCode::ENUM_MAX as usize + 1, ErrorCode::ALL.len());
        assert!(role_from(g::Role(3)).is_err() && error_code_from(g::ErrorCode(200)).is_err());
    }

    #[test]
    fn conv_strings_format_like_display() {
        let mut b = FlatBufferBuilder::new();
        for n in [0, 7, 42, u64::MAX] {
            b.reset();
            let s = conv_string(&mut b, ConvId(n));
            b.finish_minimal(s);
            let data = b.finished_data();
            // A finished string root: offset, then length-prefixed bytes.
            let at = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
            let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            assert_eq!(&data[at + 4..at + 4 + len], ConvId(n).to_string().as_bytes());
        }
    }
}
