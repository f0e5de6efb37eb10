//! Helpers shared by loadgen's process-level tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Redis Cluster started by `scripts/redis-cluster.sh up` for one test,
/// stopped when dropped.
pub struct Redis {
    pub dir: String,
    pub nodes: String,
}

impl Redis {
    pub fn up() -> Self {
        let out = Command::new(repo().join("scripts/redis-cluster.sh"))
            .arg("up")
            .output()
            .expect("redis-cluster.sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .to_owned()
        };
        Self {
            dir: get("TIERCAST_REDIS_DIR="),
            nodes: get("TIERCAST_REDIS_NODES="),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/redis-cluster.sh"))
            .args(["down", "--dir", &self.dir])
            .output();
    }
}
