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
//!   and until the visitor holds its durable `ack`? With
//!   `--attachment-share`, a mix of image-sized attachments and text.
//! - `junk` (`junk.rs`) and `slow` (`slow.rs`): regression runs of the
//!   same chat, clean and then beside connections that send garbage or
//!   stop reading (`abuse.rs` compares the two): do honest clients notice?
//! - `fanout` (`fanout.rs`): how long until every agent of a group sees a
//!   queue or presence change?
//! - `crash` (`crash.rs`): is anything acked lost, stored twice or skipped
//!   when the gateway is killed with SIGKILL under load, again and again?
//!
//! Further chat scenarios grow here over the same pieces: the minimal
//! client WebSocket in `ws.rs` and the measurements in `stats.rs`.
//!
//! # Output
//!
//! The output layer is shared (`report.rs`, `progress.rs`, `html.rs`):
//!
//! - on a terminal, a live progress bar on stderr says the phase
//!   (connecting, warm-up, measuring, draining) and the counts so far; it
//!   is not drawn (and costs nothing) when stderr is not a terminal;
//! - at the end, a fixed-width table of the results on stderr (rates,
//!   latency percentiles, CPU per message, RSS, losses, checks);
//! - exactly one JSON line on stdout, always: every script in `tools/`
//!   and CI reads it from there. `--json` means "the JSON only": the table
//!   is left out (warnings stay on stderr);
//! - `--html FILE`: also a self-contained page with the latency
//!   distribution as an SVG chart and every parameter of the run.
//!
//! A new scenario plugs in as `report.rs`'s module doc says: a `Progress`
//! while it runs, then `Output::emit` with its report, table and curves.
//!
//! Targets are refused unless they are loopback addresses
//! (`--allow-non-loopback` overrides): this tool generates load, and a
//! mistyped URL must not point it at someone else.

mod abuse;
mod chat;
mod crash;
mod echo;
mod fanout;
mod html;
mod idle;
mod junk;
mod progress;
mod report;
mod slow;
mod stats;
mod ws;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::report::{Output, OutputArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "kefu's capacity tool: WebSocket load, latency and memory per connection")]
struct Cli {
    #[command(subcommand)]
    command: Command,

    #[command(flatten)]
    output: OutputArgs,
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
    // Parsed in two steps so that the subcommand's matches (every
    // argument, with where its value came from) reach the HTML report.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let out = match matches.subcommand() {
        Some((name, sub)) => Output::from_matches(cli.output, name, sub),
        None => Output { args: cli.output, ..Output::default() },
    };
    let result = match cli.command {
        Command::Echo(args) => echo::run(args, &out),
        Command::Idle(args) => idle::run(args, &out),
        Command::Chat(args) => chat::run(args, &out),
        Command::Junk(args) => junk::run(*args, &out),
        Command::Slow(args) => slow::run(*args, &out),
        Command::Fanout(args) => fanout::run(*args, &out),
        Command::Crash(args) => crash::run(*args, &out),
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
