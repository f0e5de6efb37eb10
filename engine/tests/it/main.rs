//! Integration tests, linked as one binary (one link instead of one per file).

mod remote_store;
mod scylla_store;
