#!/usr/bin/env bash
# The edge's user-space instructions per delivery on the core's fan-out
# path, counted exactly by callgrind (no timing; this machine's clock is
# shared and noisy, instruction counts are not).
#
# The rig (edge/src/core/rig.rs) runs CONNS real QUIC connections; only the
# edge's side (Rig::edge_send: frame into the stream, packets built,
# encrypted and handed to sendmmsg; Rig::edge_acks: the devices' ACKs
# processed) is counted. Two runs of different lengths; their difference
# over the extra deliveries leaves out the setup, the handshakes and the
# first rounds. The kernel's side of the send is not counted.
#
# scripts/count-instructions.sh [CONNS] [ACK_EVERY] [ACK_DELAY_MS]
# (FANOUT_BIN=path counts an example binary built before, e.g. a copy of
# target/release/examples/fanout_rounds from another commit. CACHE_SIM=1
# also runs callgrind's cache simulator and prints the simulated data
# misses per delivery, first level and last level: what an instruction
# count does not show, a cold line waited on.)
#
# scripts/count-instructions.sh live [TIERCAST_BIN]: the same on a live
# edge. loadgen starts the server process under callgrind (--server-bin),
# counting the shard's loop and all it calls (*Shard::run*), on
# loadgen/scenarios/room-200x5.toml with edge.ack_every 10 and
# edge.ack_delay_ms 800, for 10 s and for 30 s; the difference over the
# extra deliveries is the shard's instructions per delivery.
#
# scripts/count-instructions.sh sends [MEMBERS [CONCURRENT]]: the engine's
# instructions per tier-1 send on an embedded store (bench/examples/sends.rs:
# every thread of the process, the store's writer and blocking pool
# included), from runs of 200 and 600 sends to a conversation of MEMBERS
# users (4) by CONCURRENT senders (1; more share group commits), with the
# commits and the thread switches perf counted beside them.
# (SENDS_BIN=path counts a copy built from another commit.)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "count-instructions: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
# Every event's total in callgrind's output files $@, as NAME=VALUE lines.
events() {
    callgrind_annotate "$@" 2>/dev/null | awk '
        /^Events shown:/ { for (i = 3; i <= NF; i++) name[i - 2] = $i; n = NF - 2 }
        /PROGRAM TOTALS/ && !done {
            k = 0
            for (i = 1; i <= NF && k < n; i++) if ($i !~ /^\(/) { v = $i; gsub(",", "", v); if (v == ".") v = 0; print name[++k] "=" v }
            done = 1 }'
}
# The instructions counted in callgrind's output files $@ (the first event).
total() {
    events "$@" | awk -F= 'NR == 1 { print $2 }'
}
# The bench example $1: the copy $2 names, or built now.
example() {
    if [ -n "$2" ]; then
        echo "$2"
    else
        # A failed build must not fall through to an older binary.
        cargo build --release --locked -q -p tiercast-bench --example "$1" >&2 || return 1
        echo "target/release/examples/$1"
    fi
}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ "${1:-}" = sends ]; then
    members=${2:-4}
    concurrent=${3:-1}
    bin=$(example sends "${SENDS_BIN:-}")
    for n in 200 600; do
        valgrind --tool=callgrind --callgrind-out-file="$out/cg.$n" "$bin" "$n" "$members" "$concurrent" \
            >"$out/run.$n" 2>"$out/err.$n" || { cat "$out/err.$n" >&2; exit 1; }
        echo "$n sends: Ir $(total "$out/cg.$n"); $(cat "$out/run.$n")"
        # perf may be missing or not allowed (a VM, perf_event_paranoid).
        if command -v perf >/dev/null \
            && perf stat -x, -e context-switches -o "$out/perf.$n" "$bin" "$n" "$members" "$concurrent" >/dev/null 2>&1; then
            echo "$n sends: context switches $(awk -F, '/context-switches/ {print $1}' "$out/perf.$n")"
        fi
    done
    python3 -c "import sys; a,b,m,c=map(int,sys.argv[1:]); print(f'engine instructions per send: {(b-a)/400:.0f} (members {m}, concurrent {c})')" \
        "$(total "$out/cg.200")" "$(total "$out/cg.600")" "$members" "$concurrent"
    exit 0
fi
if [ "${1:-}" = live ]; then
    bin=${2:-target/release/tiercast}
    [ -x "$bin" ] || { echo "count-instructions: no $bin (cargo build --release)" >&2; exit 1; }
    bin=$(realpath "$bin")
    for d in 10 30; do
        mkdir -p "$out/$d"
        printf '#!/bin/sh\nexec valgrind --tool=callgrind "--toggle-collect=*Shard::run*" --callgrind-out-file=%s/cg.%%p %s "$@"\n' \
            "$out/$d" "$bin" >"$out/$d/server"
        chmod +x "$out/$d/server"
        sed "s/^duration_s = .*/duration_s = $d/" loadgen/scenarios/room-200x5.toml >"$out/$d/s.toml"
        TIERCAST_EDGE__ACK_EVERY=10 TIERCAST_EDGE__ACK_DELAY_MS=800 timeout 900 "$bin" loadgen run \
            --self-hosted --server-bin "$out/$d/server" --scenario "$out/$d/s.toml" \
            --json "$out/$d/run.json" >"$out/$d/run.txt" 2>&1 \
            || { cat "$out/$d/run.txt" >&2; exit 1; }
        ir=$(total "$out/$d"/cg.*)
        n=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['deliveries'])" "$out/$d/run.json")
        echo "$d s: Ir $ir, deliveries $n"
        echo "$ir $n" >"$out/$d/count"
    done
    read -r a na <"$out/10/count"
    read -r b nb <"$out/30/count"
    python3 -c "import sys; a,na,b,nb=map(int,sys.argv[1:]); print(f'edge shard instructions per delivery: {(b-a)/(nb-na):.0f} (live, room-200x5)')" "$a" "$na" "$b" "$nb"
    exit 0
fi
conns=${1:-500}
ack_every=${2:-0}
ack_delay=${3:-25}
short=${ROUNDS_SHORT:-6}
long=${ROUNDS_LONG:-16}
bin=$(example fanout_rounds "${FANOUT_BIN:-}")
sim=()
if [ -n "${CACHE_SIM:-}" ]; then sim=(--cache-sim=yes); fi
count() {
    valgrind --tool=callgrind ${sim[@]+"${sim[@]}"} --callgrind-out-file="$out/cg.$1" \
        --toggle-collect='*Rig::edge_send*' --toggle-collect='*Rig::edge_acks*' \
        "$bin" "$conns" "$1" "$ack_every" "$ack_delay" >"$out/run.$1" 2>"$out/err.$1" \
        || { cat "$out/err.$1" >&2; exit 1; }
    total "$out/cg.$1"
}
a=$(count "$short")
b=$(count "$long")
echo "short ($short rounds): $(cat "$out/run.$short"); Ir $a"
echo "long  ($long rounds): $(cat "$out/run.$long"); Ir $b"
python3 - "$a" "$b" "$conns" "$short" "$long" <<'PY'
import sys
a, b, n, s, l = (int(x) for x in sys.argv[1:])
print(f"edge instructions per delivery: {(b - a) / (n * (l - s)):.0f} "
      f"({n} connections, rounds {s + 1}-{l})")
PY
if [ -n "${CACHE_SIM:-}" ]; then
    python3 - "$conns" "$short" "$long" "$(events "$out/cg.$short" | tr '\n' ' ')" "$(events "$out/cg.$long" | tr '\n' ' ')" <<'PY'
import sys
n, s, l = (int(x) for x in sys.argv[1:4])
a, b = (dict(kv.split("=") for kv in x.split()) for x in sys.argv[4:6])
want = ("Dr", "D1mr", "D1mw", "DLmr", "DLmw")
if any(k not in a or k not in b for k in want):
    sys.exit(f"count-instructions: no cache events in callgrind's totals ({sorted(a)})")
per = {k: (int(b[k]) - int(a[k])) / (n * (l - s)) for k in want}
print("simulated per delivery: data reads {Dr:.0f}, first-level data read misses {D1mr:.1f}, "
      "write misses {D1mw:.1f}, last-level data read misses {DLmr:.1f}, write misses {DLmw:.1f}".format(**per))
PY
fi
if [ -n "${KEEP:-}" ]; then cp "$out/cg.$long" "$KEEP"; echo "callgrind profile of the long run: $KEEP"; fi
