//! The machine's floor for a delivery: what the kernel costs to send one
//! UDP datagram of delivery size to one of many loopback receivers. No
//! QUIC, no TLS, no user-space work around it: whatever Tiercast spends per
//! delivery above this is its own. Measured two ways, `sendto` one
//! datagram per call and `sendmmsg` in batches of 64 (one call, 64
//! destinations), as CPU time of the sending thread (on loopback the
//! receive path runs in the sender's context too), over whole rounds of one
//! datagram to every receiver. Receivers are drained between rounds, out
//! of the timed part, so no datagram is dropped: every one sent is counted
//! received.

use std::io::IoSlice;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrIn, sendmmsg};
use nix::time::{ClockId, clock_gettime};

/// Destinations per `sendmmsg` call.
pub const BATCH: usize = 64;

/// What one measurement found.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct UdpFloor {
    pub receivers: usize,
    pub datagram_bytes: usize,
    /// Datagrams sent (and received) by each method.
    pub datagrams: u64,
    /// CPU microseconds per datagram, one `sendto` each.
    pub sendto_us: f64,
    /// CPU microseconds per datagram, `sendmmsg` in batches of [`BATCH`].
    pub sendmmsg_us: f64,
}

impl UdpFloor {
    /// The floor: the cheaper of the two ways.
    pub fn floor_us(&self) -> f64 {
        self.sendto_us.min(self.sendmmsg_us)
    }
}

fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

struct Receivers {
    sockets: Vec<UdpSocket>,
    addrs: Vec<SocketAddr>,
}

impl Receivers {
    fn bind(n: usize) -> std::io::Result<Self> {
        let mut sockets = Vec::with_capacity(n);
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            addrs.push(s.local_addr()?);
            sockets.push(s);
        }
        Ok(Self { sockets, addrs })
    }

    /// Reads everything waiting; returns how many datagrams.
    fn drain(&self, buf: &mut [u8]) -> u64 {
        let mut n = 0;
        for s in &self.sockets {
            while s.recv(buf).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// Measures the floor with `receivers` loopback receivers and datagrams of
/// `datagram_bytes`, for `rounds` rounds of one datagram to each receiver
/// per method. Fails if a datagram sent was not received (the figure would
/// then count drops, not deliveries).
pub fn measure(
    receivers: usize,
    datagram_bytes: usize,
    rounds: usize,
) -> std::io::Result<UdpFloor> {
    let rx = Receivers::bind(receivers.max(1))?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let payload = vec![0xa5u8; datagram_bytes.clamp(1, 65_000)];
    let mut buf = vec![0u8; 65_536];
    let fd = tx.as_raw_fd();
    let dests: Vec<SockaddrIn> = rx
        .addrs
        .iter()
        .map(|a| match a {
            SocketAddr::V4(v4) => SockaddrIn::from(*v4),
            SocketAddr::V6(_) => unreachable!("bound on 127.0.0.1"),
        })
        .collect();

    let mut sent = 0u64;
    let mut received = 0u64;
    let mut sendto_cpu = Duration::ZERO;
    for _ in 0..rounds {
        let t0 = thread_cpu();
        for a in &rx.addrs {
            tx.send_to(&payload, a)?;
        }
        sendto_cpu += thread_cpu() - t0;
        sent += rx.addrs.len() as u64;
        received += rx.drain(&mut buf);
    }
    let sendto_datagrams = sent;

    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
    let slices: Vec<[IoSlice<'_>; 1]> = (0..BATCH).map(|_| [IoSlice::new(&payload)]).collect();
    let mut sendmmsg_cpu = Duration::ZERO;
    for _ in 0..rounds {
        let t0 = thread_cpu();
        for chunk in dests.chunks(BATCH) {
            let addrs: Vec<Option<SockaddrIn>> = chunk.iter().copied().map(Some).collect();
            let mut done = 0;
            // A partial send (the kernel took fewer than asked) continues
            // with the rest of the batch.
            while done < chunk.len() {
                let results = sendmmsg(
                    fd,
                    &mut headers,
                    &slices[..chunk.len() - done],
                    &addrs[done..],
                    [],
                    MsgFlags::empty(),
                )
                .map_err(std::io::Error::from)?;
                done += results.count();
            }
        }
        sendmmsg_cpu += thread_cpu() - t0;
        sent += dests.len() as u64;
        received += rx.drain(&mut buf);
    }
    // Stragglers still in flight on loopback (none expected: the send
    // path delivers into the receiver's queue before it returns).
    for _ in 0..100 {
        if received >= sent {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
        received += rx.drain(&mut buf);
    }
    if received != sent {
        return Err(std::io::Error::other(format!(
            "{sent} datagrams sent, {received} received: the receivers dropped some"
        )));
    }
    let per = |cpu: Duration, n: u64| cpu.as_secs_f64() * 1e6 / n.max(1) as f64;
    Ok(UdpFloor {
        receivers: rx.addrs.len(),
        datagram_bytes: payload.len(),
        datagrams: sendto_datagrams,
        sendto_us: per(sendto_cpu, sendto_datagrams),
        sendmmsg_us: per(sendmmsg_cpu, sent - sendto_datagrams),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every datagram sent is received and counted; the figures are the
    /// CPU time over those counts (not timed: a noisy machine moves them).
    #[test]
    fn every_datagram_sent_is_received_and_counted() {
        let f = measure(100, 150, 5).unwrap();
        assert_eq!(
            (f.receivers, f.datagram_bytes, f.datagrams),
            (100, 150, 500)
        );
        assert!(f.sendto_us.is_finite() && f.sendto_us > 0.0, "{f:?}");
        assert!(f.sendmmsg_us.is_finite() && f.sendmmsg_us > 0.0, "{f:?}");
        assert_eq!(f.floor_us(), f.sendto_us.min(f.sendmmsg_us));
    }
}
