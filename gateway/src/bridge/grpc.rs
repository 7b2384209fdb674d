//! The gRPC service `kefu.v1.Gateway` (`kefu.v1.Events` is in
//! [`super::events`]).
//!
//! The calls that need only storage reads are answered here through
//! [`Calls`], the same code REST uses. Every other call answers
//! `UNIMPLEMENTED` and says so plainly: they need the bridge's path into
//! the shards' chat machines, which is not built yet. An honest refusal
//! is better than an answer that looks right.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::calls::Calls;
use super::pb;

/// The refusal of a call that is not built yet.
pub fn not_built(call: &str) -> Status {
    Status::unimplemented(format!(
        "{call} is not built yet: it needs the bridge's path to the shards; docs/control-plane.md lists what is"
    ))
}

/// `kefu.v1.Gateway`.
#[derive(Debug, Clone)]
pub struct GatewayApi {
    calls: Arc<Calls>,
}

impl GatewayApi {
    /// The service, answering through `calls`.
    pub fn new(calls: Arc<Calls>) -> GatewayApi {
        GatewayApi { calls }
    }
}

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayApi {
    async fn sync_user(
        &self,
        _: Request<pb::SyncUserRequest>,
    ) -> Result<Response<pb::SyncUserResponse>, Status> {
        Err(not_built("kefu.v1.Gateway/SyncUser"))
    }

    async fn send_message(
        &self,
        _: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        Err(not_built("kefu.v1.Gateway/SendMessage"))
    }

    async fn get_history(
        &self,
        req: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        Ok(Response::new(self.calls.get_history(req.into_inner())?))
    }

    async fn list_conversations(
        &self,
        req: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        Ok(Response::new(self.calls.list_conversations(req.into_inner())?))
    }

    async fn get_conversation(
        &self,
        req: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        Ok(Response::new(self.calls.get_conversation(req.into_inner())?))
    }

    async fn assign_conversation(
        &self,
        _: Request<pb::AssignConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        Err(not_built("kefu.v1.Gateway/AssignConversation"))
    }

    async fn transfer_conversation(
        &self,
        _: Request<pb::TransferConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        Err(not_built("kefu.v1.Gateway/TransferConversation"))
    }

    async fn close_conversation(
        &self,
        _: Request<pb::CloseConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        Err(not_built("kefu.v1.Gateway/CloseConversation"))
    }

    async fn get_presence(
        &self,
        _: Request<pb::GetPresenceRequest>,
    ) -> Result<Response<pb::GetPresenceResponse>, Status> {
        Err(not_built("kefu.v1.Gateway/GetPresence"))
    }

    async fn disconnect_user(
        &self,
        _: Request<pb::DisconnectUserRequest>,
    ) -> Result<Response<pb::DisconnectUserResponse>, Status> {
        Err(not_built("kefu.v1.Gateway/DisconnectUser"))
    }

    async fn block_visitor(
        &self,
        _: Request<pb::BlockVisitorRequest>,
    ) -> Result<Response<pb::BlockVisitorResponse>, Status> {
        Err(not_built("kefu.v1.Gateway/BlockVisitor"))
    }

    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        Ok(Response::new(self.calls.issue_token(req.into_inner())?))
    }
}
