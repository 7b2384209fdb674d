//! The knobs of the chat core, as the gateway's TOML config embeds them.
//!
//! Every limit the core enforces is named here, has a default, and says
//! what it protects. The gateway owns the file layout (`[auth]`, `[limits]`,
//! `[routing]`, `[rules]`); it may embed these structs as sections or copy
//! its own fields into them, so each struct is a plain value with
//! `deny_unknown_fields` (a typo in the file is an error, never a silently
//! kept default) and a `Default` that is the documented default.
//!
//! [`CoreConfig::validate`] checks what serde cannot: bounds between
//! fields, and the hard ceilings the core's data structures are sized for
//! (such as [`CID_BYTES_MAX`]). The gateway calls it once at start.

use serde::{Deserialize, Serialize};

/// The hard ceiling of `limits.max_cid_bytes`: a client message id is kept
/// inline (no heap) in each conversation's recent-cid window, so its size
/// is fixed at compile time.
pub const CID_BYTES_MAX: usize = 64;

/// The ceiling of `auth.exp_leeway_s`: PROTOCOL.md promises that `exp` is
/// checked with at most 60 s of leeway.
pub const EXP_LEEWAY_S_MAX: u64 = 60;

/// Everything the core needs, in one value the gateway builds at start and
/// shares (read-only) with every shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoreConfig {
    /// Token checks.
    pub auth: AuthPolicy,
    /// Sizes and counts a client may not exceed.
    pub limits: LimitsConfig,
    /// The per-connection token bucket.
    pub rate: RateLimitConfig,
    /// Who gets which conversation.
    pub routing: RoutingConfig,
    /// Canned replies and keyword auto-replies.
    pub rules: RulesConfig,
    /// Which business-system hooks the chat core waits for.
    pub hooks: HookPolicy,
}

/// Which hooks run, and what a failed one means. (Where they are called,
/// and how long a call may take, is the gateway's `[hooks]`.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HookPolicy {
    /// Call `OnMessage` before a visitor's or agent's message is stored.
    pub on_message: bool,
    /// Call `OnConnect` before a session is let in.
    pub on_connect: bool,
    /// What a hook that failed or timed out means.
    pub failure: HookFailure,
}

/// What a hook that failed or timed out means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookFailure {
    /// As if it allowed (the business system is down; chat goes on).
    #[default]
    Open,
    /// Refused: the sender gets `unavailable`.
    Closed,
}

/// Why a configuration was refused by [`CoreConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config `{key}`: {reason}")]
pub struct ConfigError {
    /// The dotted key, e.g. `limits.max_cid_bytes`.
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn refuse(key: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError { key, reason: reason.into() })
}

impl CoreConfig {
    /// Checks bounds serde cannot express. Call once at start; the core
    /// asserts nothing about values this accepts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.auth.exp_leeway_s > EXP_LEEWAY_S_MAX {
            return refuse("auth.exp_leeway_s", format!("at most {EXP_LEEWAY_S_MAX} (PROTOCOL.md)"));
        }
        if self.auth.max_token_bytes < 64 {
            return refuse("auth.max_token_bytes", "at least 64");
        }
        let l = &self.limits;
        if l.max_cid_bytes == 0 || l.max_cid_bytes > CID_BYTES_MAX {
            return refuse("messages.max_cid_bytes", format!("between 1 and {CID_BYTES_MAX}"));
        }
        if l.max_text_bytes == 0 {
            return refuse("messages.max_text_bytes", "at least 1");
        }
        if l.max_resume_messages == 0 {
            return refuse("messages.max_resume_messages", "at least 1");
        }
        if l.history_limit_default == 0 || l.history_limit_default > l.history_limit_max {
            return refuse("messages.history_limit_default", "between 1 and messages.history_limit_max");
        }
        if l.recent_cids == 0 || l.recent_cids > 65_536 {
            return refuse("messages.recent_cids", "between 1 and 65536");
        }
        if l.max_group_bytes == 0 || l.max_mime_bytes == 0 || l.max_meta_bytes == 0 {
            return refuse(
                "messages",
                "max_group_bytes, max_mime_bytes and max_meta_bytes must be at least 1",
            );
        }
        if self.rate.messages_per_s == 0 {
            return refuse("limits.messages_per_s", "at least 1");
        }
        if self.rate.burst == 0 {
            return refuse("limits.burst", "at least 1");
        }
        let attachment_budget = self.rate.attachment_bytes_per_min;
        if attachment_budget < l.max_attachment_bytes as u64
            || attachment_budget > ATTACHMENT_BYTES_PER_MIN_MAX
        {
            return refuse(
                "limits.attachment_bytes_per_min",
                format!(
                    "between messages.max_attachment_bytes ({}) and {ATTACHMENT_BYTES_PER_MIN_MAX}: a smaller \
                     budget never lets the largest attachment through",
                    l.max_attachment_bytes
                ),
            );
        }
        let r = &self.routing;
        if r.default_capacity > r.max_capacity {
            return refuse("routing.default_capacity", "at most routing.max_capacity");
        }
        if r.max_devices_per_agent == 0 {
            return refuse("routing.max_devices_per_agent", "at least 1");
        }
        if r.max_queued == 0 {
            return refuse("routing.max_queued", "at least 1");
        }
        if r.default_group.is_empty() || r.default_group.len() > l.max_group_bytes {
            return refuse("routing.default_group", "non-empty and at most messages.max_group_bytes");
        }
        if r.offline_grace_s > 7 * 24 * 3600 {
            return refuse("routing.offline_grace_s", "at most a week");
        }
        if r.abandon_after_s > 7 * 24 * 3600 {
            return refuse("routing.abandon_after_s", "at most a week (0: never)");
        }
        if r.position_update_ms > 60_000 {
            return refuse("routing.position_update_ms", "at most 60000");
        }
        for (i, c) in self.rules.canned.iter().enumerate() {
            if c.name.is_empty() || c.text.is_empty() {
                return refuse("rules.canned", format!("entry {i} needs a name and a text"));
            }
            if self.rules.canned[..i].iter().any(|o| o.name == c.name) {
                return refuse("rules.canned", format!("name {:?} is used twice", c.name));
            }
        }
        for (i, a) in self.rules.auto_replies.iter().enumerate() {
            if a.keyword.trim().is_empty() || a.reply.is_empty() {
                return refuse("rules.auto_replies", format!("entry {i} needs a keyword and a reply"));
            }
        }
        if self.rules.bot_id.is_empty() {
            return refuse("rules.bot_id", "non-empty");
        }
        Ok(())
    }
}

/// `[auth]` knobs the core uses (the secret itself and `allow_anonymous`
/// live in the gateway's `[auth]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthPolicy {
    /// Seconds a token is still accepted after its `exp` (and before its
    /// `nbf`), for clocks that disagree a little. Default 60, at most 60.
    pub exp_leeway_s: u64,
    /// Longest token accepted, in bytes; longer is refused before any
    /// decoding. Default 8192.
    pub max_token_bytes: usize,
}

impl Default for AuthPolicy {
    fn default() -> Self {
        Self { exp_leeway_s: 60, max_token_bytes: 8 * 1024 }
    }
}

/// Sizes and counts of what a client sends (`[limits]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest `send.text`, in UTF-8 bytes; larger is `too_large`.
    /// Default 16384.
    pub max_text_bytes: usize,
    /// Largest attachment, in decoded bytes; larger is `too_large`.
    /// Default 1048576 (1 MiB).
    pub max_attachment_bytes: usize,
    /// Longest attachment `mime`, in bytes; longer is `bad_command`.
    /// Default 127 (RFC 6838's limit).
    pub max_mime_bytes: usize,
    /// Longest `cid`, in bytes; longer is `too_large`. Default 64, at most
    /// [`CID_BYTES_MAX`].
    pub max_cid_bytes: usize,
    /// Longest group name (`open.group`, `transfer` to `group:NAME`), in
    /// bytes; longer is `too_large`. Default 64.
    pub max_group_bytes: usize,
    /// Largest `open.meta`, keys plus values, in bytes; larger is
    /// `too_large`. Default 4096.
    pub max_meta_bytes: usize,
    /// `history.limit` when the client gives none. Default 50.
    pub history_limit_default: u32,
    /// Largest `history.limit`; a larger one is served as this. Default 200.
    pub history_limit_max: u32,
    /// Conversations one `connect.resume` may name; more is `too_large`.
    /// Default 256.
    pub max_resume_conversations: usize,
    /// Messages a resume replays per conversation at most: a client that
    /// missed more gets the newest this many, and `resumed.from` tells
    /// where they start (it pages the rest with `history`). Default 10000.
    pub max_resume_messages: u64,
    /// How many recent `(sender, cid)` pairs each conversation remembers to
    /// answer a resent `send` with its first `ack`. Older ones must be
    /// found in storage's dedupe index. Default 128.
    pub recent_cids: usize,
    /// A participant's `typing` is passed on at most once per this many
    /// milliseconds per conversation; more often is dropped silently.
    /// Default 1000.
    pub typing_interval_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_text_bytes: 16 * 1024,
            max_attachment_bytes: 1024 * 1024,
            max_mime_bytes: 127,
            max_cid_bytes: 64,
            max_group_bytes: 64,
            max_meta_bytes: 4096,
            history_limit_default: 50,
            history_limit_max: 200,
            max_resume_conversations: 256,
            max_resume_messages: 10_000,
            recent_cids: 128,
            typing_interval_ms: 1000,
        }
    }
}

/// The per-connection token buckets (`[limits] messages_per_s`, `burst`,
/// `attachment_bytes_per_min`).
///
/// Every command after `connect` except `ping` takes one token; a `send`'s
/// attachment also takes its decoded bytes from the attachment budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained commands per second. Default 20: a fast typist sends a
    /// message or two a second, plus typing and read marks.
    pub messages_per_s: u32,
    /// Commands that may arrive at once after a quiet spell. Default 40.
    pub burst: u32,
    /// Attachment bytes (decoded) one sender (over all their connections)
    /// may send per minute, sustained, and at once after a quiet minute; a
    /// `send` over it is
    /// `rate_limited` with the wait until its attachment fits. Default
    /// 16 MiB: sixteen full-size (1 MiB) images a minute, more than a
    /// person picks and sends, while a script is held to about 280 KB/s
    /// of stored blobs per identity. At least
    /// `messages.max_attachment_bytes`, or the largest attachment would
    /// never fit; at most [`ATTACHMENT_BYTES_PER_MIN_MAX`].
    pub attachment_bytes_per_min: u64,
}

/// The ceiling of `limits.attachment_bytes_per_min` (1 TiB): far above
/// any use, and low enough that the budget in bucket units (bytes × 60,000)
/// stays inside `u64`.
pub const ATTACHMENT_BYTES_PER_MIN_MAX: u64 = 1 << 40;

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { messages_per_s: 20, burst: 40, attachment_bytes_per_min: 16 * 1024 * 1024 }
    }
}

/// What happens to an agent's conversations when the agent goes offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OfflinePolicy {
    /// The agent keeps them; visitors wait for the agent to return.
    Keep,
    /// After `offline_grace_s` still offline, they go back to the queue of
    /// their group.
    Requeue,
}

/// `[routing]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Hand queued conversations to the least-loaded online agent with free
    /// capacity as soon as there is one. `false`: they wait for `accept`.
    /// Default true.
    pub auto_assign: bool,
    /// `keep` (default) or `requeue`.
    pub offline_policy: OfflinePolicy,
    /// Seconds an agent may be offline before `requeue` applies; an agent
    /// whose last device reconnects within it also gets back the status it
    /// had. Default 60.
    pub offline_grace_s: u64,
    /// Conversations an agent holds at once unless its `presence.capacity`
    /// says otherwise. Default 5.
    pub default_capacity: u32,
    /// Largest `presence.capacity`; more is `bad_command`. Default 100.
    pub max_capacity: u32,
    /// The group of a conversation whose visitor asks for none. Default
    /// `"default"`.
    pub default_group: String,
    /// Connections one agent may hold at once; one more replaces (closes
    /// with 4002) the oldest. Default 8.
    pub max_devices_per_agent: usize,
    /// Conversations waiting in all queues together; an `open` beyond it is
    /// `unavailable`. Default 100000.
    pub max_queued: usize,
    /// Queued conversations an agent's `connected` lists (besides its own),
    /// first in line first, over the groups it serves. Default 100.
    pub connected_queued_max: usize,
    /// Closed conversations a visitor's `connected` lists after its open
    /// one, newest first, so a returning visitor can page their history.
    /// Default 10.
    pub connected_closed_max: usize,
    /// Other agents' `presence` sent after an agent's `connected` (online
    /// ones first), so a console can offer whom to transfer to; bounded so
    /// that a large team does not fill a new connection's outbound queue.
    /// Default 200.
    pub connected_presence_max: usize,
    /// Seconds a queued conversation may wait with no session of its
    /// visitor connected before it is closed as abandoned, so that visitors
    /// who left (or scripts that open and go) do not fill
    /// `max_queued`. 0: never. At most a week. Default 300.
    pub abandon_after_s: u64,
    /// Milliseconds between announcements of queue positions that moved:
    /// a burst of dequeues tells each visitor behind them once, not once
    /// per dequeue. A conversation entering a queue is told its position
    /// at once. At most 60000. Default 1000.
    pub position_update_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            auto_assign: true,
            offline_policy: OfflinePolicy::Keep,
            offline_grace_s: 60,
            default_capacity: 5,
            max_capacity: 100,
            default_group: "default".into(),
            max_devices_per_agent: 8,
            max_queued: 100_000,
            connected_queued_max: 100,
            connected_closed_max: 10,
            connected_presence_max: 200,
            abandon_after_s: 300,
            position_update_ms: 1000,
        }
    }
}

/// A named text an agent can insert from the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CannedReply {
    /// Short handle shown in the console, unique.
    pub name: String,
    /// The text inserted.
    pub text: String,
}

/// A keyword that makes the bot answer a visitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoReply {
    /// Matched case-insensitively anywhere in a visitor's text.
    pub keyword: String,
    /// What the bot says.
    pub reply: String,
}

/// `[rules]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// The `from.id` of automatic replies (`from.role` is `bot`). Default
    /// `"kefu-bot"`.
    pub bot_id: String,
    /// The `from.name` of automatic replies. Default `"Assistant"`.
    pub bot_name: String,
    /// Canned replies listed in the console. Default: a greeting and a
    /// closing.
    pub canned: Vec<CannedReply>,
    /// Keyword auto-replies, first match wins. Default: one rule, a
    /// message containing "bug" gets a reply.
    pub auto_replies: Vec<AutoReply>,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            bot_id: "kefu-bot".into(),
            bot_name: "Assistant".into(),
            canned: vec![
                CannedReply { name: "greeting".into(), text: "Hello! How can I help you today?".into() },
                CannedReply {
                    name: "closing".into(),
                    text: "Thank you for contacting us. Have a great day!".into(),
                },
            ],
            auto_replies: vec![AutoReply {
                keyword: "bug".into(),
                reply: "Sorry you ran into a bug! An agent will look into it shortly; \
                        steps to reproduce and a screenshot help a lot."
                    .into(),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = CoreConfig::default();
        c.validate().unwrap();
        assert!(c.routing.auto_assign);
        assert_eq!(c.routing.offline_policy, OfflinePolicy::Keep);
        assert_eq!((c.rate.messages_per_s, c.rate.burst), (20, 40));
        assert_eq!((c.limits.history_limit_default, c.limits.history_limit_max), (50, 200));
        assert_eq!(c.auth.exp_leeway_s, 60);
        assert_eq!(c.rules.auto_replies[0].keyword, "bug");
        assert_eq!((c.routing.abandon_after_s, c.routing.position_update_ms), (300, 1000));
    }

    #[test]
    fn toml_sections_parse_with_defaults_and_reject_typos() {
        let c: CoreConfig = toml::from_str(
            "[routing]\nauto_assign = false\noffline_policy = \"requeue\"\noffline_grace_s = 5\n\
             [rules]\nauto_replies = [{ keyword = \"refund\", reply = \"See our refund policy.\" }]\n",
        )
        .unwrap();
        assert!(!c.routing.auto_assign);
        assert_eq!(c.routing.offline_policy, OfflinePolicy::Requeue);
        assert_eq!(c.routing.default_capacity, 5);
        assert_eq!(c.rules.auto_replies.len(), 1);
        assert_eq!(c.rules.canned.len(), 2, "unset fields keep their defaults");
        assert!(toml::from_str::<CoreConfig>("[routing]\nauto_asign = true\n").is_err());
        assert!(toml::from_str::<CoreConfig>("[routing]\noffline_policy = \"drop\"\n").is_err());
    }

    #[test]
    fn validate_refuses_out_of_bounds() {
        let mut c = CoreConfig::default();
        c.auth.exp_leeway_s = 61;
        assert_eq!(c.validate().unwrap_err().key, "auth.exp_leeway_s");
        let mut c = CoreConfig::default();
        c.limits.max_cid_bytes = CID_BYTES_MAX + 1;
        assert_eq!(c.validate().unwrap_err().key, "messages.max_cid_bytes");
        let mut c = CoreConfig::default();
        c.rate.messages_per_s = 0;
        assert!(c.validate().is_err());
        let mut c = CoreConfig::default();
        c.rate.attachment_bytes_per_min = 0;
        assert_eq!(c.validate().unwrap_err().key, "limits.attachment_bytes_per_min");
        c.rate.attachment_bytes_per_min = c.limits.max_attachment_bytes as u64 - 1;
        assert_eq!(c.validate().unwrap_err().key, "limits.attachment_bytes_per_min");
        c.rate.attachment_bytes_per_min = ATTACHMENT_BYTES_PER_MIN_MAX + 1;
        assert_eq!(c.validate().unwrap_err().key, "limits.attachment_bytes_per_min");
        let mut c = CoreConfig::default();
        c.routing.default_capacity = 101;
        assert!(c.validate().is_err());
        let mut c = CoreConfig::default();
        c.rules.canned.push(c.rules.canned[0].clone());
        assert_eq!(c.validate().unwrap_err().key, "rules.canned");
        let mut c = CoreConfig::default();
        c.rules.auto_replies[0].keyword = "  ".into();
        assert!(c.validate().is_err());
        let mut c = CoreConfig::default();
        c.routing.abandon_after_s = 7 * 24 * 3600 + 1;
        assert_eq!(c.validate().unwrap_err().key, "routing.abandon_after_s");
        c.routing.abandon_after_s = 0;
        assert_eq!(c.validate(), Ok(()), "0: never abandon");
        c.routing.position_update_ms = 60_001;
        assert_eq!(c.validate().unwrap_err().key, "routing.position_update_ms");
    }
}
