//! Node-id leases: in a cluster every engine (and every edge, which embeds
//! one) takes a Snowflake node id from Redis, so two live processes never
//! share one. A lease is a key `tiercast:node:{<id>}` set with NX and a TTL,
//! renewed every sixth of the TTL by compare-and-expire.
//!
//! A renewal sent at `t` keeps the key until at least `t + ttl`; the process
//! issues ids only until `t + ttl - ttl/3` (the [`LeaseGate`] deadline), so
//! it stops a third of the TTL before anyone else could take the id. A failed
//! or hung renewal (a failover, a slot moving) is retried every 100 ms to 1 s
//! with its own timeout. An outage that begins just before a renewal is due
//! leaves `ttl - ttl/3 - ttl/6` (7.5 s at the 15 s TTL) before ids stop, so
//! a Redis failover, which pauses writes for at most a few seconds, costs
//! nothing. A key found missing (a failover dropped the write, or it
//! expired while the process was stalled) is taken back atomically if nobody
//! else has it; a key holding another token stops this process's ids for
//! good.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use tokio::task::JoinHandle;

use crate::backplane::BackplaneError;
use crate::snowflake::{LeaseGate, MAX_NODE};

/// 1: renewed; 2: the key was gone and is ours again; 0: someone else's.
const RENEW: &str = "local v = redis.call('get', KEYS[1]) \
                     if v == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end \
                     if not v then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end \
                     return 0";
const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
                       return redis.call('del', KEYS[1]) else return 0 end";

/// First retry after a failed renewal; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

fn key(node: u16) -> String {
    format!("tiercast:node:{{{node}}}")
}

/// What the renewer has done, for tests and metrics.
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Renewals that found the key ours.
    pub renewed: AtomicU64,
    /// Renewals that found the key missing and took it back.
    pub reclaimed: AtomicU64,
    /// Renewals that failed or timed out (each retried).
    pub failed: AtomicU64,
}

/// A held node id. Dropping it stops renewal; [`NodeLease::release`] frees
/// the id at once.
#[derive(Debug)]
pub struct NodeLease {
    pub node: u16,
    token: String,
    client: Client,
    gate: Arc<LeaseGate>,
    stats: Arc<LeaseStats>,
    renewer: JoinHandle<()>,
}

impl NodeLease {
    /// Takes the first free node id, starting from a random one.
    pub async fn acquire(client: &Client, ttl: Duration) -> Result<Self, BackplaneError> {
        let token = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let start = rand::random_range(0..=MAX_NODE);
        for i in 0..=MAX_NODE {
            let node = (start + i) % (MAX_NODE + 1);
            let sent = Instant::now();
            let won: Option<String> = client
                .set(
                    key(node),
                    token.as_str(),
                    Some(Expiration::PX(ttl.as_millis() as i64)),
                    Some(SetOptions::NX),
                    false,
                )
                .await
                .map_err(|e| BackplaneError::Command(e.to_string()))?;
            if won.is_some() {
                let gate = Arc::new(LeaseGate::closed());
                gate.open_until(sent + good_for(ttl));
                let stats = Arc::new(LeaseStats::default());
                let renewer = tokio::spawn(renew(
                    client.clone(),
                    node,
                    token.clone(),
                    ttl,
                    gate.clone(),
                    stats.clone(),
                ));
                return Ok(Self {
                    node,
                    token,
                    client: client.clone(),
                    gate,
                    stats,
                    renewer,
                });
            }
        }
        Err(BackplaneError::Unavailable(
            "all 1024 node ids are leased".into(),
        ))
    }

    /// The gate ids pass through: open while the lease is known to hold.
    pub fn gate(&self) -> Arc<LeaseGate> {
        self.gate.clone()
    }

    pub fn stats(&self) -> &LeaseStats {
        &self.stats
    }

    /// The Redis key that holds this lease.
    pub fn key(&self) -> String {
        key(self.node)
    }

    pub async fn release(self) {
        self.renewer.abort();
        self.gate.close();
        let _ = self
            .client
            .eval::<i64, _, _, _>(RELEASE, key(self.node), vec![self.token.clone()])
            .await;
    }
}

impl Drop for NodeLease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// How long after a successful renewal was sent ids may still be issued:
/// two thirds of the TTL, a third short of the earliest expiry.
fn good_for(ttl: Duration) -> Duration {
    ttl - ttl / 3
}

async fn renew(
    client: Client,
    node: u16,
    token: String,
    ttl: Duration,
    gate: Arc<LeaseGate>,
    stats: Arc<LeaseStats>,
) {
    let ttl_ms = (ttl.as_millis() as u64).to_string();
    // A renewal that has not answered within a sixth of the TTL is given
    // up and retried: waiting out the client's own timeout could use up
    // the whole margin on one stuck connection.
    let attempt_timeout = ttl / 6;
    let period = ttl / 6;
    let mut next = tokio::time::Instant::now() + period;
    let mut retry = RETRY_MIN;
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        let call =
            client.eval::<i64, _, _, _>(RENEW, key(node), vec![token.clone(), ttl_ms.clone()]);
        let outcome = match tokio::time::timeout(attempt_timeout, call).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {attempt_timeout:?}")),
        };
        match outcome {
            Ok(n @ (1 | 2)) => {
                gate.open_until(sent + good_for(ttl));
                if n == 2 {
                    stats.reclaimed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        node,
                        "node-id lease key was missing (lost in a failover?); taken back"
                    );
                } else {
                    stats.renewed.fetch_add(1, Ordering::Relaxed);
                }
                next = tokio::time::Instant::from_std(sent) + period;
                retry = RETRY_MIN;
            }
            Ok(_) => {
                tracing::error!(node, "node-id lease taken by another process; no more ids");
                gate.close();
                return;
            }
            Err(error) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node, %error, open = gate.is_open(), "node-id lease renewal failed; retrying");
                next = tokio::time::Instant::now() + retry;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}
