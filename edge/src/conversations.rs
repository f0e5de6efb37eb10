//! Which conversations the users connected to this edge are in: the edge's
//! half of tiers 2 and 3. A payload on one of the edge's node channels names
//! a conversation; this index says which local users get it.
//!
//! Pure bookkeeping, kept current by connects, disconnects and membership
//! announcements; the route table in the backplane mirrors which
//! conversations have at least one local member (`hosts`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

#[derive(Debug, Default)]
struct Inner {
    by_conv: HashMap<u64, HashSet<u64>>,
    by_user: HashMap<u64, HashSet<u64>>,
}

#[derive(Debug, Default)]
pub struct LocalConversations {
    inner: Mutex<Inner>,
}

impl LocalConversations {
    pub fn new() -> Self {
        Self::default()
    }

    /// A user's first connection here: index their conversations, read
    /// from the store just now, in place of whatever was indexed before (a
    /// removal missed while the user was away must not survive). Returns
    /// every conversation whose local membership may have changed (old and
    /// new), for the route table.
    pub fn set_user(&self, user: u64, convs: &[u64]) -> Vec<u64> {
        let mut i = self.inner.lock().expect("index lock");
        let old = i.by_user.remove(&user).unwrap_or_default();
        for c in &old {
            if let Some(users) = i.by_conv.get_mut(c) {
                users.remove(&user);
                if users.is_empty() {
                    i.by_conv.remove(c);
                }
            }
        }
        let new: HashSet<u64> = convs.iter().copied().collect();
        for &c in &new {
            i.by_conv.entry(c).or_default().insert(user);
        }
        let touched = old.union(&new).copied().collect();
        i.by_user.insert(user, new);
        touched
    }

    /// A user's last connection left: returns the conversations they were in.
    pub fn remove_user(&self, user: u64) -> Vec<u64> {
        let mut i = self.inner.lock().expect("index lock");
        let convs: Vec<u64> = i
            .by_user
            .remove(&user)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        for c in &convs {
            if let Some(users) = i.by_conv.get_mut(c) {
                users.remove(&user);
                if users.is_empty() {
                    i.by_conv.remove(c);
                }
            }
        }
        convs
    }

    /// A local user joined a conversation; false if the user is not local.
    pub fn join(&self, user: u64, conv: u64) -> bool {
        let mut i = self.inner.lock().expect("index lock");
        let Some(mine) = i.by_user.get_mut(&user) else {
            return false;
        };
        mine.insert(conv);
        i.by_conv.entry(conv).or_default().insert(user);
        true
    }

    /// A local user left a conversation; false if the user is not local.
    pub fn leave(&self, user: u64, conv: u64) -> bool {
        let mut i = self.inner.lock().expect("index lock");
        let Some(mine) = i.by_user.get_mut(&user) else {
            return false;
        };
        mine.remove(&conv);
        if let Some(users) = i.by_conv.get_mut(&conv) {
            users.remove(&user);
            if users.is_empty() {
                i.by_conv.remove(&conv);
            }
        }
        true
    }

    /// The local users in a conversation.
    pub fn users(&self, conv: u64) -> Vec<u64> {
        self.inner
            .lock()
            .expect("index lock")
            .by_conv
            .get(&conv)
            .map(|u| u.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether any local user is in the conversation.
    pub fn hosts(&self, conv: u64) -> bool {
        self.inner
            .lock()
            .expect("index lock")
            .by_conv
            .contains_key(&conv)
    }

    pub fn is_member(&self, conv: u64, user: u64) -> bool {
        self.inner
            .lock()
            .expect("index lock")
            .by_conv
            .get(&conv)
            .is_some_and(|u| u.contains(&user))
    }

    pub fn conversations(&self) -> usize {
        self.inner.lock().expect("index lock").by_conv.len()
    }

    /// Every conversation with a local member.
    pub fn all(&self) -> Vec<u64> {
        self.inner
            .lock()
            .expect("index lock")
            .by_conv
            .keys()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_follows_connects_memberships_and_disconnects() {
        let ix = LocalConversations::new();
        ix.set_user(1, &[10, 11]);
        ix.set_user(2, &[11]);
        assert!(ix.hosts(10) && ix.hosts(11));
        let mut u = ix.users(11);
        u.sort_unstable();
        assert_eq!(u, vec![1, 2]);
        assert!(ix.join(2, 12));
        assert!(!ix.join(3, 12), "user 3 is not connected here");
        assert!(ix.is_member(12, 2));
        assert!(ix.leave(2, 12));
        assert!(!ix.hosts(12));
        let mut left = ix.remove_user(1);
        left.sort_unstable();
        assert_eq!(left, vec![10, 11]);
        assert!(!ix.hosts(10));
        assert_eq!(ix.users(11), vec![2]);
        assert_eq!(ix.conversations(), 1);
    }

    #[test]
    fn a_reconnect_replaces_the_user_s_conversations() {
        let ix = LocalConversations::new();
        ix.set_user(1, &[10, 11]);
        // Removed from 10 while away (the announcement never reached us).
        let mut touched = ix.set_user(1, &[11, 12]);
        touched.sort_unstable();
        assert_eq!(touched, vec![10, 11, 12]);
        assert!(!ix.is_member(10, 1));
        assert!(!ix.hosts(10));
        assert!(ix.is_member(11, 1) && ix.is_member(12, 1));
    }
}
