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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("t.redb")).unwrap());
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
    let keys = TokenKeys::new(b"remote-store-test-secret");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        listener,
        HttpState {
            engine: Arc::new(engine),
            keys: keys.clone(),
            registry: Arc::new(registry),
        },
        async {
            let _ = stopped.await;
        },
    ));

    let remote = RemoteStore::new(&format!("http://{addr}"), keys);
    conformance::run_all(&remote).await;

    // A caller without the secret is refused.
    let stranger = RemoteStore::new(&format!("http://{addr}"), TokenKeys::new(b"wrong"));
    use tiercast_engine::store::Store;
    assert!(stranger.conversation(1).await.is_err());

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
