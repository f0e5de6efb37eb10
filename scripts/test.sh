#!/usr/bin/env bash
# The test command: everything CI runs, on a fresh machine.
#   scripts/test.sh
# Installs what the tests need (redis-server, flatc, cargo-deb), checks the
# generated code, formatting and lints, runs every test (the fuzz targets'
# committed corpora replayed among them: fuzz/checks), checks the Terraform
# modules (offline: scripts/terraform-check.sh) and the .deb
# (scripts/package-check.sh). Tests that need a Redis Cluster start one each
# with scripts/redis-cluster.sh on free loopback ports and stop it when they
# end.
#
# The fuzzers themselves (nightly, cargo-fuzz) run with scripts/fuzz.sh
# SECONDS; TIERCAST_TEST_FUZZ_SECONDS=N runs them here too, N s per target,
# without a sanitizer. Their build is most of a from-scratch run's time, so
# the test command replays what they found instead (docs/security.md,
# "Fuzzing"; README, "How long the test command takes").
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

echo "== cargo test: building"
cargo test --workspace --locked --no-run

# While the tests run (they wait on the network and timers more than they
# compute), two steps that need no test binary go on beside them at the
# lowest priority: installing cargo-deb for the package check, and the
# Terraform checks. Their output is printed after the tests.
side="$(mktemp -d)"
trap 'rm -rf "$side"' EXIT
nice -n 19 scripts/package-check.sh --install-only >"$side/deb.log" 2>&1 &
deb_pid=$!
nice -n 19 scripts/terraform-check.sh >"$side/terraform.log" 2>&1 &
tf_pid=$!
# Waits for a side step and prints its output; fails the run if it failed.
finish() {
  local pid=$1 name=$2 log=$3
  local rc=0
  wait "$pid" || rc=$?
  cat "$log"
  [ "$rc" -eq 0 ] || { echo "test.sh: $name failed" >&2; exit 1; }
}

echo "== cargo test"
if ! cargo test --workspace --locked; then
  wait "$deb_pid" "$tf_pid" 2>/dev/null || true
  exit 1
fi

echo "== terraform: fmt, validate, and terraform test with a mocked AWS provider"
finish "$tf_pid" "the Terraform check" "$side/terraform.log"

echo "== the release package: built from the tested binary, contents and units checked"
finish "$deb_pid" "installing cargo-deb" "$side/deb.log"
scripts/package-check.sh

if [ -n "${TIERCAST_TEST_FUZZ_SECONDS:-}" ]; then
  echo "== fuzz targets, ${TIERCAST_TEST_FUZZ_SECONDS} s each (nightly; docs/security.md has the long runs)"
  FUZZ_SANITIZER=none scripts/fuzz.sh "$TIERCAST_TEST_FUZZ_SECONDS"
fi
