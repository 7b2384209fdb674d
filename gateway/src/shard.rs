//! A shard: one thread, one monoio runtime, one core.
//!
//! Each shard accepts on its own `SO_REUSEPORT` listener, so the kernel
//! spreads connections across shards and a connection lives and dies on the
//! shard that accepted it. A shard owns its connections, its slab of message
//! buffers and its registry; nothing here is shared with another thread but
//! the stop flag and the metrics counters (atomics).
//!
//! Time is coarse on purpose: one sweep per shard ticks every
//! [`SWEEP_INTERVAL`], refreshes the shard clock, sends heartbeat pings,
//! closes silent peers, enforces close timeouts and takes back the storage
//! of drained outbound queues. No connection owns a timer or a write
//! buffer while it is idle, so an idle connection costs its task and its
//! entry here and nothing else.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use monoio::net::{ListenerOpts, TcpListener};
use tracing::{debug, error, info, warn};

use kefu_core::per_ip::PerIpLimiter;
use kefu_proto::client::{Codec, ServerFrame, SpareStrings};

use crate::batch::BatchPool;
use crate::chat::frames::{FrameEncoder, SharedFrame};
use crate::chat::service::{ChatInit, ChatService, Local};
use crate::chat::{SessionAddr, ShardMsg};
use crate::client_ip::TrustedProxies;
use crate::config::{Config, IoDriver, SocketIo, UringAccept, UringPoll, UringTaskrun};
use crate::conn::{self, Conn};
use crate::mailbox::{Mailbox, Waiter};
use crate::metrics::ShardStats;
use crate::slab::Slab;
use crate::ws::close;

/// How often the sweep runs: the resolution of heartbeats, idle timeouts and
/// the reaction time to a stop signal.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// What every shard thread is given at start.
pub struct ShardInit {
    /// Shard number, 0-based.
    pub id: usize,
    /// The whole configuration.
    pub config: Arc<Config>,
    /// Set by the signal handler; the shard drains and returns.
    pub stop: Arc<AtomicBool>,
    /// All shards' counters (this shard writes `stats[id]`).
    pub stats: Arc<[ShardStats]>,
    /// Where the shard reports that it is listening (or why it is not).
    pub ready: std::sync::mpsc::Sender<Result<ShardReady, String>>,
    /// Every shard's inbox (this shard reads `mailboxes[id]`).
    pub mailboxes: Arc<[Mailbox<ShardMsg>]>,
    /// `limits.new_connections_per_s_per_ip`: one table all shards share.
    pub handshakes: Arc<PerIpLimiter>,
    /// What this shard's chat service starts from.
    pub chat: ChatInit,
}

/// What a shard reports once it listens.
#[derive(Debug)]
pub struct ShardReady {
    /// Shard number.
    pub id: usize,
    /// The client listener's bound address.
    pub addr: SocketAddr,
}

/// The numbers a connection needs, copied out of the config once.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Largest request head.
    pub max_head_bytes: usize,
    /// Size of the buffers sockets are read into.
    pub read_buffer_bytes: usize,
    /// Frame and message size limits for the decoder.
    pub max_frame_bytes: u64,
    /// Largest reassembled message.
    pub max_message_bytes: u64,
    /// Outbound queue bound in frames.
    pub outbound_queue_frames: usize,
    /// Outbound queue bound in bytes.
    pub outbound_queue_bytes: usize,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Close handshake deadline.
    pub close_timeout_ms: u64,
    /// Ping interval.
    pub heartbeat_ms: u64,
    /// Whether `/ws/echo` is served.
    pub echo: bool,
    /// How long a message or frame header may stay incomplete.
    pub partial_message_timeout_ms: u64,
    /// How long a connection waits for a slab buffer before it is closed.
    pub buffer_wait_timeout: Duration,
    /// Largest message before `connect` (never above `max_message_bytes`).
    pub unauthenticated_message_bytes_max: u64,
    /// Message buffer bytes all of a shard's connections before `connect`
    /// may hold together.
    pub unauthenticated_buffer_bytes_max: usize,
    /// `server.allowed_origins`: pages that may open `/ws` besides the
    /// gateway's own.
    pub allowed_origins: Vec<String>,
    /// `server.trusted_proxies`: peers whose `X-Forwarded-For` names the
    /// client.
    pub trusted_proxies: TrustedProxies,
    /// `server.proxy_protocol`: a trusted proxy's connections start with a
    /// PROXY protocol header.
    pub proxy_protocol: bool,
    /// `server.socket_io = "syscall"`: once the ring reports a socket
    /// ready, its bytes move by non-blocking system calls.
    pub socket_syscalls: bool,
    /// `server.uring_poll = "multishot"`, where it applies (the io_uring
    /// driver, `socket_io = "syscall"`): one poll per connection for input.
    pub multishot_poll: bool,
}

impl ConnLimits {
    fn from_config(c: &Config) -> Self {
        Self {
            max_head_bytes: c.limits.max_head_bytes,
            read_buffer_bytes: c.limits.read_buffer_bytes,
            max_frame_bytes: c.limits.max_frame_bytes,
            max_message_bytes: c.limits.max_message_bytes,
            outbound_queue_frames: c.limits.outbound_queue_frames,
            outbound_queue_bytes: c.limits.outbound_queue_bytes,
            handshake_timeout: Duration::from_millis(c.server.handshake_timeout_ms),
            close_timeout_ms: c.server.close_timeout_ms,
            heartbeat_ms: c.server.heartbeat_s * 1000,
            echo: c.diagnostics.echo,
            partial_message_timeout_ms: c.limits.partial_message_timeout_ms,
            buffer_wait_timeout: Duration::from_millis(c.limits.buffer_wait_timeout_ms),
            unauthenticated_message_bytes_max: c
                .limits
                .unauthenticated_message_bytes_max
                .min(c.limits.max_message_bytes),
            unauthenticated_buffer_bytes_max: c.limits.unauthenticated_buffer_bytes_max,
            allowed_origins: c.server.allowed_origins.clone(),
            // Validated with the config; a bad entry cannot reach here.
            trusted_proxies: TrustedProxies::parse(&c.server.trusted_proxies).unwrap_or_default(),
            proxy_protocol: c.server.proxy_protocol,
            socket_syscalls: c.server.socket_io == SocketIo::Syscall,
            multishot_poll: multishot_poll(c),
        }
    }
}

/// Whether `server.uring_poll = "multishot"` applies: it needs the ring,
/// and reads by system call until the socket is empty.
fn multishot_poll(c: &Config) -> bool {
    c.server.io == IoDriver::Uring
        && c.server.socket_io == SocketIo::Syscall
        && c.server.uring_poll == UringPoll::Multishot
}

/// Whether `server.uring_accept = "multishot"` applies: it needs the ring.
fn multishot_accept(c: &Config) -> bool {
    c.server.io == IoDriver::Uring && c.server.uring_accept == UringAccept::Multishot
}

/// The state one shard's tasks share (all on the shard's own thread).
pub struct Shard {
    /// Shard number.
    pub id: usize,
    /// The connection limits.
    pub limits: ConnLimits,
    /// The shard's message buffers.
    pub slab: Slab,
    /// Counters for `/metrics`.
    pub stats: Arc<[ShardStats]>,
    /// Milliseconds since the shard started, refreshed by the sweep.
    now_ms: Cell<u64>,
    /// Live connections, for the sweep and for draining.
    registry: RefCell<Registry>,
    /// Set once the shard is draining.
    stopping: Cell<bool>,
    /// Set once a drain closes the connections (after every shard's
    /// commands in flight were answered, or half the drain time passed).
    closing: Cell<bool>,
    max_connections: usize,
    /// Every shard's inbox.
    pub mailboxes: Arc<[Mailbox<ShardMsg>]>,
    /// Encoder (and frame buffers) for frames this shard answers itself.
    encoder: RefCell<FrameEncoder>,
    /// String buffers for decoding `send`s, handed back by the homes of the
    /// conversations they were sent to.
    pub strings: RefCell<SpareStrings>,
    /// Spare write batches for connections flushing several frames.
    pub batches: BatchPool,
    /// This shard's chat service, set once at start. Its connections and
    /// its inbox loop call it directly ([`Shard::chat`]); nothing the shard
    /// does for itself goes through its own inbox.
    chat: RefCell<Option<ChatService>>,
    /// Capacity of the message buffers held by this shard's connections
    /// that have not sent `connect`, against
    /// `limits.unauthenticated_buffer_bytes_max`.
    pub unauthenticated_bytes: Cell<usize>,
    /// Until when (wall-clock ms) the inbox loop sleeps if nothing wakes
    /// it; `u64::MAX` for no timer. A direct call that leaves the service
    /// wanting time sooner (a deadline, a backlog to retry) wakes it.
    inbox_sleeps_until_ms: Cell<u64>,
    /// `limits.new_connections_per_s_per_ip`, shared with every shard.
    pub handshakes: Arc<PerIpLimiter>,
}

impl Shard {
    /// A shard's state, before it accepts anything.
    pub fn new(
        id: usize,
        config: &Config,
        slab: Slab,
        stats: Arc<[ShardStats]>,
        mailboxes: Arc<[Mailbox<ShardMsg>]>,
        handshakes: Arc<PerIpLimiter>,
    ) -> Self {
        Self {
            id,
            limits: ConnLimits::from_config(config),
            slab,
            stats,
            now_ms: Cell::new(0),
            registry: RefCell::new(Registry::default()),
            stopping: Cell::new(false),
            closing: Cell::new(false),
            max_connections: config.server.max_connections_per_shard,
            mailboxes,
            encoder: RefCell::new(FrameEncoder::new()),
            strings: RefCell::new(SpareStrings::new()),
            batches: BatchPool::default(),
            chat: RefCell::new(None),
            unauthenticated_bytes: Cell::new(0),
            inbox_sleeps_until_ms: Cell::new(u64::MAX),
            handshakes,
        }
    }

    /// Runs `f` on this shard's chat service, then writes what it produced
    /// for this shard's own connections. (Single-threaded, and nothing here
    /// awaits or calls back into the service, so the borrow never collides.)
    pub fn chat<R>(&self, f: impl FnOnce(&mut ChatService) -> R) -> Option<R> {
        let mut chat = self.chat.borrow_mut();
        let service = chat.as_mut()?;
        let out = f(service);
        flush_local(self, service);
        if service.wants_time_ms().is_some_and(|t| t < self.inbox_sleeps_until_ms.get()) {
            self.mailboxes[self.id].wake();
        }
        Some(out)
    }

    /// Encodes a frame this shard answers itself (pong, decode errors).
    pub fn encode(&self, codec: Codec, frame: &ServerFrame) -> SharedFrame {
        self.encoder.borrow_mut().encode(codec, frame)
    }

    /// This shard's counters.
    pub fn stats(&self) -> &ShardStats {
        &self.stats[self.id]
    }

    /// The coarse shard clock (ms since start), good to one sweep interval.
    pub fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    /// Whether the shard is draining for shutdown.
    pub fn stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Registers a connection; `None` if the shard is full.
    pub fn register(&self, conn: Rc<Conn>) -> Option<SessionAddr> {
        let mut r = self.registry.borrow_mut();
        if r.live >= self.max_connections {
            return None;
        }
        r.live += 1;
        let slot = match r.free.pop() {
            Some(slot) => {
                r.slots[slot] = Some(conn);
                slot
            }
            None => {
                r.slots.push(Some(conn));
                r.generations.push(0);
                r.slots.len() - 1
            }
        };
        r.generations[slot] = r.generations[slot].wrapping_add(1);
        let addr = SessionAddr { shard: self.id as u16, slot: slot as u32, generation: r.generations[slot] };
        self.stats().connections.store(r.live as u64, Ordering::Relaxed);
        Some(addr)
    }

    /// The live connection at `addr`, if it is still the one addressed.
    pub fn lookup(&self, addr: SessionAddr) -> Option<Rc<Conn>> {
        let r = self.registry.borrow();
        let slot = addr.slot as usize;
        if r.generations.get(slot) != Some(&addr.generation) {
            return None;
        }
        r.slots.get(slot)?.clone()
    }

    /// Forgets a connection registered at `addr`.
    pub fn unregister(&self, addr: SessionAddr) {
        let slot = addr.slot as usize;
        let mut r = self.registry.borrow_mut();
        if r.slots.get_mut(slot).and_then(Option::take).is_some() {
            r.free.push(slot);
            r.live -= 1;
        }
        self.stats().connections.store(r.live as u64, Ordering::Relaxed);
    }

    fn live(&self) -> usize {
        self.registry.borrow().live
    }

    /// One pass over every connection: heartbeats, idle, close and
    /// incomplete-message timeouts.
    fn sweep(&self) {
        let now = self.now_ms();
        let hb = self.limits.heartbeat_ms;
        let registry = self.registry.borrow();
        for conn in registry.slots.iter().flatten() {
            if let Some(since) = conn.closing_since_ms() {
                if now.saturating_sub(since) >= self.limits.close_timeout_ms {
                    conn.force_shutdown();
                }
                continue;
            }
            if self.stopping() {
                if self.closing.get() {
                    conn.request_close(close::GOING_AWAY, "server shutting down", now);
                } else {
                    conn.stop_reading();
                }
                continue;
            }
            // Before the upgrade there is no WebSocket to ping; the handshake
            // has its own deadline (server.handshake_timeout_ms).
            if !conn.is_upgraded() {
                continue;
            }
            if conn
                .partial_since_ms()
                .is_some_and(|t| now.saturating_sub(t) >= self.limits.partial_message_timeout_ms)
            {
                ShardStats::inc(&self.stats().partial_message_timeouts);
                conn.request_close(close::POLICY, "message incomplete for too long", now);
                continue;
            }
            conn.release_idle_queue();
            let silent = now.saturating_sub(conn.last_rx_ms());
            if silent >= 2 * hb {
                ShardStats::inc(&self.stats().heartbeat_closes);
                conn.request_close(close::GOING_AWAY, "heartbeat timeout", now);
            } else if silent >= hb && now.saturating_sub(conn.last_ping_ms()) >= hb {
                conn.send_ping(now);
            }
        }
    }
}

#[derive(Default)]
struct Registry {
    slots: Vec<Option<Rc<Conn>>>,
    generations: Vec<u32>,
    free: Vec<usize>,
    live: usize,
}

/// Runs shard `init.id` on the calling thread until the stop flag is set and
/// its connections are drained. Reports readiness (or the failure to start)
/// on `init.ready` first.
pub fn run(init: ShardInit) {
    let config = init.config.clone();
    let id = init.id;
    let ready = init.ready.clone();
    let core = pin(&config, id);
    ask_for_slice(config.server.shard_slice_us, id);
    let entries = config.server.uring_entries;
    let taskrun = config.server.uring_taskrun;
    let socket_io = config.server.socket_io;
    let failed = match config.server.io {
        IoDriver::Uring => {
            match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .uring_builder(ring_setup(taskrun))
                .with_entries(entries)
                .enable_timer()
                .build()
            {
                Ok(mut rt) => {
                    let poll = if multishot_poll(&config) { "multishot" } else { "oneshot" };
                    let accept = if multishot_accept(&config) { "multishot" } else { "oneshot" };
                    info!(shard = id, driver = "io_uring", entries, ?taskrun, ?socket_io, poll, accept, core = ?core, "shard starting");
                    rt.block_on(serve(init));
                    None
                }
                Err(e) => Some(e),
            }
        }
        IoDriver::Epoll => match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build()
        {
            Ok(mut rt) => {
                warn!(shard = id, driver = "epoll", ?socket_io, core = ?core, "shard starting on epoll (server.io = \"epoll\")");
                rt.block_on(serve(init));
                None
            }
            Err(e) => Some(e),
        },
    };
    if let Some(e) = failed {
        let _ = ready.send(Err(format!("shard {id}: cannot build the io runtime: {e}")));
    }
}

/// Builds the runtime (or fails) before anything else, so a refused io_uring
/// is reported as a start failure rather than a silent fallback.
pub fn probe_driver(config: &Config) -> Result<(), String> {
    match config.server.io {
        IoDriver::Uring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(ring_setup(config.server.uring_taskrun))
            .with_entries(config.server.uring_entries)
            .build()
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "io_uring with server.uring_taskrun = {:?} is unavailable ({e}); set server.uring_taskrun = \"default\" for an older kernel, or server.io = \"epoll\" (KEFU_SERVER_IO=epoll) to run on epoll",
                    config.server.uring_taskrun
                )
            }),
        IoDriver::Epoll => Ok(()),
    }
}

/// The ring flags for `server.uring_taskrun`. SINGLE_ISSUER holds: only
/// the shard's own thread submits to its ring (other threads reach the
/// shard through its mailbox's eventfd).
fn ring_setup(taskrun: UringTaskrun) -> io_uring::Builder {
    let mut ring = io_uring::IoUring::builder();
    match taskrun {
        UringTaskrun::Defer => {
            ring.setup_single_issuer().setup_defer_taskrun();
        }
        UringTaskrun::Coop => {
            ring.setup_coop_taskrun().setup_taskrun_flag();
        }
        UringTaskrun::Default => {}
    }
    ring
}

fn pin(config: &Config, id: usize) -> Option<usize> {
    if !config.server.pin_cores {
        return None;
    }
    // Shard N takes the N-th CPU the process may run on, so that `taskset`
    // or a cgroup cpuset given to kefu is respected rather than overridden.
    let allowed = allowed_cpus();
    let core = *allowed.get(id % allowed.len().max(1))?;
    match monoio::utils::bind_to_cpu_set([core]) {
        Ok(()) => Some(core),
        Err(e) => {
            warn!(shard = id, core, error = ?e, "cannot pin shard to core");
            None
        }
    }
}

/// `struct sched_attr` of `sched_setattr(2)` (libc does not declare it).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks the fair scheduler for a `slice_us` time slice for the calling
/// thread (`server.shard_slice_us`), keeping its policy, nice value and
/// reset-on-fork flag, and says whether the kernel took it. Not fatal: a
/// kernel that refuses or ignores it (before Linux 6.12, which reports a
/// fair thread's slice back) runs the shard with its default. Threads the
/// shard starts afterwards (io_uring's workers) inherit the slice.
fn ask_for_slice(slice_us: u64, id: usize) {
    if slice_us == 0 {
        return;
    }
    let Some(mut attr) = sched_attr() else {
        warn!(shard = id, error = %std::io::Error::last_os_error(), "cannot read the shard's scheduling; server.shard_slice_us not applied");
        return;
    };
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        info!(
            shard = id,
            policy = attr.policy,
            "the shard's policy is not SCHED_OTHER or SCHED_BATCH; server.shard_slice_us not applied"
        );
        return;
    }
    // The kernel refuses an unprivileged clear of reset-on-fork.
    attr.flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.runtime = slice_us * 1000;
    // SAFETY: pid 0 is this thread; `attr` is a valid `struct sched_attr`
    // whose `size` field is its own size.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        warn!(shard = id, slice_us, error = %std::io::Error::last_os_error(), "the kernel refused the shard's slice; server.shard_slice_us not applied");
        return;
    }
    match sched_attr() {
        Some(now) if now.runtime == slice_us * 1000 => {
            info!(shard = id, slice_us, "shard scheduler slice set")
        }
        _ => warn!(
            shard = id,
            slice_us,
            "the kernel ignored the shard's slice (Linux 6.12 or later honours it); server.shard_slice_us not applied"
        ),
    }
}

/// `SCHED_FLAG_RESET_ON_FORK` of `sched_setattr(2)`.
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// The calling thread's `struct sched_attr`, `None` if the kernel will not
/// say (errno is set).
fn sched_attr() -> Option<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: pid 0 is this thread; the kernel writes at most `size` bytes
    // into `attr`, a plain-data struct laid out as `struct sched_attr`.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, size, 0) };
    // The kernel fills `size` with what it knows; we send ours back.
    attr.size = size;
    (rc == 0).then_some(attr)
}

/// The CPUs this process may run on, ascending.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data for which all-zero is a valid (empty)
    // set; sched_getaffinity writes at most size_of::<cpu_set_t>() bytes.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    }
    // SAFETY: CPU_ISSET reads within the set for every index below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect()
}

async fn serve(init: ShardInit) {
    let ShardInit { id, config, stop, stats, ready, mailboxes, handshakes, chat } = init;
    let slab = match Slab::new(&config.slab.classes) {
        Ok(slab) => slab,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: {e}")));
            return;
        }
    };
    let opts = ListenerOpts::new().reuse_port(true).reuse_addr(true).backlog(config.server.backlog);
    let listener = match TcpListener::bind_with_config(config.server.listen.as_str(), &opts) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: cannot listen on {}: {e}", config.server.listen)));
            return;
        }
    };
    let addr = listener.local_addr().ok();
    let shard = Rc::new(Shard::new(id, &config, slab, stats.clone(), mailboxes, handshakes));
    let waiter = match Waiter::new(&shard.mailboxes[id]) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {id}: cannot watch its mailbox: {e}")));
            return;
        }
    };
    let service = match ChatService::new(chat) {
        Ok(service) => service,
        Err(e) => {
            let _ = ready.send(Err(format!("chat service: {e:#}")));
            return;
        }
    };
    kefu_core::chat::frames::count_errors_into(shard.stats().errors.clone());
    // Up from here on, for `/readyz`; each sweep renews it.
    shard.stats().mark_swept();
    let _ = ready.send(match addr {
        Some(addr) => Ok(ShardReady { id, addr }),
        None => Err(format!("shard {id}: listener has no local address")),
    });
    drop(ready);

    *shard.chat.borrow_mut() = Some(service);
    monoio::spawn(inbox_loop(shard.clone(), waiter));
    let accept_stop = Rc::new(StopSignal::default());
    let acceptor =
        monoio::spawn(accept_loop(shard.clone(), listener, multishot_accept(&config), accept_stop.clone()));

    // The sweep doubles as the shard's clock and its watcher of the stop flag.
    let started = Instant::now();
    let mut drain_deadline: Option<u64> = None;
    // A drain first stops reading and lets every command read be answered
    // (on every shard: a send's home may be another one), until all shards
    // are quiet for two sweeps running or half the drain time is spent;
    // then it closes the connections.
    let mut quiet_sweeps = 0;
    loop {
        monoio::time::sleep(SWEEP_INTERVAL).await;
        shard.now_ms.set(started.elapsed().as_millis() as u64);
        if stop.load(Ordering::Relaxed) && !shard.stopping() {
            info!(shard = id, connections = shard.live(), "draining");
            shard.stopping.set(true);
            shard.stats().draining.store(true, Ordering::Relaxed);
            accept_stop.fire();
            drain_deadline = Some(shard.now_ms() + config.server.shutdown_timeout_ms);
        }
        if let Some(deadline) = drain_deadline
            && !shard.closing.get()
        {
            let quiet = shard.mailboxes[id].is_empty() && shard.chat(|chat| chat.is_quiet()).unwrap_or(true);
            shard.stats().quiet.store(quiet, Ordering::Relaxed);
            let all = stats.iter().all(|s| s.quiet.load(Ordering::Relaxed));
            quiet_sweeps = if all { quiet_sweeps + 1 } else { 0 };
            let halfway = deadline.saturating_sub(config.server.shutdown_timeout_ms / 2);
            if quiet_sweeps >= 2 || shard.now_ms() >= halfway {
                if quiet_sweeps < 2 {
                    warn!(
                        shard = id,
                        "drain: commands still in flight at half the drain time; closing anyway"
                    );
                }
                shard.closing.set(true);
            }
        }
        shard.sweep();
        shard.stats().publish_slab(&shard.slab.stats());
        shard.stats().mark_swept();
        if let Some(deadline) = drain_deadline {
            if shard.closing.get() && shard.live() == 0 {
                break;
            }
            if shard.now_ms() >= deadline {
                warn!(shard = id, left = shard.live(), "drain timed out; cutting the rest");
                break;
            }
        }
    }
    drop(acceptor);
    // The chat service holds the store: the last shard to drop its own
    // closes it (every write submitted completes, the writer stops, and the
    // clean shutdown is recorded for the next start).
    let service = shard.chat.borrow_mut().take();
    drop(service);
    debug!(shard = id, "stopped");
}

/// How soon messages held back by another shard's full inbox are retried
/// (and the shortest timed sleep).
const BACKLOG_RETRY_MS: u64 = 1;

/// Drains the shard's inbox for as long as the shard runs, sleeping on the
/// mailbox's eventfd when it is empty, or until the chat service's next
/// deadline (the router's offline grace periods): time is fed to it when
/// it asked, not on a period.
async fn inbox_loop(shard: Rc<Shard>, waiter: Waiter) {
    let inbox = &shard.mailboxes[shard.id];
    loop {
        // CPU time, not wall time: the storage writer may share this core
        // and preempt the shard mid-batch.
        let started = thread_cpu_ns();
        while let Some(msg) = inbox.try_recv() {
            shard.chat(|chat| chat.handle(msg));
        }
        // Awake from here on: direct calls need not wake the loop.
        shard.inbox_sleeps_until_ms.set(0);
        let waits = shard.chat(|chat| {
            chat.poll_completions();
            let deadline = chat.next_deadline_ms();
            if deadline.is_some_and(|d| d <= crate::chat::service::now_ms()) {
                chat.tick();
            }
            chat.retry_backlog();
            chat.wants_time_ms()
        });
        let Some(wants_time) = waits else { return };
        let cpu = thread_cpu_ns().saturating_sub(started);
        shard.stats().inbox_cpu_ns.fetch_add(cpu, std::sync::atomic::Ordering::Relaxed);
        if !inbox.prepare_park() {
            continue;
        }
        // Storage completions signal through the same eventfd, but only
        // while `parked` is set: one that landed after the drain above and
        // before `prepare_park` found nobody to wake. So look again now
        // that `parked` is set (any later one does wake us). Sampled
        // before `prepare_park`, this lost a completion, and with no
        // deadline to wake for, the shard slept until the next message.
        if shard.chat(|chat| chat.has_completions()).unwrap_or(false) {
            inbox.wake();
            continue;
        }
        let now = crate::chat::service::now_ms();
        let wait_ms = wants_time.map(|t| t.saturating_sub(now).max(BACKLOG_RETRY_MS));
        shard.inbox_sleeps_until_ms.set(wait_ms.map_or(u64::MAX, |ms| now + ms));
        let slept = match wait_ms {
            Some(ms) => monoio::time::timeout(Duration::from_millis(ms), waiter.sleep()).await.ok(),
            None => Some(waiter.sleep().await),
        };
        if let Some(Err(e)) = slept {
            warn!(shard = shard.id, error = %e, "mailbox wait failed");
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Writes what the chat service produced for this shard's own connections.
fn flush_local(shard: &Shard, service: &mut ChatService) {
    for out in service.take_local() {
        match out {
            Local::Deliver(to, bytes, spare) => {
                deliver(shard, to, bytes);
                give_back(shard, spare);
            }
            Local::Close(to, code, reason) => close(shard, to, code, reason),
            Local::Spare(spare) => give_back(shard, spare),
        }
    }
}

/// String buffers this shard's decoder filled, back from the message's home.
fn give_back(shard: &Shard, spare: [Option<String>; 2]) {
    if spare.iter().any(Option::is_some) {
        let mut strings = shard.strings.borrow_mut();
        spare.into_iter().flatten().for_each(|s| strings.give(s));
    }
}

fn deliver(shard: &Shard, to: SessionAddr, bytes: SharedFrame) {
    if let Some(conn) = shard.lookup(to) {
        shard.stats().frames_out.inc();
        let _ = conn.push(conn::Out::Shared(bytes, 0));
    }
}

fn close(shard: &Shard, to: SessionAddr, code: u16, reason: &'static str) {
    if let Some(conn) = shard.lookup(to) {
        conn.request_close(code, reason, shard.now_ms());
    }
}

/// This thread's CPU time in nanoseconds. `CLOCK_THREAD_CPUTIME_ID` is a
/// real syscall (no vDSO), so it is read per inbox batch, not per message.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if rc != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Accepts until the shard drains. Each connection gets its own task.
/// With `multishot`, one multishot accept serves the listener's life.
async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, multishot: bool, stop: Rc<StopSignal>) {
    // Holds the listener's descriptor too: the drop order does not matter.
    let mut accepts = None;
    if multishot {
        match listener.accept_multishot() {
            Ok(m) => accepts = Some(m),
            Err(e) => {
                error!(shard = shard.id, error = %e, "no multishot accept; this shard accepts one connection per submission (server.uring_accept = \"oneshot\")")
            }
        }
    }
    loop {
        let next = async {
            match &accepts {
                Some(accepts) => accepts.accept().await,
                None => listener.accept().await,
            }
        };
        let accepted = monoio::select! {
            biased;
            _ = stop.wait() => return,
            r = next => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                ShardStats::inc(&shard.stats().accepted);
                let _ = stream.set_nodelay(true);
                monoio::spawn(conn::serve(shard.clone(), stream, peer.ip()));
            }
            // A kernel without `IORING_ACCEPT_MULTISHOT` (before 5.19)
            // refuses it at its first completion: said once, loudly, and
            // accepted the other way from then on.
            Err(e) if accepts.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {
                error!(shard = shard.id, error = %e, "the kernel refused a multishot accept; this shard accepts one connection per submission (server.uring_accept = \"oneshot\")");
                accepts = None;
            }
            Err(e) => {
                // EMFILE and friends: say so and back off rather than spin.
                warn!(shard = shard.id, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A one-shot, single-waiter signal within a shard.
#[derive(Default)]
pub struct StopSignal {
    set: Cell<bool>,
    waker: Cell<Option<std::task::Waker>>,
}

impl StopSignal {
    /// Fires the signal, waking the waiter.
    pub fn fire(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Resolves once the signal has fired.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.set.get() {
                std::task::Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::os::fd::AsRawFd as _;
    use std::time::Duration;

    /// `server.uring_accept = "multishot"`: one multishot accept hands out
    /// every connection with its peer's address, each a blocking socket
    /// closed on exec (as the one-shot accept makes them); armed again
    /// after the kernel ends it (here a cancel from the test: the kernel
    /// may end one on its own); dropped, closes the connections it took
    /// and nobody was given, leaving the listener to a later accept; and
    /// keeps its listener open when the listener is dropped first.
    #[test]
    fn a_multishot_accept_takes_every_connection_and_is_armed_again_when_ended() {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build().unwrap();
        rt.block_on(async {
            let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let at = listener.local_addr().unwrap();
            let accepts = listener.accept_multishot().unwrap();
            let next = || async {
                monoio::time::timeout(Duration::from_secs(5), accepts.accept())
                    .await
                    .expect("no connection within 5 s")
                    .unwrap()
            };

            let clients: Vec<_> = (0..64).map(|_| std::net::TcpStream::connect(at).unwrap()).collect();
            let mut want: Vec<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
            let mut got = Vec::new();
            for _ in 0..clients.len() {
                let (stream, peer) = next().await;
                let fd = stream.as_raw_fd();
                // SAFETY: fcntl queries on a descriptor `stream` owns.
                let (fl, fd_flags) =
                    unsafe { (libc::fcntl(fd, libc::F_GETFL), libc::fcntl(fd, libc::F_GETFD)) };
                assert_eq!(fl & libc::O_NONBLOCK, 0, "a blocking socket");
                assert_ne!(fd_flags & libc::FD_CLOEXEC, 0, "closed on exec");
                got.push(peer);
            }
            want.sort();
            got.sort();
            assert_eq!(got, want, "every connection, each with its own address");

            accepts.end_in_kernel_for_test().unwrap();
            // Let the cancel complete before the next connection comes.
            monoio::time::sleep(Duration::from_millis(50)).await;
            for round in 0..2 {
                let c = std::net::TcpStream::connect(at).unwrap();
                let (_, peer) = next().await;
                assert_eq!(peer, c.local_addr().unwrap(), "round {round} after the end");
            }

            // Taken by the kernel, never handed out: closed with the accept.
            let mut waiting: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(at).unwrap()).collect();
            monoio::time::sleep(Duration::from_millis(50)).await;
            drop(accepts);
            monoio::time::sleep(Duration::from_millis(50)).await;
            for (i, c) in waiting.iter_mut().enumerate() {
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut byte = [0u8; 1];
                match c.read(&mut byte) {
                    Ok(0) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    other => panic!("connection {i} left open: {other:?}"),
                }
            }
            // The accept is gone from the ring: the next connection is the
            // listener's own one-shot accept's, not closed by a leftover.
            let c = std::net::TcpStream::connect(at).unwrap();
            let (_, peer) =
                monoio::time::timeout(Duration::from_secs(5), listener.accept()).await.unwrap().unwrap();
            assert_eq!(peer, c.local_addr().unwrap());
            drop(clients);

            // It holds its listener open: with the listener dropped first,
            // an accept armed again is still on that listener (not on a
            // closed descriptor, or another that took its number).
            let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let at = listener.local_addr().unwrap();
            let accepts = listener.accept_multishot().unwrap();
            drop(listener);
            accepts.end_in_kernel_for_test().unwrap();
            monoio::time::sleep(Duration::from_millis(50)).await;
            let c = std::net::TcpStream::connect(at).unwrap();
            let (_, peer) = monoio::time::timeout(Duration::from_secs(5), accepts.accept())
                .await
                .expect("no connection")
                .unwrap();
            assert_eq!(peer, c.local_addr().unwrap());
        });
    }
}
