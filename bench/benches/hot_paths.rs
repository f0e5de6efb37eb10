//! The hot paths, one criterion group each:
//!
//! - `snowflake`: issuing an id (pure generator, and with the system clock);
//! - `frame`: encoding a delivery frame, and decoding one with the
//!   FlatBuffers verifier (what the edge does to every client frame);
//! - `planner`: choosing a tier;
//! - `sequencer`: what per-conversation publish order adds to a send (an
//!   id issued under the sequencer's lock, then completed), with one
//!   conversation and with sends spread over 10,000;
//!
//! One frame fanned out through the edge's I/O core to 10,000 connections
//! is `benches/core_fanout.rs`.
//!
//! `cargo bench -p tiercast-bench`; figures in docs/benchmarks.md.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tiercast_engine::planner::{Thresholds, plan};
use tiercast_engine::snowflake::{IdGenerator, Snowflake, now_unix_ms};
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::wire::{ClientBody, ClientFrame, Message, ServerBody, ServerFrame};

fn snowflake(c: &mut Criterion) {
    let mut g = c.benchmark_group("snowflake");
    g.throughput(Throughput::Elements(1));
    let mut sf = Snowflake::try_new(7).unwrap();
    let t = now_unix_ms();
    let mut ms = t;
    g.bench_function("next_at (pure)", |b| {
        b.iter(|| match sf.next_at(ms) {
            Ok(id) => black_box(id),
            Err(_) => {
                // 4,096 ids per millisecond: move the clock on.
                ms += 1;
                sf.next_at(ms).unwrap()
            }
        });
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let ids = IdGenerator::try_new(8, std::time::Duration::from_millis(100)).unwrap();
    g.bench_function("IdGenerator::next_id (system clock)", |b| {
        b.iter(|| black_box(rt.block_on(ids.next_id()).unwrap()));
    });
    g.finish();
}

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    let delivery = ServerFrame::new(
        0,
        ServerBody::Message(Message {
            id: 118_000_000_000_000_000,
            conversation: 42,
            sender: 7,
            sender_client: 70,
            body: Bytes::from(vec![b'x'; 256]),
        }),
    );
    g.bench_function("encode Message (256 B body)", |b| {
        b.iter(|| black_box(delivery.encode()));
    });
    let send = ClientFrame::new(
        9,
        ClientBody::Send {
            conversation: 42,
            client_msg_id: 1,
            body: Bytes::from(vec![b'x'; 256]),
        },
    )
    .encode();
    g.bench_function("verified decode Send (256 B body)", |b| {
        b.iter(|| black_box(ClientFrame::decode(&send, 64 * 1024).unwrap()));
    });
    let encoded = delivery.encode();
    g.bench_function("verified decode Message (256 B body)", |b| {
        b.iter(|| black_box(ServerFrame::decode(&encoded, 64 * 1024).unwrap()));
    });
    g.finish();
}

fn planner(c: &mut Criterion) {
    let t = Thresholds::default();
    c.bench_function("planner/plan", |b| {
        let mut members = 0u64;
        b.iter(|| {
            members = (members + 97) % 20_000;
            black_box(plan(Tier::Sharded, black_box(members), None, &t))
        });
    });
}

fn sequencer(c: &mut Criterion) {
    use tiercast_engine::sequencer::Sequencer;
    let mut g = c.benchmark_group("sequencer");
    g.throughput(Throughput::Elements(1));
    for (name, convs) in [("one conversation", 1u64), ("10,000 conversations", 10_000)] {
        let seq = Sequencer::<u64>::default();
        let mut sf = Snowflake::try_new(9).unwrap();
        let mut ms = now_unix_ms();
        let mut n = 0u64;
        g.bench_function(format!("enter + complete, {name}"), |b| {
            b.iter(|| {
                n += 1;
                let conv = n % convs;
                let id = seq
                    .enter::<()>(conv, || {
                        Ok(sf.next_at(ms).unwrap_or_else(|_| {
                            ms += 1;
                            sf.next_at(ms).unwrap()
                        }))
                    })
                    .unwrap();
                let run = seq
                    .complete(conv, id, Some(id))
                    .expect("the head publishes");
                black_box(run);
                black_box(seq.next(conv));
            });
        });
    }
    g.finish();
}

criterion_group!(benches, snowflake, frame, planner, sequencer);
criterion_main!(benches);
