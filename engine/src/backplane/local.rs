//! In-process backplane for a single node: a map from channel to the
//! subscribers' queues. Same contract as Redis pub/sub: a publish reaches the
//! subscribers of that moment, and a full subscriber queue drops the payload
//! (counted in [`LocalBackplane::dropped`]) instead of blocking the publisher.
//! The subscriber's next payload carries the gap ([`Inbound::gap_before`]),
//! so its owner repairs it from the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Backplane, BackplaneError, Inbound, Subscriber, gap_kind};

/// One subscriber as its channels see it.
#[derive(Clone)]
struct Sub {
    id: u64,
    tx: mpsc::Sender<Inbound>,
    /// The kinds of channel whose payloads were dropped since the last one
    /// this subscriber's queue took (see [`Inbound::gap_before`]).
    gap: Arc<AtomicU8>,
}

/// A channel's subscribers.
type Subscribers = Vec<Sub>;

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
            for sub in subs {
                // Taken with the payload; put back if the queue refuses it.
                let gap_before = sub.gap.swap(0, Ordering::AcqRel);
                let inbound = Inbound {
                    channel: name.clone(),
                    payload: payload.clone(),
                    gap_before,
                };
                if sub.tx.try_send(inbound).is_err() {
                    sub.gap
                        .fetch_or(gap_before | gap_kind(channel), Ordering::AcqRel);
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
            sub: Sub {
                id,
                tx,
                gap: Arc::new(AtomicU8::new(0)),
            },
            shared: self.shared.clone(),
        };
        Ok((Arc::new(sub), rx))
    }
}

struct LocalSubscriber {
    sub: Sub,
    shared: Arc<Shared>,
}

#[async_trait]
impl Subscriber for LocalSubscriber {
    async fn subscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        let mut channels = self.shared.channels.lock().expect("backplane lock");
        let subs = channels.entry(Arc::from(channel)).or_default();
        if !subs.iter().any(|s| s.id == self.sub.id) {
            subs.push(self.sub.clone());
        }
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BackplaneError> {
        let mut channels = self.shared.channels.lock().expect("backplane lock");
        if let Some(subs) = channels.get_mut(channel) {
            subs.retain(|s| s.id != self.sub.id);
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
                subs.retain(|s| s.id != self.sub.id);
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

    #[tokio::test]
    async fn the_payload_after_a_drop_carries_the_gap() {
        let bp = LocalBackplane::new();
        let (a, mut ra) = bp.subscriber(1).await.unwrap();
        let user = super::super::user_channel(7);
        let node = super::super::node_channel(1, 0);
        a.subscribe(&user).await.unwrap();
        a.subscribe(&node).await.unwrap();
        bp.publish(&user, Bytes::from_static(b"1")).await.unwrap();
        // The queue is full: both dropped, one from each kind of channel.
        bp.publish(&user, Bytes::from_static(b"2")).await.unwrap();
        bp.publish(&node, Bytes::from_static(b"3")).await.unwrap();
        assert_eq!(bp.dropped(), 2);
        let first = ra.recv().await.unwrap();
        assert_eq!((&first.payload[..], first.gap_before), (&b"1"[..], 0));
        bp.publish(&node, Bytes::from_static(b"4")).await.unwrap();
        let next = ra.recv().await.unwrap();
        assert_eq!(&next.payload[..], b"4");
        assert_eq!(
            next.gap_before,
            super::super::GAP_USER_CHANNELS | super::super::GAP_NODE_CHANNELS,
            "the gap before it: both kinds"
        );
        bp.publish(&node, Bytes::from_static(b"5")).await.unwrap();
        assert_eq!(ra.recv().await.unwrap().gap_before, 0, "reported once");
    }
}
