//! The Tiercast client SDK: what apps, the CLI and loadgen use to talk to an
//! edge. It never imports server code: only the wire formats.
//!
//! ```no_run
//! # async fn demo(cfg: tiercast_client::ClientConfig) -> Result<(), tiercast_client::ClientError> {
//! let (client, mut deliveries) = tiercast_client::Client::connect(cfg).await?;
//! let ok = client.send(42, 1, b"hello".to_vec().into()).await?;
//! while let Some(d) = deliveries.recv().await {
//!     if let tiercast_client::Delivery::Message(m) = d {
//!         client.ack(&[m.id]).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! - [`connection`]: connect, Hello, requests and the delivery stream.
//! - [`session`]: a device that reconnects (backoff with full jitter),
//!   resumes (inbox, cursor sync) and deduplicates by itself.
//! - [`reorder`]: the reorder window that presents each conversation in id
//!   order when several engine nodes publish to it.
//! - [`resume`]: the rules of a resume (cursors, dedupe, where each
//!   conversation syncs from), shared by the session and loadgen's core.
//! - [`tls`]: trusting an edge's certificate.

pub mod connection;
pub mod lossy;
pub mod reconnect;
pub mod reorder;
pub mod resume;
pub mod session;
pub mod tls;

pub use connection::{
    Client, ClientConfig, ClientError, Deliveries, Delivery, SendOk, client_endpoint,
};
pub use session::{Event, Events, Session, SessionConfig, SessionStats};
pub use tiercast_schemas::wire::{Cursor, ErrorCode, Message, SyncEntry};
