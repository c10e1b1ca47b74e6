//! The wait between attempts, one type for every loop that tries again: the dispatcher's
//! per-message retries (random, "full jitter"), and the reconnects of sources, publishers,
//! alert webhooks and store writes (the plain doubling ceiling, see [`Retries`]).

use std::time::Duration;

/// Capped exponential backoff with full jitter: attempt `n` waits a uniformly random time
/// in `[0, min(max, initial * 2^n)]`. Full jitter spreads retries of many lanes after a
/// shared outage instead of having them hammer D365 in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBackoff {
    #[error("the initial backoff must be greater than zero")]
    ZeroInitial,
    #[error(
        "the maximum backoff ({max:?}) must not be less than the initial backoff ({initial:?})"
    )]
    MaxBelowInitial { initial: Duration, max: Duration },
}

impl Backoff {
    pub fn try_new(initial: Duration, max: Duration) -> Result<Backoff, InvalidBackoff> {
        if initial.is_zero() {
            return Err(InvalidBackoff::ZeroInitial);
        }
        if max < initial {
            return Err(InvalidBackoff::MaxBelowInitial { initial, max });
        }
        Ok(Backoff { initial, max })
    }

    /// The upper bound of the wait before retry number `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The wait for `attempt`, with `unit` a random number in `[0, 1)`.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        self.ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
    }

    pub fn initial(&self) -> Duration {
        self.initial
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, fastrand::f64())
    }
}

impl Backoff {
    /// A backoff fixed in the code (a constant): `initial` must be above zero and `max` not
    /// below it, which the test of each constant's module exercises at its first use.
    pub const fn doubling(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max }
    }

    /// A fresh count of failed attempts under this backoff.
    pub const fn start(self) -> Retries {
        Retries {
            backoff: self,
            failures: 0,
        }
    }
}

/// The failures of one connection, sender or writer so far, and the wait they call for:
/// the ceiling of its [`Backoff`] (`initial`, then doubling up to `max`), without jitter —
/// one source reconnecting to its own device has nobody to fall in step with.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    backoff: Backoff,
    failures: u32,
}

impl Retries {
    /// The wait after one more failure (the first is `initial`).
    pub fn fail(&mut self) -> Duration {
        let wait = self.backoff.ceiling(self.failures);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// The wait the next failure will call for (for a log line said before it).
    pub fn next_wait(&self) -> Duration {
        self.backoff.ceiling(self.failures)
    }

    /// Success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The wait before trying a refused store write again (a full disk, an I/O error): the
/// same for the pipeline's ingest and the dispatcher's outcomes.
pub const STORE_WRITE: Backoff =
    Backoff::doubling(Duration::from_millis(500), Duration::from_secs(30));

/// Waits `delay` unless `cancel` fires first; returns false when cancelled. The pause
/// between attempts of every reconnecting task.
pub async fn pause(cancel: &tokio_util::sync::CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Sleeps until `deadline`; forever when there is none (a `select!` arm that stays quiet
/// until something schedules a wake-up).
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_exponential_with_full_jitter() {
        let b = Backoff::try_new(Duration::from_secs(1), Duration::from_secs(60)).unwrap();
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(3), Duration::from_secs(8));
        assert_eq!(b.ceiling(6), Duration::from_secs(60));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
        assert_eq!(b.delay_with(3, 0.0), Duration::ZERO);
        assert_eq!(b.delay_with(3, 0.5), Duration::from_secs(4));
        for attempt in 0..40 {
            assert!(b.delay(attempt) <= b.ceiling(attempt));
        }
    }

    #[test]
    fn invalid_backoffs_are_refused() {
        assert_eq!(
            Backoff::try_new(Duration::ZERO, Duration::from_secs(1)),
            Err(InvalidBackoff::ZeroInitial)
        );
        assert!(matches!(
            Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)),
            Err(InvalidBackoff::MaxBelowInitial { .. })
        ));
    }

    #[test]
    fn retries_double_up_to_the_maximum_and_start_over_after_a_success() {
        let mut r = Backoff::doubling(Duration::from_millis(200), Duration::from_secs(1)).start();
        let waits: Vec<u128> = (0..5).map(|_| r.fail().as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1000, 1000]);
        assert_eq!(r.next_wait(), Duration::from_secs(1));
        r.reset();
        assert_eq!(r.fail(), Duration::from_millis(200));
    }
}
