//! `tiercast bench-fanout`: what each tier costs Redis and the store per
//! message, on a Redis Cluster (scripts/fanout-figures.sh runs it).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::{usage, write_json};

#[derive(Args)]
pub struct BenchFanoutArgs {
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

pub async fn run(a: BenchFanoutArgs) -> anyhow::Result<ExitCode> {
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
        write_json(&path, &rows)?;
    }
    let lost: u64 = rows.iter().map(|r| r.lost).sum();
    Ok(if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
