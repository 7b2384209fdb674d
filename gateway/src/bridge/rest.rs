//! REST/JSON under `/api/v1`: the same calls as gRPC, answering with the
//! same messages (as JSON, see [`super::json`]) from the same code
//! ([`Calls`]).
//!
//! Errors are `{"code": "...", "message": "..."}` with the HTTP status that
//! matches the gRPC one (400 invalid_argument, 401 unauthenticated, 404
//! not_found, 403 permission_denied, 409 failed_precondition, 500 internal,
//! 503 unavailable).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;

use super::calls::{CallError, Calls};
use super::pb;

/// The OpenAPI description of what is built (`GET /api/v1/openapi.json`).
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// A JSON error body with `status`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(serde_json::json!({"code": code, "message": message}))).into_response()
}

fn answer<T: serde::Serialize>(result: Result<T, CallError>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(e) => {
            let (status, code) = e.http();
            error(status, code, &e.to_string())
        }
    }
}

fn bad_request(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_argument", &message)
}

/// The `/api/v1` routes.
pub fn routes(calls: Arc<Calls>) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/conversations", get(list_conversations))
        .route("/api/v1/conversations/{conv}", get(get_conversation))
        .route("/api/v1/conversations/{conv}/messages", get(get_history).post(send_message))
        .route("/api/v1/conversations/{conv}/assign", post(assign_conversation))
        .route("/api/v1/conversations/{conv}/transfer", post(transfer_conversation))
        .route("/api/v1/conversations/{conv}/close", post(close_conversation))
        .route("/api/v1/users/{role}/{id}", put(sync_user))
        .route("/api/v1/users/{role}/{id}/disconnect", post(disconnect_user))
        .route("/api/v1/visitors/{id}/block", post(block_visitor).delete(unblock_visitor))
        .route("/api/v1/presence", get(get_presence))
        .route("/api/v1/tokens", post(issue_token))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such API route") })
        .with_state(calls)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn list_conversations(
    State(calls): State<Arc<Calls>>,
    query: Result<Query<pb::ListConversationsRequest>, QueryRejection>,
) -> Response {
    match query {
        Ok(Query(req)) => answer(calls.list_conversations(req)),
        Err(e) => bad_request(e.body_text()),
    }
}

async fn get_conversation(State(calls): State<Arc<Calls>>, Path(conv): Path<String>) -> Response {
    answer(calls.get_conversation(pb::GetConversationRequest { conv }))
}

/// `?before=&limit=` of a history page.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct HistoryQuery {
    before: u64,
    limit: u32,
}

async fn get_history(
    State(calls): State<Arc<Calls>>,
    Path(conv): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Response {
    match query {
        Ok(Query(q)) => {
            answer(calls.get_history(pb::GetHistoryRequest { conv, before: q.before, limit: q.limit }))
        }
        Err(e) => bad_request(e.body_text()),
    }
}

async fn issue_token(
    State(calls): State<Arc<Calls>>,
    body: Result<Json<pb::IssueTokenRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(req)) => answer(calls.issue_token(req)),
        Err(e) => bad_request(e.body_text()),
    }
}

/// A POST body for a call on the conversation in the path: the request
/// message without its `conv` (the path's wins if both are given). An
/// unreadable body is the rejection's text, for a 400.
fn with_conv<T>(
    conv: String,
    body: Result<Json<T>, JsonRejection>,
    set: impl FnOnce(&mut T, String),
) -> Result<T, String> {
    match body {
        Ok(Json(mut req)) => {
            set(&mut req, conv);
            Ok(req)
        }
        Err(e) => Err(e.body_text()),
    }
}

async fn send_message(
    State(calls): State<Arc<Calls>>,
    Path(conv): Path<String>,
    body: Result<Json<pb::SendMessageRequest>, JsonRejection>,
) -> Response {
    match with_conv(conv, body, |r, c| r.conv = c) {
        Ok(req) => answer(calls.send_message(req).await),
        Err(e) => bad_request(e),
    }
}

async fn assign_conversation(
    State(calls): State<Arc<Calls>>,
    Path(conv): Path<String>,
    body: Result<Json<pb::AssignConversationRequest>, JsonRejection>,
) -> Response {
    match with_conv(conv, body, |r, c| r.conv = c) {
        Ok(req) => answer(calls.assign_conversation(req).await),
        Err(e) => bad_request(e),
    }
}

async fn transfer_conversation(
    State(calls): State<Arc<Calls>>,
    Path(conv): Path<String>,
    body: Result<Json<pb::TransferConversationRequest>, JsonRejection>,
) -> Response {
    match with_conv(conv, body, |r, c| r.conv = c) {
        Ok(req) => answer(calls.transfer_conversation(req).await),
        Err(e) => bad_request(e),
    }
}

async fn close_conversation(
    State(calls): State<Arc<Calls>>,
    Path(conv): Path<String>,
    body: Result<Json<pb::CloseConversationRequest>, JsonRejection>,
) -> Response {
    match with_conv(conv, body, |r, c| r.conv = c) {
        Ok(req) => answer(calls.close_conversation(req).await),
        Err(e) => bad_request(e),
    }
}

/// `?agents=a1,a2` (none: every agent the router knows).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PresenceQuery {
    agents: String,
}

async fn get_presence(
    State(calls): State<Arc<Calls>>,
    query: Result<Query<PresenceQuery>, QueryRejection>,
) -> Response {
    match query {
        Ok(Query(q)) => {
            let agent_ids = q.agents.split(',').filter(|a| !a.is_empty()).map(str::to_string).collect();
            answer(calls.get_presence(pb::GetPresenceRequest { agent_ids }).await)
        }
        Err(e) => bad_request(e.body_text()),
    }
}

/// The body of a disconnect: why, for the log.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DisconnectBody {
    reason: String,
}

async fn disconnect_user(
    State(calls): State<Arc<Calls>>,
    Path((role, user_id)): Path<(String, String)>,
    body: Option<Json<DisconnectBody>>,
) -> Response {
    let reason = body.map(|Json(b)| b.reason).unwrap_or_default();
    answer(calls.disconnect_user(pb::DisconnectUserRequest { role, user_id, reason }).await)
}

async fn block_visitor(
    State(calls): State<Arc<Calls>>,
    Path(visitor_id): Path<String>,
    body: Option<Json<pb::BlockVisitorRequest>>,
) -> Response {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    answer(calls.block_visitor(pb::BlockVisitorRequest { visitor_id, ..req }).await)
}

async fn unblock_visitor(State(calls): State<Arc<Calls>>, Path(visitor_id): Path<String>) -> Response {
    answer(calls.unblock_visitor(pb::UnblockVisitorRequest { visitor_id }).await)
}

async fn sync_user(
    State(calls): State<Arc<Calls>>,
    Path((role, user_id)): Path<(String, String)>,
    body: Result<Json<pb::SyncUserRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(req)) => answer(calls.sync_user(pb::SyncUserRequest { role, user_id, ..req }).await),
        Err(e) => bad_request(e.body_text()),
    }
}
