//! The three tiers across three edges on a real Redis Cluster (started by
//! `scripts/redis-cluster.sh`), over real QUIC on loopback: every online
//! device gets every message exactly once after dedupe (counted), tier 3
//! devices get a notification and then the body through a pull, and the
//! Redis and store costs per message are what each tier promises.

use tiercast_testkit as common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use common::cluster::{Fleet, RedisCluster};
use common::{WAIT, metric};
use tiercast_client::{Client, Deliveries, Delivery};
use tiercast_schemas::envelope::Tier;

const USERS: u64 = 12;

fn client_id(user: u64) -> u64 {
    user * 10
}

/// What one device ends with: first receipts by id, duplicates, and the
/// bodies it pulled for notifications.
#[derive(Default, Debug)]
struct Seen {
    ids: HashSet<u64>,
    duplicates: u64,
    notified: u64,
    pulled: HashMap<u64, Bytes>,
}

/// Collects deliveries until `want` ids are seen (or the wait bound ends),
/// pulling the body of every notification.
async fn collect(client: Client, mut rx: Deliveries, want: HashSet<u64>) -> Seen {
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !want.is_subset(&seen.ids) {
        let Ok(Some(d)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            break;
        };
        let id = match d {
            Delivery::Message(m) => m.id,
            Delivery::Notify {
                conversation,
                message_id,
            } => {
                seen.notified += 1;
                let m = client
                    .pull(conversation, message_id)
                    .await
                    .expect("pull succeeds")
                    .expect("the notified message exists");
                seen.pulled.insert(message_id, m.body);
                message_id
            }
            _ => continue,
        };
        if !seen.ids.insert(id) {
            seen.duplicates += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_serve_every_tier_exactly_once() {
    let fleet = Fleet::start(
        RedisCluster::up(0),
        3,
        &[
            ("engine.tiers.sharded_above", "4"),
            ("engine.tiers.id_only_above", "8"),
        ],
    )
    .await;
    let ids: HashSet<u16> = fleet.nodes.iter().map(|n| n.node_id()).collect();
    assert_eq!(ids.len(), 3, "each edge leased its own node id");

    let engine = fleet.nodes[0].engine.clone();
    let users: Vec<u64> = (1..=USERS).collect();
    // Conversation sizes put one in each tier with these thresholds.
    let convs: [(u64, &[u64], Tier); 3] = [
        (1, &users[..4], Tier::Direct),
        (2, &users[..8], Tier::Sharded),
        (3, &users[..], Tier::IdOnly),
    ];
    for (id, members, tier) in convs {
        let c = engine
            .create_conversation(Some(id), format!("c{id}"), members)
            .await
            .unwrap();
        assert_eq!(c.tier, tier, "conversation {id}");
    }

    // One device per user, users spread evenly over the edges.
    let mut devices = Vec::new();
    for &u in &users {
        devices.push(fleet.device((u % 3) as usize, u, client_id(u)).await);
    }

    // The first three members of each conversation send three messages each.
    let mut sent: Vec<(u64, u64, u64, Bytes)> = Vec::new(); // (conv, sender, id, body)
    for (conv, members, _) in convs {
        for &sender in &members[..3] {
            for i in 0..3 {
                let body = Bytes::from(format!("c{conv} u{sender} #{i}"));
                let (client, _) = &devices[(sender - 1) as usize];
                let ok = client.send(conv, 0, body.clone()).await.unwrap();
                sent.push((conv, sender, ok.message_id, body));
            }
        }
    }

    let mut tasks = Vec::new();
    for (i, (client, rx)) in devices.into_iter().enumerate() {
        let user = i as u64 + 1;
        let want: HashSet<u64> = sent
            .iter()
            .filter(|(conv, sender, _, _)| {
                *sender != user && convs[(*conv - 1) as usize].1.contains(&user)
            })
            .map(|(_, _, id, _)| *id)
            .collect();
        tasks.push(tokio::spawn(async move {
            let seen = collect(client, rx, want.clone()).await;
            (user, want, seen)
        }));
    }
    let mut expected = 0;
    let mut delivered = 0;
    for t in tasks {
        let (user, want, seen) = t.await.unwrap();
        let own: HashSet<u64> = sent.iter().filter(|s| s.1 == user).map(|s| s.2).collect();
        let got: HashSet<u64> = seen.ids.difference(&own).copied().collect();
        assert_eq!(got, want, "user {user}: every message, nothing else");
        assert_eq!(seen.duplicates, 0, "user {user}: exactly once");
        for (id, body) in &seen.pulled {
            let original = &sent.iter().find(|s| s.2 == *id).unwrap().3;
            assert_eq!(body, original, "user {user}: pulled body of {id}");
        }
        expected += want.len();
        delivered += got.len();
    }
    assert_eq!(delivered, expected);

    // Costs, counted by the engines and edges themselves.
    let http = reqwest::Client::new();
    let mut text = String::new();
    for n in &fleet.nodes {
        text += &http
            .get(format!("http://{}/metrics", n.http_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    }
    let per_tier = |t: u8| {
        sent.iter()
            .filter(|s| convs[(s.0 - 1) as usize].2 as u8 == t)
            .count() as u64
    };
    let publishes = |t: u8| {
        metric(
            &text,
            &format!("tiercast_engine_publishes_total{{tier=\"{t}\"}}"),
        )
    };
    assert_eq!(
        publishes(1),
        per_tier(1) * 4,
        "tier 1: one publish per member"
    );
    assert_eq!(
        publishes(2),
        per_tier(2) * 3,
        "tier 2: one publish per hosting edge"
    );
    assert_eq!(
        publishes(3),
        per_tier(3) * 3,
        "tier 3: one notification per hosting edge"
    );
    let bytes3 = metric(&text, "tiercast_engine_publish_bytes_total{tier=\"3\"}");
    assert!(
        bytes3 / publishes(3) < 64,
        "tier 3 payload {} bytes",
        bytes3 / publishes(3)
    );
    let pull_reads = metric(&text, "tiercast_edge_pull_store_reads_total");
    assert!(
        pull_reads <= per_tier(3) * 3,
        "pull path: {pull_reads} store reads for {} messages on 3 edges",
        per_tier(3)
    );
    // Each tier-3 message was pulled by at least the 11 other members'
    // devices (senders may pull their own too), through 3 edges.
    let pulls = metric(&text, "tiercast_edge_pull_requests_total");
    assert!(pulls >= per_tier(3) * 11, "{pulls} pulls");
    fleet.shutdown().await;
}

/// A conversation that grows from tier 1 into tier 2 while devices are
/// online keeps delivering to every device, with nothing lost at the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_change_loses_nothing() {
    let fleet = Fleet::start(
        RedisCluster::up(0),
        2,
        &[
            ("engine.tiers.sharded_above", "3"),
            ("engine.tiers.id_only_above", "100"),
        ],
    )
    .await;
    let engine = fleet.nodes[0].engine.clone();
    engine
        .create_conversation(Some(9), "growing".into(), &[1, 2, 3])
        .await
        .unwrap();
    let mut devices = Vec::new();
    for u in 1..=6u64 {
        devices.push(fleet.device((u % 2) as usize, u, client_id(u)).await);
    }
    let (sender, _) = &devices[0];
    let before = sender
        .send(9, 0, Bytes::from_static(b"tier 1"))
        .await
        .unwrap();
    engine.add_members(9, &[4, 5, 6]).await.unwrap();
    assert_eq!(engine.conversation(9).await.unwrap().tier, Tier::Sharded);
    // A new member gets live traffic once its edge has processed the
    // membership announcement. That travels on the user's channel, another
    // shard than the conversation's node channels, so a message sent right
    // after the add can overtake it (it is in history, and in a cursor
    // sync). Send until every new member has had one live.
    let (old, new) = devices.split_at_mut(3);
    let sender = &old[0].0;
    let mut probes = Vec::new();
    let mut joined = [false; 3];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !joined.iter().all(|j| *j) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new members got no live traffic: {joined:?}"
        );
        let probe = sender
            .send(9, 0, Bytes::from_static(b"probe"))
            .await
            .unwrap();
        probes.push(probe.message_id);
        for (k, (_, rx)) in new.iter_mut().enumerate() {
            let until = tokio::time::Instant::now() + Duration::from_millis(200);
            while !joined[k] {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(Delivery::Message(m))) => joined[k] = probes.contains(&m.id),
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
        }
    }
    eprintln!(
        "tier change: new members live after {} probe(s)",
        probes.len()
    );
    let after = sender
        .send(9, 0, Bytes::from_static(b"tier 2"))
        .await
        .unwrap();

    // Members from before the change miss nothing across it; new members
    // miss nothing once live.
    for (i, (client, rx)) in devices.into_iter().enumerate().skip(1) {
        let user = i as u64 + 1;
        let mut want = HashSet::from([after.message_id]);
        if user <= 3 {
            want.insert(before.message_id);
            want.extend(&probes);
        }
        let seen = collect(client, rx, want.clone()).await;
        assert!(want.is_subset(&seen.ids), "user {user}: {seen:?}");
        if user <= 3 {
            assert_eq!(seen.ids, want, "user {user}");
        }
        assert_eq!(seen.duplicates, 0);
    }
    fleet.shutdown().await;
}
