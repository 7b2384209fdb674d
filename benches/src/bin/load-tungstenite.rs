//! Closed-loop echo load on tokio-tungstenite: an independent client (see
//! `kefu_benches::load`). Each connection sends a binary message, waits for
//! the echo, checks its length and sends the next, as the library's own
//! client examples do (`send` flushes; `next` reads).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser as _;
use futures_util::{SinkExt as _, StreamExt as _};
use kefu_benches::load::{LoadArgs, Meter, SharedMeter, dial, payload, run_all};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = LoadArgs::parse();
    let (addr, _) = args.target()?;
    let meter = Meter::new(Duration::from_secs(args.warmup), Duration::from_secs(args.duration));
    let message = bytes_message(args.size);
    run_all(&args, &meter, "tokio-tungstenite", |i| {
        run(meter.clone(), args.source(i), addr, args.url.clone(), message.clone())
    })
}

fn bytes_message(size: usize) -> Message {
    Message::Binary(payload(size).into())
}

async fn run(
    meter: SharedMeter,
    source: std::net::SocketAddr,
    addr: std::net::SocketAddr,
    url: String,
    message: Message,
) -> anyhow::Result<()> {
    let stream = dial(source, addr).await?;
    let request = url.into_client_request()?;
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    let size = message.len();
    while !meter.borrow().done() {
        let sent = Instant::now();
        ws.send(message.clone()).await?;
        loop {
            match ws.next().await.context("closed by the server")?? {
                Message::Binary(b) if b.len() == size => break,
                Message::Binary(b) => anyhow::bail!("echo of {} bytes for {size}", b.len()),
                Message::Text(_) => anyhow::bail!("a text echo for a binary message"),
                Message::Close(c) => anyhow::bail!("closed by the server: {c:?}"),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        meter.borrow_mut().record(sent);
    }
    let _ = ws.close(None).await;
    Ok(())
}
