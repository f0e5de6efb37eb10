//! One frame fanned out through the edge's I/O core to many connections:
//! real QUIC connections (TLS 1.3, handshaken in memory), the frame
//! written into each one's delivery stream by the core's outbox, packets
//! built and encrypted by quinn-proto, sent by the core's batched send
//! (`sendmmsg`) to a loopback socket standing in for the devices, and the
//! devices' ACKs received into the connections. Only the edge's side is
//! timed (`tiercast_edge::core::rig`); the devices' side runs between.
//!
//! The machine's floor is measured first in the same run (the kernel's cost
//! of one delivery-sized datagram, `bench/src/udp_floor.rs`) and printed.
//!
//! `cargo bench -p tiercast-bench --bench core_fanout`; `TIERCAST_RIG_CONNS`
//! sets the connections (10,000 by default). Figures in docs/benchmarks.md.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tiercast_edge::config::EdgeConfig;
use tiercast_edge::core::rig::{Rig, delivery_frame};
use tiercast_edge::tls::Identity;

fn conns() -> usize {
    std::env::var("TIERCAST_RIG_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn rig(ack_every: u32) -> Rig {
    let id = Identity::self_signed(&["localhost".into()]).expect("certificate");
    let crypto = tiercast_client::tls::client_crypto(&id.chain_pem).expect("client crypto");
    let cfg = EdgeConfig {
        ack_every,
        ..EdgeConfig::default()
    };
    Rig::new(conns(), &cfg, id, crypto, delivery_frame(100)).expect("rig")
}

fn core_fanout(c: &mut Criterion) {
    let n = conns();
    // The machine's floor in the same run: the kernel's cost of one
    // delivery-sized datagram to one of 1,000 loopback receivers.
    let floor = tiercast_bench::udp_floor::measure(1_000, 150, 20).expect("floor");
    println!(
        "core_fanout floor: {:.2} us per datagram (sendto {:.2}, sendmmsg {:.2})",
        floor.floor_us(),
        floor.sendto_us,
        floor.sendmmsg_us
    );
    let mut g = c.benchmark_group("core_fanout");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    for ack_every in [0, 10] {
        let mut rig = rig(ack_every);
        // Warm the connections (first packets, congestion window).
        for _ in 0..5 {
            rig.round();
        }
        let mut counts = (0u64, 0u64, 0u64, 0u64);
        g.bench_function(
            format!("one frame to {n} connections, ack_every {ack_every}"),
            |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let r = rig.round();
                        t += r.send + r.acks;
                        counts.0 += 1;
                        counts.1 += r.datagrams;
                        counts.2 += r.syscalls;
                        counts.3 += r.ack_datagrams;
                    }
                    t
                })
            },
        );
        let (rounds, dgrams, calls, acks) = counts;
        println!(
            "core_fanout ack_every {ack_every}: {rounds} rounds, {:.2} datagrams and {:.2} ACKs received per delivery, {:.1} datagrams per send call",
            dgrams as f64 / (rounds as f64 * n as f64),
            acks as f64 / (rounds as f64 * n as f64),
            dgrams as f64 / calls.max(1) as f64,
        );
    }
    g.finish();
}

criterion_group!(benches, core_fanout);
criterion_main!(benches);
