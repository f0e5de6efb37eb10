//! The edge's table of local connections by user and device, for what is
//! decided across shards: one live connection per device (the newer wins,
//! here and across edges), whether a user has a connection here (the
//! user's channel and routes), and which devices to keep alive in the
//! store. The frames themselves go out through the shards' own indexes
//! (`crate::core`).
//!
//! Pure bookkeeping: the connection handle `C` is whatever closes a
//! connection (a `crate::core::ConnRef` in the server, plain numbers in
//! tests), so this is tested without sockets.

use std::collections::HashMap;
use std::sync::Mutex;

/// One local connection of a user.
#[derive(Debug, Clone)]
pub struct LocalConn<C> {
    pub conn_id: u64,
    pub client_id: u64,
    /// When it connected (Unix ms): across edges, the newer connection of
    /// a device wins.
    pub since_ms: u64,
    pub handle: C,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(conn_id: u64, client_id: u64) -> LocalConn<u64> {
        LocalConn {
            conn_id,
            client_id,
            since_ms: conn_id,
            handle: conn_id,
        }
    }

    #[test]
    fn first_and_last_connection_of_a_user_are_reported() {
        let s = Sessions::new();
        let a = conn(1, 10);
        let b = conn(2, 11);
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
        let a = conn(1, 10);
        let b = conn(2, 11);
        let again = conn(3, 10);
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
        let a = conn(1, 10);
        let b = conn(2, 11);
        s.insert(7, a);
        s.insert(7, b);
        // An older announcement finds nothing; nor does our own.
        assert!(s.older_than(7, 10, (0, 9, 5), 3).is_empty());
        assert!(s.older_than(7, 10, (1, 3, 1), 3).is_empty());
        // A newer one on edge 9 finds conn 1; device 11 is not touched.
        assert_eq!(s.older_than(7, 10, (5, 9, 1), 3), vec![1]);
        assert!(s.older_than(8, 10, (5, 9, 1), 3).is_empty());
    }
}
