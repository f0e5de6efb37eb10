//! The ledger of a load run: which device should get each message sent,
//! against what each device received. Pure: the driver hands it what was
//! sent and read-only views of the devices' receipts; it walks members ×
//! devices once, for the settle check and for the tally alike.
//!
//! A tier-3 notification covers every earlier message of its channel
//! (notifications coalesce by design), so a device has a tier-3 message
//! once notified of it or of a later one.

use std::collections::{BTreeMap, HashMap};

use hdrhistogram::Histogram;

/// A message the run sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub id: u64,
    pub conversation: u64,
    /// When it was scheduled, microseconds since the run's base (latency
    /// counts from here).
    pub scheduled_us: u64,
    /// The sending device (an index into the run's devices); none for the
    /// backend.
    pub sender: Option<usize>,
    /// Sent during the warm-up: counted for loss, not for latency.
    pub warm: bool,
    /// When the sender had its id, microseconds since the run's base, and
    /// whether the engine answered from its deduplication record (a retry
    /// of a send that was stored already).
    pub acked_us: u64,
    pub duplicate: bool,
}

/// What one device received, as the ledger reads it.
pub trait Receipts {
    /// When message `id` first arrived (microseconds since the run's base).
    fn arrival(&self, id: u64) -> Option<u64>;
    /// When the device was first notified of message `id` of channel
    /// `conversation` or of a later one.
    fn notified(&self, conversation: u64, id: u64) -> Option<u64>;
}

/// Who gets what: every conversation's members and tier, and the devices
/// of every user.
#[derive(Debug, Default)]
pub struct Audience {
    members: HashMap<u64, Vec<u64>>,
    tiers: HashMap<u64, u8>,
    devices_of_user: HashMap<u64, Vec<usize>>,
}

impl Audience {
    /// `device_users[i]`: the user of device `i`.
    pub fn new(
        members: impl IntoIterator<Item = (u64, Vec<u64>)>,
        tiers: HashMap<u64, u8>,
        device_users: impl IntoIterator<Item = u64>,
    ) -> Self {
        let mut devices_of_user: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, u) in device_users.into_iter().enumerate() {
            devices_of_user.entry(u).or_default().push(i);
        }
        Self {
            members: members.into_iter().collect(),
            tiers,
            devices_of_user,
        }
    }

    /// The tier serving `conversation` (1 if unknown).
    pub fn tier(&self, conversation: u64) -> u8 {
        self.tiers.get(&conversation).copied().unwrap_or(1)
    }

    /// The devices message `m` is for: every device of every member but
    /// the sender's.
    pub fn recipients(&self, m: &Sent) -> impl Iterator<Item = usize> + '_ {
        let sender = m.sender;
        self.members
            .get(&m.conversation)
            .into_iter()
            .flatten()
            .flat_map(|u| self.devices_of_user.get(u).into_iter().flatten())
            .copied()
            .filter(move |&d| Some(d) != sender)
    }

    /// When device `d` had message `m`, by its tier's rule.
    fn arrival<R: Receipts>(&self, m: &Sent, log: &R) -> Option<u64> {
        if self.tier(m.conversation) == 3 {
            log.notified(m.conversation, m.id)
                .or_else(|| log.arrival(m.id))
        } else {
            log.arrival(m.id)
        }
    }

    /// The deliveries missing now, over every device, as (index into
    /// `sent`, device): the settle waits for none.
    pub fn missing_list<R: Receipts>(&self, sent: &[Sent], logs: &[R]) -> Vec<(usize, usize)> {
        // Tier 3: a device is complete for a channel once notified of its
        // newest message.
        let mut newest3: HashMap<u64, usize> = HashMap::new();
        let mut out = Vec::new();
        let mut add = |i: usize, m: &Sent| {
            out.extend(
                self.recipients(m)
                    .filter(|&d| self.arrival(m, &logs[d]).is_none())
                    .map(|d| (i, d)),
            );
        };
        for (i, m) in sent.iter().enumerate() {
            if self.tier(m.conversation) == 3 {
                let e = newest3.entry(m.conversation).or_insert(i);
                if m.id > sent[*e].id {
                    *e = i;
                }
                continue;
            }
            add(i, m);
        }
        for &i in newest3.values() {
            add(i, &sent[i]);
        }
        out
    }

    /// Keeps those of `list` (from [`Self::missing_list`] over the same
    /// `sent`) that are still missing. An arrival is never taken back, so
    /// the settle scans every delivery once and then only these (a scan of
    /// every delivery each 200 ms cost loadgen's CPU window a few percent).
    pub fn still_missing<R: Receipts>(
        &self,
        list: &mut Vec<(usize, usize)>,
        sent: &[Sent],
        logs: &[R],
    ) {
        list.retain(|&(i, d)| self.arrival(&sent[i], &logs[d]).is_none());
    }

    /// Up to `limit` deliveries missing now, as (device, message): what a
    /// run that lost something shows of where it went.
    pub fn missing_sample<R: Receipts>(
        &self,
        sent: &[Sent],
        logs: &[R],
        limit: usize,
    ) -> Vec<(usize, Sent)> {
        let mut out = Vec::new();
        for m in sent {
            for d in self.recipients(m) {
                if out.len() == limit {
                    return out;
                }
                if self.arrival(m, &logs[d]).is_none() {
                    out.push((d, *m));
                }
            }
        }
        out
    }

    /// Per window of `windows` (microseconds from `send_start_us`, e.g. a
    /// scenario's stages): the messages scheduled in it, their deliveries
    /// and those deliveries' latencies.
    pub fn tally_windows<R: Receipts>(
        &self,
        sent: &[Sent],
        logs: &[R],
        send_start_us: u64,
        windows: &[(u64, u64)],
    ) -> Vec<WindowTally> {
        let mut out: Vec<WindowTally> = windows.iter().map(|_| WindowTally::default()).collect();
        for m in sent {
            let at = m.scheduled_us.saturating_sub(send_start_us);
            let Some(w) = windows.iter().position(|&(a, b)| a <= at && at < b) else {
                continue;
            };
            let t = &mut out[w];
            t.sends += 1;
            for d in self.recipients(m) {
                if let Some(arrived) = self.arrival(m, &logs[d]) {
                    t.deliveries += 1;
                    t.latency
                        .saturating_record(arrived.saturating_sub(m.scheduled_us).max(1));
                }
            }
        }
        out
    }

    /// Expected against received, per tier, with latencies of the measured
    /// (not warm-up) messages and a per-second timeline from
    /// `send_start_us`.
    pub fn tally<R: Receipts>(&self, sent: &[Sent], logs: &[R], send_start_us: u64) -> Tally {
        let mut t = Tally::default();
        for m in sent {
            let tier = self.tier(m.conversation);
            let counts = t.tiers.entry(tier).or_default();
            counts.messages += 1;
            let sec = m.scheduled_us.saturating_sub(send_start_us) / 1_000_000;
            t.seconds.entry(sec).or_default().sends += 1;
            for d in self.recipients(m) {
                counts.expected += 1;
                let Some(at) = self.arrival(m, &logs[d]) else {
                    counts.lost += 1;
                    continue;
                };
                counts.delivered += 1;
                if m.warm {
                    continue;
                }
                let latency = at.saturating_sub(m.scheduled_us).max(1);
                t.latency
                    .entry(tier)
                    .or_insert_with(histogram)
                    .saturating_record(latency);
                t.all.saturating_record(latency);
                let s = t
                    .seconds
                    .entry(at.saturating_sub(send_start_us) / 1_000_000)
                    .or_default();
                s.deliveries += 1;
                s.latency.saturating_record(latency);
            }
        }
        t
    }
}

/// What [`Audience::tally_windows`] counts per window.
#[derive(Debug, Clone)]
pub struct WindowTally {
    pub sends: u64,
    pub deliveries: u64,
    pub latency: Histogram<u64>,
}

impl Default for WindowTally {
    fn default() -> Self {
        Self {
            sends: 0,
            deliveries: 0,
            latency: histogram(),
        }
    }
}

/// A latency histogram of a run: 1 us to 10 minutes, 3 digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Messages, expected, delivered and lost deliveries of one tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub messages: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
}

/// One second of the run: sends scheduled in it, deliveries in it and
/// their latencies.
#[derive(Debug, Clone)]
pub struct Second {
    pub sends: u64,
    pub deliveries: u64,
    pub latency: Histogram<u64>,
}

impl Default for Second {
    fn default() -> Self {
        Self {
            sends: 0,
            deliveries: 0,
            latency: histogram(),
        }
    }
}

/// The ledger's verdict.
#[derive(Debug, Clone)]
pub struct Tally {
    pub tiers: BTreeMap<u8, Counts>,
    /// Latency per tier, measured messages only.
    pub latency: BTreeMap<u8, Histogram<u64>>,
    pub all: Histogram<u64>,
    pub seconds: BTreeMap<u64, Second>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            tiers: BTreeMap::new(),
            latency: BTreeMap::new(),
            all: histogram(),
            seconds: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log {
        arrivals: HashMap<u64, u64>,
        notifies: Vec<(u64, u64, u64)>,
    }

    impl Receipts for Log {
        fn arrival(&self, id: u64) -> Option<u64> {
            self.arrivals.get(&id).copied()
        }
        fn notified(&self, conversation: u64, id: u64) -> Option<u64> {
            self.notifies
                .iter()
                .find(|(c, n, _)| *c == conversation && *n >= id)
                .map(|(_, _, at)| *at)
        }
    }

    fn sent(id: u64, conversation: u64, sender: Option<usize>, warm: bool) -> Sent {
        Sent {
            id,
            conversation,
            scheduled_us: id * 1_000,
            sender,
            warm,
            acked_us: id * 1_000,
            duplicate: false,
        }
    }

    /// Users 1 and 2 with two devices each (0, 1 and 2, 3); a chat (tier
    /// 1) of both, and a channel (tier 3) of both.
    fn audience() -> Audience {
        Audience::new(
            [(10, vec![1, 2]), (30, vec![1, 2])],
            HashMap::from([(10, 1), (30, 3)]),
            [1, 1, 2, 2],
        )
    }

    #[test]
    fn a_message_is_for_every_device_of_every_member_but_the_sender() {
        let a = audience();
        let r: Vec<usize> = a.recipients(&sent(1, 10, Some(0), false)).collect();
        assert_eq!(r, vec![1, 2, 3]);
        let r: Vec<usize> = a.recipients(&sent(2, 30, None, false)).collect();
        assert_eq!(r, vec![0, 1, 2, 3]);
        assert_eq!(a.recipients(&sent(3, 99, None, false)).count(), 0);
    }

    #[test]
    fn missing_and_lost_are_exact_and_a_later_notification_covers_earlier_ones() {
        let a = audience();
        let msgs = [
            sent(1, 10, Some(0), true),
            sent(2, 10, Some(2), false),
            sent(3, 30, None, false),
            sent(4, 30, None, false),
        ];
        let mut logs: Vec<Log> = (0..4).map(|_| Log::default()).collect();
        // Message 1 reaches devices 1 and 2 (not 3); message 2 reaches all
        // but device 1.
        logs[1].arrivals.insert(1, 1_500);
        logs[2].arrivals.insert(1, 1_700);
        logs[0].arrivals.insert(2, 2_400);
        logs[3].arrivals.insert(2, 2_900);
        // Devices 0..=2 are notified of 4 (covering 3); device 3 of 3 only.
        for log in logs.iter_mut().take(3) {
            log.notifies.push((30, 4, 5_000));
        }
        logs[3].notifies.push((30, 3, 3_100));
        // Missing: tier 1 devices 3 (msg 1) and 1 (msg 2); tier 3 only the
        // newest counts: device 3.
        let mut list = a.missing_list(&msgs, &logs);
        assert_eq!(list.len(), 3);
        list.sort_unstable();
        assert_eq!(list, vec![(0, 3), (1, 1), (3, 3)]);
        // What arrives later leaves the list; nothing else changes it.
        logs[1].arrivals.insert(2, 9_000);
        a.still_missing(&mut list, &msgs, &logs);
        assert_eq!(list, vec![(0, 3), (3, 3)]);
        logs[1].arrivals.remove(&2);

        let t = a.tally(&msgs, &logs, 0);
        assert_eq!(
            t.tiers[&1],
            Counts {
                messages: 2,
                expected: 6,
                delivered: 4,
                lost: 2
            }
        );
        assert_eq!(
            t.tiers[&3],
            Counts {
                messages: 2,
                expected: 8,
                delivered: 7,
                lost: 1
            }
        );
        // Latency of measured messages only: message 2 (400, 900 us) and
        // the tier-3 ones; the warm-up message 1 is not in it.
        assert_eq!(t.latency[&1].len(), 2);
        assert_eq!(t.latency[&1].max(), 900);
        assert_eq!(t.all.len(), 2 + 7);
        assert_eq!(t.seconds.values().map(|s| s.sends).sum::<u64>(), 4);
    }
}
