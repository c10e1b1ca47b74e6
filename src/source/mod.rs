//! Sources: one task per configured device or broker, each emitting [`Event`]s into a
//! bounded channel. When the channel is full a source waits (backpressure), it never
//! drops an event.

pub mod simulator;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::SourceConfig;
use crate::event::Event;
use crate::systemd::Heartbeat;

/// Events buffered between the sources and the rules engine. When full, sources wait.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {id}: the rules engine stopped accepting events")]
    Closed { id: String },
}

/// Starts the task for one source.
pub fn spawn(
    config: SourceConfig,
    out: mpsc::Sender<Event>,
    cancel: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
    heartbeat: Heartbeat,
) {
    match config {
        SourceConfig::Simulator(c) => {
            let id = c.id.clone();
            tracker.spawn(async move {
                match simulator::Simulator::new(c, heartbeat.clone())
                    .run(out, cancel)
                    .await
                {
                    Ok(()) => heartbeat.finish(),
                    Err(e) => tracing::error!(source = %id, error = %e, "Source stopped."),
                }
            });
        }
    }
}
