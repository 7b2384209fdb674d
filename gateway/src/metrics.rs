//! Counters every shard keeps and the admin listener renders as Prometheus
//! text at `/metrics`.
//!
//! Each shard writes only its own [`ShardStats`] (relaxed atomics, one cache
//! line apart from the other shards'), so counting costs no contention; the
//! admin endpoint reads all of them. Every limit that bites has a counter
//! here, so an operator can see when one does.
//!
//! Histograms ([`Histogram`]) follow the same rule: a fixed array of
//! relaxed atomic buckets per shard, summed over the shards when rendered.
//! Recording one value is a bucket search over a dozen bounds and two
//! atomic adds, with no allocation and no lock.
//!
//! The text is written by hand rather than with `prometheus-client`: its
//! registry holds each series behind its own `Arc` and its histograms
//! take a lock (or `f64` atomics) per observation, and it has no notion of
//! per-shard cells summed at render time. What it would give us, the text
//! format, is a few `writeln!`s; label values are escaped by
//! [`escape_label`], and CI runs `promtool check metrics` on the result.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kefu_core::chat::frames::ErrorCounts;
use kefu_proto::{ErrorCode, Role};
use kefu_storage::StoreStats;

use crate::mailbox::Mailbox;
use crate::slab::ClassStats;
use crate::ws::close;

/// Upper bounds, in microseconds, of latencies measured from a message's
/// `ts` (whole milliseconds, so nothing finer than 1 ms is told apart).
pub const MS_LATENCY_BOUNDS_US: &[u64] = &[
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

/// Upper bounds, in microseconds, of storage's commit and fsync times.
pub const COMMIT_BOUNDS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    5_000_000,
];

/// Upper bounds of the writes per group commit.
pub const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Buckets a [`Histogram`] holds at most (its bounds and `+Inf`).
const BUCKETS_MAX: usize = 17;

/// A Prometheus histogram of whole numbers (microseconds, or a count),
/// recorded with relaxed atomics and no allocation. Each recording thread
/// keeps its own and [`HistogramSum`] adds them up when rendered, so two
/// threads never write the same cache line.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// Per bucket, not cumulative; the last is `+Inf`.
    buckets: [AtomicU64; BUCKETS_MAX],
    sum: AtomicU64,
}

impl Default for Histogram {
    /// The bounds of latencies measured from a message's `ts`.
    fn default() -> Self {
        Self::new(MS_LATENCY_BOUNDS_US)
    }
}

impl Histogram {
    /// A histogram with these ascending upper bounds (at most 16).
    pub const fn new(bounds: &'static [u64]) -> Self {
        assert!(bounds.len() < BUCKETS_MAX);
        Self { bounds, buckets: [const { AtomicU64::new(0) }; BUCKETS_MAX], sum: AtomicU64::new(0) }
    }

    /// Records one value.
    #[inline]
    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&le| le < value);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    /// Records a duration, in microseconds.
    #[inline]
    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Values recorded so far.
    pub fn count(&self) -> u64 {
        self.buckets[..=self.bounds.len()].iter().map(|b| b.load(Relaxed)).sum()
    }
}

/// How a histogram's values read in the text: Prometheus wants base units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Recorded in microseconds, shown in seconds.
    Seconds,
    /// Shown as recorded.
    Count,
}

impl Unit {
    fn write(self, out: &mut String, v: u64) {
        let _ = match self {
            Unit::Seconds => write!(out, "{}.{:06}", v / 1_000_000, v % 1_000_000),
            Unit::Count => write!(out, "{v}"),
        };
    }
}

/// Several [`Histogram`]s with the same bounds added up, to render as one
/// series.
#[derive(Debug, Clone)]
pub struct HistogramSum {
    bounds: &'static [u64],
    buckets: [u64; BUCKETS_MAX],
    sum: u64,
}

impl HistogramSum {
    /// The sum of `parts` (all with `bounds`).
    pub fn of<'a>(bounds: &'static [u64], parts: impl IntoIterator<Item = &'a Histogram>) -> Self {
        let mut total = Self { bounds, buckets: [0; BUCKETS_MAX], sum: 0 };
        for h in parts {
            debug_assert_eq!(h.bounds, bounds);
            for (t, b) in total.buckets.iter_mut().zip(&h.buckets) {
                *t += b.load(Relaxed);
            }
            total.sum = total.sum.wrapping_add(h.sum.load(Relaxed));
        }
        total
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of `name` with
    /// `labels` (`key="value"` pairs, comma-separated, possibly empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str, unit: Unit) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (le, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n;
            let le = match unit {
                Unit::Seconds => *le as f64 / 1e6,
                Unit::Count => *le as f64,
            };
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = write!(out, "{name}_sum{braced} ");
        unit.write(out, self.sum);
        let _ = writeln!(out, "\n{name}_count{braced} {cumulative}");
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// `value` as a label value: backslash, double quote and newline escaped,
/// as the text format wants.
pub fn escape_label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.into()
}

/// Close codes counted by name; any other is counted as `other`.
pub const CLOSE_CODES: [u16; 14] = [
    close::NORMAL,
    close::GOING_AWAY,
    close::PROTOCOL_ERROR,
    close::UNSUPPORTED,
    close::INVALID_PAYLOAD,
    close::POLICY,
    close::TOO_BIG,
    close::MANDATORY_EXT,
    close::INTERNAL,
    close::SERVER_SHUTDOWN,
    close::SLOW_CONSUMER,
    close::REPLACED,
    close::UNAUTHORIZED,
    close::BLOCKED,
];

/// Who sent the close frame that began a close handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// kefu closed the connection.
    Server = 0,
    /// The client did (its code is counted as received).
    Client = 1,
}

/// Close handshakes by initiator and code, `[initiator][code]`; the last
/// column is any code not in [`CLOSE_CODES`] (or none).
#[derive(Debug, Default)]
pub struct CloseCounts([[AtomicU64; CLOSE_CODES.len() + 1]; 2]);

impl CloseCounts {
    /// Counts a close begun by `by` with `code` (`None`: an empty close frame).
    pub fn count(&self, by: Initiator, code: Option<u16>) {
        let i = code.and_then(|c| CLOSE_CODES.iter().position(|&k| k == c)).unwrap_or(CLOSE_CODES.len());
        self.0[by as usize][i].fetch_add(1, Relaxed);
    }

    /// Closes begun by `by` with `code` so far.
    pub fn get(&self, by: Initiator, code: u16) -> u64 {
        let i = CLOSE_CODES.iter().position(|&k| k == code).unwrap_or(CLOSE_CODES.len());
        self.0[by as usize][i].load(Relaxed)
    }
}

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

/// A counter that only its shard's thread adds to (the metrics page reads
/// it from another thread). A plain load and store, not a locked add (which
/// on x86 also fences memory): four of these are counted for every
/// message. A second writer would lose counts (never tear one), so a
/// counter another thread also adds to stays an `AtomicU64`.
#[derive(Debug, Default)]
pub struct OwnCounter(AtomicU64);

impl OwnCounter {
    /// Adds `n`. Only the owning shard's thread may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds one. Only the owning shard's thread may call this.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// The value, for readers on any thread.
    pub fn atomic(&self) -> &AtomicU64 {
        &self.0
    }
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
    pub messages_in: OwnCounter,
    /// Frames queued for sending.
    pub frames_out: OwnCounter,
    /// Bytes read from sockets.
    pub bytes_in: OwnCounter,
    /// Bytes written to sockets.
    pub bytes_out: OwnCounter,
    /// Batches of several queued frames written by one vectored call (a batch
    /// that meets a full socket takes more than one call).
    pub writev_calls: AtomicU64,
    /// Writes by system call (`server.socket_io = "syscall"`) that met a
    /// full socket and left the rest to the driver's write (the ring's, or
    /// epoll's), which waits for room.
    pub full_socket_writes: AtomicU64,
    /// Reads by system call that found nothing after the driver reported
    /// the socket readable, and left the read to the driver.
    pub empty_reads: AtomicU64,
    /// Connections closed for breaking RFC 6455 (1002, 1007, 1009).
    pub protocol_closes: AtomicU64,
    /// Connections closed as slow consumers (4001).
    pub slow_consumer_closes: AtomicU64,
    /// Connections closed for silence past 2 × heartbeat.
    pub heartbeat_closes: AtomicU64,
    /// Times a connection had to wait for a slab buffer.
    pub slab_waits: AtomicU64,
    /// Connections closed (1013) after waiting `limits.buffer_wait_timeout_ms`
    /// for a slab buffer.
    pub buffer_wait_timeouts: AtomicU64,
    /// Connections closed (1008) for a message left incomplete past
    /// `limits.partial_message_timeout_ms`.
    pub partial_message_timeouts: AtomicU64,
    /// Connections closed before `connect`: a message over
    /// `limits.unauthenticated_message_bytes_max` (1009), or buffers over
    /// `limits.unauthenticated_buffer_bytes_max` (1013).
    pub unauthenticated_refusals: AtomicU64,
    /// `/ws` requests answered `429` for
    /// `limits.new_connections_per_s_per_ip`.
    pub handshakes_rate_limited: AtomicU64,
    /// The chat edge's refusals: new anonymous visitors over
    /// `limits.anonymous_per_min_per_ip`, attachments over
    /// `limits.attachment_bytes_per_min`.
    pub edge: Arc<kefu_core::chat::edge::EdgeCounts>,
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
    /// Sessions announced (past `connect`) on this shard's connections, by
    /// role in [`Role::ALL`] order (gauge).
    pub sessions: [AtomicU64; 3],
    /// Close handshakes on this shard's connections.
    pub closes: CloseCounts,
    /// `error` frames this shard encoded, by code (its chat service's
    /// answers and its connections' decode errors).
    pub errors: Arc<ErrorCounts>,
    /// Client `send` commands received on this shard's connections.
    pub chat_messages_in: AtomicU64,
    /// `msg` frames handed to this shard's connections.
    pub chat_messages_out: AtomicU64,
    /// Queued conversations closed because their visitor stayed gone past
    /// `routing.abandon_after_s` (shard 0, where the router runs).
    pub conversations_abandoned: AtomicU64,
    /// From a message's `ts` (the home took it) to its sender's `ack`, for
    /// the conversations homed on this shard: hook, storage and fan-out.
    pub ack_latency: Histogram,
    /// From a message's `ts` to its `msg` frame queued on a recipient's
    /// connection on this shard.
    pub delivery_latency: Histogram,
    /// Wall-clock ms of the shard's last sweep (0: none yet). A shard whose
    /// sweep stops (stuck or gone) is not ready (`/readyz`).
    pub sweep_unix_ms: AtomicU64,
    /// The shard is draining for shutdown.
    pub draining: AtomicBool,
    /// While draining: the shard has stopped reading commands and nothing
    /// it started is under way (its inbox is empty, its chat service quiet).
    pub quiet: AtomicBool,
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
    let blocks = crate::page_blocks::stats();
    let _ = writeln!(
        out,
        "# HELP kefu_page_block_bytes Exact-size blocks of allocations just over 4, 8 or 16 KiB (mostly the storage's cached pages).\n# TYPE kefu_page_block_bytes gauge\nkefu_page_block_bytes{{state=\"in_use\"}} {}\nkefu_page_block_bytes{{state=\"mapped\"}} {}",
        blocks.in_use_bytes, blocks.mapped_bytes
    );
    let storage: [(&str, &str, &str, u64); 14] = [
        ("kefu_storage_commits_total", "counter", "Group commits done.", store.commits),
        (
            "kefu_storage_durable_commits_total",
            "counter",
            "Commits durable in redb (with the write-ahead log: checkpoints).",
            store.durable_commits,
        ),
        (
            "kefu_storage_checkpoint_waits_total",
            "counter",
            "Checkpoints that waited for the previous one's pages to reach the disk.",
            store.checkpoint_waits,
        ),
        ("kefu_storage_failed_commits_total", "counter", "Group commits that failed.", store.failed_commits),
        ("kefu_storage_writes_total", "counter", "Writes stored.", store.writes),
        ("kefu_storage_fsyncs_total", "counter", "fsyncs returned.", store.fsyncs),
        ("kefu_storage_submit_full_total", "counter", "Writes refused: queue full.", store.submit_full),
        ("kefu_storage_batch_records_max", "gauge", "Largest group commit so far.", store.batch_records_max),
        (
            "kefu_storage_recovery_attempts_total",
            "counter",
            "Tries to write again after failed commits.",
            store.recovery_attempts,
        ),
        (
            "kefu_storage_recoveries_total",
            "counter",
            "Times storage wrote again after failures.",
            store.recoveries,
        ),
        (
            "kefu_storage_refused_recovering_total",
            "counter",
            "Writes answered unavailable while storage could not write.",
            store.refused_recovering,
        ),
        (
            "kefu_storage_writer_dedupe_entries",
            "gauge",
            "Dedupe slots the storage writer holds in memory (at most storage.conv_cache_entries).",
            store.writer_cache_entries,
        ),
        (
            "kefu_storage_reader_dedupe_entries",
            "gauge",
            "Dedupe slots the readers hold in memory, over every shard's cache (each at most storage.conv_cache_entries).",
            store.reader_cache_entries,
        ),
        (
            "kefu_storage_index_tail_entries",
            "gauge",
            "Conversation index entries waiting in memory to reach the index table together (about storage.index_lag at most).",
            store.index_tail_entries,
        ),
    ];
    for (name, kind, help, value) in storage {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    type Field = fn(&ShardStats) -> &AtomicU64;
    let series: [(&str, &str, &str, Field); 26] = [
        ("kefu_connections", "gauge", "Open client connections.", |s| &s.connections),
        ("kefu_accepted_total", "counter", "Connections accepted.", |s| &s.accepted),
        ("kefu_refused_full_total", "counter", "Connections refused: shard full.", |s| &s.refused_full),
        ("kefu_http_rejected_total", "counter", "Requests not upgraded.", |s| &s.http_rejected),
        ("kefu_upgrades_total", "counter", "WebSocket handshakes completed.", |s| &s.upgrades),
        ("kefu_messages_in_total", "counter", "WebSocket messages received.", |s| s.messages_in.atomic()),
        ("kefu_frames_out_total", "counter", "Writes queued (a replay packs many frames).", |s| {
            s.frames_out.atomic()
        }),
        ("kefu_bytes_in_total", "counter", "Bytes read from sockets.", |s| s.bytes_in.atomic()),
        ("kefu_bytes_out_total", "counter", "Bytes written to sockets.", |s| s.bytes_out.atomic()),
        (
            "kefu_writev_total",
            "counter",
            "Batches of several queued frames written by one vectored call.",
            |s| &s.writev_calls,
        ),
        (
            "kefu_full_socket_writes_total",
            "counter",
            "Writes by system call that met a full socket and left the rest to the driver.",
            |s| &s.full_socket_writes,
        ),
        (
            "kefu_empty_reads_total",
            "counter",
            "Reads by system call that found nothing after readiness and left it to the driver.",
            |s| &s.empty_reads,
        ),
        ("kefu_protocol_closes_total", "counter", "Closes for RFC 6455 violations.", |s| &s.protocol_closes),
        ("kefu_slow_consumer_closes_total", "counter", "Closes 4001.", |s| &s.slow_consumer_closes),
        ("kefu_heartbeat_closes_total", "counter", "Closes for silence.", |s| &s.heartbeat_closes),
        ("kefu_slab_waits_total", "counter", "Waits for a slab buffer.", |s| &s.slab_waits),
        ("kefu_buffer_wait_timeouts_total", "counter", "Closes 1013: no slab buffer in time.", |s| {
            &s.buffer_wait_timeouts
        }),
        (
            "kefu_partial_message_timeouts_total",
            "counter",
            "Closes 1008: message incomplete too long.",
            |s| &s.partial_message_timeouts,
        ),
        (
            "kefu_unauthenticated_refusals_total",
            "counter",
            "Closes before connect: message too big (1009) or buffer budget spent (1013).",
            |s| &s.unauthenticated_refusals,
        ),
        (
            "kefu_handshakes_rate_limited_total",
            "counter",
            "WebSocket requests answered 429: limits.new_connections_per_s_per_ip.",
            |s| &s.handshakes_rate_limited,
        ),
        (
            "kefu_anonymous_rate_limited_total",
            "counter",
            "New anonymous visitors refused (rate_limited): limits.anonymous_per_min_per_ip.",
            |s| &s.edge.anonymous_refused,
        ),
        (
            "kefu_attachments_rate_limited_total",
            "counter",
            "Sends refused (rate_limited): limits.attachment_bytes_per_min.",
            |s| &s.edge.attachments_refused,
        ),
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
    render_chat(&mut out, shards);
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

/// The chat path's series: sessions by role, chat messages, errors by code,
/// closes by code, and the ack and delivery latencies.
fn render_chat(out: &mut String, shards: &[ShardStats]) {
    family(
        out,
        "kefu_connections_by_role",
        "gauge",
        "Open client connections by the role of their session (none: not past connect yet, or not a WebSocket).",
    );
    for (i, s) in shards.iter().enumerate() {
        let mut announced = 0;
        for (r, role) in Role::ALL.iter().enumerate() {
            let n = s.sessions[r].load(Relaxed);
            announced += n;
            let _ = writeln!(out, "kefu_connections_by_role{{shard=\"{i}\",role=\"{role}\"}} {n}");
        }
        // Read apart from the sessions: a connection just announced or gone
        // may be counted in one and not yet in the other.
        let none = s.connections.load(Relaxed).saturating_sub(announced);
        let _ = writeln!(out, "kefu_connections_by_role{{shard=\"{i}\",role=\"none\"}} {none}");
    }
    type Field = fn(&ShardStats) -> &AtomicU64;
    let series: [(&str, &str, Field); 3] = [
        ("kefu_chat_messages_in_total", "Chat messages (send commands) received from clients.", |s| {
            &s.chat_messages_in
        }),
        (
            "kefu_chat_messages_out_total",
            "Chat messages (msg frames) queued to recipients' connections.",
            |s| &s.chat_messages_out,
        ),
        (
            "kefu_conversations_abandoned_total",
            "Queued conversations closed: their visitor stayed gone past routing.abandon_after_s.",
            |s| &s.conversations_abandoned,
        ),
    ];
    for (name, help, field) in series {
        family(out, name, "counter", help);
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", field(s).load(Relaxed));
        }
    }
    family(out, "kefu_errors_total", "counter", "Error frames sent, by code (to clients and to API calls).");
    for (i, s) in shards.iter().enumerate() {
        for &code in ErrorCode::ALL {
            let _ =
                writeln!(out, "kefu_errors_total{{shard=\"{i}\",code=\"{code}\"}} {}", s.errors.get(code));
        }
    }
    family(
        out,
        "kefu_closes_total",
        "counter",
        "WebSocket close handshakes by who began them and the code (other: a code not listed, or none).",
    );
    for (i, s) in shards.iter().enumerate() {
        for (by, by_name) in [(Initiator::Server, "server"), (Initiator::Client, "client")] {
            for (c, code) in CLOSE_CODES.iter().map(|c| c.to_string()).chain(["other".into()]).enumerate() {
                let n = s.closes.0[by as usize][c].load(Relaxed);
                let _ =
                    writeln!(out, "kefu_closes_total{{shard=\"{i}\",by=\"{by_name}\",code=\"{code}\"}} {n}");
            }
        }
    }
    type Latency = fn(&ShardStats) -> &Histogram;
    let latencies: [(&str, &str, Latency); 2] = [
        (
            "kefu_ack_latency_seconds",
            "From a message's ts (its home took it) to its ack: hook, group commit and fan-out; 1 ms resolution.",
            |s| &s.ack_latency,
        ),
        (
            "kefu_delivery_latency_seconds",
            "From a message's ts to its msg frame queued on a recipient's connection; 1 ms resolution.",
            |s| &s.delivery_latency,
        ),
    ];
    for (name, help, field) in latencies {
        family(out, name, "histogram", help);
        HistogramSum::of(MS_LATENCY_BOUNDS_US, shards.iter().map(field)).render(out, name, "", Unit::Seconds);
    }
}

/// Storage's group commits as the writer reports them
/// ([`kefu_storage::OnCommit`]); one writer thread records, so one copy.
#[derive(Debug)]
pub struct CommitStats {
    batch_records: Histogram,
    batch: Histogram,
    fsync: Histogram,
    checkpoint: Histogram,
}

impl Default for CommitStats {
    fn default() -> Self {
        Self {
            batch_records: Histogram::new(BATCH_BOUNDS),
            batch: Histogram::new(COMMIT_BOUNDS_US),
            fsync: Histogram::new(COMMIT_BOUNDS_US),
            checkpoint: Histogram::new(COMMIT_BOUNDS_US),
        }
    }
}

impl CommitStats {
    /// Records one group commit or checkpoint.
    pub fn record(&self, t: kefu_storage::CommitTimes) {
        if t.checkpoint {
            self.checkpoint.observe_duration(t.batch);
            return;
        }
        self.batch_records.observe(t.records as u64);
        self.batch.observe_duration(t.batch);
        self.fsync.observe_duration(t.fsync);
    }

    /// Appends the storage histograms.
    pub fn render(&self, out: &mut String) {
        let families: [(&str, &str, &Histogram, Unit); 4] = [
            ("kefu_storage_batch_records", "Writes per group commit.", &self.batch_records, Unit::Count),
            (
                "kefu_storage_commit_seconds",
                "Group commit time, from its first write taken to durable (window, apply, commit).",
                &self.batch,
                Unit::Seconds,
            ),
            (
                "kefu_storage_fsync_seconds",
                "Time in fsync per group commit (the log's one, or redb's: two with quick_repair).",
                &self.fsync,
                Unit::Seconds,
            ),
            (
                "kefu_storage_checkpoint_seconds",
                "Write-ahead log checkpoints: the writer's part of redb's durable commit of the pages changed since the last one (with checkpoint_in_background the pages and fsyncs follow on a thread of their own); writes wait for it.",
                &self.checkpoint,
                Unit::Seconds,
            ),
        ];
        for (name, help, h, unit) in families {
            family(out, name, "histogram", help);
            HistogramSum::of(h.bounds, [h]).render(out, name, "", unit);
        }
    }
}

/// The per-address tables every shard shares (`limits.tracked_ips_max`
/// bounds each), by the limit they serve.
#[derive(Debug)]
pub struct PerIpTables(pub [(&'static str, Arc<kefu_core::per_ip::PerIpLimiter>); 2]);

impl PerIpTables {
    /// Appends how full each table is and how often its bound bit.
    pub fn render(&self, out: &mut String) {
        family(out, "kefu_tracked_ips", "gauge", "Client addresses a per-address limit remembers.");
        for (limit, table) in &self.0 {
            let _ = writeln!(out, "kefu_tracked_ips{{limit=\"{limit}\"}} {}", table.len());
        }
        let help = "Addresses forgotten while in use: limits.tracked_ips_max.";
        family(out, "kefu_tracked_ips_evicted_total", "counter", help);
        for (limit, table) in &self.0 {
            let _ = writeln!(out, "kefu_tracked_ips_evicted_total{{limit=\"{limit}\"}} {}", table.evicted());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_bucket_sum_and_render_cumulatively() {
        let a = Histogram::new(&[1_000, 5_000]);
        let b = Histogram::new(&[1_000, 5_000]);
        for v in [0, 1_000, 1_001, 7_000_000] {
            a.observe(v);
        }
        b.observe_duration(Duration::from_millis(5));
        assert_eq!((a.count(), b.count()), (4, 1));
        let mut out = String::new();
        HistogramSum::of(&[1_000, 5_000], [&a, &b]).render(&mut out, "x_seconds", "k=\"v\"", Unit::Seconds);
        assert_eq!(
            out,
            "x_seconds_bucket{k=\"v\",le=\"0.001\"} 2\n\
             x_seconds_bucket{k=\"v\",le=\"0.005\"} 4\n\
             x_seconds_bucket{k=\"v\",le=\"+Inf\"} 5\n\
             x_seconds_sum{k=\"v\"} 7.007001\n\
             x_seconds_count{k=\"v\"} 5\n"
        );
        let mut out = String::new();
        HistogramSum::of(BATCH_BOUNDS, []).render(&mut out, "n", "", Unit::Count);
        assert!(out.starts_with("n_bucket{le=\"1\"} 0\n"), "{out}");
        assert!(out.ends_with("n_sum 0\nn_count 0\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("crm-sync"), "crm-sync");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn closes_count_by_code_and_other() {
        let c = CloseCounts::default();
        c.count(Initiator::Server, Some(close::SLOW_CONSUMER));
        c.count(Initiator::Client, Some(3000));
        c.count(Initiator::Client, None);
        assert_eq!(c.get(Initiator::Server, close::SLOW_CONSUMER), 1);
        assert_eq!(c.get(Initiator::Client, close::SLOW_CONSUMER), 0);
        assert_eq!(c.get(Initiator::Client, 3000), 2, "unlisted codes and none are other");
    }
}
