//! A server process started by a test: its output lines on a channel,
//! readiness from its `--ready-json` line, killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a process may take to print what a test waits for.
pub const PROCESS_WAIT: Duration = Duration::from_secs(20);

/// libfaketime (installed by `scripts/redis-cluster.sh install`).
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// What a server's `--ready-json` line says.
#[derive(Debug, Clone)]
pub struct Ready {
    pub role: String,
    pub quic: Option<std::net::SocketAddr>,
    /// `http://host:port`.
    pub http: String,
    pub node_id: u16,
    pub certificate: Option<String>,
}

/// A running process whose stdout (and, with [`Proc::spawn_merged`],
/// stderr) lines arrive on one channel.
pub struct Proc {
    /// The process (a test kills or waits for it; dropping kills it).
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

fn forward(out: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
}

impl Proc {
    /// Starts `cmd`; stdout is read by the test, stderr goes to the test's.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("process starts");
        let (tx, lines) = mpsc::channel();
        forward(child.stdout.take().unwrap(), tx);
        Self { child, lines }
    }

    /// Starts `cmd` with stdout and stderr read by the test, as one stream.
    pub fn spawn_merged(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("process starts");
        let (tx, lines) = mpsc::channel();
        forward(child.stdout.take().unwrap(), tx.clone());
        forward(child.stderr.take().unwrap(), tx);
        Self { child, lines }
    }

    /// The first line containing `needle` (earlier lines are dropped);
    /// panics after [`PROCESS_WAIT`].
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + PROCESS_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with `{needle}` in time"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The word after `label` on the first line that has it.
    pub fn value_after(&self, label: &str) -> String {
        let line = self.wait_for(label);
        let rest = &line[line.find(label).unwrap() + label.len()..];
        rest.split_whitespace().next().unwrap_or("").to_owned()
    }

    /// The server's `--ready-json` line.
    pub fn ready(&self) -> Ready {
        let line = self.wait_for("{\"ready\":");
        let v: serde_json::Value = serde_json::from_str(&line).expect("the ready line is JSON");
        let r = &v["ready"];
        let text = |k: &str| r[k].as_str().map(str::to_owned);
        Ready {
            role: text("role").expect("ready.role"),
            quic: text("quic").map(|q| q.parse().expect("ready.quic is an address")),
            http: text("http").expect("ready.http"),
            node_id: r["node_id"].as_u64().expect("ready.node_id") as u16,
            certificate: text("certificate"),
        }
    }
}

/// Moves the wall clock of the process `cmd` starts by `offset`
/// (libfaketime's syntax, e.g. "-5s"); its monotonic clock is not moved.
pub fn skew_clock(cmd: &mut Command, offset: &str) {
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} is missing: scripts/redis-cluster.sh install"
    );
    cmd.env("LD_PRELOAD", FAKETIME_LIB)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("FAKETIME_NO_CACHE", "1");
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
