//! Integration tests, linked as one binary (one link instead of one per file).

mod cluster_processes;
mod demo_cli;
mod edge_faults;
mod listen_cli;
mod loadgen_cli;
mod swarm_core;
