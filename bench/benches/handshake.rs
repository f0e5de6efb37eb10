//! The CPU of one QUIC + TLS 1.3 handshake, full and resumed, on each side:
//! a client and a server quinn-proto endpoint configured as the SDK and the
//! edge are (the edge's transport settings, its certificate kind, its fleet
//! ticketer), their datagrams handed across in memory so that only the
//! protocol work is timed, each side's own calls timed apart.
//!
//! A full handshake is a device with no ticket: ECDHE, the edge's
//! certificate signature, the device's chain verification. A resumed one
//! presents the ticket from its previous connection (`psk_dhe_ke`: still
//! an ECDHE, no signature, no chain). Every resumed iteration is checked to
//! have resumed (the ticketer counts the tickets it opened).
//!
//! `cargo bench -p tiercast-bench --bench handshake`. Figures in
//! docs/benchmarks.md ("Reconnects: full and resumed handshakes").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig, Event,
    ServerConfig,
};
use tiercast_client::tls::ClientTls;
use tiercast_edge::config::EdgeConfig;
use tiercast_edge::fleet::{FleetTicketer, TicketCounts};
use tiercast_edge::tls::Identity;

/// One side of the pair: its endpoint, connections, address, and the CPU
/// its calls took.
struct Side {
    ep: Endpoint,
    conns: HashMap<ConnectionHandle, Connection>,
    addr: SocketAddr,
    spent: Duration,
    connected: usize,
}

impl Side {
    fn new(server: Option<Arc<ServerConfig>>, addr: &str) -> Self {
        Self {
            ep: Endpoint::new(Arc::new(EndpointConfig::default()), server, true, None),
            conns: HashMap::new(),
            addr: addr.parse().expect("literal"),
            spent: Duration::ZERO,
            connected: 0,
        }
    }

    /// Takes one datagram from `from` (timed as this side's work).
    fn receive(&mut self, from: SocketAddr, data: &[u8], replies: &mut Vec<Vec<u8>>) {
        let t = Instant::now();
        let mut buf = Vec::new();
        match self
            .ep
            .handle(t, from, None, None, BytesMut::from(data), &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                self.conns.get_mut(&ch).expect("known").handle_event(ev);
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                let (ch, conn) = self
                    .ep
                    .accept(incoming, t, &mut buf, None)
                    .expect("accepted");
                self.conns.insert(ch, conn);
            }
            Some(DatagramEvent::Response(tx)) => replies.push(buf[..tx.size].to_vec()),
            None => {}
        }
        self.spent += t.elapsed();
    }

    /// Everything this side's connections want to send now, and their
    /// events (timed as this side's work).
    fn drive(&mut self, out: &mut Vec<Vec<u8>>) {
        let t = Instant::now();
        for (&ch, conn) in &mut self.conns {
            while let Some(ev) = conn.poll_endpoint_events() {
                if let Some(back) = self.ep.handle_event(ch, ev) {
                    conn.handle_event(back);
                }
            }
            while let Some(ev) = conn.poll() {
                if let Event::Connected = ev {
                    self.connected += 1;
                }
            }
            let mut buf = Vec::new();
            while let Some(tx) = conn.poll_transmit(t, 1, &mut buf) {
                out.push(buf[..tx.size].to_vec());
                buf.clear();
            }
        }
        self.spent += t.elapsed();
    }
}

struct Pair {
    server_cfg: Arc<ServerConfig>,
    counts: TicketCounts,
}

impl Pair {
    fn new() -> (Self, String) {
        let id = Identity::self_signed(&["localhost".into()]).expect("certificate");
        let pem = id.chain_pem.clone();
        let counts = TicketCounts::default();
        let ticketer = Arc::new(FleetTicketer::new(
            b"the fleet's token secret, 32 bytes or more",
            3600,
            counts.clone(),
        ));
        let crypto = tiercast_edge::tls::server_crypto_with_tickets(
            id,
            Some(ticketer),
            EdgeConfig::default().tickets_per_handshake,
        )
        .expect("server crypto");
        let mut server = ServerConfig::with_crypto(crypto);
        server.transport_config(Arc::new(tiercast_edge::node::transport_config(
            &EdgeConfig::default(),
        )));
        (
            Self {
                server_cfg: Arc::new(server),
                counts,
            },
            pem,
        )
    }

    /// One handshake of a device holding `tls`, to quiescence (both sides
    /// connected, the edge's tickets delivered). Returns the CPU of the
    /// server's and the client's calls.
    fn handshake(&self, tls: &ClientTls) -> (Duration, Duration) {
        let mut server = Side::new(Some(self.server_cfg.clone()), "127.0.0.1:7443");
        let mut client = Side::new(None, "127.0.0.1:50000");
        let t = Instant::now();
        let (ch, conn) = client
            .ep
            .connect(
                t,
                ClientConfig::new(tls.0.clone()),
                server.addr,
                "localhost",
            )
            .expect("connect");
        client.conns.insert(ch, conn);
        client.spent += t.elapsed();
        for _ in 0..64 {
            let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
            client.drive(&mut to_server);
            for d in std::mem::take(&mut to_server) {
                server.receive(client.addr, &d, &mut to_client);
            }
            server.drive(&mut to_client);
            let quiet = to_client.is_empty();
            for d in to_client {
                client.receive(server.addr, &d, &mut to_server);
            }
            if quiet && client.connected == 1 && server.connected == 1 {
                return (server.spent, client.spent);
            }
        }
        panic!("the handshake did not complete");
    }
}

fn handshake(c: &mut Criterion) {
    let (pair, pem) = Pair::new();
    let mut g = c.benchmark_group("handshake");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(8));
    for side in ["server", "client"] {
        g.bench_function(format!("{side}, full"), |b| {
            b.iter_custom(|n| {
                let mut spent = Duration::ZERO;
                for _ in 0..n {
                    // A device with no ticket.
                    let tls = ClientTls::new(&pem).expect("client tls");
                    let (s, c) = pair.handshake(&tls);
                    spent += if side == "server" { s } else { c };
                }
                spent
            });
        });
        g.bench_function(format!("{side}, resumed"), |b| {
            let tls = ClientTls::new(&pem).expect("client tls");
            pair.handshake(&tls);
            b.iter_custom(|n| {
                let opened = pair.counts.opened.get();
                let mut spent = Duration::ZERO;
                for _ in 0..n {
                    let (s, c) = pair.handshake(&tls);
                    spent += if side == "server" { s } else { c };
                }
                assert_eq!(
                    pair.counts.opened.get() - opened,
                    n,
                    "every handshake resumed"
                );
                spent
            });
        });
    }
    g.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
