//! Closed-loop echo load on fastwebsockets: an independent client (see
//! `kefu_benches::load`). The handshake is hyper's client with
//! `fastwebsockets::handshake::client`, as the library's examples do; each
//! connection then writes a binary frame and reads whole messages through
//! a `FragmentCollector` until its echo arrives.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser as _;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::Empty;
use hyper::Request;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, UPGRADE};
use kefu_benches::load::{LoadArgs, Meter, SharedMeter, dial, payload};

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
    let runtime = args.runtime().context("building the tokio runtime")?;
    let meter = Meter::new(Duration::from_secs(args.warmup), Duration::from_secs(args.duration));
    runtime.block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let mut tasks = Vec::with_capacity(args.connections);
                for i in 0..args.connections {
                    let (meter, path, source, size) =
                        (meter.clone(), path.clone(), args.source(i), args.size);
                    tasks.push(tokio::task::spawn_local(async move {
                        if let Err(e) = run(meter.clone(), source, addr, &path, size).await {
                            eprintln!("connection {i}: {e:#}");
                            meter.borrow_mut().error();
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
            .await;
    });
    println!("{}", meter.borrow().report(&args, "fastwebsockets"));
    Ok(())
}

async fn run(
    meter: SharedMeter,
    source: std::net::SocketAddr,
    addr: std::net::SocketAddr,
    path: &str,
    size: usize,
) -> anyhow::Result<()> {
    let stream = dial(source, addr).await?;
    let request = Request::builder()
        .method("GET")
        .uri(path)
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
