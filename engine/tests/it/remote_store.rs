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
use tiercast_engine::store::{EmbeddedStore, RemoteStore, conformance};

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
/// `limits`; returns its address, the stop signal and the server task.
async fn serve_engine(
    dir: &std::path::Path,
    limits: http::HttpLimits,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let store = Arc::new(EmbeddedStore::open(&dir.join("t.redb")).unwrap());
    let mut registry = Registry::default();
    let metrics = EngineMetrics::register(&mut registry);
    let engine = Engine::new(
        EngineConfig::default(),
        store,
        Arc::new(LocalBackplane::new()),
        Arc::new(LocalRoutes::default()),
        metrics,
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
    (addr, stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop, server) = serve_engine(dir.path(), Default::default()).await;
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
    let (addr, stop, server) = serve_engine(dir.path(), limits).await;
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
