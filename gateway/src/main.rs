//! `kefu`: the live customer-service gateway.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kefu_gateway::config::{Config, Overrides};

/// mimalloc, with the storage's cached pages in exact-size blocks
/// (`page_blocks.rs`: mimalloc's size class for them is a fifth larger).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: kefu_gateway::alloc::Counting<kefu_gateway::page_blocks::Paged<mimalloc::MiMalloc>> =
    kefu_gateway::alloc::Counting(kefu_gateway::page_blocks::Paged(mimalloc::MiMalloc));

/// With `--features system-alloc`: glibc's allocator, which heap profilers
/// such as heaptrack see (mimalloc is linked in and calls no `malloc`).
/// For measuring, not for serving.
#[cfg(feature = "system-alloc")]
#[global_allocator]
static GLOBAL: kefu_gateway::alloc::Counting<std::alloc::System> =
    kefu_gateway::alloc::Counting(std::alloc::System);

/// kefu: an edge gateway for live customer service.
///
/// Visitors and agents hold WebSockets to it; it routes each conversation
/// between them in real time.
#[derive(Parser)]
#[command(name = "kefu", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    ///
    /// Configuration is read from defaults, then --config FILE (TOML), then
    /// KEFU_<SECTION>_<FIELD> environment variables (e.g. KEFU_SERVER_LISTEN,
    /// KEFU_LIMITS_MAX_MESSAGE_BYTES), then these flags. Sections and fields
    /// are listed in docs/configuration.md and by `kefu config`.
    Serve(ServeArgs),
    /// Print the effective configuration (after file, environment and flags)
    /// as TOML, then exit. The JWT secret and API keys are shown redacted.
    Config(ServeArgs),
    /// Print a client JWT signed with the configured secret (auth.jwt_secret,
    /// or the one generated in the data directory).
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// `agent` or `visitor`.
    #[arg(long)]
    role: String,
    /// User id (the `sub` claim).
    #[arg(long)]
    sub: String,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Skill groups (agent) or the group asked for (visitor); repeatable.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Profile entries shown to agents, `key=value`; repeatable.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl_s: u64,
    #[command(flatten)]
    config: ServeArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Client listener address [server.listen; default 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Control plane listener (gRPC, REST /api/v1, /healthz, /readyz, /metrics) [server.admin_listen; default 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Data directory [storage.dir; default ./data].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Number of shards, 0 = one per core [server.shards; default 0].
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Serve the diagnostic echo endpoint /ws/echo [diagnostics.echo].
    #[arg(long)]
    echo: bool,
}

impl ServeArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            data: self.data.clone(),
            shards: self.shards,
            echo: self.echo,
        };
        Ok(Config::load(self.config.as_deref(), &overrides)?)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Config(args) => {
            let config = args.load()?;
            let printed =
                toml::to_string_pretty(&config.redacted()).context("rendering the configuration")?;
            print!("{printed}");
            Ok(())
        }
        Command::Token(args) => {
            let config = args.config.load()?;
            let (secret, _) =
                kefu_gateway::secret::load_or_create(&config.auth.jwt_secret, &config.storage.dir)?;
            let role = kefu_proto::Role::parse(&args.role)
                .filter(|r| *r != kefu_proto::Role::Bot)
                .ok_or_else(|| anyhow::anyhow!("--role must be agent or visitor, not {:?}", args.role))?;
            let mut meta = std::collections::BTreeMap::new();
            for entry in &args.meta {
                let (k, v) = entry
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--meta {entry:?}: expected key=value"))?;
                meta.insert(k.to_string(), v.to_string());
            }
            let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let claims = kefu_core::auth::Claims {
                sub: args.sub,
                role,
                name: args.name,
                groups: args.groups,
                meta,
                exp: now_s + args.ttl_s,
                nbf: None,
            };
            let key = kefu_core::auth::JwtKey::new(secret.as_bytes(), config.core().auth)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", key.sign(&claims));
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.load()?;
            init_logging(&config)?;
            let running = kefu_gateway::server::start(config)?;
            let stop = running.stop_flag();
            for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                // A second signal while draining exits at once.
                signal_hook::flag::register_conditional_shutdown(signal, 1, stop.clone())
                    .context("installing signal handlers")?;
                signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
            }
            running.wait()
        }
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f),
        _ => EnvFilter::try_new(&config.log.level),
    }
    .context("log.level is not a valid filter")?;
    use std::io::IsTerminal;
    // Colour only for a person at a terminal: log files and journald get plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}
