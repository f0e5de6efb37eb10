//! The `Backplane`: how a message published by an engine reaches the edges
//! that host its recipients. Channels are named with Redis Cluster hash tags
//! so that a channel lives on one shard ([`user_channel`]).
//!
//! - [`local`]: in-process channels, for a single node.
//! - [`redis`]: sharded pub/sub on a Redis Cluster, and the routing table.
//! - [`routes`]: which edges host a conversation's members.
//!
//! A publish is fire-and-forget by design: the message was stored first, so
//! a lost publish costs latency (devices catch up from inbox or cursor), never
//! the message.

pub mod local;
pub mod redis;
pub mod routes;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use local::LocalBackplane;
pub use routes::{LocalRoutes, Routes};

/// The channel of one user's devices: `client+user:{uid}`. The braces are
/// the hash tag, so one user's channel maps to one Redis Cluster slot.
pub fn user_channel(user: u64) -> String {
    format!("client+user:{{{user}}}")
}

/// The user id of a [`user_channel`] name.
pub fn parse_user_channel(channel: &str) -> Option<u64> {
    channel
        .strip_prefix("client+user:{")?
        .strip_suffix('}')?
        .parse()
        .ok()
}

/// One of an edge's `k` node channels: `node:{<edge>:<k>}`. Tier 2 and 3
/// payloads for a conversation go to channel `conversation % K` of each
/// hosting edge, so an edge's traffic spreads over K slots (and shards).
pub fn node_channel(edge: u16, k: u16) -> String {
    format!("node:{{{edge}:{k}}}")
}

/// The edge and index of a [`node_channel`] name.
pub fn parse_node_channel(channel: &str) -> Option<(u16, u16)> {
    let inner = channel.strip_prefix("node:{")?.strip_suffix('}')?;
    let (e, k) = inner.split_once(':')?;
    Some((e.parse().ok()?, k.parse().ok()?))
}

/// One payload received on a subscribed channel.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub channel: Arc<str>,
    pub payload: Bytes,
    /// Payloads for this subscriber were dropped just before this one (a
    /// full queue, a lagging client): which kinds of channel they may have
    /// come from ([`GAP_USER_CHANNELS`], [`GAP_NODE_CHANNELS`]; 0 = none).
    /// Everything the subscriber handled before this payload came before
    /// the gap, so its owner knows where to repair from.
    pub gap_before: u8,
}

/// [`Inbound::gap_before`]: a user channel's payload (tier 1, membership,
/// read markers) may have been dropped.
pub const GAP_USER_CHANNELS: u8 = 1;
/// [`Inbound::gap_before`]: a node channel's payload (tiers 2 and 3) may
/// have been dropped.
pub const GAP_NODE_CHANNELS: u8 = 2;

/// The [`Inbound::gap_before`] bit for a payload dropped from `channel`.
pub fn gap_kind(channel: &str) -> u8 {
    if parse_user_channel(channel).is_some() {
        GAP_USER_CHANNELS
    } else {
        GAP_NODE_CHANNELS
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    #[error("backplane unavailable: {0}")]
    Unavailable(String),
    #[error("backplane command failed: {0}")]
    Command(String),
}

#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BackplaneError>;

    /// A new subscriber: its subscriptions deliver into the returned receiver
    /// (bounded by `capacity`; an overflowing subscriber loses payloads, never
    /// stored messages, and the loss is counted).
    async fn subscriber(
        &self,
        capacity: usize,
    ) -> Result<(Arc<dyn Subscriber>, mpsc::Receiver<Inbound>), BackplaneError>;
}

#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    async fn subscribe(&self, channel: &str) -> Result<(), BackplaneError>;
    async fn unsubscribe(&self, channel: &str) -> Result<(), BackplaneError>;
    /// Counts the times the subscriptions were interrupted and are whole
    /// again (a reconnect, a failover, a slot that moved): payloads
    /// published in between may have been missed, and the subscriber's
    /// owner repairs the gap from the store. A backend whose subscriptions
    /// cannot be interrupted never changes it.
    ///
    /// The default has no sender: waiting on it ends at once, and a repair
    /// loop on it ends with it.
    fn interruptions(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::channel(0).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_channel_is_hash_tagged_and_parses_back() {
        assert_eq!(user_channel(42), "client+user:{42}");
        assert_eq!(parse_user_channel(&user_channel(42)), Some(42));
        assert_eq!(parse_user_channel("node:{1:2}"), None);
        assert_eq!(node_channel(7, 3), "node:{7:3}");
        assert_eq!(parse_node_channel(&node_channel(7, 3)), Some((7, 3)));
        assert_eq!(parse_node_channel(&user_channel(7)), None);
    }
}
