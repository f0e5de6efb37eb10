//! The `Backplane`: how a message published by an engine reaches the edges
//! that host its recipients. Channels are named with Redis Cluster hash tags
//! so that a channel lives on one shard ([`user_channel`]).
//!
//! - [`local`]: in-process channels, for a single node.
//!
//! A publish is fire-and-forget by design: the message was stored first, so
//! a lost publish costs latency (devices catch up from inbox or cursor), never
//! the message.

pub mod local;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use local::LocalBackplane;

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

/// One payload received on a subscribed channel.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub channel: Arc<str>,
    pub payload: Bytes,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_channel_is_hash_tagged_and_parses_back() {
        assert_eq!(user_channel(42), "client+user:{42}");
        assert_eq!(parse_user_channel(&user_channel(42)), Some(42));
        assert_eq!(parse_user_channel("node:{edge:1}"), None);
    }
}
