//! The business system's hooks, as the machines see them: a call goes out
//! as [`super::outbox::Output::Hook`] with a token, and its answer comes
//! back to the machine that asked (on the same shard) with that token: an
//! `OnMessage` [`Verdict`] to the home (`ChatMsg::Hooked`), an `OnConnect`
//! [`Admission`] to the edge (`ChatMsg::Admitted`). Two answer types, so a
//! machine can never be handed the other's answer. The gateway's bridge
//! makes the gRPC call, bounds how many run at once and how long each may
//! take, and turns a timeout or an error into `Failed`, which
//! `hooks.failure` then decides.

use kefu_proto::ConvId;
use kefu_proto::client::Sender;

use crate::identity::Meta;

/// A call to a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookCall {
    /// A visitor's or agent's message, before it is stored. Its answer is a
    /// [`Verdict`].
    OnMessage {
        /// Where.
        conv: ConvId,
        /// The sender's message id.
        cid: String,
        /// Its text, if any.
        text: Option<String>,
        /// Its attachment's MIME type, if it has one.
        attachment_mime: Option<String>,
        /// Who sent it.
        from: Sender,
    },
    /// A user whose credentials were accepted, before the session is let
    /// in. Its answer is an [`Admission`].
    OnConnect {
        /// Who it is (role, id, display name).
        user: Sender,
        /// The profile its credentials carry (a token's `meta`, or what is
        /// stored for a returning anonymous visitor).
        meta: Meta,
    },
}

/// Which hook a call is to (and so which machine waits for its answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `OnMessage`: the home waits for a [`Verdict`].
    OnMessage,
    /// `OnConnect`: the edge waits for an [`Admission`].
    OnConnect,
}

impl Hook {
    /// Both hooks.
    pub const ALL: [Hook; 2] = [Hook::OnMessage, Hook::OnConnect];

    /// Its name as metrics and logs show it.
    pub fn name(self) -> &'static str {
        match self {
            Hook::OnMessage => "on_message",
            Hook::OnConnect => "on_connect",
        }
    }
}

impl HookCall {
    /// Which hook this calls.
    pub fn hook(&self) -> Hook {
        match self {
            HookCall::OnMessage { .. } => Hook::OnMessage,
            HookCall::OnConnect { .. } => Hook::OnConnect,
        }
    }
}

/// What the business system answered to `OnMessage` (or that it did not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Store the message as sent; then post `replies` as bot messages.
    Allow {
        /// Bot messages to post after it.
        replies: Vec<String>,
    },
    /// Store the message with this text instead; then post `replies`.
    Rewrite {
        /// The text to store.
        text: String,
        /// Bot messages to post after it.
        replies: Vec<String>,
    },
    /// Do not store it: the sender gets `forbidden` with the reason.
    Reject {
        /// Why, for the sender.
        reason: String,
    },
    /// No answer (a timeout, an error, no endpoint): `hooks.failure` decides.
    Failed {
        /// What went wrong.
        why: String,
    },
}

/// What the business system answered to `OnConnect` (or that it did not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Let the user in, with its profile enriched: `name` (if given)
    /// replaces the display name, `meta` is laid over the credentials'
    /// profile key by key.
    Admit {
        /// The display name to use instead, if any.
        name: Option<String>,
        /// Profile keys to add or replace.
        meta: Meta,
    },
    /// Refused: the client gets `unauthorized` with the reason, then close
    /// 4500 (do not reconnect).
    Refuse {
        /// Why, for the client.
        reason: String,
    },
    /// No answer (a timeout, an error, no endpoint): `hooks.failure` decides.
    Failed {
        /// What went wrong.
        why: String,
    },
}
