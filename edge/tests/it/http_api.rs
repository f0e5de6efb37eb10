//! The publisher HTTP API end to end: create a conversation, manage members,
//! publish, read history; a published message reaches member devices over
//! QUIC.

use tiercast_testkit as common;

use common::{next_message, start};
use serde_json::{Value, json};
use tiercast_engine::http::Readiness;

/// An id from the API: a string of decimal digits.
fn id_of(v: &Value) -> u64 {
    v.as_str()
        .unwrap_or_else(|| panic!("ids are strings: {v}"))
        .parse()
        .unwrap()
}

/// The response is the JSON error envelope with `code`.
async fn assert_error(r: reqwest::Response, code: &str) {
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/json"), "{ct}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_manages_a_conversation_and_publishes_into_it() {
    let t = start(&[]).await;
    let http = reqwest::Client::new();
    let auth = t.publisher_token();
    let (_d, mut rx) = t.device(5, 51).await;

    let r = http
        .post(t.http("/v1/conversations"))
        .bearer_auth(&auth)
        .json(&json!({"name": "ops", "members": [5, 6]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let conv: Value = r.json().await.unwrap();
    let id = id_of(&conv["id"]);
    assert_eq!(conv["members"], json!(["5", "6"]), "ids are strings");
    assert_eq!(conv["member_count"], 2);
    assert_eq!(conv["tier"], 1);

    let r = http
        .post(t.http(&format!("/v1/conversations/{id}/members")))
        .bearer_auth(&auth)
        .json(&json!({"users": [7]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .delete(t.http(&format!("/v1/conversations/{id}/members/6")))
        .bearer_auth(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = http
        .delete(t.http(&format!("/v1/conversations/{id}/members/6")))
        .bearer_auth(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let conv: Value = http
        .get(t.http(&format!("/v1/conversations/{id}")))
        .bearer_auth(&auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conv["members"], json!(["5", "7"]));

    let r = http
        .post(t.http(&format!("/v1/conversations/{id}/messages")))
        .bearer_auth(&auth)
        .json(&json!({"body": "deploy finished", "client_msg_id": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let published: Value = r.json().await.unwrap();
    let mid = id_of(&published["id"]);
    // A retry is answered with the same id, 200 instead of 201.
    let r = http
        .post(t.http(&format!("/v1/conversations/{id}/messages")))
        .bearer_auth(&auth)
        .json(&json!({"body": "deploy finished", "client_msg_id": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(id_of(&r.json::<Value>().await.unwrap()["id"]), mid);

    let m = next_message(&mut rx).await;
    assert_eq!((m.id, &m.body[..]), (mid, &b"deploy finished"[..]));

    let history: Value = http
        .get(t.http(&format!("/v1/conversations/{id}/messages?limit=10")))
        .bearer_auth(&auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["messages"][0]["body"], "deploy finished");
    assert_eq!(history["messages"].as_array().unwrap().len(), 1);

    // Bad input on the API: unknown conversation, non-member sender,
    // malformed JSON.
    let r = http
        .post(t.http("/v1/conversations/424242/messages"))
        .bearer_auth(&auth)
        .json(&json!({"body": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "unknown_conversation"
    );
    let r = http
        .post(t.http(&format!("/v1/conversations/{id}/messages")))
        .bearer_auth(&auth)
        .json(&json!({"body": "x", "sender": 6}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(t.http("/v1/conversations"))
        .bearer_auth(&auth)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_error(r, "invalid_request").await;
    // Every rejection is the JSON envelope: a bad id in the path, an
    // unknown route, a wrong method, no token.
    for (method, path) in [
        ("GET", "/v1/conversations/not-a-number"),
        ("GET", "/v1/conversations/-1"),
        ("GET", "/v2/nothing"),
        ("PATCH", "/v1/conversations"),
    ] {
        let r = http
            .request(method.parse().unwrap(), t.http(path))
            .bearer_auth(&auth)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{method} {path}");
        assert_error(r, "invalid_request").await;
    }
    let r = http
        .get(t.http(&format!("/v1/conversations/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_error(r, "unauthenticated").await;

    let metrics = http
        .get(t.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tiercast_engine_messages_stored_total 1"),
        "{metrics}"
    );
    t.node.shutdown().await;
}

/// A publisher's idempotency key is (publisher, conversation,
/// client_msg_id): the same id in another conversation, or from another
/// publisher, is another message, never a silent duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_retries_are_scoped_to_publisher_and_conversation() {
    let t = start(&[]).await;
    t.chat(1, &[5]).await;
    t.chat(2, &[5]).await;
    let http = reqwest::Client::new();
    let now = tiercast_engine::auth::now_unix();
    let a = t.node.keys.mint_publisher("billing", now, 600);
    let b = t.node.keys.mint_publisher("alerts", now, 600);
    let publish = async |token: &str, conv: u64| {
        let r = http
            .post(t.http(&format!("/v1/conversations/{conv}/messages")))
            .bearer_auth(token)
            .json(&json!({"body": "x", "client_msg_id": 7}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        (status, id_of(&v["id"]), v["duplicate"].as_bool().unwrap())
    };
    let (s1, id1, d1) = publish(&a, 1).await;
    assert_eq!((s1, d1), (201, false));
    let (s2, id2, d2) = publish(&a, 2).await;
    assert_eq!((s2, d2), (201, false), "another conversation");
    assert_ne!(id1, id2);
    let (s3, id3, d3) = publish(&b, 1).await;
    assert_eq!((s3, d3), (201, false), "another publisher");
    assert_ne!(id1, id3);
    let (s4, id4, d4) = publish(&a, 1).await;
    assert_eq!((s4, d4, id4), (200, true, id1), "a real retry");
    let history = |c: u64| t.node.engine.history(c, 0, 0, 100);
    assert_eq!(history(1).await.unwrap().0.len(), 2);
    assert_eq!(history(2).await.unwrap().0.len(), 1);
    t.node.shutdown().await;
}

/// `/readyz`: ready on a healthy node; an edge whose store (an engine
/// service) has gone says so with 503 and the reason, while `/healthz`
/// still says it is alive; ready again when the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_store_and_healthz_only_liveness() {
    let node = start(&[]).await;
    let r = reqwest::get(node.http("/readyz")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"ready": true}));

    // An engine service (the store) and an edge that uses it.
    let internal = "an internal secret of enough bytes, not the token one";
    let dir = tempfile::tempdir().unwrap();
    let engine_cfg = |addr: &str| {
        common::config(
            dir.path(),
            &[
                ("auth.internal_secret", internal),
                ("node.http_listen", addr),
            ],
        )
    };
    let engine = tiercast_edge::EngineService::start(engine_cfg("127.0.0.1:0"))
        .await
        .unwrap();
    let engine_addr = engine.http_addr;
    let edge_dir = tempfile::tempdir().unwrap();
    let store_url = format!("http://{engine_addr}");
    let edge = tiercast_edge::Node::start(common::config(
        edge_dir.path(),
        &[
            ("auth.internal_secret", internal),
            ("node.store_url", &store_url),
        ],
    ))
    .await
    .unwrap();
    let ready = |node: &tiercast_edge::Node| format!("http://{}/readyz", node.http_addr);
    let r = reqwest::get(ready(&edge)).await.unwrap();
    assert_eq!(r.status(), 200);

    engine.shutdown().await;
    // The last answer is kept for half a second: ask until it changes
    // (bounded).
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let body = loop {
        let r = reqwest::get(ready(&edge)).await.unwrap();
        if r.status() == 503 {
            break r.json::<Readiness>().await.unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "never unready");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(!body.ready);
    assert_eq!(body.reasons.len(), 1, "{body:?}");
    assert!(body.reasons[0].starts_with("store: "), "{body:?}");
    let r = reqwest::get(format!("http://{}/healthz", edge.http_addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "alive all the same");

    // The store comes back on its address: ready again.
    let engine = tiercast_edge::EngineService::start(engine_cfg(&engine_addr.to_string()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while reqwest::get(ready(&edge)).await.unwrap().status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    edge.shutdown().await;
    engine.shutdown().await;
}

/// The latency histograms count what happened: one store commit, one
/// publish and one fan-out per message, one observation per device request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_histograms_count_each_message_and_request() {
    let node = start(&[]).await;
    node.chat(1, &[1, 2]).await;
    let (sender, _s) = node.device(1, 10).await;
    let (_receiver, mut rx) = node.device(2, 20).await;
    for i in 0..3u64 {
        sender
            .send(1, i + 1, bytes::Bytes::from(format!("m{i}")))
            .await
            .unwrap();
        next_message(&mut rx).await;
    }
    let text = node.node.metrics();
    let count = |name: &str| common::metric(&text, &format!("{name}_count"));
    assert_eq!(count("tiercast_engine_store_commit_seconds"), 3, "{text}");
    assert_eq!(count("tiercast_engine_publish_delay_seconds"), 3);
    // Tier 1 publishes on each member's channel: the sender's and the
    // receiver's, each fanned out once by this edge.
    assert_eq!(count("tiercast_edge_fanout_delay_seconds"), 6);
    assert_eq!(count("tiercast_edge_request_seconds"), 3, "three Sends");
    for h in [
        "tiercast_engine_store_commit_seconds",
        "tiercast_edge_fanout_delay_seconds",
    ] {
        assert!(
            text.contains(&format!("{h}_bucket{{le=\"0.0001\"}}")),
            "{h} has its buckets"
        );
    }
}

/// A draining edge answers `/readyz` 503 `draining` (so its load balancer
/// sends no one new) while its devices are still leaving, and keeps
/// serving `/metrics` until the drain is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_edge_is_not_ready() {
    let node = start(&[
        ("edge.drain_spread_ms", "0"),
        ("edge.drain_deadline_ms", "3000"),
    ])
    .await;
    node.chat(1, &[1, 2]).await;
    // A device that is told to go and stays: the drain waits for it.
    let (_stays, _rx) = node.device(1, 10).await;
    let ready = node.http("/readyz");
    let base = format!("http://{}", node.node.http_addr);
    let common::TestNode { node: running, dir } = node;
    let shutdown = tokio::spawn(running.shutdown());
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let body = loop {
        let r = reqwest::get(&ready).await.unwrap();
        if r.status() == 503 {
            break r.json::<Readiness>().await.unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "never draining");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(body.reasons, vec!["draining".to_owned()]);
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200, "metrics while draining");
    shutdown.await.unwrap();
    drop(dir);
}
