//! WebSocket echo server on fastwebsockets: the fastest Rust baseline.
//!
//! Written the way the library's `echo_server` example is: hyper 1 serves the
//! HTTP/1.1 request, `fastwebsockets::upgrade` answers it with 101, and the
//! upgraded stream becomes a `WebSocket` wrapped in a `FragmentCollector`, so
//! fragmented messages are reassembled (and text validated as UTF-8) before
//! they are echoed. `auto_pong` answers pings and `auto_close` echoes the
//! close frame, so the loop only sees data frames and the final close.
//!
//! The connection task runs `unconstrained`, as in the library's example, so
//! tokio's cooperative budget does not add yields to the echo loop.

use anyhow::Context as _;
use clap::Parser as _;
use fastwebsockets::{FragmentCollector, OpCode, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use kefu_benches::ServerArgs;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = ServerArgs::parse();
    if args.read_buffer.is_some() {
        // fastwebsockets sizes its read buffer itself and offers no knob.
        eprintln!("echo-fastws: --read-buffer is ignored (fastwebsockets has no such setting)");
    }
    let runtime = args.runtime().context("building the tokio runtime")?;
    runtime.block_on(async move {
        let listener = args.listener().with_context(|| format!("binding {}", args.listen))?;
        eprintln!("echo-fastws listening on {} ({} thread(s))", args.listen, args.threads);
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
            // Echo replies are small writes answering small reads; Nagle
            // would hold them back waiting for a delayed ACK.
            if let Err(e) = stream.set_nodelay(true) {
                eprintln!("{peer}: set_nodelay: {e}");
            }
            let verbose = args.verbose;
            tokio::spawn(async move {
                let service = service_fn(move |request| upgrade_request(request, verbose));
                let connection =
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades();
                if let Err(e) = connection.await
                    && verbose
                {
                    eprintln!("{peer}: {e}");
                }
            });
        }
    })
}

/// Answers the upgrade request and spawns the echo loop on the upgraded
/// stream. A request that is not a WebSocket upgrade gets hyper's error
/// response (fastwebsockets returns an error, hyper turns it into a 500
/// and closes).
async fn upgrade_request(
    mut request: Request<Incoming>,
    verbose: bool,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, upgraded) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        if let Err(e) = tokio::task::unconstrained(echo(upgraded)).await
            && verbose
        {
            eprintln!("websocket: {e}");
        }
    });
    Ok(response)
}

async fn echo(upgraded: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = upgraded.await?;
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            // Pings were answered by auto_pong; pongs need nothing;
            // continuations never come out of the collector.
            OpCode::Ping | OpCode::Pong | OpCode::Continuation => {}
        }
    }
}
