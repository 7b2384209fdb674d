//! The gRPC service `kefu.v1.Gateway` (`kefu.v1.Events` is in
//! [`super::events`]).
//!
//! Every call is answered through [`Calls`], the same code REST uses:
//! storage reads, commands into the chat machines, or (`Events`) the log
//! itself.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::calls::Calls;
use super::pb;

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
        req: Request<pb::SyncUserRequest>,
    ) -> Result<Response<pb::SyncUserResponse>, Status> {
        Ok(Response::new(self.calls.sync_user(req.into_inner()).await?))
    }

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        Ok(Response::new(self.calls.send_message(req.into_inner()).await?))
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
        req: Request<pb::AssignConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        Ok(Response::new(self.calls.assign_conversation(req.into_inner()).await?))
    }

    async fn transfer_conversation(
        &self,
        req: Request<pb::TransferConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        Ok(Response::new(self.calls.transfer_conversation(req.into_inner()).await?))
    }

    async fn close_conversation(
        &self,
        req: Request<pb::CloseConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        Ok(Response::new(self.calls.close_conversation(req.into_inner()).await?))
    }

    async fn get_presence(
        &self,
        req: Request<pb::GetPresenceRequest>,
    ) -> Result<Response<pb::GetPresenceResponse>, Status> {
        Ok(Response::new(self.calls.get_presence(req.into_inner()).await?))
    }

    async fn disconnect_user(
        &self,
        req: Request<pb::DisconnectUserRequest>,
    ) -> Result<Response<pb::DisconnectUserResponse>, Status> {
        Ok(Response::new(self.calls.disconnect_user(req.into_inner()).await?))
    }

    async fn block_visitor(
        &self,
        req: Request<pb::BlockVisitorRequest>,
    ) -> Result<Response<pb::BlockVisitorResponse>, Status> {
        Ok(Response::new(self.calls.block_visitor(req.into_inner()).await?))
    }

    async fn unblock_visitor(
        &self,
        req: Request<pb::UnblockVisitorRequest>,
    ) -> Result<Response<pb::UnblockVisitorResponse>, Status> {
        Ok(Response::new(self.calls.unblock_visitor(req.into_inner()).await?))
    }

    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        Ok(Response::new(self.calls.issue_token(req.into_inner())?))
    }
}
