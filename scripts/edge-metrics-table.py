#!/usr/bin/env python3
"""Turns scripts/sample-edge-metrics.sh's samples into a table, one row
about every second of the last edge process sampled (the restarted one):
connections and handshakes in flight as sampled, the counters as rates per
second, and the setup histograms' quantiles over the row's interval.

    scripts/edge-metrics-table.py samples.txt > table.txt

The samples may be gzipped (samples.txt.gz, as docs/runs keeps them).
"""
import gzip
import re
import sys

PREFIX = "tiercast_edge_"
# The setup histograms, in a connect's order (each NAME_seconds).
HISTOGRAMS = ["handshake", "hello_wait", "hello", "hello_register", "hello_attach"]


def parse(line):
    parts = line.split()
    if len(parts) < 3:
        return None
    row = {"t": float(parts[0]), "pid": parts[1]}
    for kv in parts[2:]:
        k, _, v = kv.rpartition("=")
        if k.startswith(PREFIX):
            try:
                row[k[len(PREFIX):]] = float(v)
            except ValueError:
                pass
    return row


def buckets(row, name):
    """Cumulative (upper bound, count) pairs of one histogram."""
    out = []
    for k, v in row.items():
        m = re.fullmatch(name + r'_seconds_bucket\{le="([^"]+)"\}', k)
        if m:
            out.append((float(m.group(1)), v))
    return sorted(out)


def quantile(prev, cur, name, q):
    """The upper bound of the bucket holding quantile q of the
    observations between two samples, or None without any."""
    a = dict(buckets(prev, name))
    b = buckets(cur, name)
    if not b:
        return None
    total = b[-1][1] - a.get(b[-1][0], 0)
    if total <= 0:
        return None
    for le, c in b:
        if c - a.get(le, 0) >= q * total:
            return le
    return float("inf")


def stage_of(key):
    m = re.search(r'stage="([^"]+)"', key)
    return m.group(1) if m else key


def fmt_s(v):
    if v is None:
        return "-"
    if v == float("inf"):
        return ">52s"
    return f"{v:.3g}s"


def main():
    path = sys.argv[1]
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        rows = [r for r in map(parse, f) if r]
    if not rows:
        sys.exit("no samples")
    last_pid = rows[-1]["pid"]
    rows = [r for r in rows if r["pid"] == last_pid]
    t0 = rows[0]["t"]
    stages = sorted(
        {k for r in rows for k in r if k.startswith("setups_abandoned_total")}
    )
    print(
        "# seconds from the first sample of the process; conns and in_flight as sampled;\n"
        "# counters per second over the row; then p50/p99 of the setup histograms over the\n"
        "# row (bucket upper bounds): hs = handshake_seconds (accepted -> TLS done),\n"
        "# hello_wait (TLS done -> Hello read), hello (Hello read -> Welcome), and within\n"
        "# hello its steps hello_register and hello_attach; abandoned = setups_abandoned\n"
        "# (per second, by stage)"
    )
    prev = rows[0]
    for r in rows[1:]:
        dt = r["t"] - prev["t"]
        if dt < 0.9 and r is not rows[-1]:
            continue

        def rate(k):
            return (r.get(k, 0) - prev.get(k, 0)) / dt

        ab = " ".join(f"{stage_of(k)} {rate(k):5.0f}" for k in stages)
        print(
            f"{r['t'] - t0:6.1f} s  conns {r.get('connections', 0):6.0f}"
            f"  in_flight {r.get('handshakes_in_flight', 0):5.0f}"
            f"  hellos/s {rate('handshakes_total'):5.0f}"
            f"  refused/s {rate('handshakes_refused_total'):5.0f}"
            f"  retries/s {rate('retries_sent_total'):5.0f}"
            f"  resumed/s {rate('tls_resumptions_total'):5.0f}"
            + f"  hs p50/p99 {fmt_s(quantile(prev, r, 'handshake', 0.5))}/{fmt_s(quantile(prev, r, 'handshake', 0.99))}"
            + "".join(
                f"  {n} p50/p99 {fmt_s(quantile(prev, r, n, 0.5))}/{fmt_s(quantile(prev, r, n, 0.99))}"
                for n in HISTOGRAMS[1:]
            )
            + (f"  abandoned/s {ab}" if ab else "")
        )
        prev = r
    end = rows[-1]
    totals = {
        "hellos": end.get("handshakes_total", 0),
        "TLS resumptions": end.get("tls_resumptions_total", 0),
        "refused": end.get("handshakes_refused_total", 0),
        "retries": end.get("retries_sent_total", 0),
    }
    for k in stages:
        totals["abandoned " + stage_of(k)] = end[k]
    print("# totals at the end: " + ", ".join(f"{k} {v:.0f}" for k, v in totals.items()))
    for name in HISTOGRAMS:
        n = end.get(name + "_seconds_count", 0)
        if n:
            mean = end.get(name + "_seconds_sum", 0) / n
            qs = " ".join(
                f"p{int(q * 100)} {fmt_s(quantile({}, end, name, q))}" for q in (0.5, 0.9, 0.99)
            )
            print(f"# {name}_seconds over the process: {n:.0f} observed, mean {mean:.3f}s, {qs}")


main()
