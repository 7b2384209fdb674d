//! `events_bench`: how fast one `kefu.v1.Events/Subscribe` stream delivers,
//! and how far behind the log's durable end it runs.
//!
//! The gateway's shards cannot produce 50k events/s on one core (the chat
//! path tops out near 5k msg/s there; BENCHMARKS.md), so the two questions
//! are asked apart:
//!
//! - `prefill --data DIR --events N`: writes N messages (and the
//!   conversations they belong to) straight into the store of a gateway
//!   that is not running, through the same group commit the gateway uses.
//! - `catchup --admin ADDR --key KEY --events N`: one subscriber reads the
//!   log from offset 1; events/s is N over the time from its first event
//!   to its Nth. This is the stream's own capacity: storage reads, the
//!   mapping to the contract, tonic's encoding and HTTP/2.
//! - `live --admin ADDR --key KEY --ws URL --rate R --seconds S`: visitors
//!   send R msg/s over WebSocket (open loop: on a schedule, whatever the
//!   acks do) while one subscriber follows the tail. Each message event's
//!   lag is its receipt time minus its `ts`, which the gateway stamps
//!   before the message's group commit: so the lag includes the commit
//!   itself and overstates "commit to receipt" (by the commit time, and by
//!   up to 1 ms since `ts` is whole ms). Run it on a fresh data directory:
//!   the subscriber starts at offset 1.
//!
//! Each prints one JSON line on stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use kefu_gateway::bridge::pb;
use kefu_gateway::bridge::pb::event::Kind;
use kefu_proto::ids::{ConvId, ConvStatus, Role};
use kefu_storage::{ConversationRecord, Store, StoreConfig, SubmitError, WriteOp};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tonic::metadata::MetadataValue;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    step: Step,
}

#[derive(Debug, Subcommand)]
enum Step {
    /// Writes messages straight into a stopped gateway's store.
    Prefill {
        /// The gateway's data directory.
        #[arg(long)]
        data: std::path::PathBuf,
        /// Messages to write.
        #[arg(long, default_value_t = 500_000)]
        events: u64,
        /// Conversations they are spread over.
        #[arg(long, default_value_t = 1_000)]
        conversations: u64,
    },
    /// Times one subscriber reading the log from offset 1.
    Catchup {
        /// The admin listener.
        #[arg(long, default_value = "127.0.0.1:9202")]
        admin: String,
        /// An `[admin] api_keys` key.
        #[arg(long)]
        key: String,
        /// Events to read.
        #[arg(long)]
        events: u64,
    },
    /// Lag of one subscriber following the tail while visitors send.
    Live {
        /// The admin listener.
        #[arg(long, default_value = "127.0.0.1:9202")]
        admin: String,
        /// An `[admin] api_keys` key.
        #[arg(long)]
        key: String,
        /// The gateway's WebSocket URL.
        #[arg(long, default_value = "ws://127.0.0.1:9201/ws")]
        ws: String,
        /// Visitors sending.
        #[arg(long, default_value_t = 200)]
        visitors: usize,
        /// Messages per second, all visitors together.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// Seconds of sending measured.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Seconds of sending before the measured part.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let out = match Cli::parse().step {
        Step::Prefill { data, events, conversations } => prefill(data, events, conversations)?,
        Step::Catchup { admin, key, events } => rt.block_on(catchup(&admin, &key, events))?,
        Step::Live { admin, key, ws, visitors, rate, seconds, warmup } => {
            rt.block_on(live(Live { admin, key, ws, visitors, rate, seconds, warmup }))?
        }
    };
    println!("{out}");
    Ok(())
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

const TEXT: &str =
    "a hundred bytes of text, as in the chat benchmark: lorem ipsum dolor sit amet, consectetur adipis.";

fn prefill(data: std::path::PathBuf, events: u64, conversations: u64) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let config = StoreConfig { dir: data, sources: 1, ..StoreConfig::default() };
    let (store, recovery) = Store::open(config, Arc::new(|_| {})).context("opening the store")?;
    let first_conv = recovery.next_conv_id;
    let conversations = conversations.max(1);
    let convs = (0..conversations).map(|i| {
        WriteOp::PutConversation(ConversationRecord {
            id: first_conv + i,
            visitor_id: format!("bench-v{i}"),
            status: ConvStatus::Queued,
            agent: None,
            group: Some("default".into()),
            created_ms: now_ms() as u64,
            updated_ms: now_ms() as u64,
            last_seq: 0,
        })
    });
    let messages = (0..events).map(|i| {
        let c = i % conversations;
        WriteOp::AppendMessage(kefu_proto::client::Msg {
            conv: ConvId(first_conv + c),
            seq: 0,
            cid: format!("p{i}"),
            from: kefu_proto::client::Sender {
                role: Role::Visitor,
                id: format!("bench-v{c}"),
                name: "bench".into(),
            },
            text: Some(TEXT.into()),
            attachment: None,
            ts: now_ms() as u64,
        })
    });
    let written = submit_all(&store, convs.chain(messages))?;
    store.close();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("prefill: {written} writes in {seconds:.1} s");
    Ok(json!({"step": "prefill", "writes": written, "seconds": seconds}))
}

/// Submits every op as source 0, keeping the source full, and waits for
/// all of them; fails on the first that did not commit.
fn submit_all(store: &Store, ops: impl Iterator<Item = WriteOp>) -> anyhow::Result<u64> {
    let (writer, done) = (store.writer(), store.completions(0));
    let (mut submitted, mut completed) = (0u64, 0u64);
    let pop = |completed: &mut u64| -> anyhow::Result<bool> {
        let Some(c) = done.pop() else { return Ok(false) };
        c.result.context("a prefill write failed")?;
        *completed += 1;
        Ok(true)
    };
    for op in ops {
        let mut op = op;
        loop {
            match writer.submit(0, submitted, op) {
                Ok(()) => break,
                Err(SubmitError::Closed(_)) => bail!("the store closed"),
                Err(SubmitError::Full(back)) => {
                    op = back;
                    if !pop(&mut completed)? {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
        }
        submitted += 1;
    }
    while completed < submitted {
        if !pop(&mut completed)? {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(completed)
}

type Client = pb::events_client::EventsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AddKey>,
>;
type AddKey = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

async fn client(admin: &str, key: &str) -> anyhow::Result<Client> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{admin}"))?.connect().await?;
    let header: MetadataValue<_> = format!("Bearer {key}").parse()?;
    let add_key: AddKey = Box::new(move |mut req| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    });
    Ok(pb::events_client::EventsClient::with_interceptor(channel, add_key))
}

/// A consumer name no earlier run used.
fn fresh_consumer() -> String {
    format!("events-bench-{}-{}", std::process::id(), now_ms() as u64)
}

async fn catchup(admin: &str, key: &str, events: u64) -> anyhow::Result<serde_json::Value> {
    let mut c = client(admin, key).await?;
    let asked = Instant::now();
    let req = pb::SubscribeRequest { consumer: fresh_consumer(), from_offset: 1 };
    let mut stream = c.subscribe(req).await?.into_inner();
    let mut first = None;
    for want in 1..=events {
        let Some(e) = stream.message().await? else { bail!("the stream ended after {} events", want - 1) };
        first.get_or_insert_with(Instant::now);
        if e.offset != want {
            bail!("event {want} came with offset {}", e.offset);
        }
    }
    let from_first = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let rate = events as f64 / from_first.max(1e-9);
    eprintln!("catchup: {events} events in {from_first:.3} s from the first: {rate:.0} events/s");
    Ok(json!({
        "step": "catchup",
        "events": events,
        "seconds_from_first": from_first,
        "seconds_from_subscribe": asked.elapsed().as_secs_f64(),
        "events_per_s": rate,
    }))
}

struct Live {
    admin: String,
    key: String,
    ws: String,
    visitors: usize,
    rate: u64,
    seconds: u64,
    warmup: u64,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type Sink = futures_util::stream::SplitSink<Ws, Message>;

/// The reply to the command with `id`, as JSON (frames before it are
/// skipped).
async fn reply_to(
    stream: &mut futures_util::stream::SplitStream<Ws>,
    id: i64,
) -> anyhow::Result<serde_json::Value> {
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                if v["id"] == id {
                    return Ok(v);
                }
            }
            Some(Ok(_)) => continue,
            _ => bail!("the WebSocket closed"),
        }
    }
}

/// A visitor with an open conversation, its replies drained (and acks
/// counted) by a task of its own.
async fn visitor(url: &str, acks: Arc<AtomicU64>, errors: Arc<AtomicU64>) -> anyhow::Result<(Sink, String)> {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.context("WebSocket connect")?;
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::text(json!({"type": "connect", "id": 1}).to_string())).await?;
    reply_to(&mut stream, 1).await?;
    sink.send(Message::text(json!({"type": "open", "id": 2}).to_string())).await?;
    let opened = reply_to(&mut stream, 2).await?;
    let conv = opened["conv"].as_str().context("open gave no conv")?.to_string();
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if let Message::Text(t) = m {
                match serde_json::from_str::<serde_json::Value>(&t).map(|v| v["type"].clone()) {
                    Ok(t) if t == "ack" => acks.fetch_add(1, Ordering::Relaxed),
                    Ok(t) if t == "error" => errors.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
        }
    });
    Ok((sink, conv))
}

/// Receipt time minus `ts` of every message event whose cid is `live-N`
/// with N at least `from`, until `total` such events (any N) were seen.
async fn follow_lags(
    mut stream: tonic::Streaming<pb::Event>,
    from: u64,
    total: u64,
) -> anyhow::Result<Vec<f64>> {
    let mut lags = Vec::new();
    let mut seen = 0;
    let mut next_offset = None;
    while let Some(e) = stream.message().await? {
        if next_offset.is_some_and(|n| n != e.offset) {
            bail!("a gap: offset {} after {:?}", e.offset, next_offset);
        }
        next_offset = Some(e.offset + 1);
        let Some(Kind::Message(m)) = &e.kind else { continue };
        let Some(n) = m.cid.strip_prefix("live-").and_then(|n| n.parse::<u64>().ok()) else { continue };
        if n >= from {
            lags.push(now_ms() - e.ts as f64);
        }
        seen += 1;
        if seen >= total {
            break;
        }
    }
    Ok(lags)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn live(args: Live) -> anyhow::Result<serde_json::Value> {
    let (acks, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut sinks = Vec::with_capacity(args.visitors);
    for _ in 0..args.visitors.max(1) {
        sinks.push(visitor(&args.ws, acks.clone(), errors.clone()).await?);
    }
    let total = args.rate * (args.warmup + args.seconds);
    let measured_from = args.rate * args.warmup;
    let mut c = client(&args.admin, &args.key).await?;
    let req = pb::SubscribeRequest { consumer: fresh_consumer(), from_offset: 1 };
    let stream = c.subscribe(req).await?.into_inner();
    let follower = tokio::spawn(follow_lags(stream, measured_from, total));

    // Open loop: every ms, as many sends as the schedule says are due.
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * args.rate as f64) as u64).min(total);
        while sent < due {
            let at = sent as usize % sinks.len();
            let (sink, conv) = &mut sinks[at];
            let send = json!({"type": "send", "conv": conv, "cid": format!("live-{sent}"), "text": TEXT});
            sink.send(Message::text(send.to_string())).await?;
            sent += 1;
        }
    }
    let send_seconds = started.elapsed().as_secs_f64();
    let mut lags = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .context("the subscriber did not see every message within 30 s")???;
    lags.sort_by(f64::total_cmp);
    let (p50, p99, p999) = (percentile(&lags, 0.5), percentile(&lags, 0.99), percentile(&lags, 0.999));
    let max = lags.last().copied().unwrap_or(f64::NAN);
    eprintln!(
        "live: {sent} sent in {send_seconds:.1} s, {} measured; lag p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, max {max:.2} ms; {} acks, {} errors",
        lags.len(),
        acks.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    Ok(json!({
        "step": "live", "rate": args.rate, "visitors": args.visitors, "sent": sent,
        "send_seconds": send_seconds, "measured": lags.len(),
        "lag_ms": {"p50": p50, "p99": p99, "p999": p999, "max": max},
        "acks": acks.load(Ordering::Relaxed), "errors": errors.load(Ordering::Relaxed),
    }))
}
