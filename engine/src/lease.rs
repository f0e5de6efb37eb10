//! Node-id leases: in a cluster every engine (and every edge, which embeds
//! one) takes a Snowflake node id from Redis, so two live processes never
//! share one. A lease is a key `tiercast:node:{<id>}` set with NX and a TTL,
//! renewed at a third of the TTL by compare-and-expire; a process that cannot
//! renew in time stops issuing ids (sends fail with `unavailable`) rather
//! than risk a duplicate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use tokio::task::JoinHandle;

use crate::backplane::BackplaneError;
use crate::snowflake::MAX_NODE;

const RENEW: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
                     return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
                       return redis.call('del', KEYS[1]) else return 0 end";

fn key(node: u16) -> String {
    format!("tiercast:node:{{{node}}}")
}

/// A held node id. Dropping it stops renewal; [`NodeLease::release`] frees
/// the id at once.
#[derive(Debug)]
pub struct NodeLease {
    pub node: u16,
    token: String,
    client: Client,
    valid: Arc<AtomicBool>,
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
                let valid = Arc::new(AtomicBool::new(true));
                let renewer = tokio::spawn(renew(
                    client.clone(),
                    node,
                    token.clone(),
                    ttl,
                    valid.clone(),
                ));
                return Ok(Self {
                    node,
                    token,
                    client: client.clone(),
                    valid,
                    renewer,
                });
            }
        }
        Err(BackplaneError::Unavailable(
            "all 1024 node ids are leased".into(),
        ))
    }

    /// False once a renewal failed: the id may be someone else's now.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.valid.clone()
    }

    pub async fn release(self) {
        self.renewer.abort();
        self.valid.store(false, Ordering::Release);
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

async fn renew(client: Client, node: u16, token: String, ttl: Duration, valid: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.tick().await;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let r: Result<i64, _> = client
            .eval(
                RENEW,
                key(node),
                vec![token.clone(), (ttl.as_millis() as u64).to_string()],
            )
            .await;
        match r {
            Ok(1) => {
                last_ok = tokio::time::Instant::now();
                // Renewed before expiry: the id is still ours.
                valid.store(true, Ordering::Release);
            }
            Ok(_) => {
                tracing::error!(node, "node-id lease taken by another process; no more ids");
                valid.store(false, Ordering::Release);
                return;
            }
            Err(e) => {
                tracing::warn!(node, error = %e, "lease renewal failed");
                // Keep a margin: stop issuing before the key can expire.
                if last_ok.elapsed() > ttl * 2 / 3 {
                    valid.store(false, Ordering::Release);
                }
            }
        }
    }
}
