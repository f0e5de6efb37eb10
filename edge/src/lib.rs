//! The Tiercast edge: the QUIC server that client devices connect to. It
//! authenticates devices, runs their requests against the embedded engine,
//! and fans out what the backplane brings to the local devices it is for.
//!
//! - [`server`]: the accept loop, backplane fan-out loop and shutdown.
//! - [`session`]: one connection: Hello, requests, the delivery stream.
//! - [`sessions`]: local connections by user, and local fan-out.
//! - [`conversations`]: which conversations local users are in (tiers 2/3).
//! - [`limits`]: request rate limits per connection and per user.
//! - [`tls`]: certificates and the rustls configuration (ALPN `tiercast/1`).
//! - [`config`]: the process configuration (file, environment, flags).
//! - [`node`]: a whole single node (store, backplane, engine, HTTP, edge).
//! - [`metrics`]: the edge's Prometheus metrics.

pub mod config;
pub mod conversations;
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
