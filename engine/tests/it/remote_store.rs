//! The remote store (an engine service's store over HTTP) passes the same
//! conformance rules as the embedded one it fronts.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tiercast_engine::Engine;
use tiercast_engine::auth::TokenKeys;
use tiercast_engine::backplane::{LocalBackplane, LocalRoutes};
use tiercast_engine::config::EngineConfig;
use tiercast_engine::http::{self, HttpState};
use tiercast_engine::metrics::EngineMetrics;
use tiercast_engine::store::{EmbeddedStore, RemoteStore, Store, conformance};

const TOKEN_SECRET: &[u8] = b"remote-store-test-secret-0123456789";

fn internal_keys() -> TokenKeys {
    TokenKeys::with_keys(
        "internal",
        b"remote-store-internal-secret-0123456789",
        &[],
        3600,
    )
}

/// An engine on an embedded store in `dir`, serving the HTTP API (and
/// `/internal/store` with [`internal_keys`]) on a loopback port with
/// `limits`; returns its address, the stop signal, the server task and the
/// served engine's metrics (`internal_store_calls`: what edges asked of it).
async fn serve_engine(
    dir: &std::path::Path,
    limits: http::HttpLimits,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
    EngineMetrics,
) {
    let store = Arc::new(EmbeddedStore::open(&dir.join("t.redb")).unwrap());
    let mut registry = Registry::default();
    let metrics = EngineMetrics::register(&mut registry);
    let engine = Engine::new(
        EngineConfig::default(),
        store,
        Arc::new(LocalBackplane::new()),
        Arc::new(LocalRoutes::default()),
        metrics.clone(),
        None,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        listener,
        HttpState {
            engine: Arc::new(engine),
            keys: TokenKeys::new(TOKEN_SECRET),
            internal: Some(internal_keys()),
            registry: Arc::new(registry),
            limits,
            ready: http::ReadyProbe::new(tokio::sync::watch::channel(false).1),
        },
        async {
            let _ = stopped.await;
        },
    ));
    (addr, stop, server, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop, server, _) = serve_engine(dir.path(), Default::default()).await;
    let keys = TokenKeys::new(TOKEN_SECRET);
    let internal = internal_keys();

    let remote = RemoteStore::new(&format!("http://{addr}"), internal);
    conformance::run_all(&remote).await;

    // Without the internal secret: refused, even holding the key that
    // mints user and publisher tokens.
    use tiercast_engine::store::Store;
    let stranger = RemoteStore::new(&format!("http://{addr}"), keys.clone());
    assert!(stranger.conversation(1).await.is_err());
    // A publisher token: 401 with the JSON error (no internal key signed
    // it), the store untouched.
    let publisher = keys.mint_publisher("backend", tiercast_engine::auth::now_unix(), 60);
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/internal/store"))
        .bearer_auth(publisher)
        .json(&serde_json::json!({"op": "inbox", "device": {"user": 1, "client": 1}, "after": 0, "limit": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated", "{body}");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// The store API over HTTPS: an edge that trusts the engine service's CA
/// passes the conformance rules; one that does not, or that speaks plain
/// HTTP to it, gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_store_conforms_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("api.crt"), dir.path().join("api.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let internal = internal_keys();
    let limits = http::HttpLimits {
        tls_cert_path: Some(cert),
        tls_key_path: Some(key),
        ..Default::default()
    };
    limits.validate().unwrap();
    let (addr, stop, server, _) = serve_engine(dir.path(), limits).await;
    let pem = ck.cert.pem();
    let remote = RemoteStore::with_ca(
        &format!("https://{addr}"),
        internal.clone(),
        Some(pem.as_bytes()),
    )
    .unwrap();
    conformance::run_all(&remote).await;

    use tiercast_engine::store::Store;
    // Not trusting the certificate: refused by TLS.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let untrusting = RemoteStore::with_ca(
        &format!("https://{addr}"),
        internal.clone(),
        Some(other.cert.pem().as_bytes()),
    )
    .unwrap();
    assert!(untrusting.conversation(1).await.is_err());
    // Plain HTTP to the TLS port: no answer.
    let plain = RemoteStore::new(&format!("http://{addr}"), internal);
    assert!(plain.conversation(1).await.is_err());

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Creates tier-1 conversation `id` with `members`.
async fn conversation_with(remote: &RemoteStore, id: u64, members: &[u64]) {
    remote
        .create_conversation(&tiercast_engine::store::Conversation {
            id,
            name: format!("c{id}"),
            created_ms: 1,
            pinned_tier: None,
            tier: tiercast_schemas::envelope::Tier::Direct,
            member_count: 0,
        })
        .await
        .unwrap();
    remote.add_members(id, members).await.unwrap();
}

/// Registers each `(user, client)` as a device.
async fn register_devices(remote: &RemoteStore, devices: &[(u64, u64)]) {
    for &(user, client_id) in devices {
        let record = tiercast_engine::store::ClientRecord {
            client_id,
            user,
            device: "d".into(),
            last_seen_ms: 1,
        };
        remote.register_client(&record, 3, false).await.unwrap();
    }
}

/// An engine as an edge process has it: on the remote store `remote`,
/// with its own metrics.
fn engine_over(remote: Arc<RemoteStore>) -> (Engine, EngineMetrics) {
    let mut registry = Registry::default();
    let metrics = EngineMetrics::register(&mut registry);
    let engine = Engine::new(
        EngineConfig::default(),
        remote,
        Arc::new(LocalBackplane::new()),
        Arc::new(LocalRoutes::default()),
        metrics.clone(),
        None,
    )
    .unwrap();
    (engine, metrics)
}

/// A connect storm against a remote store: every device's registration
/// and conversation listing is answered as a lone call would be (a device
/// named by another user is refused), while the store calls are batched:
/// the counters show how many store calls carried how many connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_storm_is_batched_and_each_device_gets_its_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop, server, _) = serve_engine(dir.path(), Default::default()).await;
    let remote = Arc::new(RemoteStore::new(&format!("http://{addr}"), internal_keys()));
    let (edge, metrics) = engine_over(remote.clone());
    const USERS: u64 = 100;
    // New devices: 3 per user, all at once.
    let first =
        futures::future::join_all((1..=USERS).flat_map(|u| (0..3).map(move |_| u)).map(|u| {
            let edge = &edge;
            async move { (u, edge.register_device(u, 0, "phone").await) }
        }))
        .await;
    let mut devices = Vec::new();
    for (u, r) in first {
        devices.push((u, r.expect("a new device is registered")));
    }
    let mut ids: Vec<u64> = devices.iter().map(|d| d.1).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 300, "every device got its own id");
    // A fourth device of a user who has three: refused, alone.
    assert!(matches!(
        edge.register_device(1, 0, "fourth").await,
        Err(tiercast_engine::EngineError::TooManyDevices { user: 1, max: 3 })
    ));
    for u in 1..=USERS {
        conversation_with(&remote, 10_000 + u, &[u]).await;
    }
    // The storm: every device back at once, with 20 devices named by a
    // user they do not belong to, and each user's conversations listed.
    let returning = devices.iter().map(|&(u, c)| (u, c, true));
    let hostile = devices
        .iter()
        .take(20)
        .map(|&(u, c)| (u % USERS + 1, c, false));
    let storm: Vec<(u64, u64, bool)> = returning.chain(hostile).collect();
    // One message waits in the inbox of user 1's devices.
    remote
        .insert_message(&tiercast_engine::store::NewMessage {
            message: tiercast_schemas::wire::Message {
                id: 77,
                conversation: 10_001,
                sender: 2,
                sender_client: 0,
                body: bytes::Bytes::from_static(b"waiting"),
            },
            dedupe: None,
            inbox: devices
                .iter()
                .filter(|d| d.0 == 1)
                .map(|&(user, client)| tiercast_engine::store::Device { user, client })
                .collect(),
        })
        .await
        .unwrap();
    let (regs, lists, pages) = tokio::join!(
        futures::future::join_all(storm.iter().map(|&(u, c, own)| {
            let edge = &edge;
            async move { (own, c, edge.register_device(u, c, "phone").await) }
        })),
        futures::future::join_all((1..=USERS).map(|u| {
            let edge = &edge;
            async move { (u, edge.conversations_of(u).await) }
        })),
        futures::future::join_all(storm.iter().map(|&(u, c, _)| {
            let edge = &edge;
            async move {
                let device = tiercast_engine::store::Device { user: u, client: c };
                (device, edge.pending(device, 0).await)
            }
        })),
    );
    let owners: std::collections::HashMap<u64, u64> =
        devices.iter().map(|&(u, c)| (c, u)).collect();
    for (device, page) in pages {
        let ids: Vec<u64> = page.unwrap().iter().map(|m| m.id).collect();
        // Only user 1's own devices hold the message; a device named with
        // another user reads nothing.
        let expected = if device.user == 1 && owners[&device.client] == 1 {
            vec![77]
        } else {
            vec![]
        };
        assert_eq!(ids, expected, "{device:?}");
    }
    for (own, c, r) in regs {
        match (own, r) {
            (true, Ok(id)) => assert_eq!(id, c),
            (false, Err(tiercast_engine::EngineError::UnknownDevice(id))) => assert_eq!(id, c),
            (own, r) => panic!("device {c} (its own user: {own}) got {r:?}"),
        }
    }
    for (u, l) in lists {
        assert_eq!(l.unwrap(), vec![10_000 + u]);
    }
    let reg = metrics.batch_counters("register_clients");
    let list = metrics.batch_counters("conversations_of_users");
    // 300 new + 1 refused + 320 in the storm; 100 listings.
    assert_eq!(reg.calls.get(), 621);
    assert_eq!(list.calls.get(), 100);
    let inboxes = metrics.batch_counters("inboxes");
    assert_eq!(inboxes.calls.get(), 320);
    eprintln!(
        "register_clients: {} calls in {} store calls; conversations_of_users: {} in {}; inboxes: {} in {}",
        reg.calls.get(),
        reg.batches.get(),
        list.calls.get(),
        list.batches.get(),
        inboxes.calls.get(),
        inboxes.batches.get()
    );
    assert!(
        reg.batches.get() < reg.calls.get()
            && list.batches.get() < list.calls.get()
            && inboxes.batches.get() < inboxes.calls.get(),
        "calls that arrived together were batched"
    );
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A Sync over a remote store: every cursor gets what it did when each
/// conversation took its own calls (pages past the cursor, summaries, a
/// refusal for a conversation the user is not in), with two store calls
/// for all cursors plus one per 8 pages, counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_makes_a_few_store_calls_for_all_its_cursors() {
    use tiercast_schemas::wire::Cursor;
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop, server, _) = serve_engine(dir.path(), Default::default()).await;
    let remote = Arc::new(RemoteStore::new(&format!("http://{addr}"), internal_keys()));
    let (edge, metrics) = engine_over(remote.clone());
    // User 1 is in conversations 1..=20, with 3 messages in each of the
    // first 12; conversation 21 is someone else's; 22 does not exist.
    for c in 1..=21u64 {
        conversation_with(&remote, c, if c <= 20 { &[1, 2] } else { &[2, 3] }).await;
    }
    let id = |c: u64, i: u64| c * 1_000 + i;
    for c in (1..=12u64).chain([21]) {
        for i in 1..=3 {
            remote
                .insert_message(&tiercast_engine::store::NewMessage {
                    message: tiercast_schemas::wire::Message {
                        id: id(c, i),
                        conversation: c,
                        sender: 2,
                        sender_client: 0,
                        body: bytes::Bytes::from_static(b"m"),
                    },
                    dedupe: None,
                    inbox: vec![],
                })
                .await
                .unwrap();
        }
    }
    // The first 5 are behind (cursor at their first message), the rest up
    // to date or empty; then the stranger's and a missing one.
    let cursor = |c: u64| Cursor {
        conversation: c,
        last_id: match c {
            1..=5 => id(c, 1),
            6..=12 => id(c, 3),
            _ => 0,
        },
    };
    let cursors: Vec<Cursor> = (1..=22).map(cursor).collect();
    let entries = edge.sync(1, &cursors, 50).await.unwrap();
    assert_eq!(entries.len(), 22);
    for e in &entries {
        let c = e.conversation;
        let ids: Vec<u64> = e.messages.iter().map(|m| m.id).collect();
        match c {
            1..=5 => assert_eq!(ids, vec![id(c, 2), id(c, 3)], "conversation {c}"),
            _ => assert!(ids.is_empty(), "conversation {c}: {ids:?}"),
        }
        let latest = match c {
            1..=12 => id(c, 3),
            _ => 0,
        };
        assert_eq!(e.latest_id, latest, "conversation {c}");
        assert!(!e.more, "conversation {c}");
        // The stranger's conversation and the missing one say nothing.
        assert_eq!(e.tier == 0, c > 20, "conversation {c}");
    }
    assert_eq!(metrics.syncs.get(), 1);
    assert_eq!(
        metrics.sync_store_calls.get(),
        3,
        "markers and states, then 5 pages in one call (before: 69, the markers and three or four calls per conversation)"
    );
    // Twelve behind: two page calls.
    let behind: Vec<Cursor> = (1..=12)
        .map(|c| Cursor {
            conversation: c,
            last_id: 0,
        })
        .collect();
    let entries = edge.sync(1, &behind, 50).await.unwrap();
    assert!(entries.iter().all(|e| e.messages.len() == 3));
    assert_eq!(metrics.sync_store_calls.get(), 3 + 4);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A device's send over a remote store is two store requests: its reads in
/// one (`send_context`: the membership, the conversation, the members and
/// their devices, which were four requests), then the insert. A stranger's
/// send is refused after the one read, with nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_reads_the_store_in_one_request() {
    use tiercast_engine::metrics::OpLabel;
    use tiercast_engine::store::Device;
    use tiercast_engine::{EngineError, Outgoing, Sender};
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop, server, served) = serve_engine(dir.path(), Default::default()).await;
    let remote = Arc::new(RemoteStore::new(&format!("http://{addr}"), internal_keys()));
    let edge = Arc::new(engine_over(remote.clone()).0);
    conversation_with(&remote, 1, &[1, 2, 3]).await;
    let devices = [(1, 10), (2, 20), (2, 21), (3, 30), (9, 90)];
    register_devices(&remote, &devices).await;
    const OPS: [&str; 6] = [
        "send_context",
        "insert_message",
        "is_member",
        "conversation",
        "members",
        "devices_of",
    ];
    let counts = || {
        OPS.map(|op| {
            served
                .internal_store_calls
                .get_or_create(&OpLabel { op })
                .get()
        })
    };
    let send = |user: u64, client: u64, client_msg_id: u64| Outgoing {
        conversation: 1,
        from: Sender::Device { user, client },
        client_msg_id,
        body: bytes::Bytes::from_static(b"hello"),
    };

    let before = counts();
    let receipt = edge.send(send(1, 10, 1)).await.unwrap();
    let after = counts();
    let made: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert_eq!(made, [1, 1, 0, 0, 0, 0], "requests by op: {OPS:?}");

    let stranger = edge.send(send(9, 90, 1)).await.unwrap_err();
    assert!(
        matches!(stranger, EngineError::Forbidden { user: 9, .. }),
        "{stranger:?}"
    );
    let made: Vec<u64> = counts().iter().zip(after).map(|(a, b)| a - b).collect();
    assert_eq!(made, [1, 0, 0, 0, 0, 0], "requests by op: {OPS:?}");

    // Every device of every member but the sending one holds the message,
    // and only it.
    for (user, client) in devices {
        let ids: Vec<u64> = remote
            .inbox(Device { user, client }, 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        let expected = if user == 1 || user == 9 {
            vec![]
        } else {
            vec![receipt.message_id]
        };
        assert_eq!(ids, expected, "device ({user}, {client})");
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A rolling upgrade that reaches an edge before its engine service: the
/// older service refuses `send_context` as an op it does not know (axum's
/// 422, as its JSON extractor answers an unknown variant). The edge's
/// sends still work, through the single reads, and the refused call is
/// tried once, not on every send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_work_against_an_engine_service_older_than_send_context() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tiercast_engine::store::Device;
    use tiercast_engine::store::remote::{Call, serve};
    use tiercast_engine::{EngineError, Outgoing, Sender};

    /// The ops an older service knew, as far as this test needs the
    /// extractor's refusal of one it did not.
    #[derive(serde::Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    #[allow(dead_code)]
    enum Older {
        IsMember { conv: u64, user: u64 },
    }

    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("t.redb")).unwrap());
    let refused = Arc::new(AtomicU64::new(0));
    let older_service = {
        let (store, refused) = (store.clone(), refused.clone());
        move |body: bytes::Bytes| {
            let (store, refused) = (store.clone(), refused.clone());
            async move {
                use axum::response::IntoResponse;
                let op: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if op["op"] == "send_context" {
                    refused.fetch_add(1, Ordering::Relaxed);
                    let rejection = axum::Json::<Older>::from_bytes(&body).err().unwrap();
                    let error = serde_json::json!({
                        "error": { "code": "invalid_request", "message": rejection.body_text() }
                    });
                    return (rejection.status(), axum::Json(error)).into_response();
                }
                let call: Call = serde_json::from_slice(&body).unwrap();
                match serve(store.as_ref(), call).await {
                    Ok(v) => axum::Json(v).into_response(),
                    Err(e) => (axum::http::StatusCode::UNPROCESSABLE_ENTITY, axum::Json(e))
                        .into_response(),
                }
            }
        }
    };
    let app = axum::Router::new().route("/internal/store", axum::routing::post(older_service));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let remote = Arc::new(RemoteStore::new(&format!("http://{addr}"), internal_keys()));
    let edge = Arc::new(engine_over(remote.clone()).0);
    conversation_with(&remote, 1, &[1, 2]).await;
    register_devices(&remote, &[(1, 10), (2, 20), (9, 90)]).await;
    let send = |user: u64, client: u64, client_msg_id: u64| Outgoing {
        conversation: 1,
        from: Sender::Device { user, client },
        client_msg_id,
        body: bytes::Bytes::from_static(b"hello"),
    };
    let first = edge.send(send(1, 10, 1)).await.unwrap();
    let second = edge.send(send(1, 10, 2)).await.unwrap();
    let stranger = edge.send(send(9, 90, 1)).await.unwrap_err();
    assert!(
        matches!(stranger, EngineError::Forbidden { user: 9, .. }),
        "{stranger:?}"
    );
    assert_eq!(
        refused.load(Ordering::Relaxed),
        1,
        "tried once, then not again"
    );
    let pending: Vec<u64> = remote
        .inbox(
            Device {
                user: 2,
                client: 20,
            },
            0,
            10,
        )
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(pending, vec![first.message_id, second.message_id]);
    assert!(
        remote
            .inbox(
                Device {
                    user: 1,
                    client: 10
                },
                0,
                10
            )
            .await
            .unwrap()
            .is_empty(),
        "the sender's own device keeps no copy"
    );
    server.abort();
}
