//! The edge server: the QUIC accept loop, the backplane fan-out loop, and
//! shutdown. [`Edge::run`] is the one entry point that `tiercast` and the
//! tests both call.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tiercast_engine::Engine;
use tiercast_engine::auth::TokenKeys;
use tiercast_engine::backplane::{Inbound, Subscriber, parse_user_channel};
use tiercast_schemas::envelope::{Envelope, Payload};
use tiercast_schemas::wire::{ErrorCode, ServerBody, ServerFrame};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::config::EdgeConfig;
use crate::metrics::EdgeMetrics;
use crate::sessions::Sessions;

/// Locks that serialise subscribe/unsubscribe per user, striped so that
/// unrelated users do not wait on each other.
const SUBSCRIPTION_STRIPES: usize = 64;

/// State shared by the edge's tasks.
pub(crate) struct Shared {
    pub engine: Arc<Engine>,
    pub keys: TokenKeys,
    pub cfg: EdgeConfig,
    pub sessions: Sessions<quinn::Connection>,
    pub subscriber: Arc<dyn Subscriber>,
    pub subscription_locks: Vec<tokio::sync::Mutex<()>>,
    pub metrics: EdgeMetrics,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn subscription_lock(&self, user: u64) -> &tokio::sync::Mutex<()> {
        &self.subscription_locks[(user % SUBSCRIPTION_STRIPES as u64) as usize]
    }
}

pub struct Edge {
    shared: Arc<Shared>,
    inbound: mpsc::Receiver<Inbound>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Edge")
    }
}

/// Capacity of the queue between the backplane and the fan-out loop.
const INBOUND_QUEUE: usize = 65_536;

impl Edge {
    /// An edge serving `engine`'s conversations, subscribed through its own
    /// backplane subscriber.
    pub async fn new(
        engine: Arc<Engine>,
        keys: TokenKeys,
        cfg: EdgeConfig,
        metrics: EdgeMetrics,
    ) -> Result<Self, tiercast_engine::backplane::BackplaneError> {
        let (subscriber, inbound) = engine.backplane().subscriber(INBOUND_QUEUE).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                engine,
                keys,
                cfg,
                sessions: Sessions::new(),
                subscriber,
                subscription_locks: (0..SUBSCRIPTION_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                metrics,
                next_conn: AtomicU64::new(1),
            }),
            inbound,
        })
    }

    /// Serves `endpoint` until `shutdown` completes, then closes every
    /// connection with `draining` and waits (bounded) for their tasks.
    pub async fn run(self, endpoint: quinn::Endpoint, shutdown: impl Future<Output = ()>) {
        let Edge { shared, inbound } = self;
        let fanout = tokio::spawn(fan_out_loop(shared.clone(), inbound));
        let permits = Arc::new(Semaphore::new(shared.cfg.max_connections));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        shared.metrics.error(ErrorCode::Unavailable);
                        incoming.refuse();
                        continue;
                    };
                    let shared = shared.clone();
                    conns.spawn(async move {
                        crate::session::serve(shared, incoming).await;
                        drop(permit);
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        endpoint.close(
            quinn::VarInt::from(ErrorCode::Draining as u16),
            b"edge shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        fanout.abort();
        endpoint.wait_idle().await;
    }
}

/// Receives backplane payloads and hands each to the local connections it is
/// for, encoding each client frame once.
async fn fan_out_loop(shared: Arc<Shared>, mut inbound: mpsc::Receiver<Inbound>) {
    while let Some(msg) = inbound.recv().await {
        shared.metrics.backplane_inbound.inc();
        let envelope = match Envelope::decode(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                shared.metrics.backplane_malformed.inc();
                tracing::warn!(channel = %msg.channel, error = %e, "dropping malformed envelope");
                continue;
            }
        };
        let Some(user) = parse_user_channel(&msg.channel) else {
            tracing::debug!(channel = %msg.channel, "payload on a channel this edge does not serve");
            continue;
        };
        let (frame, except_client) = match envelope.payload {
            Payload::Deliver {
                message,
                except_client,
                ..
            } => (
                ServerFrame::new(0, ServerBody::Message(message)).encode(),
                except_client,
            ),
            Payload::Notify {
                conversation,
                message_id,
            } => (
                ServerFrame::new(
                    0,
                    ServerBody::Notify {
                        conversation,
                        message_id,
                    },
                )
                .encode(),
                0,
            ),
            Payload::ReadMarker {
                user,
                conversation,
                message_id,
                origin_client,
            } => (
                ServerFrame::new(
                    0,
                    ServerBody::ReadMarker {
                        user,
                        conversation,
                        message_id,
                    },
                )
                .encode(),
                origin_client,
            ),
        };
        let result = shared.sessions.fan_out(user, except_client, &frame);
        shared.metrics.deliveries.inc_by(result.enqueued as u64);
        for conn in result.overflowed {
            shared.metrics.slow_consumers.inc();
            shared.metrics.error(ErrorCode::SlowConsumer);
            conn.close(
                quinn::VarInt::from(ErrorCode::SlowConsumer as u16),
                b"outbound queue full; reconnect and catch up from your inbox",
            );
        }
    }
}
