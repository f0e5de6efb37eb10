//! The publisher HTTP API end to end: create a conversation, manage members,
//! publish, read history; a published message reaches member devices over
//! QUIC.

use tiercast_testkit as common;

use common::{next_message, start};
use serde_json::{Value, json};

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
