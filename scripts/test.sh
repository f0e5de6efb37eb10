#!/usr/bin/env bash
# The test command: everything CI runs, on a fresh machine.
#   scripts/test.sh
# Installs what the tests need (redis-server, flatc, cargo-fuzz), checks the
# generated code, formatting and lints, runs every test, checks the
# Terraform modules (offline: scripts/terraform-check.sh) and the .deb
# (scripts/package-check.sh), then runs each
# fuzz target briefly (10 s each; scripts/fuzz.sh SECONDS for longer runs). Tests that need a Redis
# Cluster start one each with scripts/redis-cluster.sh on free loopback
# ports and stop it when they end.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== redis-server (the tests start their own Redis Clusters on loopback)"
scripts/redis-cluster.sh install

echo "== generated FlatBuffers code"
scripts/gen-schemas.sh --check

echo "== cargo fmt"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --locked

echo "== the release package: built from the tested binary, contents and units checked"
scripts/package-check.sh

echo "== terraform: fmt, validate, and terraform test with a mocked AWS provider"
scripts/terraform-check.sh

echo "== fuzz targets, 10 s each (nightly; docs/security.md has the long runs)"
# Without a sanitizer here: the build is the larger part of this step and
# the workspace forbids unsafe code; the long runs (scripts/fuzz.sh 600) use
# AddressSanitizer.
FUZZ_SANITIZER=none scripts/fuzz.sh 10
