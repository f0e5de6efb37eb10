//! The wire layout of docs/protocol.md, exercised byte by byte: frames built
//! from the schema's field numbers with the FlatBuffers builder (not through
//! the generated Rust types), size-prefixed with a little-endian length, and
//! answers read back with a hand-written table reader. If the document and
//! the code drift apart, this fails.

use tiercast_testkit as common;

use flatbuffers::{FlatBufferBuilder, WIPOffset};

/// `protocol.fbs`: `union Body { Hello = 1, Welcome = 2, Error = 3, ...,
/// Ping = 11, Pong = 12, ... }`.
const BODY_HELLO: u8 = 1;
const BODY_WELCOME: u8 = 2;
const BODY_PING: u8 = 11;
const BODY_PONG: u8 = 12;

/// The vtable slot of field number `n` (FlatBuffers: 4 + 2n).
const fn slot(n: u16) -> u16 {
    4 + 2 * n
}

/// `table Frame { request_id: ulong; body: Body; }`: the union takes two
/// field numbers (its type, then its value).
fn frame(
    b: &mut FlatBufferBuilder,
    request_id: u64,
    body_type: u8,
    body: WIPOffset<()>,
) -> Vec<u8> {
    let start = b.start_table();
    b.push_slot::<u64>(slot(0), request_id, 0);
    b.push_slot::<u8>(slot(1), body_type, 0);
    b.push_slot_always::<WIPOffset<()>>(slot(2), body);
    let root = b.end_table(start);
    // Size-prefixed: alignment counts from the prefix.
    b.finish_size_prefixed(root, None);
    b.finished_data().to_vec()
}

/// `table Hello { token: string; client_id: ulong; device: string;
/// protocol_version: ushort = 1; }`
fn hello(token: &str) -> Vec<u8> {
    let mut b = FlatBufferBuilder::new();
    let token = b.create_string(token);
    let device = b.create_string("hand-built");
    let start = b.start_table();
    b.push_slot_always(slot(0), token);
    b.push_slot::<u64>(slot(1), 0, 0);
    b.push_slot_always(slot(2), device);
    b.push_slot::<u16>(slot(3), 1, 0);
    let t = b.end_table(start);
    frame(&mut b, 0, BODY_HELLO, WIPOffset::new(t.value()))
}

/// `table Ping { nonce: ulong; }`
fn ping(request_id: u64, nonce: u64) -> Vec<u8> {
    let mut b = FlatBufferBuilder::new();
    let start = b.start_table();
    b.push_slot::<u64>(slot(0), nonce, 0);
    let t = b.end_table(start);
    frame(&mut b, request_id, BODY_PING, WIPOffset::new(t.value()))
}

/// A FlatBuffers table read by hand: the little-endian layout of the
/// FlatBuffers spec (root offset, signed vtable offset, field offsets).
#[derive(Clone, Copy)]
struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Table<'a> {
    fn root(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: u32le(buf, 0) as usize,
        }
    }

    fn field(&self, n: u16) -> Option<usize> {
        let vtable = (self.pos as i64
            - i64::from(i32::from_le_bytes(
                self.buf[self.pos..self.pos + 4].try_into().unwrap(),
            ))) as usize;
        let vtable_len = u16le(self.buf, vtable);
        let at = slot(n) as usize;
        if at >= vtable_len as usize {
            return None;
        }
        match u16le(self.buf, vtable + at) {
            0 => None,
            off => Some(self.pos + off as usize),
        }
    }

    fn u64(&self, n: u16) -> u64 {
        self.field(n).map_or(0, |p| {
            u64::from_le_bytes(self.buf[p..p + 8].try_into().unwrap())
        })
    }

    fn u32(&self, n: u16) -> u32 {
        self.field(n).map_or(0, |p| u32le(self.buf, p))
    }

    fn u8(&self, n: u16) -> u8 {
        self.field(n).map_or(0, |p| self.buf[p])
    }

    fn table(&self, n: u16) -> Table<'a> {
        let p = self.field(n).expect("table field present");
        Table {
            buf: self.buf,
            pos: p + u32le(self.buf, p) as usize,
        }
    }
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

/// One frame off a stream: a 4-byte little-endian length, then the buffer.
async fn read_frame(recv: &mut quinn::RecvStream) -> Vec<u8> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(prefix) as usize];
    recv.read_exact(&mut body).await.unwrap();
    body
}

/// A stock quinn client endpoint that trusts the node's certificate.
fn quinn_client(t: &common::TestNode) -> quinn::Endpoint {
    let crypto = tiercast_client::tls::client_crypto(&t.node.cert_pem).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(crypto));
    ep
}

/// A connection to the node, under the development certificate's name.
fn connect(ep: &quinn::Endpoint, t: &common::TestNode) -> quinn::Connecting {
    ep.connect(t.node.quic_addr, "localhost").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_built_frames_follow_the_documented_layout() {
    let t = common::start(&[]).await;
    let ep = quinn_client(&t);
    let conn = connect(&ep, &t).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();

    let bytes = hello(&t.token(1));
    // The prefix is the little-endian length of what follows.
    assert_eq!(u32le(&bytes, 0) as usize, bytes.len() - 4);
    send.write_all(&bytes).await.unwrap();
    let welcome = read_frame(&mut recv).await;
    let f = Table::root(&welcome);
    assert_eq!(f.u64(0), 0, "Welcome carries request id 0");
    assert_eq!(f.u8(1), BODY_WELCOME);
    // `table Welcome { user_id; client_id; node_id; server_time_ms;
    // max_frame_bytes; max_body_bytes; }`
    let w = f.table(2);
    assert_eq!(w.u64(0), 1, "user id");
    assert_ne!(w.u64(1), 0, "an issued device id");
    assert_eq!(w.u32(4), 65_536, "max_frame_bytes");
    assert_eq!(w.u32(5), 16_384, "max_body_bytes");

    // A request's id comes back with its answer.
    send.write_all(&ping(7, 42)).await.unwrap();
    let pong = read_frame(&mut recv).await;
    let f = Table::root(&pong);
    assert_eq!((f.u64(0), f.u8(1)), (7, BODY_PONG));
    assert_eq!(f.table(2).u64(0), 42, "the nonce");

    conn.close(0u32.into(), b"bye");
    ep.wait_idle().await;
    t.node.shutdown().await;
}

/// A client that opens no stream, or opens one and says nothing, is closed
/// after `edge.hello_timeout_ms` with `unavailable` (25): it may only be
/// slow, and the SDK reconnects after that code, where
/// `protocol_violation` would end its session for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_past_the_hello_timeout_is_told_to_come_back() {
    let t = common::start(&[("edge.hello_timeout_ms", "1000")]).await;
    let ep = quinn_client(&t);
    for opens_stream in [false, true] {
        let conn = connect(&ep, &t).await.unwrap();
        // A stream is only seen by the edge once something is written on
        // it; one byte of a frame's length prefix, then nothing.
        let _stream = if opens_stream {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            send.write_all(&[0]).await.unwrap();
            Some((send, recv))
        } else {
            None
        };
        let why = tokio::time::timeout(std::time::Duration::from_secs(10), conn.closed())
            .await
            .expect("closed by the edge");
        match why {
            quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
                u64::from(c.error_code),
                tiercast_schemas::wire::ErrorCode::Unavailable as u64,
                "opens a stream: {opens_stream}: {c:?}"
            ),
            other => panic!("opens a stream: {opens_stream}: {other:?}"),
        }
    }
    // Both finished TLS, neither said Hello: counted where they stopped.
    let m = t.node.metrics();
    assert_eq!(
        common::metric(
            &m,
            "tiercast_edge_setups_abandoned_total{stage=\"hello_timeout\"}"
        ),
        2
    );
    assert_eq!(
        common::metric(&m, "tiercast_edge_handshake_seconds_count"),
        2
    );
    assert_eq!(common::metric(&m, "tiercast_edge_hello_seconds_count"), 0);
    ep.close(0u32.into(), b"bye");
    t.node.shutdown().await;
}

/// The edge drops each connection's TLS session once its handshake is
/// over (quinn-proto patch 9, `QuicServerConfig::release_session_after_handshake`):
/// what a connection still needs from it, the secrets of the next key
/// phases, is kept. Three key updates from a stock quinn client, each
/// followed by a request and its answer in the new phase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_updates_work_after_the_edge_drops_its_tls_session() {
    let t = common::start(&[]).await;
    let ep = quinn_client(&t);
    let conn = connect(&ep, &t).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&hello(&t.token(1))).await.unwrap();
    let welcome = read_frame(&mut recv).await;
    assert_eq!(Table::root(&welcome).u8(1), BODY_WELCOME);

    for round in 1..=3u64 {
        conn.force_key_update();
        send.write_all(&ping(round, 100 + round)).await.unwrap();
        let pong = tokio::time::timeout(common::WAIT, read_frame(&mut recv))
            .await
            .expect("an answer in the new key phase");
        let f = Table::root(&pong);
        assert_eq!((f.u64(0), f.u8(1)), (round, BODY_PONG), "round {round}");
        assert_eq!(f.table(2).u64(0), 100 + round);
    }
    assert_eq!(conn.stats().path.lost_packets, 0);
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());

    conn.close(0u32.into(), b"bye");
    ep.wait_idle().await;
    t.node.shutdown().await;
}
