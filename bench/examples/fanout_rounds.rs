//! A fixed number of rounds of the core fan-out rig (`core_fanout`'s
//! rig, no timing): for counting the edge's instructions per delivery
//! under callgrind, which is exact where time on this machine is not.
//!
//! `fanout_rounds CONNS ROUNDS [ACK_EVERY [ACK_DELAY_MS]]`, run twice by
//! `scripts/count-instructions.sh` with different ROUNDS; the difference
//! of the two counts over the extra deliveries leaves out the setup and
//! the handshakes.

use tiercast_edge::config::EdgeConfig;
use tiercast_edge::core::rig::{Rig, delivery_frame};
use tiercast_edge::tls::Identity;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    // As the `tiercast` command does: a subscriber at `warn`, so quinn's
    // per-packet trace spans cost what they cost on a live edge.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    let (conns, rounds, ack_every) = (arg(1, 1_000), arg(2, 10), arg(3, 0));
    let ack_delay_ms = arg(4, 25);
    let frame = delivery_frame(100);
    let id = Identity::self_signed(&["localhost".into()]).expect("certificate");
    let crypto = tiercast_client::tls::client_crypto(&id.chain_pem).expect("client crypto");
    let cfg = EdgeConfig {
        ack_every: u32::try_from(ack_every).expect("ack_every"),
        ack_delay_ms: ack_delay_ms as u64,
        ..EdgeConfig::default()
    };
    let mut rig = Rig::new(conns, &cfg, id, crypto, frame).expect("rig");
    let (mut datagrams, mut acks) = (0, 0);
    for _ in 0..rounds {
        let r = rig.round();
        datagrams += r.datagrams;
        acks += r.ack_datagrams;
    }
    println!(
        "conns {conns} rounds {rounds} deliveries {} datagrams {datagrams} acks {acks}",
        conns * rounds
    );
}
