//! The business system's hooks, as the machines see them: a call goes out
//! as [`super::outbox::Output::Hook`] with a token, and its verdict comes
//! back to the machine that asked (on the same shard) with that token. The
//! gateway's bridge makes the gRPC call, bounds how many run at once and
//! how long each may take, and turns a timeout or an error into
//! [`Verdict::Failed`], which `hooks.failure` then decides.

use kefu_proto::ConvId;
use kefu_proto::client::Sender;

/// A call to a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookCall {
    /// A visitor's or agent's message, before it is stored.
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
}

/// What the business system answered (or that it did not).
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
