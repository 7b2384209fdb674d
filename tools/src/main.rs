//! `kefu-bench`: kefu's capacity tool.
//!
//! One binary, one subcommand per question a capacity tester asks:
//!
//! - `echo` (`echo.rs`): how many round trips per second does an echo
//!   endpoint sustain, at what latency, for how much server CPU per message?
//! - `idle` (`idle.rs`): how much server memory does one idle connection
//!   cost, measured with tens of thousands of real connections?
//!
//! - `chat` (`chat.rs`): with thousands of visitors sending at a fixed
//!   aggregate rate (open loop), how long until the agent has each message,
//!   and until the visitor holds its durable `ack`?
//! - `junk` (`junk.rs`) and `slow` (`slow.rs`): regression runs of the
//!   same chat, clean and then beside connections that send garbage or
//!   stop reading (`abuse.rs` compares the two): do honest clients notice?
//!
//! - `fanout` (`fanout.rs`): how long until every agent of a group sees a
//!   queue or presence change?
//! - `crash` (`crash.rs`): is anything acked lost, stored twice or skipped
//!   when the gateway is killed with SIGKILL under load, again and again?
//!
//! Further chat scenarios (a message mix) grow here over the same pieces: the minimal client WebSocket in `ws.rs` and
//! the measurements in `stats.rs`.
//!
//! Every subcommand prints a human summary on stderr and exactly one JSON
//! line on stdout, so scripts can `| jq` the result while people read the
//! summary. Targets are refused unless they are loopback addresses
//! (`--allow-non-loopback` overrides): this tool generates load, and a
//! mistyped URL must not point it at someone else.

mod abuse;
mod chat;
mod crash;
mod echo;
mod fanout;
mod idle;
mod junk;
mod slow;
mod stats;
mod ws;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "kefu's capacity tool: WebSocket load, latency and memory per connection")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Round trips per second and latency against a WebSocket echo endpoint.
    Echo(echo::EchoArgs),
    /// Server memory per idle WebSocket connection, over many connections.
    Idle(idle::IdleArgs),
    /// Visitor → agent delivery and ack latency at a fixed message rate
    /// (open loop) against kefu's /ws.
    Chat(chat::ChatArgs),
    /// Regression run: honest chat clean, then beside connections sending
    /// malformed frames and invalid commands; fails if the honest clients
    /// notice.
    Junk(Box<junk::JunkArgs>),
    /// Regression run: honest chat clean, then beside 1% of clients that
    /// stop reading; fails unless the gateway closes them (4001) with its
    /// memory bounded and the honest clients unharmed.
    Slow(Box<slow::SlowArgs>),
    /// Time from a queue or presence change to each of 1,000 agents of a
    /// group, and deliveries missed.
    Fanout(Box<fanout::FanoutArgs>),
    /// Chat load while the gateway is killed (SIGKILL) and restarted K
    /// times; fails on an acked message lost, a duplicate or a seq gap.
    Crash(Box<crash::CrashArgs>),
    /// One client process of `idle` (started by `idle` itself).
    #[command(hide = true)]
    IdleWorker(idle::WorkerArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Echo(args) => echo::run(args),
        Command::Idle(args) => idle::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Junk(args) => junk::run(*args),
        Command::Slow(args) => slow::run(*args),
        Command::Fanout(args) => fanout::run(*args),
        Command::Crash(args) => crash::run(*args),
        Command::IdleWorker(args) => idle::run_worker(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain of contexts is the message; a backtrace would only
            // bury it.
            eprintln!("kefu-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
