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
//!
//! Every renewal also reads the Redis server's clock (`TIME`, inside the
//! script) and records this process's skew against it in the gate; ids stop
//! while the skew is beyond `engine.max_clock_skew_ms` (see [`LeaseGate`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use tokio::task::JoinHandle;

use crate::backplane::BackplaneError;
use crate::snowflake::{LeaseGate, MAX_NODE};

/// `{status, seconds, microseconds}`: status 1: renewed; 2: the key was
/// gone and is ours again; 0: someone else's. The time is the Redis
/// server's (`TIME`), the common clock each node's skew is measured against.
const RENEW: &str = "local t = redis.call('time') \
                     local s = 0 \
                     local v = redis.call('get', KEYS[1]) \
                     if v == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) s = 1 \
                     elseif not v then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) s = 2 end \
                     return {s, tonumber(t[1]), tonumber(t[2])}";
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
                match measure_skew(client, node).await {
                    Ok(skew) => gate.record_skew(skew),
                    Err(error) => tracing::warn!(%error, "clock skew not measured"),
                }
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

/// Local wall clock minus the Redis server's, from a command sent at local
/// wall time `sent_ms` and answered at `received_ms` that read the server's
/// time as `(seconds, microseconds)`: the server read it somewhere in
/// between, so the midpoint is the estimate (off by at most half the round
/// trip).
fn skew_ms(sent_ms: u64, received_ms: u64, server: (i64, i64)) -> i64 {
    let server_ms = server.0 * 1000 + server.1 / 1000;
    let mid = (sent_ms + received_ms) / 2;
    mid as i64 - server_ms
}

/// Measures this process's clock skew against the Redis server holding
/// the lease key (a `TIME` by itself on that shard).
async fn measure_skew(client: &Client, node: u16) -> Result<i64, String> {
    let sent_ms = crate::snowflake::now_unix_ms();
    let t: Vec<i64> = client
        .eval(
            "local t = redis.call('time') return {tonumber(t[1]), tonumber(t[2])}",
            key(node),
            Vec::<String>::new(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let received_ms = crate::snowflake::now_unix_ms();
    match t[..] {
        [s, us] => Ok(skew_ms(sent_ms, received_ms, (s, us))),
        _ => Err(format!("TIME answered {t:?}")),
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
        let sent_ms = crate::snowflake::now_unix_ms();
        let call =
            client.eval::<Vec<i64>, _, _, _>(RENEW, key(node), vec![token.clone(), ttl_ms.clone()]);
        let outcome = match tokio::time::timeout(attempt_timeout, call).await {
            Ok(Ok(v)) => match v[..] {
                [n, s, us] => {
                    let received_ms = crate::snowflake::now_unix_ms();
                    Ok((n, skew_ms(sent_ms, received_ms, (s, us))))
                }
                _ => Err(format!("renewal answered {v:?}")),
            },
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {attempt_timeout:?}")),
        };
        match outcome {
            Ok((n @ (1 | 2), skew)) => {
                gate.record_skew(skew);
                if let Err(e) = gate.check_skew() {
                    tracing::error!(node, error = %e, "clock skew beyond the limit; no ids until it is back within");
                }
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

#[cfg(test)]
mod tests {
    use super::skew_ms;

    #[test]
    fn skew_is_the_midpoint_against_the_server_clock() {
        // Sent at 1000, answered at 1010: the server read 1005 on a clock
        // 5 s behind ours, 4 s ahead of it.
        assert_eq!(skew_ms(1_000_000, 1_000_010, (995, 5_000)), 5_000);
        assert_eq!(skew_ms(1_000_000, 1_000_010, (1004, 5_000)), -4_000);
        assert_eq!(skew_ms(1_000_000, 1_000_000, (1000, 999)), 0);
    }
}
