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
//!    A `send`'s attachment, once its shape and size are valid, also takes
//!    its bytes from its sender's attachment budget
//!    (`limits.attachment_bytes_per_min`); over it the `send` is
//!    `rate_limited` with the wait until the attachment fits. That budget
//!    is the sender's, not the connection's (a visitor with ten tabs gets
//!    no ten budgets), so the edge keeps it in a table every shard shares
//!    (see `chat::edge`); [`SessionError::AttachmentBudget`] is its error.
//! 3. **Role.** Visitors may not `accept`, `transfer` or set `presence`;
//!    agents may not `open` (`forbidden`).
//! 4. **Shape and size.** Text, attachment, cid, group and profile sizes
//!    against [`crate::config::LimitsConfig`] (`too_large`), and commands that cannot mean
//!    anything (`send` with neither text nor attachment, `history` with
//!    `limit: 0`, …: `bad_command`).
//!
//! It takes the decoded wire [`Command`] itself, and what passes comes out
//! as [`Checked`]: a [`RouteRequest`] for the router or a [`HomeRequest`]
//! for the conversation's home shard, normalized (history limit defaulted
//! and capped, the transfer target's names shared, the visitor's group and
//! profile resolved for `open`). A `send` keeps the frame's own strings, so
//! the message's cid and text travel on to storage without a copy.
//! Membership and conversation state are the router's and the home's to
//! check.

use std::sync::Arc;

use kefu_proto::ids::{ConvId, ErrorCode, PresenceStatus, Role};

use kefu_proto::client::{Attachment, Command, TransferTarget as WireTarget};

use crate::auth::SUB_BYTES_MAX;
use crate::config::{CID_BYTES_MAX, CoreConfig};
use crate::identity::{
    Actor, GroupName, Identity, Meta, UserId, VIP_LEVEL_KEY, Visitor, merge_meta, vip_level,
};
use crate::ratelimit::{RetryAfterMs, TokenBucket};

/// Where a `transfer` sends a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferTarget {
    /// To this agent.
    Agent(UserId),
    /// Back to the queue of this group (`group:NAME`).
    Group(GroupName),
}

/// A command that passed the session's checks, sorted by who answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// `ping`: the connection's own shard answers `pong`.
    Pong,
    /// `canned`: the connection's own shard answers from its config.
    Canned,
    /// For the router: who serves what.
    Route(RouteRequest),
    /// For the conversation's home shard.
    Home(HomeRequest),
}

/// A command the router answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteRequest {
    /// Open (or return) the visitor's conversation.
    Open {
        /// The visitor, with the widget's profile merged under the token's.
        visitor: Visitor,
        /// `open.group`, else the token's first group, else
        /// `routing.default_group`.
        group: GroupName,
        /// Queue priority from the token's (or `SyncUser`'s) `vip_level`.
        vip_level: i64,
    },
    /// An agent's availability.
    Presence {
        /// New status.
        status: PresenceStatus,
        /// New capacity (at most `routing.max_capacity`).
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
        /// Where to.
        to: TransferTarget,
    },
    /// End a conversation.
    Close {
        /// Which.
        conv: ConvId,
    },
}

/// A command a conversation's home answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomeRequest {
    /// Post a message. The strings are the decoded frame's.
    Send {
        /// Where.
        conv: ConvId,
        /// Client message id, checked (1 to `messages.max_cid_bytes` bytes).
        cid: String,
        /// Text, if any (non-empty).
        text: Option<String>,
        /// Attachment, if any (a MIME type, within size).
        attachment: Option<Attachment>,
    },
    /// Read mark.
    Read {
        /// Where.
        conv: ConvId,
        /// Last seq read (at least 1).
        seq: u64,
    },
    /// Typing.
    Typing {
        /// Where.
        conv: ConvId,
    },
    /// History page: the home checks membership, storage reads.
    History {
        /// Where.
        conv: ConvId,
        /// Only seqs below this.
        before: Option<u64>,
        /// Page size, 1 to `messages.history_limit_max`.
        limit: u32,
    },
}

impl HomeRequest {
    /// The conversation it is about.
    pub fn conv(&self) -> ConvId {
        match self {
            HomeRequest::Send { conv, .. }
            | HomeRequest::Read { conv, .. }
            | HomeRequest::Typing { conv }
            | HomeRequest::History { conv, .. } => *conv,
        }
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
    /// The attachment does not fit this minute's attachment budget.
    #[error("rate limited: retry after {} ms (limits.attachment_bytes_per_min)", .0.0)]
    AttachmentBudget(RetryAfterMs),
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
            SessionError::RateLimited(_) | SessionError::AttachmentBudget(_) => ErrorCode::RateLimited,
            SessionError::Forbidden { .. } => ErrorCode::Forbidden,
            SessionError::TooLarge { .. } => ErrorCode::TooLarge,
        }
    }

    /// The retry delay of a `rate_limited`.
    pub fn retry_after(&self) -> Option<RetryAfterMs> {
        match self {
            SessionError::RateLimited(r) | SessionError::AttachmentBudget(r) => Some(*r),
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

    /// Enriches the connected identity's profile with what the business
    /// system's `OnConnect` hook answered: `name` (if given) replaces the
    /// display name; `meta` is laid over the credentials' profile key by
    /// key (as `SyncUser` does). Nothing happens before `connect`.
    pub fn enrich(&mut self, name: Option<&str>, meta: &Meta) {
        let Some(identity) = &mut self.identity else { return };
        if let Some(name) = name {
            identity.name = Arc::from(name);
        }
        merge_meta(&mut identity.meta, meta);
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
    pub fn check(&mut self, cmd: Command, now_ms: u64) -> Result<Checked, SessionError> {
        if cmd == Command::Ping {
            return Ok(Checked::Pong);
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
            Command::Ping => Checked::Pong,
            Command::Canned => {
                if role != Role::Agent {
                    return forbid("list canned replies");
                }
                Checked::Canned
            }
            Command::Connect { .. } => return Err(SessionError::AlreadyConnected),
            Command::Open { group, meta } => {
                if role != Role::Visitor {
                    return forbid("open a conversation");
                }
                let group = match group.as_deref() {
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
                let size: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
                too_large("open.meta", size, limits.max_meta_bytes)?;
                let mut merged: Meta =
                    meta.into_iter().filter(|(k, _)| k.as_str() != VIP_LEVEL_KEY).collect();
                merge_meta(&mut merged, &identity.meta);
                let vip_level = vip_level(&identity.meta);
                let visitor = Visitor { id: identity.id.clone(), name: identity.name.clone(), meta: merged };
                Checked::Route(RouteRequest::Open { visitor, group, vip_level })
            }
            Command::Send { conv, cid, text, attachment } => {
                if cid.is_empty() {
                    return Err(SessionError::BadCommand("cid is empty"));
                }
                // The cid window keeps cids inline, at most CID_BYTES_MAX.
                if cid.len() > limits.max_cid_bytes.min(CID_BYTES_MAX) {
                    return Err(SessionError::TooLarge {
                        what: "cid",
                        len: cid.len(),
                        max: limits.max_cid_bytes,
                    });
                }
                let text = text.filter(|t| !t.is_empty());
                if let Some(t) = &text {
                    too_large("text", t.len(), limits.max_text_bytes)?;
                }
                if let Some(a) = &attachment {
                    if !valid_mime(&a.mime, limits.max_mime_bytes) {
                        return Err(SessionError::BadCommand(
                            "attachment.mime must be a MIME type like image/png",
                        ));
                    }
                    if a.data.is_empty() {
                        return Err(SessionError::BadCommand("attachment is empty"));
                    }
                    too_large("attachment", a.data.len(), limits.max_attachment_bytes)?;
                }
                if text.is_none() && attachment.is_none() {
                    return Err(SessionError::BadCommand("send needs a text or an attachment"));
                }
                Checked::Home(HomeRequest::Send { conv, cid, text, attachment })
            }
            Command::Read { conv, seq } => {
                if seq == 0 {
                    return Err(SessionError::BadCommand("read.seq starts at 1"));
                }
                Checked::Home(HomeRequest::Read { conv, seq })
            }
            Command::Typing { conv } => Checked::Home(HomeRequest::Typing { conv }),
            Command::History { conv, before, limit } => {
                let limit = match limit {
                    Some(0) => return Err(SessionError::BadCommand("history.limit must be at least 1")),
                    Some(n) => n.min(limits.history_limit_max),
                    None => limits.history_limit_default,
                };
                Checked::Home(HomeRequest::History { conv, before, limit })
            }
            Command::Presence { status, capacity } => {
                if role != Role::Agent {
                    return forbid("set presence");
                }
                if capacity.is_some_and(|c| c > self.config.routing.max_capacity) {
                    return Err(SessionError::BadCommand("presence.capacity is above routing.max_capacity"));
                }
                Checked::Route(RouteRequest::Presence { status, capacity })
            }
            Command::Accept { conv } => {
                if role != Role::Agent {
                    return forbid("accept a conversation");
                }
                Checked::Route(RouteRequest::Accept { conv })
            }
            Command::Transfer { conv, to } => {
                // A bot is the business system (tokens never carry `bot`).
                if !matches!(role, Role::Agent | Role::Bot) {
                    return forbid("transfer a conversation");
                }
                let to = match to {
                    WireTarget::Group(g) if g.is_empty() => {
                        return Err(SessionError::BadCommand("transfer.to names an empty group"));
                    }
                    WireTarget::Group(g) => {
                        too_large("group", g.len(), limits.max_group_bytes)?;
                        TransferTarget::Group(GroupName::from(g))
                    }
                    WireTarget::Agent(a) if a.is_empty() => {
                        return Err(SessionError::BadCommand("transfer.to is empty"));
                    }
                    WireTarget::Agent(a) => {
                        too_large("transfer.to", a.len(), SUB_BYTES_MAX)?;
                        TransferTarget::Agent(UserId::from(a))
                    }
                };
                Checked::Route(RouteRequest::Transfer { conv, to })
            }
            Command::Close { conv } => Checked::Route(RouteRequest::Close { conv }),
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

    fn code(r: Result<Checked, SessionError>) -> ErrorCode {
        r.unwrap_err().code()
    }

    fn send(cid: &str, text: Option<&str>, attachment: Option<Attachment>) -> Command {
        Command::Send { conv: ConvId(1), cid: cid.into(), text: text.map(Into::into), attachment }
    }

    fn attachment(mime: &str, bytes: usize) -> Option<Attachment> {
        Some(Attachment { mime: mime.into(), data: vec![0; bytes] })
    }

    #[test]
    fn commands_are_sorted_by_who_answers_them() {
        let mut s = session(Role::Visitor);
        let sent = s.check(send("c-1", Some("hi"), None), 0).unwrap();
        let home = HomeRequest::Send {
            conv: ConvId(1),
            cid: "c-1".into(),
            text: Some("hi".into()),
            attachment: None,
        };
        assert_eq!(sent, Checked::Home(home));
        let read = s.check(Command::Read { conv: ConvId(3), seq: 2 }, 0).unwrap();
        assert_eq!(read, Checked::Home(HomeRequest::Read { conv: ConvId(3), seq: 2 }));
        let close = s.check(Command::Close { conv: ConvId(3) }, 0).unwrap();
        assert_eq!(close, Checked::Route(RouteRequest::Close { conv: ConvId(3) }));
        assert_eq!(s.check(Command::Ping, 0), Ok(Checked::Pong));
    }

    #[test]
    fn nothing_but_ping_before_connect() {
        let mut s = Session::new(Arc::new(CoreConfig::default()), T0);
        assert_eq!(s.check(Command::Ping, T0), Ok(Checked::Pong));
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
            Command::Transfer { conv: ConvId(1), to: WireTarget::Agent("a2".into()) },
            Command::Presence { status: PresenceStatus::Online, capacity: None },
        ] {
            assert_eq!(code(s.check(cmd, T0)), ErrorCode::Forbidden);
        }
        assert!(s.check(Command::Close { conv: ConvId(1) }, T0).is_ok(), "visitors may close");
        assert!(s.check(Command::Open { group: None, meta: Meta::new() }, T0).is_ok());
    }

    #[test]
    fn agents_may_not_open() {
        let mut s = session(Role::Agent);
        assert_eq!(code(s.check(Command::Open { group: None, meta: Meta::new() }, T0)), ErrorCode::Forbidden);
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
        let png = |bytes| attachment("image/png", bytes);
        assert_eq!(code(s.check(send("c", None, png(limits.max_attachment + 1)), T0)), ErrorCode::TooLarge);
        assert!(s.check(send("c", None, png(limits.max_attachment)), T0).is_ok());
        assert_eq!(code(s.check(send("c", None, png(0)), T0)), ErrorCode::BadCommand);
        for mime in ["", "image", "/png", "image/", "image/ png", &format!("a/{}", "b".repeat(200))] {
            let a = attachment(mime, 10);
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
        let page = |limit| Ok(Checked::Home(HomeRequest::History { conv: ConvId(1), before: None, limit }));
        assert_eq!(s.check(h(None), T0), page(50));
        assert_eq!(s.check(h(Some(7)), T0), page(7));
        assert_eq!(s.check(h(Some(5000)), T0), page(200));
        assert_eq!(code(s.check(h(Some(0)), T0)), ErrorCode::BadCommand);
    }

    #[test]
    fn transfer_targets_parse() {
        let mut s = session(Role::Agent);
        let t = |to: WireTarget| Command::Transfer { conv: ConvId(1), to };
        let routed = |to| Ok(Checked::Route(RouteRequest::Transfer { conv: ConvId(1), to }));
        assert_eq!(
            s.check(t(WireTarget::Agent("a2".into())), T0),
            routed(TransferTarget::Agent(UserId::from("a2")))
        );
        assert_eq!(
            s.check(t(WireTarget::Group("billing".into())), T0),
            routed(TransferTarget::Group(GroupName::from("billing")))
        );
        assert_eq!(code(s.check(t(WireTarget::Group(String::new())), T0)), ErrorCode::BadCommand);
        assert_eq!(code(s.check(t(WireTarget::Agent(String::new())), T0)), ErrorCode::BadCommand);
        assert_eq!(code(s.check(t(WireTarget::Group("g".repeat(65))), T0)), ErrorCode::TooLarge);
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
        let Ok(Checked::Route(RouteRequest::Open { visitor, group, vip_level })) =
            s.check(Command::Open { group: None, meta: widget }, T0)
        else {
            panic!("open refused");
        };
        assert_eq!(&*group, "vip-desk", "the token's group when open names none");
        assert_eq!(vip_level, 2, "the widget cannot raise its own priority");
        assert_eq!(visitor.meta["vip_level"], "2");
        assert_eq!(visitor.meta["plan"], "pro", "the token wins over the widget");
        assert_eq!(visitor.meta["page"], "/pricing");
        let Ok(Checked::Route(RouteRequest::Open { group, .. })) =
            s.check(Command::Open { group: Some("sales".into()), meta: Meta::new() }, T0)
        else {
            panic!("open refused");
        };
        assert_eq!(&*group, "sales");
        // No group anywhere: the default group.
        let mut s = session(Role::Visitor);
        let Ok(Checked::Route(RouteRequest::Open { group, vip_level, .. })) =
            s.check(Command::Open { group: None, meta: Meta::new() }, T0)
        else {
            panic!("open refused");
        };
        assert_eq!((&*group, vip_level), ("default", 0));
        let huge: Meta = [("k".to_string(), "v".repeat(5000))].into();
        assert_eq!(code(s.check(Command::Open { group: None, meta: huge }, T0)), ErrorCode::TooLarge);
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
            assert_eq!(s.check(Command::Ping, T0), Ok(Checked::Pong));
        }
        assert!(s.check(send("c2", Some("b"), None), T0 + 1000).is_ok(), "the same cid, after the back-off");
    }
}
