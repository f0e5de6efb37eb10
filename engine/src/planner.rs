//! The tier planner: which fan-out tier a conversation is served by, from
//! its size, its current tier and an operator's pin. Pure: no I/O, no clock.
//!
//! Thresholds have hysteresis: a conversation moves up when it grows past a
//! threshold and moves back down only when it shrinks below the threshold
//! less `hysteresis_pct`, so a group hovering at the boundary does not flap
//! between tiers with every join and leave.

use serde::{Deserialize, Serialize};
use tiercast_schemas::envelope::Tier;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Members at which a conversation leaves tier 1 (direct) for tier 2.
    /// Tier 1 costs one publish per member per message; tier 2 costs one per
    /// hosting edge, so tier 2 wins once members outnumber edges, and tier 1
    /// keeps its per-device inbox (the strongest catch-up) for small chats.
    /// docs/fanout.md has the measurements behind 100.
    pub sharded_above: u64,
    /// Members at which a conversation moves to tier 3 (ID-only). Above a few
    /// thousand members most devices are not reading, so sending every body
    /// to every edge costs more bandwidth than pulling on read.
    pub id_only_above: u64,
    /// How far (percent of a threshold) a conversation must shrink below it
    /// before it moves back down.
    pub hysteresis_pct: u8,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            sharded_above: 100,
            id_only_above: 5_000,
            hysteresis_pct: 10,
        }
    }
}

impl Thresholds {
    pub fn validate(&self) -> Result<(), String> {
        if self.sharded_above == 0 || self.id_only_above <= self.sharded_above {
            return Err("need 0 < sharded_above < id_only_above".into());
        }
        if self.hysteresis_pct > 50 {
            return Err("hysteresis_pct must be at most 50".into());
        }
        Ok(())
    }

    fn down_at(&self, threshold: u64) -> u64 {
        // In u128: a threshold near u64::MAX (valid, if absurd) must not
        // overflow.
        let cut = u128::from(threshold) * u128::from(self.hysteresis_pct) / 100;
        threshold - cut as u64
    }
}

/// The tier for a conversation of `members` members now served by
/// `current`, unless `pinned`.
pub fn plan(current: Tier, members: u64, pinned: Option<Tier>, t: &Thresholds) -> Tier {
    if let Some(p) = pinned {
        return p;
    }
    // What the size alone says, going up.
    let up = if members > t.id_only_above {
        Tier::IdOnly
    } else if members > t.sharded_above {
        Tier::Sharded
    } else {
        Tier::Direct
    };
    if up >= current {
        return up;
    }
    // Going down: only past the hysteresis band below each threshold.
    let mut tier = current;
    if tier == Tier::IdOnly && members <= t.down_at(t.id_only_above) {
        tier = Tier::Sharded;
    }
    if tier == Tier::Sharded && members <= t.down_at(t.sharded_above) {
        tier = Tier::Direct;
    }
    tier
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Thresholds = Thresholds {
        sharded_above: 100,
        id_only_above: 5_000,
        hysteresis_pct: 10,
    };

    #[test]
    fn grows_through_the_tiers() {
        assert_eq!(plan(Tier::Direct, 2, None, &T), Tier::Direct);
        assert_eq!(plan(Tier::Direct, 100, None, &T), Tier::Direct);
        assert_eq!(plan(Tier::Direct, 101, None, &T), Tier::Sharded);
        assert_eq!(plan(Tier::Direct, 5_001, None, &T), Tier::IdOnly);
        assert_eq!(plan(Tier::Sharded, 1_000_000, None, &T), Tier::IdOnly);
    }

    #[test]
    fn shrinking_waits_for_the_hysteresis_band() {
        assert_eq!(plan(Tier::Sharded, 95, None, &T), Tier::Sharded);
        assert_eq!(plan(Tier::Sharded, 90, None, &T), Tier::Direct);
        assert_eq!(plan(Tier::IdOnly, 4_600, None, &T), Tier::IdOnly);
        assert_eq!(plan(Tier::IdOnly, 4_500, None, &T), Tier::Sharded);
        assert_eq!(plan(Tier::IdOnly, 10, None, &T), Tier::Direct);
    }

    /// Found by reading the fuzzed config path: thresholds near u64::MAX
    /// pass validation and used to overflow the hysteresis band.
    #[test]
    fn huge_thresholds_do_not_overflow() {
        let t = Thresholds {
            sharded_above: 1_000_000_000_000_000_000,
            id_only_above: 9_000_000_000_000_000_000,
            hysteresis_pct: 50,
        };
        assert_eq!(plan(Tier::IdOnly, 10, None, &t), Tier::Direct);
        assert_eq!(plan(Tier::Sharded, u64::MAX, None, &t), Tier::IdOnly);
    }

    #[test]
    fn a_pin_wins() {
        assert_eq!(plan(Tier::Direct, 3, Some(Tier::IdOnly), &T), Tier::IdOnly);
        assert_eq!(
            plan(Tier::IdOnly, 1_000_000, Some(Tier::Direct), &T),
            Tier::Direct
        );
    }

    proptest! {
        /// Without a pin, the tier is always one the size allows: never above
        /// what growth gives, never more than the band below it.
        #[test]
        fn tier_is_within_the_band(members in 0u64..20_000, start in 1u8..=3) {
            let current = Tier::from_u8(start).unwrap();
            let t = plan(current, members, None, &T);
            let up = plan(Tier::Direct, members, None, &T);
            prop_assert!(t >= up);
            if t > up {
                prop_assert!(t <= current);
            }
        }

        /// Joining and leaving one member at a time around a threshold
        /// changes the tier at most once per crossing of the whole band.
        #[test]
        fn no_flapping(start in 80u64..120, steps in proptest::collection::vec(any::<bool>(), 1..200)) {
            let mut members = start;
            let mut tier = plan(Tier::Direct, members, None, &T);
            let mut changes = 0;
            let mut last_change_at: Option<u64> = None;
            for join in steps {
                members = if join { members + 1 } else { members.saturating_sub(1) };
                let next = plan(tier, members, None, &T);
                if next != tier {
                    if let Some(at) = last_change_at {
                        // Consecutive changes are at least the band apart.
                        prop_assert!(at.abs_diff(members) >= 10, "flapped at {members} after {at}");
                    }
                    last_change_at = Some(members);
                    changes += 1;
                    tier = next;
                }
            }
            prop_assert!(changes <= 200);
        }
    }
}
