//! The store conformance rules against a real ScyllaDB (or Cassandra)
//! cluster, when `TIERCAST_SCYLLA_NODES` names one (`host:port,...`). No
//! ScyllaDB server can be installed on the development machines, so there
//! this test shows as ignored, with the reason; the backend is otherwise
//! compiled and type-checked only. Each run uses a fresh keyspace and drops it.

use tiercast_engine::store::{ScyllaConfig, ScyllaStore, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a ScyllaDB cluster: TIERCAST_SCYLLA_NODES=host:9042 cargo test -p tiercast-engine --test it scylla_store -- --ignored (none can be installed on the development machines)"]
async fn scylla_store_conforms() {
    let nodes = std::env::var("TIERCAST_SCYLLA_NODES")
        .expect("TIERCAST_SCYLLA_NODES=host:9042[,host:9042...] names the cluster to test against");
    let keyspace = format!("tiercast_test_{:08x}", rand::random::<u32>());
    let cfg = ScyllaConfig {
        nodes: nodes.split(',').map(str::to_owned).collect(),
        keyspace: keyspace.clone(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
    };
    let store = ScyllaStore::connect(&cfg)
        .await
        .expect("ScyllaDB reachable");
    conformance::run_all(&store).await;
    store
        .session()
        .query_unpaged(format!("DROP KEYSPACE {keyspace}"), ())
        .await
        .expect("keyspace dropped");
}
