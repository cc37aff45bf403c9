//! Time, injected: everything in the engine that reads the time or waits goes through [`Clock`].
//!
//! [`SystemClock`] is the real one. [`SimClock`] is a discrete-event clock for tests and
//! simulation: `sleep_until` jumps time forward to the deadline at once, so days of schedule run
//! in milliseconds and the same inputs give the same run.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A point in time: the duration since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub Duration);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }

    /// From milliseconds since the Unix epoch.
    pub fn from_unix_ms(ms: u64) -> Self {
        Timestamp(Duration::from_millis(ms))
    }

    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d))
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

/// A boxed future, as returned by [`Clock::sleep_until`].
pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The source of time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
    /// Completes at or after `deadline`.
    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_>;
}

/// The machine's wall clock and tokio's timers.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place that reads the real time
    fn now(&self) -> Timestamp {
        Timestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        )
    }

    #[allow(clippy::disallowed_methods)] // the one place that really waits
    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_> {
        let wait = deadline.since(self.now());
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A simulated clock: time moves only when told to, or when someone sleeps.
#[derive(Clone, Debug, Default)]
pub struct SimClock {
    now_ns: Arc<AtomicU64>,
}

impl SimClock {
    /// A clock reading `start`.
    pub fn new(start: Timestamp) -> Self {
        SimClock {
            now_ns: Arc::new(AtomicU64::new(
                u64::try_from(start.0.as_nanos()).unwrap_or(u64::MAX),
            )),
        }
    }

    /// Moves time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.now_ns.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        Timestamp(Duration::from_nanos(self.now_ns.load(Ordering::SeqCst)))
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_> {
        let target = u64::try_from(deadline.0.as_nanos()).unwrap_or(u64::MAX);
        self.now_ns.fetch_max(target, Ordering::SeqCst);
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sim_clock_jumps_to_deadlines_and_never_goes_back() {
        let clock = SimClock::new(Timestamp::from_unix_ms(1_000));
        clock.sleep_until(Timestamp::from_unix_ms(5_000)).await;
        assert_eq!(clock.now(), Timestamp::from_unix_ms(5_000));
        clock.sleep_until(Timestamp::from_unix_ms(2_000)).await;
        assert_eq!(clock.now(), Timestamp::from_unix_ms(5_000));
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), Timestamp::from_unix_ms(6_000));
    }
}
