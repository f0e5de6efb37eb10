#!/usr/bin/env bash
# Builds the tiercast .deb and checks what is in it: the binary runs, the
# default configuration is there as a conffile, the systemd units pass
# `systemd-analyze verify` and its security review, the maintainer scripts
# make the service user.
#   scripts/package-check.sh            the test command's check: packages
#                                       the binary `cargo test` built (dev
#                                       profile), no release build
#   scripts/package-check.sh --release  the release package (cargo deb -p
#                                       tiercast), kept in target/debian/
#   scripts/package-check.sh --install-only
#                                       installs cargo-deb if it is missing,
#                                       and checks nothing (the test command
#                                       does this while its tests run)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  echo "== installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi
[ "${1:-}" != "--install-only" ] || exit 0

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ "${1:-}" = "--release" ]; then
  cargo deb -p tiercast
  deb="$(ls -t target/debian/tiercast_*.deb | head -1)"
else
  # The binary as `cargo test --workspace` built it (a no-op after the test
  # command): `cargo build -p tiercast` unifies features differently and
  # would build the binary again.
  cargo test --workspace --locked --no-run --quiet
  # cargo-deb warns that a dev-profile package is not for release: it is not.
  cargo deb -p tiercast --no-build --profile dev -o "$work/tiercast.deb" 2>"$work/deb.log" \
    || { cat "$work/deb.log"; exit 1; }
  deb="$work/tiercast.deb"
fi
echo "== checking $deb"

fail() { echo "package check: $*" >&2; exit 1; }
contents="$(dpkg-deb -c "$deb" | awk '{print $6}')"
for f in ./usr/bin/tiercast ./etc/tiercast/tiercast.toml \
  ./lib/systemd/system/tiercast-edge.service ./lib/systemd/system/tiercast-engine.service; do
  grep -qx "$f" <<<"$contents" || fail "$f is not in the package"
done
[ "$(dpkg-deb -f "$deb" Package)" = tiercast ] || fail "the package is not named tiercast"
dpkg-deb -f "$deb" Depends | grep -q adduser || fail "it does not depend on adduser"
dpkg-deb -e "$deb" "$work/control"
grep -qx /etc/tiercast/tiercast.toml "$work/control/conffiles" || fail "the configuration is not a conffile"
grep -q "adduser --system" "$work/control/postinst" || fail "postinst makes no service user"

dpkg-deb -x "$deb" "$work/root"
"$work/root/usr/bin/tiercast" --version >/dev/null || fail "the packaged binary does not run"
# The packaged configuration loads (with the secret the env file would give).
TIERCAST_NODE__TOKEN_SECRET="a secret of at least thirty-two bytes for the check" \
  "$work/root/usr/bin/tiercast" token --user 1 --config "$work/root/etc/tiercast/tiercast.toml" >/dev/null \
  || fail "the packaged configuration does not load"

for role in edge engine; do
  unit="$work/root/lib/systemd/system/tiercast-$role.service"
  grep -q "^ExecStart=/usr/bin/tiercast $role " "$unit" || fail "tiercast-$role runs something else"
  grep -q "^User=tiercast" "$unit" || fail "tiercast-$role runs as root"
  grep -q "^TimeoutStopSec=" "$unit" || fail "tiercast-$role has no stop timeout"
done
# The edge's stop timeout covers its drain (spread + deadline, defaults).
spread_deadline_s=15
timeout_s="$(sed -n 's/^TimeoutStopSec=//p' "$work/root/lib/systemd/system/tiercast-edge.service")"
[ "$timeout_s" -gt "$spread_deadline_s" ] || fail "TimeoutStopSec=$timeout_s does not cover the drain ($spread_deadline_s s)"

if command -v systemd-analyze >/dev/null; then
  mkdir "$work/units"
  for role in edge engine; do
    # Verified against the packaged binary (verify checks that it exists).
    sed "s#/usr/bin/tiercast#$work/root/usr/bin/tiercast#" \
      "$work/root/lib/systemd/system/tiercast-$role.service" > "$work/units/tiercast-$role.service"
  done
  systemd-analyze verify "$work/units/"*.service
  for role in edge engine; do
    exposure="$(systemd-analyze security --offline=true --root="$work/root" \
      "lib/systemd/system/tiercast-$role.service" 2>/dev/null \
      | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
    echo "tiercast-$role: systemd's exposure level $exposure (0 best, 10 worst)"
    awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.5) }' \
      || fail "tiercast-$role is exposed ($exposure > 2.5): check its hardening"
  done
else
  echo "systemd-analyze is not installed: the units were not verified"
fi
echo "package check: ok"
