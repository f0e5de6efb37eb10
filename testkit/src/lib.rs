//! What Tiercast's tests share (a dev-dependency only, never shipped): a
//! single node on loopback (port 0, a temporary data directory, readiness
//! when `Node::start` returns: the sockets are bound by then), a fleet on a
//! Redis Cluster started per test ([`cluster`]), server processes
//! ([`process`]), devices that log what they see, and metric parsing.

pub mod cluster;
pub mod process;

use std::time::Duration;

use tiercast_client::{Client, ClientConfig, Deliveries, Delivery, Message};
use tiercast_edge::{Config, Node};

pub const SECRET: &str = "integration-test-secret-0123456789";
/// Upper bound for anything a test waits for; never a sleep.
pub const WAIT: Duration = Duration::from_secs(10);

/// Logs to the test's output when `RUST_LOG` is set (e.g.
/// `RUST_LOG=fred=debug,tiercast_engine=debug`); once per test binary.
pub fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Request rates no test reaches unless it means to (tests that are about
/// limits set their own): the other tests send as fast as they can.
pub const UNLIMITED: [(&str, &str); 8] = [
    ("edge.rates.send.per_s", "1000000"),
    ("edge.rates.send.burst", "1000000"),
    ("edge.rates.fetch.per_s", "1000000"),
    ("edge.rates.fetch.burst", "1000000"),
    ("edge.rates.sync.per_s", "1000000"),
    ("edge.rates.sync.burst", "1000000"),
    ("edge.rates.read.per_s", "1000000"),
    ("edge.rates.read.burst", "1000000"),
];

pub struct TestNode {
    pub node: Node,
    pub dir: tempfile::TempDir,
}

pub fn config(dir: &std::path::Path, extra: &[(&str, &str)]) -> Config {
    let mut overrides: Vec<(String, String)> = vec![
        ("edge.listen".into(), "127.0.0.1:0".into()),
        ("node.http_listen".into(), "127.0.0.1:0".into()),
        ("node.data_dir".into(), dir.display().to_string()),
        ("node.token_secret".into(), SECRET.into()),
    ];
    overrides.extend(
        UNLIMITED
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    overrides.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::load(None, [], &overrides).expect("test config is valid")
}

pub async fn start(extra: &[(&str, &str)]) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(dir.path(), extra))
        .await
        .expect("node starts");
    TestNode { node, dir }
}

impl TestNode {
    pub fn token(&self, user: u64) -> String {
        self.node
            .keys
            .mint_user(user, tiercast_engine::auth::now_unix(), 3600)
    }

    /// A device of `user` with id `client_id`, as if the edge had issued
    /// it on an earlier connect (registered in the store), so a test can
    /// name its devices. 0: a new device, issued an id on connect.
    pub async fn client_config(&self, user: u64, client_id: u64) -> ClientConfig {
        enroll(self.node.engine.store().as_ref(), user, client_id).await;
        let mut cfg = ClientConfig::new(
            self.node.quic_addr,
            self.node.cert_pem.clone(),
            self.token(user),
            client_id,
        );
        cfg.device = format!("test-{client_id}");
        cfg
    }

    pub async fn device(&self, user: u64, client_id: u64) -> (Client, Deliveries) {
        Client::connect(self.client_config(user, client_id).await)
            .await
            .expect("device connects")
    }

    pub async fn chat(&self, id: u64, members: &[u64]) {
        self.node
            .engine
            .create_conversation(Some(id), format!("chat {id}"), members)
            .await
            .expect("conversation created");
    }

    pub fn publisher_token(&self) -> String {
        self.node
            .keys
            .mint_publisher("tests", tiercast_engine::auth::now_unix(), 3600)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.node.http_addr, path)
    }
}

/// The tests name devices `user * 10 + n`: device `client_id` with its
/// owner.
pub fn dev(client_id: u64) -> tiercast_engine::store::Device {
    tiercast_engine::store::Device {
        user: client_id / 10,
        client: client_id,
    }
}

/// Registers device `client_id` of `user` in `store` (nothing for 0), the
/// way an earlier connect that was issued this id would have.
pub async fn enroll(store: &dyn tiercast_engine::store::Store, user: u64, client_id: u64) {
    if client_id == 0 {
        return;
    }
    let rec = tiercast_engine::store::ClientRecord {
        client_id,
        user,
        device: format!("test-{client_id}"),
        last_seen_ms: tiercast_engine::snowflake::now_unix_ms(),
    };
    store
        .register_client(&rec, 16, false)
        .await
        .expect("test device enrolled");
}

/// Tests of one binary run two at a time. A test that measures a whole
/// deployment under load (loadgen against several server processes) must
/// not share the machine with another deployment: it takes the
/// [`exclusive`] turn, and every other test that starts server processes
/// takes a [`shared`] one.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The machine to this test alone (among the tests that take turns).
pub fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

/// A turn shared with other light tests, never with an [`exclusive`] one.
pub fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

/// The repository's root (scripts, scenarios).
pub fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The sum of a Prometheus metric's samples (all label sets) in `text`.
pub fn metric(text: &str, name: &str) -> u64 {
    metric_f64(text, name) as u64
}

/// The sum of a metric's samples, signed and fractional.
pub fn metric_f64(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A metric's value from a server's `/metrics` at `http_base`
/// (`http://host:port`); panics if it is not exported.
pub async fn scrape(http_base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{http_base}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics body");
    assert!(
        text.lines().any(|l| l.starts_with(name)),
        "{name} is exported"
    );
    metric_f64(&text, name)
}

/// The next message delivered, skipping other deliveries; panics after
/// [`WAIT`].
pub async fn next_message(rx: &mut Deliveries) -> Message {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Some(Delivery::Message(m)) => return m,
                Some(_) => continue,
                None => panic!("delivery stream ended"),
            }
        }
    })
    .await
    .expect("a message within the wait bound")
}

/// Messages until (and including) the one with id `fence`.
pub async fn messages_until(rx: &mut Deliveries, fence: u64) -> Vec<Message> {
    let mut got = Vec::new();
    loop {
        let m = next_message(rx).await;
        let done = m.id == fence;
        got.push(m);
        if done {
            return got;
        }
    }
}

/// What a [`Device`] has seen, each message once (the session dedupes).
#[derive(Debug, Default)]
pub struct Log {
    pub messages: Vec<Message>,
    pub notifies: Vec<(u64, u64)>,
    pub markers: Vec<(u64, u64)>,
    pub connects: usize,
    pub disconnects: Vec<tiercast_client::ClientError>,
    pub stopped: Option<tiercast_client::ClientError>,
}

impl Log {
    pub fn ids(&self, conversation: u64) -> std::collections::HashSet<u64> {
        self.messages
            .iter()
            .filter(|m| m.conversation == conversation)
            .map(|m| m.id)
            .collect()
    }
}

/// A self-healing session whose events are logged by a task.
pub struct Device {
    pub session: tiercast_client::Session,
    pub log: std::sync::Arc<std::sync::Mutex<Log>>,
    changed: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Device {
    pub fn start(cfg: tiercast_client::SessionConfig) -> Self {
        use tiercast_client::Event;
        let (session, mut events) = tiercast_client::Session::start(cfg);
        let log = std::sync::Arc::new(std::sync::Mutex::new(Log::default()));
        let changed = std::sync::Arc::new(tokio::sync::Notify::new());
        let (l, c) = (log.clone(), changed.clone());
        let task = tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                {
                    let mut log = l.lock().unwrap();
                    match e {
                        Event::Connected { .. } => log.connects += 1,
                        Event::Message(m) => log.messages.push(m),
                        Event::Notify {
                            conversation,
                            message_id,
                        } => log.notifies.push((conversation, message_id)),
                        Event::ReadMarker {
                            conversation,
                            message_id,
                        } => log.markers.push((conversation, message_id)),
                        Event::Disconnected { error } => log.disconnects.push(error),
                        Event::Stopped { error } => log.stopped = Some(error),
                        Event::Duplicate { .. } => {}
                    }
                }
                c.notify_waiters();
            }
        });
        Self {
            session,
            log,
            changed,
            task,
        }
    }

    /// Waits (bounded by `within`) until `ok` holds for the log.
    pub async fn wait_until(&self, what: &str, within: Duration, ok: impl Fn(&Log) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            if ok(&self.log.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let log = self.log.lock().unwrap();
                panic!(
                    "timed out waiting for {what}: {} messages, {} connects, disconnects {:?}, stopped {:?}",
                    log.messages.len(),
                    log.connects,
                    log.disconnects,
                    log.stopped
                );
            }
        }
    }

    pub fn ids(&self, conversation: u64) -> std::collections::HashSet<u64> {
        self.log.lock().unwrap().ids(conversation)
    }
}

impl TestNode {
    /// A session of `user`'s device `client_id` on this node (enrolled as
    /// in [`TestNode::client_config`]).
    pub async fn session_config(
        &self,
        user: u64,
        client_id: u64,
    ) -> tiercast_client::SessionConfig {
        enroll(self.node.engine.store().as_ref(), user, client_id).await;
        let mut cfg = tiercast_client::SessionConfig::new(
            vec![self.node.quic_addr],
            self.node.cert_pem.clone(),
            self.token(user),
            client_id,
        );
        cfg.client.device = format!("test-{client_id}");
        cfg.backoff_base = Duration::from_millis(20);
        cfg.backoff_cap = Duration::from_millis(500);
        cfg
    }
}
