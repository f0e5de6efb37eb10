//! The behaviour every [`Store`] backend must show. Each backend's tests call
//! [`run_all`] against a fresh, empty store (the embedded one always; the
//! ScyllaDB one when `TIERCAST_SCYLLA_NODES` names a cluster).
//!
//! Panics (with what differed) on the first broken rule: it is test code,
//! shipped in the library so every backend runs the same rules.

use bytes::Bytes;
use tiercast_schemas::envelope::Tier;
use tiercast_schemas::wire::Message;

use super::{
    ClientRecord, Conversation, ConversationState, Dedupe, Device, NewMessage, Page, Persisted,
    ReadMark, Registered, Registration, SendContext, Store, StoreError,
};

pub async fn run_all(store: &dyn Store) {
    conversations_and_members(store).await;
    device_registry(store).await;
    batched_registrations(store).await;
    messages_history_and_paging(store).await;
    history_across_days(store).await;
    inbox_and_acks(store).await;
    idempotent_insert(store).await;
    since_pages_forward(store).await;
    read_markers(store).await;
    device_expiry(store).await;
    dedupe_expiry(store).await;
    send_contexts(store).await;
}

/// Device `client` of `user`.
fn d(user: u64, client: u64) -> Device {
    Device { user, client }
}

fn key(scope: &str, client_msg_id: u64, now_ms: u64) -> Option<Dedupe> {
    Some(Dedupe {
        scope: scope.to_owned(),
        client_msg_id,
        now_ms,
        ttl_ms: 1_000,
    })
}

fn conv(id: u64) -> Conversation {
    Conversation {
        id,
        name: format!("c{id}"),
        created_ms: 1,
        pinned_tier: None,
        tier: Tier::Direct,
        member_count: 0,
    }
}

fn message(conv: u64, id: u64, sender: u64, body: &str) -> Message {
    Message {
        id,
        conversation: conv,
        sender,
        sender_client: sender * 10,
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

fn all() -> Page {
    Page {
        before: 0,
        after: 0,
        limit: 10_000,
    }
}

/// Stores `n` messages in conversation `conv` (created if missing) and
/// returns their ids, oldest first.
pub async fn seed_history(store: &dyn Store, conv_id: u64, n: u64) -> Vec<u64> {
    match store.create_conversation(&conv(conv_id)).await {
        Ok(()) | Err(StoreError::ConversationExists(_)) => {}
        Err(e) => panic!("create: {e}"),
    }
    let mut ids = Vec::new();
    for i in 0..n {
        let id = 1_000 + i * 3;
        let m = NewMessage {
            message: message(conv_id, id, 7, &format!("m{i}")),
            dedupe: None,
            inbox: vec![],
        };
        assert_eq!(store.insert_message(&m).await.unwrap(), Persisted::Stored);
        ids.push(id);
    }
    ids
}

/// Messages spread over several days, with empty days between them (a
/// backend that buckets by day, as the ScyllaDB one does, must walk the
/// buckets both ways and skip the empty ones): history pages backwards,
/// `since` pages forwards and `message` finds each, across the gaps.
async fn history_across_days(store: &dyn Store) {
    const DAY: u64 = 86_400_000;
    let t0 = tiercast_schemas::ids::EPOCH_MS + 400 * DAY + 3_600_000;
    let mut c = conv(9070);
    c.created_ms = t0 - DAY;
    store.create_conversation(&c).await.unwrap();
    // Days 0, 1, 4 and 9 after t0 (2, 3 and 5-8 are empty), three each.
    let mut ids = Vec::new();
    for day in [0u64, 1, 4, 9] {
        for k in 0..3u64 {
            let id = crate::snowflake::compose(t0 + day * DAY + k * 60_000, 3, k as u16);
            let m = NewMessage {
                message: message(9070, id, 7, &format!("d{day}k{k}")),
                dedupe: None,
                inbox: vec![],
            };
            assert_eq!(store.insert_message(&m).await.unwrap(), Persisted::Stored);
            ids.push(id);
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    let mut seen = Vec::new();
    let mut before = 0;
    for _ in 0..100 {
        let page = store
            .history(
                9070,
                Page {
                    before,
                    after: 0,
                    limit: 2,
                },
            )
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        before = last.id;
        seen.extend(page.iter().map(|m| m.id));
    }
    assert_eq!(seen, newest_first, "history walks every day, newest first");
    let mut forward = Vec::new();
    let mut after = 0;
    for _ in 0..100 {
        let page = store.since(9070, after, 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.id;
        forward.extend(page.iter().map(|m| m.id));
    }
    assert_eq!(forward, ids, "since walks every day, oldest first");
    let from_day_3 = store.since(9070, ids[5], 100).await.unwrap();
    assert_eq!(
        from_day_3.iter().map(|m| m.id).collect::<Vec<_>>(),
        ids[6..].to_vec(),
        "since from the last message of day 1 skips the empty days"
    );
    for &id in &ids {
        assert_eq!(
            store.message(9070, id).await.unwrap().map(|m| m.id),
            Some(id)
        );
    }
}

async fn conversations_and_members(store: &dyn Store) {
    store.create_conversation(&conv(1)).await.unwrap();
    assert!(matches!(
        store.create_conversation(&conv(1)).await,
        Err(StoreError::ConversationExists(1))
    ));
    assert_eq!(store.conversation(1).await.unwrap(), Some(conv(1)));
    assert!(
        !store.remove_member(1, 42).await.unwrap(),
        "removing a non-member changes nothing"
    );
    assert_eq!(store.conversation(2).await.unwrap(), None);
    assert!(matches!(
        store.add_members(2, &[1]).await,
        Err(StoreError::NoSuchConversation(2))
    ));

    assert_eq!(
        store.add_members(1, &[10, 11, 12]).await.unwrap(),
        vec![10, 11, 12]
    );
    assert_eq!(store.add_members(1, &[11, 13]).await.unwrap(), vec![13]);
    assert!(store.remove_member(1, 13).await.unwrap());
    assert_eq!(store.members(1).await.unwrap(), vec![10, 11, 12]);
    assert_eq!(
        store.conversation(1).await.unwrap().unwrap().member_count,
        3
    );
    assert!(store.is_member(1, 11).await.unwrap());
    assert!(store.remove_member(1, 11).await.unwrap());
    assert!(!store.remove_member(1, 11).await.unwrap());
    assert!(!store.is_member(1, 11).await.unwrap());
    assert_eq!(store.members(1).await.unwrap(), vec![10, 12]);
    assert_eq!(
        store.conversation(1).await.unwrap().unwrap().member_count,
        2
    );
    // Pages of the member list, ascending, after a cursor.
    store.add_members(1, &[14, 15, 16]).await.unwrap();
    assert_eq!(store.members_page(1, 0, 2).await.unwrap(), vec![10, 12]);
    assert_eq!(store.members_page(1, 12, 2).await.unwrap(), vec![14, 15]);
    assert_eq!(store.members_page(1, 15, 10).await.unwrap(), vec![16]);
    assert!(store.members_page(1, 16, 10).await.unwrap().is_empty());
    assert!(store.members_page(2, 0, 10).await.unwrap().is_empty());
    for u in [14, 15, 16] {
        store.remove_member(1, u).await.unwrap();
    }

    store.create_conversation(&conv(3)).await.unwrap();
    store.add_members(3, &[10]).await.unwrap();
    assert_eq!(store.conversations_of(10).await.unwrap(), vec![1, 3]);
    assert_eq!(store.conversations_of(11).await.unwrap(), Vec::<u64>::new());

    store.set_pinned_tier(3, Some(Tier::Sharded)).await.unwrap();
    assert_eq!(
        store.conversation(3).await.unwrap().unwrap().pinned_tier,
        Some(Tier::Sharded)
    );
    assert!(matches!(
        store.set_pinned_tier(99, None).await,
        Err(StoreError::NoSuchConversation(99))
    ));
}

async fn device_registry(store: &dyn Store) {
    let dev = |client_id, seen| ClientRecord {
        client_id,
        user: 500,
        device: format!("d{client_id}"),
        last_seen_ms: seen,
    };
    assert_eq!(
        store.register_client(&dev(1, 10), 3, false).await.unwrap(),
        Registered::New
    );
    assert_eq!(
        store.register_client(&dev(2, 20), 3, false).await.unwrap(),
        Registered::New
    );
    assert_eq!(
        store.register_client(&dev(3, 30), 3, false).await.unwrap(),
        Registered::New
    );
    assert_eq!(
        store.register_client(&dev(1, 40), 3, false).await.unwrap(),
        Registered::Known
    );
    assert!(matches!(
        store.register_client(&dev(4, 50), 3, false).await,
        Err(StoreError::TooManyDevices { user: 500, max: 3 })
    ));
    // A refused fourth device changed nothing.
    let ids: Vec<u64> = store
        .clients_of(500)
        .await
        .unwrap()
        .iter()
        .map(|c| c.client_id)
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);

    // With eviction, the least recently seen (2, seen at 20) makes room, and
    // its pending inbox goes with it.
    store.create_conversation(&conv(600)).await.unwrap();
    let m = NewMessage {
        message: message(600, 77, 9, "x"),
        dedupe: None,
        inbox: vec![d(500, 2), d(500, 3)],
    };
    store.insert_message(&m).await.unwrap();
    assert_eq!(
        store.register_client(&dev(4, 60), 3, true).await.unwrap(),
        Registered::Evicted(2)
    );
    let mine = vec![d(500, 1), d(500, 3), d(500, 4)];
    assert_eq!(store.devices_of(&[500]).await.unwrap(), mine);
    assert!(store.inbox(d(500, 2), 0, 10).await.unwrap().is_empty());
    assert_eq!(store.inbox(d(500, 3), 0, 10).await.unwrap().len(), 1);
    assert_eq!(store.devices_of(&[500, 501]).await.unwrap(), mine);
}

/// A batch of registrations gives each entry what a lone call would, in
/// order (an entry sees the ones before it); a returning device that is not
/// the user's writes nothing; listings come one per user, in order.
async fn batched_registrations(store: &dyn Store) {
    let dev = |user, client_id, seen| ClientRecord {
        client_id,
        user,
        device: format!("b{client_id}"),
        last_seen_ms: seen,
    };
    let new = |user, client, seen| Registration {
        client: dev(user, client, seen),
        returning: false,
    };
    let back = |user, client, seen| Registration {
        client: dev(user, client, seen),
        returning: true,
    };
    assert!(
        store
            .register_clients(&[], 2, false)
            .await
            .unwrap()
            .is_empty()
    );
    let out = store
        .register_clients(
            &[
                new(700, 1, 10),
                back(700, 1, 11),
                // Another user's device id, named as one's own: refused.
                back(701, 1, 12),
                new(701, 5, 13),
                new(700, 2, 14),
                new(700, 3, 15),
                back(702, 9, 16),
                back(701, 5, 17),
            ],
            2,
            false,
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 8);
    assert_eq!(out[0].as_ref().unwrap(), &Registered::New);
    assert_eq!(out[1].as_ref().unwrap(), &Registered::Known);
    assert!(matches!(
        out[2],
        Err(StoreError::UnknownDevice {
            user: 701,
            client: 1
        })
    ));
    assert_eq!(out[3].as_ref().unwrap(), &Registered::New);
    assert_eq!(out[4].as_ref().unwrap(), &Registered::New);
    assert!(matches!(
        out[5],
        Err(StoreError::TooManyDevices { user: 700, max: 2 })
    ));
    assert!(matches!(
        out[6],
        Err(StoreError::UnknownDevice {
            user: 702,
            client: 9
        })
    ));
    assert_eq!(out[7].as_ref().unwrap(), &Registered::Known);
    // What is stored: the refused entries wrote nothing, the returning ones
    // refreshed their last-seen time.
    let seen = |user| async move {
        let mut v: Vec<(u64, u64)> = store
            .clients_of(user)
            .await
            .unwrap()
            .iter()
            .map(|c| (c.client_id, c.last_seen_ms))
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(seen(700).await, vec![(1, 11), (2, 14)]);
    assert_eq!(seen(701).await, vec![(5, 17)]);
    assert!(seen(702).await.is_empty());
    // With eviction, inside one batch: the third device of 700 evicts the
    // least recently seen (2 at 14 is newer than 1 at 11).
    let out = store
        .register_clients(&[back(700, 2, 20), new(700, 3, 21)], 2, true)
        .await
        .unwrap();
    assert_eq!(out[0].as_ref().unwrap(), &Registered::Known);
    assert_eq!(out[1].as_ref().unwrap(), &Registered::Evicted(1));
    assert_eq!(seen(700).await, vec![(2, 20), (3, 21)]);

    store.create_conversation(&conv(710)).await.unwrap();
    store.create_conversation(&conv(711)).await.unwrap();
    store.add_members(710, &[700, 701]).await.unwrap();
    store.add_members(711, &[700]).await.unwrap();
    let mut lists = store
        .conversations_of_users(&[701, 702, 700])
        .await
        .unwrap();
    for l in &mut lists {
        l.sort_unstable();
    }
    assert_eq!(lists, vec![vec![710], vec![], vec![710, 711]]);
    assert!(store.conversations_of_users(&[]).await.unwrap().is_empty());
}

async fn messages_history_and_paging(store: &dyn Store) {
    let ids = seed_history(store, 20, 25).await;
    let everything = store.history(20, all()).await.unwrap();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(
        everything.iter().map(|m| m.id).collect::<Vec<_>>(),
        newest_first
    );
    assert_eq!(everything.last().unwrap().body, Bytes::from_static(b"m0"));

    // Paging backwards by `before` visits every message once.
    let mut seen = Vec::new();
    let mut before = 0;
    loop {
        let page = store
            .history(
                20,
                Page {
                    before,
                    after: 0,
                    limit: 7,
                },
            )
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().unwrap().id;
        seen.extend(page.iter().map(|m| m.id));
    }
    assert_eq!(seen, newest_first);

    // `after` bounds from below, exclusive.
    let tail = store
        .history(
            20,
            Page {
                before: 0,
                after: ids[20],
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        tail.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![ids[24], ids[23], ids[22], ids[21]]
    );
    assert!(
        store
            .history(
                20,
                Page {
                    before: 5,
                    after: 5,
                    limit: 5
                }
            )
            .await
            .unwrap()
            .is_empty()
    );

    let one = store.message(20, ids[3]).await.unwrap().unwrap();
    assert_eq!(one.body, Bytes::from_static(b"m3"));
    assert_eq!(one.sender, 7);
    assert_eq!(store.message(20, 1).await.unwrap(), None);
    assert_eq!(store.message(21, ids[3]).await.unwrap(), None);
}

async fn inbox_and_acks(store: &dyn Store) {
    store.create_conversation(&conv(30)).await.unwrap();
    for id in [300, 301, 302] {
        let m = NewMessage {
            message: message(30, id, 1, "i"),
            dedupe: None,
            inbox: vec![d(7, 71), d(7, 72)],
        };
        store.insert_message(&m).await.unwrap();
    }
    let pending: Vec<u64> = store
        .inbox(d(7, 71), 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(pending, vec![300, 301, 302]);
    assert_eq!(store.inbox(d(7, 71), 0, 2).await.unwrap().len(), 2);
    let rest: Vec<u64> = store
        .inbox(d(7, 71), 301, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(rest, vec![302]);
    // Several inboxes in one call: each as its own call would give it (a
    // device named with another's user reads nothing).
    let ids = |pages: Vec<Vec<Message>>| -> Vec<Vec<u64>> {
        pages
            .iter()
            .map(|p| p.iter().map(|m| m.id).collect())
            .collect()
    };
    assert_eq!(
        ids(store
            .inboxes(&[(d(7, 72), 300), (d(8, 71), 0), (d(7, 71), 0)], 2)
            .await
            .unwrap()),
        vec![vec![301, 302], vec![], vec![300, 301]]
    );
    assert!(store.inboxes(&[], 10).await.unwrap().is_empty());
    assert_eq!(store.ack(d(7, 71), &[300, 302, 999]).await.unwrap(), 2);
    assert_eq!(store.ack(d(7, 71), &[300]).await.unwrap(), 0);
    let pending: Vec<u64> = store
        .inbox(d(7, 71), 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(pending, vec![301]);
    // Another client's inbox is untouched.
    assert_eq!(store.inbox(d(7, 72), 0, 10).await.unwrap().len(), 3);
    // The same device id under another user is another (empty) inbox, and
    // acking through it removes nothing.
    assert!(store.inbox(d(8, 72), 0, 10).await.unwrap().is_empty());
    assert_eq!(store.ack(d(8, 72), &[300, 301, 302]).await.unwrap(), 0);
    assert_eq!(store.inbox(d(7, 72), 0, 10).await.unwrap().len(), 3);
    // Acking removes the pending row, never the message.
    assert!(store.message(30, 300).await.unwrap().is_some());
}

async fn idempotent_insert(store: &dyn Store) {
    store.create_conversation(&conv(40)).await.unwrap();
    let first = NewMessage {
        message: message(40, 400, 2, "once"),
        dedupe: key("d:2:20", 5, 100),
        inbox: vec![d(2, 81)],
    };
    assert_eq!(
        store.insert_message(&first).await.unwrap(),
        Persisted::Stored
    );
    let retry = NewMessage {
        message: message(40, 401, 2, "once"),
        dedupe: key("d:2:20", 5, 200),
        inbox: vec![d(2, 81)],
    };
    assert_eq!(
        store.insert_message(&retry).await.unwrap(),
        Persisted::Duplicate(400)
    );
    assert_eq!(store.history(40, all()).await.unwrap().len(), 1);
    assert_eq!(store.inbox(d(2, 81), 0, 10).await.unwrap().len(), 1);
    // The same client_msg_id from another sender is another message.
    let other = NewMessage {
        message: Message {
            sender_client: 999,
            ..message(40, 402, 2, "other")
        },
        dedupe: key("d:2:999", 5, 200),
        inbox: vec![],
    };
    assert_eq!(
        store.insert_message(&other).await.unwrap(),
        Persisted::Stored
    );
    // ... and so it is from the same sender in another conversation.
    store.create_conversation(&conv(41)).await.unwrap();
    let elsewhere = NewMessage {
        message: message(41, 403, 2, "elsewhere"),
        dedupe: key("d:2:20", 5, 200),
        inbox: vec![],
    };
    assert_eq!(
        store.insert_message(&elsewhere).await.unwrap(),
        Persisted::Stored
    );
    assert_eq!(store.history(41, all()).await.unwrap().len(), 1);
}

async fn since_pages_forward(store: &dyn Store) {
    let ids = seed_history(store, 70, 7).await;
    let ms = |v: Vec<Message>| v.iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ms(store.since(70, 0, 3).await.unwrap()), ids[..3].to_vec());
    assert_eq!(
        ms(store.since(70, ids[2], 3).await.unwrap()),
        ids[3..6].to_vec()
    );
    assert_eq!(
        ms(store.since(70, ids[5], 3).await.unwrap()),
        ids[6..].to_vec()
    );
    assert!(store.since(70, ids[6], 3).await.unwrap().is_empty());
    assert!(store.since(70, u64::MAX, 3).await.unwrap().is_empty());
    assert!(store.since(71, 0, 3).await.unwrap().is_empty());

    // Several pages in one call: each as its own call would give it.
    let pages = store
        .since_many(&[(70, ids[2]), (71, 0), (70, 0), (70, u64::MAX)], 3)
        .await
        .unwrap();
    assert_eq!(
        pages.into_iter().map(ms).collect::<Vec<_>>(),
        vec![ids[3..6].to_vec(), vec![], ids[..3].to_vec(), vec![]]
    );
    assert!(store.since_many(&[], 3).await.unwrap().is_empty());

    // What a Sync reads of each conversation, in one call: the
    // conversation, the user's membership, the newest id.
    store.create_conversation(&conv(72)).await.unwrap();
    store.add_members(70, &[901]).await.unwrap();
    store.add_members(72, &[902]).await.unwrap();
    let states = store.conversation_states(901, &[72, 70, 73]).await.unwrap();
    assert_eq!(
        states,
        vec![
            ConversationState {
                conversation: Some(store.conversation(72).await.unwrap().unwrap()),
                member: false,
                latest_id: 0,
            },
            ConversationState {
                conversation: Some(store.conversation(70).await.unwrap().unwrap()),
                member: true,
                latest_id: ids[6],
            },
            ConversationState {
                conversation: None,
                member: false,
                latest_id: 0,
            },
        ]
    );
    assert!(
        store
            .conversation_states(901, &[])
            .await
            .unwrap()
            .is_empty()
    );
}

async fn read_markers(store: &dyn Store) {
    let mark = |conversation, message_id| ReadMark {
        user: 800,
        conversation,
        message_id,
    };
    assert_eq!(store.read_marks(800, &[1, 2]).await.unwrap(), vec![]);
    store
        .set_read_marks(&[mark(1, 50), mark(2, 7)])
        .await
        .unwrap();
    store.set_read_marks(&[mark(1, 40)]).await.unwrap();
    assert_eq!(
        store.read_marks(800, &[1, 2, 3]).await.unwrap(),
        vec![(1, 50), (2, 7)],
        "a marker never moves back"
    );
    store
        .set_read_marks(&[mark(2, 9), mark(2, 8)])
        .await
        .unwrap();
    assert_eq!(store.read_marks(800, &[2]).await.unwrap(), vec![(2, 9)]);
    assert_eq!(
        store.read_marks(801, &[1, 2]).await.unwrap(),
        vec![],
        "markers are per user"
    );
}

async fn device_expiry(store: &dyn Store) {
    let dev = |client_id, seen| ClientRecord {
        client_id,
        user: 900,
        device: format!("d{client_id}"),
        last_seen_ms: seen,
    };
    store.register_client(&dev(91, 1), 3, false).await.unwrap();
    store.register_client(&dev(92, 2), 3, false).await.unwrap();
    store.register_client(&dev(93, 2), 3, false).await.unwrap();
    store.create_conversation(&conv(90)).await.unwrap();
    store.add_members(90, &[900]).await.unwrap();
    let m = NewMessage {
        message: message(90, 9_000, 900, "pending"),
        dedupe: None,
        inbox: vec![d(900, 91), d(900, 92), d(900, 93)],
    };
    store.insert_message(&m).await.unwrap();
    // 93 was seen just now; 91 and 92 not since 1 and 2.
    store
        .touch_clients(&[(900, 93), (900, 999)], 5)
        .await
        .unwrap();
    let mut gone: Vec<u64> = store
        .expire_clients(3, 100)
        .await
        .unwrap()
        .iter()
        .map(|c| c.client_id)
        .collect();
    gone.sort_unstable();
    assert_eq!(gone, vec![91, 92]);
    let left: Vec<u64> = store
        .clients_of(900)
        .await
        .unwrap()
        .iter()
        .map(|c| c.client_id)
        .collect();
    assert_eq!(left, vec![93]);
    assert!(store.inbox(d(900, 91), 0, 10).await.unwrap().is_empty());
    assert!(store.inbox(d(900, 92), 0, 10).await.unwrap().is_empty());
    assert_eq!(store.inbox(d(900, 93), 0, 10).await.unwrap().len(), 1);
    assert_eq!(
        store.message(90, 9_000).await.unwrap().map(|m| m.id),
        Some(9_000),
        "expiry removes devices and their inbox rows, never messages"
    );
    assert!(store.expire_clients(3, 100).await.unwrap().is_empty());
}

/// An idempotency key holds for its TTL and no longer: a retry after it is
/// a new message. The sweep removes expired keys (backends whose keys expire
/// by themselves report 0).
async fn dedupe_expiry(store: &dyn Store) {
    store.create_conversation(&conv(95)).await.unwrap();
    let at = |id: u64, now_ms: u64| NewMessage {
        message: message(95, id, 3, "p"),
        dedupe: key("p:backend", 9, now_ms),
        inbox: vec![],
    };
    assert_eq!(
        store.insert_message(&at(950, 10_000)).await.unwrap(),
        Persisted::Stored
    );
    assert_eq!(
        store.insert_message(&at(951, 10_999)).await.unwrap(),
        Persisted::Duplicate(950)
    );
    // The key was written at 10,000 with a 1,000 ms TTL.
    assert_eq!(
        store.insert_message(&at(952, 11_000)).await.unwrap(),
        Persisted::Stored
    );
    assert_eq!(
        store.insert_message(&at(953, 11_500)).await.unwrap(),
        Persisted::Duplicate(952)
    );
    // Whatever a sweep removes, an expired key never answers.
    store.expire_dedupe(20_000, 1_000).await.unwrap();
    assert_eq!(
        store.insert_message(&at(954, 20_000)).await.unwrap(),
        Persisted::Stored
    );
    assert_eq!(store.history(95, all()).await.unwrap().len(), 3);
}

/// A send's reads in one call give what the single reads give: the
/// membership (a backend sender, user 0, always may send), the
/// conversation, and in tier 1 the members and every device of theirs;
/// nothing past the membership for a sender who may not send.
async fn send_contexts(store: &dyn Store) {
    let dev = |user, client_id| ClientRecord {
        client_id,
        user,
        device: format!("d{client_id}"),
        last_seen_ms: 1,
    };
    store.create_conversation(&conv(9500)).await.unwrap();
    store.add_members(9500, &[9501, 9502, 9503]).await.unwrap();
    for (user, client) in [(9501, 1), (9501, 2), (9502, 3), (9504, 4)] {
        store
            .register_client(&dev(user, client), 3, false)
            .await
            .unwrap();
    }
    let expected = |members: Vec<u64>, devices: Vec<Device>| SendContext {
        allowed: true,
        conversation: None,
        members,
        devices,
    };
    for sender in [9501, 9503, 0] {
        let ctx = store.send_context(9500, sender).await.unwrap();
        assert_eq!(
            ctx.conversation,
            store.conversation(9500).await.unwrap(),
            "sender {sender}"
        );
        assert_eq!(
            SendContext {
                conversation: None,
                ..ctx.clone()
            },
            expected(
                vec![9501, 9502, 9503],
                vec![d(9501, 1), d(9501, 2), d(9502, 3)]
            ),
            "sender {sender}"
        );
        assert_eq!(ctx.members, store.members(9500).await.unwrap());
        assert_eq!(ctx.devices, store.devices_of(&ctx.members).await.unwrap());
    }
    // A non-member learns nothing, not even whether the conversation
    // exists.
    for (conv_id, sender) in [(9500, 9504), (9599, 9501)] {
        assert_eq!(
            store.send_context(conv_id, sender).await.unwrap(),
            SendContext::default(),
            "conversation {conv_id}, sender {sender}"
        );
    }
    // The backend may name any conversation; an unknown one reads as such.
    assert_eq!(
        store.send_context(9599, 0).await.unwrap(),
        expected(Vec::new(), Vec::new())
    );
    // A removal stops both the sending and the pending rows.
    assert!(store.remove_member(9500, 9501).await.unwrap());
    assert!(!store.send_context(9500, 9501).await.unwrap().allowed);
    let ctx = store.send_context(9500, 9502).await.unwrap();
    assert_eq!(
        (ctx.members, ctx.devices),
        (vec![9502, 9503], vec![d(9502, 3)])
    );
    // Tiers 2 and 3 never read their member lists on the write path.
    for tier in [Tier::Sharded, Tier::IdOnly] {
        store.set_tier(9500, tier).await.unwrap();
        let ctx = store.send_context(9500, 9502).await.unwrap();
        assert!(ctx.allowed);
        assert_eq!(ctx.conversation.map(|c| c.tier), Some(tier));
        assert!(ctx.members.is_empty() && ctx.devices.is_empty(), "{tier:?}");
    }
}
