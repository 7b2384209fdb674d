//! REST/JSON under `/api/v1`: the same calls as gRPC, answering with the
//! same messages (as JSON, see [`super::json`]) from the same code
//! ([`Calls`]).
//!
//! Errors are `{"code": "...", "message": "..."}` with the HTTP status that
//! matches the gRPC one (400 invalid_argument, 401 unauthenticated, 404
//! not_found, 500 internal, 501 unimplemented, 503 unavailable). The calls
//! that are not built yet have their routes, answering 501, so a client
//! learns that rather than a 404 that looks like a typo.

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
        .route("/api/v1/conversations/{conv}/messages", get(get_history).post(|| not_built("SendMessage")))
        .route("/api/v1/conversations/{conv}/assign", post(|| not_built("AssignConversation")))
        .route("/api/v1/conversations/{conv}/transfer", post(|| not_built("TransferConversation")))
        .route("/api/v1/conversations/{conv}/close", post(|| not_built("CloseConversation")))
        .route("/api/v1/users/{role}/{id}", put(|| not_built("SyncUser")))
        .route("/api/v1/users/{role}/{id}/disconnect", post(|| not_built("DisconnectUser")))
        .route("/api/v1/visitors/{id}/block", post(|| not_built("BlockVisitor")))
        .route("/api/v1/presence", get(|| not_built("GetPresence")))
        .route("/api/v1/tokens", post(issue_token))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such API route") })
        .with_state(calls)
}

async fn not_built(call: &'static str) -> Response {
    let status = super::grpc::not_built(&format!("kefu.v1.Gateway/{call}"));
    error(StatusCode::NOT_IMPLEMENTED, "unimplemented", status.message())
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
