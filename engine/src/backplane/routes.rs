//! The routing table of tiers 2 and 3: which edges host a member of which
//! conversation. Edges add themselves when a member of a conversation
//! connects to them and remove themselves when the last one leaves; an
//! edge's entries count only while its liveness lease is fresh, so a dead
//! edge drops out by itself.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::BackplaneError;

#[async_trait]
pub trait Routes: Send + Sync + 'static {
    /// Renews `edge`'s liveness for `ttl_ms`.
    async fn heartbeat(&self, edge: u16, ttl_ms: u64) -> Result<(), BackplaneError>;
    /// `edge` hosts a member of `conversation`.
    async fn add(&self, conversation: u64, edge: u16) -> Result<(), BackplaneError>;
    /// `edge` hosts no member of `conversation` any more.
    async fn remove(&self, conversation: u64, edge: u16) -> Result<(), BackplaneError>;
    /// The live edges hosting a member of `conversation`.
    async fn hosting_edges(&self, conversation: u64) -> Result<Vec<u16>, BackplaneError>;
}

/// Routes inside one process: every edge is in this process, so every edge
/// listed is live.
#[derive(Debug, Default)]
pub struct LocalRoutes {
    table: Mutex<HashMap<u64, HashSet<u16>>>,
}

#[async_trait]
impl Routes for LocalRoutes {
    async fn heartbeat(&self, _edge: u16, _ttl_ms: u64) -> Result<(), BackplaneError> {
        Ok(())
    }

    async fn add(&self, conversation: u64, edge: u16) -> Result<(), BackplaneError> {
        self.table
            .lock()
            .expect("routes lock")
            .entry(conversation)
            .or_default()
            .insert(edge);
        Ok(())
    }

    async fn remove(&self, conversation: u64, edge: u16) -> Result<(), BackplaneError> {
        let mut t = self.table.lock().expect("routes lock");
        if let Some(edges) = t.get_mut(&conversation) {
            edges.remove(&edge);
            if edges.is_empty() {
                t.remove(&conversation);
            }
        }
        Ok(())
    }

    async fn hosting_edges(&self, conversation: u64) -> Result<Vec<u16>, BackplaneError> {
        let mut edges: Vec<u16> = self
            .table
            .lock()
            .expect("routes lock")
            .get(&conversation)
            .map(|e| e.iter().copied().collect())
            .unwrap_or_default();
        edges.sort_unstable();
        Ok(edges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_routes_track_edges_per_conversation() {
        let r = LocalRoutes::default();
        r.add(1, 3).await.unwrap();
        r.add(1, 1).await.unwrap();
        r.add(1, 3).await.unwrap();
        r.add(2, 2).await.unwrap();
        assert_eq!(r.hosting_edges(1).await.unwrap(), vec![1, 3]);
        r.remove(1, 3).await.unwrap();
        assert_eq!(r.hosting_edges(1).await.unwrap(), vec![1]);
        r.remove(1, 1).await.unwrap();
        assert!(r.hosting_edges(1).await.unwrap().is_empty());
        assert_eq!(r.hosting_edges(2).await.unwrap(), vec![2]);
    }
}
