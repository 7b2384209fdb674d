//! The bridge: one thread with a tokio runtime serving `server.admin_listen`
//! for business systems and operators.
//!
//! One listener speaks HTTP/1.1 and HTTP/2 (hyper-util's auto detection),
//! and each request goes one of three ways:
//!
//! - `/healthz`, `/readyz`, `/metrics` ([`ops`]): no key;
//! - gRPC (`content-type: application/grpc…`): the `kefu.v1` services
//!   ([`grpc`]) and server reflection, so `grpcurl list` works without the
//!   `.proto` files;
//! - `/api/v1/…` ([`rest`]): the same calls as REST/JSON.
//!
//! Everything but the operator endpoints needs an API key ([`auth`]),
//! checked before routing. API calls in progress are bounded by
//! `admin.max_concurrent_requests`; past it a call is answered
//! `UNAVAILABLE` / 503 at once instead of queueing. The bridge holds no
//! chat state: what it answers itself comes from storage reads
//! ([`calls`]) and the event log ([`events`], which commits consumer
//! offsets through the bridge's own storage source, [`writes`]); what
//! needs the shards is not built yet and says so.
//!
//! It runs apart from the shards so that scrapes, health checks and
//! business-system calls never wait behind client traffic, and so that the
//! shards' io_uring loops never run tokio.
//!
//! The same runtime makes kefu's own calls to the business system's hooks
//! ([`hooks`]): it is built before the shards start ([`runtime`]), so they
//! can be handed the hook client, and runs once [`start`] is called.

pub mod auth;
pub mod calls;
mod chat_calls;
pub mod events;
pub mod grpc;
pub mod hooks;
pub mod json;
pub mod ops;
pub mod pb;
pub mod rest;
pub mod writes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use self::auth::ApiKeys;
use self::calls::Calls;
use self::ops::Ops;

/// How often the bridge looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// What the bridge thread is given at start.
pub struct BridgeInit {
    /// The bound admin listener.
    pub listener: std::net::TcpListener,
    /// What the operator endpoints read.
    pub ops: Ops,
    /// The calls answered from storage.
    pub calls: Calls,
    /// `kefu.v1.Events`.
    pub events: events::EventsInit,
    /// `admin.api_keys`.
    pub api_keys: ApiKeys,
    /// `admin.max_concurrent_requests`.
    pub max_concurrent_requests: usize,
    /// `admin.max_request_bytes`.
    pub max_request_bytes: usize,
}

/// Binds `addr` for the bridge (before any shard starts, so a taken port
/// fails the start at once).
pub fn bind(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen (admin) on {addr}"))?;
    listener.set_nonblocking(true).context("admin listener: set_nonblocking")?;
    Ok(listener)
}

/// The bridge's tokio runtime (one thread: the bridge's). Tasks spawned on
/// its handle before [`start`] wait until it runs.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the bridge's tokio runtime")
}

/// Starts the bridge thread on `runtime` (from [`runtime`]); it serves
/// until `init.ops.stop` is raised, then finishes the requests in progress
/// and returns.
pub fn start(
    init: BridgeInit,
    runtime: tokio::runtime::Runtime,
) -> anyhow::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let addr = init.listener.local_addr().context("admin listener has no address")?;
    let thread = std::thread::Builder::new()
        .name("kefu-bridge".into())
        .spawn(move || runtime.block_on(serve(init)))
        .context("spawning the bridge thread")?;
    Ok((addr, thread))
}

/// The state every request sees.
struct Shared {
    ops: Ops,
    events: events::EventsApi,
    keys: ApiKeys,
    in_flight: Arc<Semaphore>,
}

async fn serve(init: BridgeInit) {
    let BridgeInit { listener, ops, calls, events, api_keys, max_concurrent_requests, max_request_bytes } =
        init;
    let stop = ops.stop.clone();
    // The bridge's storage completions, handed to the calls that wait.
    tokio::spawn(events.writes.clone().run());
    let events_api = events::EventsApi::new(events, stop.clone());
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "bridge: cannot use the admin listener");
            return;
        }
    };
    let shared = Arc::new(Shared {
        ops,
        events: events_api.clone(),
        keys: api_keys,
        in_flight: Arc::new(Semaphore::new(max_concurrent_requests)),
    });
    let app = router(shared, Arc::new(calls), events_api, max_request_bytes);
    info!(addr = ?listener.local_addr().ok(), "bridge serving gRPC, REST and operator endpoints");
    let stopped = wait_for_stop(stop);
    // No Nagle: a streamed event is one small HTTP/2 frame, and waiting
    // for the peer's (delayed) ack of the previous one costs ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            warn!(error = %e, "bridge: cannot set TCP_NODELAY");
        }
    });
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
        warn!(error = %e, "bridge: serving failed");
    }
}

async fn wait_for_stop(stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(STOP_POLL).await;
    }
}

fn router(
    shared: Arc<Shared>,
    calls: Arc<Calls>,
    events_api: events::EventsApi,
    max_request_bytes: usize,
) -> axum::Router {
    let gateway = pb::gateway_server::GatewayServer::new(grpc::GatewayApi::new(calls.clone()))
        .max_decoding_message_size(max_request_bytes);
    let events_grpc =
        pb::events_server::EventsServer::new(events_api.clone()).max_decoding_message_size(max_request_bytes);
    let mut grpc = tonic::service::Routes::new(gateway).add_service(events_grpc);
    // Both versions: grpcurl and older tools ask v1alpha.
    let v1 = reflection().build_v1();
    let v1alpha = reflection().build_v1alpha();
    match (v1, v1alpha) {
        (Ok(v1), Ok(v1alpha)) => grpc = grpc.add_service(v1).add_service(v1alpha),
        // Served without reflection rather than not at all.
        (Err(e), _) | (_, Err(e)) => warn!(error = %e, "bridge: gRPC reflection is off"),
    }
    let ops_routes = axum::Router::new()
        .route("/healthz", get(|State(s): State<Arc<Shared>>| async move { ops::healthz(&s.ops) }))
        .route("/readyz", get(|State(s): State<Arc<Shared>>| async move { ops::readyz(&s.ops) }))
        .route("/metrics", get(|State(s): State<Arc<Shared>>| async move { ops::metrics(&s.ops, &s.events) }))
        .with_state(shared.clone());
    let apps = Arc::new(Apps {
        grpc: grpc.prepare().into_axum_router(),
        http: ops_routes
            .merge(rest::routes(calls))
            .merge(events::routes(events_api))
            .layer(axum::extract::DefaultBodyLimit::max(max_request_bytes)),
    });
    axum::Router::new()
        .fallback(dispatch)
        .with_state(apps)
        .layer(axum::middleware::from_fn_with_state(shared, gate))
}

/// The two ways a request can go, chosen by its content type: an unknown
/// gRPC method gets gRPC's `UNIMPLEMENTED`, an unknown REST path a JSON 404.
struct Apps {
    grpc: axum::Router,
    http: axum::Router,
}

async fn dispatch(State(apps): State<Arc<Apps>>, req: Request) -> Response {
    use tower::ServiceExt as _;
    let app = if is_grpc(&req) { apps.grpc.clone() } else { apps.http.clone() };
    match app.oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Reflection over the whole contract, advertising only the services
/// served here: `kefu.v1.Hooks` is described (a business system implements
/// it) but not listed, since calling it on kefu would be a mistake.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    [
        "kefu.v1.Gateway",
        "kefu.v1.Events",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .into_iter()
    .fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET),
        |b, name| b.with_service_name(name),
    )
}

/// Paths served without a key.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics"];

fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Runs before routing: the key, then a place among the calls in progress.
async fn gate(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let grpc = is_grpc(&req);
    let presented = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    let stats = &shared.ops.bridge;
    if let Err(refusal) = shared.keys.check(presented) {
        stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
        return if grpc {
            tonic::Status::unauthenticated(refusal.to_string()).into_http()
        } else {
            let mut r = rest::error(StatusCode::UNAUTHORIZED, "unauthenticated", &refusal.to_string());
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        };
    }
    let Ok(_permit) = shared.in_flight.clone().try_acquire_owned() else {
        stats.busy.fetch_add(1, Ordering::Relaxed);
        let message = "the bridge is at admin.max_concurrent_requests; retry shortly";
        return if grpc {
            tonic::Status::unavailable(message).into_http()
        } else {
            rest::error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        };
    };
    stats.calls.fetch_add(1, Ordering::Relaxed);
    next.run(req).await.into_response()
}
