//! The Tiercast engine: everything between a message arriving and it being
//! stored and published. Edges embed it (they call [`engine::Engine`] for
//! every Send), and the engine service serves it over HTTP.
//!
//! - [`snowflake`]: 64-bit time-ordered ids, unique across nodes.
//! - [`engine`]: the write path (authorise, deduplicate, id, persist,
//!   publish) and the reads devices catch up with.
//! - [`store`]: the `Store` trait, its embedded backend and the conformance
//!   rules every backend passes.
//! - [`planner`]: which fan-out tier a conversation gets (pure).
//! - [`sequencer`]: per-conversation publish order (pure).
//! - [`batch`]: coalescing of small store calls that arrive together.
//! - [`backplane`]: the `Backplane` and `Routes` traits, in-process and
//!   Redis (Cluster, sharded pub/sub) backends.
//! - [`lease`]: node-id leases through Redis.
//! - [`reads`]: read markers, queued and written behind (Redis Streams in a
//!   cluster, in process on one node).
//! - [`auth`]: HS256 tokens (with key ids) for users, publishers and the
//!   internal credential.
//! - [`http`]: the publisher HTTP/JSON API, `/internal/store` and
//!   `/metrics`, with their limits.
//! - [`ids_json`]: ids in JSON as decimal strings (exact past 2^53).
//! - [`metrics`]: the engine's Prometheus metrics.
//! - [`config`]: the engine's settings and their validation.

pub mod auth;
pub mod backplane;
pub mod batch;
pub mod config;
pub mod engine;
pub mod http;
pub mod ids_json;
pub mod lease;
pub mod metrics;
pub mod planner;
pub mod reads;
pub mod sequencer;
pub mod snowflake;
pub mod store;

pub use engine::{Engine, EngineError, Outgoing, SendReceipt, Sender};
