//! Criterion benchmarks of Tiercast's hot paths live in `benches/`; run them
//! with `cargo bench -p tiercast-bench`. Figures: docs/benchmarks.md.
//!
//! [`udp_floor`]: the machine's floor for a delivery (the kernel's cost of
//! one UDP datagram to one of many loopback receivers), which every
//! per-delivery figure is compared against; `cargo run --release -p
//! tiercast-bench --bin udp-floor`, and measured by `tiercast loadgen run`
//! before each load (`machine.udp_floor_us`).

pub mod udp_floor;
