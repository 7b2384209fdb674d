//! The nouns every part of kefu shares: who someone is, which conversation,
//! what state it is in, and what went wrong.
//!
//! These are plain values with a fixed wire spelling (serde, lowercase), so
//! the client protocol, the chat core and the log agree on them by
//! construction rather than by translation tables.

use serde::{Deserialize, Serialize};

/// A conversation id as clients see it: `c` followed by a number, e.g.
/// `c42`. Ids are strings on the wire (JSON numbers above 2^53 lose
/// precision in JavaScript) and numbers inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConvId(pub u64);

impl ConvId {
    /// The shard that owns this conversation (its "home").
    pub fn home(self, shards: usize) -> usize {
        // Fibonacci hashing spreads sequential ids across shards evenly.
        (self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % shards.max(1)
    }
}

impl std::fmt::Display for ConvId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// A string that is not a conversation id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a conversation id: {0:?} (expected c<number>)")]
pub struct BadConvId(pub String);

impl std::str::FromStr for ConvId {
    type Err = BadConvId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix('c')
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .map(ConvId)
            .ok_or_else(|| BadConvId(s.to_string()))
    }
}

impl TryFrom<String> for ConvId {
    type Error = BadConvId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ConvId> for String {
    fn from(c: ConvId) -> String {
        c.to_string()
    }
}

/// Who a participant is. Visitors and agents come from JWTs or (visitors)
/// from the gateway; `bot` is a hook or the business system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A customer.
    Visitor,
    /// A support agent.
    Agent,
    /// A hook or the business system (`SendMessage`).
    Bot,
}

/// Where a conversation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvStatus {
    /// Waiting for an agent.
    Queued,
    /// An agent has it.
    Assigned,
    /// Over; a visitor opening again starts a new one.
    Closed,
}

/// An agent's availability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    /// Takes new conversations.
    Online,
    /// Keeps conversations, takes no new ones.
    Away,
    /// Not connected, or said so.
    Offline,
}

/// Wire spellings of the small enums above, shared by every encoding that
/// spells them as text (JSON, logs, config) so none keeps its own table.
macro_rules! wire_names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The wire spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }

            /// The value a wire spelling names, if any (exact, case-sensitive).
            pub fn parse(name: &str) -> Option<Self> {
                match name {
                    $($name => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_names!(Role { Visitor => "visitor", Agent => "agent", Bot => "bot" });
wire_names!(ConvStatus { Queued => "queued", Assigned => "assigned", Closed => "closed" });
wire_names!(PresenceStatus { Online => "online", Away => "away", Offline => "offline" });
wire_names!(ErrorCode {
    BadFrame => "bad_frame",
    BadCommand => "bad_command",
    Unauthorized => "unauthorized",
    Forbidden => "forbidden",
    NotFound => "not_found",
    TooLarge => "too_large",
    RateLimited => "rate_limited",
    Conflict => "conflict",
    Unavailable => "unavailable",
    Internal => "internal",
});

/// The `code` of an `error` frame (PROTOCOL.md, "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not a valid command encoding.
    BadFrame,
    /// The command is well-formed but not valid here (missing field, wrong state).
    BadCommand,
    /// Identity refused; fatal (close 4500).
    Unauthorized,
    /// The role may not do this.
    Forbidden,
    /// No such conversation, or not one of yours.
    NotFound,
    /// Over a size limit.
    TooLarge,
    /// Slow down and retry the same command.
    RateLimited,
    /// The state changed under you (already assigned, closed, …).
    Conflict,
    /// Temporarily unable (storage busy, shutting down); retry.
    Unavailable,
    /// A bug or an I/O failure on the server.
    Internal,
}

impl ErrorCode {
    /// Whether the same command may succeed if sent again later.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::RateLimited | ErrorCode::Unavailable)
    }

    /// Whether the connection is closed after this error.
    pub fn fatal(self) -> bool {
        matches!(self, ErrorCode::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_ids_round_trip_and_reject_junk() {
        assert_eq!("c42".parse::<ConvId>().unwrap(), ConvId(42));
        assert_eq!(ConvId(7).to_string(), "c7");
        for bad in ["", "c", "42", "c-1", "cx", "c1a", "C1", "c99999999999999999999999"] {
            assert!(bad.parse::<ConvId>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&ConvId(9)).unwrap();
        assert_eq!(json, "\"c9\"");
        assert_eq!(serde_json::from_str::<ConvId>(&json).unwrap(), ConvId(9));
    }

    #[test]
    fn homes_spread_over_shards() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[ConvId(i).home(4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(ConvId(5).home(1), 0);
    }

    #[test]
    fn error_codes_spell_as_the_protocol_says() {
        for code in [ErrorCode::BadFrame, ErrorCode::RateLimited, ErrorCode::NotFound] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
        assert!(ErrorCode::RateLimited.retryable() && !ErrorCode::Forbidden.retryable());
        assert!(ErrorCode::Unauthorized.fatal());
    }

    #[test]
    fn wire_names_agree_with_serde_and_parse_back() {
        fn check<T>(all: &[T], as_str: fn(T) -> &'static str, parse: fn(&str) -> Option<T>)
        where
            T: Copy + PartialEq + std::fmt::Debug + Serialize,
        {
            for &v in all {
                let name = as_str(v);
                assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{name}\""));
                assert_eq!(parse(name), Some(v));
                assert_eq!(parse(&name.to_uppercase()), None);
            }
            assert_eq!(parse(""), None);
        }
        check(Role::ALL, Role::as_str, Role::parse);
        check(ConvStatus::ALL, ConvStatus::as_str, ConvStatus::parse);
        check(PresenceStatus::ALL, PresenceStatus::as_str, PresenceStatus::parse);
        check(ErrorCode::ALL, ErrorCode::as_str, ErrorCode::parse);
        assert_eq!(ErrorCode::ALL.len(), 10);
        assert_eq!(ErrorCode::TooLarge.to_string(), "too_large");
    }
}
