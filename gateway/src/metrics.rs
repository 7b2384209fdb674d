//! Counters every shard keeps and the admin listener renders as Prometheus
//! text at `/metrics`.
//!
//! Each shard writes only its own [`ShardStats`] (relaxed atomics, one cache
//! line apart from the other shards'), so counting costs no contention; the
//! admin endpoint reads all of them. Every limit that bites has a counter
//! here, so an operator can see when one does.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use kefu_storage::StoreStats;

use crate::mailbox::Mailbox;
use crate::slab::ClassStats;

/// Slab occupancy copied out of a shard at each sweep (the slab itself is
/// thread-local).
#[derive(Debug, Default)]
pub struct ClassGauge {
    /// Buffer size.
    pub bytes: AtomicU64,
    /// Buffers in the class.
    pub count: AtomicU64,
    /// Buffers in use at the last sweep.
    pub in_use: AtomicU64,
    /// Times the class (and all larger) was found empty.
    pub exhausted: AtomicU64,
}

/// One shard's counters.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardStats {
    /// Open client connections (gauge).
    pub connections: AtomicU64,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused because the shard was full.
    pub refused_full: AtomicU64,
    /// Requests that did not become WebSockets (404, 400, 426, timeouts…).
    pub http_rejected: AtomicU64,
    /// WebSocket handshakes completed.
    pub upgrades: AtomicU64,
    /// WebSocket messages received.
    pub messages_in: AtomicU64,
    /// Frames queued for sending.
    pub frames_out: AtomicU64,
    /// Bytes read from sockets.
    pub bytes_in: AtomicU64,
    /// Bytes written to sockets.
    pub bytes_out: AtomicU64,
    /// Connections closed for breaking RFC 6455 (1002, 1007, 1009).
    pub protocol_closes: AtomicU64,
    /// Connections closed as slow consumers (4001).
    pub slow_consumer_closes: AtomicU64,
    /// Connections closed for silence past 2 × heartbeat.
    pub heartbeat_closes: AtomicU64,
    /// Times a connection had to wait for a slab buffer.
    pub slab_waits: AtomicU64,
    /// Thread CPU nanoseconds spent draining the inbox: deliveries from
    /// other shards and this shard's chat service (its sessions, the
    /// conversations homed here, on shard 0 the router; storage
    /// completions). It says how far a shard's chat work carries.
    pub inbox_cpu_ns: AtomicU64,
    /// Messages waiting in this shard's backlog for other shards' full inboxes.
    pub backlog: AtomicU64,
    /// Posts refused (answered `unavailable`) because the backlog was full.
    pub posts_refused: AtomicU64,
    /// Frames not written because the backlog was full (their connections
    /// are closed and resume).
    pub frames_cut: AtomicU64,
    /// Queue-position updates skipped because the backlog was full.
    pub posts_skipped: AtomicU64,
    /// Slab classes, refreshed each sweep.
    pub slab: Vec<ClassGauge>,
    /// Wall-clock ms of the shard's last sweep (0: none yet). A shard whose
    /// sweep stops (stuck or gone) is not ready (`/readyz`).
    pub sweep_unix_ms: AtomicU64,
    /// The shard is draining for shutdown.
    pub draining: AtomicBool,
}

impl ShardStats {
    /// Counters for a shard whose slab has `classes` size classes.
    pub fn new(classes: usize) -> Self {
        Self { slab: (0..classes).map(|_| ClassGauge::default()).collect(), ..Default::default() }
    }

    /// Adds one to a counter.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Records that the shard swept just now.
    pub fn mark_swept(&self) {
        self.sweep_unix_ms.store(unix_ms(), Relaxed);
    }

    /// Copies the slab's occupancy into the gauges.
    pub fn publish_slab(&self, stats: &[ClassStats]) {
        for (gauge, s) in self.slab.iter().zip(stats) {
            gauge.bytes.store(s.bytes as u64, Relaxed);
            gauge.count.store(s.count as u64, Relaxed);
            gauge.in_use.store(s.in_use as u64, Relaxed);
            gauge.exhausted.store(s.exhausted, Relaxed);
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Renders every shard's counters in the Prometheus text format.
pub fn render<T: Send>(
    shards: &[ShardStats],
    mailboxes: &[Mailbox<T>],
    store: &StoreStats,
    driver: &str,
) -> String {
    let mut out = String::with_capacity(4096);
    let _ = writeln!(out, "# HELP kefu_info Build and runtime facts.\n# TYPE kefu_info gauge");
    let _ = writeln!(
        out,
        "kefu_info{{version=\"{}\",driver=\"{driver}\",shards=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        shards.len()
    );
    let _ = writeln!(
        out,
        "# HELP kefu_allocations_total Heap allocations by every thread.\n# TYPE kefu_allocations_total counter\nkefu_allocations_total {}",
        crate::alloc::allocations()
    );
    // A family of its own rather than labels on the total: summing
    // kefu_allocations_total must not count every allocation twice.
    let _ = writeln!(
        out,
        "# HELP kefu_thread_allocations_total Heap allocations by thread name.\n# TYPE kefu_thread_allocations_total counter"
    );
    for (thread, n) in crate::alloc::allocations_by_thread() {
        let _ = writeln!(out, "kefu_thread_allocations_total{{thread=\"{thread}\"}} {n}");
    }
    let storage: [(&str, &str, &str, u64); 6] = [
        ("kefu_storage_commits_total", "counter", "Group commits done.", store.commits),
        ("kefu_storage_failed_commits_total", "counter", "Group commits that failed.", store.failed_commits),
        ("kefu_storage_writes_total", "counter", "Writes stored.", store.writes),
        ("kefu_storage_fsyncs_total", "counter", "fsyncs returned.", store.fsyncs),
        ("kefu_storage_submit_full_total", "counter", "Writes refused: queue full.", store.submit_full),
        ("kefu_storage_batch_records_max", "gauge", "Largest group commit so far.", store.batch_records_max),
    ];
    for (name, kind, help, value) in storage {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    type Field = fn(&ShardStats) -> &AtomicU64;
    let series: [(&str, &str, &str, Field); 17] = [
        ("kefu_connections", "gauge", "Open client connections.", |s| &s.connections),
        ("kefu_accepted_total", "counter", "Connections accepted.", |s| &s.accepted),
        ("kefu_refused_full_total", "counter", "Connections refused: shard full.", |s| &s.refused_full),
        ("kefu_http_rejected_total", "counter", "Requests not upgraded.", |s| &s.http_rejected),
        ("kefu_upgrades_total", "counter", "WebSocket handshakes completed.", |s| &s.upgrades),
        ("kefu_messages_in_total", "counter", "WebSocket messages received.", |s| &s.messages_in),
        ("kefu_frames_out_total", "counter", "Writes queued (a replay packs many frames).", |s| {
            &s.frames_out
        }),
        ("kefu_bytes_in_total", "counter", "Bytes read from sockets.", |s| &s.bytes_in),
        ("kefu_bytes_out_total", "counter", "Bytes written to sockets.", |s| &s.bytes_out),
        ("kefu_protocol_closes_total", "counter", "Closes for RFC 6455 violations.", |s| &s.protocol_closes),
        ("kefu_slow_consumer_closes_total", "counter", "Closes 4001.", |s| &s.slow_consumer_closes),
        ("kefu_heartbeat_closes_total", "counter", "Closes for silence.", |s| &s.heartbeat_closes),
        ("kefu_slab_waits_total", "counter", "Waits for a slab buffer.", |s| &s.slab_waits),
        ("kefu_backlog_messages", "gauge", "Posts waiting for another shard's full inbox.", |s| &s.backlog),
        ("kefu_posts_refused_total", "counter", "Posts refused (unavailable): backlog full.", |s| {
            &s.posts_refused
        }),
        ("kefu_frames_cut_total", "counter", "Frames not written (connection closed): backlog full.", |s| {
            &s.frames_cut
        }),
        ("kefu_posts_skipped_total", "counter", "Queue positions not sent: backlog full.", |s| {
            &s.posts_skipped
        }),
    ];
    for (name, kind, help, field) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", field(s).load(Relaxed));
        }
    }
    // Prometheus wants base units: counted in ns, shown in seconds.
    let _ = writeln!(
        out,
        "# HELP kefu_inbox_cpu_seconds_total CPU time draining the inbox.\n# TYPE kefu_inbox_cpu_seconds_total counter"
    );
    for (i, s) in shards.iter().enumerate() {
        let ns = s.inbox_cpu_ns.load(Relaxed);
        let _ = writeln!(
            out,
            "kefu_inbox_cpu_seconds_total{{shard=\"{i}\"}} {}.{:09}",
            ns / 1_000_000_000,
            ns % 1_000_000_000
        );
    }
    let _ = writeln!(
        out,
        "# HELP kefu_mailbox_posts_total Messages posted to a shard's inbox, by sender (a shard, or the bridge).\n# TYPE kefu_mailbox_posts_total counter"
    );
    for (to, m) in mailboxes.iter().enumerate() {
        for from in 0..m.senders() {
            // The sender after the shards is the bridge (business systems' calls).
            let sender = if from < mailboxes.len() { from.to_string() } else { "bridge".to_string() };
            let _ = writeln!(
                out,
                "kefu_mailbox_posts_total{{from=\"{sender}\",to=\"{to}\"}} {}",
                m.posts_from(from)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP kefu_mailbox_depth Messages waiting in a shard's inbox.\n# TYPE kefu_mailbox_depth gauge"
    );
    for (to, m) in mailboxes.iter().enumerate() {
        let _ = writeln!(out, "kefu_mailbox_depth{{shard=\"{to}\"}} {}", m.len());
    }
    let _ = writeln!(
        out,
        "# HELP kefu_mailbox_full_total Posts a full inbox handed back.\n# TYPE kefu_mailbox_full_total counter"
    );
    for (to, m) in mailboxes.iter().enumerate() {
        let _ = writeln!(out, "kefu_mailbox_full_total{{shard=\"{to}\"}} {}", m.full.load(Relaxed));
    }
    let _ = writeln!(out, "# HELP kefu_slab_buffers Slab buffers per class.\n# TYPE kefu_slab_buffers gauge");
    let _ = writeln!(out, "# HELP kefu_slab_in_use Slab buffers in use.\n# TYPE kefu_slab_in_use gauge");
    let _ = writeln!(
        out,
        "# HELP kefu_slab_exhausted_total Slab class found empty.\n# TYPE kefu_slab_exhausted_total counter"
    );
    for (i, s) in shards.iter().enumerate() {
        for g in &s.slab {
            let labels = format!("shard=\"{i}\",bytes=\"{}\"", g.bytes.load(Relaxed));
            let _ = writeln!(out, "kefu_slab_buffers{{{labels}}} {}", g.count.load(Relaxed));
            let _ = writeln!(out, "kefu_slab_in_use{{{labels}}} {}", g.in_use.load(Relaxed));
            let _ = writeln!(out, "kefu_slab_exhausted_total{{{labels}}} {}", g.exhausted.load(Relaxed));
        }
    }
    out
}
