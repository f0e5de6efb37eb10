//! A Redis master fails over, and a slot moves to another master, while two
//! edges serve a chat: live delivery resumes by itself (the subscribers
//! notice the new slot owners and resubscribe), nothing stored is lost, and
//! the device gets whatever the live path missed from its inbox.

use tiercast_testkit as common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::WAIT;
use common::cluster::{Fleet, RedisCluster};
use tiercast_client::{Client, ClientError, Deliveries, Delivery, ErrorCode};
use tiercast_engine::backplane::redis::{RedisConfig, connect};
use tiercast_engine::lease::NodeLease;
use tiercast_engine::snowflake::{IdError, IdGenerator};

/// Sends until the receiver gets one of the messages sent in this call live
/// (bounded); returns every id sent.
async fn send_until_delivered(sender: &Client, rx: &mut Deliveries, tag: &str) -> Vec<u64> {
    let mut sent = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{tag}: live delivery did not resume within 30 s"
        );
        let body = Bytes::from(format!("{tag} {}", sent.len()));
        match sender.send(1, 0, body).await {
            Ok(ok) => sent.push(ok.message_id),
            // Ids pause if the node-id lease cannot be renewed for 7.5 s
            // (ADR 0006); the send is refused, nothing is stored, and it is
            // safe to send again.
            Err(ClientError::Refused {
                code: ErrorCode::Unavailable,
                message,
                ..
            }) => {
                eprintln!("{tag}: send refused for now: {message}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => panic!("{tag}: send failed: {e:?}"),
        }
        // Wait a little for it (or any earlier one of this round) to arrive.
        let until = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(d)) = tokio::time::timeout_at(until, rx.recv()).await {
            if let Delivery::Message(m) = d
                && sent.contains(&m.id)
            {
                return sent;
            }
        }
    }
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_resumes_after_a_failover_and_a_slot_migration() {
    common::logs();
    let fleet = Fleet::start(RedisCluster::up(1), 2, &[]).await;
    let engine = fleet.nodes[0].engine.clone();
    engine
        .create_conversation(Some(1), "chat".into(), &[1, 2])
        .await
        .unwrap();
    let (sender, _s_rx) = fleet.device(0, 1, 10).await;
    let (_receiver, mut rx) = fleet.device(1, 2, 20).await;
    let mut all = send_until_delivered(&sender, &mut rx, "before").await;

    // 1. Fail over the master that serves user 2's channel.
    let redis = &fleet.redis;
    let slot = redis.keyslot("client+user:{2}");
    let replica = redis.replica_serving(slot);
    redis.fail_over(slot, &replica).await;
    let round = send_until_delivered(&sender, &mut rx, "after failover").await;
    eprintln!(
        "failover: live delivery resumed after {} sends",
        round.len()
    );
    all.extend(round);

    // 2. Move that slot to another master.
    let (now_id, _) = redis.owner_of(slot);
    // Another master, as that node itself says: right after a failover the
    // gossiped topology can still list the demoted master as one.
    let mut target = None;
    wait_for("another master that knows it is one", || {
        target = redis
            .topology()
            .into_iter()
            .find(|(id, addr, is_master, _)| {
                *is_master
                    && *id != now_id
                    && redis.cli(addr, &["role"]).lines().next() == Some("master")
            })
            .map(|(id, addr, _, _)| (id, addr));
        target.is_some()
    })
    .await;
    let target = target.expect("found above");
    redis.migrate_slot(slot, &target);
    wait_for("the slot moves", || {
        redis
            .try_owner_of(slot)
            .is_some_and(|(id, _)| id == target.0)
    })
    .await;
    let round = send_until_delivered(&sender, &mut rx, "after migration").await;
    eprintln!(
        "slot migration: live delivery resumed after {} sends",
        round.len()
    );
    all.extend(round);

    // Nothing stored was lost: history holds every message sent.
    let mut stored = HashSet::new();
    let mut before = 0;
    loop {
        let (page, more) = sender.fetch(1, before, 200).await.unwrap();
        stored.extend(page.iter().map(|m| m.id));
        match page.iter().map(|m| m.id).min() {
            Some(oldest) if more => before = oldest,
            _ => break,
        }
    }
    assert_eq!(stored, all.iter().copied().collect::<HashSet<_>>());

    // And the device catches up: what the live path missed is in its inbox.
    let (_again, mut rx2) = fleet.device(1, 2, 20).await;
    let mut got = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !all.iter().all(|id| got.contains(id)) {
        match tokio::time::timeout_at(deadline, rx2.recv()).await {
            Ok(Some(Delivery::Message(m))) => {
                got.insert(m.id);
            }
            Ok(Some(_)) => {}
            _ => panic!(
                "inbox drain ended with {} of {} messages",
                got.len(),
                all.len()
            ),
        }
    }
    fleet.shutdown().await;
}

/// The node-id lease under Redis faults: it rides out a failover of the
/// master that holds its key, takes its key back when a failover lost it,
/// and stops ids for good when another process holds the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_id_lease_survives_a_failover_and_a_lost_key() {
    common::logs();
    let redis = RedisCluster::up(1);
    let client = connect(&RedisConfig {
        nodes: redis.nodes.clone(),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    // The production TTL: renewals every 2.5 s, ids good for 10 s after one.
    let lease = NodeLease::acquire(&client, Duration::from_secs(15))
        .await
        .unwrap();
    let ids = IdGenerator::try_new(lease.node, Duration::ZERO)
        .unwrap()
        .with_lease(lease.gate());
    ids.next_id().await.expect("an id under a fresh lease");
    let key = lease.key();
    let slot = redis.keyslot(&key);
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);

    // 1. Fail over the master that holds the key; sample the gate throughout.
    let replica = redis.replica_serving(slot);
    let renewed_before = count(&lease.stats().renewed);
    let gate = lease.gate();
    let mut closed_samples = 0;
    let sample = async {
        let deadline = tokio::time::Instant::now() + WAIT * 6;
        while tokio::time::Instant::now() < deadline {
            if !gate.is_open() {
                closed_samples += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = redis.fail_over(slot, &replica) => {}
        _ = sample => panic!("the failover did not finish"),
    }
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while count(&lease.stats().renewed) <= renewed_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal on the new master"
        );
        if !gate.is_open() {
            closed_samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "lease failover: {} renewals failed and were retried, gate closed in {closed_samples} samples",
        count(&lease.stats().failed)
    );
    // Whether ids paused is a matter of timing (a failover slower than the
    // 7.5 s margin would close the gate), so it is reported, not asserted;
    // what must hold is that ids flow again once Redis has a master.
    ids.next_id().await.expect("ids after the failover");

    // 2. The key vanishes (a failover that lost the write): taken back.
    let (_, owner) = redis.owner_of(slot);
    assert_eq!(redis.cli(&owner, &["del", &key]), "1");
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while count(&lease.stats().reclaimed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lost key not taken back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(redis.cli(&owner, &["get", &key]), "", "the key is back");
    ids.next_id().await.expect("ids after the key came back");

    // 3. Another process holds the key: no more ids, ever.
    assert_eq!(redis.cli(&owner, &["set", &key, "someone-else"]), "OK");
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while gate.is_open() {
        assert!(tokio::time::Instant::now() < deadline, "gate never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ids.next_id().await, Err(IdError::LeaseLost));
    assert_eq!(redis.cli(&owner, &["get", &key]), "someone-else");
    drop(lease);
}
