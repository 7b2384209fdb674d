//! The least a business system's `kefu.v1.Hooks` can do: let every user
//! in and allow every message as sent, at once. It is the other end of the
//! hook benchmark (`tools/bench-chat.sh --hook`), so what the benchmark
//! measures is kefu's own cost of a hook round trip (the call, its task on
//! the bridge, the verdict's way back to the shard), not a business
//! system's.
//!
//! ```sh
//! cargo run --release -p kefu-gateway --example hook_allow -- 127.0.0.1:50051
//! KEFU_HOOKS_ENDPOINT=http://127.0.0.1:50051 KEFU_HOOKS_ON_MESSAGE=true kefu serve
//! ```
//!
//! It runs on one thread (a current-thread tokio runtime), so that
//! `taskset` can pin it to one core.

use std::net::SocketAddr;

use kefu_gateway::bridge::pb;
use kefu_gateway::bridge::pb::hooks_server::{Hooks, HooksServer};
use tonic::{Request, Response, Status};

struct AllowAll;

#[tonic::async_trait]
impl Hooks for AllowAll {
    async fn on_connect(
        &self,
        _: Request<pb::OnConnectRequest>,
    ) -> Result<Response<pb::OnConnectResponse>, Status> {
        Ok(Response::new(pb::OnConnectResponse::default()))
    }

    async fn on_message(
        &self,
        _: Request<pb::OnMessageRequest>,
    ) -> Result<Response<pb::OnMessageResponse>, Status> {
        Ok(Response::new(pb::OnMessageResponse::default()))
    }
}

fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| anyhow::anyhow!("{a:?} is not an address (host:port): {e}"))?,
        None => anyhow::bail!("usage: hook_allow HOST:PORT"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        eprintln!("hook_allow: serving kefu.v1.Hooks on {addr}");
        tonic::transport::Server::builder().add_service(HooksServer::new(AllowAll)).serve(addr).await
    })?;
    Ok(())
}
