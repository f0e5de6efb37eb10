//! `tiercast`: run a node, chat by hand, mint tokens, run the demo, load
//! and plan. This file parses the command line, sets up tracing and the
//! runtime, and maps outcomes to exit codes; each command (a module in
//! `src/commands/`) is a thin shell over the workspace's libraries.
//!
//! Exit codes: 0 success; 1 failure (the demo: a message was lost; loadgen:
//! a delivery lost or a send failed);
//! 64 a bad configuration or flag (checked before anything binds).

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{bench_fanout, demo, device, listen, loadgen, send, serve, token};

#[derive(Parser)]
#[command(
    name = "tiercast",
    version,
    about = "Tiercast: tiered fan-out message delivery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a single node in-process, exchange messages between simulated
    /// devices over QUIC on loopback in every tier, and report what was
    /// delivered.
    Demo(demo::DemoArgs),
    /// Run a single node (edge + engine, embedded store) for development.
    Dev(serve::NodeArgs),
    /// Run the engine service: the publisher HTTP API, and the store that
    /// edge processes share (`node.store_url`). With `backplane.kind=redis`
    /// it publishes through Redis Cluster.
    Engine(serve::NodeArgs),
    /// Run an edge: QUIC for devices, on a Redis Cluster backplane, with the
    /// engine service's store (`--set node.store_url=http://host:port`).
    Edge(serve::NodeArgs),
    /// Mint a token for a user (or a publisher).
    Token(token::TokenArgs),
    /// Connect as a device and print every message it receives.
    Listen(device::DeviceArgs),
    /// Connect as a device and send a message (or each line of stdin).
    Send(send::SendArgs),
    /// Measure what each fan-out tier costs Redis and the store per message,
    /// with E edges on a Redis Cluster (scripts/fanout-figures.sh runs it).
    BenchFanout(bench_fanout::BenchFanoutArgs),
    /// Load scenarios and capacity planning.
    Loadgen(loadgen::LoadgenArgs),
}

/// A configuration or usage error: exit 64 with one line.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A usage error (exit 64) with this one-line message.
fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr);
    // Logs go to stderr as text, or one JSON object a line with
    // TIERCAST_LOG_FORMAT=json (for a log pipeline); RUST_LOG sets the level.
    match std::env::var("TIERCAST_LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().init(),
        Ok("text") | Err(_) => logs.init(),
        Ok(other) => {
            eprintln!("tiercast: TIERCAST_LOG_FORMAT must be text or json, not {other:?}");
            return ExitCode::from(2);
        }
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tiercast: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) if e.is::<UsageError>() => {
            eprintln!("tiercast: {e}");
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("tiercast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Demo(a) => demo::run(a).await,
        Command::Dev(a) => serve::run(serve::Role::Dev, a).await,
        Command::Engine(a) => serve::run(serve::Role::Engine, a).await,
        Command::Edge(a) => serve::run(serve::Role::Edge, a).await,
        Command::Token(a) => token::run(a),
        Command::Listen(a) => listen::run(a).await,
        Command::Send(a) => send::run(a).await,
        Command::BenchFanout(a) => bench_fanout::run(a).await,
        Command::Loadgen(a) => loadgen::run(a).await,
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Writes `text` to `path`, naming the file in the error.
fn write_file(path: &std::path::Path, text: impl AsRef<[u8]>) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes `value` to `path` as pretty JSON with a final newline.
fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    write_file(path, serde_json::to_string_pretty(value)? + "\n")
}
