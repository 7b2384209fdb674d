//! Starting and stopping the gateway process: the data directory, the
//! shards, signals and the drain.
//!
//! The main thread does no I/O of its own: it starts one thread per shard,
//! waits until every shard listens (or one fails, which fails the start),
//! then waits for SIGTERM/SIGINT. On a signal it raises the stop flag; each
//! shard notices within one sweep, stops accepting and reading commands,
//! waits until every shard has answered the commands it read (their
//! commits done, up to half of `server.shutdown_timeout_ms`), asks every
//! connection to close (1001; 4000 on `/ws`) and returns once they are gone
//! or the drain time has passed. The last shard to drop its chat service
//! closes the store: every write submitted completes, and the next start
//! finds it closed cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kefu_core::per_ip::{PerIpLimiter, PerIpRate};
use kefu_core::ratelimit::MS_PER_MIN;
use tracing::{info, warn};

use crate::chat::ShardMsg;
use crate::chat::api::{Calls, ChatApi, HookSink};
use crate::chat::service::{ChatInit, restore_open};
use crate::config::Config;
use crate::mailbox::Mailbox;
use crate::metrics::ShardStats;
use crate::shard::{self, ShardInit};

/// A running gateway, as seen by the caller of [`start`].
pub struct Running {
    /// Where clients connect (the first shard's bound address).
    pub addr: SocketAddr,
    /// Where the bridge serves gRPC, REST, `/healthz`, `/readyz` and `/metrics`.
    pub admin_addr: SocketAddr,
    /// The chat service as business systems call it.
    pub api: ChatApi,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    bridge: std::thread::JoinHandle<()>,
    shutdown_timeout: Duration,
}

impl Running {
    /// The flag that stops the gateway (what the signal handler sets).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Blocks until the stop flag is raised, then drains and joins the shards.
    pub fn wait(self) -> anyhow::Result<()> {
        while !self.stop.load(Ordering::Relaxed) {
            if self.threads.iter().any(|t| t.is_finished()) {
                self.stop.store(true, Ordering::Relaxed);
                bail!("a shard stopped unexpectedly");
            }
            if self.bridge.is_finished() {
                self.stop.store(true, Ordering::Relaxed);
                bail!("the bridge stopped unexpectedly");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        info!("stop requested: draining connections");
        let deadline = Instant::now() + self.shutdown_timeout + Duration::from_secs(1);
        for t in self.threads.into_iter().chain([self.bridge]) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!(thread = t.thread().name().unwrap_or("?"), "a thread did not stop in time");
            }
        }
        info!("stopped");
        Ok(())
    }
}

/// Keeps the kernel from backing this process's memory with transparent
/// huge pages unless `server.transparent_huge_pages` allows them; allowed,
/// it is left to the system's mode and to what the parent process set
/// (the flag is inherited, so a service manager's choice stands).
/// Process-wide: it holds for every thread and every later page fault, not
/// for pages already in. Called before the shards and the store allocate,
/// so that what grows with sessions and the page cache follows it. A
/// kernel that refuses is logged, not fatal: the gateway serves as before,
/// with more memory.
pub fn allow_huge_pages(allowed: bool) {
    if allowed {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE takes one integer argument and the rest zero.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot keep transparent huge pages off (server.transparent_huge_pages = false)");
    } else {
        info!("transparent huge pages off for the process (server.transparent_huge_pages = false)");
    }
}

/// Prepares the data directory and starts every shard; returns once all
/// listen.
pub fn start(config: Config) -> anyhow::Result<Running> {
    shard::probe_driver(&config).map_err(anyhow::Error::msg)?;
    allow_huge_pages(config.server.transparent_huge_pages);
    let admin_listener = crate::bridge::bind(&config.server.admin_listen)?;
    let shards = config.shard_count();
    let classes = config.slab.classes.len();
    let stats: Arc<[ShardStats]> = (0..shards).map(|_| ShardStats::new(classes)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let config = Arc::new(config);
    let mailboxes: Arc<[Mailbox<ShardMsg>]> = (0..shards)
        .map(|_| Mailbox::new(config.server.mailbox_capacity, shards + 1))
        .collect::<Result<Vec<_>, _>>()
        .context("creating shard mailboxes")?
        .into();
    let (secret, _) = crate::secret::load_or_create(&config.auth.jwt_secret, &config.storage.dir)
        .with_context(|| format!("preparing the data directory {}", config.storage.dir.display()))?;
    // Each shard submits as its own storage source and is woken for its
    // own completions; the bridge is the source after them.
    let chat_mailboxes = mailboxes.clone();
    let bridge_wake = Arc::new(tokio::sync::Notify::new());
    let wake = bridge_wake.clone();
    let notify: kefu_storage::Notify = Arc::new(move |source| match chat_mailboxes.get(source) {
        Some(mailbox) => mailbox.wake(),
        None => wake.notify_one(),
    });
    let mut store_config = config.storage.clone();
    store_config.sources = shards + 1;
    let opened = Instant::now();
    let (store, recovery) = kefu_storage::Store::open(store_config, notify).context("opening the store")?;
    info!(
        elapsed_ms = opened.elapsed().as_millis() as u64,
        records = recovery.next_offset,
        open_conversations = recovery.open_conversations.len(),
        unclean_shutdown = recovery.unclean_shutdown,
        "store open"
    );
    // Set before any shard runs, so no commit goes unseen by the event
    // stream's live tail.
    let (log_end_tx, log_end) = tokio::sync::watch::channel(recovery.next_offset);
    store
        .on_log_end(Box::new(move |end| {
            log_end_tx.send_replace(end);
        }))
        .map_err(|_| anyhow::anyhow!("the store's log-end hook was already set"))?;
    let commit_stats = Arc::new(crate::metrics::CommitStats::default());
    let recorder = commit_stats.clone();
    store
        .on_commit(Box::new(move |t| recorder.record(t)))
        .map_err(|_| anyhow::anyhow!("the store's commit hook was already set"))?;
    let bridge_writes = Arc::new(crate::bridge::writes::BridgeWrites::new(
        store.writer(),
        store.completions(shards),
        bridge_wake,
    ));
    let store_stats = store.stats_source();
    let reader = store.reader();
    let store = Arc::new(store);
    let core = Arc::new(config.core());
    let (allow_anonymous, heartbeat_s) = (config.auth.allow_anonymous, config.server.heartbeat_s as u32);
    let held_frames_max = (config.limits.outbound_queue_frames / 2).max(1);
    let backlog_max = config.server.backlog_messages_max;
    let calls = Arc::new(Calls::new(config.server.api_calls_max));
    let replay_bytes_max = (config.limits.outbound_queue_bytes / 2).max(1);
    let mut restores =
        restore_open(&store.reader(), recovery.open_conversations, recovery.next_conv_id, &core, shards)
            .context("restoring the open conversations")?;
    // The bridge's runtime comes first: the hook client the shards are
    // given runs on it.
    let bridge_runtime = crate::bridge::runtime()?;
    let hook_stats = Arc::new(crate::bridge::hooks::HookStats::default());
    let hooks = hook_client(&config, bridge_runtime.handle(), &mailboxes, &hook_stats)?;
    let per_ip = |rate: u32, burst: u32, period_ms| {
        let entries_max = config.limits.tracked_ips_max;
        let rate = PerIpRate { rate: rate.into(), burst: burst.into(), period_ms, entries_max };
        Arc::new(PerIpLimiter::new(rate))
    };
    // One table of each for all shards: see kefu_core::per_ip for why shared.
    let l = &config.limits;
    let handshakes = per_ip(l.new_connections_per_s_per_ip, l.new_connections_burst_per_ip, 1000);
    let anonymous = per_ip(l.anonymous_per_min_per_ip, l.anonymous_per_min_per_ip, MS_PER_MIN);
    let per_min = l.attachment_bytes_per_min;
    let budgets = PerIpRate {
        rate: per_min,
        burst: per_min,
        period_ms: MS_PER_MIN,
        entries_max: l.tracked_senders_max,
    };
    let attachment_budgets = Arc::new(PerIpLimiter::new(budgets));
    let mut chat = |shard: usize| ChatInit {
        shard,
        mailboxes: mailboxes.clone(),
        core: core.clone(),
        jwt_secret: secret.clone(),
        allow_anonymous,
        heartbeat_s,
        store: store.clone(),
        held_frames_max,
        replay_bytes_max,
        restore: std::mem::take(&mut restores[shard]),
        stats: stats.clone(),
        backlog_max,
        calls: calls.clone(),
        hooks: hooks.clone(),
        anonymous_per_ip: Some(anonymous.clone()),
        attachment_budgets: Some(attachment_budgets.clone()),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::with_capacity(shards);
    let mut addr = None;
    let mut config = config;
    for id in 0..shards {
        let init = ShardInit {
            id,
            config: config.clone(),
            stop: stop.clone(),
            stats: stats.clone(),
            ready: ready_tx.clone(),
            mailboxes: mailboxes.clone(),
            handshakes: handshakes.clone(),
            chat: chat(id),
        };
        let t = std::thread::Builder::new()
            .name(format!("kefu-shard-{id}"))
            .spawn(move || shard::run(init))
            .context("spawning a shard thread")?;
        threads.push(t);
        // Shards start one after another: the first one's bound address is
        // what the others share, so `listen = "…:0"` gives one port to all.
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(r)) => {
                if addr.is_none() {
                    addr = Some(r.addr);
                    let mut c = (*config).clone();
                    c.server.listen = r.addr.to_string();
                    config = Arc::new(c);
                }
            }
            Ok(Err(why)) => {
                stop.store(true, Ordering::Relaxed);
                bail!(why);
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                bail!("shard {id} did not start within 10 s");
            }
        }
    }
    drop(ready_tx);
    let Some(addr) = addr else {
        bail!("no shard reported its listener");
    };
    let jwt = kefu_core::auth::JwtKey::new(secret.as_bytes(), core.auth.clone())
        .map_err(|e| anyhow::anyhow!("auth.jwt_secret: {e}"))?;
    let links = config.console.print_link.then(|| console_links(&config.console, addr, &jwt));
    let bridge = crate::bridge::BridgeInit {
        listener: admin_listener,
        ops: crate::bridge::ops::Ops {
            stats: stats.clone(),
            mailboxes: mailboxes.clone(),
            store: store_stats,
            driver: match config.server.io {
                crate::config::IoDriver::Uring => "io_uring",
                crate::config::IoDriver::Epoll => "epoll",
            },
            stop: stop.clone(),
            shard_stall_ms: config.admin.shard_stall_ms,
            bridge: Default::default(),
            hooks: hook_stats,
            commits: commit_stats,
            per_ip: crate::metrics::PerIpTables([
                ("new_connections_per_s_per_ip", handshakes),
                ("anonymous_per_min_per_ip", anonymous),
            ]),
        },
        calls: crate::bridge::calls::Calls::new(
            reader,
            jwt,
            crate::bridge::calls::CallLimits::new(&config.admin, &config.messages),
            ChatApi::new(core.clone(), mailboxes.clone(), calls.clone()),
        ),
        events: crate::bridge::events::EventsInit {
            reader: store.reader(),
            writes: bridge_writes,
            log_end,
            limits: crate::bridge::events::EventLimits::new(&config.admin),
        },
        api_keys: crate::bridge::auth::ApiKeys::new(&config.admin.api_keys),
        max_concurrent_requests: config.admin.max_concurrent_requests,
        max_request_bytes: config.admin.max_request_bytes,
    };
    let (admin_addr, bridge) = match crate::bridge::start(bridge, bridge_runtime) {
        Ok(started) => started,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
    };
    if config.admin.api_keys.is_empty() {
        warn!("admin.api_keys is empty: every gRPC and /api/v1 call is refused");
    }
    info!(%addr, admin = %admin_addr, shards, echo = config.diagnostics.echo, "kefu listening");
    if let Some((console, demo)) = links {
        info!(agent = %config.console.default_agent_id, "agent console: {console}");
        info!("demo shop with the visitor widget: {demo}");
    }
    Ok(Running {
        addr,
        admin_addr,
        api: ChatApi::new(core, mailboxes, calls),
        stop,
        threads,
        bridge,
        shutdown_timeout: Duration::from_millis(config.server.shutdown_timeout_ms),
    })
}

/// The console link for `[console]`'s default agent (its token in the
/// fragment, so it never reaches a server log) and the demo page's link, on
/// the client listener's address (loopback when it listens on every
/// address, since that is where a browser on this host finds it).
pub fn console_links(
    console: &crate::config::ConsoleConfig,
    addr: SocketAddr,
    jwt: &kefu_core::auth::JwtKey,
) -> (String, String) {
    let mut shown = addr;
    if addr.ip().is_unspecified() {
        shown.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let claims = kefu_core::auth::Claims {
        sub: console.default_agent_id.clone(),
        role: kefu_proto::Role::Agent,
        name: Some(console.default_agent_name.clone()),
        groups: console.default_agent_groups.clone(),
        meta: Default::default(),
        exp: now_s + console.link_ttl_s,
        nbf: None,
    };
    (format!("http://{shown}/console#token={}", jwt.sign(&claims)), format!("http://{shown}/demo"))
}

/// The hook client the shards call, if `hooks.endpoint` is set; says at
/// start what is configured (and warns of a hook switched on without an
/// endpoint, which calls nothing).
fn hook_client(
    config: &Config,
    runtime: &tokio::runtime::Handle,
    mailboxes: &Arc<[Mailbox<ShardMsg>]>,
    stats: &Arc<crate::bridge::hooks::HookStats>,
) -> anyhow::Result<Option<Arc<dyn HookSink>>> {
    let h = &config.hooks;
    if h.endpoint.is_empty() {
        if h.on_connect || h.on_message {
            warn!(
                "hooks.on_connect or hooks.on_message is set but hooks.endpoint is empty: no hook is called"
            );
        }
        return Ok(None);
    }
    if !h.on_connect && !h.on_message {
        warn!(endpoint = %h.endpoint, "hooks.endpoint is set but neither hooks.on_connect nor hooks.on_message: no hook is called");
        return Ok(None);
    }
    let limits = crate::bridge::hooks::HookLimits::new(h, &config.messages);
    let client = crate::bridge::hooks::HookClient::new(
        &h.endpoint,
        limits,
        runtime.clone(),
        mailboxes.clone(),
        stats.clone(),
    )?;
    info!(
        endpoint = %h.endpoint,
        on_connect = h.on_connect,
        on_message = h.on_message,
        timeout_ms = h.timeout_ms,
        failure = ?h.failure,
        "hooks: calling the business system"
    );
    Ok(Some(Arc::new(client)))
}
