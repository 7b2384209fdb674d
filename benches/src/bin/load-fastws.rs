//! Closed-loop echo load on fastwebsockets: an independent client (see
//! `kefu_benches::load`). The handshake is hyper's client with
//! `fastwebsockets::handshake::client`, as the library's examples do; each
//! connection then writes a binary frame and reads whole messages through
//! a `FragmentCollector` until its echo arrives.

use std::time::{Duration, Instant};

use clap::Parser as _;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::Empty;
use hyper::Request;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, UPGRADE};
use kefu_benches::load::{LoadArgs, Meter, SharedMeter, dial, payload, run_all};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs hyper's connection task (the handshake's) on the local runtime.
struct SpawnLocal;

impl<Fut> hyper::rt::Executor<Fut> for SpawnLocal
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::task::spawn(fut);
    }
}

fn main() -> anyhow::Result<()> {
    let args = LoadArgs::parse();
    let (addr, path) = args.target()?;
    let meter = Meter::new(Duration::from_secs(args.warmup), Duration::from_secs(args.duration));
    run_all(&args, &meter, "fastwebsockets", |i| {
        run(meter.clone(), args.source(i), addr, path.clone(), args.size)
    })
}

async fn run(
    meter: SharedMeter,
    source: std::net::SocketAddr,
    addr: std::net::SocketAddr,
    path: String,
    size: usize,
) -> anyhow::Result<()> {
    let stream = dial(source, addr).await?;
    let request = Request::builder()
        .method("GET")
        .uri(path.as_str())
        .header("Host", addr.to_string())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header("Sec-WebSocket-Key", fastwebsockets::handshake::generate_key())
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnLocal, request, stream).await?;
    let mut ws = FragmentCollector::new(ws);
    let message = payload(size);
    while !meter.borrow().done() {
        let sent = Instant::now();
        ws.write_frame(Frame::binary(Payload::Borrowed(&message))).await?;
        loop {
            let frame = ws.read_frame().await?;
            match frame.opcode {
                OpCode::Binary if frame.payload.len() == size => break,
                OpCode::Binary => anyhow::bail!("echo of {} bytes for {size}", frame.payload.len()),
                OpCode::Close => anyhow::bail!("closed by the server"),
                _ => {}
            }
        }
        meter.borrow_mut().record(sent);
    }
    let _ = ws.write_frame(Frame::close(1000, &[])).await;
    Ok(())
}
