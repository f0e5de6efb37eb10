//! A fixed number of tier-1 sends through the engine on an embedded store
//! (no timing): for counting the engine's instructions per send under
//! callgrind, which is exact where time on this machine is not.
//!
//! `sends SENDS [MEMBERS [CONCURRENT]]`: one conversation of MEMBERS
//! (default 4) users with one device each; SENDS messages, as a device's
//! sends reach `Engine::send`: the store's reads, the id, the durable
//! insert with a pending row per device, the publish on the in-process
//! backplane. CONCURRENT (default 1) senders, each a member's device
//! (several share one when CONCURRENT exceeds MEMBERS), send their share
//! one after another, so up to that many sends share a group commit. Run twice with different SENDS; the difference of the two
//! counts over the extra sends leaves out the setup.

use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::registry::Registry;
use tiercast_engine::backplane::{LocalBackplane, LocalRoutes};
use tiercast_engine::config::EngineConfig;
use tiercast_engine::metrics::{EngineMetrics, OpLabel};
use tiercast_engine::store::{ClientRecord, Conversation, EmbeddedStore, Store};
use tiercast_engine::{Engine, Outgoing, Sender};
use tiercast_schemas::envelope::Tier;

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let (sends, members, concurrent) = (arg(1, 100), arg(2, 4), arg(3, 1).max(1));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let commits = rt.block_on(async {
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("a store"));
        store
            .create_conversation(&Conversation {
                id: 1,
                name: "c".into(),
                created_ms: 1,
                pinned_tier: None,
                tier: Tier::Direct,
                member_count: 0,
            })
            .await
            .expect("the conversation");
        let users: Vec<u64> = (1..=members).collect();
        store.add_members(1, &users).await.expect("members");
        for &user in &users {
            let device = ClientRecord {
                client_id: user * 10,
                user,
                device: "d".into(),
                last_seen_ms: 1,
            };
            store
                .register_client(&device, 3, false)
                .await
                .expect("a device");
        }
        let mut registry = Registry::default();
        let metrics = EngineMetrics::register(&mut registry);
        let engine = Arc::new(
            Engine::new(
                EngineConfig::default(),
                store,
                Arc::new(LocalBackplane::new()),
                Arc::new(LocalRoutes::default()),
                metrics.clone(),
                None,
            )
            .expect("an engine"),
        );
        let body = Bytes::from(vec![b'x'; 128]);
        let senders: Vec<_> = (0..concurrent)
            .map(|k| {
                let (engine, body) = (engine.clone(), body.clone());
                let user = k % members + 1;
                tokio::spawn(async move {
                    // Sender k sends the k-th of every `concurrent` sends.
                    for i in (k..sends).step_by(concurrent as usize) {
                        engine
                            .send(Outgoing {
                                conversation: 1,
                                from: Sender::Device {
                                    user,
                                    client: user * 10,
                                },
                                client_msg_id: i + 1,
                                body: body.clone(),
                            })
                            .await
                            .expect("a send");
                    }
                })
            })
            .collect();
        for s in senders {
            s.await.expect("a sender");
        }
        // The store's group commits of the sends (counted from
        // `Engine::new`, after the setup's writes).
        metrics
            .store_batches
            .get_or_create(&OpLabel { op: "store_commit" })
            .get()
    });
    println!("sends {sends} members {members} concurrent {concurrent} commits {commits}");
}
