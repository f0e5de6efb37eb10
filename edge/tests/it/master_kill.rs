//! A Redis master is SIGKILLed (not a polite `CLUSTER FAILOVER`) while a
//! backend publishes to a chat (tier 1), a group (tier 2) and a channel
//! (tier 3) served by two edges, and its replica takes over. Publishes to
//! the dead master's slots fail until then (the engine retries them), and
//! the edges' subscriptions on it are gone until they resubscribe; every
//! device stays connected the whole time, and still ends with every
//! message: the edges repair the gap from the store when their
//! subscriptions are whole again (inbox re-drain, tier-2 resync, tier-3
//! latest id).

use tiercast_testkit as common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{Fleet, RedisCluster};
use common::{Device, WAIT};
use tiercast_engine::Outgoing;
use tiercast_engine::backplane::node_channel;
use tiercast_schemas::envelope::Tier;

const USERS: u64 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_loses_nothing_for_devices_that_stay_connected() {
    let fleet = Fleet::start(RedisCluster::up(1), 2, &[]).await;
    let engine = fleet.nodes[0].engine.clone();
    let users: Vec<u64> = (1..=USERS).collect();
    let convs: [(u64, &[u64], Tier); 3] = [
        (1, &users[..4], Tier::Direct),
        (2, &users[..8], Tier::Sharded),
        (3, &users[..], Tier::IdOnly),
    ];
    for (id, members, tier) in convs {
        engine
            .create_conversation(Some(id), format!("c{id}"), members)
            .await
            .unwrap();
        engine.pin_tier(id, Some(tier)).await.unwrap();
    }
    let mut devices = Vec::new();
    for &u in &users {
        let order = if u % 2 == 0 { [0, 1] } else { [1, 0] };
        devices.push((
            u,
            Device::start(fleet.session_config(&order, u, u * 10).await),
        ));
    }
    for (_, d) in &devices {
        d.wait_until("connected", WAIT, |l| l.connects >= 1).await;
    }

    // The master serving edge 0's node channel for the group: killing it
    // cuts tier-2 traffic to edge 0 (and whatever user channels it holds).
    // Conversation 2 travels on node channel 2 % engine.node_channels (8).
    let channel = node_channel(fleet.nodes[0].node_id(), 2);
    let (victim_id, victim) = fleet.redis.owner_of(fleet.redis.keyslot(&channel));
    let port = victim.rsplit_once(':').unwrap().1.to_owned();
    let pid = std::fs::read_to_string(format!("{}/{port}/redis.pid", fleet.redis.dir))
        .expect("the master's pid file")
        .trim()
        .to_owned();

    // Open loop: a send every 25 ms for 8 s, round robin over the three
    // conversations; the master dies at 2 s.
    let sent: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let mut tasks = Vec::new();
    let start = Instant::now();
    let mut killed_at = None;
    for i in 0..320u64 {
        tokio::time::sleep_until((start + Duration::from_millis(25 * i)).into()).await;
        if i == 80 {
            let ok = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status()
                .unwrap()
                .success();
            assert!(ok, "SIGKILL {victim}");
            killed_at = Some(Instant::now());
        }
        let conv = 1 + i % 3;
        let engine = engine.clone();
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let out = Outgoing::system(conv, Bytes::from(format!("m{i}")));
            // Refused sends (the node-id lease paused) are not stored: the
            // backend retries them, as a backend would.
            for _ in 0..100 {
                match engine.send(out.clone()).await {
                    Ok(r) => {
                        sent.lock().unwrap().push((conv, r.message_id));
                        return;
                    }
                    Err(e) => {
                        eprintln!("send refused for now: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            panic!("a send was refused for 20 s");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let killed_at = killed_at.unwrap();
    let sent = sent.lock().unwrap().clone();
    let ids = |conv: u64| -> HashSet<u64> {
        sent.iter()
            .filter(|(c, _)| *c == conv)
            .map(|(_, id)| *id)
            .collect()
    };
    let newest_broadcast = *ids(3).iter().max().unwrap();

    // Every device ends with every message of its conversations (tier 3:
    // notified of the newest, which covers the earlier ones), without
    // reconnecting.
    for (u, d) in &devices {
        let want1 = if *u <= 4 { ids(1) } else { HashSet::new() };
        let want2 = if *u <= 8 { ids(2) } else { HashSet::new() };
        d.wait_until("every message", WAIT * 3, |l| {
            want1.is_subset(&l.ids(1))
                && want2.is_subset(&l.ids(2))
                && l.notifies
                    .iter()
                    .any(|&(c, id)| c == 3 && id >= newest_broadcast)
        })
        .await;
    }
    let healed_after = killed_at.elapsed();
    for (u, d) in &devices {
        assert_eq!(
            d.log.lock().unwrap().connects,
            1,
            "user {u}'s device stayed connected"
        );
    }
    let repairs: u64 = fleet
        .nodes
        .iter()
        .map(|n| common::metric(&n.metrics(), "tiercast_edge_gap_repairs_total"))
        .sum();
    assert!(repairs >= 1, "the edges repaired the gap");
    let retries = common::metric(
        &fleet.nodes[0].metrics(),
        "tiercast_engine_publish_retries_total",
    );
    eprintln!(
        "master {victim_id} ({victim}) SIGKILLed: {} messages sent (tiers 1/2/3: {}/{}/{}), every device has every one, none reconnected; {repairs} gap repairs, {retries} publish retries; all delivered {:.1} s after the kill",
        sent.len(),
        ids(1).len(),
        ids(2).len(),
        ids(3).len(),
        healed_after.as_secs_f64()
    );
}
