#!/usr/bin/env bash
# The test command: everything CI runs, on a fresh machine.
#   scripts/test.sh
# Installs what the tests need (flatc for the schema check), checks
# formatting, lints, the generated code, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== generated FlatBuffers code"
scripts/gen-schemas.sh --check

echo "== cargo fmt"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --locked
