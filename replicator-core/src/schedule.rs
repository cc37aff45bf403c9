//! When the next cycle runs.
//!
//! The policy of the reference services: the initial full copy, then the first delta at once,
//! then each next delta `min(max(1 h, d / 2), 12 h)` after the previous delta finished, where `d`
//! is how long that delta took. A failed cycle is retried sooner, after a backoff that starts at
//! [`SchedulePolicy::retry_delay_min`] and doubles up to the normal minimum interval; its sectors
//! go into the retry. A cutover request runs one last delta at once, ahead of anything else, and
//! ends the schedule. The scheduler is pure: it reads no clock; callers pass times in.

use std::time::Duration;

use crate::clock::Timestamp;

/// The knobs of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulePolicy {
    /// Shortest gap between deltas (1 h).
    pub interval_min: Duration,
    /// Longest gap between deltas (12 h).
    pub interval_max: Duration,
    /// First retry delay after a failed cycle (5 min); doubles per consecutive failure.
    pub retry_delay_min: Duration,
}

impl Default for SchedulePolicy {
    fn default() -> Self {
        SchedulePolicy {
            interval_min: Duration::from_secs(3600),
            interval_max: Duration::from_secs(12 * 3600),
            retry_delay_min: Duration::from_secs(300),
        }
    }
}

impl SchedulePolicy {
    /// The gap after a delta that took `took`: `min(max(interval_min, took / 2), interval_max)`.
    pub fn delta_interval(&self, took: Duration) -> Duration {
        (took / 2).clamp(self.interval_min, self.interval_max)
    }

    /// The delay before retry number `failures` (1 = the first retry).
    pub fn retry_delay(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(20);
        self.retry_delay_min
            .saturating_mul(1u32 << shift)
            .min(self.interval_min)
    }
}

/// The kind of cycle to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CycleKind {
    /// The first, full copy of the disk.
    Initial,
    /// The sectors changed since the previous cycle.
    Delta,
    /// The last delta, with the source quiesced; ends the schedule.
    Cutover,
}

/// What the scheduler wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Run a cycle of `kind` at `at` (or at once if `at` has passed).
    Run {
        /// The kind of cycle.
        kind: CycleKind,
        /// When.
        at: Timestamp,
    },
    /// The cutover cycle succeeded: nothing more to run.
    Done,
}

/// The schedule's state.
#[derive(Clone, Debug)]
pub struct Scheduler {
    policy: SchedulePolicy,
    next: Next,
    consecutive_failures: u32,
    cutover_requested: bool,
    /// Durations of the latest successful deltas, oldest first (at most [`CHURN_TREND_CYCLES`]).
    recent_deltas: Vec<Duration>,
}

/// Successive deltas looked at for the high-churn warning.
pub const CHURN_TREND_CYCLES: usize = 3;

impl Scheduler {
    /// A schedule starting now; `initial_done` says whether the initial copy already happened
    /// (then the next cycle is a delta, at once).
    pub fn new(policy: SchedulePolicy, now: Timestamp, initial_done: bool) -> Self {
        let kind = if initial_done {
            CycleKind::Delta
        } else {
            CycleKind::Initial
        };
        Scheduler {
            policy,
            next: Next::Run { kind, at: now },
            consecutive_failures: 0,
            cutover_requested: false,
            recent_deltas: Vec::new(),
        }
    }

    /// What to run next, and when.
    pub fn next(&self) -> Next {
        self.next
    }

    /// A high-churn warning, when the last [`CHURN_TREND_CYCLES`] deltas each took longer than
    /// the one before and the gap they lead to has reached half the 12 h clamp or more: the
    /// source changes faster than a cycle ships it, so the recovery point keeps slipping.
    pub fn churn_warning(&self) -> Option<String> {
        let d = &self.recent_deltas;
        if d.len() < CHURN_TREND_CYCLES || !d.windows(2).all(|w| w[1] > w[0]) {
            return None;
        }
        let last = d[d.len() - 1];
        let gap = self.policy.delta_interval(last);
        if gap * 2 < self.policy.interval_max {
            return None;
        }
        Some(format!(
            "high churn: the last {} delta cycles each took longer ({}), and the next gap is {} s \
             of the {} s clamp; the cache or the target cannot keep up with the source's writes: \
             assess the disk's churn, move to a faster tier, or exclude the disk",
            d.len(),
            d.iter()
                .map(|x| format!("{} s", x.as_secs()))
                .collect::<Vec<_>>()
                .join(", "),
            gap.as_secs(),
            self.policy.interval_max.as_secs()
        ))
    }

    /// How many cycles in a row have failed.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Asks for the final delta: it runs at `now`, before any other cycle, unless the initial
    /// copy has not succeeded yet (then the initial copy runs first, and the cutover right after).
    pub fn request_cutover(&mut self, now: Timestamp) {
        self.cutover_requested = true;
        if let Next::Run {
            kind: CycleKind::Delta,
            ..
        } = self.next
        {
            self.next = Next::Run {
                kind: CycleKind::Cutover,
                at: now,
            };
        }
    }

    /// Records how the cycle of `kind` that ran from `started` to `finished` ended, and plans the
    /// next one.
    pub fn record(&mut self, kind: CycleKind, started: Timestamp, finished: Timestamp, ok: bool) {
        if !ok {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            let retry = if self.cutover_requested && kind != CycleKind::Initial {
                CycleKind::Cutover
            } else {
                kind
            };
            self.next = Next::Run {
                kind: retry,
                at: finished.plus(self.policy.retry_delay(self.consecutive_failures)),
            };
            return;
        }
        self.consecutive_failures = 0;
        if kind == CycleKind::Delta {
            if self.recent_deltas.len() == CHURN_TREND_CYCLES {
                self.recent_deltas.remove(0);
            }
            self.recent_deltas.push(finished.since(started));
        }
        self.next = match kind {
            CycleKind::Cutover => Next::Done,
            _ if self.cutover_requested => Next::Run {
                kind: CycleKind::Cutover,
                at: finished,
            },
            CycleKind::Initial => Next::Run {
                kind: CycleKind::Delta,
                at: finished,
            },
            CycleKind::Delta => Next::Run {
                kind: CycleKind::Delta,
                at: finished.plus(self.policy.delta_interval(finished.since(started))),
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, SimClock};

    const H: u64 = 3600;

    #[test]
    fn lengthening_deltas_toward_the_clamp_raise_a_churn_warning() {
        let clock = SimClock::new(Timestamp::from_unix_ms(0));
        let mut s = Scheduler::new(SchedulePolicy::default(), at(&clock), true);
        let mut run = |secs: u64| {
            let start = clock.now();
            clock.advance(Duration::from_secs(secs));
            s.record(CycleKind::Delta, start, clock.now(), true);
            s.churn_warning()
        };
        // Short, steady deltas: no warning.
        assert_eq!(run(600), None);
        assert_eq!(run(600), None);
        assert_eq!(run(600), None);
        // Growing, but the gap is still far from the clamp.
        assert_eq!(run(2 * H), None);
        assert_eq!(run(3 * H), None);
        // Growing toward the clamp: warned.
        let w = run(12 * H).unwrap_or_default();
        assert!(w.contains("high churn") && w.contains("21600 s"), "{w}");
        // One shorter delta ends the trend.
        assert_eq!(run(H), None);
    }

    fn at(clock: &SimClock) -> Timestamp {
        clock.now()
    }

    /// Runs the scheduler against a simulated clock; `took` says how long each cycle takes and
    /// whether it succeeds. Returns (kind, start time in seconds from the origin) per cycle.
    async fn simulate(
        cycles: usize,
        took: impl Fn(usize, CycleKind) -> (Duration, bool),
        cutover_after: Option<usize>,
    ) -> Vec<(CycleKind, u64, bool)> {
        let origin = Timestamp::from_unix_ms(1_700_000_000_000);
        let clock = SimClock::new(origin);
        let mut sched = Scheduler::new(SchedulePolicy::default(), at(&clock), false);
        let mut log = Vec::new();
        for i in 0..cycles {
            if cutover_after == Some(i) {
                sched.request_cutover(at(&clock));
            }
            let Next::Run { kind, at: when } = sched.next() else {
                break;
            };
            clock.sleep_until(when).await;
            let started = clock.now();
            let (duration, ok) = took(i, kind);
            clock.advance(duration);
            sched.record(kind, started, clock.now(), ok);
            log.push((kind, started.since(origin).as_secs(), ok));
        }
        log
    }

    #[test]
    fn interval_formula_and_both_clamps() {
        let p = SchedulePolicy::default();
        assert_eq!(
            p.delta_interval(Duration::from_secs(8 * H)),
            Duration::from_secs(4 * H)
        );
        assert_eq!(
            p.delta_interval(Duration::from_secs(60)),
            Duration::from_secs(H),
            "lower clamp"
        );
        assert_eq!(
            p.delta_interval(Duration::from_secs(30 * H)),
            Duration::from_secs(12 * H),
            "upper clamp"
        );
        assert_eq!(
            p.delta_interval(Duration::from_secs(3 * H)),
            Duration::from_secs(3 * H / 2)
        );
    }

    #[tokio::test]
    async fn days_of_schedule_follow_the_formula() {
        // Initial copy takes 10 h; deltas take 8 h, then 10 min, then 30 h.
        let durations = [10 * H, 8 * H, 600, 30 * H, 600];
        let log = simulate(5, |i, _| (Duration::from_secs(durations[i]), true), None).await;
        let kinds: Vec<CycleKind> = log.iter().map(|l| l.0).collect();
        assert_eq!(
            kinds,
            [
                CycleKind::Initial,
                CycleKind::Delta,
                CycleKind::Delta,
                CycleKind::Delta,
                CycleKind::Delta
            ]
        );
        let starts: Vec<u64> = log.iter().map(|l| l.1).collect();
        // first delta at once after the initial copy
        assert_eq!(starts[1], 10 * H);
        // an 8 h delta: next one 4 h after it ended
        assert_eq!(starts[2], starts[1] + 8 * H + 4 * H);
        // a 10 min delta: clamped up to 1 h
        assert_eq!(starts[3], starts[2] + 600 + H);
        // a 30 h delta: clamped down to 12 h
        assert_eq!(starts[4], starts[3] + 30 * H + 12 * H);
    }

    #[tokio::test]
    async fn a_failed_cycle_is_retried_with_backoff_then_schedule_resumes() {
        let log = simulate(
            6,
            |i, _| (Duration::from_secs(600), !(2..=3).contains(&i)),
            None,
        )
        .await;
        let starts: Vec<u64> = log.iter().map(|l| l.1).collect();
        assert_eq!(log[2].0, CycleKind::Delta);
        assert!(!log[2].2 && !log[3].2 && log[4].2);
        // first retry after 5 min, second after 10 min
        assert_eq!(starts[3], starts[2] + 600 + 300);
        assert_eq!(starts[4], starts[3] + 600 + 600);
        // after a success the normal interval applies again
        assert_eq!(starts[5], starts[4] + 600 + H);
    }

    #[tokio::test]
    async fn a_failed_initial_copy_is_retried_as_initial() {
        let log = simulate(3, |i, _| (Duration::from_secs(60), i != 0), None).await;
        assert_eq!(log[0].0, CycleKind::Initial);
        assert_eq!(log[1].0, CycleKind::Initial);
        assert_eq!(log[2].0, CycleKind::Delta);
    }

    #[tokio::test]
    async fn cutover_runs_at_once_and_ends_the_schedule() {
        let log = simulate(10, |_, _| (Duration::from_secs(2 * H), true), Some(3)).await;
        assert_eq!(log.len(), 4, "{log:?}");
        assert_eq!(log[3].0, CycleKind::Cutover);
        // requested when the clock read the end of cycle 2: it ran then, not an hour later
        assert_eq!(log[3].1, log[2].1 + 2 * H);
    }

    #[test]
    fn retry_delay_is_capped_at_the_minimum_interval() {
        let p = SchedulePolicy::default();
        assert_eq!(p.retry_delay(1), Duration::from_secs(300));
        assert_eq!(p.retry_delay(4), Duration::from_secs(2400));
        assert_eq!(p.retry_delay(5), Duration::from_secs(H));
        assert_eq!(p.retry_delay(60), Duration::from_secs(H));
    }
}
