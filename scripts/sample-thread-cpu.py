#!/usr/bin/env python3
"""Samples the CPU time of a process's children, per thread and whole, every
0.5 s until the process exits: the self-hosted servers of a `tiercast
loadgen run`, across a restart (a new child is picked up when it appears).

    ./target/release/tiercast loadgen run --self-hosted --scenario S --json r.json &
    scripts/sample-thread-cpu.py $! samples.txt
    scripts/sample-thread-cpu.py --rates samples.txt 3
    scripts/sample-thread-cpu.py --storm samples.txt r.json

One line per sample and thread: seconds since the first sample, the child's
pid, the thread id (`all` for the whole process, dead threads included),
its name, and its user + system time in clock ticks (SC_CLK_TCK a second,
100 on Linux). Threads that start and end between two samples are only in
the `all` lines, so the figures below use those. `--rates`
prints each child's cores busy over windows of N seconds, and what of it
was the embedded store's writer thread (`tiercast-store-*`). `--storm`,
for a run with a restart (`edge_fault` kill-restart): the restarted edge's
CPU from its first sample (within 0.5 s of listening again) to that plus the
report's `reconnect_max_ms`, the live load's rate before the kill (the old
process's last 15 s), and what the storm cost beyond it per reconnect
(docs/runs/edge-restart-20k-light-storm-cpu.txt).
"""
import collections
import json
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def children(pid):
    out = set()
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                out.update(int(p) for p in open(f"/proc/{pid}/task/{t}/children").read().split())
            except OSError:
                pass
    except OSError:
        pass
    return sorted(out)


def ticks(stat):
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def sample(pid, path):
    out = open(path, "w")
    t0 = time.time()
    while os.path.exists(f"/proc/{pid}"):
        now = time.time() - t0
        for c in children(pid):
            try:
                out.write(f"{now:.2f} {c} all process {ticks(open(f'/proc/{c}/stat').read())}\n")
                tasks = os.listdir(f"/proc/{c}/task")
            except (OSError, ValueError):
                continue
            for t in tasks:
                try:
                    s = open(f"/proc/{c}/task/{t}/stat").read()
                except OSError:
                    continue
                name = s[s.index("(") + 1 : s.rindex(")")].replace(" ", "_")
                out.write(f"{now:.2f} {c} {t} {name} {ticks(s)}\n")
        out.flush()
        time.sleep(0.5)


def process_ticks(sample):
    """A process's CPU in one sample: its own total when sampled, else the
    sum of the threads alive then (which misses threads that ended)."""
    return sample["all"][1] if "all" in sample else sum(v for _, v in sample.values())


def store_ticks(sample):
    """The embedded store's writer thread's CPU in one sample."""
    return sum(v for n, v in sample.values() if n.startswith("tiercast-store"))


def rates(path, step):
    series = load(path)
    total, store = process_ticks, store_ticks
    for pid, by_t in series.items():
        times = sorted(by_t)
        print(f"pid {pid}: {total(by_t[times[-1]]) / TICK:.2f} CPU s in all")
        last = times[0]
        for t in times[1:]:
            if t - last >= step or t == times[-1]:
                a, b = by_t[last], by_t[t]
                span = t - last
                print(
                    f"  {last:.1f}-{t:.1f} s: {(total(b) - total(a)) / TICK / span:.2f} cores"
                    f" (store writer {(store(b) - store(a)) / TICK / span:.2f})"
                )
                last = t


def load(path):
    series = collections.defaultdict(lambda: collections.defaultdict(dict))
    for line in open(path):
        t, pid, tid, name, v = line.split()
        series[pid][float(t)][tid] = (name, int(v))
    return series


def storm(path, report):
    r = json.load(open(report))["reconnect_storm"]
    longest, n = r["reconnect_max_ms"] / 1000, r["reconnects"]
    series = load(path)

    def total(sample):
        if "all" not in sample:
            sys.exit(f"{path}: no whole-process samples (`all` lines); take them again")
        return process_ticks(sample)

    store = store_ticks

    def at(pid, t):
        best = min(series[pid], key=lambda x: abs(x - t))
        return best, series[pid][best]

    # The process before the restart and the one after it: the first and
    # the last child seen (a self-hosted single node has one at a time).
    old, new = list(series)[0], list(series)[-1]
    if old == new:
        sys.exit(f"{path}: one process only; no restart in these samples")
    t0, s0 = at(new, min(series[new]))
    t1, s1 = at(new, t0 + longest)
    cpu, writer, span = (total(s1) - total(s0)) / TICK, (store(s1) - store(s0)) / TICK, t1 - t0
    a, sa = at(old, max(series[old]) - 15)
    b, sb = at(old, max(series[old]))
    live = (total(sb) - total(sa)) / TICK / (b - a)
    live_writer = (store(sb) - store(sa)) / TICK / (b - a)
    extra = cpu - live * span
    print(
        f"{report}: {n} back, max {longest:.2f} s; restarted edge over {span:.1f} s from its first sample: "
        f"{cpu:.2f} CPU s ({cpu / span:.2f} cores), store writer {writer:.2f} s; before the kill "
        f"({a:.1f}-{b:.1f} s) {live:.2f} cores, writer {live_writer:.3f}; storm beyond the live load "
        f"{extra:.2f} CPU s = {extra / n * 1000:.3f} ms per reconnect; all of it {cpu / n * 1000:.3f} ms per reconnect"
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--storm":
        storm(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 3 and sys.argv[1] == "--rates":
        rates(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 3.0)
    elif len(sys.argv) == 3:
        sample(int(sys.argv[1]), sys.argv[2])
    else:
        sys.exit(__doc__)
