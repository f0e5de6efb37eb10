//! `tiercast loadgen run` and `tiercast loadgen plan`: scenarios against a
//! deployment (or servers started here), and fleet sizes from a run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::{usage, write_file, write_json};

#[derive(Args)]
pub struct LoadgenArgs {
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
    /// What changed between two runs (`--json` reports), per tier and for
    /// the servers, judged against the run-to-run noise.
    Compare(LoadgenCompareArgs),
    /// Combine several generators' reports of one run (each with its own
    /// --user-offset and --run-id) into one: counts added, latencies from
    /// their histograms merged (`run --hdr`).
    Merge(LoadgenMergeArgs),
    /// Predict a scenario's server CPU and latency on N edges from a run on
    /// fewer (self-hosted on a Redis Cluster), and compare with runs
    /// measured at those sizes.
    Predict(LoadgenPredictArgs),
}

#[derive(Args)]
struct LoadgenPredictArgs {
    /// The calibration: a `run --json` report from `--self-hosted --redis`
    /// (an engine service and its edges; per-process CPU).
    #[arg(long)]
    calibration: PathBuf,
    /// A run of the same scenario at another edge count: what each further
    /// edge costs is learnt from it (without it, nothing).
    #[arg(long)]
    learn: Option<PathBuf>,
    /// Edge counts to predict (repeatable).
    #[arg(long)]
    edges: Vec<usize>,
    /// Runs measured at other edge counts, compared with their prediction
    /// (repeatable).
    #[arg(long)]
    measured: Vec<PathBuf>,
    /// Write the prediction as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct LoadgenMergeArgs {
    /// The generators' `run --json` reports.
    #[arg(required = true, num_args = 2..)]
    reports: Vec<PathBuf>,
    /// Each report's histograms (`run --hdr`), one per report, in the same
    /// order.
    #[arg(long, required = true)]
    hdr: Vec<PathBuf>,
    /// Write the merged report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the merged histograms as HdrHistogram percentile
    /// distributions.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write the merged histograms as an HdrHistogram interval log.
    #[arg(long)]
    out_hdr: Option<PathBuf>,
}

#[derive(Args)]
struct LoadgenCompareArgs {
    /// The baseline run's JSON.
    a: PathBuf,
    /// The run to compare with it.
    b: PathBuf,
    /// Another run of the baseline's setup (repeatable): the spread of
    /// these around A is each figure's noise.
    #[arg(long)]
    baseline: Vec<PathBuf>,
    /// Write the comparison as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
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
    /// A deployment's edge QUIC address, `host:port` or `ip:port`
    /// (repeatable), without --self-hosted. A name is resolved once, and
    /// every address it has is an edge.
    #[arg(long = "edge")]
    edge_addrs: Vec<String>,
    /// A deployment's edge `/metrics` URL (repeatable): the run reads the
    /// edges' CPU and memory there, so that it can calibrate a plan.
    #[arg(long)]
    edge_metrics: Vec<String>,
    /// Another server's `/metrics` URL (engines; repeatable): its CPU
    /// counts with the edges'.
    #[arg(long)]
    server_metrics: Vec<String>,
    /// The name the edges' certificate must carry (TLS server name).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Several generators on one deployment: this one's users start after
    /// this many (users OFFSET+1 ..= OFFSET+N), so generators never share a
    /// user or a device.
    #[arg(long, default_value_t = 0)]
    user_offset: u64,
    /// Several generators on one deployment: a distinct number per
    /// generator (0-65535) gives each its own block of conversation ids.
    #[arg(long)]
    run_id: Option<u16>,
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
    /// Client UDP sockets to spread the devices over [default: one per 250
    /// devices, at least 8]. Too few drop datagrams in a reconnect storm
    /// (the report's `loadgen.receive_drops`).
    #[arg(long)]
    sockets: Option<usize>,
    /// What drives the devices: `core` (many devices per socket on one
    /// loop each, what a large run needs) or `sessions` (an SDK session per
    /// device, the application's own code path).
    #[arg(long, default_value = "core", value_parser = ["core", "sessions"])]
    driver: String,
    /// The SDK's reorder window per device, in ms (its default: 20; 0 never
    /// holds a message).
    #[arg(long, default_value_t = 20)]
    reorder_window_ms: u64,
    /// Drop this percentage of the datagrams the edges send to the
    /// devices (each device's socket loses them), to measure loss
    /// recovery on loopback.
    #[arg(long, default_value_t = 0.0)]
    client_loss_pct: f64,
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
    /// Write the latency histograms (per tier and overall) as an
    /// HdrHistogram interval log: what `loadgen merge` combines.
    #[arg(long)]
    hdr: Option<PathBuf>,
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
    /// The JSON a self-hosted `loadgen run --json` wrote (repeatable: one
    /// run per tier, e.g. chat-small, groups-medium and broadcast-huge, and
    /// each tier's cost comes from the run that measured it).
    #[arg(long, required = true)]
    calibration: Vec<PathBuf>,
    /// Redis CPU per SPUBLISH measured by scripts/redis-capacity.sh (its
    /// JSON): the shards are sized from it instead of the workload's
    /// assumed publishes per shard.
    #[arg(long)]
    redis_calibration: Option<PathBuf>,
    /// Write the sizes as terraform.tfvars.json for terraform/.
    #[arg(long)]
    tfvars: Option<PathBuf>,
    /// Write the whole plan as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn run(a: LoadgenArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        LoadgenCommand::Run(a) => run_scenario(*a).await,
        LoadgenCommand::Plan(a) => plan(a),
        LoadgenCommand::Compare(a) => compare(a),
        LoadgenCommand::Merge(a) => merge(a),
        LoadgenCommand::Predict(a) => predict(a),
    }
}

async fn run_scenario(a: LoadgenRunArgs) -> anyhow::Result<ExitCode> {
    use tiercast_loadgen::scenario::Scenario;
    use tiercast_loadgen::target::TargetSpec;
    let mut scenario = Scenario::load(&a.scenario).map_err(usage)?;
    if !scenario.stages.is_empty() && (a.duration.is_some() || a.rate.is_some()) {
        return Err(usage(
            "the scenario has [[stages]]: they set its duration and rates (drop --duration and --rate, or edit the stages)",
        ));
    }
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
        let mut edges: Vec<SocketAddr> = Vec::new();
        for e in &a.edge_addrs {
            let found: Vec<SocketAddr> = tokio::net::lookup_host(e.as_str())
                .await
                .map_err(|err| usage(format!("--edge {e}: {err}")))?
                .collect();
            if found.is_empty() {
                return Err(usage(format!("--edge {e}: the name has no address")));
            }
            for f in found {
                if !edges.contains(&f) {
                    edges.push(f);
                }
            }
        }
        let ca_pem = std::fs::read_to_string(&ca)
            .map_err(|e| usage(format!("--ca {}: {e}", ca.display())))?;
        TargetSpec::External {
            edges,
            api,
            secret,
            ca_pem,
            edge_metrics: a.edge_metrics.clone(),
            server_metrics: a.server_metrics.clone(),
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
    if !(0.0..=50.0).contains(&a.client_loss_pct) {
        return Err(usage("--client-loss-pct must be 0..=50"));
    }
    if a.sockets == Some(0) {
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
    let outcome = tiercast_loadgen::run::run(tiercast_loadgen::run::RunOptions {
        scenario: scenario.clone(),
        target,
        sockets: a
            .sockets
            .unwrap_or_else(|| tiercast_loadgen::run::default_sockets(scenario.devices())),
        reorder_window: std::time::Duration::from_millis(a.reorder_window_ms),
        client_loss: a.client_loss_pct / 100.0,
        progress: !a.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        user_offset: a.user_offset,
        run_id: a.run_id,
        server_name: a.server_name.clone(),
        driver: if a.driver == "sessions" {
            tiercast_loadgen::run::Driver::Sessions
        } else {
            tiercast_loadgen::run::Driver::Core
        },
    })
    .await?;
    let report = &outcome.report;
    print!("{}", report.render());
    if let Some(path) = &a.json {
        write_json(path, report)?;
    }
    if let Some(path) = &a.hgrm {
        write_file(path, tiercast_loadgen::hgrm::render(&outcome.histograms))?;
    }
    if let Some(path) = &a.hdr {
        let log = tiercast_loadgen::merge::write_log(&outcome.histograms, report.run_seconds)
            .map_err(anyhow::Error::msg)?;
        std::fs::write(path, log).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.plot {
        tiercast_loadgen::plot::draw(
            path,
            &format!("tiercast loadgen: {}", scenario.name),
            &report.timeline,
            &outcome.histograms,
            report
                .reconnect_storm
                .as_ref()
                .map_or(&[][..], |s| &s.reconnects_per_s),
        )
        .with_context(|| format!("drawing {}", path.display()))?;
    }
    if report.send_errors > 0 {
        eprintln!(
            "tiercast loadgen: {} sends failed (by code in the report's errors)",
            report.send_errors
        );
    }
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        eprintln!("tiercast loadgen: {} deliveries lost", report.total.lost);
        ExitCode::FAILURE
    })
}

fn plan(a: LoadgenPlanArgs) -> anyhow::Result<ExitCode> {
    use tiercast_loadgen::plan;
    let workload = plan::Workload::load(&a.workload).map_err(usage)?;
    let mut cals = Vec::new();
    for path in &a.calibration {
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("--calibration {}: {e}", path.display())))?;
        let run: tiercast_loadgen::report::RunReport =
            serde_json::from_str(&text).map_err(|e| {
                usage(format!(
                    "--calibration {}: not a `loadgen run --json` report: {e}",
                    path.display()
                ))
            })?;
        let mut cal = plan::Calibration::from_run(&run)
            .map_err(|e| usage(format!("--calibration {}: {e}", path.display())))?;
        cal.source = path.file_name().map_or_else(
            || path.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        cals.push(cal);
    }
    let redis = match &a.redis_calibration {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("--redis-calibration {}: {e}", path.display())))?;
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |f| f.to_string_lossy().into_owned(),
            );
            Some(
                plan::RedisCapacity::parse(&text, &name)
                    .map_err(|e| usage(format!("--redis-calibration {}: {e}", path.display())))?,
            )
        }
        None => None,
    };
    let p = plan::plan_with(&workload, &cals, redis.as_ref());
    print!("{}", plan::render(&workload, &cals, &p));
    if let Some(path) = &a.tfvars {
        write_json(path, &plan::tfvars(&workload, &p))?;
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({"workload": workload, "calibrations": cals, "plan": p});
        write_json(path, &v)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn predict(a: LoadgenPredictArgs) -> anyhow::Result<ExitCode> {
    use tiercast_loadgen::predict::{Model, Split};
    let split = |path: &std::path::Path| -> anyhow::Result<Split> {
        let r = read_report(path)?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        Split::of(&r, &name).map_err(usage)
    };
    if a.edges.is_empty() && a.measured.is_empty() {
        return Err(usage("give --edges N or --measured RUN.json (repeatable)"));
    }
    if let Some(n) = a.edges.iter().find(|&&n| n == 0 || n > 1_000) {
        return Err(usage(format!("--edges {n}: must be 1..=1000")));
    }
    let cal = split(&a.calibration)?;
    let learn = a.learn.as_deref().map(split).transpose()?;
    let measured = a
        .measured
        .iter()
        .map(|p| split(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let model = Model::calibrate(&cal, learn.as_ref()).map_err(usage)?;
    let rows = tiercast_loadgen::predict::predict(&model, &cal, &a.edges, &measured);
    print!("{}", tiercast_loadgen::predict::render(&model, &cal, &rows));
    if let Some(path) = &a.json {
        let v =
            serde_json::json!({"calibration": cal, "learnt": learn, "model": model, "rows": rows});
        write_json(path, &v)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn merge(a: LoadgenMergeArgs) -> anyhow::Result<ExitCode> {
    if a.hdr.len() != a.reports.len() {
        return Err(usage(format!(
            "{} reports and {} --hdr files: give each report's histograms (run --hdr), in the same order",
            a.reports.len(),
            a.hdr.len()
        )));
    }
    let mut runs = Vec::new();
    for (report, hdr) in a.reports.iter().zip(&a.hdr) {
        let r = read_report(report)?;
        let bytes =
            std::fs::read(hdr).map_err(|e| usage(format!("--hdr {}: {e}", hdr.display())))?;
        let h = tiercast_loadgen::merge::read_log(&bytes)
            .map_err(|e| usage(format!("--hdr {}: {e}", hdr.display())))?;
        runs.push((r, h));
    }
    let (report, histograms) = tiercast_loadgen::merge::merge(&runs).map_err(usage)?;
    print!("{}", report.render());
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &a.hgrm {
        write_file(path, tiercast_loadgen::hgrm::render(&histograms))?;
    }
    if let Some(path) = &a.out_hdr {
        let log = tiercast_loadgen::merge::write_log(&histograms, report.run_seconds)
            .map_err(anyhow::Error::msg)?;
        std::fs::write(path, log).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "tiercast loadgen: {} deliveries lost, {} sends failed (all generators)",
            report.total.lost, report.send_errors
        );
        ExitCode::FAILURE
    })
}

fn read_report(path: &std::path::Path) -> anyhow::Result<tiercast_loadgen::report::RunReport> {
    let text =
        std::fs::read_to_string(path).map_err(|e| usage(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        usage(format!(
            "{}: not a `loadgen run --json` report: {e}",
            path.display()
        ))
    })
}

fn compare(a: LoadgenCompareArgs) -> anyhow::Result<ExitCode> {
    use tiercast_loadgen::compare;
    let base = read_report(&a.a)?;
    let other = read_report(&a.b)?;
    let repeats = a
        .baseline
        .iter()
        .map(|p| read_report(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let changes = compare::compare(&base, &other, &repeats);
    print!("{}", compare::render(&changes, !repeats.is_empty()));
    if let Some(path) = &a.json {
        write_json(path, &changes)?;
    }
    Ok(ExitCode::SUCCESS)
}
