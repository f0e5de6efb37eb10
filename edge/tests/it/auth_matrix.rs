//! The authorisation matrix: every credential kind against QUIC `Hello`,
//! every `/v1` route and `/internal/store`; and every client frame kind
//! against a member, a non-member and a removed member. Each cell asserts
//! the exact code, and the store shows nothing was delivered, stored or
//! acked by a refused call.

use tiercast_testkit as common;

use bytes::Bytes;
use common::{SECRET, start};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tiercast_client::{Client, ClientConfig};
use tiercast_engine::auth::{Claims, TokenKeys, now_unix};
use tiercast_schemas::wire::{Cursor, ErrorCode};

const ROTATED_OUT: &[u8] = b"a-key-that-was-retired-0123456789";
const STRANGER: &[u8] = b"a-key-nobody-configured-012345678";

/// One credential of each kind, for `user` (or a publisher).
struct Creds {
    wrong_key: String,
    expired: String,
    not_yet_valid: String,
    rotated_out: String,
    user: String,
    publisher: String,
}

fn token(secret: &[u8], kid: &str, claims: &Claims) -> String {
    let header = Header {
        kid: Some(kid.into()),
        ..Header::new(Algorithm::HS256)
    };
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn creds(keys: &TokenKeys, user: u64, role: Option<&str>) -> Creds {
    let now = now_unix();
    let claims = |iat: u64, exp: u64, nbf: Option<u64>| Claims {
        sub: match role {
            Some(_) => "backend".into(),
            None => user.to_string(),
        },
        exp,
        iat,
        nbf,
        role: role.map(str::to_owned),
        convs: None,
    };
    let valid = claims(now, now + 600, None);
    Creds {
        wrong_key: token(STRANGER, "k1", &valid),
        expired: token(
            SECRET.as_bytes(),
            "k1",
            &claims(now - 7200, now - 3600, None),
        ),
        not_yet_valid: token(
            SECRET.as_bytes(),
            "k1",
            &claims(now, now + 7200, Some(now + 3600)),
        ),
        rotated_out: token(ROTATED_OUT, "k0", &valid),
        user: keys.mint_user(user, now, 600),
        publisher: keys.mint_publisher("backend", now, 600),
    }
}

async fn hello(t: &common::TestNode, token: &str) -> Result<Client, ErrorCode> {
    let cfg = ClientConfig::new(
        t.node.quic_addr,
        t.node.cert_pem.clone(),
        token.to_owned(),
        0,
    );
    match Client::connect(cfg).await {
        Ok((c, _)) => Ok(c),
        Err(e) => Err(e.code().unwrap_or(ErrorCode::Unspecified)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_credential_kind_on_every_door() {
    let t = start(&[]).await;
    t.chat(1, &[1, 2]).await;
    let keys = t.node.keys.clone();
    let u = creds(&keys, 1, None);
    let p = creds(&keys, 0, Some("publisher"));

    // QUIC: only a valid user token.
    for (what, tok, want) in [
        ("wrong key", &u.wrong_key, ErrorCode::Unauthenticated),
        ("expired", &u.expired, ErrorCode::TokenExpired),
        (
            "not yet valid",
            &u.not_yet_valid,
            ErrorCode::Unauthenticated,
        ),
        ("rotated out", &u.rotated_out, ErrorCode::Unauthenticated),
        ("publisher", &u.publisher, ErrorCode::Unauthenticated),
        (
            "garbage",
            &"not.a.token".to_owned(),
            ErrorCode::Unauthenticated,
        ),
        ("empty", &String::new(), ErrorCode::Unauthenticated),
    ] {
        assert_eq!(hello(&t, tok).await.err(), Some(want), "QUIC, {what}");
    }
    assert!(hello(&t, &u.user).await.is_ok());
    // Refused Hellos registered nothing: the valid one registered one.
    assert_eq!(t.node.engine.store().clients_of(1).await.unwrap().len(), 1);

    // Every /v1 route, and the internal one, with every credential.
    let http = reqwest::Client::new();
    let routes: Vec<(&str, String, Value)> = vec![
        ("POST", "/v1/conversations".into(), json!({"name": "x"})),
        ("GET", "/v1/conversations/1".into(), Value::Null),
        (
            "POST",
            "/v1/conversations/1/members".into(),
            json!({"users": ["3"]}),
        ),
        ("GET", "/v1/conversations/1/members".into(), Value::Null),
        ("PUT", "/v1/conversations/1/tier".into(), json!({"tier": 2})),
        (
            "DELETE",
            "/v1/conversations/1/members/2".into(),
            Value::Null,
        ),
        (
            "POST",
            "/v1/conversations/1/messages".into(),
            json!({"body": "x"}),
        ),
        ("GET", "/v1/conversations/1/messages".into(), Value::Null),
        (
            "POST",
            "/internal/store".into(),
            json!({"op": "inbox", "device": {"user": 1, "client": 1}, "after": 0, "limit": 10}),
        ),
    ];
    let kinds: Vec<(&str, Option<&String>, u16, &str)> = vec![
        ("no token", None, 401, "unauthenticated"),
        ("wrong key", Some(&p.wrong_key), 401, "unauthenticated"),
        ("expired", Some(&p.expired), 401, "token_expired"),
        (
            "not yet valid",
            Some(&p.not_yet_valid),
            401,
            "unauthenticated",
        ),
        ("rotated out", Some(&p.rotated_out), 401, "unauthenticated"),
        ("user token", Some(&u.user), 403, "forbidden"),
    ];
    for (method, path, body) in &routes {
        for (what, tok, status, code) in &kinds {
            let mut req = http.request(method.parse().unwrap(), t.http(path));
            if let Some(tok) = tok {
                req = req.bearer_auth(tok);
            }
            if !body.is_null() {
                req = req.json(body);
            }
            let r = req.send().await.unwrap();
            let internal = path.starts_with("/internal");
            // The internal door knows no user or publisher key at all: every
            // such token is unauthenticated there (and a node without an
            // internal secret refuses everything with 403).
            let (status, code) = if internal {
                (403, "forbidden")
            } else {
                (*status, *code)
            };
            assert_eq!(r.status().as_u16(), status, "{method} {path}, {what}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], code, "{method} {path}, {what}: {v}");
        }
    }
    // A valid publisher token does not open the internal door either.
    let r = http
        .post(t.http("/internal/store"))
        .bearer_auth(&p.publisher)
        .json(&routes[8].2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Nothing any refused call asked for happened.
    let (conv, members) = (
        t.node.engine.conversation(1).await.unwrap(),
        t.node.engine.store().members(1).await.unwrap(),
    );
    assert_eq!(
        (conv.tier, members),
        (tiercast_schemas::envelope::Tier::Direct, vec![1, 2])
    );
    assert!(
        t.node
            .engine
            .history(1, 0, 0, 10)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_kind_for_members_non_members_and_removed_members() {
    let t = start(&[]).await;
    // 1: user 1 and 2; 2: exists, without user 3; user 4 was removed from 1.
    t.chat(1, &[1, 2, 4]).await;
    t.chat(2, &[1]).await;
    let (member, _m) = t.device(1, 10).await;
    let (_peer, mut peer_rx) = t.device(2, 20).await;
    let (outsider, _o) = t.device(3, 30).await;
    let (removed, _r) = t.device(4, 40).await;
    assert!(t.node.engine.remove_member(1, 4).await.unwrap());

    let sent = member.send(1, 1, Bytes::from_static(b"hi")).await.unwrap();
    assert_eq!(common::next_message(&mut peer_rx).await.id, sent.message_id);
    let history_before = t.node.engine.history(1, 0, 0, 100).await.unwrap().0.len();
    let pending_before = t
        .node
        .engine
        .store()
        .inbox(common::dev(20), 0, 10)
        .await
        .unwrap();

    for (who, c) in [("non-member", &outsider), ("removed member", &removed)] {
        for conv in [1, 2, 404] {
            let code = |e: tiercast_client::ClientError| e.code();
            let f = Some(ErrorCode::Forbidden);
            assert_eq!(
                code(c.send(conv, 9, Bytes::from_static(b"x")).await.unwrap_err()),
                f,
                "{who} send {conv}"
            );
            assert_eq!(
                code(c.fetch(conv, 0, 10).await.unwrap_err()),
                f,
                "{who} fetch {conv}"
            );
            assert_eq!(
                code(c.pull(conv, sent.message_id).await.unwrap_err()),
                f,
                "{who} pull {conv}"
            );
            assert_eq!(
                code(c.read(conv, sent.message_id).await.unwrap_err()),
                f,
                "{who} read {conv}"
            );
            let entries = c
                .sync(
                    &[Cursor {
                        conversation: conv,
                        last_id: 0,
                    }],
                    10,
                )
                .await
                .unwrap();
            assert_eq!(entries[0].tier, 0, "{who} sync {conv}");
            assert!(entries[0].messages.is_empty() && entries[0].latest_id == 0);
        }
        // Acking someone else's pending message removes nothing.
        assert_eq!(c.ack(&[sent.message_id]).await.unwrap(), 0, "{who} ack");
        // Its listing names none of the conversations.
        let listing = c.sync(&[], 10).await.unwrap();
        assert!(
            listing
                .iter()
                .all(|e| e.conversation != 1 && e.conversation != 2)
        );
    }
    // The member itself: every frame kind works.
    assert_eq!(member.fetch(1, 0, 10).await.unwrap().0.len(), 1);
    assert!(member.pull(1, sent.message_id).await.unwrap().is_some());
    member.read(1, sent.message_id).await.unwrap();
    member.ping(7).await.unwrap();
    // Nothing was stored or acked by the refused calls.
    assert_eq!(
        t.node.engine.history(1, 0, 0, 100).await.unwrap().0.len(),
        history_before
    );
    assert!(
        t.node
            .engine
            .history(2, 0, 0, 100)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    assert_eq!(
        t.node
            .engine
            .store()
            .inbox(common::dev(20), 0, 10)
            .await
            .unwrap(),
        pending_before
    );
    t.node.shutdown().await;
}

/// A token may carry `convs`: the only conversations it may send to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_convs_claim_limits_where_a_token_sends() {
    let t = start(&[]).await;
    t.chat(1, &[1]).await;
    t.chat(2, &[1]).await;
    let now = now_unix();
    let limited = t.node.keys.mint(&Claims {
        sub: "1".into(),
        exp: now + 600,
        iat: now,
        nbf: None,
        role: None,
        convs: Some(vec![1]),
    });
    let c = hello(&t, &limited).await.unwrap();
    c.send(1, 1, Bytes::from_static(b"ok")).await.unwrap();
    let e = c.send(2, 2, Bytes::from_static(b"no")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");
    assert!(
        t.node
            .engine
            .history(2, 0, 0, 10)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    t.node.shutdown().await;
}
