//! Nobody gets what isn't theirs: device ids are issued and bound to their
//! user, and a removed member gets nothing more on any edge or tier. Three
//! edges on a real Redis Cluster, real QUIC on loopback.
//!
//! "Nothing delivered" is shown without sleeping: a fan-out loop handles
//! its inbound payloads in order, and a connection's writer sends in queue
//! order. So once a witness on the same edge has every probe message, a
//! fence message sent afterwards to the removed user's own channel arrives
//! after anything those probes could have put in its queue; the removed
//! device must see the fence and nothing before it.

use tiercast_testkit as common;

use bytes::Bytes;
use common::cluster::{Fleet, RedisCluster};
use common::{WAIT, next_message};
use tiercast_client::{Client, ClientConfig, Deliveries, Delivery};
use tiercast_engine::store::Device;
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::wire::{Cursor, ErrorCode};

/// A connect of `user` to `edge` naming `client_id` (0: issue one).
async fn connect(fleet: &Fleet, edge: usize, user: u64, client_id: u64) -> ClientConfig {
    let n = &fleet.nodes[edge];
    let mut cfg = ClientConfig::new(
        n.quic_addr,
        n.cert_pem.clone(),
        fleet.token(user),
        client_id,
    );
    cfg.device = format!("authz-{user}");
    cfg
}

async fn create(fleet: &Fleet, id: u64, members: &[u64], tier: Option<Tier>) {
    let engine = &fleet.nodes[0].engine;
    engine
        .create_conversation(Some(id), format!("c{id}"), members)
        .await
        .unwrap();
    if tier.is_some() {
        engine.pin_tier(id, tier).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_id_is_issued_and_bound_to_its_user_on_every_edge() {
    common::logs();
    let fleet = Fleet::start(RedisCluster::up(0), 3, &[]).await;
    create(&fleet, 1, &[1, 2], None).await;

    // A new device gets an id in Welcome, registered for its user only.
    let (bob, _rx) = Client::connect(connect(&fleet, 0, 2, 0).await)
        .await
        .unwrap();
    let issued = bob.client_id;
    assert_ne!(issued, 0);
    let owned: Vec<u64> = fleet
        .store
        .clients_of(2)
        .await
        .unwrap()
        .iter()
        .map(|c| c.client_id)
        .collect();
    assert_eq!(owned, vec![issued]);
    bob.shutdown().await;

    // While bob is away, a message waits in his device's inbox.
    let (alice, _arx) = Client::connect(connect(&fleet, 1, 1, 0).await)
        .await
        .unwrap();
    assert_ne!(alice.client_id, issued, "ids are not reused");
    let sent = alice
        .send(1, 1, Bytes::from_static(b"for bob only"))
        .await
        .unwrap();
    let bobs = Device {
        user: 2,
        client: issued,
    };
    assert_eq!(fleet.store.inbox(bobs, 0, 10).await.unwrap().len(), 1);

    // User 3 names bob's device id on every edge: refused, nothing
    // registered, nothing taken.
    for edge in 0..3 {
        let e = Client::connect(connect(&fleet, edge, 3, issued).await)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UnknownDevice), "edge {edge}: {e}");
    }
    assert!(fleet.store.clients_of(3).await.unwrap().is_empty());
    // With a device of his own, user 3 cannot ack bob's message either.
    let (mallory, _mrx) = Client::connect(connect(&fleet, 2, 3, 0).await)
        .await
        .unwrap();
    assert_eq!(mallory.ack(&[sent.message_id]).await.unwrap(), 0);
    assert_eq!(fleet.store.inbox(bobs, 0, 10).await.unwrap().len(), 1);

    // Bob comes back as the same device on another edge: the message is
    // his.
    let (bob, mut rx) = Client::connect(connect(&fleet, 2, 2, issued).await)
        .await
        .unwrap();
    assert_eq!(bob.client_id, issued);
    let m = next_message(&mut rx).await;
    assert_eq!(m.id, sent.message_id);
    assert_eq!(bob.ack(&[m.id]).await.unwrap(), 1);
    fleet.shutdown().await;
}

/// Waits until `rx` has a Message or Notify for each of `ids`.
async fn witness(rx: &mut Deliveries, ids: &[u64]) {
    let mut left: std::collections::HashSet<u64> = ids.iter().copied().collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !left.is_empty() {
        let d = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("witness still waits for {left:?}"))
            .expect("witness connected");
        match d {
            Delivery::Message(m) => left.remove(&m.id),
            Delivery::Notify { message_id, .. } => left.remove(&message_id),
            _ => false,
        };
    }
}

/// The removed device's next delivery must be the fence message.
async fn only_the_fence(rx: &mut Deliveries, fence: u64) {
    let d = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the fence arrives")
        .expect("still connected");
    match d {
        Delivery::Message(m) if m.id == fence => {}
        other => panic!("a removed member got {other:?} before the fence {fence}"),
    }
}

/// Sends one message per conversation from `sender`; returns their ids.
async fn probe(sender: &Client, convs: &[u64], tag: u64) -> Vec<u64> {
    let mut ids = Vec::new();
    for &c in convs {
        let ok = sender
            .send(c, tag * 100 + c, Bytes::from(format!("probe {tag} in {c}")))
            .await
            .unwrap();
        ids.push(ok.message_id);
    }
    ids
}

async fn remove(http: &reqwest::Client, fleet: &Fleet, conv: u64, user: u64) {
    let n = &fleet.nodes[1];
    let publisher = n
        .keys
        .mint_publisher("tests", tiercast_engine::auth::now_unix(), 600);
    let r = http
        .delete(format!(
            "http://{}/v1/conversations/{conv}/members/{user}",
            n.http_addr
        ))
        .bearer_auth(publisher)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        204,
        "{conv}/{user}: {}",
        r.text().await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_gets_nothing_on_any_edge_or_tier() {
    common::logs();
    let fleet = Fleet::start(RedisCluster::up(0), 3, &[]).await;
    let http = reqwest::Client::new();
    // One conversation per tier; user 1 sends, users 4 and 6 witness on
    // the edges of users 3 and 5, who are removed.
    let convs = [1, 2, 3];
    create(&fleet, 1, &[1, 3, 4, 5, 6], None).await;
    create(&fleet, 2, &[1, 3, 4, 5, 6], Some(Tier::Sharded)).await;
    create(&fleet, 3, &[1, 3, 4, 5, 6], Some(Tier::IdOnly)).await;
    // Fences: a chat of the sender with each removed user.
    create(&fleet, 8, &[1, 3], None).await;
    create(&fleet, 9, &[1, 5], None).await;
    let (sender, _s) = Client::connect(connect(&fleet, 1, 1, 0).await)
        .await
        .unwrap();

    // Removed while offline: user 3 was on edge 0 before.
    let (gone, _g) = Client::connect(connect(&fleet, 0, 3, 0).await)
        .await
        .unwrap();
    let device3 = gone.client_id;
    gone.shutdown().await;
    for c in convs {
        remove(&http, &fleet, c, 3).await;
    }
    let (back, mut back_rx) = Client::connect(connect(&fleet, 0, 3, device3).await)
        .await
        .unwrap();
    let (_w4, mut w4_rx) = Client::connect(connect(&fleet, 0, 4, 0).await)
        .await
        .unwrap();

    // Removed while connected: user 5 on edge 2.
    let (live, mut live_rx) = Client::connect(connect(&fleet, 2, 5, 0).await)
        .await
        .unwrap();
    let (_w6, mut w6_rx) = Client::connect(connect(&fleet, 2, 6, 0).await)
        .await
        .unwrap();
    // Edge 2 serves user 5 in all three conversations before the removal.
    let before = probe(&sender, &convs, 1).await;
    witness(&mut live_rx, &before).await;
    witness(&mut w6_rx, &before).await;
    for c in convs {
        remove(&http, &fleet, c, 5).await;
    }

    // The first messages after the removals' answers.
    let after = probe(&sender, &convs, 2).await;
    witness(&mut w4_rx, &after).await;
    witness(&mut w6_rx, &after).await;
    let fence3 = sender
        .send(8, 801, Bytes::from_static(b"fence"))
        .await
        .unwrap();
    let fence5 = sender
        .send(9, 901, Bytes::from_static(b"fence"))
        .await
        .unwrap();
    // User 3 was removed before any probe; user 5 before the second.
    only_the_fence(&mut back_rx, fence3.message_id).await;
    only_the_fence(&mut live_rx, fence5.message_id).await;

    // Reads refuse them too: history, the one-id pull, and sync.
    for (client, _) in [(&back, 3), (&live, 5)] {
        for c in convs {
            let e = client.fetch(c, 0, 10).await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::Forbidden), "fetch {c}: {e}");
            let e = client.pull(c, after[2]).await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::Forbidden), "pull {c}: {e}");
        }
        let cursors: Vec<Cursor> = convs
            .iter()
            .map(|&conversation| Cursor {
                conversation,
                last_id: 0,
            })
            .collect();
        let entries = client.sync(&cursors, 10).await.unwrap();
        assert!(
            entries
                .iter()
                .all(|e| e.tier == 0 && e.messages.is_empty() && e.latest_id == 0),
            "{entries:?}"
        );
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_live_connection_per_device_the_newer_wins_across_edges() {
    let fleet = Fleet::start(RedisCluster::up(0), 2, &[]).await;
    create(&fleet, 1, &[1, 2], None).await;
    let (first, _rx1) = Client::connect(connect(&fleet, 0, 1, 0).await)
        .await
        .unwrap();
    let id = first.client_id;
    let (second, mut rx2) = Client::connect(connect(&fleet, 0, 1, id).await)
        .await
        .unwrap();
    let why = tokio::time::timeout(WAIT, first.closed()).await.unwrap();
    assert_eq!(why.code(), Some(ErrorCode::ConnectionReplaced), "{why}");
    let (peer, _p) = Client::connect(connect(&fleet, 1, 2, 0).await)
        .await
        .unwrap();
    let sent = peer.send(1, 1, Bytes::from_static(b"hi")).await.unwrap();
    assert_eq!(next_message(&mut rx2).await.id, sent.message_id);
    // The same device on another edge: the one on edge 0 is closed too.
    let (third, mut rx3) = Client::connect(connect(&fleet, 1, 1, id).await)
        .await
        .unwrap();
    let why = tokio::time::timeout(WAIT, second.closed()).await.unwrap();
    assert_eq!(why.code(), Some(ErrorCode::ConnectionReplaced), "{why}");
    let sent = peer.send(1, 2, Bytes::from_static(b"again")).await.unwrap();
    // (after "hi", still pending in the device's inbox: never acked)
    let got = common::messages_until(&mut rx3, sent.message_id).await;
    assert!(got.len() <= 2, "{got:?}");
    drop(third);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_when_its_token_expires() {
    let fleet = Fleet::start(RedisCluster::up(0), 1, &[]).await;
    let n = &fleet.nodes[0];
    let now = tiercast_engine::auth::now_unix();
    let short = n.keys.mint_user(1, now, 2);
    let cfg = ClientConfig::new(n.quic_addr, n.cert_pem.clone(), short, 0);
    let (client, _rx) = Client::connect(cfg).await.unwrap();
    let why = tokio::time::timeout(WAIT, client.closed()).await.unwrap();
    assert_eq!(why.code(), Some(ErrorCode::TokenExpired), "{why}");
    fleet.shutdown().await;
}

/// The pull path caches bodies, never misses: asking for an id before its
/// message exists does not hide the message afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_before_the_message_exists_does_not_blind_the_edge() {
    let t = common::start(&[]).await;
    t.chat(3, &[1, 2]).await;
    t.node.engine.pin_tier(3, Some(Tier::IdOnly)).await.unwrap();
    let (reader, _rx) = t.device(2, 20).await;
    let store = t.node.engine.store().clone();
    // An id a client could predict: just after the present.
    let next = tiercast_engine::snowflake::min_id_at(tiercast_engine::snowflake::now_unix_ms());
    assert_eq!(reader.pull(3, next).await.unwrap(), None);
    let m = tiercast_schemas::wire::Message {
        id: next,
        conversation: 3,
        sender: 1,
        sender_client: 10,
        body: Bytes::from_static(b"now it exists"),
    };
    store
        .insert_message(&tiercast_engine::store::NewMessage {
            message: m.clone(),
            dedupe: None,
            inbox: vec![],
        })
        .await
        .unwrap();
    assert_eq!(reader.pull(3, next).await.unwrap(), Some(m));
    // An id from the future is answered without a store read.
    let reads = || common::metric(&t.node.metrics(), "tiercast_edge_pull_store_reads");
    let before = reads();
    let future = tiercast_engine::snowflake::min_id_at(
        tiercast_engine::snowflake::now_unix_ms() + 3_600_000,
    );
    assert_eq!(reader.pull(3, future).await.unwrap(), None);
    assert_eq!(reads(), before);
    // Once a message has been fanned out here, the ids above it are
    // answered without a store read too (the next predictable ones).
    let (sender, _s) = t.device(1, 10).await;
    let sent = sender.send(3, 1, Bytes::from_static(b"n")).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while reader.pull(3, sent.message_id).await.unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never pulled");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let before = reads();
    for next in sent.message_id + 1..sent.message_id + 50 {
        assert_eq!(reader.pull(3, next).await.unwrap(), None);
    }
    assert_eq!(reads(), before, "no store read for ids above the newest");
    // ... and the next real message is pulled as soon as it exists.
    let later = sender.send(3, 2, Bytes::from_static(b"m")).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while reader.pull(3, later.message_id).await.unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "blinded");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    t.node.shutdown().await;
}

/// A session whose token expires on an open connection reconnects with a
/// fresh one from its token source, and keeps receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_renews_its_token_when_the_edge_ends_it() {
    let t = common::start(&[]).await;
    t.chat(1, &[1, 2]).await;
    let mut cfg = t.session_config(2, 20).await;
    let keys = t.node.keys.clone();
    let minted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = minted.clone();
    // Short-lived tokens: each lives 2 s.
    cfg.token = std::sync::Arc::new(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        keys.mint_user(2, tiercast_engine::auth::now_unix(), 2)
    });
    let device = common::Device::start(cfg);
    device
        .wait_until("a reconnect after the token expired", WAIT, |l| {
            l.connects >= 2
                && l.disconnects
                    .iter()
                    .any(|e| e.code() == Some(ErrorCode::TokenExpired))
        })
        .await;
    assert!(device.log.lock().unwrap().stopped.is_none());
    assert!(minted.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    let (sender, _s) = t.device(1, 10).await;
    let sent = sender
        .send(1, 1, Bytes::from_static(b"after"))
        .await
        .unwrap();
    device
        .wait_until("the message", WAIT, |l| {
            l.messages.iter().any(|m| m.id == sent.message_id)
        })
        .await;
    t.node.shutdown().await;
}
