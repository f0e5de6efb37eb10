//! The Tiercast edge: the QUIC server that client devices connect to. It
//! authenticates devices, runs their requests against the embedded engine,
//! and fans out what the backplane brings to the local devices it is for.
//!
//! - [`server`]: the edge's tasks (backplane fan-out, heartbeat, repair)
//!   and shutdown.
//! - [`core`]: the I/O core: shards of connections as `quinn-proto`
//!   state, one loop each, batched UDP, a timer wheel.
//! - [`session`]: what a connection asks apart from I/O: Hello, attach,
//!   requests, the inbox seam.
//! - [`sessions`]: local connections by user and device.
//! - [`conversations`]: which conversations local users are in (tiers 2/3).
//! - [`limits`]: request rate limits per connection and per user.
//! - [`tls`]: certificates and the rustls configuration (ALPN `tiercast/1`).
//! - [`config`]: the process configuration (file, environment, flags).
//! - [`node`]: a whole single node (store, backplane, engine, HTTP, edge).
//! - [`metrics`]: the edge's Prometheus metrics.

pub mod config;
pub mod conversations;
pub mod core;
pub mod fleet;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod server;
pub mod session;
pub mod sessions;
pub mod tls;

pub use config::{Config, ConfigError};
pub use node::{EngineService, Node};
pub use server::Edge;
