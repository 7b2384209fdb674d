//! The Gateway calls, shared by gRPC and REST so both give the same
//! answer. Here, those the bridge answers itself from storage reads alone:
//! `GetHistory`, `GetConversation`, `ListConversations`, and `IssueToken`;
//! in `chat_calls.rs`, those the chat machines answer.
//!
//! Reads run on the bridge thread with redb read transactions (MVCC: they
//! never wait on the writer and see only whole commits). Each is bounded by
//! a page size from the config, so one call cannot hold the thread for
//! long.

use std::time::{SystemTime, UNIX_EPOCH};

use kefu_core::auth::{Claims, JwtKey};
use kefu_proto::ids::{ConvId, ConvStatus, Role};
use kefu_storage::{ConversationFilter, ConversationRecord, MessageRecord, Reader, StorageError};
use tracing::warn;

use super::pb;
use crate::chat::api::ChatApi;
use crate::config::AdminConfig;

/// Why a call failed, as both APIs spell it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The request is wrong; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Storage failed to read (logged with the details), or the chat
    /// service answered what it never should.
    #[error("{0}")]
    Internal(String),
    /// The caller may not do that to what it names.
    #[error("{0}")]
    PermissionDenied(String),
    /// Not in the state the call needs (a closed conversation, an agent
    /// not online): the message says which.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Busy or no answer in time: retry.
    #[error("{0}")]
    Unavailable(String),
}

impl CallError {
    /// The REST status and the `code` of the JSON error body.
    pub fn http(&self) -> (axum::http::StatusCode, &'static str) {
        use axum::http::StatusCode;
        match self {
            CallError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
            CallError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            CallError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            CallError::PermissionDenied(_) => (StatusCode::FORBIDDEN, "permission_denied"),
            CallError::FailedPrecondition(_) => (StatusCode::CONFLICT, "failed_precondition"),
            CallError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

impl From<CallError> for tonic::Status {
    fn from(e: CallError) -> tonic::Status {
        match e {
            CallError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            CallError::NotFound(m) => tonic::Status::not_found(m),
            CallError::Internal(m) => tonic::Status::internal(m),
            CallError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            CallError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            CallError::Unavailable(m) => tonic::Status::unavailable(m),
        }
    }
}

fn storage(e: StorageError) -> CallError {
    warn!(error = %e, "bridge: storage read failed");
    CallError::Internal(format!("storage read failed: {e}"))
}

/// The numbers the calls need, copied from the config once.
#[derive(Debug, Clone)]
pub struct CallLimits {
    /// `messages.history_limit_default`.
    pub history_limit_default: u32,
    /// `messages.history_limit_max`.
    pub history_limit_max: u32,
    /// `admin.list_page_size_default`.
    pub list_page_size_default: u32,
    /// `admin.list_page_size_max`.
    pub list_page_size_max: u32,
    /// `admin.list_scan_max`.
    pub list_scan_max: usize,
    /// `admin.token_ttl_s_default`.
    pub token_ttl_s_default: u64,
    /// `admin.token_ttl_s_max`.
    pub token_ttl_s_max: u64,
    /// `admin.chat_call_timeout_ms`.
    pub chat_call_timeout: std::time::Duration,
    /// `messages.max_meta_bytes`: the largest `SyncUser` meta.
    pub max_meta_bytes: usize,
}

impl CallLimits {
    /// The limits of `admin` and `messages`.
    pub fn new(admin: &AdminConfig, messages: &kefu_core::config::LimitsConfig) -> CallLimits {
        CallLimits {
            history_limit_default: messages.history_limit_default,
            history_limit_max: messages.history_limit_max,
            list_page_size_default: admin.list_page_size_default,
            list_page_size_max: admin.list_page_size_max,
            list_scan_max: admin.list_scan_max,
            token_ttl_s_default: admin.token_ttl_s_default,
            token_ttl_s_max: admin.token_ttl_s_max,
            chat_call_timeout: std::time::Duration::from_millis(admin.chat_call_timeout_ms),
            max_meta_bytes: messages.max_meta_bytes,
        }
    }
}

/// What the calls read, sign and send with.
pub struct Calls {
    reader: Reader,
    jwt: JwtKey,
    pub(super) limits: CallLimits,
    /// The chat service, for the calls its machines answer.
    pub(super) chat: ChatApi,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls").field("limits", &self.limits).finish_non_exhaustive()
    }
}

pub(super) fn conv_id(field: &str, text: &str) -> Result<ConvId, CallError> {
    text.parse().map_err(|e| CallError::InvalidArgument(format!("{field}: {e}")))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A stored message as the contract spells it (the client `msg`).
pub fn message(r: MessageRecord) -> pb::Message {
    pb::Message {
        conv: ConvId(r.conv).to_string(),
        seq: r.seq,
        cid: r.cid,
        from: Some(pb::User { role: r.from.role.as_str().into(), id: r.from.id, name: r.from.name }),
        text: r.text,
        attachment: r.attachment.map(|a| pb::Attachment { mime: a.mime, data: a.bytes }),
        ts: r.ts_ms,
    }
}

impl Calls {
    /// Calls reading through `reader`, signing with `jwt`, and calling
    /// into the chat service through `chat`.
    pub fn new(reader: Reader, jwt: JwtKey, limits: CallLimits, chat: ChatApi) -> Calls {
        Calls { reader, jwt, limits, chat }
    }

    /// A stored conversation with its visitor's stored profile.
    fn conversation(&self, c: ConversationRecord) -> Result<pb::Conversation, CallError> {
        let profile = self.reader.user(Role::Visitor, &c.visitor_id).map_err(storage)?;
        let (name, meta) = match profile {
            Some(u) => (u.name, u.meta.into_iter().collect()),
            None => (String::new(), Default::default()),
        };
        Ok(pb::Conversation {
            conv: ConvId(c.id).to_string(),
            status: c.status.as_str().into(),
            agent: c.agent.map(|a| pb::AgentRef { id: a.id, name: a.name }),
            group: c.group,
            visitor: Some(pb::Visitor { id: c.visitor_id, name, meta }),
            created_ms: c.created_ms,
            updated_ms: c.updated_ms,
            last_seq: c.last_seq,
        })
    }

    /// `GetHistory`.
    pub fn get_history(&self, req: pb::GetHistoryRequest) -> Result<pb::GetHistoryResponse, CallError> {
        let conv = conv_id("conv", &req.conv)?;
        if self.reader.conversation(conv.0).map_err(storage)?.is_none() {
            return Err(CallError::NotFound(format!("conversation {conv} does not exist")));
        }
        let limit = match req.limit {
            0 => self.limits.history_limit_default,
            n => n.min(self.limits.history_limit_max),
        };
        let before = (req.before > 0).then_some(req.before);
        let page = self.reader.history(conv.0, before, limit as usize).map_err(storage)?;
        Ok(pb::GetHistoryResponse { messages: page.into_iter().map(|m| message(m.record)).collect() })
    }

    /// `GetConversation`.
    pub fn get_conversation(&self, req: pb::GetConversationRequest) -> Result<pb::Conversation, CallError> {
        let conv = conv_id("conv", &req.conv)?;
        match self.reader.conversation(conv.0).map_err(storage)? {
            Some(c) => self.conversation(c),
            None => Err(CallError::NotFound(format!("conversation {conv} does not exist"))),
        }
    }

    /// `ListConversations`.
    pub fn list_conversations(
        &self,
        req: pb::ListConversationsRequest,
    ) -> Result<pb::ListConversationsResponse, CallError> {
        let status = match req.status.as_str() {
            "" => None,
            s => Some(ConvStatus::parse(s).ok_or_else(|| {
                CallError::InvalidArgument(format!(
                    "status: {s:?} is not one of \"queued\", \"assigned\", \"closed\""
                ))
            })?),
        };
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let filter =
            ConversationFilter { status, agent_id: non_empty(req.agent_id), group: non_empty(req.group) };
        let before = match req.page_token.as_str() {
            "" => None,
            token => Some(conv_id("page_token", token)?.0),
        };
        let page_size = match req.page_size {
            0 => self.limits.list_page_size_default,
            n => n.min(self.limits.list_page_size_max),
        };
        let page = self
            .reader
            .list_conversations(&filter, before, page_size as usize, self.limits.list_scan_max)
            .map_err(storage)?;
        Ok(pb::ListConversationsResponse {
            conversations: page
                .conversations
                .into_iter()
                .map(|c| self.conversation(c))
                .collect::<Result<_, _>>()?,
            next_page_token: page.next_before.map(|id| ConvId(id).to_string()).unwrap_or_default(),
        })
    }

    /// `IssueToken`. The token is verified with the same key and rules the
    /// WebSocket `connect` uses before it is handed out, so what is minted
    /// is what `connect` accepts, and a claim it would refuse is refused
    /// here, with the same reason.
    pub fn issue_token(&self, req: pb::IssueTokenRequest) -> Result<pb::IssueTokenResponse, CallError> {
        let role = match req.role.as_str() {
            "agent" => Role::Agent,
            "visitor" => Role::Visitor,
            other => {
                return Err(CallError::InvalidArgument(format!(
                    "role: {other:?} is not \"agent\" or \"visitor\""
                )));
            }
        };
        let ttl_s = match req.ttl_s {
            0 => self.limits.token_ttl_s_default,
            n if n > self.limits.token_ttl_s_max => {
                return Err(CallError::InvalidArgument(format!(
                    "ttl_s: {n} is more than admin.token_ttl_s_max ({})",
                    self.limits.token_ttl_s_max
                )));
            }
            n => n,
        };
        let now_ms = now_ms();
        let exp = now_ms / 1000 + ttl_s;
        let claims = Claims {
            sub: req.user_id,
            role,
            name: (!req.name.is_empty()).then_some(req.name),
            groups: req.groups,
            meta: req.meta.into_iter().collect(),
            exp,
            nbf: None,
        };
        let token = self.jwt.sign(&claims);
        self.jwt.verify(&token, now_ms).map_err(|e| CallError::InvalidArgument(e.to_string()))?;
        Ok(pb::IssueTokenResponse { token, expires_at_s: exp })
    }
}
