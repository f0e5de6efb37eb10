//! Load generation for Tiercast: the library the `tiercast` command runs
//! for `demo`, `bench-fanout`, `loadgen run` and `loadgen plan`.
//!
//! - [`demo`]: `tiercast demo`, a single node and simulated devices in one
//!   process, with an exact delivery report.
//! - [`fanout`]: `tiercast bench-fanout`, Redis and store cost per message
//!   per tier, counted by Redis.
//! - [`tracker`]: the demo's exact delivery accounting (lost, duplicates,
//!   latency).
//! - [`sim`]: simulated devices and send-time-stamped bodies, one way for
//!   the demo and loadgen.
//! - [`schedule`], [`ledger`]: a load run's pure send schedule, and its
//!   pure ledger of expected against received deliveries.
//! - [`scenario`], [`target`], [`run`]: `tiercast loadgen run`, open-loop
//!   scenarios against a self-hosted or given deployment; [`hgrm`] and
//!   [`plot`] write its histograms and picture.
//! - [`merge`]: `tiercast loadgen merge`, several generators' reports as
//!   one, their histograms merged.
//! - [`plan`]: `tiercast loadgen plan`, fleet sizes from a measured run.
//! - [`predict`]: `tiercast loadgen predict`, a run on one edge's CPU and
//!   latency carried to N edges, against runs measured there.
//! - [`report`]: the figures as text and JSON.
//! - [`swarm`]: loadgen's devices on an I/O core (many SDK sessions per
//!   socket, one loop each, no task per device).

pub mod compare;
pub mod demo;
pub mod fanout;
pub mod hgrm;
pub mod ledger;
pub mod merge;
pub mod plan;
pub mod plot;
pub mod predict;
pub mod report;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod sim;
pub mod swarm;
pub mod target;
pub mod tracker;
