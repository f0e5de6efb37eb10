//! Bad input over real QUIC: each gets its documented code, only the
//! offending connection is closed, everyone else keeps receiving, and
//! nothing stored is lost.
//!
//! How we know nothing stored is lost: before the bad inputs we store a
//! known set of messages; afterwards the history (read from the store
//! through Fetch) holds exactly that set plus what was sent after, and a
//! bystander device received every one of them live.

use tiercast_testkit as common;

use bytes::{BufMut, Bytes, BytesMut};
use common::{WAIT, messages_until, start};
use tiercast_client::{Client, ClientError, ErrorCode};

fn code_of(e: &ClientError) -> ErrorCode {
    e.code().unwrap_or_else(|| panic!("no wire code in {e:?}"))
}

/// The close code of a connection the edge closed, within the wait bound.
async fn closed_with(c: &Client) -> ErrorCode {
    let e = tokio::time::timeout(WAIT, c.closed())
        .await
        .expect("closed in time");
    code_of(&e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_code_and_harms_only_its_connection() {
    let t = start(&[]).await;
    t.chat(1, &[1, 2]).await;
    t.chat(2, &[3]).await;
    let (bystander, mut by_rx) = t.device(2, 21).await;
    let (sender, _s_rx) = t.device(1, 11).await;

    let mut stored = Vec::new();
    for i in 0..3u64 {
        stored.push(
            sender
                .send(1, 100 + i, Bytes::from(format!("before {i}")))
                .await
                .unwrap()
                .message_id,
        );
    }

    // A wrong token: refused at Hello.
    let mut cfg = t.client_config(1, 12).await;
    cfg.token = common::TestNode::token(&t, 1).replace('a', "b") + "x";
    let e = Client::connect(cfg).await.unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::Unauthenticated, "{e}");

    // A token signed with another secret.
    let mut cfg = t.client_config(1, 12).await;
    cfg.token = tiercast_engine::auth::TokenKeys::new(b"another-secret-entirely").mint_user(
        1,
        tiercast_engine::auth::now_unix(),
        60,
    );
    assert_eq!(
        code_of(&Client::connect(cfg).await.unwrap_err()),
        ErrorCode::Unauthenticated
    );

    // An expired token.
    let mut cfg = t.client_config(1, 12).await;
    cfg.token = t
        .node
        .keys
        .mint_user(1, tiercast_engine::auth::now_unix() - 7200, 60);
    assert_eq!(
        code_of(&Client::connect(cfg).await.unwrap_err()),
        ErrorCode::TokenExpired
    );

    // Request-level errors: the connection goes on.
    let e = sender
        .send(2, 0, Bytes::from_static(b"not mine"))
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::Forbidden, "{e}");
    let e = sender
        .send(999, 0, Bytes::from_static(b"nowhere"))
        .await
        .unwrap_err();
    // To a non-member, a conversation that does not exist and one that is
    // not theirs answer the same: which ids exist is not theirs to learn.
    assert_eq!(code_of(&e), ErrorCode::Forbidden, "{e}");
    let e = sender.fetch(999, 0, 10).await.unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::Forbidden, "{e}");
    let e = sender.fetch(2, 0, 10).await.unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::Forbidden, "{e}");
    let big = Bytes::from(vec![b'x'; t.node.engine.config().max_body_bytes + 1]);
    let e = sender.send(1, 0, big).await.unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::BodyTooLarge, "{e}");
    sender
        .ping(5)
        .await
        .expect("still connected after request-level errors");

    // A malformed frame: a valid length prefix around garbage.
    let (bad, _) = t.device(1, 12).await;
    let mut raw = BytesMut::new();
    raw.put_u32_le(16);
    raw.put_slice(&[0xAB; 16]);
    bad.send_raw(&raw).await.unwrap();
    assert_eq!(closed_with(&bad).await, ErrorCode::MalformedFrame);

    // An oversized frame: refused from its prefix, before the body is read.
    let (big_frame, _) = t.device(1, 13).await;
    let mut raw = BytesMut::new();
    raw.put_u32_le(10 * 1024 * 1024);
    raw.put_slice(&[0; 64]);
    big_frame.send_raw(&raw).await.unwrap();
    assert_eq!(closed_with(&big_frame).await, ErrorCode::FrameTooLarge);

    // A second Hello on an open connection.
    let (rehello, _) = t.device(2, 22).await;
    let hello = tiercast_schemas::wire::ClientFrame::new(
        9,
        tiercast_schemas::wire::ClientBody::Hello {
            token: t.token(2),
            client_id: 22,
            device: "again".into(),
            protocol_version: 1,
        },
    );
    rehello.send_raw(&hello.encode()).await.unwrap();
    assert_eq!(closed_with(&rehello).await, ErrorCode::ProtocolViolation);

    // The sender and the bystander were never disturbed.
    for i in 0..3u64 {
        stored.push(
            sender
                .send(1, 200 + i, Bytes::from(format!("after {i}")))
                .await
                .unwrap()
                .message_id,
        );
    }
    let got = messages_until(&mut by_rx, *stored.last().unwrap()).await;
    assert_eq!(got.iter().map(|m| m.id).collect::<Vec<_>>(), stored);

    let (history, _) = bystander.fetch(1, 0, 100).await.unwrap();
    let mut ids: Vec<u64> = history.iter().map(|m| m.id).collect();
    ids.reverse();
    assert_eq!(ids, stored, "history is exactly what was accepted");
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_device_is_refused_and_changes_nothing() {
    let t = start(&[]).await;
    t.chat(1, &[1]).await;
    let mut devices = Vec::new();
    for c in 1..=3 {
        devices.push(t.device(1, c).await);
    }
    // A new device (no id yet): the registry is full.
    let e = Client::connect(t.client_config(1, 0).await)
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), ErrorCode::TooManyDevices, "{e}");
    let registered: Vec<u64> = t
        .node
        .engine
        .store()
        .clients_of(1)
        .await
        .unwrap()
        .iter()
        .map(|c| c.client_id)
        .collect();
    assert_eq!(registered, vec![1, 2, 3]);
    // The three registered devices still work.
    devices[0]
        .0
        .send(1, 1, Bytes::from_static(b"still here"))
        .await
        .unwrap();
    for (c, rx) in devices.iter_mut().skip(1) {
        let m = common::next_message(rx).await;
        assert_eq!(m.body, Bytes::from_static(b"still here"));
        c.ping(1).await.unwrap();
    }
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_refuses_without_a_publisher_token() {
    let t = start(&[]).await;
    let http = reqwest::Client::new();
    let r = http
        .get(t.http("/v1/conversations/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated");
    let r = http
        .get(t.http("/v1/conversations/1"))
        .bearer_auth(t.token(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a user token is not a publisher token");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
    t.node.shutdown().await;
}
