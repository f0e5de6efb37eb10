//! Criterion benchmarks of Tiercast's hot paths live in `benches/`; run them
//! with `cargo bench -p tiercast-bench`. Figures: docs/benchmarks.md.
