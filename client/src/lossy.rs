//! A UDP socket that loses a share of the datagrams it receives, for
//! measuring loss recovery on loopback, where no packet is ever lost and
//! the kernel's `netem` may not be available. Only received datagrams are
//! dropped (the edge-to-device direction), counted exactly (a receive the
//! kernel coalesced from several datagrams is kept or dropped whole); what
//! is kept is passed on unchanged. A testing aid: load generators use it, an app does
//! not.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

/// Wraps a runtime's socket; drops each received datagram with
/// probability `loss` (0..=1).
pub struct LossySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    /// The share dropped, in millionths.
    loss_ppm: u64,
    /// Datagrams dropped (shared with whoever reports them).
    dropped: Arc<AtomicU64>,
}

impl fmt::Debug for LossySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LossySocket")
            .field("loss_ppm", &self.loss_ppm)
            .finish_non_exhaustive()
    }
}

impl LossySocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, loss: f64, dropped: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            loss_ppm: (loss.clamp(0.0, 1.0) * 1e6) as u64,
            dropped,
        }
    }

    fn drop_this(&self) -> bool {
        self.loss_ppm > 0 && rand::random_range(0..1_000_000) < self.loss_ppm
    }
}

impl AsyncUdpSocket for LossySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        // Keep what is not dropped, moved down to the front in order.
        let mut kept = 0;
        for i in 0..n {
            // A receive may hold several datagrams of one sender (GRO):
            // they are kept or lost together, and counted each.
            let segments = meta[i].len.div_ceil(meta[i].stride.max(1)).max(1) as u64;
            if self.drop_this() {
                self.dropped.fetch_add(segments, Ordering::Relaxed);
                continue;
            }
            if kept != i {
                let len = meta[i].len;
                let (front, back) = bufs.split_at_mut(i);
                front[kept][..len].copy_from_slice(&back[0][..len]);
                meta[kept] = meta[i];
            }
            kept += 1;
        }
        Poll::Ready(Ok(kept))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A client endpoint (as [`crate::client_endpoint`]) whose socket loses
/// `loss` of what it receives; `dropped` counts the losses.
pub fn lossy_client_endpoint(
    bind: SocketAddr,
    buffer: usize,
    loss: f64,
    dropped: Arc<AtomicU64>,
) -> io::Result<quinn::Endpoint> {
    let socket = crate::connection::bound_socket(bind, buffer)?;
    let runtime: Arc<dyn Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Arc::new(LossySocket::new(inner, loss, dropped)),
        runtime,
    )
}
