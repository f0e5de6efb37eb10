//! The backplane over an authenticated, encrypted Redis: a real
//! redis-server with `requirepass` and only a TLS port (its certificate made
//! here), reached with `backplane.redis.password`, `tls` and `tls_ca_path`.
//! A wrong password or a plaintext client gets nowhere.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use tiercast_engine::backplane::Backplane;
use tiercast_engine::backplane::redis::{RedisBackplane, RedisConfig};

const WAIT: Duration = Duration::from_secs(10);
const PASSWORD: &str = "backplane-password-0123456789";

struct Server {
    child: Child,
    port: u16,
    ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A redis-server with a password and a TLS port only; ready when it says
/// so on its log (read from its stdout).
fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("redis.crt"), dir.path().join("redis.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--tls-cert-file", cert.to_str().unwrap()])
        .args(["--tls-key-file", key.to_str().unwrap()])
        .args(["--tls-ca-cert-file", cert.to_str().unwrap()])
        .args(["--tls-auth-clients", "no", "--requirepass", PASSWORD])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs (scripts/redis-cluster.sh install)");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("Ready to accept connections") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(WAIT).expect("redis-server ready");
    Server {
        child,
        port,
        ca: cert,
        _dir: dir,
    }
}

fn config(s: &Server) -> RedisConfig {
    RedisConfig {
        nodes: vec![format!("127.0.0.1:{}", s.port)],
        cluster: false,
        password: Some(PASSWORD.into()),
        tls: true,
        tls_ca_path: Some(s.ca.clone()),
        ..RedisConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backplane_runs_over_password_and_tls() {
    let server = start();
    let cfg = config(&server);
    cfg.validate().unwrap();
    let bp = tokio::time::timeout(WAIT, RedisBackplane::connect(cfg))
        .await
        .expect("connects in time")
        .expect("connects with the password over TLS");
    let (sub, mut inbound) = bp.subscriber(16).await.unwrap();
    sub.subscribe("node:{edge:1}").await.unwrap();
    bp.publish("node:{edge:1}", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, inbound.recv())
        .await
        .expect("delivered in time")
        .expect("subscriber alive");
    assert_eq!(&got.payload[..], b"hello");

    // A wrong password, or plaintext to the TLS port: no backplane.
    let wrong = RedisConfig {
        password: Some("not-the-password".into()),
        ..config(&server)
    };
    let plain = RedisConfig {
        tls: false,
        tls_ca_path: None,
        ..config(&server)
    };
    for (what, cfg) in [("wrong password", wrong), ("plaintext", plain)] {
        let r = tokio::time::timeout(Duration::from_secs(3), RedisBackplane::connect(cfg)).await;
        assert!(!matches!(r, Ok(Ok(_))), "{what} connected");
    }
    // A CA file that is not a certificate is a configuration error.
    let bad_ca = server.ca.with_extension("bad");
    std::fs::write(&bad_ca, "not a certificate").unwrap();
    let e = RedisConfig {
        tls_ca_path: Some(bad_ca),
        ..config(&server)
    }
    .validate()
    .unwrap_err();
    assert!(e.contains("tls_ca_path"), "{e}");
}
