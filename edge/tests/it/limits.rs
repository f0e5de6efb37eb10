//! Every limit a client or publisher can run into, each its own test: rate
//! limits with a retry-after, slow HTTP headers, member lists over the cap
//! and paged, names, and ids above 2^53 in JSON.

use tiercast_testkit as common;

use std::time::Duration;

use bytes::Bytes;
use common::{WAIT, start};
use serde_json::{Value, json};
use tiercast_client::ClientError;
use tiercast_schemas::wire::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_past_the_bucket_are_refused_with_a_retry_after() {
    let t = start(&[
        ("edge.rates.send.per_s", "2"),
        ("edge.rates.send.burst", "3"),
    ])
    .await;
    t.chat(1, &[1, 2]).await;
    let (a, _ra) = t.device(1, 10).await;
    let (b, _rb) = t.device(2, 20).await;
    for i in 0..3 {
        a.send(1, i + 1, Bytes::from_static(b"ok")).await.unwrap();
    }
    let e = a
        .send(1, 4, Bytes::from_static(b"one too many"))
        .await
        .unwrap_err();
    let ClientError::RateLimited { retry_after, .. } = &e else {
        panic!("expected rate_limited, got {e}");
    };
    assert_eq!(e.code(), Some(ErrorCode::RateLimited));
    assert!(
        *retry_after > Duration::ZERO && *retry_after <= Duration::from_millis(500),
        "{retry_after:?}"
    );
    // Another user is not held up; other kinds have their own buckets.
    b.send(1, 1, Bytes::from_static(b"me too")).await.unwrap();
    a.fetch(1, 0, 10).await.unwrap();
    a.ping(1).await.unwrap();
    // After the wait the edge said, the send goes through.
    tokio::time::sleep(*retry_after).await;
    a.send(1, 4, Bytes::from_static(b"now")).await.unwrap();
    // Only the accepted sends were stored.
    assert_eq!(
        t.node.engine.history(1, 0, 0, 100).await.unwrap().0.len(),
        5
    );
    // The SDK's Session waits as told and retries by itself.
    let s = common::Device::start(t.session_config(2, 21).await);
    let mut ok = 0;
    for i in 0..6 {
        s.session
            .send(1, 100 + i, Bytes::from_static(b"paced"), WAIT)
            .await
            .unwrap();
        ok += 1;
    }
    assert_eq!(ok, 6);
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http_client_is_cut_off_at_the_header_timeout() {
    let t = start(&[("http.header_timeout_ms", "300")]).await;
    let mut slow = tokio::net::TcpStream::connect(t.node.http_addr)
        .await
        .unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finishes its headers: the server closes the connection.
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, slow.read(&mut buf))
        .await
        .expect("closed within the wait bound")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.contains("408"), "{answer}");
    // Meanwhile others are served.
    let r = reqwest::get(t.http("/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    t.node.shutdown().await;
}

async fn api(
    http: &reqwest::Client,
    t: &common::TestNode,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http
        .request(method.parse().unwrap(), t.http(path))
        .bearer_auth(t.publisher_token());
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_lists_names_and_sizes_are_capped_and_paged() {
    let t = start(&[("engine.max_conversation_members", "260")]).await;
    let http = reqwest::Client::new();
    // Over the per-call cap: refused, nothing created.
    let many: Vec<String> = (1..=1001u64).map(|u| u.to_string()).collect();
    let (s, v) = api(
        &http,
        &t,
        "POST",
        "/v1/conversations",
        Some(json!({"id": "5", "members": many})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    assert_eq!(
        api(&http, &t, "GET", "/v1/conversations/5", None).await.0,
        404
    );
    // Names: control characters and length.
    for name in ["bell\u{7}", &"n".repeat(257)] {
        let (s, v) = api(
            &http,
            &t,
            "POST",
            "/v1/conversations",
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(s, 400, "{v}");
    }
    // A body over the HTTP limit (1 MiB name): 413 with the envelope.
    let (s, v) = api(
        &http,
        &t,
        "POST",
        "/v1/conversations",
        Some(json!({"name": "x".repeat(1 << 20)})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{v}"
    );

    // 250 members in three calls; the view lists the first 100.
    let (s, _) = api(
        &http,
        &t,
        "POST",
        "/v1/conversations",
        Some(json!({"id": "5", "name": "big"})),
    )
    .await;
    assert_eq!(s, 201);
    for chunk in (1..=250u64).collect::<Vec<_>>().chunks(100) {
        let (s, v) = api(
            &http,
            &t,
            "POST",
            "/v1/conversations/5/members",
            Some(json!({"users": chunk})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let (_, v) = api(&http, &t, "GET", "/v1/conversations/5", None).await;
    assert_eq!(v["members"].as_array().unwrap().len(), 100);
    assert_eq!(v["member_count"], 250);
    assert_eq!(v["members_more"], true);
    // Paging through gives each member once, in order.
    let mut all = Vec::new();
    let mut after = "0".to_owned();
    for _ in 0..10 {
        let (s, page) = api(
            &http,
            &t,
            "GET",
            &format!("/v1/conversations/5/members?after={after}&limit=70"),
            None,
        )
        .await;
        assert_eq!(s, 200);
        for m in page["members"].as_array().unwrap() {
            all.push(m.as_str().unwrap().parse::<u64>().unwrap());
        }
        match page["next"].as_str() {
            Some(n) => after = n.to_owned(),
            None => break,
        }
    }
    assert_eq!(all, (1..=250).collect::<Vec<_>>());
    // The conversation-size cap (260 here).
    let (s, v) = api(
        &http,
        &t,
        "POST",
        "/v1/conversations/5/members",
        Some(json!({"users": (300..320u64).collect::<Vec<_>>()})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        t.node.engine.conversation(5).await.unwrap().member_count,
        250
    );
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_above_2_pow_53_survive_the_json_api() {
    let t = start(&[]).await;
    let http = reqwest::Client::new();
    let big = (1u64 << 53) + 1; // a double cannot hold this one exactly
    let user = (1u64 << 60) + 3;
    let (s, v) = api(
        &http,
        &t,
        "POST",
        "/v1/conversations",
        Some(json!({"id": big.to_string(), "members": [user.to_string(), 7]})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["id"], json!(big.to_string()));
    assert_eq!(v["members"], json!(["7", user.to_string()]));
    let (s, v) = api(
        &http,
        &t,
        "POST",
        &format!("/v1/conversations/{big}/messages"),
        Some(json!({"body": "exact", "sender": user.to_string()})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id: u64 = v["id"].as_str().unwrap().parse().unwrap();
    assert!(id > 1 << 53, "Snowflake ids are past 2^53: {id}");
    let (_, h) = api(
        &http,
        &t,
        "GET",
        &format!("/v1/conversations/{big}/messages"),
        None,
    )
    .await;
    let m = &h["messages"][0];
    assert_eq!(m["id"], json!(id.to_string()));
    assert_eq!(m["conversation"], json!(big.to_string()));
    assert_eq!(m["sender"], json!(user.to_string()));
    // What a JavaScript client would have made of the numbers.
    assert_ne!((big as f64) as u64, big);
    t.node.shutdown().await;
}
