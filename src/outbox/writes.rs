//! How long the outbox's durable writes take, and how many messages each carries, for
//! `/metrics`. Every write is one transaction and one fsync, so the disk's flush latency
//! bounds how fast a lane can move (one write per message and lane, README →
//! Performance): on a plant PC with slow storage (an SD card, a worn eMMC) delivery is
//! slower, and these figures say why.
//!
//! Two kinds, the two writes every message goes through: `ingest` (new messages with the
//! upstream deliveries they came from) and `delivery` (the dispatcher's outcomes and
//! `sending` marks, one write per turn).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Which writes a figure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    // The index of the kind's message counter.
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
        }
    }
}

impl WriteStats {
    /// The histograms, to register with a metrics registry (shares the values).
    pub fn seconds(&self) -> WriteSeconds {
        self.seconds.clone()
    }

    pub fn messages(&self, kind: WriteKind) -> u64 {
        self.messages[kind as usize].load(Ordering::Relaxed)
    }

    /// Counts one committed write of `messages` messages that took `took`.
    pub(super) fn record(&self, kind: WriteKind, messages: usize, took: Duration) {
        self.seconds
            .get_or_create(&kind.labels())
            .observe(took.as_secs_f64());
        self.messages[kind as usize].fetch_add(messages as u64, Ordering::Relaxed);
    }
}
