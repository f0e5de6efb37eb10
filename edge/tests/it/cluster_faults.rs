//! Device faults on a real Redis Cluster with two edges: Redis unreachable
//! between persist and publish, read markers across edges through the Redis
//! Streams write-behind queue (and a flusher that dies holding entries), and
//! an edge draining its devices to the other edge.

use tiercast_testkit as common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::cluster::{Fleet, RedisCluster};
use common::{Device, WAIT};
use tiercast_engine::Outgoing;
use tiercast_engine::reads::{FlusherConfig, ReadMetrics, ReadQueue, RedisReadQueue};
use tiercast_engine::store::{ReadMark, RemoteStore, Store};
use tiercast_schemas::envelope::Tier;

fn outgoing(conversation: u64, body: &str) -> Outgoing {
    Outgoing::system(conversation, Bytes::from(body.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_while_redis_is_unreachable_is_stored_and_reaches_every_device() {
    // Publishes are not retried in line here: the sends return once the
    // publish fails, and the publish is tried again in the background.
    let fleet = Fleet::start(RedisCluster::up(0), 2, &[("engine.publish_retry_ms", "0")]).await;
    let engine = fleet.nodes[0].engine.clone();
    engine
        .create_conversation(Some(1), "chat".into(), &[1, 2])
        .await
        .unwrap();
    engine
        .create_conversation(Some(2), "group".into(), &[1, 2])
        .await
        .unwrap();
    engine.pin_tier(2, Some(Tier::Sharded)).await.unwrap();
    let alice = Device::start(fleet.session_config(&[0, 1], 1, 10).await);
    let bob = Device::start(fleet.session_config(&[1, 0], 2, 20).await);
    for d in [&alice, &bob] {
        d.wait_until("connected", WAIT, |l| l.connects >= 1).await;
    }
    let mut sent: [HashSet<u64>; 2] = Default::default();
    for (i, conv) in [1u64, 2].into_iter().enumerate() {
        let id = engine
            .send(outgoing(conv, "before"))
            .await
            .unwrap()
            .message_id;
        sent[i].insert(id);
    }
    for d in [&alice, &bob] {
        d.wait_until("live delivery", WAIT, |l| {
            l.ids(1) == sent[0] && l.ids(2) == sent[1]
        })
        .await;
    }

    // Every Redis server stops answering (SIGSTOP): the sends are stored,
    // their publishes time out, and the senders still get their ids.
    fleet.redis.signal_all("STOP");
    let during: Vec<_> = futures_join([
        engine.send(outgoing(1, "while redis is away")),
        engine.send(outgoing(2, "while redis is away")),
    ])
    .await;
    fleet.redis.signal_all("CONT");
    fleet.redis.wait_healthy().await;
    for (i, r) in during.into_iter().enumerate() {
        let id = r.expect("stored, so the send succeeds").message_id;
        sent[i].insert(id);
    }
    let failures = common::metric(
        &fleet.nodes[0].metrics(),
        "tiercast_engine_publish_failures_total",
    );
    assert!(failures >= 2, "the publishes failed ({failures})");
    for (i, conv) in [1u64, 2].into_iter().enumerate() {
        let (history, _) = engine.history(conv, 0, 0, 100).await.unwrap();
        assert_eq!(
            history.iter().map(|m| m.id).collect::<HashSet<_>>(),
            sent[i],
            "the store has every message"
        );
    }

    // Redis is back: the publishes given up within publish_retry_ms go
    // out from the background, and the devices, still connected, get the
    // messages live (late, not never: later messages would otherwise move
    // their cursors past them).
    for d in [&alice, &bob] {
        d.wait_until("the late publishes", WAIT * 3, |l| {
            l.ids(1) == sent[0] && l.ids(2) == sent[1]
        })
        .await;
    }
    // Counted once Redis has answered each late publish, which may be just
    // after the devices had the message: polled, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    let late = loop {
        let late = common::metric(
            &fleet.nodes[0].metrics(),
            "tiercast_engine_late_publishes_total",
        );
        if late >= 2 || tokio::time::Instant::now() >= deadline {
            break late;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(late >= 2, "published late from the background ({late})");

    // And on their next connect nothing is missing or doubled: tier 1
    // from the inbox, tier 2 by cursor sync.
    for d in [&alice, &bob] {
        d.session.reconnect();
    }
    for d in [&alice, &bob] {
        d.wait_until("the messages Redis never carried", WAIT * 2, |l| {
            l.ids(1) == sent[0] && l.ids(2) == sent[1]
        })
        .await;
        let stats = d.session.stats();
        eprintln!(
            "redis away: sent 4, device has {} + {}, lost 0, frames received {}, duplicates dropped {}",
            d.ids(1).len(),
            d.ids(2).len(),
            stats.received.load(std::sync::atomic::Ordering::Relaxed),
            stats.duplicates.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    drop((alice, bob));
    fleet.shutdown().await;
}

/// Both futures at once (the sends time out concurrently).
/// A process that stored a send and died before publishing it (an edge
/// SIGKILLed between the two) leaves the message in the store, with its
/// deduplication record, and published to nobody. The state is made here
/// exactly as such a death leaves it (the store rows, written directly);
/// the sender retries (same client_msg_id) through an engine, is answered
/// from the deduplication record, and the message is published then: the
/// devices, still connected, get it live without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_publishes_what_the_first_attempt_could_not() {
    let fleet = Fleet::start(RedisCluster::up(0), 2, &[]).await;
    let engine = fleet.nodes[0].engine.clone();
    engine
        .create_conversation(Some(1), "chat".into(), &[1, 2])
        .await
        .unwrap();
    engine
        .create_conversation(Some(2), "group".into(), &[1, 2])
        .await
        .unwrap();
    engine.pin_tier(2, Some(Tier::Sharded)).await.unwrap();
    let alice = Device::start(fleet.session_config(&[0, 1], 1, 10).await);
    let bob = Device::start(fleet.session_config(&[1, 0], 2, 20).await);
    for d in [&alice, &bob] {
        d.wait_until("connected", WAIT, |l| l.connects >= 1).await;
    }
    let out = |conversation: u64| Outgoing {
        conversation,
        from: tiercast_engine::Sender::Publisher {
            subject: "backend".into(),
            as_user: 0,
        },
        client_msg_id: 40 + conversation,
        body: Bytes::from(format!("to {conversation}")),
    };
    // The first attempts: stored (tier-1 inbox rows too), never published.
    let ids: Vec<u64> = (0..2).map(|i| now_id() + i).collect();
    let devices = fleet.store.devices_of(&[1, 2]).await.unwrap();
    for (i, conv) in [1u64, 2].into_iter().enumerate() {
        let o = out(conv);
        let record = tiercast_engine::store::NewMessage {
            message: tiercast_schemas::wire::Message {
                id: ids[i],
                conversation: conv,
                sender: 0,
                sender_client: 0,
                body: o.body,
            },
            dedupe: Some(tiercast_engine::store::Dedupe {
                scope: tiercast_engine::store::Dedupe::publisher_scope("backend"),
                client_msg_id: o.client_msg_id,
                now_ms: tiercast_engine::snowflake::now_unix_ms(),
                ttl_ms: 60_000,
            }),
            inbox: if conv == 1 {
                devices.clone()
            } else {
                Vec::new()
            },
        };
        fleet.store.insert_message(&record).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for d in [&alice, &bob] {
        let log = d.log.lock().unwrap();
        assert!(
            !log.ids(1).contains(&ids[0]) && !log.ids(2).contains(&ids[1]),
            "nothing was published"
        );
    }
    for (i, conv) in [1u64, 2].into_iter().enumerate() {
        let again = engine.send(out(conv)).await.unwrap();
        assert_eq!((again.message_id, again.duplicate), (ids[i], true));
    }
    for d in [&alice, &bob] {
        d.wait_until("the retried messages, live", WAIT, |l| {
            l.ids(1).contains(&ids[0]) && l.ids(2).contains(&ids[1])
        })
        .await;
        assert_eq!(d.log.lock().unwrap().connects, 1, "without a reconnect");
    }
    assert_eq!(
        common::metric(
            &fleet.nodes[0].metrics(),
            "tiercast_engine_republished_total"
        ),
        2
    );
}

/// An id no engine of the fleet issues (node 1023, the current ms).
fn now_id() -> u64 {
    tiercast_engine::snowflake::compose(tiercast_engine::snowflake::now_unix_ms(), 1023, 0)
}

async fn futures_join<T>(fs: [impl std::future::Future<Output = T>; 2]) -> Vec<T> {
    let [a, b] = fs;
    let (a, b) = tokio::join!(a, b);
    vec![a, b]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_markers_cross_edges_and_a_dead_flusher_loses_none() {
    let fleet = Fleet::start(RedisCluster::up(0), 2, &[]).await;
    let engine = fleet.nodes[0].engine.clone();
    engine
        .create_conversation(Some(1), "chat".into(), &[1, 2])
        .await
        .unwrap();
    let phone = Device::start(fleet.session_config(&[0], 1, 11).await);
    let laptop = Device::start(fleet.session_config(&[1], 1, 12).await);
    for d in [&phone, &laptop] {
        d.wait_until("connected", WAIT, |l| l.connects >= 1).await;
    }
    let id = engine
        .send(outgoing(1, "read me"))
        .await
        .unwrap()
        .message_id;
    phone
        .wait_until("the message", WAIT, |l| l.ids(1).contains(&id))
        .await;
    phone.session.read(1, id, WAIT).await.unwrap();
    laptop
        .wait_until("the marker, on the other edge", WAIT, |l| {
            l.markers.contains(&(1, id))
        })
        .await;
    // The flushers (one per engine) write it to the store.
    let deadline = tokio::time::Instant::now() + WAIT;
    while fleet.store.read_marks(1, &[1]).await.unwrap() != vec![(1, id)] {
        assert!(tokio::time::Instant::now() < deadline, "marker not flushed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A flusher that reads entries and dies before writing them: its store
    // is unreachable, so it holds them pending, then it stops for good.
    let client = tiercast_engine::backplane::redis::connect(&fleet_redis_config(&fleet))
        .await
        .unwrap();
    let dead_store: Arc<dyn Store> = Arc::new(RemoteStore::new(
        "http://127.0.0.1:9",
        tiercast_engine::auth::TokenKeys::new(b"unused-secret-unused"),
    ));
    let cfg = |consumer: &str, claim_ms| FlusherConfig {
        consumer: consumer.into(),
        claim_idle: Duration::from_millis(claim_ms),
        run: true,
    };
    // Its own queue only produces (no flusher), so the entries wait for the
    // doomed flusher below.
    let producer = RedisReadQueue::start(
        client.clone(),
        dead_store.clone(),
        FlusherConfig {
            run: false,
            ..cfg("producer", 60_000)
        },
        ReadMetrics::default(),
    )
    .await
    .unwrap();
    // Stop the fleet's flushers (close waits for them) so the doomed one
    // gets the entries.
    for n in &fleet.nodes {
        n.engine.read_queue().close().await;
    }
    let marks: Vec<ReadMark> = (0..40)
        .map(|i| ReadMark {
            user: 100 + i % 8,
            conversation: 1,
            message_id: 1_000 + i,
        })
        .collect();
    for m in &marks {
        producer.push(*m).await.unwrap();
    }
    // The doomed flusher starts once all 40 are in the streams, so its
    // first read takes each stream's entries at once. (A flusher whose
    // writes fail re-reads its own pending entries and takes no new ones
    // until they are written: started earlier, it could hold only the
    // entries that had arrived by its first read, and the others would
    // wait in the stream for another flusher, which is not what this
    // part checks.)
    let doomed_metrics = ReadMetrics::default();
    let doomed = RedisReadQueue::start(
        client.clone(),
        dead_store,
        cfg("doomed", 60_000),
        doomed_metrics.clone(),
    )
    .await
    .unwrap();
    // Wait until the doomed flusher has read them (they are pending with it).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pending: u64 = (0..tiercast_engine::reads::STREAMS)
            .map(|s| pending_count(&fleet, &tiercast_engine::reads::stream_key(s)))
            .sum();
        if pending == 40 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{pending} pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    doomed.close().await;

    // Another flusher takes them over once they are idle long enough, and
    // writes the newest marker of each user.
    let rescuer_metrics = ReadMetrics::default();
    let _rescuer = RedisReadQueue::start(
        client,
        fleet.store.clone(),
        cfg("rescuer", 300),
        rescuer_metrics.clone(),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    for user in 100..108u64 {
        let newest = marks
            .iter()
            .filter(|m| m.user == user)
            .map(|m| m.message_id)
            .max()
            .unwrap();
        while fleet.store.read_marks(user, &[1]).await.unwrap() != vec![(1, newest)] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "user {user}'s marker was not recovered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "dead flusher: 40 markers accepted, {} recovered by another flusher, {} rows written (coalesced), lost 0",
        rescuer_metrics.recovered.get(),
        rescuer_metrics.written.get()
    );
    assert!(rescuer_metrics.recovered.get() >= 40);
    assert_eq!(doomed_metrics.written.get(), 0);

    // The streams vanish (as a failover that lost them would leave it):
    // markers pushed afterwards land in new streams without the group, and
    // the flusher recreates the group and writes them.
    for s in 0..tiercast_engine::reads::STREAMS {
        let key = tiercast_engine::reads::stream_key(s);
        let (_, owner) = fleet.redis.owner_of(fleet.redis.keyslot(&key));
        fleet.redis.cli(&owner, &["del", &key]);
    }
    let after_loss = ReadMark {
        user: 200,
        conversation: 1,
        message_id: 5_000,
    };
    producer.push(after_loss).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while fleet.store.read_marks(200, &[1]).await.unwrap() != vec![(1, 5_000)] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "marker after the stream loss not written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((phone, laptop));
    fleet.shutdown().await;
}

fn fleet_redis_config(fleet: &Fleet) -> tiercast_engine::backplane::redis::RedisConfig {
    tiercast_engine::backplane::redis::RedisConfig {
        nodes: fleet.redis.nodes.clone(),
        cluster: true,
        topology_check_ms: 1_000,
        ..Default::default()
    }
}

/// Entries pending in the flushers' group of one stream.
fn pending_count(fleet: &Fleet, key: &str) -> u64 {
    let slot = fleet.redis.keyslot(key);
    let (_, owner) = fleet.redis.owner_of(slot);
    let out = fleet
        .redis
        .cli(&owner, &["xpending", key, tiercast_engine::reads::GROUP]);
    out.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_edge_sends_its_devices_to_the_other_edge() {
    let mut fleet = Fleet::start(
        RedisCluster::up(0),
        2,
        &[
            ("edge.drain_spread_ms", "300"),
            ("edge.drain_deadline_ms", "5000"),
        ],
    )
    .await;
    let engine = fleet.nodes[1].engine.clone();
    engine
        .create_conversation(Some(1), "chat".into(), &[1, 2])
        .await
        .unwrap();
    let bob = Device::start(fleet.session_config(&[0, 1], 2, 20).await);
    bob.wait_until("connected", WAIT, |l| l.connects >= 1).await;
    let mut sent = HashSet::new();
    sent.insert(engine.send(outgoing(1, "one")).await.unwrap().message_id);
    bob.wait_until("live", WAIT, |l| l.ids(1) == sent).await;

    // Edge 0 shuts down (what SIGTERM does): bob is told to reconnect and
    // moves to edge 1 by himself, without an error.
    let draining = fleet.nodes.remove(0);
    draining.shutdown().await;
    bob.wait_until("reconnected elsewhere", WAIT, |l| l.connects >= 2)
        .await;
    sent.insert(engine.send(outgoing(1, "two")).await.unwrap().message_id);
    bob.wait_until("live on the other edge", WAIT, |l| l.ids(1) == sent)
        .await;
    assert!(
        bob.log.lock().unwrap().disconnects.is_empty(),
        "a drain is not an error"
    );
    drop(bob);
    fleet.shutdown().await;
}
