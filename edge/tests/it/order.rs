//! Order on one engine node: a backend publishing concurrently over HTTP
//! (every send its own request, many in flight) to one conversation; every
//! device receives the conversation's messages live in id order, in tier 1
//! and in tier 2, with none missing. Sends to other conversations run
//! alongside (they never wait for each other).

use tiercast_testkit as common;

use std::collections::HashMap;

use common::{WAIT, next_message};
use futures::StreamExt;
use serde_json::{Value, json};
use tiercast_client::{Deliveries, Delivery};

/// Sends in flight at once, and sends per conversation.
const IN_FLIGHT: usize = 64;
const SENDS: usize = 400;

fn id_of(v: &Value) -> u64 {
    v.as_str().expect("ids are strings").parse().unwrap()
}

/// Receives `n` messages of `conv` (others are counted aside); returns
/// their ids in arrival order.
async fn receive(rx: &mut Deliveries, conv: u64, n: usize) -> Vec<u64> {
    let mut ids = Vec::with_capacity(n);
    tokio::time::timeout(WAIT * 3, async {
        while ids.len() < n {
            match rx.recv().await {
                Some(Delivery::Message(m)) if m.conversation == conv => ids.push(m.id),
                Some(_) => {}
                None => panic!("delivery stream ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("conversation {conv}: {} of {n} arrived", ids.len()));
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_arrive_in_id_order_in_every_tier() {
    let t = common::start(&[("engine.tiers.sharded_above", "4")]).await;
    // Conversation 1: tier 1 (3 members); 2: tier 2 (6 members); 3: tier 1,
    // sent to alongside.
    t.chat(1, &[1, 2, 3]).await;
    t.chat(2, &[1, 2, 3, 4, 5, 6]).await;
    t.chat(3, &[1, 2, 3]).await;
    assert_eq!(
        t.node.engine.conversation(2).await.unwrap().tier,
        tiercast_schemas::envelope::Tier::Sharded,
        "conversation 2 is in tier 2"
    );
    let mut devices = Vec::new();
    for user in [2, 4] {
        devices.push(t.device(user, user * 10).await);
    }
    // A message to each first: both devices are hosted and subscribed.
    let http = reqwest::Client::new();
    let auth = t.publisher_token();
    let post = |conv: u64, body: String| {
        let http = http.clone();
        let auth = auth.clone();
        let url = t.http(&format!("/v1/conversations/{conv}/messages"));
        async move {
            let r = http
                .post(url)
                .bearer_auth(auth)
                .json(&json!({ "body": body }))
                .send()
                .await
                .expect("request sent");
            assert_eq!(r.status(), 201, "send accepted");
            id_of(&r.json::<Value>().await.unwrap()["id"])
        }
    };
    post(2, "hello".into()).await;
    for (_, rx) in &mut devices {
        next_message(rx).await;
    }

    let sends: Vec<(u64, String)> = (0..SENDS)
        .flat_map(|i| [1, 2, 3].map(|c| (c, format!("c{c} #{i}"))))
        .collect();
    let ids: Vec<(u64, u64)> = futures::stream::iter(sends)
        .map(|(c, body)| {
            let f = post(c, body);
            async move { (c, f.await) }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let mut by_conv: HashMap<u64, Vec<u64>> = HashMap::new();
    for (c, id) in ids {
        by_conv.entry(c).or_default().push(id);
    }

    // User 2 is in all three; user 4 only in conversation 2 (tier 2).
    let (_c2, rx2) = &mut devices[0];
    let mut got: HashMap<u64, Vec<u64>> = HashMap::new();
    // Collect per conversation from one stream: messages of all three
    // interleave, so read until every conversation has its count.
    tokio::time::timeout(WAIT * 3, async {
        while [1u64, 2, 3]
            .iter()
            .any(|c| got.get(c).map_or(0, Vec::len) < SENDS)
        {
            match rx2.recv().await {
                Some(Delivery::Message(m)) => got.entry(m.conversation).or_default().push(m.id),
                Some(_) => {}
                None => panic!("delivery stream ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("user 2 did not get every message"));
    let (_c4, rx4) = &mut devices[1];
    got.insert(4_000 + 2, receive(rx4, 2, SENDS).await);

    for (key, ids) in &got {
        let conv = key % 1_000;
        let mut sorted = by_conv[&conv].clone();
        sorted.sort_unstable();
        let out_of_order = ids.windows(2).filter(|w| w[0] > w[1]).count();
        assert_eq!(
            out_of_order, 0,
            "conversation {conv} (receiver {key}): {out_of_order} out-of-order receipts"
        );
        assert_eq!(ids, &sorted, "conversation {conv}: every id, in id order");
    }
}
