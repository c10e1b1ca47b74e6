//! The pure pieces of matching: MQTT topic filters with named captures, edge detection
//! with debounce, and counter registers read as deltas.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Edge;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    /// `+` or `{name}`: one level, captured when named.
    One(Option<String>),
    /// `#`: the rest, possibly nothing.
    Rest,
}

/// An MQTT topic filter. `{name}` is `+` with a capture: `plant/{line}/count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    levels: Vec<Level>,
    text: String,
}

impl TopicFilter {
    pub fn parse(text: &str) -> Result<TopicFilter, String> {
        if text.is_empty() {
            return Err("empty topic filter".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => return Err(format!("{text:?}: `#` must be the last level")),
                "+" => Level::One(None),
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    let name = &p[1..p.len() - 1];
                    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        return Err(format!(
                            "{text:?}: capture name `{name}` may use letters, digits and _"
                        ));
                    }
                    Level::One(Some(name.to_string()))
                }
                p if p.contains(['+', '#', '{', '}']) => {
                    return Err(format!(
                        "{text:?}: wildcards and captures must fill a whole level"
                    ))
                }
                p => Level::Exact(p.to_string()),
            };
            levels.push(level);
        }
        Ok(TopicFilter {
            levels,
            text: text.to_string(),
        })
    }

    /// The filter as the broker sees it (captures become `+`).
    pub fn subscription(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Exact(s) => s.as_str(),
                Level::One(_) => "+",
                Level::Rest => "#",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    pub fn capture_names(&self) -> impl Iterator<Item = &str> {
        self.levels.iter().filter_map(|l| match l {
            Level::One(Some(n)) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Matches a topic; returns the captures.
    pub fn matches(&self, topic: &str) -> Option<BTreeMap<String, String>> {
        let mut captures = BTreeMap::new();
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return Some(captures),
                Level::Exact(s) => {
                    if parts.next()? != s {
                        return None;
                    }
                }
                Level::One(name) => {
                    let part = parts.next()?;
                    if let Some(n) = name {
                        captures.insert(n.clone(), part.to_string());
                    }
                }
            }
        }
        parts.next().is_none().then_some(captures)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

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
    fn topic_filters_match_and_capture() {
        let f = TopicFilter::parse("plant/{line}/+/count").unwrap();
        assert_eq!(f.subscription(), "plant/+/+/count");
        assert_eq!(f.matches("plant/l1/m2/count").unwrap()["line"], "l1");
        assert!(f.matches("plant/l1/m2/count/x").is_none());
        assert!(f.matches("plant/l1/count").is_none());
        let rest = TopicFilter::parse("plant/#").unwrap();
        assert!(rest.matches("plant").is_some());
        assert!(rest.matches("plant/a/b").is_some());
        assert!(rest.matches("other/a").is_none());
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b+").is_err());
        assert!(TopicFilter::parse("a/{li-ne}").is_err());
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
