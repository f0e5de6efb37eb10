//! Load generation for Tiercast, and the `tiercast` command.
//!
//! - [`demo`]: `tiercast demo`, a single node and simulated devices in one
//!   process, with an exact delivery report.
//! - [`fanout`]: `tiercast bench-fanout`, Redis and store cost per message
//!   per tier, counted by Redis.
//! - [`tracker`]: exact delivery accounting (lost, duplicates, latency).
//! - [`report`]: the figures as text and JSON.

pub mod demo;
pub mod fanout;
pub mod report;
pub mod tracker;
