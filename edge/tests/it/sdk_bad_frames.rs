//! The SDK against a misbehaving edge: a malformed or oversized frame from
//! the server closes the connection with an error the app can read, instead
//! of a reader stopping in silence (which left `tiercast listen` hanging).
//! The "edge" here is a bare quinn server that says Welcome and then sends
//! bad bytes.

use bytes::{BufMut, BytesMut};
use tiercast_client::{Client, ClientConfig, ClientError};
use tiercast_edge::tls::{Identity, server_crypto};
use tiercast_schemas::framing::read_frame;
use tiercast_schemas::wire::{ServerBody, ServerFrame};

const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the fake edge sends after Welcome, and on which stream.
#[derive(Clone, Copy)]
enum Bad {
    GarbageDelivery,
    OversizedDelivery,
    GarbageAnswer,
}

async fn fake_edge(bad: Bad) -> (std::net::SocketAddr, String, tokio::task::JoinHandle<()>) {
    let id = Identity::self_signed(&["localhost".into()]).unwrap();
    let pem = id.chain_pem.clone();
    let server = quinn::ServerConfig::with_crypto(server_crypto(id).unwrap());
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let _hello = read_frame(&mut recv, 65_536).await.unwrap();
        let welcome = ServerFrame::new(
            0,
            ServerBody::Welcome {
                user_id: 1,
                client_id: 9,
                node_id: 0,
                server_time_ms: 0,
                max_frame_bytes: 65_536,
                max_body_bytes: 16_384,
            },
        );
        send.write_all(&welcome.encode()).await.unwrap();
        let mut junk = BytesMut::new();
        match bad {
            Bad::OversizedDelivery => junk.put_u32_le(50_000_000),
            Bad::GarbageDelivery | Bad::GarbageAnswer => {
                junk.put_u32_le(12);
                junk.put_slice(b"not a frame!");
            }
        }
        match bad {
            Bad::GarbageAnswer => send.write_all(&junk).await.unwrap(),
            _ => {
                let mut uni = conn.open_uni().await.unwrap();
                uni.write_all(&junk).await.unwrap();
            }
        }
        // Stay up until the client closes.
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        endpoint.wait_idle().await;
    });
    (addr, pem, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_from_the_edge_ends_the_connection_with_an_error() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    for (bad, what) in [
        (Bad::GarbageDelivery, "malformed_frame"),
        (Bad::OversizedDelivery, "frame_too_large"),
        (Bad::GarbageAnswer, "malformed_frame"),
    ] {
        let (addr, pem, server) = fake_edge(bad).await;
        let cfg = ClientConfig::new(addr, pem, "token".into(), 0);
        let (client, mut rx) = Client::connect(cfg).await.unwrap();
        // The deliveries end (no hang) ...
        let end = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no hang");
        assert!(end.is_none(), "{end:?}");
        // ... and the app learns why.
        let why = tokio::time::timeout(WAIT, client.closed()).await.unwrap();
        assert!(
            matches!(&why, ClientError::Protocol(m) if m.contains(what)),
            "{why}"
        );
        // A request on the dead connection fails with the same reason.
        let e = client.ping(1).await.unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)), "{e}");
        server.await.unwrap();
    }
}
