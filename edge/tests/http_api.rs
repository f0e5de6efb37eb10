//! The publisher HTTP API end to end: create a conversation, manage members,
//! publish, read history; a published message reaches member devices over
//! QUIC.

mod common;

use common::{next_message, start};
use serde_json::{Value, json};

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
    let id = conv["id"].as_u64().unwrap();
    assert_eq!(conv["members"], json!([5, 6]));
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
    assert_eq!(conv["members"], json!([5, 7]));

    let r = http
        .post(t.http(&format!("/v1/conversations/{id}/messages")))
        .bearer_auth(&auth)
        .json(&json!({"body": "deploy finished", "client_msg_id": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let published: Value = r.json().await.unwrap();
    let mid = published["id"].as_u64().unwrap();
    // A retry is answered with the same id, 200 instead of 201.
    let r = http
        .post(t.http(&format!("/v1/conversations/{id}/messages")))
        .bearer_auth(&auth)
        .json(&json!({"body": "deploy finished", "client_msg_id": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["id"].as_u64(), Some(mid));

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
    assert!(r.status().is_client_error());

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
