//! The pure pieces of matching: edge detection with debounce, and counter registers read
//! as deltas. (MQTT topic filters with captures are `mqtt::topic`.)

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::Edge;

/// Edge detection on a boolean signal with debounce: a new level counts only once it has
/// been stable for `debounce`. Shorter excursions (contact bounce) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeState {
    /// The last confirmed level; unknown counts as low, so a first high is a rising edge.
    pub stable: bool,
    /// A level seen but not yet stable long enough, and since when.
    pub pending: Option<(bool, jiff::Timestamp)>,
}

impl EdgeState {
    fn counts(edge: Edge, from: bool, to: bool) -> bool {
        match edge {
            Edge::Rising => !from && to,
            Edge::Falling => from && !to,
            Edge::Both => from != to,
        }
    }

    /// Confirms a pending level that has been stable until `now`; returns whether that
    /// confirmation is an edge of the wanted kind, and when it became stable.
    pub fn settle(
        &mut self,
        edge: Edge,
        debounce: Duration,
        now: jiff::Timestamp,
    ) -> Option<jiff::Timestamp> {
        let (level, since) = self.pending?;
        let stable_at = later(since, debounce);
        if now < stable_at {
            return None;
        }
        self.pending = None;
        let from = self.stable;
        self.stable = level;
        Self::counts(edge, from, level).then_some(stable_at)
    }

    /// Feeds one observed level at `at`. Returns the time of a confirmed edge, if any.
    /// A pending level that was already stable long enough before `at` is confirmed first.
    pub fn observe(
        &mut self,
        edge: Edge,
        debounce: Duration,
        level: bool,
        at: jiff::Timestamp,
    ) -> Vec<jiff::Timestamp> {
        let mut edges = Vec::new();
        if let Some(t) = self.settle(edge, debounce, at) {
            edges.push(t);
        }
        if level == self.stable {
            // Back to the stable level before the debounce time: a bounce, forget it.
            self.pending = None;
        } else if self.pending.map(|(l, _)| l) != Some(level) {
            self.pending = Some((level, at));
        }
        if debounce.is_zero() {
            if let Some(t) = self.settle(edge, debounce, at) {
                edges.push(t);
            }
        }
        edges
    }

    /// When a pending level will be stable, for the engine's timer.
    pub fn deadline(&self, debounce: Duration) -> Option<jiff::Timestamp> {
        self.pending.map(|(_, since)| later(since, debounce))
    }
}

/// `at + d`, or the end of representable time: a timestamp near the end of jiff's range
/// (a device's clock, a test) must not make the time arithmetic panic.
pub fn later(at: jiff::Timestamp, d: Duration) -> jiff::Timestamp {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| at.checked_add(d).ok())
        .unwrap_or(jiff::Timestamp::MAX)
}

/// The quantity a counter register has counted since `last`. `max` is the largest value
/// the register holds (65535 for 16 bits); a drop of more than half the range is a
/// wrap-around, a smaller drop is a reset of the counter (it counted `value` since).
pub fn counter_delta(last: f64, value: f64, max: Option<f64>) -> f64 {
    if value >= last {
        return value - last;
    }
    match max {
        Some(max) if last - value > (max + 1.0) / 2.0 => (max + 1.0 - last) + value,
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_millisecond(ms).unwrap()
    }

    #[test]
    fn edges_without_debounce() {
        let mut s = EdgeState::default();
        let zero = Duration::ZERO;
        assert_eq!(s.observe(Edge::Rising, zero, true, t(0)).len(), 1);
        assert_eq!(s.observe(Edge::Rising, zero, true, t(1)).len(), 0);
        assert_eq!(s.observe(Edge::Rising, zero, false, t(2)).len(), 0);
        assert_eq!(s.observe(Edge::Rising, zero, true, t(3)).len(), 1);
        let mut f = EdgeState::default();
        assert_eq!(f.observe(Edge::Falling, zero, true, t(0)).len(), 0);
        assert_eq!(f.observe(Edge::Falling, zero, false, t(1)).len(), 1);
        let mut b = EdgeState::default();
        assert_eq!(b.observe(Edge::Both, zero, true, t(0)).len(), 1);
        assert_eq!(b.observe(Edge::Both, zero, false, t(1)).len(), 1);
    }

    #[test]
    fn debounce_ignores_bounces_and_confirms_stable_levels() {
        let d = Duration::from_millis(50);
        let mut s = EdgeState::default();
        // Bounce: up and down within 10 ms: nothing.
        assert!(s.observe(Edge::Rising, d, true, t(0)).is_empty());
        assert!(s.observe(Edge::Rising, d, false, t(10)).is_empty());
        assert_eq!(s.deadline(d), None);
        // Up and stays: confirmed by the timer at 150 ms, dated 150 ms.
        assert!(s.observe(Edge::Rising, d, true, t(100)).is_empty());
        assert_eq!(s.deadline(d), Some(t(150)));
        assert_eq!(s.settle(Edge::Rising, d, t(149)), None);
        assert_eq!(s.settle(Edge::Rising, d, t(150)), Some(t(150)));
        // Or confirmed by the next event when no timer ran.
        let mut s = EdgeState::default();
        s.observe(Edge::Rising, d, true, t(0));
        assert_eq!(s.observe(Edge::Rising, d, false, t(500)), vec![t(50)]);
    }

    #[test]
    fn counters_wrap_and_reset() {
        assert_eq!(counter_delta(10.0, 15.0, Some(65535.0)), 5.0);
        assert_eq!(counter_delta(65530.0, 4.0, Some(65535.0)), 10.0);
        assert_eq!(
            counter_delta(1000.0, 3.0, Some(65535.0)),
            3.0,
            "small drop: reset, 3 counted since"
        );
        assert_eq!(counter_delta(1000.0, 3.0, None), 3.0);
        assert_eq!(counter_delta(7.0, 7.0, None), 0.0);
    }
}
