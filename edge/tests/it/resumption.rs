//! TLS session resumption: a device that keeps its TLS state resumes on
//! its next connect (the edge counts the ticket it opened), on a restarted
//! edge too (the ticket keys come from the fleet secret, not from the
//! process); a ticket from another fleet is refused and the device still
//! gets in with a full handshake; with tickets off none is issued.

use tiercast_testkit as common;

use common::{Device, TestNode, WAIT};
use tiercast_client::tls::ClientTls;
use tiercast_client::{Client, Cursor};

fn counts(node: &TestNode) -> (u64, u64, u64) {
    let m = node.node.metrics();
    (
        common::metric(&m, "tiercast_edge_tls_tickets_issued_total"),
        common::metric(&m, "tiercast_edge_tls_resumptions_total"),
        common::metric(&m, "tiercast_edge_tls_tickets_refused_total"),
    )
}

/// Connects `user`'s device with `tls`, and makes one round trip (by then
/// the edge's tickets have arrived: they follow the handshake).
async fn connect_with(node: &TestNode, user: u64, tls: &ClientTls) -> Client {
    let mut cfg = node.client_config(user, 10 + user).await;
    cfg.tls = Some(tls.clone());
    let (client, _rx) = Client::connect(cfg).await.expect("device connects");
    client
        .sync(
            &[Cursor {
                conversation: 1,
                last_id: 0,
            }],
            1,
        )
        .await
        .expect("a round trip");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_device_resumes_on_the_same_and_on_a_restarted_edge() {
    let node = common::start(&[]).await;
    node.chat(1, &[1, 2]).await;

    // The SDK's session keeps its TLS state across reconnects.
    let phone = Device::start(node.session_config(1, 11).await);
    phone
        .wait_until("connected", WAIT, |l| l.connects >= 1)
        .await;
    let (issued, resumed, _) = counts(&node);
    assert!(issued >= 1, "the first handshake brings tickets");
    assert_eq!(resumed, 0, "the first handshake is a full one");
    phone.session.reconnect();
    phone
        .wait_until("reconnected", WAIT, |l| l.connects >= 2)
        .await;
    assert_eq!(counts(&node).1, 1, "the reconnect resumed");
    drop(phone);

    // A device holding a ticket from before a restart resumes on the
    // restarted edge (same data directory and secret, a new process).
    let tls = ClientTls::new(&node.node.cert_pem).unwrap();
    let before = connect_with(&node, 2, &tls).await;
    drop(before);
    let TestNode { node: running, dir } = node;
    running.shutdown().await;
    let node = TestNode {
        node: tiercast_edge::Node::start(common::config(dir.path(), &[]))
            .await
            .unwrap(),
        dir,
    };
    assert_eq!(counts(&node), (0, 0, 0));
    let _after = connect_with(&node, 2, &tls).await;
    let (_, resumed, refused) = counts(&node);
    assert_eq!((resumed, refused), (1, 0), "resumed after the restart");

    // Another fleet's edge cannot open it: refused, and the device gets in
    // with a full handshake all the same.
    let other = common::start(&[(
        "node.token_secret",
        "another fleet's secret, long enough for the check",
    )])
    .await;
    other.chat(1, &[1, 2]).await;
    let both = format!("{}{}", node.node.cert_pem, other.node.cert_pem);
    let tls = ClientTls::new(&both).unwrap();
    let _mine = connect_with(&node, 2, &tls).await;
    let _theirs = connect_with(&other, 2, &tls).await;
    let (_, resumed, refused) = counts(&other);
    assert_eq!((resumed, refused), (0, 1), "a foreign ticket is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tickets_off_every_handshake_is_a_full_one() {
    let node = common::start(&[("edge.ticket_rotation_s", "0")]).await;
    node.chat(1, &[1, 2]).await;
    let tls = ClientTls::new(&node.node.cert_pem).unwrap();
    for _ in 0..2 {
        drop(connect_with(&node, 1, &tls).await);
    }
    assert_eq!(counts(&node), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_handshake_brings_the_configured_number_of_tickets() {
    // Four by default: a device spends one on every connect attempt, also
    // on one refused before TLS in a storm, and still resumes after three.
    for (set, want) in [(None, 4), (Some("1"), 1), (Some("8"), 8)] {
        let settings: Vec<(&str, &str)> = set
            .map(|n| vec![("edge.tickets_per_handshake", n)])
            .unwrap_or_default();
        let node = common::start(&settings).await;
        node.chat(1, &[1, 2]).await;
        let tls = ClientTls::new(&node.node.cert_pem).unwrap();
        drop(connect_with(&node, 1, &tls).await);
        assert_eq!(counts(&node).0, want, "tickets after one handshake");
        // The next connect resumes, and brings as many again.
        drop(connect_with(&node, 1, &tls).await);
        assert_eq!(counts(&node), (2 * want, 1, 0), "resumed, {want} more");
    }
}

fn retries(node: &TestNode) -> u64 {
    common::metric(&node.node.metrics(), "tiercast_edge_retries_sent_total")
}

/// With every unvalidated connect asked for a Retry (`retry_above_per_s`
/// 0), a device's first connect gets one; its next connects present the
/// address-validation token the edge gave it and get none, on a restarted
/// edge too (the token key comes from the fleet secret). With
/// `edge.address_tokens` 0 every connect is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_device_skips_the_retry_with_its_token_also_after_a_restart() {
    let node = common::start(&[("edge.retry_above_per_s", "0")]).await;
    node.chat(1, &[1, 2]).await;
    let tls = ClientTls::new(&node.node.cert_pem).unwrap();
    drop(connect_with(&node, 1, &tls).await);
    assert_eq!(retries(&node), 1, "the first connect proves its address");
    drop(connect_with(&node, 1, &tls).await);
    drop(connect_with(&node, 1, &tls).await);
    assert_eq!(retries(&node), 1, "the next ones present a token");
    // Another device, without a token, is still asked.
    let stranger = ClientTls::new(&node.node.cert_pem).unwrap();
    drop(connect_with(&node, 2, &stranger).await);
    assert_eq!(retries(&node), 2, "no token: a Retry");

    let TestNode { node: running, dir } = node;
    running.shutdown().await;
    let node = TestNode {
        node: tiercast_edge::Node::start(common::config(
            dir.path(),
            &[("edge.retry_above_per_s", "0")],
        ))
        .await
        .unwrap(),
        dir,
    };
    drop(connect_with(&node, 1, &tls).await);
    assert_eq!(retries(&node), 0, "a token from before the restart holds");

    let node = common::start(&[
        ("edge.retry_above_per_s", "0"),
        ("edge.address_tokens", "0"),
    ])
    .await;
    node.chat(1, &[1, 2]).await;
    let tls = ClientTls::new(&node.node.cert_pem).unwrap();
    for _ in 0..2 {
        drop(connect_with(&node, 1, &tls).await);
    }
    assert_eq!(retries(&node), 2, "no tokens given: every connect is asked");
}
