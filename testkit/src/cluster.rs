//! A Redis Cluster started by `scripts/redis-cluster.sh` for one test, and
//! several nodes (engine + edge, each with its own leased node id) on it,
//! sharing one embedded store. Everything binds loopback; the cluster is
//! stopped when the test ends, pass or fail.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tiercast_client::{Client, ClientConfig, Deliveries};
use tiercast_edge::{Config, Node};
use tiercast_engine::store::{EmbeddedStore, Store};

use super::SECRET;

fn script() -> PathBuf {
    super::repo().join("scripts/redis-cluster.sh")
}

/// A running Redis Cluster on loopback.
pub struct RedisCluster {
    pub dir: String,
    /// Master addresses, `127.0.0.1:port`.
    pub nodes: Vec<String>,
}

impl RedisCluster {
    pub fn up(replicas: u32) -> Self {
        let out = Command::new(script())
            .args(["up", "--replicas", &replicas.to_string()])
            .output()
            .expect("scripts/redis-cluster.sh runs");
        assert!(
            out.status.success(),
            "redis cluster did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {text}"))
                .to_owned()
        };
        Self {
            dir: get("TIERCAST_REDIS_DIR="),
            nodes: get("TIERCAST_REDIS_NODES=")
                .split(',')
                .map(str::to_owned)
                .collect(),
        }
    }

    /// The masters as `host:port,host:port` (`TIERCAST_REDIS_NODES`).
    pub fn nodes_csv(&self) -> String {
        self.nodes.join(",")
    }

    /// Runs `redis-cli -p <port> args...` and returns its output.
    pub fn cli(&self, addr: &str, args: &[&str]) -> String {
        let port = addr.rsplit_once(':').expect("host:port").1;
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", port])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Every node (masters and replicas) as `(id, addr, is_master, master_id)`.
    pub fn topology(&self) -> Vec<(String, String, bool, String)> {
        self.cli(&self.nodes[0], &["cluster", "nodes"])
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let addr = f[1].split('@').next().unwrap().to_owned();
                (
                    f[0].to_owned(),
                    addr,
                    f[2].contains("master"),
                    f[3].to_owned(),
                )
            })
            .collect()
    }

    /// The master serving `slot`, as (id, addr).
    pub fn owner_of(&self, slot: u16) -> (String, String) {
        self.try_owner_of(slot)
            .unwrap_or_else(|| panic!("no owner for slot {slot}"))
    }

    /// The master serving `slot` as the first node sees it; none for a
    /// moment during a failover.
    pub fn try_owner_of(&self, slot: u16) -> Option<(String, String)> {
        for line in self.cli(&self.nodes[0], &["cluster", "nodes"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !f[2].contains("master") {
                continue;
            }
            for range in &f[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>())
                    && (a..=b).contains(&slot)
                {
                    return Some((f[0].to_owned(), f[1].split('@').next().unwrap().to_owned()));
                }
            }
        }
        None
    }

    /// Promotes `replica` (the address of a replica of the master serving
    /// `slot`) and returns once the cluster map shows it serving the slot.
    /// A manual failover that Redis gives up on (it waits at most 5 s for
    /// the replica to catch up, which a loaded machine can exceed) is asked
    /// for again; the third ask uses FORCE.
    pub async fn fail_over(&self, slot: u16, replica: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for attempt in 0.. {
            let args: &[&str] = if attempt < 2 {
                &["cluster", "failover"]
            } else {
                &["cluster", "failover", "force"]
            };
            assert_eq!(self.cli(replica, args), "OK", "{args:?} on {replica}");
            let again = tokio::time::Instant::now() + Duration::from_secs(7);
            while tokio::time::Instant::now() < again {
                if self
                    .try_owner_of(slot)
                    .is_some_and(|(_, addr)| addr == replica)
                {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{replica} did not take over slot {slot}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The address of a replica of the master serving `slot`.
    pub fn replica_serving(&self, slot: u16) -> String {
        let (master_id, _) = self.owner_of(slot);
        self.topology()
            .into_iter()
            .find(|(_, _, is_master, of)| !is_master && *of == master_id)
            .expect("the master has a replica")
            .1
    }

    pub fn keyslot(&self, key: &str) -> u16 {
        self.cli(&self.nodes[0], &["cluster", "keyslot", key])
            .parse()
            .expect("a slot number")
    }

    /// `CLUSTER SETSLOT slot state node` on `addr`, which must answer OK.
    fn set_slot(&self, addr: &str, slot: &str, state: &str, node: &str) {
        assert_eq!(
            self.cli(addr, &["cluster", "setslot", slot, state, node]),
            "OK",
            "setslot {slot} {state} {node} on {addr}"
        );
    }

    /// Moves one slot (and its keys) to the master `to` (id, addr).
    pub fn migrate_slot(&self, slot: u16, to: &(String, String)) {
        let from = self.owner_of(slot);
        assert_ne!(from.0, to.0, "slot already there");
        let s = slot.to_string();
        self.set_slot(&to.1, &s, "importing", &from.0);
        self.set_slot(&from.1, &s, "migrating", &to.0);
        let keys = self.cli(&from.1, &["cluster", "getkeysinslot", &s, "1000"]);
        let (host, port) = to.1.rsplit_once(':').unwrap();
        for k in keys.lines().filter(|k| !k.is_empty()) {
            assert_eq!(
                self.cli(&from.1, &["migrate", host, port, k, "0", "5000"]),
                "OK"
            );
        }
        // The new owner first, then the source, then the rest (the order
        // the Redis manual gives): a client redirected in between never
        // bounces back to the source.
        self.set_slot(&to.1, &s, "node", &to.0);
        self.set_slot(&from.1, &s, "node", &to.0);
        for (id, addr, master, _) in self.topology() {
            if master && id != to.0 && id != from.0 {
                self.cli(&addr, &["cluster", "setslot", &s, "node", &to.0]);
            }
        }
    }

    pub fn down(&self) {
        let _ = Command::new(script())
            .args(["down", "--dir", &self.dir])
            .output();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.down();
    }
}

/// Nodes sharing one store over one Redis Cluster.
pub struct Fleet {
    pub redis: RedisCluster,
    pub nodes: Vec<Node>,
    pub store: Arc<dyn Store>,
    pub dir: tempfile::TempDir,
}

impl Fleet {
    /// `edges` nodes on `redis`, with extra settings `(key, value)`.
    pub async fn start(redis: RedisCluster, edges: usize, extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("shared.redb")).unwrap());
        let nodes_list = format!(
            "[{}]",
            redis
                .nodes
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut nodes = Vec::new();
        for i in 0..edges {
            let data = dir.path().join(format!("node{i}"));
            let mut overrides: Vec<(String, String)> = vec![
                ("edge.listen".into(), "127.0.0.1:0".into()),
                ("node.http_listen".into(), "127.0.0.1:0".into()),
                ("node.data_dir".into(), data.display().to_string()),
                ("node.token_secret".into(), SECRET.into()),
                ("backplane.kind".into(), "redis".into()),
                ("backplane.redis.nodes".into(), nodes_list.clone()),
                ("backplane.redis.topology_check_ms".into(), "200".into()),
            ];
            overrides.extend(
                super::UNLIMITED
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
            overrides.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let cfg = Config::load(None, [], &overrides).expect("valid config");
            nodes.push(
                Node::start_with_store(cfg, store.clone())
                    .await
                    .expect("node starts"),
            );
        }
        Self {
            redis,
            nodes,
            store,
            dir,
        }
    }

    pub fn token(&self, user: u64) -> String {
        self.nodes[0]
            .keys
            .mint_user(user, tiercast_engine::auth::now_unix(), 3600)
    }

    /// A device of `user` connected to edge `edge`.
    pub async fn device(&self, edge: usize, user: u64, client_id: u64) -> (Client, Deliveries) {
        super::enroll(self.store.as_ref(), user, client_id).await;
        let n = &self.nodes[edge];
        let cfg = ClientConfig::new(n.quic_addr, n.cert_pem.clone(), self.token(user), client_id);
        Client::connect(cfg).await.expect("device connects")
    }

    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

impl RedisCluster {
    /// Pids of every redis-server of this cluster (from their pid files).
    pub fn pids(&self) -> Vec<String> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir(&self.dir).expect("cluster dir") {
            let pidfile = entry.unwrap().path().join("redis.pid");
            if let Ok(p) = std::fs::read_to_string(pidfile) {
                pids.push(p.trim().to_owned());
            }
        }
        pids
    }

    /// Sends `signal` (`STOP`, `CONT`) to every server of the cluster.
    /// Sends `signal` to every server with one `kill`, so that a STOP or
    /// CONT reaches them all at (nearly) the same moment: continued one by
    /// one, the first ones would find the others silent past the node
    /// timeout and mark them failed.
    pub fn signal_all(&self, signal: &str) {
        let pids = self.pids();
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .args(&pids)
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{signal} {pids:?}");
    }

    /// Waits (bounded) until every server reports `cluster_state:ok`.
    pub async fn wait_healthy(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for (_, addr, _, _) in self.topology() {
            while !self
                .cli(&addr, &["cluster", "info"])
                .contains("cluster_state:ok")
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{addr}: cluster not ok"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Fleet {
    /// A self-healing session of `user`'s device, trying the edges in the
    /// order given.
    pub async fn session_config(
        &self,
        edges: &[usize],
        user: u64,
        client_id: u64,
    ) -> tiercast_client::SessionConfig {
        super::enroll(self.store.as_ref(), user, client_id).await;
        let mut cfg = tiercast_client::SessionConfig::new(
            edges.iter().map(|&e| self.nodes[e].quic_addr).collect(),
            self.nodes[0].cert_pem.clone(),
            self.token(user),
            client_id,
        );
        // Every edge of a fleet has its own self-signed certificate: trust
        // them all.
        cfg.client.trusted_pem = self
            .nodes
            .iter()
            .map(|n| n.cert_pem.clone())
            .collect::<Vec<_>>()
            .join("\n");
        cfg.backoff_base = std::time::Duration::from_millis(20);
        cfg.backoff_cap = std::time::Duration::from_millis(500);
        cfg
    }
}
