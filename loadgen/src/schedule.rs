//! The open-loop send schedule of a scenario, pure: given the scenario, its
//! conversations and a random source, the steps a run takes and when (in
//! seconds from the first send). The driver sleeps until each step's time
//! and does it, whatever earlier sends are still doing.

use rand::Rng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;

use crate::scenario::{ConversationPlan, RateKind, Scenario, Sender};

/// Who sends a scheduled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendAs {
    /// This member (the driver sends from the user's first device).
    Member(u64),
    /// The backend, over the HTTP API.
    Publisher,
}

/// One step of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// A message into `conversation`.
    Send {
        conversation: u64,
        from: SendAs,
        /// Before the end of the warm-up: counted for loss, not latency.
        warm: bool,
    },
    /// The scenario's reconnect storm.
    Storm,
    /// The scenario's edge fault.
    Fault,
}

/// The steps of a scenario, in time order: `(seconds from the first send,
/// step)`.
pub struct Schedule<'a, R> {
    scenario: &'a Scenario,
    by_group: Vec<Vec<&'a ConversationPlan>>,
    pick_group: WeightedIndex<f64>,
    rng: R,
    t: f64,
    /// A send drawn but not yet returned (a storm or fault due first).
    pending: Option<(f64, Step)>,
    storm_at: Option<f64>,
    fault_at: Option<f64>,
}

impl<'a, R: Rng> Schedule<'a, R> {
    /// Fails if the scenario's group weights cannot be drawn from (every
    /// weight zero) or a group has no conversation.
    pub fn new(
        scenario: &'a Scenario,
        plans: &'a [ConversationPlan],
        rng: R,
    ) -> Result<Self, String> {
        let weights: Vec<f64> = scenario.conversations.iter().map(|g| g.weight).collect();
        let pick_group = WeightedIndex::new(&weights).map_err(|e| format!("group weights: {e}"))?;
        let by_group: Vec<Vec<&ConversationPlan>> = (0..scenario.conversations.len())
            .map(|g| plans.iter().filter(|p| p.group == g).collect())
            .collect();
        if let Some(g) = by_group
            .iter()
            .enumerate()
            .find(|(g, v)| v.is_empty() && weights[*g] > 0.0)
        {
            return Err(format!("group {} has no conversation", g.0));
        }
        Ok(Self {
            scenario,
            by_group,
            pick_group,
            rng,
            t: 0.0,
            pending: None,
            storm_at: scenario
                .reconnect_storm
                .as_ref()
                .map(|s| scenario.warmup_s + s.at_s),
            fault_at: scenario.edge_fault.as_ref().map(|f| f.at_s),
        })
    }

    /// The next send, `None` once past the scenario's end.
    fn next_send(&mut self) -> Option<(f64, Step)> {
        let s = self.scenario;
        // A gap drawn at the rate of the moment; one that crosses into the
        // next stage starts again there at that stage's rate (exact for
        // Poisson, which has no memory).
        loop {
            let (rate, until) = s.rate_at(self.t);
            let gap = match s.rate.kind {
                RateKind::Constant => 1.0 / rate,
                RateKind::Poisson => {
                    let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
                    -u.ln() / rate
                }
            };
            if self.t + gap >= until {
                self.t = until;
                continue;
            }
            self.t += gap;
            break;
        }
        if self.t >= s.warmup_s + s.duration_s {
            return None;
        }
        let g = self.pick_group.sample(&mut self.rng);
        let plans = &self.by_group[g];
        let plan = plans[self.rng.random_range(0..plans.len())];
        let from = match s.conversations[g].sender {
            Sender::Member => {
                SendAs::Member(plan.members[self.rng.random_range(0..plan.members.len())])
            }
            Sender::Publisher => SendAs::Publisher,
        };
        Some((
            self.t,
            Step::Send {
                conversation: plan.id,
                from,
                warm: self.t < s.warmup_s,
            },
        ))
    }
}

impl<R: Rng> Iterator for Schedule<'_, R> {
    type Item = (f64, Step);

    fn next(&mut self) -> Option<(f64, Step)> {
        let send = match self.pending.take() {
            Some(s) => Some(s),
            None => self.next_send(),
        };
        // A storm or fault falls at the first send at or after its time
        // (and before it); none happens after the last send.
        let (t, _) = send?;
        if self.storm_at.is_some_and(|at| t >= at) {
            self.storm_at = None;
            self.pending = send;
            return Some((t, Step::Storm));
        }
        if self.fault_at.is_some_and(|at| t >= at) {
            self.fault_at = None;
            self.pending = send;
            return Some((t, Step::Fault));
        }
        send
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn scenario(extra: &str) -> Scenario {
        let text = format!(
            r#"
            name = "t"
            users = 20
            duration_s = 10
            warmup_s = 2
            {extra}
            [rate]
            messages_per_s = 50
            kind = "constant"
            [[conversations]]
            name = "chats"
            count = 3
            size_min = 4
            weight = 3
            [[conversations]]
            name = "channel"
            count = 1
            size_min = 20
            sender = "publisher"
            weight = 1
            "#
        );
        let s: Scenario = toml::from_str(&text).unwrap();
        s.validate().unwrap();
        s
    }

    #[test]
    fn stages_step_the_rate_after_the_warm_up() {
        let s = scenario(
            "stages = [{ duration_s = 4, messages_per_s = 10 }, { duration_s = 6, messages_per_s = 100 }]",
        );
        let plans = crate::scenario::layout(&s, 100);
        let times: Vec<f64> = Schedule::new(&s, &plans, StdRng::seed_from_u64(7))
            .unwrap()
            .map(|(t, _)| t)
            .collect();
        let count = |a: f64, b: f64| times.iter().filter(|&&t| a <= t && t < b).count();
        // Warm-up at the scenario's rate (50/s x 2 s), then 10/s x 4 s,
        // then 100/s x 6 s (constant: exact up to the boundaries).
        assert!((99..=100).contains(&count(0.0, 2.0)), "{}", count(0.0, 2.0));
        assert!((39..=41).contains(&count(2.0, 6.0)), "{}", count(2.0, 6.0));
        assert!(
            (599..=600).contains(&count(6.0, 12.0)),
            "{}",
            count(6.0, 12.0)
        );
        assert_eq!(s.stage_windows(), vec![(2.0, 6.0), (6.0, 12.0)]);
        let bad = "stages = [{ duration_s = 4, messages_per_s = 10 }]";
        let text = format!(
            "name = \"t\"\nusers = 4\nduration_s = 10\n{bad}\nrate = {{ kind = \"constant\", messages_per_s = 1 }}\n[[conversations]]\nname = \"c\"\ncount = 1\nsize_min = 2\n"
        );
        let s: Scenario = toml::from_str(&text).unwrap();
        assert!(s.validate().unwrap_err().contains("add up"));
    }

    #[test]
    fn a_constant_rate_sends_at_its_times_from_members_and_the_backend() {
        let s = scenario("");
        let plans = crate::scenario::layout(&s, 100);
        let steps: Vec<(f64, Step)> = Schedule::new(&s, &plans, StdRng::seed_from_u64(7))
            .unwrap()
            .collect();
        // 12 s at 50/s, the first at 0.02 s, none at 12 s itself.
        assert!((599..=600).contains(&steps.len()), "{}", steps.len());
        assert!(steps.windows(2).all(|w| w[0].0 < w[1].0));
        let warm = steps
            .iter()
            .filter(|(_, s)| matches!(s, Step::Send { warm: true, .. }))
            .count();
        assert!((99..=100).contains(&warm), "{warm}");
        let (mut members, mut backend) = (0, 0);
        for (_, step) in &steps {
            let Step::Send {
                conversation, from, ..
            } = step
            else {
                panic!("no storm or fault in this scenario: {step:?}");
            };
            let plan = plans.iter().find(|p| p.id == *conversation).unwrap();
            match from {
                SendAs::Member(u) => {
                    assert!(plan.members.contains(u));
                    assert_eq!(plan.group, 0);
                    members += 1;
                }
                SendAs::Publisher => {
                    assert_eq!(plan.group, 1);
                    backend += 1;
                }
            }
        }
        // Weights 3:1.
        assert!(members > 2 * backend, "{members} vs {backend}");
    }

    #[test]
    fn a_storm_and_a_fault_happen_once_at_their_times() {
        let s = scenario(
            "[reconnect_storm]\nat_s = 3\nedge = 0\n[edge_fault]\nat_s = 4\nedge = 0\nsignal = \"kill\"",
        );
        let plans = crate::scenario::layout(&s, 100);
        let steps: Vec<(f64, Step)> = Schedule::new(&s, &plans, StdRng::seed_from_u64(1))
            .unwrap()
            .collect();
        let at = |want: Step| -> Vec<f64> {
            steps
                .iter()
                .filter(|(_, s)| *s == want)
                .map(|(t, _)| *t)
                .collect()
        };
        // The storm is after the warm-up (2 + 3 s), the fault from the
        // first send (4 s).
        let storm = at(Step::Storm);
        let fault = at(Step::Fault);
        assert_eq!(storm.len(), 1);
        assert_eq!(fault.len(), 1);
        assert!((5.0..5.03).contains(&storm[0]), "{storm:?}");
        assert!((4.0..4.03).contains(&fault[0]), "{fault:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let s = scenario("");
        let plans = crate::scenario::layout(&s, 100);
        let a: Vec<_> = Schedule::new(&s, &plans, StdRng::seed_from_u64(3))
            .unwrap()
            .collect();
        let b: Vec<_> = Schedule::new(&s, &plans, StdRng::seed_from_u64(3))
            .unwrap()
            .collect();
        assert_eq!(a, b);
    }
}
