//! WebSocket echo server on tokio-tungstenite: the baseline most Rust
//! services start from.
//!
//! It is written the way the library's own examples write it, because the
//! point is to measure what people deploy, not a tuned variant: accept, run
//! the handshake with `accept_async_with_config`, then `next()` a message and
//! `send()` it back (send flushes, so one write per echoed message). Text and
//! binary messages are echoed; pings are answered and closes completed by
//! tungstenite itself, which queues the pong or close reply and flushes it at
//! the start of the next read.
//!
//! What it costs per idle connection is dominated by tungstenite's read
//! buffer (128 KiB by default); `--read-buffer` shrinks it to show how much.

use anyhow::Context as _;
use clap::Parser as _;
use futures_util::{SinkExt as _, StreamExt as _};
use kefu_benches::ServerArgs;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = ServerArgs::parse();
    let mut config = WebSocketConfig::default();
    if let Some(bytes) = args.read_buffer {
        config = config.read_buffer_size(bytes);
    }
    let runtime = args.runtime().context("building the tokio runtime")?;
    runtime.block_on(async move {
        let listener = args.listener().with_context(|| format!("binding {}", args.listen))?;
        eprintln!(
            "echo-tungstenite listening on {} ({} thread(s), read buffer {} bytes)",
            args.listen, args.threads, config.read_buffer_size
        );
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: say so and keep serving the
                    // connections we have rather than exiting mid-benchmark.
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let verbose = args.verbose;
            tokio::spawn(async move {
                if let Err(e) = serve(stream, config).await
                    && verbose
                {
                    eprintln!("{peer}: {e:#}");
                }
            });
        }
    })
}

async fn serve(stream: TcpStream, config: WebSocketConfig) -> anyhow::Result<()> {
    // Echo replies are small writes answering small reads; Nagle would hold
    // them back waiting for an ACK that the client is delaying.
    stream.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    while let Some(message) = ws.next().await {
        match message? {
            message @ (Message::Text(_) | Message::Binary(_)) => ws.send(message).await?,
            // Pong and close replies are queued by tungstenite and flushed by
            // the next read; after a close that read ends the stream.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
    Ok(())
}
