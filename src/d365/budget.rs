//! D365's request budget, shared by every lane: at most `requests` SendMessage requests in
//! any window of `per` (a sliding window, as D365 counts its service protection limit of
//! 6,000 requests per 5 minutes per user and web server). Every request spends from it,
//! retries and probes included; lanes take what is left in the dispatcher's round-robin
//! order, so no order starves. A 429 still pauses everything for `Retry-After`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The budget as configured (`dispatcher.request_budget: 3000/5m`, or `off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    pub requests: u32,
    pub per: Duration,
}

impl BudgetConfig {
    /// Half of D365's limit for one web server: the gateway's app registration may also
    /// serve other integrations (priority-based throttling shares the limit with them),
    /// and retries spend from the same budget.
    pub const DEFAULT: BudgetConfig = BudgetConfig {
        requests: 3_000,
        per: Duration::from_secs(300),
    };

    /// `N/DURATION` (`3000/5m`); `off` for none.
    pub fn parse(text: &str) -> Result<Option<BudgetConfig>, String> {
        if text.trim() == "off" {
            return Ok(None);
        }
        let (n, per) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: expected REQUESTS/DURATION (3000/5m) or off"))?;
        let requests: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {n:?} is not a number of requests"))?;
        let per = crate::config::parse_duration(per.trim())?;
        if requests == 0 || per.is_zero() {
            return Err(format!(
                "{text:?}: a budget needs at least one request in a window longer than zero (or off)"
            ));
        }
        Ok(Some(BudgetConfig { requests, per }))
    }

    /// Requests a second at this budget.
    pub fn rate(&self) -> f64 {
        f64::from(self.requests) / self.per.as_secs_f64()
    }
}

/// Seconds `waiting` messages need at a budget of `limit` requests per `window_s` seconds
/// (one request each): what `status` and `/metrics` say of the backlog.
pub fn backlog_seconds(waiting: usize, limit: u64, window_s: u64) -> u64 {
    (waiting as u64).saturating_mul(window_s) / limit.max(1)
}

/// The requests spent in the current window (module doc).
#[derive(Debug)]
pub struct Budget {
    config: BudgetConfig,
    /// When each request of the window went out, oldest first.
    spent: VecDeque<Instant>,
}

impl Budget {
    pub fn new(config: BudgetConfig) -> Budget {
        Budget {
            config,
            spent: VecDeque::new(),
        }
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .spent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.config.per)
        {
            self.spent.pop_front();
        }
    }

    /// How many requests may go out now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.forget_before(now);
        (self.config.requests as usize).saturating_sub(self.spent.len())
    }

    /// When the next request may go out, when none may now.
    pub fn next_free(&mut self, now: Instant) -> Option<Instant> {
        if self.available(now) > 0 {
            return None;
        }
        let oldest = *self
            .spent
            .get(self.spent.len() - self.config.requests as usize)?;
        Some(oldest + self.config.per)
    }

    /// Records `n` requests going out at `now`.
    pub fn spend(&mut self, now: Instant, n: usize) {
        self.spent.extend(std::iter::repeat_n(now, n));
    }

    /// Requests spent in the current window.
    pub fn used(&mut self, now: Instant) -> usize {
        self.forget_before(now);
        self.spent.len()
    }

    pub fn config(&self) -> BudgetConfig {
        self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_parsed_with_their_mistakes_named() {
        assert_eq!(
            BudgetConfig::parse("3000/5m"),
            Ok(Some(BudgetConfig {
                requests: 3000,
                per: Duration::from_secs(300)
            }))
        );
        assert_eq!(BudgetConfig::parse("off"), Ok(None));
        assert!(BudgetConfig::parse("3000")
            .unwrap_err()
            .contains("REQUESTS/DURATION"));
        assert!(BudgetConfig::parse("many/5m")
            .unwrap_err()
            .contains("not a number"));
        assert!(BudgetConfig::parse("0/5m")
            .unwrap_err()
            .contains("at least one"));
    }

    /// A sliding window: never more than the budget in any window, and a request that
    /// leaves the window frees its place exactly then.
    #[tokio::test(start_paused = true)]
    async fn the_window_slides() {
        let mut b = Budget::new(BudgetConfig {
            requests: 3,
            per: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        assert_eq!(b.available(t0), 3);
        b.spend(t0, 2);
        b.spend(t0 + Duration::from_secs(4), 1);
        assert_eq!(b.available(t0 + Duration::from_secs(5)), 0);
        assert_eq!(
            b.next_free(t0 + Duration::from_secs(5)),
            Some(t0 + Duration::from_secs(10))
        );
        assert_eq!(b.available(t0 + Duration::from_secs(10)), 2);
        assert_eq!(b.used(t0 + Duration::from_secs(14)), 0);
    }
}
