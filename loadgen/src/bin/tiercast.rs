//! `tiercast`: run a node, chat by hand, mint tokens, run the demo.
//!
//! Exit codes: 0 success; 1 failure (the demo: a message was lost; loadgen:
//! a delivery lost or a send failed);
//! 64 a bad configuration or flag (checked before anything binds).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use tiercast_client::{Client, ClientConfig, Delivery};
use tiercast_edge::{Config, Node};
use tiercast_engine::auth::{TokenKeys, now_unix};
use tiercast_loadgen::demo::{self, DemoOptions};

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
    /// devices over QUIC on loopback, and report what was delivered.
    Demo(DemoArgs),
    /// Run a single node (edge + engine, embedded store) for development.
    Dev(NodeArgs),
    /// Run the engine service: the publisher HTTP API, and the store that
    /// edge processes share (`node.store_url`). With `backplane.kind=redis`
    /// it publishes through Redis Cluster.
    Engine(NodeArgs),
    /// Run an edge: QUIC for devices, on a Redis Cluster backplane, with the
    /// engine service's store (`--set node.store_url=http://host:port`).
    Edge(NodeArgs),
    /// Mint a token for a user (or a publisher).
    Token(TokenArgs),
    /// Connect as a device and print every message it receives.
    Listen(DeviceArgs),
    /// Connect as a device and send a message (or each line of stdin).
    Send(SendArgs),
    /// Measure what each fan-out tier costs Redis and the store per message,
    /// with E edges on a Redis Cluster (scripts/fanout-figures.sh runs it).
    BenchFanout(BenchFanoutArgs),
    /// Load scenarios and capacity planning.
    Loadgen(LoadgenArgs),
}

#[derive(Args)]
struct LoadgenArgs {
    #[command(subcommand)]
    command: LoadgenCommand,
}

#[derive(Subcommand)]
enum LoadgenCommand {
    /// Run a scenario (loadgen/scenarios/*.toml) against a deployment given
    /// by address, or one started here (--self-hosted), and report per tier.
    Run(Box<LoadgenRunArgs>),
    /// Size a fleet for a workload from a run's measured figures.
    Plan(LoadgenPlanArgs),
}

#[derive(Args)]
struct LoadgenRunArgs {
    /// The scenario file.
    #[arg(long)]
    scenario: PathBuf,
    /// Start the servers here on loopback: a single node, or with --redis an
    /// engine service and --edges edges over that Redis Cluster.
    #[arg(long)]
    self_hosted: bool,
    /// Edges to start (--self-hosted; more than 1 needs --redis).
    #[arg(long, default_value_t = 1)]
    edges: usize,
    /// Redis Cluster seeds for --self-hosted (scripts/redis-cluster.sh up
    /// prints them).
    #[arg(long, env = "TIERCAST_REDIS_NODES", value_delimiter = ',')]
    redis: Vec<String>,
    /// A deployment's edge QUIC address (repeatable), without --self-hosted.
    #[arg(long = "edge")]
    edge_addrs: Vec<SocketAddr>,
    /// The deployment's engine HTTP API, e.g. http://10.0.0.5:7480.
    #[arg(long)]
    api: Option<String>,
    /// The deployment's token secret (loadgen mints device and publisher
    /// tokens).
    #[arg(long, env = "TIERCAST_NODE__TOKEN_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// PEM certificates to trust for the edges.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Override the scenario's measured duration, seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Override the scenario's send rate, messages per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Override the scenario's user count.
    #[arg(long)]
    users: Option<u64>,
    /// Client UDP sockets to spread the devices over.
    #[arg(long, default_value_t = 8)]
    sockets: usize,
    /// The SDK's reorder window per device, in ms (its default: 20; 0 never
    /// holds a message).
    #[arg(long, default_value_t = 20)]
    reorder_window_ms: u64,
    /// Pin the self-hosted servers to these CPUs (taskset list, e.g. 0).
    #[arg(long)]
    server_cpus: Option<String>,
    /// The server binary --self-hosted starts (default: this `tiercast`).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Pin loadgen itself to these CPUs (e.g. 1), so servers and load do
    /// not share cores.
    #[arg(long)]
    loadgen_cpus: Option<String>,
    /// Write the report as JSON (docs/loadgen.md has the schema).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write HdrHistogram percentile distributions per tier.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Draw latency percentiles and throughput over time as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct LoadgenPlanArgs {
    /// The workload to size (loadgen/workloads/*.toml).
    #[arg(long)]
    workload: PathBuf,
    /// The JSON a self-hosted `loadgen run --json` wrote.
    #[arg(long)]
    calibration: PathBuf,
    /// Write the sizes as terraform.tfvars.json for terraform/.
    #[arg(long)]
    tfvars: Option<PathBuf>,
    /// Write the whole plan as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BenchFanoutArgs {
    /// Redis Cluster masters, comma-separated host:port.
    #[arg(long, env = "TIERCAST_REDIS_NODES", value_delimiter = ',')]
    redis: Vec<String>,
    #[arg(long, default_value_t = 3)]
    edges: usize,
    /// Group sizes (members, one device each online).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,20000")]
    sizes: Vec<u64>,
    /// Messages per group and mode.
    #[arg(long, default_value_t = 10)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    body: usize,
    /// Share of devices that pull each tier-3 body (0..=1).
    #[arg(long, default_value_t = 0.1)]
    pull_fraction: f64,
    /// Write the rows as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    /// Users, each with --devices devices.
    #[arg(long, default_value_t = 8)]
    users: u64,
    #[arg(long, default_value_t = 2)]
    devices: u64,
    #[arg(long, default_value_t = 4)]
    chats: u64,
    /// Members per chat.
    #[arg(long, default_value_t = 3)]
    chat_size: u64,
    /// Messages each sender sends into each of its chats.
    #[arg(long, default_value_t = 20)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct NodeArgs {
    /// A TOML configuration file ([node], [engine], [edge] sections).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a setting: `--set edge.listen=127.0.0.1:7443` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Also print one JSON line once serving, for programs that start the
    /// server: `{"ready":{"role":..,"quic":..,"http":..,"node_id":..,"certificate":..}}`.
    #[arg(long)]
    ready_json: bool,
}

/// The `--ready-json` line.
fn print_ready(
    role: &str,
    quic: Option<std::net::SocketAddr>,
    http: std::net::SocketAddr,
    node_id: u16,
    certificate: Option<&Path>,
) {
    let line = serde_json::json!({"ready": {
        "role": role,
        "quic": quic.map(|a| a.to_string()),
        "http": format!("http://{http}"),
        "node_id": node_id,
        "certificate": certificate.map(|p| p.display().to_string()),
    }});
    println!("{line}");
}

#[derive(Args)]
struct TokenArgs {
    /// The user id the token is for.
    #[arg(long, required_unless_present = "publisher")]
    user: Option<u64>,
    /// Mint a publisher token for the HTTP API instead.
    #[arg(long)]
    publisher: bool,
    /// Validity in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    ttl: u64,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Args)]
struct DeviceArgs {
    /// The edge's QUIC address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    addr: SocketAddr,
    /// A token (`tiercast token --user ID`); or give --user to mint one from
    /// the development secret in --data-dir.
    #[arg(long, env = "TIERCAST_TOKEN")]
    token: Option<String>,
    #[arg(long)]
    user: Option<u64>,
    /// This device's id (non-zero; keep it across runs).
    #[arg(long)]
    client_id: Option<u64>,
    /// Certificate to trust (PEM); `tiercast dev` writes its own here.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Where `tiercast dev` keeps its data (development secret, certificate).
    #[arg(long, default_value = "tiercast-data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    conversation: u64,
    /// The message; without it, each line of stdin is sent.
    text: Option<String>,
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

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
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
        Command::Demo(a) => demo_cmd(a).await,
        Command::Dev(a) => dev(a).await,
        Command::Engine(a) => engine_cmd(a).await,
        Command::Edge(a) => edge_cmd(a).await,
        Command::Token(a) => token(a),
        Command::Listen(a) => listen(a).await,
        Command::Send(a) => send(a).await,
        Command::BenchFanout(a) => bench_fanout(a).await,
        Command::Loadgen(LoadgenArgs {
            command: LoadgenCommand::Run(a),
        }) => loadgen_run(*a).await,
        Command::Loadgen(LoadgenArgs {
            command: LoadgenCommand::Plan(a),
        }) => loadgen_plan(a),
    }
}

async fn bench_fanout(a: BenchFanoutArgs) -> anyhow::Result<ExitCode> {
    if a.redis.is_empty() {
        return Err(usage(
            "--redis (or TIERCAST_REDIS_NODES) is required: start a cluster with scripts/redis-cluster.sh up",
        ));
    }
    if a.edges == 0 || a.sizes.is_empty() || a.messages == 0 || !(16..=16 * 1024).contains(&a.body)
    {
        return Err(usage(
            "--edges, --sizes and --messages must be positive, --body 16..=16384",
        ));
    }
    let opts = tiercast_loadgen::fanout::FanoutOptions {
        redis: a.redis,
        edges: a.edges,
        sizes: a.sizes,
        messages: a.messages,
        body: a.body,
        pull_fraction: a.pull_fraction.clamp(0.0, 1.0),
    };
    let rows = tiercast_loadgen::fanout::run(opts, |line| eprintln!("{line}")).await?;
    print!("{}", tiercast_loadgen::fanout::table(&rows));
    if let Some(path) = a.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let lost: u64 = rows.iter().map(|r| r.lost).sum();
    Ok(if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn loadgen_run(a: LoadgenRunArgs) -> anyhow::Result<ExitCode> {
    use tiercast_loadgen::scenario::Scenario;
    use tiercast_loadgen::target::TargetSpec;
    let mut scenario = Scenario::load(&a.scenario).map_err(usage)?;
    if let Some(d) = a.duration {
        scenario.duration_s = d;
    }
    if let Some(r) = a.rate {
        scenario.rate.messages_per_s = r;
    }
    if let Some(u) = a.users {
        scenario.users = u;
    }
    scenario.validate().map_err(usage)?;
    let target = if a.self_hosted {
        if !a.edge_addrs.is_empty() || a.api.is_some() {
            return Err(usage(
                "--self-hosted starts its own servers: drop --edge and --api",
            ));
        }
        TargetSpec::SelfHosted {
            edges: a.edges,
            redis: a.redis,
            cpus: a.server_cpus.clone(),
            server_bin: a.server_bin.clone(),
        }
    } else {
        let (Some(api), Some(secret), Some(ca)) = (a.api, a.secret, a.ca) else {
            return Err(usage(
                "give --self-hosted, or a deployment: --edge ADDR (repeatable) --api URL --secret S --ca FILE",
            ));
        };
        if a.edge_addrs.is_empty() {
            return Err(usage("at least one --edge ADDR is needed"));
        }
        let ca_pem = std::fs::read_to_string(&ca)
            .map_err(|e| usage(format!("--ca {}: {e}", ca.display())))?;
        TargetSpec::External {
            edges: a.edge_addrs,
            api,
            secret,
            ca_pem,
        }
    };
    if let Some(cpus) = &a.loadgen_cpus {
        tiercast_loadgen::target::pin_self(cpus).map_err(|e| usage(e.to_string()))?;
    }
    if let TargetSpec::SelfHosted { edges, redis, .. } = &target
        && *edges > 1
        && redis.is_empty()
    {
        return Err(usage(
            "--edges above 1 needs --redis (start a cluster with scripts/redis-cluster.sh up)",
        ));
    }
    if a.sockets == 0 {
        return Err(usage("--sockets must be at least 1"));
    }
    eprintln!(
        "tiercast loadgen: scenario {} ({}), {} devices, {} msg/s {:?} for {} s after {} s warm-up",
        scenario.name,
        scenario.description,
        scenario.devices(),
        scenario.rate.messages_per_s,
        scenario.rate.kind,
        scenario.duration_s,
        scenario.warmup_s
    );
    let report = tiercast_loadgen::run::run(tiercast_loadgen::run::RunOptions {
        scenario: scenario.clone(),
        target,
        sockets: a.sockets,
        reorder_window: std::time::Duration::from_millis(a.reorder_window_ms),
        progress: !a.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    })
    .await?;
    print!("{}", report.text);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.hgrm {
        std::fs::write(path, tiercast_loadgen::hgrm::render(&report.histograms))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.plot {
        tiercast_loadgen::plot::draw(
            path,
            &format!("tiercast loadgen: {}", scenario.name),
            &report.timeline,
            &report.histograms,
        )
        .with_context(|| format!("drawing {}", path.display()))?;
    }
    if report.send_errors > 0 {
        eprintln!(
            "tiercast loadgen: {} sends failed (by code in the report's errors)",
            report.send_errors
        );
    }
    Ok(if report.lost == 0 && report.send_errors == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("tiercast loadgen: {} deliveries lost", report.lost);
        ExitCode::FAILURE
    })
}

fn loadgen_plan(a: LoadgenPlanArgs) -> anyhow::Result<ExitCode> {
    use tiercast_loadgen::plan;
    let workload = plan::Workload::load(&a.workload).map_err(usage)?;
    let text = std::fs::read_to_string(&a.calibration)
        .map_err(|e| usage(format!("--calibration {}: {e}", a.calibration.display())))?;
    let run: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        usage(format!(
            "--calibration {}: not JSON: {e}",
            a.calibration.display()
        ))
    })?;
    let cal = plan::Calibration::from_run(&run).map_err(usage)?;
    let p = plan::plan(&workload, &cal);
    print!("{}", plan::render(&workload, &cal, &p));
    if let Some(path) = &a.tfvars {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&plan::tfvars(&workload, &p))? + "\n",
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({"workload": workload, "calibration": cal, "plan": p});
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn demo_cmd(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let opts = DemoOptions {
        users: a.users,
        devices: a.devices,
        chats: a.chats,
        chat_size: a.chat_size,
        messages: a.messages,
        payload: a.payload,
        ..DemoOptions::default()
    };
    opts.validate().map_err(usage)?;
    println!(
        "tiercast demo: {} users x {} devices, {} chats of {}, {} messages per sender per chat, {}-byte bodies",
        opts.users, opts.devices, opts.chats, opts.chat_size, opts.messages, opts.payload
    );
    println!("single node in-process: embedded store, in-process backplane, QUIC on loopback\n");
    let run = demo::run(opts).await?;
    print!("{}", run.figures.render());
    if let Some(path) = a.json {
        let json = serde_json::to_string_pretty(&run.figures)?;
        std::fs::write(&path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if run.figures.lost == 0 && run.figures.unexpected == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("tiercast demo: {} deliveries lost", run.figures.lost);
        ExitCode::FAILURE
    })
}

fn parse_sets(sets: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    sets.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| usage(format!("--set {s}: expected SECTION.KEY=VALUE")))
        })
        .collect()
}

const DEV_SECRET_FILE: &str = "dev-secret";

/// Writes a file only its owner can read (a secret, a device id).
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(contents)
}

/// The configuration of a node. Only `tiercast dev` (`dev_secret`) falls
/// back to a development secret, created once in the data directory,
/// readable by its owner only; every other command needs a configured
/// secret and says so in one line.
fn load_config(a: &NodeArgs, dev_secret: bool) -> anyhow::Result<Config> {
    let mut overrides = parse_sets(&a.set)?;
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let loaded = Config::load(a.config.as_deref(), vars.clone(), &overrides);
    let secret_missing = matches!(
        &loaded,
        Err(tiercast_edge::ConfigError::Invalid(e)) if e.setting == "node.token_secret"
    );
    if !(dev_secret && secret_missing) {
        return loaded.map_err(|e| usage(e.to_string()));
    }
    // Peek at the data directory with a stand-in secret.
    let mut probe = overrides.clone();
    probe.push((
        "node.token_secret".into(),
        "x".repeat(tiercast_engine::auth::MIN_SECRET_BYTES),
    ));
    let peek = Config::load(a.config.as_deref(), vars.clone(), &probe)
        .map_err(|e| usage(e.to_string()))?;
    let path = peek.node.data_dir.join(DEV_SECRET_FILE);
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().to_owned(),
        Err(_) => {
            std::fs::create_dir_all(&peek.node.data_dir)
                .with_context(|| format!("creating {}", peek.node.data_dir.display()))?;
            let s: String = (0..48)
                .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
                .collect();
            write_private(&path, s.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            s
        }
    };
    overrides.push(("node.token_secret".into(), secret));
    Config::load(a.config.as_deref(), vars, &overrides).map_err(|e| usage(e.to_string()))
}

async fn dev(a: NodeArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&a, true)?;
    let node = Node::start(cfg.clone()).await?;
    let now = now_unix();
    println!("tiercast dev node running");
    println!("  QUIC edge:    {}", node.quic_addr);
    println!("  HTTP API:     http://{}", node.http_addr);
    println!("  data:         {}", cfg.node.data_dir.display());
    if let Some(p) = &node.cert_path {
        println!(
            "  certificate:  {} (self-signed; clients pass --ca)",
            p.display()
        );
    }
    println!("  token user 1: {}", node.keys.mint_user(1, now, 24 * 3600));
    println!(
        "  publisher:    {}",
        node.keys.mint_publisher("dev", now, 24 * 3600)
    );
    println!("more tokens: tiercast token --user ID   (Ctrl-C stops the node)");
    if a.ready_json {
        print_ready(
            "dev",
            Some(node.quic_addr),
            node.http_addr,
            node.node_id(),
            node.cert_path.as_deref(),
        );
    }
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    eprintln!("tiercast dev: shutting down");
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn engine_cmd(a: NodeArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&a, false)?;
    let svc = tiercast_edge::EngineService::start(cfg).await?;
    println!("tiercast engine running");
    println!("  HTTP API:     http://{}", svc.http_addr);
    println!("  node id:      {}", svc.engine.node_id());
    println!(
        "  edges use:    --set node.store_url=http://{}",
        svc.http_addr
    );
    if a.ready_json {
        print_ready("engine", None, svc.http_addr, svc.engine.node_id(), None);
    }
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    eprintln!("tiercast engine: shutting down");
    svc.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn edge_cmd(a: NodeArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&a, false)?;
    if cfg.node.store_url.is_none() {
        eprintln!("tiercast edge: no node.store_url; using an embedded store of its own");
    }
    let node = Node::start(cfg).await?;
    println!("tiercast edge running");
    println!("  QUIC edge:    {}", node.quic_addr);
    println!("  HTTP API:     http://{}", node.http_addr);
    println!("  node id:      {}", node.node_id());
    if let Some(p) = &node.cert_path {
        println!(
            "  certificate:  {} (self-signed; clients pass --ca)",
            p.display()
        );
    }
    if a.ready_json {
        print_ready(
            "edge",
            Some(node.quic_addr),
            node.http_addr,
            node.node_id(),
            node.cert_path.as_deref(),
        );
    }
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    eprintln!("tiercast edge: shutting down");
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

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

fn token(a: TokenArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&a.node, false)?;
    let keys = cfg.token_keys();
    let now = now_unix();
    if a.ttl == 0 || a.ttl > cfg.auth.max_token_lifetime_s {
        return Err(usage(format!(
            "--ttl must be 1..={} (auth.max_token_lifetime_s)",
            cfg.auth.max_token_lifetime_s
        )));
    }
    let t = match (a.publisher, a.user) {
        (true, _) => keys.mint_publisher("cli", now, a.ttl),
        (false, Some(0)) => return Err(usage("--user must be non-zero")),
        (false, Some(user)) => keys.mint_user(user, now, a.ttl),
        (false, None) => return Err(usage("--user or --publisher is required")),
    };
    println!("{t}");
    Ok(ExitCode::SUCCESS)
}

/// Where the CLI keeps the device id the edge issued to (user, role), so
/// `listen` and `send` are two devices of the user and a repeated run is
/// the same device.
fn device_id_file(data_dir: &Path, user: u64, role: u64) -> std::path::PathBuf {
    let name = if role == 1 { "listen" } else { "send" };
    data_dir
        .join("devices")
        .join(format!("user-{user}-{name}.id"))
}

fn read_device_id(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Keeps an issued device id (owner-only: it is the user's device).
fn write_device_id(path: &Path, id: u64) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(path, id.to_string().as_bytes())
}

async fn connect(
    a: &DeviceArgs,
    role: u64,
) -> anyhow::Result<(Client, tiercast_client::Deliveries)> {
    let (token, user) = match (&a.token, a.user) {
        (Some(t), _) => (t.clone(), a.user),
        (None, Some(user)) => {
            let path = a.data_dir.join(DEV_SECRET_FILE);
            let secret = std::fs::read_to_string(&path).map_err(|_| {
                usage(format!(
                    "--user needs the development secret at {} (run `tiercast dev`), or pass --token",
                    path.display()
                ))
            })?;
            (
                TokenKeys::new(secret.trim().as_bytes()).mint_user(user, now_unix(), 3600),
                Some(user),
            )
        }
        (None, None) => {
            return Err(usage(
                "give --token, or --user with a `tiercast dev` data dir",
            ));
        }
    };
    // The device id: given, kept from an earlier run, or issued now (0).
    let kept = user.map(|u| device_id_file(&a.data_dir, u, role));
    let client_id = match a.client_id {
        Some(0) => return Err(usage("--client-id must be non-zero")),
        Some(c) => c,
        None => kept.as_deref().and_then(read_device_id).unwrap_or(0),
    };
    let ca =
        a.ca.clone()
            .unwrap_or_else(|| a.data_dir.join("dev-cert.pem"));
    let pem = read_ca(&ca)?;
    let mut cfg = ClientConfig::new(a.addr, pem, token, client_id);
    cfg.server_name = a.server_name.clone();
    cfg.device = format!("cli-{}", if role == 1 { "listen" } else { "send" });
    let connected = match Client::connect(cfg.clone()).await {
        // A kept id the edge no longer knows (the device expired): a new
        // device.
        Err(e)
            if a.client_id.is_none()
                && client_id != 0
                && e.code() == Some(tiercast_schemas::wire::ErrorCode::UnknownDevice) =>
        {
            cfg.client_id = 0;
            Client::connect(cfg).await
        }
        other => other,
    };
    let (client, rx) = connected.map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = device_id_file(&a.data_dir, client.user_id, role);
    if a.client_id.is_none()
        && let Err(e) = write_device_id(&path, client.client_id)
    {
        eprintln!("note: cannot keep the device id in {}: {e}", path.display());
    }
    Ok((client, rx))
}

fn read_ca(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        usage(format!(
            "cannot read certificate {}: {e} (pass --ca)",
            path.display()
        ))
    })
}

async fn listen(a: DeviceArgs) -> anyhow::Result<ExitCode> {
    let (client, mut rx) = connect(&a, 1).await?;
    eprintln!(
        "listening as user {} (device {}); Ctrl-C to stop",
        client.user_id, client.client_id
    );
    let mut last_notified: std::collections::HashMap<u64, u64> = Default::default();
    loop {
        let d = tokio::select! {
            d = rx.recv() => d,
            _ = shutdown_signal() => break,
        };
        match d {
            Some(Delivery::Message(m)) => {
                print_message(&m);
                // Tier-1 messages wait in this device's inbox until acked;
                // acking a tier-2 or tier-3 id removes nothing, and is fine.
                client
                    .ack(&[m.id])
                    .await
                    .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            }
            Some(Delivery::Notify {
                conversation,
                message_id,
            }) => {
                // Tier 3: the notification names the newest message (it
                // may stand for several); show those not shown yet.
                let shown = *last_notified.get(&conversation).unwrap_or(&0);
                if message_id <= shown {
                    continue;
                }
                let mut new = if shown == 0 {
                    client
                        .pull(conversation, message_id)
                        .await
                        .map_err(|e| anyhow::anyhow!("pull: {e}"))?
                        .into_iter()
                        .collect()
                } else {
                    let (page, _) = client
                        .fetch(conversation, message_id + 1, 100)
                        .await
                        .map_err(|e| anyhow::anyhow!("fetch: {e}"))?;
                    page.into_iter()
                        .filter(|m| m.id > shown)
                        .collect::<Vec<_>>()
                };
                new.sort_by_key(|m| m.id);
                new.iter().for_each(print_message);
                last_notified.insert(conversation, message_id);
            }
            Some(other) => println!("{other:?}"),
            None => {
                let why = client.closed().await;
                return Err(anyhow::anyhow!("disconnected: {why}"));
            }
        }
    }
    client.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn print_message(m: &tiercast_schemas::wire::Message) {
    println!(
        "[conversation {}] user {}: {}  (id {})",
        m.conversation,
        m.sender,
        String::from_utf8_lossy(&m.body),
        m.id
    );
    let _ = std::io::stdout().flush();
}

async fn send(a: SendArgs) -> anyhow::Result<ExitCode> {
    let (client, _rx) = connect(&a.device, 2).await?;
    let base = rand::random::<u64>() >> 16;
    let lines: Vec<String> = match a.text {
        Some(t) => vec![t],
        None => std::io::stdin().lines().collect::<Result<_, _>>()?,
    };
    for (i, line) in lines.into_iter().enumerate() {
        let ok = client
            .send(a.conversation, base + i as u64 + 1, Bytes::from(line))
            .await
            .map_err(|e| anyhow::anyhow!("send: {e}"))?;
        println!("sent {} to conversation {}", ok.message_id, ok.conversation);
    }
    client.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
