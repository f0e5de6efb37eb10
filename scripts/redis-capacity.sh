#!/usr/bin/env bash
# What one Redis shard (one primary: one core for commands) costs per
# SPUBLISH, measured here with redis-benchmark, at the payload sizes the
# tiers publish: 56 B (a tier-3 notification) and body + 96 B (a tier-1 or
# tier-2 envelope) for 100, 256 and 1,024-byte bodies. Each channel has one
# subscriber, as an edge's node channel or a user's channel does, which
# reads every message (its socket drained to /dev/null), so the figure
# includes Redis writing the message out.
#
# The cost is the redis-server process's CPU time (utime + stime from
# /proc) over the publishes it served, so the machine's other load (the
# benchmark client shares its 2 cores) does not enter it; the wall-clock
# rate is printed beside it but is client-bound here. Unpipelined (-P 1,
# one round trip per publish, the worst case) and pipelined (-P 16, what
# the engine's concurrent publishes on one connection come to).
#
#   scripts/redis-capacity.sh [--out docs/runs/redis-spublish] [--publishes N]
#
# Writes OUT.txt (the table) and OUT.json (read by `tiercast loadgen plan
# --redis-calibration OUT.json`).
set -euo pipefail
cd "$(dirname "$0")/.."

out=docs/runs/redis-spublish
publishes=400000
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --publishes) publishes=$2; shift 2 ;;
    *) echo "redis-capacity: unknown argument $1 (--out PREFIX, --publishes N)" >&2; exit 64 ;;
  esac
done

die() { echo "redis-capacity: $*" >&2; exit 1; }
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  [[ $(id -u) -eq 0 ]] || die "redis-server and redis-benchmark missing and this is not root: apt-get install redis-server redis-tools"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >&2
fi

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# No output-buffer limit for subscribers: the measurement wants the one
# subscriber to stay through every row (a production Redis would cut a
# subscriber that falls 8 MB behind; the edge then repairs the gap).
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --client-output-buffer-limit "pubsub 0 0 0" --daemonize no --loglevel warning >"$dir/server.log" 2>&1 &
server=$!
sub=""
cleanup() {
  [[ -n $sub ]] && kill "$sub" 2>/dev/null || true
  kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break
  sleep 0.1
done
redis-cli -p "$port" ping | grep -q PONG || die "redis-server did not answer on $port"
version=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')

channel='node:{1:0}'
redis-cli -p "$port" ssubscribe "$channel" >/dev/null &
sub=$!
for _ in $(seq 1 100); do
  [[ $(redis-cli -p "$port" pubsub shardnumsub "$channel" | tail -1) == 1 ]] && break
  sleep 0.1
done
[[ $(redis-cli -p "$port" pubsub shardnumsub "$channel" | tail -1) == 1 ]] || die "the subscriber did not subscribe"

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$server/stat"; }

rows=()
printf '%-9s %-9s %12s %12s %14s %16s\n' payload pipeline publishes "wall /s" "server CPU s" "CPU us/publish" | tee "$dir/table"
for bytes in 56 196 352 1120; do
  payload=$(head -c "$bytes" /dev/zero | tr '\0' 'x')
  for pipeline in 1 16; do
    redis-cli -p "$port" config resetstat >/dev/null
    before=$(cpu_ticks)
    start=$(date +%s.%N)
    redis-benchmark -p "$port" -c 32 -n "$publishes" -P "$pipeline" -q spublish "$channel" "$payload" >/dev/null
    end=$(date +%s.%N)
    after=$(cpu_ticks)
    [[ $(redis-cli -p "$port" pubsub shardnumsub "$channel" | tail -1) == 1 ]] \
      || die "the subscriber left during the $bytes-byte, pipeline $pipeline row"
    calls=$(redis-cli -p "$port" info commandstats | sed -n 's/^cmdstat_spublish:calls=\([0-9]*\),.*/\1/p' | tr -d '\r')
    [[ $calls -ge $publishes ]] || die "expected $publishes SPUBLISH calls, Redis counted ${calls:-none}"
    row=$(python3 - "$bytes" "$pipeline" "$calls" "$start" "$end" "$before" "$after" "$ticks" <<'EOF'
import json, sys
b, p, calls, start, end, before, after, ticks = sys.argv[1:]
calls = int(calls)
wall = float(end) - float(start)
cpu = (int(after) - int(before)) / int(ticks)
print(json.dumps({
    "payload_bytes": int(b), "pipeline": int(p), "publishes": calls,
    "wall_s": round(wall, 3), "publishes_per_s_wall": round(calls / wall),
    "server_cpu_s": round(cpu, 2),
    "server_cpu_us_per_publish": round(cpu * 1e6 / calls, 3),
}))
EOF
)
    rows+=("$row")
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("%-9s %-9s %12d %12d %14.2f %16.3f" % (r["payload_bytes"], r["pipeline"], r["publishes"], r["publishes_per_s_wall"], r["server_cpu_s"], r["server_cpu_us_per_publish"]))' "$row" | tee -a "$dir/table"
  done
done

mkdir -p "$(dirname "$out")"
{
  echo "# scripts/redis-capacity.sh: redis-server $version, one subscriber on the channel, $publishes SPUBLISH per row,"
  echo "# redis-benchmark -c 32; server CPU from /proc/<pid>/stat (utime + stime), $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1))"
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  cat "$dir/table"
} >"$out.txt"
python3 - "$version" "$(nproc)" "$out.json" "${rows[@]}" <<'EOF'
import json, sys
version, cpus, path, *rows = sys.argv[1:]
json.dump({
    "tool": "scripts/redis-capacity.sh",
    "redis_version": version,
    "machine_cpus": int(cpus),
    "subscribers_per_channel": 1,
    "rows": [json.loads(r) for r in rows],
}, open(path, "w"), indent=2)
open(path, "a").write("\n")
EOF
echo "wrote $out.txt and $out.json" >&2
