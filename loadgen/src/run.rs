//! `tiercast loadgen run`: drives a scenario against a deployment and
//! reports what every device got.
//!
//! Honest measurement:
//! - open loop: every send has a scheduled time, and is started at that time
//!   whatever the previous sends are doing; latency counts from the
//!   scheduled time, so a stall shows as latency (coordinated omission is
//!   corrected by construction, not by interpolation);
//! - exact accounting: every device's expected messages (each member's
//!   devices but the sender's) against its receipts; lost, duplicate and
//!   out-of-order counts are exact. A tier-3 notification covers every
//!   earlier message of its channel (notifications coalesce by design);
//! - many UDP sockets (`--sockets`) so one socket is not the bottleneck;
//!   loadgen's CPU is reported beside the servers'.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tiercast_client::resume::IdMap;
use tiercast_client::{ClientError, Event, Session, SessionConfig};

use crate::ledger::{Audience, Receipts, Sent, histogram};
use crate::report::{
    ConnectFigures, FaultFigures, LoadgenFigures, LostDelivery, Machine, RunFigures, RunReport,
    ServerFigures, ServerProcess, StormFigures, TargetInfo, TierFigures, TimelinePoint, Versions,
};
use crate::scenario::{ConversationPlan, FaultSignal, Scenario, layout};
use crate::schedule::{Schedule, SendAs, Step};
use crate::sim::{SimDevice, publish, stamp_of, stamped_body};
use crate::swarm::{DeviceSpec, Reaction, Sink, Swarm, SwarmConfig};
use crate::target::{Target, TargetSpec, cpu_seconds};
use tiercast_bench::udp_floor::UdpFloor;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub scenario: Scenario,
    pub target: TargetSpec,
    /// Client UDP sockets the devices are spread over.
    pub sockets: usize,
    /// Each device's SDK reorder window.
    pub reorder_window: Duration,
    /// Share (0..1) of the datagrams the edges send that the devices'
    /// sockets drop, to measure loss recovery on loopback.
    pub client_loss: f64,
    pub progress: bool,
    /// Several generators on one deployment: this one's users are
    /// `user_offset + 1 ..= user_offset + users` (its conversations' members
    /// too), so that no two generators share a user.
    pub user_offset: u64,
    /// Several generators on one deployment: the conversations of run `id`
    /// take ids from `1,000,000 + id x 100,000` (otherwise a random block).
    pub run_id: Option<u16>,
    /// The name the edges' certificate is checked against.
    pub server_name: String,
    /// What drives the devices.
    pub driver: Driver,
}

/// What drives loadgen's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Driver {
    /// Many devices per socket on one loop each ([`crate::swarm`]): what a
    /// large run needs.
    #[default]
    Core,
    /// An SDK [`Session`] per device (tasks per device on quinn): the
    /// application's own code path.
    Sessions,
}

impl Driver {
    pub fn name(self) -> &'static str {
        match self {
            Self::Core => "core",
            Self::Sessions => "sessions",
        }
    }
}

/// One device's receipts, written by its event task.
#[derive(Debug, Default)]
struct DeviceLog {
    /// First receipt of each message id: microseconds since the run base.
    arrivals: IdMap<u64>,
    /// Tier-3 notifications per conversation, in arrival order.
    notifies: IdMap<Vec<(u64, u64)>>,
    duplicates: IdMap<u64>,
    out_of_order: IdMap<u64>,
    newest: IdMap<u64>,
    /// When the last connection was lost (for reconnect times).
    lost_at_us: Option<u64>,
    reconnect_us: Vec<u64>,
    /// When each connect completed (us since the run's base).
    connected_at_us: Vec<u64>,
    errors: HashMap<String, u64>,
    /// Index into the target's edges of the current connection.
    edge: Option<usize>,
}

impl Receipts for MutexGuard<'_, DeviceLog> {
    fn arrival(&self, id: u64) -> Option<u64> {
        self.arrivals.get(&id).copied()
    }

    fn notified(&self, conversation: u64, id: u64) -> Option<u64> {
        self.notifies
            .get(&conversation)?
            .iter()
            .find(|(n, _)| *n >= id)
            .map(|&(_, at)| at)
    }
}

/// The outcome of a run: the report, and the histograms (for `--hgrm` and
/// `--plot`).
#[derive(Debug)]
pub struct RunOutcome {
    pub report: RunReport,
    pub histograms: Vec<(String, Histogram<u64>)>,
}

fn now_us(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}

pub async fn run(opts: RunOptions) -> anyhow::Result<RunOutcome> {
    let s = opts.scenario.clone();
    let mut target = tokio::task::spawn_blocking({
        let spec = opts.target.clone();
        move || Target::start(&spec)
    })
    .await??;
    let result = drive(&s, &opts, &target).await;
    target.shutdown();
    result
}

/// A simulated device of the run: its session (none on the core, where
/// the swarm holds it) and its log.
struct Device {
    sim: SimDevice,
    session: Option<Session>,
    log: Arc<Mutex<DeviceLog>>,
    started_us: u64,
}

/// The run's devices, connected.
struct Fleet {
    devices: Vec<Device>,
    /// The devices' core, with `Driver::Core`.
    swarm: Option<Arc<Swarm>>,
    connected: u64,
    connect_elapsed: Duration,
    pulls: Arc<AtomicU64>,
    /// Datagrams the devices' sockets dropped on purpose (`client_loss`).
    dropped: Arc<AtomicU64>,
    /// The local ports of loadgen's client sockets.
    ports: Vec<u16>,
}

impl Fleet {
    /// Drops device `i`'s connection as a network blip would.
    fn reconnect(&self, i: usize) {
        match (&self.devices[i].session, &self.swarm) {
            (Some(s), _) => s.reconnect(),
            (None, Some(swarm)) => swarm.reconnect(i),
            (None, None) => {}
        }
    }

    async fn send(
        &self,
        i: usize,
        conversation: u64,
        client_msg_id: u64,
        body: bytes::Bytes,
        within: Duration,
    ) -> Result<tiercast_client::SendOk, ClientError> {
        match (&self.devices[i].session, &self.swarm) {
            (Some(s), _) => s.send(conversation, client_msg_id, body, within).await,
            (None, Some(swarm)) => {
                swarm
                    .send(i, conversation, client_msg_id, body, within)
                    .await
            }
            (None, None) => Err(ClientError::Connect("no session".into())),
        }
    }

    fn stats(&self, i: usize) -> Arc<tiercast_client::SessionStats> {
        match (&self.devices[i].session, &self.swarm) {
            (Some(s), _) => s.stats(),
            (None, Some(swarm)) => swarm.stats(i),
            (None, None) => Arc::default(),
        }
    }

    async fn resumed_from(&self, i: usize, conversation: u64) -> (Option<u64>, Option<u64>) {
        match (&self.devices[i].session, &self.swarm) {
            (Some(s), _) => s.resumed_from(conversation),
            (None, Some(swarm)) => swarm.resumed_from(i, conversation).await,
            (None, None) => (None, None),
        }
    }

    async fn close(&self) {
        for d in &self.devices {
            if let Some(s) = &d.session {
                s.close();
            }
        }
        if let Some(swarm) = &self.swarm {
            swarm.close().await;
        }
    }

    fn logs(&self) -> Vec<MutexGuard<'_, DeviceLog>> {
        self.devices
            .iter()
            .map(|d| d.log.lock().expect("log"))
            .collect()
    }

    /// Devices whose current connection is to edge `edge` (all with
    /// `None`).
    fn on_edge(&self, edge: Option<usize>) -> Vec<usize> {
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| edge.is_none() || d.log.lock().expect("log").edge == edge)
            .map(|(i, _)| i)
            .collect()
    }
}

/// Sends so far, and failed sends by (tier, code).
#[derive(Default)]
struct Outbox {
    sent: Mutex<Vec<Sent>>,
    errors: Mutex<HashMap<(u8, String), u64>>,
}

impl Outbox {
    fn failed(&self, tier: u8, code: impl Into<String>) {
        *self
            .errors
            .lock()
            .expect("errors")
            .entry((tier, code.into()))
            .or_default() += 1;
    }
}

/// Loadgen's client sockets for `devices` devices when `--sockets` is not
/// given: one per 250 devices, at least 8. With 8 sockets for 8,000
/// devices, an edge restart's handshake replies overflowed their receive
/// buffers (2,917-12,563 datagrams dropped per socket); with 32, none.
pub fn default_sockets(devices: u64) -> usize {
    (devices.div_ceil(250) as usize).max(8)
}

/// Datagrams the kernel dropped at the UDP sockets bound to 127.0.0.1 on
/// `ports` (full receive buffers), from `/proc/net/udp`; `None` where that
/// cannot be read.
fn receive_drops(ports: &[u16]) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    Some(drops_in(&table, ports))
}

/// The drops of the sockets on `ports` in a `/proc/net/udp` table (the
/// local address in hex `IP:PORT`, the drop count last).
fn drops_in(table: &str, ports: &[u16]) -> u64 {
    let mut drops = 0;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(d)) = (fields.get(1), fields.last()) else {
            continue;
        };
        let Some((_, port)) = local.split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        if ports.contains(&port) {
            drops += d.parse::<u64>().unwrap_or(0);
        }
    }
    drops
}

/// Connects every device of the scenario at its connect rate, spread over
/// the target's edges and `opts.sockets` UDP sockets: on the devices' core
/// ([`Driver::Core`]) or as one SDK session each ([`Driver::Sessions`]).
async fn connect(
    s: &Scenario,
    opts: &RunOptions,
    target: &Target,
    base: Instant,
    progress: &Arc<Progress>,
    pull_fraction: Arc<HashMap<u64, f64>>,
) -> anyhow::Result<Fleet> {
    let now = tiercast_engine::auth::now_unix();
    let dropped = Arc::new(AtomicU64::new(0));
    let pulls = Arc::new(AtomicU64::new(0));
    let offset = opts.user_offset;
    let sims: Vec<SimDevice> = SimDevice::all(s.users, s.devices_per_user)
        .map(|d| SimDevice {
            user: d.user + offset,
            ..d
        })
        .collect();
    let logs: Vec<Arc<Mutex<DeviceLog>>> = sims.iter().map(|_| Arc::default()).collect();
    let mut sockets: Vec<quinn::Endpoint> = Vec::new();
    let mut swarm = None;
    let ports = match opts.driver {
        Driver::Sessions => {
            sockets = (0..opts.sockets.max(1))
                .map(|_| {
                    let bind = "127.0.0.1:0".parse().expect("literal");
                    if opts.client_loss > 0.0 {
                        tiercast_client::lossy::lossy_client_endpoint(
                            bind,
                            4 << 20,
                            opts.client_loss,
                            dropped.clone(),
                        )
                    } else {
                        tiercast_client::client_endpoint(bind, 4 << 20)
                    }
                })
                .collect::<Result<_, _>>()
                .context("binding client sockets")?;
            sockets
                .iter()
                .map(|e| e.local_addr().map(|a| a.port()))
                .collect::<Result<Vec<_>, _>>()
                .context("reading the client sockets' ports")?
        }
        Driver::Core => {
            let tls = tiercast_client::tls::client_tls(&target.trusted_pem)
                .map_err(|e| anyhow::anyhow!("the edges' certificate: {e}"))?;
            let mut cfg = SwarmConfig::new(tls);
            cfg.server_name = opts.server_name.clone();
            cfg.report_duplicates = true;
            cfg.reorder_window = opts.reorder_window;
            cfg.loss = opts.client_loss;
            cfg.dropped = dropped.clone();
            cfg.idle_timeout = Duration::from_secs_f64(s.device_idle_timeout_s);
            cfg.shed_backoff_base = Duration::from_secs_f64(s.device_shed_backoff_base_s);
            cfg.shed_backoff_cap = Duration::from_secs_f64(s.device_shed_backoff_cap_s);
            let sink = Arc::new(LogSink {
                logs: logs.clone(),
                base,
                progress: progress.clone(),
                edges: target.edges.clone(),
                fractions: pull_fraction.clone(),
                pulls: pulls.clone(),
            });
            let ipv6 = target.edges.first().is_some_and(SocketAddr::is_ipv6);
            let started =
                Swarm::start(cfg, opts.sockets, ipv6, sink).context("binding client sockets")?;
            let ports = started.ports().to_vec();
            swarm = Some(Arc::new(started));
            ports
        }
    };
    let mut devices = Vec::with_capacity(sims.len());
    let gap = Duration::from_secs_f64(1.0 / s.connect_rate);
    let connect_start = Instant::now();
    for (i, (sim, log)) in sims.into_iter().zip(logs).enumerate() {
        let e = i % target.edges.len();
        let mut order = target.edges[e..].to_vec();
        order.extend_from_slice(&target.edges[..e]);
        let token = target.keys.mint_user(sim.user, now, 24 * 3600);
        let session = match &swarm {
            Some(swarm) => {
                swarm.add(DeviceSpec {
                    edges: order,
                    token,
                    device: sim.label("loadgen"),
                    client_id: 0,
                });
                None
            }
            None => {
                let mut cfg = SessionConfig::new(order, target.trusted_pem.clone(), token, 0);
                cfg.endpoint = Some(sockets[i % sockets.len()].clone());
                cfg.report_duplicates = true;
                cfg.reorder_window = opts.reorder_window;
                cfg.client.device = sim.label("loadgen");
                cfg.client.server_name = opts.server_name.clone();
                cfg.client.idle_timeout = Duration::from_secs_f64(s.device_idle_timeout_s);
                cfg.shed_backoff_base = Duration::from_secs_f64(s.device_shed_backoff_base_s);
                cfg.shed_backoff_cap = Duration::from_secs_f64(s.device_shed_backoff_cap_s);
                let (session, events) = Session::start(cfg);
                tokio::spawn(consume(
                    events,
                    log.clone(),
                    base,
                    progress.clone(),
                    target.edges.clone(),
                    PullCtx {
                        session: session_client_getter(&session),
                        fractions: pull_fraction.clone(),
                        pulls: pulls.clone(),
                    },
                ));
                Some(session)
            }
        };
        devices.push(Device {
            sim,
            session,
            log,
            started_us: now_us(base),
        });
        // Pace the connects (open loop on the connect schedule).
        tokio::time::sleep_until((connect_start + gap * (i as u32 + 1)).into()).await;
    }
    let connect_deadline = Instant::now() + Duration::from_secs(60) + gap * s.devices() as u32;
    while progress.connected.load(Ordering::Relaxed) < s.devices() {
        if Instant::now() > connect_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Fleet {
        devices,
        swarm,
        connected: progress.connected.load(Ordering::Relaxed),
        connect_elapsed: connect_start.elapsed(),
        pulls,
        dropped,
        ports,
    })
}

/// What happened at a storm or fault step, for the report.
#[derive(Default)]
struct Incidents {
    /// Devices told to reconnect by the storm.
    storm: Option<usize>,
    /// The devices on the faulted edge (every device for a rolling
    /// restart), and when.
    fault: Option<(Vec<usize>, u64)>,
    restart: Option<tokio::task::JoinHandle<(anyhow::Result<()>, Instant)>>,
    /// A killed single node's counters just before the kill.
    counters_before: std::collections::BTreeMap<String, f64>,
}

/// The driver: conversations, devices, the schedule's steps at their
/// times, the settle, then the ledger's tally into a report.
async fn drive(s: &Scenario, opts: &RunOptions, target: &Target) -> anyhow::Result<RunOutcome> {
    let base = Instant::now();
    let http = reqwest::Client::new();
    let now = tiercast_engine::auth::now_unix();
    let publisher = target.keys.mint_publisher("loadgen", now, 24 * 3600);

    // Conversations, with the tier each is served by.
    let block = opts.run_id.unwrap_or_else(rand::random::<u16>);
    let first_id = 1_000_000 + u64::from(block) * 100_000;
    let mut plans = layout(s, first_id);
    for p in &mut plans {
        for m in &mut p.members {
            *m += opts.user_offset;
        }
    }
    let tiers = create_conversations(&http, &target.api, &publisher, s, &plans).await?;

    // The machine's floor, before any load.
    let floor = measure_floor(s).await;
    let rss0 = target.edge_rss_now(&http).await;
    let progress = Progress::new(opts.progress, s.devices());
    let pull_fraction: HashMap<u64, f64> = plans
        .iter()
        .map(|p| (p.id, s.conversations[p.group].pull_fraction))
        .collect();
    let fleet = Arc::new(connect(s, opts, target, base, &progress, Arc::new(pull_fraction)).await?);
    let rss1 = target.edge_rss_now(&http).await;
    // Server and loadgen CPU over the same window: from here (everyone
    // connected) to the end of the settle.
    let server_cpu0 = target.server_cpu_now(&http).await;
    let process_cpu0: Vec<Option<f64>> = target.servers.iter().map(|p| p.cpu_seconds()).collect();
    let loadgen_cpu0 = cpu_seconds(std::process::id());

    // The open-loop send schedule.
    let outbox = Arc::new(Outbox::default());
    // A user's first device sends for the user.
    let sender_of: HashMap<u64, usize> = fleet
        .devices
        .iter()
        .enumerate()
        .filter(|(_, d)| d.sim.sends())
        .map(|(i, d)| (d.sim.user, i))
        .collect();
    let send_start = Instant::now();
    let send_start_us = now_us(base);
    let mut in_flight: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut client_msg_id = 0u64;
    let mut incidents = Incidents::default();
    let steps = Schedule::new(s, &plans, rand::rngs::StdRng::from_rng(&mut rand::rng()))
        .map_err(|e| anyhow::anyhow!(e))?;
    for (t, step) in steps {
        tokio::time::sleep_until((send_start + Duration::from_secs_f64(t)).into()).await;
        let (conversation, from, warm) = match step {
            Step::Storm => {
                let edge = s.reconnect_storm.as_ref().map_or(0, |st| st.edge);
                let on_edge = fleet.on_edge(Some(edge));
                for &i in &on_edge {
                    fleet.reconnect(i);
                }
                incidents.storm = Some(on_edge.len());
                continue;
            }
            Step::Fault => {
                let f = s
                    .edge_fault
                    .as_ref()
                    .context("a fault step has its fault")?;
                // A rolling restart moves every device at some point.
                let on_edge = if f.signal == FaultSignal::Restart {
                    let restart = target.rolling_restart()?;
                    incidents.restart = Some(tokio::task::spawn_blocking(move || {
                        let r = restart.run();
                        (r, Instant::now())
                    }));
                    fleet.on_edge(None)
                } else if f.signal == FaultSignal::KillRestart {
                    if target.servers.len() == 1 {
                        incidents.counters_before = target.delivery_counters(&http).await;
                    }
                    let restart = target.kill_restart(f.edge)?;
                    let on_edge = fleet.on_edge(Some(f.edge));
                    incidents.restart = Some(tokio::task::spawn_blocking(move || {
                        // Back when it listens again (its ready line).
                        let r = restart.run().map(|_| ());
                        (r, Instant::now())
                    }));
                    on_edge
                } else {
                    let on_edge = fleet.on_edge(Some(f.edge));
                    target.signal_edge(f.edge, f.signal.name())?;
                    on_edge
                };
                incidents.fault = Some((on_edge, now_us(base)));
                continue;
            }
            Step::Send {
                conversation,
                from,
                warm,
            } => (conversation, from, warm),
        };
        let scheduled_us = send_start_us + (t * 1e6) as u64;
        let body = stamped_body(scheduled_us, s.payload_bytes);
        let tier = tiers.get(&conversation).copied().unwrap_or(1);
        let outbox = outbox.clone();
        progress.sends.fetch_add(1, Ordering::Relaxed);
        match from {
            SendAs::Member(user) => {
                let Some(&di) = sender_of.get(&user) else {
                    continue;
                };
                client_msg_id += 1;
                let cmid = client_msg_id;
                let fleet = fleet.clone();
                in_flight.push(tokio::spawn(async move {
                    match fleet
                        .send(di, conversation, cmid, body, Duration::from_secs(30))
                        .await
                    {
                        Ok(ok) => outbox.sent.lock().expect("sent").push(Sent {
                            id: ok.message_id,
                            conversation,
                            scheduled_us,
                            sender: Some(di),
                            warm,
                            acked_us: now_us(base),
                            duplicate: ok.duplicate,
                        }),
                        Err(e) => outbox.failed(tier, code_name(&e)),
                    }
                }));
            }
            SendAs::Publisher => {
                let (http, api, token) = (http.clone(), target.api.clone(), publisher.clone());
                client_msg_id += 1;
                let cmid = client_msg_id;
                in_flight.push(tokio::spawn(async move {
                    match publish(&http, &api, &token, conversation, &body, cmid).await {
                        Ok(id) => outbox.sent.lock().expect("sent").push(Sent {
                            id,
                            conversation,
                            scheduled_us,
                            sender: None,
                            warm,
                            acked_us: now_us(base),
                            duplicate: false,
                        }),
                        Err(code) => outbox.failed(tier, code),
                    }
                }));
            }
        }
        in_flight.retain(|h| !h.is_finished());
    }
    for h in in_flight {
        let _ = h.await;
    }
    // A rolling restart still going when the sends end is waited for (its
    // restarts are part of the run).
    let restart_done_us = match incidents.restart.take() {
        Some(t) => {
            let (result, done) = t.await.context("rolling restart")?;
            result.context("rolling restart")?;
            Some(now_us(base).saturating_sub(done.elapsed().as_micros() as u64))
        }
        None => None,
    };
    let sends_done_us = now_us(base);

    // Settle: until every device has everything (checked exactly), or the
    // scenario's settle time.
    let sent = std::mem::take(&mut *outbox.sent.lock().expect("sent"));
    let audience = Audience::new(
        plans.iter().map(|p| (p.id, p.members.clone())),
        tiers,
        fleet.devices.iter().map(|d| d.sim.user),
    );
    let settle_deadline = Instant::now() + Duration::from_secs_f64(s.settle_s);
    let mut missing = audience.missing_list(&sent, &fleet.logs());
    loop {
        progress.set_missing(missing.len() as u64);
        if missing.is_empty() || Instant::now() >= settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        audience.still_missing(&mut missing, &sent, &fleet.logs());
    }
    let server_cpu = target
        .server_cpu_now(&http)
        .await
        .zip(server_cpu0)
        .map(|(b, a)| b - a);
    let process_cpu: Vec<Option<f64>> = target
        .servers
        .iter()
        .zip(&process_cpu0)
        .map(|(p, &a)| p.cpu_seconds().zip(a).map(|(b, a)| b - a))
        .collect();
    let loadgen_cpu = cpu_seconds(std::process::id())
        .zip(loadgen_cpu0)
        .map(|(b, a)| b - a);
    progress.finish();

    let send_errors = std::mem::take(&mut *outbox.errors.lock().expect("errors"));
    let mut report = RunReport {
        scenario: Some(s.clone()),
        target: TargetInfo {
            mode: target.mode.clone(),
            edges: target.edges.len(),
        },
        versions: Versions {
            tiercast: env!("CARGO_PKG_VERSION").into(),
            protocol: tiercast_schemas::PROTOCOL_VERSION,
        },
        machine: Machine {
            udp_floor_us: floor.as_ref().map(UdpFloor::floor_us),
            udp_floor: floor,
            ..Machine::this()
        },
        send_errors: send_errors.values().sum(),
        loadgen: LoadgenFigures {
            cpu_s: loadgen_cpu,
            cpu_us_per_delivery: None,
            driver: opts.driver.name().into(),
            sockets: opts.sockets,
            pulls: fleet.pulls.load(Ordering::Relaxed),
            client_loss: opts.client_loss,
            datagrams_dropped: fleet.dropped.load(Ordering::Relaxed),
            receive_drops: receive_drops(&fleet.ports),
            user_offset: opts.user_offset,
            run_id: block,
        },
        run_seconds: sends_done_us.saturating_sub(send_start_us) as f64 / 1e6,
        ..RunReport::default()
    };
    let histograms = tally_into(
        &mut report,
        s,
        &audience,
        &sent,
        &fleet,
        &send_errors,
        send_start_us,
    );
    let deliveries = report.total.deliveries.max(1) as f64;
    report.loadgen.cpu_us_per_delivery = loadgen_cpu.map(|c| c / deliveries * 1e6);
    let (store_batches, store_commits) = target.store_figures(&http).await;
    report.servers = ServerFigures {
        processes: target
            .servers
            .iter()
            .zip(&process_cpu)
            .map(|(p, &cpu_s)| ServerProcess {
                role: p.role.clone(),
                pid: p.pid(),
                cpu_s,
            })
            .collect(),
        cpu_s: server_cpu,
        cpu_us_per_delivery: server_cpu.map(|c| c / deliveries * 1e6),
        cpu_floors_per_delivery: server_cpu
            .zip(report.machine.udp_floor_us)
            .map(|(c, floor)| c / deliveries * 1e6 / floor),
        cpu_ms_per_message: server_cpu.map(|c| c / report.total.messages_sent.max(1) as f64 * 1e3),
        edge_rss_bytes_before_connect: rss0,
        edge_rss_bytes_connected: rss1,
        rss_per_connection_bytes: match (rss0, rss1) {
            (Some(a), Some(b)) if fleet.connected > 0 => {
                Some(b.saturating_sub(a) / fleet.connected)
            }
            _ => None,
        },
        rss_bytes_end: target.server_rss_now(&http).await,
        store_batches,
        store_commits,
    };
    incidents_into(&mut report, s, &fleet, incidents, restart_done_us);
    if report.total.lost > 0 {
        let missing = audience.missing_sample(&sent, &fleet.logs(), 20);
        let mut resumed = Vec::with_capacity(missing.len());
        for (d, m) in &missing {
            resumed.push(fleet.resumed_from(*d, m.conversation).await);
        }
        let logs = fleet.logs();
        let secs = |us: u64| us as f64 / 1e6;
        report.lost_sample = missing
            .into_iter()
            .zip(resumed)
            .map(|((d, m), (from, cursor))| {
                let l = &logs[d];
                let st = fleet.stats(d);
                LostDelivery {
                    device: d,
                    user: fleet.devices[d].sim.user,
                    conversation: m.conversation,
                    tier: audience.tier(m.conversation),
                    message_id: m.id,
                    scheduled_s: secs(m.scheduled_us),
                    acked_s: secs(m.acked_us),
                    acked_as_duplicate: m.duplicate,
                    device_connects_s: l.connected_at_us.iter().map(|&t| secs(t)).collect(),
                    device_newest_id: l.newest.get(&m.conversation).copied().unwrap_or(0),
                    device_errors: l.errors.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    device_connects: st.connects.load(Ordering::Relaxed),
                    device_resumes: st.resumes.load(Ordering::Relaxed),
                    device_resume_retries: st.resume_retries.load(Ordering::Relaxed),
                    device_resumed_from_id: from.unwrap_or(0),
                    device_cursor_id: cursor.unwrap_or(0),
                }
            })
            .collect();
    }
    fleet.close().await;
    Ok(RunOutcome { report, histograms })
}

/// The ledger's tally and the device logs' counts into `report` (tiers,
/// total, errors, timeline, connect, reorder); returns the latency
/// histograms per tier and overall.
fn tally_into(
    report: &mut RunReport,
    s: &Scenario,
    audience: &Audience,
    sent: &[Sent],
    fleet: &Fleet,
    send_errors: &HashMap<(u8, String), u64>,
    send_start_us: u64,
) -> Vec<(String, Histogram<u64>)> {
    let tally = audience.tally(sent, &fleet.logs(), send_start_us);
    let measured_s = s.duration_s.max(1e-9);
    for (tier, c) in &tally.tiers {
        let f = report.tiers.entry(tier.to_string()).or_default();
        f.figures.messages_sent = c.messages;
        f.figures.expected_deliveries = c.expected;
        f.figures.deliveries = c.delivered;
        f.figures.lost = c.lost;
        if let Some(h) = tally.latency.get(tier) {
            f.figures.set_latency(h);
            f.figures.deliveries_per_s = h.len() as f64 / measured_s;
        }
    }
    for ((tier, code), n) in send_errors {
        *report
            .tiers
            .entry(tier.to_string())
            .or_default()
            .errors
            .entry(code.clone())
            .or_default() += n;
        *report.errors.entry(code.clone()).or_default() += n;
    }
    let mut connect_us = Vec::new();
    for (i, (d, log)) in fleet.devices.iter().zip(fleet.logs()).enumerate() {
        for (conv, n) in &log.duplicates {
            let tier = audience.tier(*conv).to_string();
            report.tiers.entry(tier).or_default().figures.duplicates += n;
        }
        for (conv, n) in &log.out_of_order {
            let tier = audience.tier(*conv).to_string();
            report.tiers.entry(tier).or_default().figures.out_of_order += n;
        }
        if let Some(&c) = log.connected_at_us.first() {
            connect_us.push(c.saturating_sub(d.started_us));
        }
        for (k, v) in &log.errors {
            *report.errors.entry(k.clone()).or_default() += v;
        }
        let st = fleet.stats(i);
        report.reorder.held += st.held.load(Ordering::Relaxed);
        report.reorder.reordered += st.reordered.load(Ordering::Relaxed);
        report.reorder.late += st.late.load(Ordering::Relaxed);
    }
    if let Some(f) = report.tiers.get_mut("3") {
        f.notified = Some(f.figures.deliveries);
        f.pulled = Some(report.loadgen.pulls);
    }
    report.total = total(report.tiers.values(), &tally.all, measured_s);
    report.timeline = tally
        .seconds
        .iter()
        .map(|(&sec, second)| TimelinePoint {
            t_s: sec,
            sends: second.sends,
            deliveries: second.deliveries,
            p99_us: if second.latency.is_empty() {
                0
            } else {
                second.latency.value_at_quantile(0.99)
            },
        })
        .collect();
    report.stages = stage_figures(s, audience, sent, fleet, send_start_us);
    report.connect = ConnectFigures {
        connections: s.devices(),
        connected: fleet.connected,
        failed: s.devices() - fleet.connected.min(s.devices()),
        p50_ms: quantile(&mut connect_us, 0.5) as f64 / 1e3,
        p99_ms: quantile(&mut connect_us, 0.99) as f64 / 1e3,
        max_ms: quantile(&mut connect_us, 1.0) as f64 / 1e3,
        rate_per_s: fleet.connected as f64 / fleet.connect_elapsed.as_secs_f64(),
        seconds: fleet.connect_elapsed.as_secs_f64(),
        shed: (0..fleet.devices.len())
            .map(|d| fleet.stats(d).shed.load(Ordering::Relaxed))
            .sum(),
        paced: (0..fleet.devices.len())
            .map(|d| fleet.stats(d).paced.load(Ordering::Relaxed))
            .sum(),
    };
    let mut histograms: Vec<(String, Histogram<u64>)> = tally
        .latency
        .into_iter()
        .map(|(t, h)| (format!("tier {t}"), h))
        .collect();
    histograms.push(("all".into(), tally.all));
    histograms
}

/// Each stage's figures: the messages scheduled in it, their deliveries
/// and those deliveries' latencies.
fn stage_figures(
    s: &Scenario,
    audience: &Audience,
    sent: &[Sent],
    fleet: &Fleet,
    send_start_us: u64,
) -> Vec<crate::report::StageFigures> {
    let windows = s.stage_windows();
    let us: Vec<(u64, u64)> = windows
        .iter()
        .map(|&(a, b)| ((a * 1e6) as u64, (b * 1e6) as u64))
        .collect();
    let tallies = audience.tally_windows(sent, &fleet.logs(), send_start_us, &us);
    windows
        .into_iter()
        .zip(&s.stages)
        .zip(tallies)
        .enumerate()
        .map(|(i, (((start, end), st), t))| {
            let len = (end - start).max(1e-9);
            let q = |p: f64| {
                if t.latency.is_empty() {
                    0
                } else {
                    t.latency.value_at_quantile(p)
                }
            };
            crate::report::StageFigures {
                stage: i + 1,
                start_s: start,
                end_s: end,
                messages_per_s: st.messages_per_s,
                sends: t.sends,
                sends_per_s: t.sends as f64 / len,
                deliveries: t.deliveries,
                deliveries_per_s: t.deliveries as f64 / len,
                p50_us: q(0.5),
                p99_us: q(0.99),
                max_us: t.latency.max(),
            }
        })
        .collect()
}

/// The storm's and the fault's figures into `report`.
fn incidents_into(
    report: &mut RunReport,
    s: &Scenario,
    fleet: &Fleet,
    incidents: Incidents,
    restart_done_us: Option<u64>,
) {
    let logs = fleet.logs();
    let fault_devices = incidents.fault.clone();
    if let (Some(f), Some((on_edge, at_us))) = (&s.edge_fault, incidents.fault) {
        // How long the devices of the signalled edge took to be connected
        // again (to another edge), from the signal.
        let mut back: Vec<u64> = on_edge
            .iter()
            .filter_map(|&i| {
                logs[i]
                    .connected_at_us
                    .iter()
                    .find(|&&t| t >= at_us)
                    .map(|&t| t - at_us)
            })
            .collect();
        report.edge_fault = Some(FaultFigures {
            signal: f.signal.name().into(),
            edge: f.edge,
            at_s: f.at_s,
            restart_s: restart_done_us.map(|d| d.saturating_sub(at_us) as f64 / 1e6),
            devices_on_edge: on_edge.len(),
            devices_back: back.len(),
            back_p50_ms: quantile(&mut back, 0.5) as f64 / 1e3,
            back_p99_ms: quantile(&mut back, 0.99) as f64 / 1e3,
            back_max_ms: quantile(&mut back, 1.0) as f64 / 1e3,
            counters_before: incidents.counters_before.clone(),
        });
    }
    let mut reconnect_us: Vec<u64> = logs
        .iter()
        .flat_map(|l| l.reconnect_us.iter().copied())
        .collect();
    report.reconnect_storm = incidents.storm.map(|n| StormFigures {
        devices_dropped: n,
        reconnect_p50_ms: quantile(&mut reconnect_us, 0.5) as f64 / 1e3,
        reconnect_p99_ms: quantile(&mut reconnect_us, 0.99) as f64 / 1e3,
        reconnect_max_ms: quantile(&mut reconnect_us, 1.0) as f64 / 1e3,
        reconnects: reconnect_us.len(),
        reconnects_per_s: Vec::new(),
    });
    // A crashed and restarted edge: its devices' storm, timed from the
    // moment it listened again (nothing can connect before).
    if let (Some(f), Some((on_edge, _)), Some(listen_us), None) = (
        &s.edge_fault,
        &fault_devices,
        restart_done_us,
        &report.reconnect_storm,
    ) && f.signal == FaultSignal::KillRestart
    {
        let mut back: Vec<u64> = on_edge
            .iter()
            .filter_map(|&i| {
                logs[i]
                    .connected_at_us
                    .iter()
                    .find(|&&t| t >= listen_us)
                    .map(|&t| t - listen_us)
            })
            .collect();
        let mut per_s = vec![0u64; back.iter().max().map_or(0, |m| m / 1_000_000 + 1) as usize];
        for b in &back {
            per_s[(b / 1_000_000) as usize] += 1;
        }
        report.reconnect_storm = Some(StormFigures {
            devices_dropped: on_edge.len(),
            reconnects: back.len(),
            reconnect_p50_ms: quantile(&mut back, 0.5) as f64 / 1e3,
            reconnect_p99_ms: quantile(&mut back, 0.99) as f64 / 1e3,
            reconnect_max_ms: quantile(&mut back, 1.0) as f64 / 1e3,
            reconnects_per_s: per_s,
        });
    }
}

/// The whole run's figures: the tiers' counts added, latency from `all`.
fn total<'a>(
    tiers: impl Iterator<Item = &'a TierFigures>,
    all: &Histogram<u64>,
    measured_s: f64,
) -> RunFigures {
    let mut total = RunFigures::default();
    for t in tiers {
        total.add_counts(&t.figures);
    }
    total.set_latency(all);
    total.deliveries_per_s = all.len() as f64 / measured_s;
    total
}

/// Bytes a delivery's packet carries beyond its body: QUIC short header,
/// AEAD tag, STREAM frame, length prefix and the FlatBuffers message (a
/// 100-byte body goes out as a datagram of about 150 bytes).
const DELIVERY_PACKET_OVERHEAD: usize = 50;

/// The machine's floor for this scenario's deliveries: one datagram of
/// delivery size to each of up to 4,000 loopback receivers (as many as the
/// scenario has devices), about 200,000 datagrams per method. `None` (with
/// a warning) if it cannot be measured here.
async fn measure_floor(s: &Scenario) -> Option<UdpFloor> {
    let receivers = (s.devices() as usize).clamp(1, 4_000);
    let bytes = s.payload_bytes + DELIVERY_PACKET_OVERHEAD;
    let rounds = (200_000 / receivers).max(5);
    match tokio::task::spawn_blocking(move || {
        tiercast_bench::udp_floor::measure(receivers, bytes, rounds)
    })
    .await
    {
        Ok(Ok(f)) => Some(f),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the machine's UDP floor could not be measured");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "the machine's UDP floor could not be measured");
            None
        }
    }
}

/// The `p` quantile of `v` (sorted in place), 0 when empty.
fn quantile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn code_name(e: &ClientError) -> String {
    match e {
        // A connection lost without a code: a stateless reset (the edge
        // restarted and does not know it) or the idle timeout (the edge
        // is gone, or its resets cannot be verified).
        ClientError::Closed {
            code: tiercast_client::ErrorCode::Unspecified,
            reason,
        } if reason.contains("reset") => "stateless_reset".to_owned(),
        ClientError::Closed {
            code: tiercast_client::ErrorCode::Unspecified,
            reason,
        } if reason.contains("timed out") => "idle_timeout".to_owned(),
        _ => e.code().map_or_else(
            || match e {
                ClientError::Timeout(_) => "timeout".to_owned(),
                ClientError::Connect(_) => "connect".to_owned(),
                _ => "protocol".to_owned(),
            },
            |c| c.name().to_owned(),
        ),
    }
}

/// Users added per API call: the engine's default
/// `engine.max_members_per_call`.
const MEMBERS_PER_CALL: usize = tiercast_engine::config::DEFAULT_MAX_MEMBERS_PER_CALL;

async fn create_conversations(
    http: &reqwest::Client,
    api: &str,
    publisher: &str,
    s: &Scenario,
    plans: &[ConversationPlan],
) -> anyhow::Result<HashMap<u64, u8>> {
    let results = futures::stream::iter(plans.iter())
        .map(|p| async move {
            // At most MEMBERS_PER_CALL users per call (the API's default
            // cap): the rest are added in further calls.
            let mut chunks = p.members.chunks(MEMBERS_PER_CALL);
            let first = chunks.next().unwrap_or(&[]);
            let r = http
                .post(format!("{api}/v1/conversations"))
                .bearer_auth(publisher)
                .json(&json!({"id": p.id.to_string(), "name": format!("loadgen {}", p.id), "members": first}))
                .send()
                .await
                .context("creating a conversation")?;
            anyhow::ensure!(
                r.status().is_success(),
                "creating conversation {}: {}",
                p.id,
                r.status()
            );
            let mut v: serde_json::Value = r.json().await?;
            for chunk in chunks {
                let r = http
                    .post(format!("{api}/v1/conversations/{}/members", p.id))
                    .bearer_auth(publisher)
                    .json(&json!({"users": chunk}))
                    .send()
                    .await
                    .context("adding members")?;
                anyhow::ensure!(
                    r.status().is_success(),
                    "adding members to conversation {}: {}",
                    p.id,
                    r.status()
                );
                v = r.json().await?;
            }
            if let Some(t) = s.conversations[p.group].tier {
                let r = http
                    .put(format!("{api}/v1/conversations/{}/tier", p.id))
                    .bearer_auth(publisher)
                    .json(&json!({"tier": t}))
                    .send()
                    .await?;
                anyhow::ensure!(
                    r.status().is_success(),
                    "pinning conversation {}: {}",
                    p.id,
                    r.status()
                );
                v = r.json().await?;
            }
            let tier = v["tier"].as_u64().unwrap_or(1) as u8;
            anyhow::Ok((p.id, tier))
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

struct PullCtx {
    session: Arc<dyn Fn() -> Option<tiercast_client::Client> + Send + Sync>,
    fractions: Arc<HashMap<u64, f64>>,
    pulls: Arc<AtomicU64>,
}

fn session_client_getter(
    session: &Session,
) -> Arc<dyn Fn() -> Option<tiercast_client::Client> + Send + Sync> {
    let watch = session.current();
    Arc::new(move || watch.borrow().clone())
}

async fn consume(
    mut events: tiercast_client::Events,
    log: Arc<Mutex<DeviceLog>>,
    base: Instant,
    progress: Arc<Progress>,
    edges: Vec<SocketAddr>,
    pull: PullCtx,
) {
    while let Some(e) = events.recv().await {
        let at = now_us(base);
        let wanted = record(
            &mut log.lock().expect("log"),
            e,
            at,
            &progress,
            &edges,
            &pull.fractions,
        );
        if let Some((conversation, message_id)) = wanted
            && let Some(client) = (pull.session)()
        {
            let pulls = pull.pulls.clone();
            tokio::spawn(async move {
                if client.pull(conversation, message_id).await.is_ok() {
                    pulls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
}

/// The devices' events on the core into their logs.
struct LogSink {
    logs: Vec<Arc<Mutex<DeviceLog>>>,
    base: Instant,
    progress: Arc<Progress>,
    edges: Vec<SocketAddr>,
    fractions: Arc<HashMap<u64, f64>>,
    pulls: Arc<AtomicU64>,
}

impl Sink for LogSink {
    fn event(&self, device: usize, event: Event) -> Reaction {
        let at = now_us(self.base);
        let mut l = self.logs[device].lock().expect("log");
        match record(
            &mut l,
            event,
            at,
            &self.progress,
            &self.edges,
            &self.fractions,
        ) {
            Some(_) => Reaction::Pull,
            None => Reaction::Nothing,
        }
    }

    fn pulled(&self, _device: usize) {
        self.pulls.fetch_add(1, Ordering::Relaxed);
    }
}

/// One event of a device into its log; a tier-3 notification the device
/// pulls (its conversation's `pull_fraction`) comes back as
/// (conversation, message id).
fn record(
    l: &mut DeviceLog,
    e: Event,
    at: u64,
    progress: &Progress,
    edges: &[SocketAddr],
    fractions: &HashMap<u64, f64>,
) -> Option<(u64, u64)> {
    match e {
        Event::Connected { edge, .. } => {
            l.edge = edges.iter().position(|e| *e == edge);
            if l.connected_at_us.is_empty() {
                progress.connected.fetch_add(1, Ordering::Relaxed);
            }
            l.connected_at_us.push(at);
            if let Some(lost) = l.lost_at_us.take() {
                l.reconnect_us.push(at - lost);
            }
        }
        Event::Disconnected { error } => {
            l.lost_at_us = Some(at);
            l.edge = None;
            *l.errors
                .entry(format!("disconnect_{}", code_name(&error)))
                .or_default() += 1;
        }
        Event::Stopped { error } => {
            *l.errors
                .entry(format!("stopped_{}", code_name(&error)))
                .or_default() += 1;
        }
        Event::Message(m) => {
            let newest = l.newest.entry(m.conversation).or_insert(0);
            let older = m.id < *newest;
            *newest = (*newest).max(m.id);
            if older {
                *l.out_of_order.entry(m.conversation).or_default() += 1;
            }
            l.arrivals.entry(m.id).or_insert(at);
            progress.delivered(|| stamp_of(&m.body).map(|s| at.saturating_sub(s)));
        }
        Event::Duplicate {
            conversation,
            message_id,
        } => {
            // A tier-3 notification the SDK dropped is out of order when
            // it is older than the newest one shown, else a repeat.
            let newest_notified = l
                .notifies
                .get(&conversation)
                .and_then(|n| n.iter().map(|(id, _)| *id).max());
            if newest_notified.is_some_and(|n| message_id < n) {
                *l.out_of_order.entry(conversation).or_default() += 1;
            } else {
                *l.duplicates.entry(conversation).or_default() += 1;
            }
        }
        Event::Notify {
            conversation,
            message_id,
        } => {
            l.notifies
                .entry(conversation)
                .or_default()
                .push((message_id, at));
            progress.delivered(|| None);
            let f = fractions.get(&conversation).copied().unwrap_or(0.0);
            if f > 0.0 && rand::rng().random_bool(f) {
                return Some((conversation, message_id));
            }
        }
        Event::ReadMarker { .. } => {}
    }
    None
}

/// Live counters and the progress bar.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    connected: AtomicU64,
    sends: AtomicU64,
    deliveries: AtomicU64,
    missing: AtomicU64,
    live: Mutex<Histogram<u64>>,
    started: Instant,
    devices: u64,
}

impl Progress {
    fn new(show: bool, devices: u64) -> Arc<Self> {
        let bar = show.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("valid template"),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        let p = Arc::new(Self {
            bar,
            connected: AtomicU64::new(0),
            sends: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            live: Mutex::new(histogram()),
            started: Instant::now(),
            devices,
        });
        if p.bar.is_some() {
            let weak = Arc::downgrade(&p);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    let Some(p) = weak.upgrade() else { return };
                    p.redraw();
                }
            });
        }
        p
    }

    /// One delivery, for the bar. Without a bar nothing is kept: these are
    /// shared by every device loop, and a lock and a contended counter per
    /// delivery showed in loadgen's own CPU.
    fn delivered(&self, latency_us: impl FnOnce() -> Option<u64>) {
        if self.bar.is_none() {
            return;
        }
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = latency_us() {
            self.live.lock().expect("live").saturating_record(l.max(1));
        }
    }

    fn set_missing(&self, n: u64) {
        self.missing.store(n, Ordering::Relaxed);
    }

    fn redraw(&self) {
        let Some(bar) = &self.bar else { return };
        let p99 = {
            let h = self.live.lock().expect("live");
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(0.99)
            }
        };
        // While settling: the deliveries still missing.
        let missing = match self.missing.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!(" | settling, {n} missing"),
        };
        bar.set_message(format!(
            "{:>5.1}s | conns {}/{} | sends {} | deliveries {} | p99 {:.2} ms{missing}",
            self.started.elapsed().as_secs_f64(),
            self.connected.load(Ordering::Relaxed),
            self.devices,
            self.sends.load(Ordering::Relaxed),
            self.deliveries.load(Ordering::Relaxed),
            p99 as f64 / 1e3
        ));
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            self.redraw();
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_default_to_one_per_250_devices_and_at_least_8() {
        assert_eq!(default_sockets(1), 8);
        assert_eq!(default_sockets(2_000), 8);
        assert_eq!(default_sockets(8_000), 32);
        assert_eq!(default_sockets(8_001), 33);
        assert_eq!(default_sockets(100_000), 400);
    }

    #[test]
    fn receive_drops_are_summed_over_loadgens_own_ports() {
        // Two lines as the kernel writes them (ports 0xAEBE = 44734 and
        // 0x1F90 = 8080), drops last.
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 0100007F:AEBE 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 123 2 0000000000000000 12563\n\
  2: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 124 2 0000000000000000 7\n";
        assert_eq!(drops_in(table, &[44734]), 12_563);
        assert_eq!(drops_in(table, &[44734, 8080]), 12_570);
        assert_eq!(drops_in(table, &[1]), 0);
    }
}
