//! How long the outbox's durable writes take, and how many messages each carries, for
//! `/metrics` and `status`. Every write is one transaction and one fsync, so the disk's flush latency
//! bounds how fast a lane can move (one write per message and lane, docs/performance.md):
//! on a plant PC with slow storage (an SD card, a worn eMMC) delivery is
//! slower, and these figures say why.
//!
//! Two kinds, the two writes every message goes through: `ingest` (new messages with the
//! upstream deliveries they came from) and `delivery` (the dispatcher's outcomes and
//! `sending` marks, one write per turn). A delivery write filled while its answers came in
//! (turn.rs) is timed from its last step to its commit: the part its lanes waited for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Which writes a figure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    // The index of the kind in the per-kind counters below.
    Ingest = 0,
    Delivery = 1,
}

impl WriteKind {
    pub const ALL: [WriteKind; 2] = [WriteKind::Ingest, WriteKind::Delivery];

    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::Ingest => "ingest",
            WriteKind::Delivery => "delivery",
        }
    }

    fn labels(self) -> WriteLabels {
        vec![("kind", self.as_str())]
    }
}

/// The label set of a histogram: `kind="ingest"` or `kind="delivery"`.
pub type WriteLabels = Vec<(&'static str, &'static str)>;

/// Histograms of write durations by kind.
pub type WriteSeconds = Family<WriteLabels, Histogram, fn() -> Histogram>;

fn write_seconds() -> Histogram {
    // 0.1 ms (a fast SSD's flush) to 3.3 s (a failing card), doubling.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The figures of both kinds, shared by every handle of one outbox.
#[derive(Debug)]
pub struct WriteStats {
    /// Seconds from the start of a transaction to the end of its fsync.
    seconds: WriteSeconds,
    /// Messages written: new ones for `ingest`, settled plus marked for `delivery`.
    messages: [AtomicU64; 2],
    /// Writes done.
    writes: [AtomicU64; 2],
    /// The recent mean duration in seconds (f64 bits): an exponentially weighted mean over
    /// about the last [`RECENT_WEIGHT`]⁻¹ writes, so `status` shows a disk that got slow
    /// today, not the mean since the start months ago.
    recent_seconds: [AtomicU64; 2],
}

/// The weight of the newest write in the recent mean (about the last 20 writes count).
const RECENT_WEIGHT: f64 = 0.05;

/// One kind's figures, as `status` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WriteSummary {
    pub writes: u64,
    pub messages: u64,
    /// Recent mean duration of a write (transaction and fsync), in milliseconds.
    pub recent_ms: f64,
}

impl Default for WriteStats {
    fn default() -> Self {
        let seconds = WriteSeconds::new_with_constructor(write_seconds as fn() -> Histogram);
        // Both kinds show from the first scrape, with zero writes.
        for kind in WriteKind::ALL {
            let _ = seconds.get_or_create(&kind.labels());
        }
        WriteStats {
            seconds,
            messages: Default::default(),
            writes: Default::default(),
            recent_seconds: Default::default(),
        }
    }
}

impl WriteStats {
    /// The histograms, to register with a metrics registry (shares the values).
    pub fn seconds(&self) -> WriteSeconds {
        self.seconds.clone()
    }

    /// Writes of `kind` so far, their messages and their recent mean duration.
    pub fn summary(&self, kind: WriteKind) -> WriteSummary {
        let i = kind as usize;
        WriteSummary {
            writes: self.writes[i].load(Ordering::Relaxed),
            messages: self.messages[i].load(Ordering::Relaxed),
            recent_ms: f64::from_bits(self.recent_seconds[i].load(Ordering::Relaxed)) * 1e3,
        }
    }

    /// Counts one committed write of `messages` messages that took `took`.
    pub(super) fn record(&self, kind: WriteKind, messages: usize, took: Duration) {
        let i = kind as usize;
        let seconds = took.as_secs_f64();
        self.seconds.get_or_create(&kind.labels()).observe(seconds);
        self.messages[i].fetch_add(messages as u64, Ordering::Relaxed);
        let first = self.writes[i].fetch_add(1, Ordering::Relaxed) == 0;
        // Load and store, not a compare-and-swap loop: two writes of one kind that finish
        // at the same moment may lose one's share of an estimate, which is harmless.
        let before = f64::from_bits(self.recent_seconds[i].load(Ordering::Relaxed));
        let recent = if first {
            seconds
        } else {
            before + RECENT_WEIGHT * (seconds - before)
        };
        self.recent_seconds[i].store(recent.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recent_mean_follows_the_latest_writes_and_the_counts_add_up() {
        let stats = WriteStats::default();
        assert_eq!(stats.summary(WriteKind::Delivery), WriteSummary::default());
        for _ in 0..100 {
            stats.record(WriteKind::Delivery, 98, Duration::from_millis(1));
        }
        let fast = stats.summary(WriteKind::Delivery);
        assert_eq!((fast.writes, fast.messages), (100, 9_800));
        assert!((fast.recent_ms - 1.0).abs() < 1e-9, "{fast:?}");
        // The disk gets slow: after 60 writes of 20 ms the recent mean is near 20 ms,
        // where the mean since the start (about 8 ms) would still hide it.
        for _ in 0..60 {
            stats.record(WriteKind::Delivery, 98, Duration::from_millis(20));
        }
        let slow = stats.summary(WriteKind::Delivery);
        assert!(slow.recent_ms > 18.0 && slow.recent_ms < 20.0, "{slow:?}");
        assert_eq!(stats.summary(WriteKind::Ingest), WriteSummary::default());
    }
}
