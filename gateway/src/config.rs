//! kefu's configuration: one `Config` struct, read from TOML, then from
//! `KEFU_<SECTION>_<FIELD>` environment variables, then from command-line
//! flags, each layer overriding the one before.
//!
//! Every field has a default, so `kefu serve` with no file runs. A key the
//! struct does not know is an error that names it (`server.lisen`), both in
//! the file and in the environment: a typo must never silently leave a
//! default in force. Environment variables whose section is not one of ours
//! (`KEFU_VENV`, say) are left alone, since scripts use the prefix too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole configuration of a gateway process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners, shards and the I/O driver.
    pub server: ServerConfig,
    /// Sizes and queue bounds that protect the gateway from its clients.
    pub limits: LimitsConfig,
    /// The per-shard slab of message buffers, allocated at start.
    pub slab: SlabConfig,
    /// Where durable data lives, and how the group commit batches.
    pub storage: kefu_storage::StoreConfig,
    /// Identity: JWT secret and anonymous visitors.
    pub auth: AuthConfig,
    /// Endpoints for conformance runs and transport benchmarks.
    pub diagnostics: DiagnosticsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Who gets which conversation.
    pub routing: kefu_core::config::RoutingConfig,
    /// Canned replies and keyword auto-replies.
    pub rules: kefu_core::config::RulesConfig,
    /// Sizes and counts of chat content (text, attachments, cids, history).
    pub messages: kefu_core::config::LimitsConfig,
    /// The control plane on `server.admin_listen`: API keys and its limits.
    pub admin: AdminConfig,
    /// The business system's hooks (`kefu.v1.Hooks`), which kefu calls.
    pub hooks: HooksConfig,
    /// The agent console and the visitor widget the gateway serves.
    pub console: ConsoleConfig,
}

impl Config {
    /// The product rules' configuration, as `kefu-core` takes it.
    pub fn core(&self) -> kefu_core::CoreConfig {
        kefu_core::CoreConfig {
            auth: kefu_core::config::AuthPolicy {
                exp_leeway_s: self.auth.exp_leeway_s,
                ..kefu_core::config::AuthPolicy::default()
            },
            limits: self.messages.clone(),
            rate: kefu_core::config::RateLimitConfig {
                messages_per_s: self.limits.messages_per_s,
                burst: self.limits.burst,
                attachment_bytes_per_min: self.limits.attachment_bytes_per_min,
            },
            routing: self.routing.clone(),
            rules: self.rules.clone(),
            hooks: self.hooks.policy(),
        }
    }
}

/// Which io driver the shards run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring; start fails if the kernel refuses it.
    Uring,
    /// epoll, only when chosen explicitly (old kernels, sandboxes).
    Epoll,
}

/// How a shard's io_uring runs completion work ("task work": the receive
/// that runs when data arrives on a socket, the completion of a send).
/// BENCHMARKS.md ("Ring setup") has the measurements behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UringTaskrun {
    /// `SINGLE_ISSUER | DEFER_TASKRUN` (Linux 6.1): task work runs only
    /// when the shard waits for completions, all of it in one batch on the
    /// shard's own core. Without it a completion posted from the other
    /// core interrupts the shard (and contends for the socket lock).
    Defer,
    /// `COOP_TASKRUN | TASKRUN_FLAG`: no interrupt, task work waits for
    /// the shard's next system call.
    Coop,
    /// The kernel's default: task work may interrupt the shard at any time.
    Default,
}

/// How a shard moves a socket's bytes once the ring has reported it ready.
/// BENCHMARKS.md (issue 11, "Fewer completions per echo") has the
/// measurements behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketIo {
    /// Non-blocking `recv` / `send` system calls, falling back to the
    /// ring's operations only when the socket has nothing to read (a false
    /// alarm) or no room to write. Each completion the ring reports costs
    /// the shard a task wake and poll; this leaves one a message, the
    /// readiness, instead of three.
    Syscall,
    /// The ring's `Recv` and `Send` (`Writev` for a batch) operations.
    Ring,
}

/// How a shard's ring reports that a socket has input, with
/// `socket_io = "syscall"`. BENCHMARKS.md (issue 11, "One poll per
/// socket") has the measurements behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UringPoll {
    /// One `PollAdd` per wait: submitted, armed by the kernel (a poll of
    /// the socket and a wait-queue entry), completed and disarmed once
    /// for every message a busy socket receives.
    Oneshot,
    /// One multishot `PollAdd` per connection, armed once, posting a
    /// completion each time input comes; the connection reads until the
    /// socket is empty before it waits again. Needs kefu's patch of
    /// monoio (`vendor/monoio`).
    Multishot,
}

/// How a shard's ring accepts connections (`io = "uring"` only). The
/// default is `oneshot`: over 15 interleaved rounds of 15,000 connections
/// the multishot accept's server CPU per connection was within the spread
/// of the one-shot's (BENCHMARKS.md, issue 11, "One accept per listener"),
/// and it adds a `getpeername` per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UringAccept {
    /// One `Accept` per connection, submitted when the last one is taken.
    Oneshot,
    /// One multishot `Accept` per listener, armed once, posting a
    /// completion for each connection; the peer's address is then asked
    /// for (`getpeername`). Needs kefu's patch of monoio
    /// (`vendor/monoio`) and Linux 5.19.
    Multishot,
}

/// `[server]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client listener (WebSocket and, later, REST).
    pub listen: String,
    /// Control plane and operator listener: gRPC, REST (`/api/v1`),
    /// `/healthz`, `/readyz` and `/metrics`.
    pub admin_listen: String,
    /// Number of shards; 0 means one per available core.
    pub shards: usize,
    /// `uring` (default) or `epoll`; there is no silent fallback.
    pub io: IoDriver,
    /// Pin shard N to core N (modulo the cores available).
    pub pin_cores: bool,
    /// Submission queue entries of each shard's io_uring.
    pub uring_entries: u32,
    /// How each shard's io_uring runs completion work: `defer` (default),
    /// `coop` or `default`. A kernel that refuses the flags fails the
    /// start with the reason, never silently.
    pub uring_taskrun: UringTaskrun,
    /// How bytes move once a socket is ready: `syscall` (default) or
    /// `ring`. With `io = "epoll"` there is no ring: monoio reads and
    /// writes by system calls either way, and `syscall` only makes the
    /// first attempt kefu's own.
    pub socket_io: SocketIo,
    /// How the ring reports input: `multishot` (default) or `oneshot`. Only with
    /// `io = "uring"` and `socket_io = "syscall"`; ignored otherwise (the
    /// start line says which applies).
    pub uring_poll: UringPoll,
    /// How the ring accepts connections: `oneshot` (default) or
    /// `multishot`. Only with `io = "uring"`; the start line says which
    /// applies.
    pub uring_accept: UringAccept,
    /// The time slice each shard thread asks the kernel's fair scheduler
    /// for, in microseconds (`sched_setattr`'s `sched_runtime` under
    /// `SCHED_OTHER`, which EEVDF honours from Linux 6.12 and clamps to
    /// 100–100,000). A shard woken by a socket or a mailbox then runs
    /// before a thread on its core with a longer slice has used up its
    /// own: the storage writer's checkpoint, the other shard's burst. 0
    /// leaves the kernel's default (1.4 ms on the 2-core test machine).
    /// Default 100: at 15,000 sessions, with two shards and the writer on
    /// one core, five-minute runs gave p99 8.2–10.0 ms (three runs)
    /// against 9.9–10.0 (two) with the kernel's slice under kefu-bench,
    /// even under chat-tungstenite, and 3–7% less server CPU per message
    /// in the runs of one build; 60 s runs and an earlier series showed no
    /// difference beyond the host's spread (BENCHMARKS.md, issue 11,
    /// "Fewer wake-ups"). A small gain, not in every run.
    pub shard_slice_us: u64,
    /// Whether the process's memory may be backed by transparent huge
    /// pages. mimalloc asks for them on its heap (`madvise`), and a huge
    /// page is resident as a whole, 2 MiB, once any byte of it is touched:
    /// the heap of many small, long-lived session objects then holds far
    /// more resident memory than it uses. Default off, which asks the
    /// kernel for none (`prctl(PR_SET_THP_DISABLE)`, for the whole
    /// process, at start): at 15,000 sessions that measured ~1.7 KB less
    /// RSS per session (BENCHMARKS.md, issue 11, "Huge pages"). `true`
    /// leaves it to the system's mode and to what the parent process set.
    pub transparent_huge_pages: bool,
    /// Listen backlog of each shard's SO_REUSEPORT socket.
    pub backlog: i32,
    /// Connections one shard holds at most; past it new ones get 503.
    pub max_connections_per_shard: usize,
    /// Server ping interval; a peer silent for twice this is closed.
    pub heartbeat_s: u64,
    /// Time a client has to send a complete HTTP request head.
    pub handshake_timeout_ms: u64,
    /// Time a close handshake may take before the socket is cut.
    pub close_timeout_ms: u64,
    /// Time to drain connections on SIGTERM/SIGINT before exiting.
    pub shutdown_timeout_ms: u64,
    /// Messages a shard's inbox holds (frames for its connections, commands
    /// for the conversations homed there, the router's work on shard 0). A
    /// sender that finds it full holds what it posts in its backlog.
    pub mailbox_capacity: usize,
    /// Messages a shard holds back for other shards' full inboxes. Past
    /// this, a command is answered `unavailable`, a frame closes its
    /// connection with 4001 (the client resumes), a queue position is
    /// skipped, and session and routing state are still kept.
    pub backlog_messages_max: usize,
    /// Business systems' calls (gRPC / REST) waiting for the chat service's
    /// answer at once; past it a call is refused `unavailable`.
    pub api_calls_max: usize,
    /// Browser origins (`https://shop.example`, exactly as the browser
    /// sends `Origin`) whose pages may open `/ws`, besides the gateway's
    /// own; `"*"` allows any. A client that sends no `Origin` (not a
    /// browser) is always let through to authenticate as usual.
    pub allowed_origins: Vec<String>,
    /// Load balancers and reverse proxies (IP addresses or CIDRs such as
    /// `10.0.0.0/8`, `fd00::/8`) whose `X-Forwarded-For` is believed: only
    /// for a connection from one of them does the rightmost address of
    /// that header which is not itself a trusted proxy name the client
    /// (for the per-address limits and the logs). Default empty: the
    /// header is ignored and the TCP peer is the client, since anyone can
    /// send the header.
    pub trusted_proxies: Vec<String>,
    /// Whether connections from `server.trusted_proxies` start with a PROXY
    /// protocol header (v1 or v2, HAProxy's), as from a load balancer that
    /// passes TCP through; the client it names is the one the limits and
    /// logs use. When on, a trusted proxy's connection without the header
    /// is refused (400); anyone else's is read as plain HTTP. Default off.
    pub proxy_protocol: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            shards: 0,
            io: IoDriver::Uring,
            pin_cores: true,
            uring_entries: 4096,
            uring_taskrun: UringTaskrun::Defer,
            socket_io: SocketIo::Syscall,
            uring_poll: UringPoll::Multishot,
            uring_accept: UringAccept::Oneshot,
            shard_slice_us: 100,
            transparent_huge_pages: false,
            backlog: 4096,
            max_connections_per_shard: 50_000,
            heartbeat_s: 25,
            handshake_timeout_ms: 10_000,
            close_timeout_ms: 3_000,
            shutdown_timeout_ms: 5_000,
            mailbox_capacity: 65_536,
            backlog_messages_max: 65_536,
            api_calls_max: 4096,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest HTTP request head (request line and headers).
    pub max_head_bytes: usize,
    /// Largest single WebSocket frame payload; larger closes with 1009.
    /// Default: as `max_message_bytes`.
    pub max_frame_bytes: u64,
    /// Largest reassembled WebSocket message; larger closes with 1009.
    /// Default: the largest valid command, [`message_bytes_for`] the
    /// default `messages.max_attachment_bytes` (a 1 MiB attachment, base64
    /// in JSON, and its envelope): about 1.34 MiB.
    pub max_message_bytes: u64,
    /// Frames queued for one connection before it counts as a slow reader.
    pub outbound_queue_frames: usize,
    /// Bytes queued for one connection before it counts as a slow reader (4001).
    pub outbound_queue_bytes: usize,
    /// Slab size class used to read from sockets.
    pub read_buffer_bytes: usize,
    /// Commands per second one connection may send, sustained (token bucket).
    pub messages_per_s: u32,
    /// Commands one connection may send at once after a quiet spell.
    pub burst: u32,
    /// How long a WebSocket message (or a frame header) may stay
    /// incomplete, from the read that began it; past it the connection is
    /// closed with 1008. What arrives is kept, so a peer that starts a
    /// message and stops holds a buffer for at most this long.
    pub partial_message_timeout_ms: u64,
    /// How long a connection waits for a slab buffer when the classes it
    /// could use are all taken; past it that connection (only) is closed
    /// with 1013 (try again later) and the others go on.
    pub buffer_wait_timeout_ms: u64,
    /// Largest message a connection may send before its `connect`: the
    /// `connect` itself (token, resume list) and `ping`. Larger closes with
    /// 1009, before it is read.
    pub unauthenticated_message_bytes_max: u64,
    /// Bytes of message buffers that all connections of one shard which
    /// have not sent `connect` may hold together; one that would go past
    /// it is closed with 1013. So anonymous sockets cannot take the
    /// buffers the shard's signed-in clients need.
    pub unauthenticated_buffer_bytes_max: usize,
    /// WebSocket handshakes (`/ws` requests) one client address may make
    /// per second, sustained; past it (and the burst) the request is
    /// answered `429 Too Many Requests` with `Retry-After` and closed.
    /// Default 50: people behind one NAT open a few connections a minute
    /// each (a page load, a reconnect), so even an office of thousands
    /// stays far below it, while a script opening sockets in a loop meets
    /// it within a second. Counted per address over all shards (IPv6 per
    /// /64).
    pub new_connections_per_s_per_ip: u32,
    /// Handshakes one address may make at once after a quiet spell.
    /// Default 500: when the gateway restarts, every tab of an office
    /// behind one NAT reconnects within the same few seconds.
    pub new_connections_burst_per_ip: u32,
    /// New anonymous visitors (`connect` with neither token nor
    /// `visitor_id`/`visitor_key`) one client address may create per
    /// minute, sustained, and at once after a quiet minute; past it the
    /// `connect` is `rate_limited` (retry after the wait the message
    /// names) and nothing is stored. Default 120: a visitor gets an
    /// identity once and comes back with its key, so even a shop's
    /// walk-in wifi makes a handful a minute, while a script minting
    /// identities (each a durable, fsynced record) is held to two a second.
    pub anonymous_per_min_per_ip: u32,
    /// Client addresses each per-address table (handshakes, anonymous
    /// visitors) remembers at most, over all shards; past it the idle,
    /// then the least recently seen, are forgotten. Default 65536, about
    /// 4 MiB per table at most.
    pub tracked_ips_max: usize,
    /// Attachment bytes (decoded) one sender (a visitor or an agent, over
    /// all their connections) may send per minute, sustained and at once;
    /// a `send` whose attachment does not fit is `rate_limited` (retry
    /// after the wait the message names). Default 16 MiB (sixteen
    /// full-size attachments a minute); at least
    /// `messages.max_attachment_bytes`.
    pub attachment_bytes_per_min: u64,
    /// Senders the attachment budget table remembers at most, over all
    /// shards; past it the idle (budget refilled), then the least recently
    /// seen, are forgotten. Default 65536, about 4 MiB at most.
    pub tracked_senders_max: usize,
}

/// The ceiling of the per-address rates and bursts: far above any real
/// client, so a value past it is a typo (or a wish for no limit, which
/// this ceiling still grants in practice).
pub const PER_IP_RATE_MAX: u32 = 1_000_000;

/// The ceiling of `limits.tracked_ips_max` and `limits.tracked_senders_max`
/// (about 256 MiB per table).
pub const TRACKED_IPS_MAX: usize = 1 << 22;

/// Bytes of a `send` besides its attachment or text, JSON-escaped at worst:
/// the field names, `conv`, `id`, the `cid` and the `mime` (each at most
/// 6 bytes per byte escaped as `\u00XX`).
pub const COMMAND_ENVELOPE_BYTES: u64 = 4 * 1024;

/// The largest valid command for these content limits, as a WebSocket
/// message: an attachment of `attachment_bytes` in base64 (JSON; the
/// FlatBuffers form is smaller), or a text of `text_bytes` with every byte
/// escaped, whichever is larger, plus [`COMMAND_ENVELOPE_BYTES`].
pub const fn message_bytes_for(attachment_bytes: u64, text_bytes: u64) -> u64 {
    let base64 = attachment_bytes.div_ceil(3) * 4;
    let text = text_bytes * 6;
    (if base64 > text { base64 } else { text }) + COMMAND_ENVELOPE_BYTES
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let content = kefu_core::config::LimitsConfig::default();
        let message_bytes =
            message_bytes_for(content.max_attachment_bytes as u64, content.max_text_bytes as u64);
        Self {
            max_head_bytes: 8 * 1024,
            max_frame_bytes: message_bytes,
            max_message_bytes: message_bytes,
            outbound_queue_frames: 1024,
            outbound_queue_bytes: 48 * 1024 * 1024,
            read_buffer_bytes: 64 * 1024,
            messages_per_s: 20,
            burst: 40,
            partial_message_timeout_ms: 30_000,
            buffer_wait_timeout_ms: 2_000,
            unauthenticated_message_bytes_max: 32 * 1024,
            unauthenticated_buffer_bytes_max: 8 * 1024 * 1024,
            new_connections_per_s_per_ip: 50,
            new_connections_burst_per_ip: 500,
            anonymous_per_min_per_ip: 120,
            tracked_ips_max: 65_536,
            attachment_bytes_per_min: kefu_core::config::RateLimitConfig::default().attachment_bytes_per_min,
            tracked_senders_max: 65_536,
        }
    }
}

/// One size class of the slab: `count` buffers of `bytes` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlabClass {
    /// Size of each buffer.
    pub bytes: usize,
    /// Buffers of this size per shard.
    pub count: usize,
}

/// `[slab]`: memory is reserved (not touched) at start; pages become
/// resident only when a buffer is first used.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlabConfig {
    /// Size classes, ascending.
    pub classes: Vec<SlabClass>,
}

impl Default for SlabConfig {
    fn default() -> Self {
        let class = |bytes, count| SlabClass { bytes, count };
        Self {
            classes: vec![
                class(256, 8192),
                class(4 * 1024, 8192),
                class(16 * 1024, 4096),
                class(32 * 1024, 2048),
                class(64 * 1024, 1024),
                class(256 * 1024, 256),
                class(2 * 1024 * 1024, 32),
                class(17 * 1024 * 1024, 4),
            ],
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret for client JWTs; empty means "generate one into the data dir".
    pub jwt_secret: String,
    /// Whether visitors may connect without a token.
    pub allow_anonymous: bool,
    /// Seconds a token is still accepted past its `exp` (at most 60).
    pub exp_leeway_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { jwt_secret: String::new(), allow_anonymous: true, exp_leeway_s: 60 }
    }
}

/// Shortest API key accepted, in bytes: a key is a shared secret, and a
/// short one can be guessed.
pub const API_KEY_BYTES_MIN: usize = 16;

/// `[admin]`: the control plane (gRPC and REST on `server.admin_listen`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Keys a caller presents as `authorization: Bearer <key>` on every
    /// gRPC and `/api/v1` call. Empty (the default): every such call is
    /// refused, saying so. Each at least 16 bytes of visible ASCII.
    pub api_keys: Vec<String>,
    /// API calls in progress at once; past it a call is answered
    /// `UNAVAILABLE` (503) at once.
    pub max_concurrent_requests: usize,
    /// Largest request (gRPC message or REST body), in bytes.
    pub max_request_bytes: usize,
    /// `ListConversations` page size when the caller gives none.
    pub list_page_size_default: u32,
    /// Largest `ListConversations` page; a larger one is served as this.
    pub list_page_size_max: u32,
    /// Conversations one `ListConversations` page examines at most; a
    /// filter that matches few may return a short page with a next token.
    pub list_scan_max: usize,
    /// `IssueToken` lifetime when the caller gives none, in seconds.
    pub token_ttl_s_default: u64,
    /// Longest `IssueToken` lifetime, in seconds; a longer one is refused.
    pub token_ttl_s_max: u64,
    /// A shard that has not swept for this long is not ready (`/readyz`).
    pub shard_stall_ms: u64,
    /// How long a call the chat service answers (`SendMessage`, a
    /// conversation change) may wait for its answer; past it the caller
    /// gets `UNAVAILABLE` and may retry (a resend with the same cid is
    /// answered with the first message's seq).
    pub chat_call_timeout_ms: u64,
    /// `Events.Subscribe` streams open at once; one more is refused
    /// `RESOURCE_EXHAUSTED`.
    pub subscribers_max: usize,
    /// Events read ahead for one subscriber, waiting for its stream to
    /// take them: past it, reading waits for the client (back-pressure).
    pub subscribe_buffer_events: usize,
    /// `GET /api/v1/events` page size when the caller gives none.
    pub events_page_size_default: u32,
    /// Largest `GET /api/v1/events` page (a larger one is served as this),
    /// and the events a subscriber reads from storage at a time.
    pub events_page_size_max: u32,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_concurrent_requests: 256,
            max_request_bytes: 4 * 1024 * 1024,
            list_page_size_default: 50,
            list_page_size_max: 500,
            list_scan_max: 10_000,
            token_ttl_s_default: 86_400,
            token_ttl_s_max: 30 * 86_400,
            shard_stall_ms: 2_000,
            chat_call_timeout_ms: 10_000,
            subscribers_max: 64,
            subscribe_buffer_events: 1024,
            events_page_size_default: 100,
            events_page_size_max: 1000,
        }
    }
}

impl AdminConfig {
    /// Checks what serde cannot: key shape and the ordering of limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for (i, key) in self.api_keys.iter().enumerate() {
            // The message names the key by position: never echo a secret.
            if key.len() < API_KEY_BYTES_MIN {
                return invalid(format!("admin.api_keys[{i}] is shorter than {API_KEY_BYTES_MIN} bytes"));
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return invalid(format!(
                    "admin.api_keys[{i}] must be visible ASCII (it travels in an HTTP header), without spaces"
                ));
            }
            if self.api_keys[..i].contains(key) {
                return invalid(format!("admin.api_keys[{i}] repeats an earlier key"));
            }
        }
        if self.max_concurrent_requests == 0 {
            return invalid("admin.max_concurrent_requests must be at least 1".into());
        }
        if self.max_request_bytes < 1024 {
            return invalid("admin.max_request_bytes must be at least 1024".into());
        }
        if self.list_page_size_default == 0 || self.list_page_size_default > self.list_page_size_max {
            return invalid(
                "admin.list_page_size_default must be between 1 and admin.list_page_size_max".into(),
            );
        }
        if self.list_scan_max == 0 {
            return invalid("admin.list_scan_max must be at least 1".into());
        }
        if self.token_ttl_s_default == 0 || self.token_ttl_s_default > self.token_ttl_s_max {
            return invalid("admin.token_ttl_s_default must be between 1 and admin.token_ttl_s_max".into());
        }
        if self.subscribers_max == 0 {
            return invalid("admin.subscribers_max must be at least 1".into());
        }
        if self.subscribe_buffer_events == 0 {
            return invalid("admin.subscribe_buffer_events must be at least 1".into());
        }
        if self.events_page_size_default == 0 || self.events_page_size_default > self.events_page_size_max {
            return invalid(
                "admin.events_page_size_default must be between 1 and admin.events_page_size_max".into(),
            );
        }
        if self.shard_stall_ms < 500 {
            // Shards sweep every 100 ms; less slack than a few sweeps
            // would call a busy shard stalled.
            return invalid("admin.shard_stall_ms must be at least 500".into());
        }
        if self.chat_call_timeout_ms == 0 {
            return invalid("admin.chat_call_timeout_ms must be at least 1".into());
        }
        Ok(())
    }
}

/// `[hooks]`: the business system's `kefu.v1.Hooks` service, which kefu
/// calls (from the bridge thread) before it lets a user in (`OnConnect`)
/// and before it stores a visitor's or agent's message (`OnMessage`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// Where the business system serves `kefu.v1.Hooks`, as
    /// `http://host:port` (gRPC over cleartext HTTP/2). Empty (the
    /// default): no hook is called, whatever `on_connect` and `on_message`
    /// say.
    pub endpoint: String,
    /// Call `OnConnect` before a session is let in (it may refuse, or add
    /// to the profile).
    pub on_connect: bool,
    /// Call `OnMessage` before a visitor's or agent's message is stored (it
    /// may allow, rewrite or reject it, and add bot replies).
    pub on_message: bool,
    /// How long a hook's verdict may take, from the moment kefu asks
    /// (waiting for a free call included); past it the call has failed.
    pub timeout_ms: u64,
    /// What a failed call (timeout, error, no answer) means: `"open"` lets
    /// the user or message through as it is; `"closed"` refuses it with
    /// `unavailable`.
    pub failure: kefu_core::config::HookFailure,
    /// Hook calls in progress at once.
    pub concurrent_calls_max: usize,
    /// Hook calls waiting for one of those places; past it a call fails at
    /// once (as `failure` says), and memory stays bounded.
    pub queued_calls_max: usize,
    /// Largest answer a hook may give, in bytes; a larger one is an error.
    pub response_bytes_max: usize,
    /// Bot replies one `OnMessage` answer may post; an answer with more is
    /// invalid (a failure).
    pub replies_max: usize,
}

/// The longest `hooks.timeout_ms` accepted: a message or a connection
/// waits that long at worst, and a minute is already longer than any user
/// would.
pub const HOOK_TIMEOUT_MS_MAX: u64 = 60_000;

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            on_connect: false,
            on_message: false,
            timeout_ms: 1_000,
            failure: kefu_core::config::HookFailure::Open,
            concurrent_calls_max: 256,
            queued_calls_max: 4096,
            response_bytes_max: 1024 * 1024,
            replies_max: 8,
        }
    }
}

impl HooksConfig {
    /// Which hooks the chat core waits for: a hook is on only with an
    /// endpoint to call.
    pub fn policy(&self) -> kefu_core::config::HookPolicy {
        let endpoint = !self.endpoint.is_empty();
        kefu_core::config::HookPolicy {
            on_message: endpoint && self.on_message,
            on_connect: endpoint && self.on_connect,
            failure: self.failure,
        }
    }

    /// Checks the endpoint's shape and the bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !self.endpoint.is_empty() {
            let uri: axum::http::Uri = match self.endpoint.parse() {
                Ok(u) => u,
                Err(e) => return invalid(format!("hooks.endpoint = {:?}: {e}", self.endpoint)),
            };
            match uri.scheme_str() {
                Some("http") => {}
                Some("https") => {
                    return invalid(format!(
                        "hooks.endpoint = {:?}: https is not supported yet; use http:// on a private network or a local TLS-terminating proxy",
                        self.endpoint
                    ));
                }
                _ => {
                    return invalid(format!(
                        "hooks.endpoint = {:?}: expected http://host:port",
                        self.endpoint
                    ));
                }
            }
            if uri.authority().is_none_or(|a| a.host().is_empty()) {
                return invalid(format!("hooks.endpoint = {:?}: no host", self.endpoint));
            }
        }
        if self.timeout_ms == 0 || self.timeout_ms > HOOK_TIMEOUT_MS_MAX {
            return invalid(format!("hooks.timeout_ms must be between 1 and {HOOK_TIMEOUT_MS_MAX}"));
        }
        if self.concurrent_calls_max == 0 || self.concurrent_calls_max > 100_000 {
            return invalid("hooks.concurrent_calls_max must be between 1 and 100000".into());
        }
        // Each queued call holds its request (a message's text) until its
        // turn: a bound that keeps that memory small.
        if self.queued_calls_max > 1_000_000 {
            return invalid("hooks.queued_calls_max must be at most 1000000".into());
        }
        if self.response_bytes_max < 1024 {
            return invalid("hooks.response_bytes_max must be at least 1024".into());
        }
        if self.replies_max > 100 {
            // Each reply is a message stored and fanned out.
            return invalid("hooks.replies_max must be at most 100".into());
        }
        Ok(())
    }
}

/// `[diagnostics]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiagnosticsConfig {
    /// Serve `GET /ws/echo` (conformance and transport benchmarks).
    pub echo: bool,
}

/// `[console]`: the agent console, the widget and the demo page served on
/// the client listener, and the ready-made console link logged at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Log a console link for `default_agent_id` at start
    /// (`/console#token=…`, signed with `auth.jwt_secret`). The token sits
    /// in the fragment, which a browser never sends to a server. Turn it
    /// off where logs are read by people who must not act as that agent.
    pub print_link: bool,
    /// The agent the logged link signs in as.
    pub default_agent_id: String,
    /// Its display name.
    pub default_agent_name: String,
    /// Its skill groups; empty serves every group.
    pub default_agent_groups: Vec<String>,
    /// Lifetime of the logged link's token.
    pub link_ttl_s: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            print_link: true,
            default_agent_id: "agent".into(),
            default_agent_name: "Agent".into(),
            default_agent_groups: Vec::new(),
            link_ttl_s: 7 * 86_400,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `kefu_gateway=debug`, …; `RUST_LOG` wins if set.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: "text".into() }
    }
}

/// Values given on the command line; `None` leaves the lower layers alone.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `--data`.
    pub data: Option<PathBuf>,
    /// `--shards`.
    pub shards: Option<usize>,
    /// `--echo`.
    pub echo: bool,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: toml::de::Error,
    },
    /// A key (file or environment) that no field has.
    #[error("unknown config key `{key}` (from {origin})")]
    UnknownKey {
        /// `section.field`.
        key: String,
        /// The file path or the environment variable.
        origin: String,
    },
    /// A value of the wrong type or out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// How `kefu config` prints a secret. A configuration that carries it back
/// (the printed output saved as a file) is refused, rather than signing
/// tokens with the placeholder.
const REDACTED_PREFIX: &str = "<redacted:";

impl Config {
    /// The configuration as `kefu config` prints it: the secrets (the JWT
    /// secret, the API keys) replaced by a note of their length, so a
    /// printed or pasted configuration gives nobody the keys.
    pub fn redacted(&self) -> Config {
        let hide = |s: &str| {
            if s.is_empty() { String::new() } else { format!("{REDACTED_PREFIX} {} bytes>", s.len()) }
        };
        let mut c = self.clone();
        c.auth.jwt_secret = hide(&c.auth.jwt_secret);
        c.admin.api_keys = c.admin.api_keys.iter().map(|k| hide(k)).collect();
        c
    }
}

impl Config {
    /// Builds the configuration from defaults, an optional file, the process
    /// environment and flags, in that order, and validates it.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars(), overrides)
    }

    /// As [`Config::load`], with the environment given (so tests need not touch
    /// the process's).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid(format!("defaults do not serialize: {e}")))?;
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.into(), source })?;
            let from_file: toml::Table =
                toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
            check_known_keys(&defaults, &from_file, &path.display().to_string())?;
            table = from_file;
        }
        apply_env(&defaults, &mut table, env)?;
        apply_overrides(&mut table, overrides);
        let config: Config =
            table.try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the cross-field rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let parse = |name: &str, v: &str| -> Result<(), ConfigError> {
            v.parse::<SocketAddr>()
                .map(|_| ())
                .map_err(|e| ConfigError::Invalid(format!("server.{name} = {v:?}: {e}")))
        };
        parse("listen", &self.server.listen)?;
        parse("admin_listen", &self.server.admin_listen)?;
        if self.auth.jwt_secret.starts_with(REDACTED_PREFIX) {
            return invalid(
                "auth.jwt_secret is the placeholder `kefu config` prints, not a secret; set the real one"
                    .into(),
            );
        }
        if self.server.heartbeat_s == 0 {
            return invalid("server.heartbeat_s must be at least 1".into());
        }
        if self.server.shard_slice_us != 0 && !(100..=100_000).contains(&self.server.shard_slice_us) {
            return invalid(
                "server.shard_slice_us must be 0 (the kernel's default) or between 100 and 100000".into(),
            );
        }
        if self.server.max_connections_per_shard == 0 {
            return invalid("server.max_connections_per_shard must be at least 1".into());
        }
        let classes = &self.slab.classes;
        if classes.is_empty() {
            return invalid("slab.classes must name at least one size class".into());
        }
        if classes.windows(2).any(|w| w[0].bytes >= w[1].bytes) {
            return invalid("slab.classes must be in strictly ascending order of bytes".into());
        }
        if let Some(c) = classes.iter().find(|c| c.count == 0 || c.bytes < 256) {
            return invalid(format!("slab class {c:?}: bytes must be ≥ 256 and count ≥ 1"));
        }
        let largest = classes.last().map_or(0, |c| c.bytes) as u64;
        // A reassembled message sits in one slab buffer behind room for its
        // outbound header, so the largest class bounds the message size.
        let needed = self.limits.max_message_bytes + crate::ws::frame::MAX_HEADER_BYTES as u64;
        if needed > largest {
            return invalid(format!(
                "limits.max_message_bytes ({}) plus a frame header does not fit the largest slab class ({largest} bytes)",
                self.limits.max_message_bytes
            ));
        }
        if !classes.iter().any(|c| c.bytes == self.limits.read_buffer_bytes) {
            return invalid(format!(
                "limits.read_buffer_bytes ({}) must equal one of the slab class sizes",
                self.limits.read_buffer_bytes
            ));
        }
        if self.limits.read_buffer_bytes < 1024 {
            return invalid("limits.read_buffer_bytes must be at least 1024".into());
        }
        if self.limits.max_head_bytes > self.limits.read_buffer_bytes {
            return invalid("limits.max_head_bytes must fit in limits.read_buffer_bytes".into());
        }
        if self.server.backlog_messages_max == 0 {
            return invalid("server.backlog_messages_max must be at least 1".into());
        }
        if self.server.api_calls_max == 0 {
            return invalid("server.api_calls_max must be at least 1".into());
        }
        if self.server.mailbox_capacity == 0 {
            return invalid("server.mailbox_capacity must be at least 1".into());
        }
        if self.limits.outbound_queue_frames == 0 {
            return invalid("limits.outbound_queue_frames must be at least 1".into());
        }
        // The sweep, every 100 ms, is what notices a message left incomplete.
        if self.limits.partial_message_timeout_ms < 200 {
            return invalid("limits.partial_message_timeout_ms must be at least 200".into());
        }
        if self.limits.buffer_wait_timeout_ms == 0 {
            return invalid("limits.buffer_wait_timeout_ms must be at least 1".into());
        }
        let auth = &self.limits;
        // (Above limits.max_message_bytes it is that, in effect.)
        if auth.unauthenticated_message_bytes_max < 1024 {
            return invalid("limits.unauthenticated_message_bytes_max must be at least 1024".into());
        }
        // At least one buffer of the size a `connect` needs, or none gets in.
        if (auth.unauthenticated_buffer_bytes_max as u64) < auth.unauthenticated_message_bytes_max {
            return invalid(
                "limits.unauthenticated_buffer_bytes_max must be at least limits.unauthenticated_message_bytes_max"
                    .into(),
            );
        }
        let per_ip = [
            ("limits.new_connections_per_s_per_ip", self.limits.new_connections_per_s_per_ip),
            ("limits.new_connections_burst_per_ip", self.limits.new_connections_burst_per_ip),
            ("limits.anonymous_per_min_per_ip", self.limits.anonymous_per_min_per_ip),
        ];
        if let Some((key, v)) = per_ip.iter().find(|(_, v)| *v == 0 || *v > PER_IP_RATE_MAX) {
            return invalid(format!("{key} = {v}: must be between 1 and {PER_IP_RATE_MAX}"));
        }
        for (key, tracked) in [
            ("tracked_ips_max", self.limits.tracked_ips_max),
            ("tracked_senders_max", self.limits.tracked_senders_max),
        ] {
            if !(kefu_core::per_ip::STRIPES..=TRACKED_IPS_MAX).contains(&tracked) {
                return invalid(format!(
                    "limits.{key} = {tracked}: must be between {} and {TRACKED_IPS_MAX}",
                    kefu_core::per_ip::STRIPES
                ));
            }
        }
        if let Err(why) = crate::client_ip::TrustedProxies::parse(&self.server.trusted_proxies) {
            return invalid(format!("server.trusted_proxies: {why}"));
        }
        self.core().validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.storage.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.admin.validate()?;
        self.hooks.validate()?;
        if self.console.print_link
            && (self.console.default_agent_id.is_empty() || self.console.link_ttl_s == 0)
        {
            return invalid(
                "console.default_agent_id must not be empty and console.link_ttl_s at least 1".into(),
            );
        }
        if let Some(o) = self.server.allowed_origins.iter().find(|o| o.is_empty() || o.ends_with('/')) {
            return invalid(format!(
                "server.allowed_origins: {o:?} is not an origin (scheme://host[:port], no path or trailing slash)"
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return invalid(format!("log.format = {:?}: expected \"text\" or \"json\"", self.log.format));
        }
        Ok(())
    }

    /// The number of shards to run: the configured one, or one per core.
    pub fn shard_count(&self) -> usize {
        match self.server.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

fn check_known_keys(defaults: &toml::Table, given: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    for (section, value) in given {
        let unknown = |key: String| ConfigError::UnknownKey { key, origin: origin.to_string() };
        let Some(known) = defaults.get(section).and_then(|v| v.as_table()) else {
            return Err(unknown(section.clone()));
        };
        let Some(fields) = value.as_table() else {
            return Err(ConfigError::Invalid(format!("`{section}` must be a table (from {origin})")));
        };
        if let Some(field) = fields.keys().find(|k| !known.contains_key(*k)) {
            return Err(unknown(format!("{section}.{field}")));
        }
    }
    Ok(())
}

/// Applies `KEFU_<SECTION>_<FIELD>` variables. The value is read as the type
/// of the field's default (a string stays a string even if it looks like a
/// number); arrays and tables are given in TOML syntax.
fn apply_env(
    defaults: &toml::Table,
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("KEFU_") else { continue };
        let lower = rest.to_ascii_lowercase();
        let Some((section, field)) = lower.split_once('_') else { continue };
        let Some(known) = defaults.get(section).and_then(|v| v.as_table()) else { continue };
        let Some(default) = known.get(field) else {
            return Err(ConfigError::UnknownKey { key: format!("{section}.{field}"), origin: name });
        };
        let value =
            env_value(default, &raw).map_err(|why| ConfigError::Invalid(format!("{name}={raw:?}: {why}")))?;
        let entry =
            table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(t) = entry.as_table_mut() {
            t.insert(field.to_string(), value);
        }
    }
    Ok(())
}

fn env_value(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    match default {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Integer(_) => raw.trim().parse().map(Value::Integer).map_err(|e| e.to_string()),
        Value::Float(_) => raw.trim().parse().map(Value::Float).map_err(|e| e.to_string()),
        Value::Boolean(_) => match raw.trim() {
            "1" | "true" | "yes" | "on" => Ok(Value::Boolean(true)),
            "0" | "false" | "no" | "off" => Ok(Value::Boolean(false)),
            other => Err(format!("expected a boolean, got {other:?}")),
        },
        _ => {
            let t: toml::Table = toml::from_str(&format!("v = {raw}")).map_err(|e| e.to_string())?;
            t.get("v").cloned().ok_or_else(|| "empty value".to_string())
        }
    }
}

fn apply_overrides(table: &mut toml::Table, o: &Overrides) {
    let mut set = |section: &str, field: &str, value: toml::Value| {
        let entry =
            table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(t) = entry.as_table_mut() {
            t.insert(field.to_string(), value);
        }
    };
    if let Some(v) = &o.listen {
        set("server", "listen", v.clone().into());
    }
    if let Some(v) = &o.admin_listen {
        set("server", "admin_listen", v.clone().into());
    }
    if let Some(v) = &o.data {
        set("storage", "dir", v.display().to_string().into());
    }
    if let Some(v) = o.shards {
        set("server", "shards", toml::Value::Integer(v as i64));
    }
    if o.echo {
        set("diagnostics", "echo", true.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)], o: &Overrides) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kefu.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load_from(file.map(|_| path.as_path()), env, o)
    }

    #[test]
    fn defaults_are_valid() {
        let c = load(None, &[], &Overrides::default()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.admin_listen, "127.0.0.1:9090");
        assert_eq!(c.storage.dir, PathBuf::from("data"));
        assert!(!c.diagnostics.echo);
        assert_eq!(c.server.io, IoDriver::Uring);
    }

    #[test]
    fn the_default_message_size_fits_the_largest_valid_send_and_not_much_more() {
        let c = Config::default();
        let attachment = c.messages.max_attachment_bytes as u64;
        let base64 = attachment.div_ceil(3) * 4;
        assert!(c.limits.max_message_bytes >= base64 + 1024, "{}", c.limits.max_message_bytes);
        assert!(c.limits.max_message_bytes <= base64 + 16 * 1024, "{}", c.limits.max_message_bytes);
        assert_eq!(c.limits.max_frame_bytes, c.limits.max_message_bytes);
        for bad in [
            "[limits]\npartial_message_timeout_ms = 10\n",
            "[limits]\nbuffer_wait_timeout_ms = 0\n",
            "[limits]\nunauthenticated_message_bytes_max = 10\n",
            "[limits]\nunauthenticated_buffer_bytes_max = 1024\n",
        ] {
            assert!(load(Some(bad), &[], &Overrides::default()).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn per_address_limits_and_trusted_proxies_are_validated_with_the_key_named() {
        let o = Overrides::default();
        let c = load(None, &[], &o).unwrap();
        assert_eq!(c.limits.new_connections_per_s_per_ip, 50);
        assert_eq!(c.limits.new_connections_burst_per_ip, 500);
        assert_eq!(c.limits.anonymous_per_min_per_ip, 120);
        assert_eq!(c.limits.attachment_bytes_per_min, 16 * 1024 * 1024);
        assert!(c.server.trusted_proxies.is_empty(), "X-Forwarded-For ignored by default");
        for (file, key) in [
            (
                "[limits]
new_connections_per_s_per_ip = 0
",
                "limits.new_connections_per_s_per_ip",
            ),
            (
                "[limits]
new_connections_burst_per_ip = 0
",
                "limits.new_connections_burst_per_ip",
            ),
            (
                "[limits]
anonymous_per_min_per_ip = 0
",
                "limits.anonymous_per_min_per_ip",
            ),
            (
                "[limits]
anonymous_per_min_per_ip = 4000000000
",
                "limits.anonymous_per_min_per_ip",
            ),
            (
                "[limits]
tracked_ips_max = 0
",
                "limits.tracked_ips_max",
            ),
            (
                "[limits]
tracked_ips_max = 999999999999
",
                "limits.tracked_ips_max",
            ),
            (
                "[limits]
tracked_senders_max = 3
",
                "limits.tracked_senders_max",
            ),
            (
                "[limits]
attachment_bytes_per_min = 0
",
                "limits.attachment_bytes_per_min",
            ),
            (
                "[limits]
attachment_bytes_per_min = 1000
",
                "limits.attachment_bytes_per_min",
            ),
            (
                "[server]
trusted_proxies = [\"10.0.0.0/33\"]
",
                "server.trusted_proxies",
            ),
            (
                "[server]
trusted_proxies = [\"proxy.local\"]
",
                "server.trusted_proxies",
            ),
        ] {
            let err = load(Some(file), &[], &o).unwrap_err().to_string();
            assert!(err.contains(key), "{file}: {err}");
        }
        let env = [
            ("KEFU_SERVER_TRUSTED_PROXIES", r#"["10.0.0.0/8", "::1"]"#),
            ("KEFU_LIMITS_NEW_CONNECTIONS_PER_S_PER_IP", "1000000"),
        ];
        let c = load(None, &env, &o).unwrap();
        assert_eq!(c.server.trusted_proxies, ["10.0.0.0/8", "::1"]);
        assert_eq!(c.limits.new_connections_per_s_per_ip, 1_000_000);
    }

    #[test]
    fn layers_override_in_order() {
        let file = "[server]\nlisten = \"127.0.0.1:1\"\nshards = 3\nheartbeat_s = 7\n";
        let env = [("KEFU_SERVER_LISTEN", "127.0.0.1:2"), ("KEFU_SERVER_HEARTBEAT_S", "9")];
        let o = Overrides { listen: Some("127.0.0.1:3".into()), echo: true, ..Default::default() };
        let c = load(Some(file), &env, &o).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:3");
        assert_eq!(c.server.heartbeat_s, 9);
        assert_eq!(c.server.shards, 3);
        assert!(c.diagnostics.echo);
    }

    #[test]
    fn unknown_file_key_is_named() {
        let err = load(Some("[server]\nlisen = \"x\"\n"), &[], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("server.lisen"), "{err}");
        let err = load(Some("[sever]\nlisten = \"x\"\n"), &[], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("`sever`"), "{err}");
    }

    #[test]
    fn unknown_env_key_is_named_and_foreign_sections_ignored() {
        let err = load(None, &[("KEFU_SERVER_LISNE", "x")], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("server.lisne"), "{err}");
        assert!(err.to_string().contains("KEFU_SERVER_LISNE"), "{err}");
        load(None, &[("KEFU_VENV", "/tmp/v")], &Overrides::default()).unwrap();
    }

    #[test]
    fn env_values_take_the_fields_type() {
        let env = [
            ("KEFU_AUTH_JWT_SECRET", "12345"),
            ("KEFU_AUTH_ALLOW_ANONYMOUS", "false"),
            ("KEFU_SERVER_IO", "epoll"),
            ("KEFU_SLAB_CLASSES", "[{bytes = 1024, count = 4}, {bytes = 16777216, count = 2}]"),
            ("KEFU_LIMITS_READ_BUFFER_BYTES", "1024"),
            ("KEFU_LIMITS_MAX_HEAD_BYTES", "1024"),
            ("KEFU_LIMITS_MAX_MESSAGE_BYTES", "1000000"),
            ("KEFU_LIMITS_MAX_FRAME_BYTES", "1000000"),
        ];
        let c = load(None, &env, &Overrides::default()).unwrap();
        assert_eq!(c.auth.jwt_secret, "12345");
        assert!(!c.auth.allow_anonymous);
        assert_eq!(c.server.io, IoDriver::Epoll);
        assert_eq!(c.slab.classes.len(), 2);
        let err = load(None, &[("KEFU_SERVER_SHARDS", "many")], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("KEFU_SERVER_SHARDS"), "{err}");
    }

    /// A `[server]` key's default, and each of its values set by the file
    /// and by the environment (`KEFU_SERVER_<KEY>`).
    fn server_key_values<T: PartialEq + std::fmt::Debug + Copy>(
        key: &str,
        default: T,
        values: &[(&str, T)],
        get: impl Fn(&ServerConfig) -> T,
    ) {
        let o = Overrides::default();
        assert_eq!(get(&load(None, &[], &o).unwrap().server), default, "{key}: default");
        let env_key = format!("KEFU_SERVER_{}", key.to_uppercase());
        for &(name, want) in values {
            let file = format!("[server]\n{key} = \"{name}\"\n");
            assert_eq!(get(&load(Some(&file), &[], &o).unwrap().server), want, "{key} = {name} in the file");
            let env = [(env_key.as_str(), name)];
            assert_eq!(get(&load(None, &env, &o).unwrap().server), want, "{env_key}={name}");
        }
    }

    #[test]
    fn the_ring_setup_is_named_config() {
        server_key_values(
            "uring_taskrun",
            UringTaskrun::Defer,
            &[
                ("defer", UringTaskrun::Defer),
                ("coop", UringTaskrun::Coop),
                ("default", UringTaskrun::Default),
            ],
            |s| s.uring_taskrun,
        );
    }

    #[test]
    fn how_bytes_move_is_named_config() {
        server_key_values(
            "socket_io",
            SocketIo::Syscall,
            &[("syscall", SocketIo::Syscall), ("ring", SocketIo::Ring)],
            |s| s.socket_io,
        );
    }

    #[test]
    fn how_the_ring_polls_is_named_config() {
        server_key_values(
            "uring_poll",
            UringPoll::Multishot,
            &[("oneshot", UringPoll::Oneshot), ("multishot", UringPoll::Multishot)],
            |s| s.uring_poll,
        );
    }

    #[test]
    fn how_the_ring_accepts_is_named_config() {
        server_key_values(
            "uring_accept",
            UringAccept::Oneshot,
            &[("oneshot", UringAccept::Oneshot), ("multishot", UringAccept::Multishot)],
            |s| s.uring_accept,
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let o = Overrides::default();
        for file in [
            "[server]\nlisten = \"nowhere\"\n",
            "[server]\nheartbeat_s = 0\n",
            "[server]\nio = \"kqueue\"\n",
            "[server]\nuring_taskrun = \"sqpoll\"\n",
            "[server]\nsocket_io = \"mmap\"\n",
            "[server]\nuring_poll = \"twice\"\n",
            "[server]\nuring_accept = \"many\"\n",
            "[server]\nshard_slice_us = 99\n",
            "[server]\nshard_slice_us = 100001\n",
            "[limits]\nmax_message_bytes = 999999999\n",
            "[limits]\nread_buffer_bytes = 5000\n",
            "[slab]\nclasses = [{bytes = 4096, count = 1}, {bytes = 1024, count = 1}]\n",
            "[log]\nformat = \"xml\"\n",
            "server = 3\n",
            "[server]\nallowed_origins = [\"https://shop.example/\"]\n",
            "[server]\nallowed_origins = [\"\"]\n",
            "[console]\ndefault_agent_id = \"\"\n",
            "[console]\nlink_ttl_s = 0\n",
        ] {
            assert!(load(Some(file), &[], &o).is_err(), "accepted: {file}");
        }
        for slice in [0, 100, 100_000] {
            let file = format!("[server]\nshard_slice_us = {slice}\n");
            assert_eq!(load(Some(&file), &[], &o).unwrap().server.shard_slice_us, slice);
        }
    }

    #[test]
    fn the_printed_configuration_hides_the_secrets() {
        let o = Overrides::default();
        let toml = "[auth]\njwt_secret = \"a-secret-of-32-bytes-or-more-000\"\n[admin]\napi_keys = [\"0123456789abcdef\"]\n";
        let c = load(Some(toml), &[], &o).unwrap().redacted();
        let printed = toml::to_string_pretty(&c).unwrap();
        assert!(!printed.contains("a-secret-of") && !printed.contains("0123456789abcdef"), "{printed}");
        assert!(
            printed.contains("<redacted: 32 bytes>") && printed.contains("<redacted: 16 bytes>"),
            "{printed}"
        );
        let saved = load(Some(&printed), &[], &o).unwrap_err().to_string();
        assert!(saved.contains("placeholder"), "the printed config used as a file is refused: {saved}");
    }

    #[test]
    fn origins_and_the_console_link_are_configured() {
        let o = Overrides::default();
        let file = "[server]\nallowed_origins = [\"https://shop.example\", \"*\"]\n\
                    [console]\nprint_link = false\ndefault_agent_id = \"\"\n";
        let c = load(Some(file), &[], &o).unwrap();
        assert_eq!(c.server.allowed_origins, ["https://shop.example", "*"]);
        assert!(!c.console.print_link, "no link, so no agent is needed for one");
        let c = Config::default();
        assert!(c.server.allowed_origins.is_empty(), "the gateway's own origin only");
        assert!(c.console.print_link && c.console.default_agent_groups.is_empty());
    }

    #[test]
    fn api_keys_default_to_none_and_are_validated_without_being_echoed() {
        let o = Overrides::default();
        assert!(load(None, &[], &o).unwrap().admin.api_keys.is_empty());
        let c = load(Some("[admin]\napi_keys = [\"0123456789abcdef\", \"fedcba9876543210-x\"]\n"), &[], &o)
            .unwrap();
        assert_eq!(c.admin.api_keys.len(), 2);
        let env = [("KEFU_ADMIN_API_KEYS", "[\"from-the-environment-1\"]")];
        assert_eq!(load(None, &env, &o).unwrap().admin.api_keys, ["from-the-environment-1"]);
        for (keys, why) in [
            ("[\"short-secret\"]", "shorter than 16"),
            ("[\"with a space inside it\"]", "visible ASCII"),
            ("[\"tab\\tinside-the-key-here\"]", "visible ASCII"),
            ("[\"0123456789abcdef\", \"0123456789abcdef\"]", "repeats"),
        ] {
            let err = load(Some(&format!("[admin]\napi_keys = {keys}\n")), &[], &o).unwrap_err().to_string();
            assert!(err.contains(why), "{keys}: {err}");
            assert!(!err.contains("short-secret") && !err.contains("0123456789abcdef"), "echoed: {err}");
        }
    }

    #[test]
    fn hooks_are_on_only_with_an_endpoint() {
        let o = Overrides::default();
        let c = load(None, &[], &o).unwrap();
        assert_eq!(c.core().hooks, kefu_core::config::HookPolicy::default(), "off by default");
        let c = load(Some("[hooks]\non_message = true\non_connect = true\n"), &[], &o).unwrap();
        let policy = c.core().hooks;
        assert!(!policy.on_message && !policy.on_connect, "no endpoint, no hooks");
        let file =
            "[hooks]\nendpoint = \"http://127.0.0.1:50051\"\non_message = true\nfailure = \"closed\"\n";
        let c = load(Some(file), &[("KEFU_HOOKS_TIMEOUT_MS", "250")], &o).unwrap();
        let policy = c.core().hooks;
        assert!(policy.on_message && !policy.on_connect);
        assert_eq!(policy.failure, kefu_core::config::HookFailure::Closed);
        assert_eq!(c.hooks.timeout_ms, 250);
        let env = [("KEFU_HOOKS_ENDPOINT", "http://hooks.internal:7000"), ("KEFU_HOOKS_ON_CONNECT", "yes")];
        assert!(load(None, &env, &o).unwrap().core().hooks.on_connect);
    }

    #[test]
    fn bad_hooks_are_refused_with_the_key_named() {
        let o = Overrides::default();
        for (file, why) in [
            ("[hooks]\nendpoint = \"127.0.0.1:50051\"\n", "hooks.endpoint"),
            ("[hooks]\nendpoint = \"https://hooks.example:443\"\n", "https is not supported"),
            ("[hooks]\nendpoint = \"grpc://x:1\"\n", "expected http://host:port"),
            ("[hooks]\nendpoint = \"http:// x\"\n", "hooks.endpoint"),
            ("[hooks]\ntimeout_ms = 0\n", "hooks.timeout_ms"),
            ("[hooks]\ntimeout_ms = 600000\n", "hooks.timeout_ms"),
            ("[hooks]\nconcurrent_calls_max = 0\n", "hooks.concurrent_calls_max"),
            ("[hooks]\nqueued_calls_max = 10000000\n", "hooks.queued_calls_max"),
            ("[hooks]\nresponse_bytes_max = 10\n", "hooks.response_bytes_max"),
            ("[hooks]\nreplies_max = 1000\n", "hooks.replies_max"),
            ("[hooks]\nfailure = \"ajar\"\n", "ajar"),
            ("[hooks]\nendpont = \"http://x:1\"\n", "hooks.endpont"),
        ] {
            let err = load(Some(file), &[], &o).unwrap_err().to_string();
            assert!(err.contains(why), "{file}: {err}");
        }
    }

    #[test]
    fn admin_limits_are_validated() {
        let o = Overrides::default();
        for file in [
            "[admin]\nmax_concurrent_requests = 0\n",
            "[admin]\nmax_request_bytes = 10\n",
            "[admin]\nlist_page_size_default = 0\n",
            "[admin]\nlist_page_size_default = 600\n",
            "[admin]\nlist_scan_max = 0\n",
            "[admin]\ntoken_ttl_s_default = 0\n",
            "[admin]\ntoken_ttl_s_max = 10\n",
            "[admin]\nshard_stall_ms = 100\n",
            "[admin]\nsubscribers_max = 0\n",
            "[admin]\nsubscribe_buffer_events = 0\n",
            "[admin]\nevents_page_size_default = 0\n",
            "[admin]\nevents_page_size_default = 2000\n",
            "[admin]\napi_key = []\n",
        ] {
            assert!(load(Some(file), &[], &o).is_err(), "accepted: {file}");
        }
    }
}
