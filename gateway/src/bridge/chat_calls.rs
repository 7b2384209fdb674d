//! The Gateway calls the chat service answers: `SendMessage`,
//! `AssignConversation`, `TransferConversation` and `CloseConversation`
//! (commands to its machines), `GetPresence` and `DisconnectUser`
//! (questions its loops answer).
//! Each is a command from the business system's bot ([`crate::chat::api`]),
//! checked like a client's and served by the very code that serves the
//! client's `send`, `transfer` and `close`, so it is answered only once
//! what it did is durable: a message with its `ack`, a change with the
//! conversation as stored.

use kefu_proto::client::{self, Command, Event, ServerFrame, TransferTarget};
use kefu_proto::ids::{ErrorCode, Role};
use tokio::sync::oneshot;
use tracing::info;

use super::calls::{CallError, Calls, conv_id};
use super::pb;
use crate::chat::api::{Answer, CallId};
use kefu_core::chat::stored::Block;
use kefu_core::identity::UserKey;

impl Calls {
    /// Runs `command` in the chat service as the bot `name` and waits for
    /// its answer, at most `admin.chat_call_timeout_ms`.
    async fn chat(&self, name: &str, command: Command) -> Result<Event, CallError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = self
            .chat
            .call(name, command, move |answer| {
                let _ = tx.send(answer);
            })
            .map_err(|refused| from_code(refused.code, refused.message))?;
        match self.wait(id, rx).await? {
            Answer::Frame(ServerFrame { body: Event::Error { code, message }, .. }) => {
                Err(from_code(code, message))
            }
            Answer::Frame(frame) => Ok(frame.body),
            other => Err(CallError::Internal(format!("a command answered with {other:?}"))),
        }
    }

    /// The answer to call `id`, at most `admin.chat_call_timeout_ms` away.
    async fn wait(&self, id: CallId, rx: oneshot::Receiver<Answer>) -> Result<Answer, CallError> {
        match tokio::time::timeout(self.limits.chat_call_timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(CallError::Internal("the chat service dropped the call".into())),
            Err(_) => {
                self.chat.forget(id);
                Err(CallError::Unavailable(
                    "no answer within admin.chat_call_timeout_ms; what it did is unknown: retry (a message with the same cid is not stored twice)"
                        .into(),
                ))
            }
        }
    }

    /// `GetPresence`: the agents as the router sees them now.
    pub async fn get_presence(
        &self,
        req: pb::GetPresenceRequest,
    ) -> Result<pb::GetPresenceResponse, CallError> {
        let (tx, rx) = oneshot::channel();
        let id = self
            .chat
            .presence(req.agent_ids, move |answer| {
                let _ = tx.send(answer);
            })
            .map_err(|refused| from_code(refused.code, refused.message))?;
        match self.wait(id, rx).await? {
            Answer::Presence(agents) => Ok(pb::GetPresenceResponse {
                agents: agents
                    .into_iter()
                    .map(|a| pb::AgentPresence {
                        agent_id: a.id.to_string(),
                        status: a.status.as_str().into(),
                        conversations: a.load,
                        capacity: a.capacity,
                    })
                    .collect(),
            }),
            other => Err(CallError::Internal(format!("presence answered with {other:?}"))),
        }
    }

    /// `SyncUser`: the profile agents see, stored (name if given, meta key
    /// by key, `avatar` as the meta key `avatar`), then shown live in the
    /// visitor's open conversations.
    pub async fn sync_user(&self, req: pb::SyncUserRequest) -> Result<pb::SyncUserResponse, CallError> {
        let role = user_role(&req.role)?;
        if req.user_id.is_empty() {
            return Err(CallError::InvalidArgument("user_id: empty".into()));
        }
        let mut meta: kefu_core::identity::Meta = req.meta.into_iter().collect();
        if !req.avatar.is_empty() {
            meta.insert("avatar".into(), req.avatar);
        }
        let size: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > self.limits.max_meta_bytes {
            return Err(CallError::InvalidArgument(format!(
                "meta: {size} bytes, more than messages.max_meta_bytes ({})",
                self.limits.max_meta_bytes
            )));
        }
        let user = UserKey { role, id: req.user_id.as_str().into() };
        let name = (!req.name.is_empty()).then_some(req.name);
        let (tx, rx) = oneshot::channel();
        let id = self
            .chat
            .sync_user(user, name, meta, move |answer| {
                let _ = tx.send(answer);
            })
            .map_err(|refused| from_code(refused.code, refused.message))?;
        match self.wait(id, rx).await? {
            Answer::Done => Ok(pb::SyncUserResponse {}),
            Answer::Failed { code, message } => Err(from_code(code, message)),
            other => Err(CallError::Internal(format!("SyncUser answered with {other:?}"))),
        }
    }

    /// `BlockVisitor`: durable, then the visitor's sessions are closed with
    /// 4501 and its `connect`s refused (`forbidden`, the reason) until the
    /// block runs out (`duration_s`, 0: until `UnblockVisitor`).
    pub async fn block_visitor(
        &self,
        req: pb::BlockVisitorRequest,
    ) -> Result<pb::BlockVisitorResponse, CallError> {
        if req.visitor_id.is_empty() {
            return Err(CallError::InvalidArgument("visitor_id: empty".into()));
        }
        if req.reason.len() > self.limits.max_meta_bytes {
            return Err(CallError::InvalidArgument(format!(
                "reason: {} bytes, more than messages.max_meta_bytes ({})",
                req.reason.len(),
                self.limits.max_meta_bytes
            )));
        }
        let now = crate::chat::service::now_ms();
        let until_ms = match req.duration_s {
            0 => 0,
            s => now.saturating_add(s.saturating_mul(1000)),
        };
        info!(visitor = %req.visitor_id, reason = %req.reason, until_ms, "visitor blocked by the business system");
        let block = Block { until_ms, reason: req.reason, at_ms: now };
        match self.block(&req.visitor_id, Some(block)).await? {
            Answer::Disconnected(sessions) => Ok(pb::BlockVisitorResponse { sessions }),
            Answer::Failed { code, message } => Err(from_code(code, message)),
            other => Err(CallError::Internal(format!("BlockVisitor answered with {other:?}"))),
        }
    }

    /// `UnblockVisitor`: the visitor may connect again (durable once answered).
    pub async fn unblock_visitor(
        &self,
        req: pb::UnblockVisitorRequest,
    ) -> Result<pb::UnblockVisitorResponse, CallError> {
        if req.visitor_id.is_empty() {
            return Err(CallError::InvalidArgument("visitor_id: empty".into()));
        }
        match self.block(&req.visitor_id, None).await? {
            Answer::Done => Ok(pb::UnblockVisitorResponse {}),
            Answer::Failed { code, message } => Err(from_code(code, message)),
            other => Err(CallError::Internal(format!("UnblockVisitor answered with {other:?}"))),
        }
    }

    async fn block(&self, visitor: &str, block: Option<Block>) -> Result<Answer, CallError> {
        let (tx, rx) = oneshot::channel();
        let id = self
            .chat
            .block(visitor, block, move |answer| {
                let _ = tx.send(answer);
            })
            .map_err(|refused| from_code(refused.code, refused.message))?;
        self.wait(id, rx).await
    }

    /// `DisconnectUser`: every session of the user is closed (4000), wherever
    /// it is connected.
    pub async fn disconnect_user(
        &self,
        req: pb::DisconnectUserRequest,
    ) -> Result<pb::DisconnectUserResponse, CallError> {
        let role = user_role(&req.role)?;
        if req.user_id.is_empty() {
            return Err(CallError::InvalidArgument("user_id: empty".into()));
        }
        if !req.reason.is_empty() {
            info!(user = %req.user_id, role = %req.role, reason = %req.reason, "disconnected by the business system");
        }
        let (tx, rx) = oneshot::channel();
        let id = self
            .chat
            .disconnect(role, &req.user_id, move |answer| {
                let _ = tx.send(answer);
            })
            .map_err(|refused| from_code(refused.code, refused.message))?;
        match self.wait(id, rx).await? {
            Answer::Disconnected(sessions) => Ok(pb::DisconnectUserResponse { sessions }),
            other => Err(CallError::Internal(format!("disconnect answered with {other:?}"))),
        }
    }

    /// `SendMessage`: durable before it is answered, idempotent by
    /// (conversation, cid), delivered as `from.role = "bot"`.
    pub async fn send_message(
        &self,
        req: pb::SendMessageRequest,
    ) -> Result<pb::SendMessageResponse, CallError> {
        let conv = conv_id("conv", &req.conv)?;
        let attachment = req.attachment.map(|a| client::Attachment { mime: a.mime, data: a.data });
        let command = Command::Send { conv, cid: req.cid, text: req.text, attachment };
        match self.chat(&req.sender_name, command).await? {
            Event::Ack { seq, ts, duplicate, .. } => Ok(pb::SendMessageResponse { seq, ts, duplicate }),
            other => Err(unexpected(&other)),
        }
    }

    /// `AssignConversation`: to an online agent with room, from the queue
    /// or from another agent.
    pub async fn assign_conversation(
        &self,
        req: pb::AssignConversationRequest,
    ) -> Result<pb::Conversation, CallError> {
        if req.agent_id.is_empty() {
            return Err(CallError::InvalidArgument("agent_id: empty".into()));
        }
        self.change(&req.conv, |conv| Command::Transfer { conv, to: TransferTarget::Agent(req.agent_id) })
            .await
    }

    /// `TransferConversation`: to an agent, or (no agent) to a group's queue.
    pub async fn transfer_conversation(
        &self,
        req: pb::TransferConversationRequest,
    ) -> Result<pb::Conversation, CallError> {
        let to = match (req.agent_id.is_empty(), req.group.is_empty()) {
            (false, true) => TransferTarget::Agent(req.agent_id),
            (true, false) => TransferTarget::Group(req.group),
            _ => return Err(CallError::InvalidArgument("give exactly one of agent_id and group".into())),
        };
        self.change(&req.conv, |conv| Command::Transfer { conv, to }).await
    }

    /// `CloseConversation`. The reason is logged; the client protocol's
    /// `conversation` event has no field for it.
    pub async fn close_conversation(
        &self,
        req: pb::CloseConversationRequest,
    ) -> Result<pb::Conversation, CallError> {
        let conv = conv_id("conv", &req.conv)?;
        if !req.reason.is_empty() {
            info!(%conv, reason = %req.reason, "closed by the business system");
        }
        self.change(&req.conv, |conv| Command::Close { conv }).await
    }

    /// A routing command; answered with the conversation as stored once
    /// the change is durable.
    async fn change(
        &self,
        conv: &str,
        command: impl FnOnce(kefu_proto::ConvId) -> Command,
    ) -> Result<pb::Conversation, CallError> {
        let id = conv_id("conv", conv)?;
        match self.chat("", command(id)).await? {
            Event::Conversation { .. } => {
                self.get_conversation(pb::GetConversationRequest { conv: conv.into() })
            }
            other => Err(unexpected(&other)),
        }
    }
}

/// A user's role as the contract spells it (empty: a visitor).
fn user_role(role: &str) -> Result<Role, CallError> {
    match role {
        "" | "visitor" => Ok(Role::Visitor),
        "agent" => Ok(Role::Agent),
        other => Err(CallError::InvalidArgument(format!("role: {other:?} is not \"agent\" or \"visitor\""))),
    }
}

/// The call's error for the client protocol's error code.
fn from_code(code: ErrorCode, message: String) -> CallError {
    match code {
        ErrorCode::BadFrame | ErrorCode::BadCommand | ErrorCode::TooLarge => {
            CallError::InvalidArgument(message)
        }
        ErrorCode::NotFound => CallError::NotFound(message),
        ErrorCode::Forbidden | ErrorCode::Unauthorized => CallError::PermissionDenied(message),
        ErrorCode::Conflict => CallError::FailedPrecondition(message),
        ErrorCode::RateLimited | ErrorCode::Unavailable => CallError::Unavailable(message),
        ErrorCode::Internal => CallError::Internal(message),
    }
}

fn unexpected(event: &Event) -> CallError {
    CallError::Internal(format!("the chat service answered with an unexpected {event:?}"))
}
