#!/usr/bin/env python3
"""Sums a flat perf profile by process group and class of symbol (kernel,
X25519, malloc, quinn-proto, rustls, AEAD/hash/header protection, ...).

    perf report -i perf.data --sort pid,sym --stdio | grep -E '^\\s+[0-9.]+%' > flat.txt
    scripts/perf-classes.py flat.txt '{"loadgen": ["768", "769"], "edge": ["2822", "2823"]}'

docs/runs/perf-edge-restart-20k-light-storm.txt is its output for a
reconnect storm.
"""
import collections
import json
import re
import sys

# First match wins.
RULES = [
    ("kernel", r"\[k\]"),
    ("X25519", r"x25519|curve25519|fe4_|fe_|ge_"),
    ("P-256/ECDSA", r"p256|ecp_nistz|nistz256|ecdsa|p384"),
    ("AEAD/hash/HP", r"aes|gcm|sha256|sha512|ghash|HeaderProtection|hmac|hkdf|chacha"),
    ("memcpy/memset", r"memmove|memcpy|memset"),
    ("malloc", r"malloc|free|_int_|unlink_chunk|realloc|calloc"),
    ("rustls", r"rustls"),
    ("quinn-proto", r"quinn_proto"),
    ("redb", r"redb"),
    ("tokio", r"tokio"),
    ("tiercast", r"tiercast"),
    ("flatbuffers", r"flatbuffers"),
    ("hash maps", r"hashbrown|Hash"),
]


def main():
    by = collections.defaultdict(collections.Counter)
    total = collections.Counter()
    for line in open(sys.argv[1]):
        m = re.match(r"\s+([0-9.]+)%\s+(\d+):\S+\s+(.*)", line)
        if not m:
            continue
        pct, pid, sym = float(m.group(1)), m.group(2), m.group(3)
        cat = next((name for name, rx in RULES if re.search(rx, sym, re.I)), "other")
        by[pid][cat] += pct
        total[pid] += pct
    for group, pids in json.loads(sys.argv[2]).items():
        c = collections.Counter()
        for p in pids:
            c.update(by[p])
        t = sum(total[p] for p in pids)
        print(f"== {group}: {t:.1f}% of all samples")
        for k, v in c.most_common():
            print(f"   {k:14s} {v:5.1f}%  ({100 * v / t:4.1f}% of it)")


main()
