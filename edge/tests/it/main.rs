//! Integration tests, linked as one binary (one link instead of one per file).

mod auth_matrix;
mod authz;
mod backplane_gaps;
mod bad_input;
mod cluster_faults;
mod devices;
mod handshake_flood;
mod http_api;
mod limits;
mod master_kill;
mod order;
mod protocol_bytes;
mod redis_failover;
mod redis_security;
mod resumption;
mod sdk_bad_frames;
mod setup_timing;
mod tier1_chat;
mod tier_fanout;
