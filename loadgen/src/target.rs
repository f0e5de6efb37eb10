//! What a load run talks to: a deployment given by address, or one that
//! loadgen starts itself on loopback (`--self-hosted`): a single node
//! (`tiercast edge` on an embedded store and the in-process backplane), or
//! an engine service and N edges over a Redis Cluster that
//! `scripts/redis-cluster.sh up` started. Self-hosted servers are separate
//! processes, so their CPU time and memory are measured apart from
//! loadgen's own (from `/proc`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context, bail};
use tiercast_engine::auth::TokenKeys;

/// A server process loadgen started (and may restart).
#[derive(Debug)]
pub struct ServerProc {
    pub role: String,
    exe: std::path::PathBuf,
    args: Vec<String>,
    cpus: Option<String>,
    running: Mutex<Running>,
    /// CPU seconds of earlier processes of this server (before restarts).
    retired_cpu_s: Mutex<f64>,
}

#[derive(Debug)]
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(
        exe: &std::path::Path,
        role: &str,
        args: &[String],
        cpus: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut cmd = match cpus {
            Some(list) => {
                let mut c = Command::new("taskset");
                c.args(["-c", list]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the {role}"))?;
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Self { child, lines })
    }
}

impl ServerProc {
    /// Starts `EXE ARGS`, pinned to `cpus` (a `taskset` list) if given.
    fn spawn(
        exe: &std::path::Path,
        role: &str,
        args: &[String],
        cpus: Option<&str>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            role: role.to_owned(),
            exe: exe.to_owned(),
            args: args.to_vec(),
            cpus: cpus.map(str::to_owned),
            running: Mutex::new(Running::start(exe, role, args, cpus)?),
            retired_cpu_s: Mutex::new(0.0),
        })
    }

    /// What the process reports once it is serving: its `--ready-json`
    /// line (the banner around it is for people).
    fn wait_ready(&self) -> anyhow::Result<Ready> {
        let running = self.running.lock().expect("server lock");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = running.lines.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!("the {} did not report ready within 30 s", self.role)
            })?;
            if line.starts_with("{\"ready\"") {
                let r: ReadyLine = serde_json::from_str(&line)
                    .with_context(|| format!("the {}'s ready line: {line}", self.role))?;
                return Ok(r.ready);
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.running.lock().expect("server lock").child.id()
    }

    /// CPU seconds of this server so far, its earlier processes included.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let retired = *self.retired_cpu_s.lock().expect("cpu lock");
        cpu_seconds(self.pid()).map(|c| c + retired)
    }

    /// Sends `signal` (a `kill -s` name) to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let ok = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .context("running kill")?
            .success();
        if !ok {
            bail!("kill -s {signal} {} failed", self.pid());
        }
        Ok(())
    }

    /// Ends the process: SIGTERM (an edge drains) and a wait of up to
    /// `within` for it to exit, then SIGKILL; or SIGKILL at once (`crash`).
    /// Keeps its CPU time.
    fn end(&self, crash: bool, within: Duration) {
        let mut running = self.running.lock().expect("server lock");
        let pid = running.child.id();
        let mut last_cpu = cpu_seconds(pid);
        if crash {
            let _ = running.child.kill();
        } else {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            // A process that has exited but is not yet reaped still shows
            // its CPU time in /proc; read it before reaping.
            if let Some(c) = cpu_seconds(pid) {
                last_cpu = Some(c);
            }
            if exited(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if !exited(pid) {
            let _ = running.child.kill();
        }
        let _ = running.child.wait();
        *self.retired_cpu_s.lock().expect("cpu lock") += last_cpu.unwrap_or(0.0);
    }

    /// Starts the process again with the same arguments except `sets`
    /// (`key=value` replacing the `--set` of that key), and waits until it
    /// is serving.
    fn respawn(&self, sets: &[String]) -> anyhow::Result<()> {
        let key = |kv: &str| kv.split_once('=').map(|(k, _)| k.to_owned());
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                sets.iter()
                    .find(|s| key(a).is_some() && key(s) == key(a))
                    .unwrap_or(a)
                    .clone()
            })
            .collect();
        *self.running.lock().expect("server lock") =
            Running::start(&self.exe, &self.role, &args, self.cpus.as_deref())?;
        self.wait_ready()?;
        Ok(())
    }

    /// A graceful restart: SIGTERM (an edge drains its devices to the
    /// others), wait for the exit, start again on `listen` (the QUIC
    /// address it had, so that its devices find it again), and wait until
    /// it is serving.
    pub fn restart(&self, listen: SocketAddr) -> anyhow::Result<()> {
        self.end(false, Duration::from_secs(30));
        self.respawn(&[format!("edge.listen={listen}")])
    }

    /// A crash and a supervisor's restart: SIGKILL, wait for the exit,
    /// start again with `sets` (the addresses it had, so that its devices
    /// and publishers find it again), and wait until it is serving.
    /// Returns the moment it was listening again.
    pub fn kill_restart(&self, sets: &[String]) -> anyhow::Result<std::time::Instant> {
        self.end(true, Duration::from_secs(10));
        self.respawn(sets)?;
        Ok(std::time::Instant::now())
    }

    /// SIGTERM (the edge drains), then SIGKILL after 10 s.
    fn stop(&self) {
        self.end(false, Duration::from_secs(10));
    }
}

/// The edges of a target, to restart one after another (on a thread of
/// its own while load runs).
pub struct RollingRestart {
    edges: Vec<Arc<ServerProc>>,
    addrs: Vec<SocketAddr>,
}

impl RollingRestart {
    pub fn run(&self) -> anyhow::Result<()> {
        for (e, addr) in self.edges.iter().zip(&self.addrs) {
            e.restart(*addr)?;
        }
        Ok(())
    }
}

/// An edge to crash and restart (on a thread of its own while load runs).
pub struct KillRestart {
    edge: Arc<ServerProc>,
    sets: Vec<String>,
}

impl KillRestart {
    /// Returns the moment the edge listens again.
    pub fn run(&self) -> anyhow::Result<std::time::Instant> {
        self.edge.kill_restart(&self.sets)
    }
}

/// A `/metrics` page, or `None` if it does not come within `within`.
async fn metrics_text(http: &reqwest::Client, url: &str, within: Duration) -> Option<String> {
    tokio::time::timeout(within, async { http.get(url).send().await?.text().await })
        .await
        .ok()?
        .ok()
}

/// Whether process `pid` has exited (a zombie or gone).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let alive = matches!(
            self.running.lock().map(|mut r| r.child.try_wait()),
            Ok(Ok(None))
        );
        if alive {
            self.stop();
        }
    }
}

pub use tiercast_engine::metrics::{cpu_seconds, rss_bytes};

/// How to reach (or start) the deployment under test.
#[derive(Debug, Clone)]
pub enum TargetSpec {
    SelfHosted {
        /// Edges; 1 without Redis is a single node.
        edges: usize,
        /// Redis Cluster seeds (`scripts/redis-cluster.sh up` prints them).
        redis: Vec<String>,
        /// Pin the servers to these CPUs (`taskset` list, e.g. "0").
        cpus: Option<String>,
        /// The server binary (`tiercast`); None: this executable.
        server_bin: Option<std::path::PathBuf>,
    },
    External {
        edges: Vec<SocketAddr>,
        api: String,
        secret: String,
        ca_pem: String,
        /// The edges' `/metrics` URLs (their CPU and memory).
        edge_metrics: Vec<String>,
        /// Other servers' `/metrics` URLs (their CPU).
        server_metrics: Vec<String>,
    },
}

/// A deployment ready for load.
#[derive(Debug)]
pub struct Target {
    pub mode: String,
    pub edges: Vec<SocketAddr>,
    pub api: String,
    pub keys: TokenKeys,
    pub trusted_pem: String,
    pub servers: Vec<Arc<ServerProc>>,
    /// A deployment's edges' and other servers' `/metrics` URLs: where a
    /// run against it reads the servers' CPU and memory.
    pub edge_metrics: Vec<String>,
    /// The HTTP address of each edge started here (self-hosted).
    pub edge_http: Vec<String>,
    pub server_metrics: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    pub fn start(spec: &TargetSpec) -> anyhow::Result<Self> {
        match spec {
            TargetSpec::External {
                edges,
                api,
                secret,
                ca_pem,
                edge_metrics,
                server_metrics,
            } => Ok(Self {
                edge_metrics: edge_metrics.clone(),
                edge_http: Vec::new(),
                server_metrics: server_metrics.clone(),
                mode: "external".into(),
                edges: edges.clone(),
                api: api.trim_end_matches('/').to_owned(),
                keys: TokenKeys::new(secret.as_bytes()),
                trusted_pem: ca_pem.clone(),
                servers: Vec::new(),
                _dir: None,
            }),
            TargetSpec::SelfHosted {
                edges,
                redis,
                cpus,
                server_bin,
            } => {
                let exe = match server_bin {
                    Some(p) => p.clone(),
                    None => std::env::current_exe().context("finding the tiercast executable")?,
                };
                self_hosted(&exe, *edges, redis, cpus.as_deref())
            }
        }
    }

    /// Signals edge `edge` (self-hosted targets only).
    pub fn signal_edge(&self, edge: usize, signal: &str) -> anyhow::Result<()> {
        let role = if self.servers.len() == 1 {
            "edge 0 (single node)".to_owned()
        } else {
            format!("edge {edge}")
        };
        match self.servers.iter().find(|p| p.role == role) {
            Some(p) => p.signal(signal),
            None => {
                bail!("edge {edge}: not a process loadgen started (edge_fault needs --self-hosted)")
            }
        }
    }

    /// Server CPU seconds so far (all processes, restarted ones included),
    /// if self-hosted.
    pub fn server_cpu(&self) -> Option<f64> {
        if self.servers.is_empty() {
            return None;
        }
        self.servers.iter().map(|s| s.cpu_seconds()).sum()
    }

    /// Restarts every edge in turn (self-hosted, on a Redis Cluster): each
    /// drains, exits and comes back on its address before the next goes.
    /// The restarts happen in [`RollingRestart::run`], which returns when
    /// the last edge is serving again.
    pub fn rolling_restart(&self) -> anyhow::Result<RollingRestart> {
        let edges: Vec<Arc<ServerProc>> = self
            .servers
            .iter()
            .filter(|s| s.role.starts_with("edge ") && !s.role.contains("single"))
            .cloned()
            .collect();
        if edges.len() < 2 {
            bail!("a rolling restart needs --self-hosted --edges 2 or more on a Redis Cluster");
        }
        Ok(RollingRestart {
            edges,
            addrs: self.edges.clone(),
        })
    }

    /// SIGKILL to edge `edge` and a restart on its QUIC address (and, on
    /// a single node, its HTTP address: the publishers' API), run by
    /// [`KillRestart::run`].
    pub fn kill_restart(&self, edge: usize) -> anyhow::Result<KillRestart> {
        let single = self.servers.len() == 1;
        let role = if single {
            "edge 0 (single node)".to_owned()
        } else {
            format!("edge {edge}")
        };
        let Some(p) = self.servers.iter().find(|p| p.role == role) else {
            bail!("edge {edge}: not a process loadgen started (edge_fault needs --self-hosted)");
        };
        let quic = self.edges.get(edge).context("no such edge")?;
        let mut sets = vec![format!("edge.listen={quic}")];
        if single {
            let http = self
                .api
                .strip_prefix("http://")
                .context("the node's API address")?;
            sets.push(format!("node.http_listen={http}"));
        }
        Ok(KillRestart {
            edge: p.clone(),
            sets,
        })
    }

    /// A self-hosted single node's delivery-path counters (its `/metrics`,
    /// one read, 3 s at most): what a kill would take with it.
    pub async fn delivery_counters(
        &self,
        http: &reqwest::Client,
    ) -> std::collections::BTreeMap<String, f64> {
        const NAMES: [&str; 7] = [
            "tiercast_backplane_local_dropped_total",
            "tiercast_edge_backplane_gaps_total",
            "tiercast_edge_gap_repairs_total",
            "tiercast_edge_gap_repair_frames_total",
            "tiercast_edge_slow_consumers_total",
            "tiercast_edge_seam_duplicates_total",
            "tiercast_edge_deliveries_total",
        ];
        let url = format!("{}/metrics", self.api);
        let Some(text) = metrics_text(http, &url, Duration::from_secs(3)).await else {
            return Default::default();
        };
        NAMES
            .iter()
            .filter_map(|name| {
                text.lines()
                    .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                    .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                    .map(|v| ((*name).to_owned(), v))
            })
            .collect()
    }

    /// The edges' `/metrics`: as given, or under their HTTP addresses.
    fn metrics_urls(&self) -> Vec<String> {
        if self.edge_metrics.is_empty() {
            self.edge_http
                .iter()
                .map(|h| format!("{h}/metrics"))
                .collect()
        } else {
            self.edge_metrics.clone()
        }
    }

    /// The edges' store figures at the end of a run, from one read of each
    /// edge's `/metrics` (summed over the edges that answered): the
    /// coalesced store calls by op (`tiercast_engine_store_batches_total`
    /// and `..._batched_calls_total`), and the sends' commits
    /// (`tiercast_engine_store_commit_seconds`, histograms added; `None`
    /// when no edge had one).
    pub async fn store_figures(
        &self,
        http: &reqwest::Client,
    ) -> (
        std::collections::BTreeMap<String, crate::report::StoreBatches>,
        Option<crate::report::StoreCommits>,
    ) {
        let mut batches = std::collections::BTreeMap::new();
        let mut commits: Option<crate::report::StoreCommits> = None;
        for url in self.metrics_urls() {
            let Some(text) = metrics_text(http, &url, Duration::from_secs(5)).await else {
                continue;
            };
            add_store_batches(&text, &mut batches);
            if let Some(one) = commit_histogram(&text) {
                commits = Some(match commits {
                    Some(t) => t.add(&one),
                    None => one,
                });
            }
        }
        (batches, commits)
    }

    /// The sum of metric `name` over `urls` (each a `/metrics`), if every
    /// one answered with it.
    async fn scrape(http: &reqwest::Client, urls: &[String], name: &str) -> Option<f64> {
        if urls.is_empty() {
            return None;
        }
        let mut sum = 0.0;
        for url in urls {
            let text = http
                .get(url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            sum += text
                .lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
                .rsplit(' ')
                .next()?
                .parse::<f64>()
                .ok()?;
        }
        Some(sum)
    }

    /// Every `/metrics` URL of a deployment: edges and other servers.
    fn all_metrics(&self) -> Vec<String> {
        self.edge_metrics
            .iter()
            .chain(&self.server_metrics)
            .cloned()
            .collect()
    }

    /// Server CPU seconds so far: the processes loadgen started, or a
    /// deployment's, read from the `/metrics` it was given.
    pub async fn server_cpu_now(&self, http: &reqwest::Client) -> Option<f64> {
        if !self.servers.is_empty() {
            return self.server_cpu();
        }
        Self::scrape(
            http,
            &self.all_metrics(),
            "tiercast_process_cpu_seconds_total",
        )
        .await
    }

    /// The edges' resident memory (started here, or from their `/metrics`).
    pub async fn edge_rss_now(&self, http: &reqwest::Client) -> Option<u64> {
        if !self.servers.is_empty() {
            return self.edge_rss();
        }
        Self::scrape(
            http,
            &self.edge_metrics,
            "tiercast_process_resident_memory_bytes",
        )
        .await
        .map(|b| b as u64)
    }

    /// Every server's resident memory.
    pub async fn server_rss_now(&self, http: &reqwest::Client) -> Option<u64> {
        if !self.servers.is_empty() {
            return self.server_rss();
        }
        Self::scrape(
            http,
            &self.all_metrics(),
            "tiercast_process_resident_memory_bytes",
        )
        .await
        .map(|b| b as u64)
    }

    /// Resident memory of the edge processes, if self-hosted.
    pub fn edge_rss(&self) -> Option<u64> {
        let edges: Vec<&Arc<ServerProc>> = self
            .servers
            .iter()
            .filter(|s| s.role.starts_with("edge"))
            .collect();
        if edges.is_empty() {
            return None;
        }
        edges.iter().map(|s| rss_bytes(s.pid())).sum()
    }

    pub fn server_rss(&self) -> Option<u64> {
        if self.servers.is_empty() {
            return None;
        }
        self.servers.iter().map(|s| rss_bytes(s.pid())).sum()
    }

    /// Stops self-hosted servers (SIGTERM, drain).
    pub fn shutdown(&mut self) {
        for s in &self.servers {
            s.stop();
        }
    }
}

/// What loadgen needs of a server's `--ready-json` line (it also carries
/// `role` and `node_id`).
#[derive(Debug, serde::Deserialize)]
pub struct Ready {
    pub quic: Option<SocketAddr>,
    /// `http://host:port`.
    pub http: String,
    pub certificate: Option<std::path::PathBuf>,
}

#[derive(serde::Deserialize)]
struct ReadyLine {
    ready: Ready,
}

fn self_hosted(
    exe: &std::path::Path,
    edges: usize,
    redis: &[String],
    cpus: Option<&str>,
) -> anyhow::Result<Target> {
    if edges == 0 {
        bail!("--edges must be at least 1");
    }
    if edges > 1 && redis.is_empty() {
        bail!(
            "--edges {edges} needs a Redis Cluster: start one with scripts/redis-cluster.sh up and pass --redis with the nodes it prints"
        );
    }
    let dir = tempfile::tempdir().context("creating a data directory")?;
    let secret = format!("loadgen-{:032x}", rand::random::<u128>());
    let internal = format!("loadgen-internal-{:032x}", rand::random::<u128>());
    let common = |data: &str| -> Vec<String> {
        let mut sets = vec![
            format!("node.token_secret={secret}"),
            format!("auth.internal_secret={internal}"),
            format!("node.data_dir={}", dir.path().join(data).display()),
            "node.http_listen=127.0.0.1:0".into(),
            "edge.listen=127.0.0.1:0".into(),
            "edge.max_connections=200000".into(),
            // Loadgen's devices are bots sending at the scenario's rate:
            // the per-device request limits would cap the load it measures.
            "edge.rates.send.per_s=1000000".into(),
            "edge.rates.send.burst=1000000".into(),
            "edge.rates.fetch.per_s=1000000".into(),
            "edge.rates.fetch.burst=1000000".into(),
            "edge.rates.sync.per_s=1000000".into(),
            "edge.rates.sync.burst=1000000".into(),
        ];
        if !redis.is_empty() {
            let nodes: Vec<String> = redis.iter().map(|n| format!("\"{n}\"")).collect();
            sets.push("backplane.kind=redis".into());
            sets.push(format!("backplane.redis.nodes=[{}]", nodes.join(",")));
        }
        sets.into_iter()
            .flat_map(|s| ["--set".to_owned(), s])
            .collect()
    };
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    let mut pems = Vec::new();
    let mut edge_http = Vec::new();
    let api;
    // An edge's QUIC address and certificate, from its ready line.
    let edge_of = |r: &Ready| -> anyhow::Result<(SocketAddr, String)> {
        let quic = r.quic.context("the edge reported no QUIC address")?;
        let cert = r
            .certificate
            .as_ref()
            .context("the edge reported no certificate")?;
        let pem =
            std::fs::read_to_string(cert).with_context(|| format!("reading {}", cert.display()))?;
        Ok((quic, pem))
    };
    if redis.is_empty() {
        let mut args = vec!["edge".to_owned(), "--ready-json".to_owned()];
        args.extend(common("node"));
        let p = ServerProc::spawn(exe, "edge 0 (single node)", &args, cpus)?;
        let ready = p.wait_ready()?;
        let (quic, pem) = edge_of(&ready)?;
        addrs.push(quic);
        pems.push(pem);
        api = ready.http;
        edge_http.push(api.clone());
        servers.push(Arc::new(p));
    } else {
        let mut args = vec!["engine".to_owned(), "--ready-json".to_owned()];
        args.extend(common("engine"));
        let engine = ServerProc::spawn(exe, "engine", &args, cpus)?;
        api = engine.wait_ready()?.http;
        servers.push(Arc::new(engine));
        for i in 0..edges {
            let mut args = vec!["edge".to_owned(), "--ready-json".to_owned()];
            args.extend(common(&format!("edge{i}")));
            args.extend(["--set".to_owned(), format!("node.store_url={api}")]);
            let p = ServerProc::spawn(exe, &format!("edge {i}"), &args, cpus)?;
            let ready = p.wait_ready()?;
            let (quic, pem) = edge_of(&ready)?;
            edge_http.push(ready.http.clone());
            addrs.push(quic);
            pems.push(pem);
            servers.push(Arc::new(p));
        }
    }
    Ok(Target {
        mode: if redis.is_empty() {
            "self-hosted single node".into()
        } else {
            format!("self-hosted: engine + {edges} edges on Redis Cluster")
        },
        edges: addrs,
        api,
        keys: TokenKeys::new(secret.as_bytes()),
        trusted_pem: pems.join("\n"),
        servers,
        edge_metrics: Vec::new(),
        edge_http,
        server_metrics: Vec::new(),
        _dir: Some(dir),
    })
}

/// Pins every thread of this process to `cpus` (a `taskset` list).
pub fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?
        .success();
    anyhow::ensure!(ok, "taskset could not pin loadgen to CPUs {cpus}");
    Ok(())
}

/// Adds one `/metrics` text's coalesced store calls, by op, to `out`.
fn add_store_batches(
    text: &str,
    out: &mut std::collections::BTreeMap<String, crate::report::StoreBatches>,
) {
    for (prefix, batches) in [
        ("tiercast_engine_store_batches_total{op=\"", true),
        ("tiercast_engine_store_batched_calls_total{op=\"", false),
    ] {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(prefix) else {
                continue;
            };
            let Some((op, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let e = out.entry(op.to_owned()).or_default();
            if batches {
                e.batches += v as u64;
            } else {
                e.calls += v as u64;
            }
        }
    }
}

/// `tiercast_engine_store_commit_seconds` from one `/metrics` text: its
/// cumulative buckets (bounds in ms, `+Inf` as `None`) and its sum.
fn commit_histogram(text: &str) -> Option<crate::report::StoreCommits> {
    const NAME: &str = "tiercast_engine_store_commit_seconds";
    let mut buckets = Vec::new();
    let mut sum_s = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(NAME) else {
            continue;
        };
        if let Some(rest) = rest.strip_prefix("_bucket{le=\"") {
            let (le, value) = rest.split_once("\"} ")?;
            let count = value.split_whitespace().next()?.parse::<f64>().ok()? as u64;
            let bound = match le {
                "+Inf" => None,
                le => Some((le.parse::<f64>().ok()? * 1e6).round() / 1e3),
            };
            buckets.push((bound, count));
        } else if let Some(value) = rest.strip_prefix("_sum ") {
            sum_s = value.split_whitespace().next()?.parse::<f64>().ok();
        }
    }
    if buckets.is_empty() {
        return None;
    }
    Some(crate::report::StoreCommits::from_buckets(
        buckets,
        sum_s.unwrap_or(0.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The histogram as the engine renders it: cumulative buckets in
    /// seconds, then the sum and the count; other metrics around it.
    #[test]
    fn a_commit_histogram_is_read_in_ms_with_its_percentiles_bounds() {
        let text = "\
# HELP tiercast_engine_store_commit_seconds Time to commit one message
# TYPE tiercast_engine_store_commit_seconds histogram
tiercast_engine_store_commit_seconds_sum 0.5
tiercast_engine_store_commit_seconds_count 200
tiercast_engine_store_commit_seconds_bucket{le=\"0.0001\"} 0
tiercast_engine_store_commit_seconds_bucket{le=\"0.0002\"} 0
tiercast_engine_store_commit_seconds_bucket{le=\"0.0004\"} 50
tiercast_engine_store_commit_seconds_bucket{le=\"0.0008\"} 120
tiercast_engine_store_commit_seconds_bucket{le=\"0.0016\"} 197
tiercast_engine_store_commit_seconds_bucket{le=\"0.0032\"} 198
tiercast_engine_store_commit_seconds_bucket{le=\"+Inf\"} 200
tiercast_engine_store_batches_total{op=\"inboxes\"} 3
";
        let c = commit_histogram(text).expect("a histogram");
        assert_eq!(c.count, 200);
        assert!((c.mean_ms - 2.5).abs() < 1e-9, "{}", c.mean_ms);
        assert_eq!(
            c.p50_ms_at_most,
            Some(0.8),
            "the 100th commit is in (0.4, 0.8]"
        );
        assert_eq!(
            c.p99_ms_at_most,
            Some(3.2),
            "the 198th of 200 is within 3.2 ms"
        );
        assert_eq!(c.buckets[2], (Some(0.4), 50));
        // Two edges' histograms add bucket by bucket.
        let both = c.add(&c);
        assert_eq!((both.count, both.buckets[3]), (400, (Some(0.8), 240)));
        assert_eq!(both.p50_ms_at_most, Some(0.8));
        assert!(commit_histogram("tiercast_engine_syncs_total 3\n").is_none());
        // A percentile past the last finite bound has no bound to give.
        let slow =
            crate::report::StoreCommits::from_buckets(vec![(Some(1.0), 90), (None, 100)], 0.0);
        assert_eq!(
            (slow.p50_ms_at_most, slow.p99_ms_at_most),
            (Some(1.0), None)
        );
    }
}
