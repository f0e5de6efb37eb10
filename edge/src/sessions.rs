//! The edge's table of local connections by user, and local fan-out: one
//! encoded frame handed to every local device of a user.
//!
//! Pure bookkeeping: the connection handle `C` is whatever closes a
//! connection (a `quinn::Connection` in the server, `()` in tests and
//! benches), so this is tested and benchmarked without sockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// Tier-3 notifications that did not fit in a connection's queue: the
/// newest id per conversation, written by the connection's writer once the
/// queue has room. A slow device gets one notification per conversation
/// however many it missed, and is not disconnected for them.
#[derive(Debug, Default)]
pub struct Coalesced {
    latest: Mutex<HashMap<u64, u64>>,
    pub wake: tokio::sync::Notify,
}

impl Coalesced {
    pub fn put(&self, conversation: u64, message_id: u64) {
        let mut l = self.latest.lock().expect("coalesced lock");
        let e = l.entry(conversation).or_insert(0);
        *e = (*e).max(message_id);
        drop(l);
        self.wake.notify_one();
    }

    /// Takes what gathered, as `(conversation, newest id)`.
    pub fn take(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.latest.lock().expect("coalesced lock"))
            .into_iter()
            .collect()
    }
}

/// One local connection of a user.
#[derive(Debug, Clone)]
pub struct LocalConn<C> {
    pub conn_id: u64,
    pub client_id: u64,
    /// When it connected (Unix ms): across edges, the newer connection of
    /// a device wins.
    pub since_ms: u64,
    /// The connection's bounded outbound queue of encoded frames.
    pub tx: mpsc::Sender<Bytes>,
    pub coalesced: Arc<Coalesced>,
    pub handle: C,
}

/// What one local fan-out did.
#[derive(Debug, Default)]
pub struct FanOut<C> {
    pub enqueued: usize,
    /// Tier-3 notifications set aside for full queues.
    pub coalesced: usize,
    /// Connections whose queue was full: slow consumers, to be closed.
    pub overflowed: Vec<C>,
}

#[derive(Debug)]
pub struct Sessions<C> {
    users: Mutex<HashMap<u64, Vec<LocalConn<C>>>>,
}

impl<C> Default for Sessions<C> {
    fn default() -> Self {
        Self {
            users: Mutex::new(HashMap::new()),
        }
    }
}

impl<C: Clone> Sessions<C> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a connection; true when it is the user's first on this edge (the
    /// edge must then subscribe to the user's channel).
    pub fn insert(&self, user: u64, conn: LocalConn<C>) -> bool {
        self.insert_replacing(user, conn).0
    }

    /// Adds a connection, taking out the connections of the same device
    /// that were here (one live connection per device: the newer wins).
    /// Returns whether the user had no connection here before, and the
    /// replaced connections, for the caller to close.
    pub fn insert_replacing(&self, user: u64, conn: LocalConn<C>) -> (bool, Vec<C>) {
        let mut users = self.users.lock().expect("sessions lock");
        let conns = users.entry(user).or_default();
        let first = conns.is_empty();
        let mut replaced = Vec::new();
        conns.retain(|c| {
            let same = c.client_id == conn.client_id;
            if same {
                replaced.push(c.handle.clone());
            }
            !same
        });
        conns.push(conn);
        (first, replaced)
    }

    /// Removes a connection; true when it was the user's last on this edge.
    pub fn remove(&self, user: u64, conn_id: u64) -> bool {
        let mut users = self.users.lock().expect("sessions lock");
        let Some(conns) = users.get_mut(&user) else {
            return false;
        };
        let before = conns.len();
        conns.retain(|c| c.conn_id != conn_id);
        let removed = conns.len() < before;
        if conns.is_empty() {
            users.remove(&user);
        }
        removed && !users.contains_key(&user)
    }

    /// A connection of `user`'s device `client_id` ordered `newer` =
    /// (since_ms, edge, conn_id) was announced: this edge's (`edge`)
    /// connections of the device that are older, for the caller to close
    /// (their own teardown takes them out of the table).
    pub fn older_than(
        &self,
        user: u64,
        client_id: u64,
        newer: (u64, u16, u64),
        edge: u16,
    ) -> Vec<C> {
        let users = self.users.lock().expect("sessions lock");
        users
            .get(&user)
            .into_iter()
            .flatten()
            .filter(|c| c.client_id == client_id && (c.since_ms, edge, c.conn_id) < newer)
            .map(|c| c.handle.clone())
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.users
            .lock()
            .expect("sessions lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn has_user(&self, user: u64) -> bool {
        self.users
            .lock()
            .expect("sessions lock")
            .contains_key(&user)
    }

    /// Every connection's `(user, client id)`, for refreshing last-seen.
    pub fn devices(&self) -> Vec<(u64, u64)> {
        let users = self.users.lock().expect("sessions lock");
        users
            .iter()
            .flat_map(|(&u, conns)| conns.iter().map(move |c| (u, c.client_id)))
            .collect()
    }

    /// Every connection's queue and handle (to drain the edge).
    pub fn all(&self) -> Vec<(mpsc::Sender<Bytes>, C)> {
        let users = self.users.lock().expect("sessions lock");
        users
            .values()
            .flatten()
            .map(|c| (c.tx.clone(), c.handle.clone()))
            .collect()
    }

    /// Hands `frame` to the local connection of device `client_id` of
    /// `user`, if it is here and its queue has room (a full queue skips
    /// it: the device's next connect catches it up). True if enqueued.
    pub fn send_to(&self, user: u64, client_id: u64, frame: &Bytes) -> bool {
        let users = self.users.lock().expect("sessions lock");
        users
            .get(&user)
            .into_iter()
            .flatten()
            .filter(|c| c.client_id == client_id)
            .any(|c| c.tx.try_send(frame.clone()).is_ok())
    }

    /// Hands `frame` (encoded once, shared) to every local connection of
    /// `user` except the device `except_client`. Never waits: a full queue
    /// marks its connection as a slow consumer, unless the frame is a
    /// tier-3 notification (`notify` = its conversation and id), which is
    /// coalesced instead.
    pub fn fan_out(
        &self,
        user: u64,
        except_client: u64,
        frame: &Bytes,
        notify: Option<(u64, u64)>,
    ) -> FanOut<C> {
        let users = self.users.lock().expect("sessions lock");
        let mut out = FanOut {
            enqueued: 0,
            coalesced: 0,
            overflowed: Vec::new(),
        };
        for conn in users.get(&user).into_iter().flatten() {
            if conn.client_id == except_client {
                continue;
            }
            match conn.tx.try_send(frame.clone()) {
                Ok(()) => out.enqueued += 1,
                Err(TrySendError::Full(_)) => match notify {
                    Some((c, id)) => {
                        conn.coalesced.put(c, id);
                        out.coalesced += 1;
                    }
                    None => out.overflowed.push(conn.handle.clone()),
                },
                // The connection is going away; its inbox has the message.
                Err(TrySendError::Closed(_)) => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(conn_id: u64, client_id: u64, cap: usize) -> (LocalConn<u64>, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(cap);
        (
            LocalConn {
                conn_id,
                client_id,
                since_ms: conn_id,
                tx,
                coalesced: Arc::default(),
                handle: conn_id,
            },
            rx,
        )
    }

    #[test]
    fn first_and_last_connection_of_a_user_are_reported() {
        let s = Sessions::new();
        let (a, _ra) = conn(1, 10, 4);
        let (b, _rb) = conn(2, 11, 4);
        assert!(s.insert(7, a));
        assert!(!s.insert(7, b));
        assert_eq!(s.connections(), 2);
        assert!(!s.remove(7, 1));
        assert!(!s.remove(7, 1), "removing twice is not a last");
        assert!(s.remove(7, 2));
        assert!(!s.has_user(7));
        assert!(!s.remove(8, 1));
    }

    #[test]
    fn a_second_connection_of_a_device_replaces_the_first() {
        let s = Sessions::new();
        let (a, _ra) = conn(1, 10, 4);
        let (b, _rb) = conn(2, 11, 4);
        let (again, _rc) = conn(3, 10, 4);
        assert_eq!(s.insert_replacing(7, a), (true, vec![]));
        assert_eq!(s.insert_replacing(7, b), (false, vec![]));
        assert_eq!(s.insert_replacing(7, again), (false, vec![1]));
        assert_eq!(s.connections(), 2);
        // The replaced connection's own removal later changes nothing.
        assert!(!s.remove(7, 1));
        assert_eq!(s.connections(), 2);
    }

    #[test]
    fn a_newer_connection_elsewhere_finds_the_older_ones_here() {
        let s = Sessions::new();
        // Local conn 1 of device 10 connected at "1" (since_ms = conn id in
        // these tests), conn 2 of device 11.
        let (a, _ra) = conn(1, 10, 4);
        let (b, _rb) = conn(2, 11, 4);
        s.insert(7, a);
        s.insert(7, b);
        // An older announcement finds nothing; nor does our own.
        assert!(s.older_than(7, 10, (0, 9, 5), 3).is_empty());
        assert!(s.older_than(7, 10, (1, 3, 1), 3).is_empty());
        // A newer one on edge 9 finds conn 1; device 11 is not touched.
        assert_eq!(s.older_than(7, 10, (5, 9, 1), 3), vec![1]);
        assert!(s.older_than(8, 10, (5, 9, 1), 3).is_empty());
    }

    #[test]
    fn fan_out_shares_one_frame_skips_the_sender_and_flags_slow_consumers() {
        let s = Sessions::new();
        let (a, mut ra) = conn(1, 10, 4);
        let (b, mut rb) = conn(2, 11, 1);
        let (c, mut rc) = conn(3, 12, 4);
        s.insert(7, a);
        s.insert(7, b);
        s.insert(7, c);
        let frame = Bytes::from_static(b"frame");
        let r = s.fan_out(7, 12, &frame, None);
        assert_eq!((r.enqueued, r.overflowed.len()), (2, 0));
        let got = ra.try_recv().unwrap();
        assert_eq!(got.as_ptr(), frame.as_ptr(), "the same bytes, not a copy");
        assert!(rc.try_recv().is_err(), "the sending device gets no copy");
        // b's queue (capacity 1) is still full: it is a slow consumer.
        let r = s.fan_out(7, 0, &frame, None);
        assert_eq!(r.enqueued, 2);
        assert_eq!(r.overflowed, vec![2]);
        assert!(rb.try_recv().is_ok());
        assert_eq!(s.fan_out(99, 0, &frame, None).enqueued, 0);
    }

    #[test]
    fn notifications_for_a_full_queue_coalesce_per_conversation() {
        let s = Sessions::new();
        let (a, mut ra) = conn(1, 10, 1);
        let coalesced = a.coalesced.clone();
        s.insert(7, a);
        let frame = Bytes::from_static(b"notify");
        assert_eq!(s.fan_out(7, 0, &frame, Some((5, 100))).enqueued, 1);
        for id in 101..=150 {
            let r = s.fan_out(7, 0, &frame, Some((5, id)));
            assert_eq!((r.enqueued, r.coalesced, r.overflowed.len()), (0, 1, 0));
        }
        s.fan_out(7, 0, &frame, Some((6, 7)));
        let mut got = coalesced.take();
        got.sort_unstable();
        assert_eq!(
            got,
            vec![(5, 150), (6, 7)],
            "the newest id per conversation"
        );
        assert!(coalesced.take().is_empty());
        assert!(ra.try_recv().is_ok());
        // A full message (not a notification) still marks a slow consumer.
        s.fan_out(7, 0, &frame, None);
        assert_eq!(s.fan_out(7, 0, &frame, None).overflowed, vec![1]);
    }
}
