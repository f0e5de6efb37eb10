#!/usr/bin/env python3
"""Per-connection heap at peak, from a heaptrack profile of an edge.

    heaptrack -o edge tiercast dev ...            # then connect N devices
    heaptrack_print -f edge.zst --flamegraph-cost-type peak -F peak.folded
    scripts/heap-sites.py peak.folded N

Prints the bytes per connection (peak / N) by owner (the connection
table, quinn-proto, rustls and ring, the edge's own code, the store) and
the top allocation sites (the four innermost frames outside the standard
library and collections). Symbols are demangled with c++filt.
"""
import collections
import re
import subprocess
import sys

GENERIC = {
    'alloc.rs', 'mod.rs', 'raw_vec.rs', 'vec.rs', 'boxed.rs', 'map.rs', 'spec_from_iter_nested.rs',
    'spec_extend.rs', 'spec_from_elem.rs', 'slice.rs', 'function.rs', 'panicking.rs', 'panic.rs',
    'harness.rs', 'core.rs', 'unsafe_cell.rs', 'set.rs', 'raw.rs', 'string.rs', 'clone.rs',
    'bytes_mut.rs', 'spec_from_iter.rs', 'cow.rs', 'arc.rs', 'rc.rs', 'sync.rs', 'iter.rs',
    'into_iter.rs', 'fmt.rs', 'extend.rs', 'in_place_collect.rs', 'entry.rs', 'node.rs',
    'rustc_entry.rs', 'option.rs', 'iterator.rs', 'rev.rs', 'double_ended.rs', 'macros.rs',
    'unwind_safe.rs', 'result.rs', 'lib.rs', 'buffers.rs',
}
QUINN = {
    'spaces.rs', 'endpoint.rs', 'state.rs', 'assembler.rs', 'cid_state.rs', 'recv.rs', 'send.rs',
    'connection.rs', 'streams.rs', 'packet_builder.rs', 'datagrams.rs', 'paths.rs', 'timer.rs',
    'pacing.rs', 'cubic.rs', 'mtud.rs', 'send_buffer.rs', 'stats.rs', 'token.rs', 'cid_queue.rs',
    'ack_frequency.rs', 'frame.rs', 'packet.rs', 'transport_parameters.rs', 'rustls.rs',
    'btree_range_set.rs',
}
TLS = {
    'quic.rs', 'tls13.rs', 'conn.rs', 'key_schedule.rs', 'hs.rs', 'common_state.rs',
    'server_conn.rs', 'handshake.rs', 'hash_hs.rs', 'record_layer.rs', 'aead.rs', 'hkdf.rs',
    'codec.rs', 'message.rs', 'hash.rs',
}
OURS = {
    'shard.rs', 'sessions.rs', 'limits.rs', 'conversations.rs', 'frames.rs', 'outbox.rs', 'udp.rs',
    'session.rs', 'wheel.rs', 'fleet.rs', 'server.rs', 'local.rs', 'wire.rs',
}
REDB = {'cached_file.rs', 'page_manager.rs', 'btree.rs', 'table.rs', 'transactions.rs', 'lru_cache.rs'}


def main():
    path, n = sys.argv[1], int(sys.argv[2])
    rows, syms = [], set()
    for line in open(path):
        stack, _, cost = line.rstrip('\n').rpartition(' ')
        frames = stack.split(';')
        rows.append((frames, int(cost)))
        syms.update(frames)
    syms = sorted(syms)
    out = subprocess.run(['c++filt'], input='\n'.join(syms), capture_output=True, text=True).stdout
    name = dict(zip(syms, out.splitlines()))

    def file_of(f):
        m = re.search(r'\(([^)]*)\)$', f)
        return m.group(1) if m else None

    owners, sites = collections.Counter(), collections.Counter()
    for frames, cost in rows:
        d = [name[f] for f in frames]
        files = [file_of(f) for f in d]
        kept = [f for f, fl in zip(d, files) if fl and fl not in GENERIC]
        joined = ' '.join(d)
        if 'incoming (shard.rs)' in joined and 'resize_with' in joined and 'accept (endpoint.rs)' not in joined:
            owner = 'connection table (Vec<Option<Conn>>, quinn-proto Connection inline)'
        else:
            leaf = next((file_of(f) for f in reversed(kept)), None)
            if leaf in REDB:
                owner = 'redb (the store cache)'
            elif leaf in TLS:
                owner = 'rustls + ring (TLS session, packet keys)'
            elif leaf in QUINN:
                owner = 'quinn-proto (connection state on the heap)'
            elif leaf in OURS:
                owner = 'tiercast edge'
            else:
                owner = 'other'
        owners[owner] += cost
        sites[' <- '.join(reversed(kept[-4:]))] += cost
    total = sum(c for _, c in rows)
    print(f'peak heap {total} B over {n} connections: {total / n:.0f} B per connection')
    print('\nby owner (B per connection, MB):')
    for k, c in owners.most_common():
        print(f'{c / n:8.0f} {c / 1e6:8.2f}  {k}')
    print('\ntop sites (B per connection, MB):')
    for k, c in sites.most_common(40):
        print(f'{c / n:8.0f} {c / 1e6:8.2f}  {k[:200]}')


if __name__ == '__main__':
    main()
