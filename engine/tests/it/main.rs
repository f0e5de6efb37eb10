//! Integration tests, linked as one binary (one link instead of one per file).

mod default_batches;
mod remote_store;
mod scylla_store;
