#!/usr/bin/env bash
# Reproduces the fan-out cost table of docs/fanout.md: starts a 3-master
# Redis Cluster on loopback, runs `tiercast bench-fanout` (3 edges in one
# process, groups of 10, 1,000 and 20,000 members with one device each
# online), prints the table, and stops the cluster.
#
#   scripts/fanout-figures.sh [extra bench-fanout flags, e.g. --sizes 10,1000]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin tiercast >&2
env_file=$(mktemp)
scripts/redis-cluster.sh up > "$env_file"
# shellcheck disable=SC1090
source "$env_file"
rm -f "$env_file"
trap 'scripts/redis-cluster.sh down --dir "$TIERCAST_REDIS_DIR"' EXIT
./target/release/tiercast bench-fanout --redis "$TIERCAST_REDIS_NODES" "$@"
