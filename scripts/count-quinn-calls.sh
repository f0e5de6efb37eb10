#!/usr/bin/env bash
# Counts quinn-proto's Connection::{poll_transmit,handle_event,handle_timeout,
# poll_endpoint_events} calls (the last once per drive of a connection) with uprobes over a window of a self-hosted run, in loadgen's process
# and in the edge's (both run this binary), each on its own:
#
#   scripts/count-quinn-calls.sh [BINARY] [SCENARIO] [START_S] [WINDOW_S]
#
# defaults: target/release/tiercast, loadgen/scenarios/room-1000x20.toml, 9, 10.
# Needs root (tracefs) and perf. The run's CPU figures are not comparable
# with an unprobed run: every probe hit traps into the kernel.
set -euo pipefail
bin=$(realpath "${1:-target/release/tiercast}")
scenario=${2:-loadgen/scenarios/room-1000x20.toml}
start=${3:-9}
window=${4:-10}
tracing=/sys/kernel/tracing
# A fresh machine may not have tracefs mounted yet.
[ -e "$tracing/uprobe_events" ] || mount -t tracefs nodev "$tracing" \
    || { echo "count-quinn-calls: cannot mount tracefs at $tracing (needs root)" >&2; exit 1; }
# A symbol's file offset: its address less the text segment's (vaddr - offset).
seg=$(readelf -lW "$bin" | awk '$1 == "LOAD" && / R E / {print $3, $2; exit}')
delta=$(( $(echo "$seg" | awk '{print $1}') - $(echo "$seg" | awk '{print $2}') ))
offset() {
    local addr
    addr=$(nm "$bin" | awk -v p="$1" '$2 == "T" && index($3, p) == 1 {print $1; exit}')
    [ -n "$addr" ] || { echo "no symbol $1 in $bin" >&2; exit 1; }
    printf '0x%x' $(( 0x$addr - delta ))
}
cleanup() { echo > "$tracing/uprobe_events"; }
trap cleanup EXIT
echo > "$tracing/uprobe_events"
echo "p:uprobes/qpoll $bin:$(offset _ZN11quinn_proto10connection10Connection13poll_transmit17h)" >> "$tracing/uprobe_events"
echo "p:uprobes/qevent $bin:$(offset _ZN11quinn_proto10connection10Connection12handle_event17h)" >> "$tracing/uprobe_events"
echo "p:uprobes/qtimeout $bin:$(offset _ZN11quinn_proto10connection10Connection14handle_timeout17h)" >> "$tracing/uprobe_events"
echo "p:uprobes/qdrive $bin:$(offset _ZN11quinn_proto10connection10Connection20poll_endpoint_events17h)" >> "$tracing/uprobe_events"
out=$(mktemp -d)
"$bin" loadgen run --self-hosted --scenario "$scenario" --json "$out/run.json" > "$out/run.txt" 2>&1 &
run=$!
sleep "$start"
loadgen=$(pgrep -f "$bin loadgen run" | head -1)
edge=$(pgrep -f "$bin edge --ready-json" | head -1)
events=(-e uprobes:qpoll -e uprobes:qevent -e uprobes:qtimeout -e uprobes:qdrive)
perf stat "${events[@]}" -p "$loadgen" -o "$out/loadgen.stat" -- sleep "$window" &
counting=$!
perf stat "${events[@]}" -p "$edge" -o "$out/edge.stat" -- sleep "$window"
wait "$counting"
echo "loadgen:"; grep uprobes "$out/loadgen.stat"
echo "edge:"; grep uprobes "$out/edge.stat"
wait "$run"
grep -E '^all|loadgen:' "$out/run.txt"
