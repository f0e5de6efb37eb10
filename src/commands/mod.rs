//! One module per command, each a thin shell over the libraries.

pub mod bench_fanout;
pub mod demo;
pub mod device;
pub mod loadgen;
pub mod serve;
pub mod token;
