//! One connection's protocol state: who it is, and whether it may do what
//! it asks.
//!
//! A session lives on the shard that accepted its connection and never
//! moves. It starts unidentified; `connect` (credentials checked by
//! [`crate::auth`], then handed over as an [`Identity`]) makes it a visitor
//! or an agent for the rest of its life. Every later command passes
//! [`Session::check`], which settles everything that needs no conversation
//! state, in this order:
//!
//! 1. **Identified?** Before `connect` only `ping` is served; any other
//!    command is `unauthorized` (fatal, close 4500), since PROTOCOL.md says
//!    `connect` must be the first frame. A second `connect` is
//!    `bad_command` and changes nothing.
//! 2. **Rate.** Each command except `ping` takes a token from the
//!    connection's [`TokenBucket`]; an empty bucket is `rate_limited` with a
//!    retry delay, and that check comes first so a flood of invalid
//!    commands is limited too.
//! 3. **Role.** Visitors may not `accept`, `transfer` or set `presence`;
//!    agents may not `open` (`forbidden`).
//! 4. **Shape and size.** Text, attachment, cid, group and profile sizes
//!    against [`crate::config::LimitsConfig`] (`too_large`), and commands that cannot mean
//!    anything (`send` with neither text nor attachment, `history` with
//!    `limit: 0`, …: `bad_command`).
//!
//! What passes comes out as a [`Request`], normalized (history limit
//! defaulted and capped, transfer target parsed, the visitor's group and
//! profile resolved for `open`), ready for the conversation's home shard or
//! the router. Membership and conversation state are theirs to check.

use std::sync::Arc;

use kefu_proto::ids::{ConvId, ErrorCode, PresenceStatus, Role};

use crate::auth::SUB_BYTES_MAX;
use crate::cid::{Cid, CidError};
use crate::config::CoreConfig;
use crate::identity::{
    Actor, GroupName, Identity, Meta, UserId, VIP_LEVEL_KEY, Visitor, merge_meta, vip_level,
};
use crate::ratelimit::{RetryAfterMs, TokenBucket};

/// An attachment as the session sees it: its type and decoded size (the
/// gateway decodes base64 and keeps the bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachmentInfo<'a> {
    /// MIME type, e.g. `image/png`.
    pub mime: &'a str,
    /// Decoded size in bytes.
    pub bytes: usize,
}

/// A client command after `connect`, in domain terms (the gateway maps
/// wire frames to these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// Visitor: open a conversation, or get the open one.
    Open {
        /// Group asked for.
        group: Option<&'a str>,
        /// Profile additions from the widget.
        meta: Option<&'a Meta>,
    },
    /// Post a message.
    Send {
        /// Where.
        conv: ConvId,
        /// Client message id.
        cid: &'a str,
        /// Text, if any.
        text: Option<&'a str>,
        /// Attachment, if any.
        attachment: Option<AttachmentInfo<'a>>,
    },
    /// Everything up to `seq` is read.
    Read {
        /// Where.
        conv: ConvId,
        /// Last seq read.
        seq: u64,
    },
    /// The user is typing.
    Typing {
        /// Where.
        conv: ConvId,
    },
    /// A page of past messages.
    History {
        /// Where.
        conv: ConvId,
        /// Only seqs below this; none: the newest.
        before: Option<u64>,
        /// Page size.
        limit: Option<u32>,
    },
    /// Agent: set availability and optionally capacity.
    Presence {
        /// New status.
        status: PresenceStatus,
        /// New capacity.
        capacity: Option<u32>,
    },
    /// Agent: take a queued conversation.
    Accept {
        /// Which.
        conv: ConvId,
    },
    /// Agent: hand a conversation to an agent id or `group:NAME`.
    Transfer {
        /// Which.
        conv: ConvId,
        /// Target as written.
        to: &'a str,
    },
    /// End a conversation.
    Close {
        /// Which.
        conv: ConvId,
    },
    /// Keep-alive.
    Ping,
}

/// Where a `transfer` sends a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferTarget {
    /// To this agent.
    Agent(UserId),
    /// Back to the queue of this group (`group:NAME`).
    Group(GroupName),
}

/// The prefix that makes a transfer target a group.
pub const GROUP_TARGET_PREFIX: &str = "group:";

/// A command that passed the session's checks, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Open (or return) the visitor's conversation: hand to the router.
    Open {
        /// The visitor, with the widget's profile merged under the token's.
        visitor: Visitor,
        /// `open.group`, else the token's first group, else
        /// `routing.default_group`.
        group: GroupName,
        /// Queue priority from the token's (or `SyncUser`'s) `vip_level`.
        vip_level: i64,
    },
    /// Post a message: to the home shard.
    Send {
        /// Where.
        conv: ConvId,
        /// Client message id.
        cid: Cid,
        /// Text, if any (non-empty).
        text: Option<&'a str>,
        /// Attachment, if any.
        attachment: Option<AttachmentInfo<'a>>,
    },
    /// Read mark: to the home shard.
    Read {
        /// Where.
        conv: ConvId,
        /// Last seq read (at least 1).
        seq: u64,
    },
    /// Typing: to the home shard.
    Typing {
        /// Where.
        conv: ConvId,
    },
    /// History page: the home shard checks membership, storage reads.
    History {
        /// Where.
        conv: ConvId,
        /// Only seqs below this.
        before: Option<u64>,
        /// Page size, 1 to `messages.history_limit_max`.
        limit: u32,
    },
    /// Presence: to the router.
    Presence {
        /// New status.
        status: PresenceStatus,
        /// New capacity (at most `routing.max_capacity`).
        capacity: Option<u32>,
    },
    /// Accept: to the router.
    Accept {
        /// Which.
        conv: ConvId,
    },
    /// Transfer: to the router.
    Transfer {
        /// Which.
        conv: ConvId,
        /// Where to.
        to: TransferTarget,
    },
    /// Close: to the router.
    Close {
        /// Which.
        conv: ConvId,
    },
    /// Answer `pong`.
    Ping,
}

impl<'a> Request<'a> {
    /// The same request without borrows, to hand to another shard. Only
    /// `Send` borrows (its text and attachment point into the frame), so it
    /// comes back as `Err` for the caller to move its owned parts.
    pub fn detach(self) -> Result<Request<'static>, Request<'a>> {
        Ok(match self {
            Request::Send { .. } => return Err(self),
            Request::Open { visitor, group, vip_level } => Request::Open { visitor, group, vip_level },
            Request::Read { conv, seq } => Request::Read { conv, seq },
            Request::Typing { conv } => Request::Typing { conv },
            Request::History { conv, before, limit } => Request::History { conv, before, limit },
            Request::Presence { status, capacity } => Request::Presence { status, capacity },
            Request::Accept { conv } => Request::Accept { conv },
            Request::Transfer { conv, to } => Request::Transfer { conv, to },
            Request::Close { conv } => Request::Close { conv },
            Request::Ping => Request::Ping,
        })
    }
}

/// Why the session refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// A command before `connect`.
    #[error("connect first: it must be the first command")]
    NotConnected,
    /// `connect` on a connected session.
    #[error("already connected")]
    AlreadyConnected,
    /// The bucket is empty.
    #[error("rate limited: retry after {} ms", .0.0)]
    RateLimited(RetryAfterMs),
    /// The role may not do this.
    #[error("a {role} may not {command}")]
    Forbidden {
        /// The command.
        command: &'static str,
        /// The role asking.
        role: &'static str,
    },
    /// Over a size limit.
    #[error("{what} is {len} bytes, more than the {max} allowed")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Well-formed but meaningless.
    #[error("{0}")]
    BadCommand(&'static str),
}

impl SessionError {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::NotConnected => ErrorCode::Unauthorized,
            SessionError::AlreadyConnected | SessionError::BadCommand(_) => ErrorCode::BadCommand,
            SessionError::RateLimited(_) => ErrorCode::RateLimited,
            SessionError::Forbidden { .. } => ErrorCode::Forbidden,
            SessionError::TooLarge { .. } => ErrorCode::TooLarge,
        }
    }

    /// The retry delay of a `rate_limited`.
    pub fn retry_after(&self) -> Option<RetryAfterMs> {
        match self {
            SessionError::RateLimited(r) => Some(*r),
            _ => None,
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Visitor => "visitor",
        Role::Agent => "agent",
        Role::Bot => "bot",
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    config: Arc<CoreConfig>,
    identity: Option<Identity>,
    bucket: TokenBucket,
}

impl Session {
    /// A session for a connection accepted at `now_ms`.
    pub fn new(config: Arc<CoreConfig>, now_ms: u64) -> Session {
        let bucket = TokenBucket::new(config.rate, now_ms);
        Session { config, identity: None, bucket }
    }

    /// Records the identity `connect` proved. A second `connect` is refused
    /// and changes nothing.
    pub fn connect(&mut self, identity: Identity) -> Result<&Identity, SessionError> {
        if self.identity.is_some() {
            return Err(SessionError::AlreadyConnected);
        }
        Ok(self.identity.insert(identity))
    }

    /// Who this connection is, once connected.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The actor for commands sent elsewhere, once connected.
    pub fn actor(&self) -> Option<Actor> {
        self.identity.as_ref().map(Identity::actor)
    }

    /// Checks the size of `connect.resume` (how many conversations it names).
    pub fn check_resume(&self, conversations: usize) -> Result<(), SessionError> {
        let max = self.config.limits.max_resume_conversations;
        if conversations > max {
            return Err(SessionError::TooLarge { what: "resume", len: conversations, max });
        }
        Ok(())
    }

    /// Checks one command at `now_ms` (see the module doc for the order).
    pub fn check<'a>(&mut self, cmd: Command<'a>, now_ms: u64) -> Result<Request<'a>, SessionError> {
        if cmd == Command::Ping {
            return Ok(Request::Ping);
        }
        let Some(identity) = &self.identity else {
            return Err(SessionError::NotConnected);
        };
        self.bucket.try_take(now_ms).map_err(SessionError::RateLimited)?;
        let limits = &self.config.limits;
        let role = identity.role;
        let forbid = |command| Err(SessionError::Forbidden { command, role: role_name(role) });
        let too_large = |what, len, max| {
            if len > max { Err(SessionError::TooLarge { what, len, max }) } else { Ok(()) }
        };
        Ok(match cmd {
            Command::Ping => Request::Ping,
            Command::Open { group, meta } => {
                if role != Role::Visitor {
                    return forbid("open a conversation");
                }
                let group = match group {
                    Some("") => return Err(SessionError::BadCommand("open.group is empty")),
                    Some(g) => {
                        too_large("group", g.len(), limits.max_group_bytes)?;
                        GroupName::from(g)
                    }
                    None => match identity.groups.first() {
                        Some(g) => g.clone(),
                        None => GroupName::from(self.config.routing.default_group.as_str()),
                    },
                };
                // The widget may add to the profile but not override what the
                // token (or SyncUser) says, and never sets its own priority.
                let mut merged = Meta::new();
                if let Some(extra) = meta {
                    let size: usize = extra.iter().map(|(k, v)| k.len() + v.len()).sum();
                    too_large("open.meta", size, limits.max_meta_bytes)?;
                    merged.extend(
                        extra
                            .iter()
                            .filter(|(k, _)| k.as_str() != VIP_LEVEL_KEY)
                            .map(|(k, v)| (k.clone(), v.clone())),
                    );
                }
                merge_meta(&mut merged, &identity.meta);
                let vip_level = vip_level(&identity.meta);
                let visitor = Visitor { id: identity.id.clone(), name: identity.name.clone(), meta: merged };
                Request::Open { visitor, group, vip_level }
            }
            Command::Send { conv, cid, text, attachment } => {
                let cid = match Cid::new(cid) {
                    Ok(c) if c.as_str().len() <= limits.max_cid_bytes => c,
                    Ok(_) | Err(CidError::TooLong(_)) => {
                        return Err(SessionError::TooLarge {
                            what: "cid",
                            len: cid.len(),
                            max: limits.max_cid_bytes,
                        });
                    }
                    Err(CidError::Empty) => return Err(SessionError::BadCommand("cid is empty")),
                };
                let text = text.filter(|t| !t.is_empty());
                if let Some(t) = text {
                    too_large("text", t.len(), limits.max_text_bytes)?;
                }
                if let Some(a) = attachment {
                    if !valid_mime(a.mime, limits.max_mime_bytes) {
                        return Err(SessionError::BadCommand(
                            "attachment.mime must be a MIME type like image/png",
                        ));
                    }
                    if a.bytes == 0 {
                        return Err(SessionError::BadCommand("attachment is empty"));
                    }
                    too_large("attachment", a.bytes, limits.max_attachment_bytes)?;
                }
                if text.is_none() && attachment.is_none() {
                    return Err(SessionError::BadCommand("send needs a text or an attachment"));
                }
                Request::Send { conv, cid, text, attachment }
            }
            Command::Read { conv, seq } => {
                if seq == 0 {
                    return Err(SessionError::BadCommand("read.seq starts at 1"));
                }
                Request::Read { conv, seq }
            }
            Command::Typing { conv } => Request::Typing { conv },
            Command::History { conv, before, limit } => {
                let limit = match limit {
                    Some(0) => return Err(SessionError::BadCommand("history.limit must be at least 1")),
                    Some(n) => n.min(limits.history_limit_max),
                    None => limits.history_limit_default,
                };
                Request::History { conv, before, limit }
            }
            Command::Presence { status, capacity } => {
                if role != Role::Agent {
                    return forbid("set presence");
                }
                if capacity.is_some_and(|c| c > self.config.routing.max_capacity) {
                    return Err(SessionError::BadCommand("presence.capacity is above routing.max_capacity"));
                }
                Request::Presence { status, capacity }
            }
            Command::Accept { conv } => {
                if role != Role::Agent {
                    return forbid("accept a conversation");
                }
                Request::Accept { conv }
            }
            Command::Transfer { conv, to } => {
                if role != Role::Agent {
                    return forbid("transfer a conversation");
                }
                let to = match to.strip_prefix(GROUP_TARGET_PREFIX) {
                    Some("") => return Err(SessionError::BadCommand("transfer.to names an empty group")),
                    Some(g) => {
                        too_large("group", g.len(), limits.max_group_bytes)?;
                        TransferTarget::Group(GroupName::from(g))
                    }
                    None if to.is_empty() => return Err(SessionError::BadCommand("transfer.to is empty")),
                    None => {
                        too_large("transfer.to", to.len(), SUB_BYTES_MAX)?;
                        TransferTarget::Agent(UserId::from(to))
                    }
                };
                Request::Transfer { conv, to }
            }
            Command::Close { conv } => Request::Close { conv },
        })
    }
}

/// `type/subtype`, printable ASCII without spaces, within `max` bytes.
fn valid_mime(mime: &str, max: usize) -> bool {
    let ok_chars = mime.bytes().all(|b| b.is_ascii_graphic());
    let parts = mime.split_once('/');
    ok_chars && mime.len() <= max && parts.is_some_and(|(t, s)| !t.is_empty() && !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_000_000;

    fn identity(role: Role) -> Identity {
        Identity {
            role,
            id: UserId::from(if role == Role::Agent { "a1" } else { "v1" }),
            name: Arc::from("Someone"),
            groups: Arc::from([]),
            meta: Meta::new(),
            anonymous: false,
        }
    }

    fn session(role: Role) -> Session {
        let mut s = Session::new(Arc::new(CoreConfig::default()), T0);
        s.connect(identity(role)).unwrap();
        s
    }

    fn code(r: Result<Request<'_>, SessionError>) -> ErrorCode {
        r.unwrap_err().code()
    }

    fn send<'a>(cid: &'a str, text: Option<&'a str>, attachment: Option<AttachmentInfo<'a>>) -> Command<'a> {
        Command::Send { conv: ConvId(1), cid, text, attachment }
    }

    #[test]
    fn only_send_keeps_its_borrows_when_detached() {
        let mut s = session(Role::Visitor);
        let sent = s.check(send("c-1", Some("hi"), None), 0).unwrap();
        assert!(matches!(sent.detach(), Err(Request::Send { text: Some("hi"), .. })));
        let read = s.check(Command::Read { conv: ConvId(3), seq: 2 }, 0).unwrap();
        assert_eq!(read.detach(), Ok(Request::Read { conv: ConvId(3), seq: 2 }));
    }

    #[test]
    fn nothing_but_ping_before_connect() {
        let mut s = Session::new(Arc::new(CoreConfig::default()), T0);
        assert_eq!(s.check(Command::Ping, T0), Ok(Request::Ping));
        let err = s.check(send("c1", Some("hi"), None), T0).unwrap_err();
        assert_eq!(err, SessionError::NotConnected);
        assert_eq!(err.code(), ErrorCode::Unauthorized);
        assert!(err.code().fatal());
        assert!(s.identity().is_none());
        s.connect(identity(Role::Visitor)).unwrap();
        assert!(s.check(send("c1", Some("hi"), None), T0).is_ok());
        // A second connect is refused and keeps the first identity.
        assert_eq!(s.connect(identity(Role::Agent)).unwrap_err().code(), ErrorCode::BadCommand);
        assert_eq!(s.identity().unwrap().role, Role::Visitor);
    }

    #[test]
    fn visitors_may_not_do_agent_things() {
        let mut s = session(Role::Visitor);
        for cmd in [
            Command::Accept { conv: ConvId(1) },
            Command::Transfer { conv: ConvId(1), to: "a2" },
            Command::Presence { status: PresenceStatus::Online, capacity: None },
        ] {
            assert_eq!(code(s.check(cmd, T0)), ErrorCode::Forbidden);
        }
        assert!(s.check(Command::Close { conv: ConvId(1) }, T0).is_ok(), "visitors may close");
        assert!(s.check(Command::Open { group: None, meta: None }, T0).is_ok());
    }

    #[test]
    fn agents_may_not_open() {
        let mut s = session(Role::Agent);
        assert_eq!(code(s.check(Command::Open { group: None, meta: None }, T0)), ErrorCode::Forbidden);
        assert!(s.check(Command::Accept { conv: ConvId(1) }, T0).is_ok());
        assert!(s.check(Command::Presence { status: PresenceStatus::Away, capacity: Some(3) }, T0).is_ok());
        assert_eq!(
            code(s.check(Command::Presence { status: PresenceStatus::Online, capacity: Some(101) }, T0)),
            ErrorCode::BadCommand
        );
    }

    #[test]
    fn sizes_are_enforced() {
        let mut s = session(Role::Visitor);
        let limits = LimitsConfigView::default();
        let big_text = "x".repeat(limits.max_text + 1);
        assert_eq!(code(s.check(send("c", Some(&big_text), None), T0)), ErrorCode::TooLarge);
        let ok_text = "x".repeat(limits.max_text);
        assert!(s.check(send("c", Some(&ok_text), None), T0).is_ok());
        let long_cid = "c".repeat(65);
        assert_eq!(code(s.check(send(&long_cid, Some("hi"), None), T0)), ErrorCode::TooLarge);
        assert_eq!(code(s.check(send("", Some("hi"), None), T0)), ErrorCode::BadCommand);
        let png = |bytes| Some(AttachmentInfo { mime: "image/png", bytes });
        assert_eq!(code(s.check(send("c", None, png(limits.max_attachment + 1)), T0)), ErrorCode::TooLarge);
        assert!(s.check(send("c", None, png(limits.max_attachment)), T0).is_ok());
        assert_eq!(code(s.check(send("c", None, png(0)), T0)), ErrorCode::BadCommand);
        for mime in ["", "image", "/png", "image/", "image/ png", &format!("a/{}", "b".repeat(200))] {
            let a = Some(AttachmentInfo { mime, bytes: 10 });
            assert_eq!(code(s.check(send("c", None, a), T0)), ErrorCode::BadCommand, "{mime}");
        }
        assert_eq!(code(s.check(send("c", None, None), T0)), ErrorCode::BadCommand);
        assert_eq!(code(s.check(send("c", Some(""), None), T0)), ErrorCode::BadCommand);
        // Text and attachment together is a captioned image.
        assert!(s.check(send("c", Some("look"), png(10)), T0).is_ok());
        assert_eq!(code(s.check(Command::Read { conv: ConvId(1), seq: 0 }, T0)), ErrorCode::BadCommand);
        assert_eq!(s.check_resume(256), Ok(()));
        assert_eq!(s.check_resume(257).unwrap_err().code(), ErrorCode::TooLarge);
    }

    /// The default limits, spelled out so the test reads as the rule.
    struct LimitsConfigView {
        max_text: usize,
        max_attachment: usize,
    }

    impl Default for LimitsConfigView {
        fn default() -> Self {
            let l = crate::config::LimitsConfig::default();
            assert_eq!((l.max_text_bytes, l.max_attachment_bytes), (16 * 1024, 1024 * 1024));
            LimitsConfigView { max_text: l.max_text_bytes, max_attachment: l.max_attachment_bytes }
        }
    }

    #[test]
    fn history_limit_defaults_to_50_and_caps_at_200() {
        let mut s = session(Role::Agent);
        let h = |limit| Command::History { conv: ConvId(1), before: None, limit };
        assert_eq!(s.check(h(None), T0), Ok(Request::History { conv: ConvId(1), before: None, limit: 50 }));
        assert_eq!(s.check(h(Some(7)), T0), Ok(Request::History { conv: ConvId(1), before: None, limit: 7 }));
        assert_eq!(
            s.check(h(Some(5000)), T0),
            Ok(Request::History { conv: ConvId(1), before: None, limit: 200 })
        );
        assert_eq!(code(s.check(h(Some(0)), T0)), ErrorCode::BadCommand);
    }

    #[test]
    fn transfer_targets_parse() {
        let mut s = session(Role::Agent);
        let t = |to| Command::Transfer { conv: ConvId(1), to };
        assert_eq!(
            s.check(t("a2"), T0),
            Ok(Request::Transfer { conv: ConvId(1), to: TransferTarget::Agent(UserId::from("a2")) })
        );
        assert_eq!(
            s.check(t("group:billing"), T0),
            Ok(Request::Transfer { conv: ConvId(1), to: TransferTarget::Group(GroupName::from("billing")) })
        );
        assert_eq!(code(s.check(t("group:"), T0)), ErrorCode::BadCommand);
        assert_eq!(code(s.check(t(""), T0)), ErrorCode::BadCommand);
        let long = format!("group:{}", "g".repeat(65));
        assert_eq!(code(s.check(t(&long), T0)), ErrorCode::TooLarge);
    }

    #[test]
    fn open_resolves_group_and_keeps_priority_signed() {
        let mut s = Session::new(Arc::new(CoreConfig::default()), T0);
        let mut id = identity(Role::Visitor);
        id.groups = Arc::from([GroupName::from("vip-desk")]);
        id.meta = [("vip_level".to_string(), "2".to_string()), ("plan".into(), "pro".into())].into();
        s.connect(id).unwrap();
        let widget: Meta = [
            ("vip_level".to_string(), "99".to_string()),
            ("page".into(), "/pricing".into()),
            ("plan".into(), "free".into()),
        ]
        .into();
        let Ok(Request::Open { visitor, group, vip_level }) =
            s.check(Command::Open { group: None, meta: Some(&widget) }, T0)
        else {
            panic!("open refused");
        };
        assert_eq!(&*group, "vip-desk", "the token's group when open names none");
        assert_eq!(vip_level, 2, "the widget cannot raise its own priority");
        assert_eq!(visitor.meta["vip_level"], "2");
        assert_eq!(visitor.meta["plan"], "pro", "the token wins over the widget");
        assert_eq!(visitor.meta["page"], "/pricing");
        let Ok(Request::Open { group, .. }) = s.check(Command::Open { group: Some("sales"), meta: None }, T0)
        else {
            panic!("open refused");
        };
        assert_eq!(&*group, "sales");
        // No group anywhere: the default group.
        let mut s = session(Role::Visitor);
        let Ok(Request::Open { group, vip_level, .. }) =
            s.check(Command::Open { group: None, meta: None }, T0)
        else {
            panic!("open refused");
        };
        assert_eq!((&*group, vip_level), ("default", 0));
        let huge: Meta = [("k".to_string(), "v".repeat(5000))].into();
        assert_eq!(code(s.check(Command::Open { group: None, meta: Some(&huge) }, T0)), ErrorCode::TooLarge);
    }

    #[test]
    fn a_session_is_small() {
        // DESIGN.md budgets 2 KB of gateway memory per idle connection; the
        // session's share is its struct plus the identity's few strings.
        assert!(std::mem::size_of::<Session>() <= 160, "{}", std::mem::size_of::<Session>());
    }

    #[test]
    fn commands_are_rate_limited_and_pings_are_free() {
        let mut config = CoreConfig::default();
        config.rate.messages_per_s = 1;
        config.rate.burst = 2;
        let mut s = Session::new(Arc::new(config), T0);
        s.connect(identity(Role::Visitor)).unwrap();
        assert!(s.check(Command::Typing { conv: ConvId(1) }, T0).is_ok());
        assert!(s.check(send("c1", Some("a"), None), T0).is_ok());
        let err = s.check(send("c2", Some("b"), None), T0).unwrap_err();
        assert_eq!(err.code(), ErrorCode::RateLimited);
        assert!(err.code().retryable());
        assert_eq!(err.retry_after(), Some(RetryAfterMs(1000)));
        // Even a command that would be refused for its shape costs a token
        // (floods of junk are limited too), and pings never do.
        for _ in 0..10 {
            assert_eq!(s.check(Command::Ping, T0), Ok(Request::Ping));
        }
        assert!(s.check(send("c2", Some("b"), None), T0 + 1000).is_ok(), "the same cid, after the back-off");
    }
}
