//! Coalescing of small store calls that arrive together: what turns a
//! reconnect storm's 100,000 device registrations and conversation listings
//! into a few hundred store calls instead of 100,000 round trips each.
//!
//! A [`Batcher`] keeps at most `in_flight` batches going. A call that
//! arrives while one is free goes out at once, alone (no added latency on a
//! quiet node); calls that arrive while all are busy wait in the queue and
//! leave together, up to `max_batch` in one store call, as soon as a batch
//! ends. So batches grow with the load, by themselves, and no timer is
//! involved.

use std::sync::{Arc, OnceLock};

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Counts what a batcher did: `batches` store calls made for `calls`
/// coalesced calls (their ratio is the batching factor).
#[derive(Clone, Debug, Default)]
pub struct BatchCounters {
    pub batches: Counter,
    pub calls: Counter,
}

type Work<Req, Resp> = Arc<dyn Fn(Vec<Req>) -> BoxFuture<'static, Vec<Resp>> + Send + Sync>;

/// Coalesces calls of one kind; `work` answers a batch, one response per
/// request, in order.
pub struct Batcher<Req, Resp> {
    tx: OnceLock<mpsc::UnboundedSender<(Req, oneshot::Sender<Resp>)>>,
    work: Work<Req, Resp>,
    max_batch: usize,
    in_flight: usize,
    counters: BatchCounters,
}

impl<Req, Resp> std::fmt::Debug for Batcher<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max_batch", &self.max_batch)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    pub fn new(
        max_batch: usize,
        in_flight: usize,
        counters: BatchCounters,
        work: impl Fn(Vec<Req>) -> BoxFuture<'static, Vec<Resp>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            tx: OnceLock::new(),
            work: Arc::new(work),
            max_batch: max_batch.max(1),
            in_flight: in_flight.max(1),
            counters,
        }
    }

    /// Queues `req` and waits for its answer; `None` if the batch it went
    /// out in was lost (its task panicked or the runtime is stopping).
    pub async fn call(&self, req: Req) -> Option<Resp> {
        let (tx, rx) = oneshot::channel();
        // The worker starts on first use, inside the caller's runtime.
        let queue = self.tx.get_or_init(|| {
            let (qtx, qrx) = mpsc::unbounded_channel();
            tokio::spawn(run(
                qrx,
                self.work.clone(),
                self.max_batch,
                self.in_flight,
                self.counters.clone(),
            ));
            qtx
        });
        queue.send((req, tx)).ok()?;
        rx.await.ok()
    }
}

async fn run<Req: Send + 'static, Resp: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<(Req, oneshot::Sender<Resp>)>,
    work: Work<Req, Resp>,
    max_batch: usize,
    in_flight: usize,
    counters: BatchCounters,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        // A free slot first: while every slot is busy, calls gather.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut reqs = Vec::with_capacity(8);
        let mut answers = Vec::with_capacity(8);
        reqs.push(first.0);
        answers.push(first.1);
        while reqs.len() < max_batch {
            match rx.try_recv() {
                Ok((r, a)) => {
                    reqs.push(r);
                    answers.push(a);
                }
                Err(_) => break,
            }
        }
        counters.batches.inc();
        counters.calls.inc_by(reqs.len() as u64);
        let work = work.clone();
        tokio::spawn(async move {
            let out = work(reqs).await;
            debug_assert_eq!(out.len(), answers.len(), "one answer per request");
            for (a, r) in answers.into_iter().zip(out) {
                let _ = a.send(r);
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// Calls made while every slot is busy leave together, each gets its
    /// own answer, and the counters add up exactly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_that_wait_leave_together_and_each_gets_its_answer() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let counters = BatchCounters::default();
        let (g, s) = (gate.clone(), sizes.clone());
        let b = Arc::new(Batcher::new(
            8,
            1,
            counters.clone(),
            move |reqs: Vec<u64>| {
                let (g, s) = (g.clone(), s.clone());
                async move {
                    // Held until the test lets it go: the next calls queue.
                    g.acquire().await.expect("gate open").forget();
                    s.lock().unwrap().push(reqs.len());
                    reqs.into_iter().map(|r| r * 10).collect()
                }
                .boxed()
            },
        ));
        let first = {
            let b = b.clone();
            tokio::spawn(async move { b.call(1).await })
        };
        // The first call is in its own batch once the counters say so.
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while counters.batches.get() < 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first batch left");
        // One poll of all 20 queues every one of them (a call queues
        // before it first waits), while the only slot is held.
        let mut rest = Box::pin(futures::future::join_all((2..=21u64).map(|i| b.call(i))));
        assert!(futures::poll!(&mut rest).is_pending());
        gate.add_permits(1_000);
        assert_eq!(first.await.unwrap(), Some(10));
        let got = rest.await;
        assert_eq!(
            got,
            (2..=21u64).map(|i| Some(i * 10)).collect::<Vec<_>>(),
            "each call gets its own answer"
        );
        assert_eq!(counters.calls.get(), 21);
        assert_eq!(counters.batches.get(), 4);
        assert_eq!(
            *sizes.lock().unwrap(),
            vec![1, 8, 8, 4],
            "alone on a quiet batcher, then as many as max_batch allows"
        );
    }
}
