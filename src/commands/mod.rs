//! One module per command, each a thin shell over the libraries: `serve`
//! is the one body of `dev`, `engine` and `edge` (they differ by the role
//! it is given); `device` is what `listen` and `send` share.

pub mod bench_fanout;
pub mod demo;
pub mod device;
pub mod listen;
pub mod loadgen;
pub mod send;
pub mod serve;
pub mod token;
