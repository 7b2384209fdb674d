//! Canned replies and keyword auto-replies, from `[rules]`.
//!
//! **Canned replies** are named texts an agent inserts from the console
//! ("greeting", "closing"); the core only keeps and lists them.
//!
//! **Auto-replies** answer a visitor's message on the bot's behalf when it
//! contains a keyword, matched case-insensitively anywhere in the text
//! (so "Found a BUG" and "debugging" both contain "bug"). Rules are tried
//! in config order and the first match answers; one message gets at most
//! one auto-reply. Only visitors' messages are looked at: an agent writing
//! "bug" or a bot's own reply never triggers one, so the bot cannot talk to
//! itself. The reply is a message like any other, posted with `from.role =
//! "bot"` after the visitor's message is durable (the gateway does that,
//! through [`crate::conversation::Conversation::send`] with
//! [`Rules::bot`] as the actor); hooks are not called for it.
//!
//! The default config carries the seed's example: a message containing
//! "bug" gets an automatic reply.

use kefu_proto::ids::Role;

use crate::config::{CannedReply, RulesConfig};
use crate::identity::Actor;

#[derive(Debug, Clone)]
struct Keyword {
    /// Lowercased once at start.
    lower: String,
    reply: String,
}

impl Keyword {
    fn matches(&self, text: &str) -> bool {
        if self.lower.is_ascii() {
            // ASCII bytes never occur inside a multi-byte UTF-8 sequence, so a
            // byte-wise, ASCII-case-insensitive search is exact and allocates
            // nothing, whatever the text's script.
            let k = self.lower.as_bytes();
            text.as_bytes().windows(k.len()).any(|w| w.eq_ignore_ascii_case(k))
        } else {
            text.to_lowercase().contains(&self.lower)
        }
    }
}

/// The rules, ready to match.
#[derive(Debug, Clone)]
pub struct Rules {
    bot: Actor,
    canned: Vec<CannedReply>,
    keywords: Vec<Keyword>,
}

impl Rules {
    /// Rules from `[rules]` (validated by [`crate::config::CoreConfig::validate`]).
    pub fn new(config: &RulesConfig) -> Rules {
        let keywords = config
            .auto_replies
            .iter()
            .filter(|r| !r.keyword.trim().is_empty())
            .map(|r| Keyword { lower: r.keyword.trim().to_lowercase(), reply: r.reply.clone() })
            .collect();
        Rules {
            bot: Actor::bot(config.bot_id.as_str(), config.bot_name.as_str()),
            canned: config.canned.clone(),
            keywords,
        }
    }

    /// Who auto-replies are from (`from.role = "bot"`).
    pub fn bot(&self) -> &Actor {
        &self.bot
    }

    /// Every canned reply, in config order (for the console).
    pub fn canned(&self) -> &[CannedReply] {
        &self.canned
    }

    /// The text of the canned reply `name`.
    pub fn canned_text(&self, name: &str) -> Option<&str> {
        self.canned.iter().find(|c| c.name == name).map(|c| c.text.as_str())
    }

    /// The automatic reply to a message with `text` from a `from`, if any.
    pub fn auto_reply(&self, from: Role, text: &str) -> Option<&str> {
        if from != Role::Visitor {
            return None;
        }
        self.keywords.iter().find(|k| k.matches(text)).map(|k| k.reply.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AutoReply;

    #[test]
    fn the_default_rules_answer_a_bug_report() {
        let rules = Rules::new(&RulesConfig::default());
        let reply = rules.auto_reply(Role::Visitor, "I think I found a bug in checkout").unwrap();
        assert!(reply.contains("bug"), "{reply}");
        assert!(rules.auto_reply(Role::Visitor, "There's a BUG!").is_some(), "case-insensitive");
        assert!(rules.auto_reply(Role::Visitor, "结账页面有个Bug").is_some(), "inside non-ASCII text");
        assert!(rules.auto_reply(Role::Visitor, "hello there").is_none());
        assert!(rules.auto_reply(Role::Agent, "is it a bug?").is_none(), "only visitors trigger replies");
        assert!(rules.auto_reply(Role::Bot, "bug").is_none(), "the bot never answers itself");
        assert_eq!(rules.bot().role, Role::Bot);
        assert_eq!(&*rules.bot().id, "kefu-bot");
    }

    #[test]
    fn first_matching_rule_wins_and_non_ascii_keywords_fold_case() {
        let config = RulesConfig {
            auto_replies: vec![
                AutoReply { keyword: "Refund".into(), reply: "refunds".into() },
                AutoReply { keyword: "ПОМОЩЬ".into(), reply: "help".into() },
                AutoReply { keyword: "退款".into(), reply: "退款政策".into() },
                AutoReply { keyword: "refund policy".into(), reply: "never reached".into() },
            ],
            ..RulesConfig::default()
        };
        let rules = Rules::new(&config);
        assert_eq!(rules.auto_reply(Role::Visitor, "what is your REFUND policy"), Some("refunds"));
        assert_eq!(rules.auto_reply(Role::Visitor, "нужна помощь"), Some("help"));
        assert_eq!(rules.auto_reply(Role::Visitor, "我要退款"), Some("退款政策"));
        assert_eq!(rules.auto_reply(Role::Visitor, "a bug"), None, "these rules replace the defaults");
    }

    #[test]
    fn canned_replies_are_listed_and_found_by_name() {
        let rules = Rules::new(&RulesConfig::default());
        let names: Vec<&str> = rules.canned().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["greeting", "closing"]);
        assert!(rules.canned_text("greeting").unwrap().starts_with("Hello"));
        assert_eq!(rules.canned_text("nope"), None);
    }
}
