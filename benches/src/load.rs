//! What the independent load clients share: their command line, the
//! closed loop's clock and histogram, and the report.
//!
//! kefu's own load client (`kefu-bench echo`) is written with kefu's codec
//! on monoio; a figure measured only with it could be a figure about that
//! client. `load-tungstenite` and `load-fastws` drive the same closed-loop
//! echo (each connection sends one message and waits for its echo before
//! the next) from stacks kefu shares nothing with, so that every echo figure
//! in BENCHMARKS.md is measured from more than one side.
//!
//! Each connection's loop lives in its binary; this module only times it.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;

/// The command line both load clients accept.
#[derive(Debug, Parser)]
pub struct LoadArgs {
    /// The echo endpoint, `ws://HOST:PORT/PATH` (kefu: `/ws/echo`; the
    /// baseline servers echo on any path).
    #[arg(long, default_value = "ws://127.0.0.1:9101/ws/echo")]
    pub url: String,
    /// Connections, each with one message in flight.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Message size in bytes (binary messages).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Seconds run before measuring (not counted).
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Local addresses to connect from, round robin (127.0.0.x), so many
    /// connections do not run out of ephemeral ports.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub sources: Vec<std::net::IpAddr>,
    /// A label for the report (which server this is).
    #[arg(long, default_value = "")]
    pub label: String,
}

impl LoadArgs {
    /// `host:port` and path of `--url`.
    pub fn target(&self) -> anyhow::Result<(SocketAddr, String)> {
        let rest =
            self.url.strip_prefix("ws://").ok_or_else(|| anyhow::anyhow!("--url must start with ws://"))?;
        let (authority, path) =
            rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
        let addr = authority.parse().map_err(|e| anyhow::anyhow!("--url host:port {authority:?}: {e}"))?;
        Ok((addr, path))
    }

    /// The source address of connection `i`.
    pub fn source(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.sources[i % self.sources.len()], 0)
    }

    /// The current-thread runtime every client runs on: one core, like
    /// the server it measures (pin it with `taskset`).
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
}

/// Runs `connection(i)` for every `--connections` index on one
/// current-thread runtime until all have ended (a failed one is counted in
/// `meter` and reported on stderr), then prints the report as one JSON
/// line. `client` names the stack in the report.
pub fn run_all<F, Fut>(
    args: &LoadArgs,
    meter: &SharedMeter,
    client: &str,
    connection: F,
) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + 'static,
{
    let runtime = args.runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let tasks: Vec<_> = (0..args.connections)
            .map(|i| {
                let (meter, work) = (meter.clone(), connection(i));
                tokio::task::spawn_local(async move {
                    if let Err(e) = work.await {
                        eprintln!("connection {i}: {e:#}");
                        meter.borrow_mut().error();
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
    println!("{}", meter.borrow().report(args, client));
    Ok(())
}

/// A connected TCP socket from `source` with Nagle off (each echo is one
/// small write waiting for its answer).
pub async fn dial(source: SocketAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket =
        if to.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.bind(source)?;
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The run's clock and what it has counted, shared by every connection's
/// task on the one thread.
pub struct Meter {
    measuring_from: Instant,
    until: Instant,
    histogram: Histogram<u64>,
    errors: u64,
    cpu_at_start: Option<Duration>,
}

/// A handle each connection task keeps.
pub type SharedMeter = Rc<RefCell<Meter>>;

impl Meter {
    /// A meter whose window opens after `warmup` and lasts `duration`.
    pub fn new(warmup: Duration, duration: Duration) -> SharedMeter {
        let now = Instant::now();
        Rc::new(RefCell::new(Meter {
            measuring_from: now + warmup,
            until: now + warmup + duration,
            // 1 µs to 60 s, 3 significant digits.
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            errors: 0,
            cpu_at_start: None,
        }))
    }

    /// Whether the run is over (tasks stop sending).
    pub fn done(&self) -> bool {
        Instant::now() >= self.until
    }

    /// One echo came back, `sent` being when its message went out.
    pub fn record(&mut self, sent: Instant) {
        if sent < self.measuring_from {
            return;
        }
        if self.cpu_at_start.is_none() {
            self.cpu_at_start = Some(process_cpu());
        }
        let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
        self.histogram.saturating_record(micros);
    }

    /// A connection failed (it is counted, not retried).
    pub fn error(&mut self) {
        self.errors += 1;
    }

    /// The report of the window, as one JSON line.
    pub fn report(&self, args: &LoadArgs, client: &str) -> String {
        let window = self.until.saturating_duration_since(self.measuring_from).as_secs_f64();
        let cpu = self.cpu_at_start.map_or(0.0, |c| process_cpu().saturating_sub(c).as_secs_f64());
        let h = &self.histogram;
        let count = h.len();
        serde_json::json!({
            "client": client,
            "server": args.label,
            "url": args.url,
            "connections": args.connections,
            "size": args.size,
            "window_s": window,
            "messages": count,
            "msgs_per_s": count as f64 / window,
            "p50_us": h.value_at_quantile(0.50),
            "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999),
            "max_us": h.max(),
            "client_cpu_cores": cpu / window,
            "client_cpu_us_per_msg": if count > 0 { cpu * 1e6 / count as f64 } else { 0.0 },
            "errors": self.errors,
        })
        .to_string()
    }
}

/// CPU time (user + system) this process has used.
pub fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given and reads nothing else.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return Duration::ZERO;
        }
        usage.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A message of `size` bytes for the echo (its content does not matter;
/// binary, so no UTF-8 validation is measured on either side).
pub fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}
