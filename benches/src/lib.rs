//! Baselines to hold kefu against.
//!
//! kefu's claims ("N messages per second per core", "M bytes per idle
//! connection") mean little in isolation, so this package keeps two echo
//! servers built on the WebSocket libraries people would otherwise reach for,
//! run the same way kefu runs (pinned, one runtime thread per core, mimalloc):
//!
//! - `echo-tungstenite`: tokio-tungstenite, the most used Rust WebSocket stack.
//! - `echo-fastws`: fastwebsockets behind hyper's upgrade, the fastest we know.
//!
//! Both are driven by `kefu-bench echo` (throughput and latency) and
//! `kefu-bench idle` (memory per idle connection), and checked for protocol
//! conformance by `tools/conformance.sh`, so that a number quoted for kefu
//! always sits next to the same number for them, measured on the same machine
//! the same day.
//!
//! A third server, `echo-uring`, is a probe rather than a baseline: an echo
//! written straight on io_uring with no runtime, in two modes (the
//! operations kefu issues per echo today, and a multishot receive into a
//! provided-buffer ring), to measure what kefu's runtime and a driver change
//! would be worth. It does not use this library's command line.
//!
//! This library holds only what the two binaries share: their command line
//! and the tokio runtime they build from it. The criterion benches of kefu's
//! own hot path live beside it in `benches/`.

pub mod load;

use std::net::SocketAddr;

use clap::Parser;

/// The command line both baseline servers accept.
#[derive(Debug, Parser)]
pub struct ServerArgs {
    /// Address to listen on. Keep it on 127.0.0.0/8: these servers exist
    /// only to be measured on this host.
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,

    /// Tokio worker threads. 1 builds a current-thread runtime (no work
    /// stealing, no cross-thread wake-ups), the fair match for one kefu shard.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,

    /// Per-connection read buffer in bytes. Unset keeps the library's
    /// default, which is what most deployments run; set it to see how much of
    /// the idle memory per connection is that buffer.
    #[arg(long)]
    pub read_buffer: Option<usize>,

    /// Listen backlog (accept queue length). Large enough that a client
    /// opening connections in bursts is not slowed by SYN retransmits; the
    /// kernel caps it at net.core.somaxconn.
    #[arg(long, default_value_t = 1024)]
    pub backlog: u32,

    /// Print per-connection errors to stderr (protocol violations, resets).
    /// Off by default because conformance runs provoke hundreds on purpose.
    #[arg(long)]
    pub verbose: bool,
}

impl ServerArgs {
    /// Binds `--listen` with `--backlog` (tokio's `TcpListener::bind` would
    /// pick the backlog itself).
    pub fn listener(&self) -> std::io::Result<tokio::net::TcpListener> {
        let socket = if self.listen.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // Restarting between runs must not wait out TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(self.listen)?;
        socket.listen(self.backlog)
    }

    /// Builds the tokio runtime `--threads` asks for.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        if self.threads == 1 {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(usize::from(self.threads))
                .enable_all()
                .build()
        }
    }
}
