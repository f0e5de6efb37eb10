//! In-process backplane for a single node: a map from channel to the
//! subscribers' queues. Same contract as Redis pub/sub: a publish reaches the
//! subscribers of that moment, and a full subscriber queue drops the payload
//! (counted in [`LocalBackplane::dropped`]) instead of blocking the publisher.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Backplane, BackplaneError, Inbound, Subscriber};

/// A channel's subscribers: (subscriber id, its queue).
type Subscribers = Vec<(u64, mpsc::Sender<Inbound>)>;

#[derive(Default)]
struct Shared {
    next_id: AtomicU64,
    /// Exported as `tiercast_backplane_local_dropped_total` (see
    /// [`LocalBackplane::dropped_counter`]).
    dropped: prometheus_client::metrics::counter::Counter,
    /// Publishes and their payload bytes, as Redis counts `SPUBLISH` for
    /// the cluster backplane (docs/fanout.md): what a tier costs per
    /// message, counted where it is paid.
    published: prometheus_client::metrics::counter::Counter,
    published_bytes: prometheus_client::metrics::counter::Counter,
    channels: Mutex<HashMap<Arc<str>, Subscribers>>,
}

#[derive(Default, Clone)]
pub struct LocalBackplane {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalBackplane")
    }
}

impl LocalBackplane {
    pub fn new() -> Self {
        Self::default()
    }

    /// Payloads dropped because a subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.get()
    }

    /// The drop counter, to register in a metrics registry.
    pub fn dropped_counter(&self) -> prometheus_client::metrics::counter::Counter {
        self.shared.dropped.clone()
    }

    /// Publishes so far (one per channel per call, subscribed or not).
    pub fn published(&self) -> u64 {
        self.shared.published.get()
    }

    /// Payload bytes published so far.
    pub fn published_bytes(&self) -> u64 {
        self.shared.published_bytes.get()
    }

    /// The publish and byte counters, to register in a metrics registry.
    pub fn published_counters(
        &self,
    ) -> (
        prometheus_client::metrics::counter::Counter,
        prometheus_client::metrics::counter::Counter,
    ) {
        (
            self.shared.published.clone(),
            self.shared.published_bytes.clone(),
        )
    }
}

#[async_trait]
impl Backplane for LocalBackplane {
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BackplaneError> {
        self.shared.published.inc();
        self.shared.published_bytes.inc_by(payload.len() as u64);
        let channels = self.shared.channels.lock().expect("backplane lock");
        if let Some((name, subs)) = channels.get_key_value(channel) {
            for (_, tx) in subs {
                let inbound = Inbound {
                    channel: name.clone(),
                    payload: payload.clone(),
                };
                if tx.try_send(inbound).is_err() {
                    // Stored already: the devices concerned catch up from
                    // their inbox or cursor. Logged at the first drop and
                    // every 1,000th, so a storm does not flood the log.
                    let n = self.shared.dropped.inc() + 1;
                    if n == 1 || n.is_multiple_of(1_000) {
                        tracing::warn!(%channel, dropped = n, "in-process backplane: a subscriber's queue is full; payload dropped");
                    }
                }
            }
        }
        Ok(())
    }

    async fn subscriber(
        &self,
        capacity: usize,
    ) -> Result<(Arc<dyn Subscriber>, mpsc::Receiver<Inbound>), BackplaneError> {
        let (tx, rx) = mpsc::channel(capacity);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let sub = LocalSubscriber {
            id,
            tx,
            shared: self.shared.clone(),
        };
        Ok((Arc::new(sub), rx))
    }
}

struct LocalSubscriber {
    id: u64,
    tx: mpsc::Sender<Inbound>,
    shared: Arc<Shared>,
}

#[async_trait]
impl Subscriber for LocalSubscriber {
    async fn subscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        let mut channels = self.shared.channels.lock().expect("backplane lock");
        let subs = channels.entry(Arc::from(channel)).or_default();
        if !subs.iter().any(|(id, _)| *id == self.id) {
            subs.push((self.id, self.tx.clone()));
        }
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        let mut channels = self.shared.channels.lock().expect("backplane lock");
        if let Some(subs) = channels.get_mut(channel) {
            subs.retain(|(id, _)| *id != self.id);
            if subs.is_empty() {
                channels.remove(channel);
            }
        }
        Ok(())
    }
}

impl Drop for LocalSubscriber {
    fn drop(&mut self) {
        if let Ok(mut channels) = self.shared.channels.lock() {
            channels.retain(|_, subs| {
                subs.retain(|(id, _)| *id != self.id);
                !subs.is_empty()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publish_reaches_current_subscribers_only() {
        let bp = LocalBackplane::new();
        let (a, mut ra) = bp.subscriber(8).await.unwrap();
        let (b, mut rb) = bp.subscriber(8).await.unwrap();
        a.subscribe("x").await.unwrap();
        a.subscribe("x").await.unwrap(); // idempotent
        b.subscribe("y").await.unwrap();
        bp.publish("x", Bytes::from_static(b"1")).await.unwrap();
        bp.publish("z", Bytes::from_static(b"nobody"))
            .await
            .unwrap();
        let got = ra.recv().await.unwrap();
        assert_eq!((&*got.channel, &got.payload[..]), ("x", &b"1"[..]));
        assert!(ra.try_recv().is_err(), "subscribed twice, delivered once");
        assert!(rb.try_recv().is_err());

        a.unsubscribe("x").await.unwrap();
        bp.publish("x", Bytes::from_static(b"2")).await.unwrap();
        assert!(ra.try_recv().is_err());
        drop(b);
        bp.publish("y", Bytes::from_static(b"3")).await.unwrap();
        assert_eq!(bp.dropped(), 0);
    }

    #[tokio::test]
    async fn full_subscriber_drops_and_counts_without_blocking() {
        let bp = LocalBackplane::new();
        let (a, _ra) = bp.subscriber(2).await.unwrap();
        a.subscribe("x").await.unwrap();
        for _ in 0..5 {
            bp.publish("x", Bytes::from_static(b".")).await.unwrap();
        }
        assert_eq!(bp.dropped(), 3);
    }
}
