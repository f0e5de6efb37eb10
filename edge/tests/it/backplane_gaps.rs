//! A backplane that drops payloads for an edge (its queue full, its Redis
//! client lagging) leaves a gap the connected devices would never look for:
//! a later message moves their cursors past it. The edge repairs each such
//! gap from the store, starting from what it had fanned out before the
//! gap. Here the in-process backplane's queue for the edge holds one
//! payload, so bursts of sends overflow it; every message still reaches
//! the connected device, counted by id.

use tiercast_testkit as common;

use std::collections::HashSet;

use common::{WAIT, metric};
use futures::StreamExt;
use tiercast_client::Delivery;
use tiercast_engine::engine::Outgoing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_the_backplane_drops_are_repaired_from_the_store() {
    let t = common::start(&[
        ("engine.tiers.sharded_above", "4"),
        ("edge.inbound_queue", "1"),
    ])
    .await;
    // 1: tier 1 (user 1 and 2); 2: tier 2 (six members).
    t.chat(1, &[1, 2]).await;
    t.chat(2, &[1, 2, 3, 4, 5, 6]).await;
    let (_client, mut rx) = t.device(1, 10).await;
    let engine = t.node.engine.clone();
    let metrics = || async {
        reqwest::get(t.http("/metrics"))
            .await
            .expect("metrics served")
            .text()
            .await
            .expect("metrics text")
    };

    // Bursts of concurrent sends until the backplane has dropped some (a
    // group commit publishes its whole group at once); bounded.
    let mut sent = HashSet::new();
    for burst in 0..50 {
        let ids: Vec<u64> = futures::stream::iter(0..64u64)
            .map(|i| {
                let engine = engine.clone();
                async move {
                    let conv = 1 + i % 2;
                    let out = Outgoing::system(conv, format!("burst {burst} #{i}"));
                    engine.send(out).await.expect("send stored").message_id
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        sent.extend(ids);
        if metric(&metrics().await, "tiercast_backplane_local_dropped_total") > 0 {
            break;
        }
    }
    let dropped = metric(&metrics().await, "tiercast_backplane_local_dropped_total");
    assert!(dropped > 0, "the bursts overflowed the edge's queue");
    // One more of each kind after the drops: the payload that carries the
    // gap to the edge (a message on its own, as any later traffic would).
    for conv in [1, 2] {
        let r = engine.send(Outgoing::system(conv, "after")).await.unwrap();
        sent.insert(r.message_id);
    }

    let mut got = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while !sent.is_subset(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Delivery::Message(m))) => {
                got.insert(m.id);
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("delivery stream ended"),
            Err(_) => panic!(
                "{} of {} messages reached the device ({dropped} payloads dropped)",
                sent.intersection(&got).count(),
                sent.len()
            ),
        }
    }
    let m = metrics().await;
    assert!(metric(&m, "tiercast_edge_backplane_gaps_total") > 0);
    assert!(metric(&m, "tiercast_edge_gap_repairs_total") > 0);
    assert_eq!(got.difference(&sent).count(), 0, "nothing else arrived");
}
