#!/usr/bin/env bash
# Samples a self-hosted edge's admission counters from its /metrics every
# 0.5 s for SECONDS (default 400), following the edge across a restart (a
# new process: its pid and HTTP port are looked up again). One line per
# sample: unix time, pid, then name=value.
#
#   scripts/sample-edge-metrics.sh 400 > samples.txt &
#   tiercast loadgen run --self-hosted --scenario docs/runs/edge-restart-20k.toml ...
#
# Needs ss (iproute2) and curl. scripts/edge-metrics-table.py turns the
# samples into a table per second (docs/runs/edge-restart-20k-*-edge-metrics.txt).
set -uo pipefail
end=$((SECONDS + ${1:-400}))
pid=""
port=""
names='^tiercast_edge_(datagrams_received_total|datagrams_sent_total|send_calls_total|deliveries_total|connections|handshakes_in_flight|handshakes_refused_total|retries_sent_total|handshakes_total|tls_resumptions_total|setups_abandoned_total\{[^}]*\}|(handshake|hello|hello_wait|hello_register|hello_attach)_seconds_(sum|count|bucket\{[^}]*\})) '
while [ "$SECONDS" -lt "$end" ]; do
    p=$(pgrep -f "tiercast[^ ]* edge --ready-json" | head -1)
    if [ -z "$p" ]; then
        sleep 0.2
        continue
    fi
    if [ "$p" != "$pid" ]; then
        pid=$p
        port=""
    fi
    if [ -z "$port" ]; then
        port=$(ss -ltnpH 2>/dev/null | grep "pid=$pid," | awk '{print $4}' | sed 's/.*://' | head -1)
    fi
    if [ -n "$port" ]; then
        m=$(curl -s -m 1 "http://127.0.0.1:$port/metrics" | grep -E "$names" | awk '{printf "%s=%s ", $1, $2}')
        echo "$(date +%s.%N | cut -c1-14) pid=$pid $m"
    fi
    sleep 0.5
done
