//! Sources: one task per configured device or broker, each emitting [`SourceEvent`]s into
//! a bounded channel. When the channel is full a source waits (backpressure), it never
//! drops an event. An event may carry an [`Ack`]: the pipeline hands it back to the
//! source once what the event produced is durable (MQTT PUBACK after the outbox commit).

pub mod config;
pub mod d365_events;
pub mod modbus;
pub mod mqtt;
pub mod opcua;
pub mod serial;
pub mod simulator;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Event;
use crate::outbox::{Outbox, Receipt, SeenEvent};
use crate::systemd::Heartbeat;
pub use config::SourceConfig;

/// Events buffered between the sources and the rules engine. When full, sources wait.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {id}: the rules engine stopped accepting events")]
    Closed { id: String },
    #[error("source {id}: {detail}")]
    Setup { id: String, detail: String },
}

/// An upstream acknowledgement: handed back to its source once what the event produced
/// is durable. The source owns it from then until it is written to the wire; nothing on
/// the way drops it (it waits for room instead).
#[derive(Debug)]
pub struct Ack {
    to: mpsc::Sender<AckTicket>,
    ticket: AckTicket,
}

/// Which upstream delivery an [`Ack`] is for, in the numbering of its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AckTicket(pub u64);

impl Ack {
    pub fn new(to: mpsc::Sender<AckTicket>, ticket: AckTicket) -> Ack {
        Ack { to, ticket }
    }

    /// Hands the acknowledgement back to its source; waits while the source's queue is
    /// full. If the source is gone, so is its connection: the broker delivers again.
    pub async fn send(self) {
        let _ = self.to.send(self.ticket).await;
    }
}

/// An event and, for sources that acknowledge upstream, its acknowledgement and the
/// identity of the upstream delivery (to recognise a redelivery).
#[derive(Debug)]
pub struct SourceEvent {
    pub event: Event,
    pub ack: Option<Ack>,
    pub delivery: Option<Receipt>,
    /// The event's own id at its source, for sources that redeliver by id (D365
    /// business events): a second delivery of a stored one produces nothing.
    pub seen: Option<SeenEvent>,
    /// D365's verdict on a message the gateway sent, to reconcile with the outbox.
    pub processed: Option<crate::outbox::ProcessedEvent>,
}

impl From<Event> for SourceEvent {
    fn from(event: Event) -> Self {
        SourceEvent {
            event,
            ack: None,
            delivery: None,
            seen: None,
            processed: None,
        }
    }
}

/// The health of one source, for logs and the operator surface.
#[derive(Debug)]
pub struct SourceHealth {
    connected: AtomicBool,
    /// When the current state (connected or down) began.
    since: Mutex<Option<jiff::Timestamp>>,
    last_event: Mutex<Option<jiff::Timestamp>>,
    pub events: AtomicU64,
    pub decode_errors: AtomicU64,
    pub reconnects: AtomicU64,
    /// Answers the device sent without being asked for data (OPC UA publish responses,
    /// keep-alives included): proof of life between values.
    pub publishes: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// What the source says about itself beyond up/down, for `status` (OPC UA: session,
    /// certificate).
    detail: Mutex<Option<String>>,
    /// Bumped on every change of state, for whoever watches (operator surface, tests).
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for SourceHealth {
    fn default() -> Self {
        SourceHealth {
            connected: AtomicBool::new(false),
            since: Mutex::default(),
            last_event: Mutex::default(),
            events: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
            last_error: Mutex::default(),
            detail: Mutex::default(),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

impl SourceHealth {
    /// A receiver that sees a new value after every change of state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The last connection or transport error.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records the connection state; returns true when it changed (log then, not at
    /// every retry).
    pub fn set_connected(&self, id: &str, connected: bool, detail: Option<&str>) -> bool {
        let was = self.connected.swap(connected, Ordering::Relaxed);
        if let Some(d) = detail {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.to_string());
        }
        let changed = was != connected
            || self
                .since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none();
        if changed {
            *self.since.lock().unwrap_or_else(|p| p.into_inner()) = Some(jiff::Timestamp::now());
            if connected {
                if was != connected {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(source = %id, "Source connected.");
            } else {
                tracing::warn!(source = %id, detail = detail.unwrap_or(""), "Source down.");
            }
        }
        self.changes.send_modify(|n| *n += 1);
        changed
    }

    pub fn set_detail(&self, detail: String) {
        *self.detail.lock().unwrap_or_else(|p| p.into_inner()) = Some(detail);
    }

    pub fn detail(&self) -> Option<String> {
        self.detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn event(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
        *self.last_event.lock().unwrap_or_else(|p| p.into_inner()) = Some(jiff::Timestamp::now());
    }

    pub fn decode_error(&self) {
        self.decode_errors.fetch_add(1, Ordering::Relaxed);
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// When the current state (connected or down) began; `None` before the first attempt.
    pub fn since(&self) -> Option<jiff::Timestamp> {
        *self.since.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn last_event(&self) -> Option<jiff::Timestamp> {
        *self.last_event.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands an event to the pipeline. While the pipeline's channel is full (the disk refuses
/// writes, or the pipeline is catching up) this waits — back-pressure, never a drop — and
/// keeps beating `heartbeat`: waiting for the pipeline is healthy waiting, and the systemd
/// watchdog must not kill the gateway for it.
pub async fn forward(
    out: &mpsc::Sender<SourceEvent>,
    event: SourceEvent,
    heartbeat: &Heartbeat,
    id: &str,
) -> Result<(), SourceError> {
    let closed = || SourceError::Closed { id: id.to_string() };
    let event = match out.try_send(event) {
        Ok(()) => return Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed()),
        Err(mpsc::error::TrySendError::Full(event)) => event,
    };
    let mut ticks = tokio::time::interval(heartbeat.period());
    let reserve = out.reserve();
    tokio::pin!(reserve);
    loop {
        tokio::select! {
            permit = &mut reserve => {
                permit.map_err(|_| closed())?.send(event);
                return Ok(());
            }
            _ = ticks.tick() => heartbeat.beat(),
        }
    }
}

/// Starts the task for one source; returns its health and, for a `d365_events` source,
/// the webhook's way into it.
pub fn spawn(
    config: SourceConfig,
    out: mpsc::Sender<SourceEvent>,
    cancel: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
    heartbeat: Heartbeat,
    outbox: &Outbox,
) -> (Arc<SourceHealth>, Option<d365_events::Intake>) {
    let health = Arc::new(SourceHealth::default());
    let mut intake = None;
    let id = config.id().to_string();
    let (hb, h) = (heartbeat.clone(), health.clone());
    let task: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SourceError>> + Send>> =
        match config {
            SourceConfig::Simulator(c) => {
                Box::pin(simulator::Simulator::new(c, hb, h).run(out, cancel))
            }
            SourceConfig::Modbus(c) => {
                Box::pin(modbus::ModbusSource::new(c, hb, h).run(out, cancel))
            }
            SourceConfig::Serial(c) => {
                Box::pin(serial::SerialSource::new(c, hb, h).run(out, cancel))
            }
            SourceConfig::Opcua(c) => Box::pin(opcua::OpcuaSource::new(c, hb, h).run(out, cancel)),
            SourceConfig::Mqtt(c) => Box::pin(
                mqtt::MqttSource::new(c, hb, h)
                    .with_outbox(outbox.clone())
                    .run(out, cancel),
            ),
            SourceConfig::D365Events(c) => {
                let (source, way_in) = d365_events::D365EventsSource::new(c, hb, h);
                intake = way_in;
                Box::pin(source.run(out, cancel))
            }
        };
    tracker.spawn(async move {
        match task.await {
            // Ended as designed (cancelled, or a simulator's limit): stop watching it.
            Ok(()) => heartbeat.finish(),
            Err(e) => tracing::error!(source = %id, error = %e, "Source stopped."),
        }
    });
    (health, intake)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systemd::Heartbeats;
    use std::time::Duration;

    fn event(n: f64) -> SourceEvent {
        Event {
            source: "sim".into(),
            point: "p".into(),
            value: crate::event::Value::Number(n),
            at: jiff::Timestamp::now(),
        }
        .into()
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_waiting_for_a_full_pipeline_keeps_its_heartbeat_and_loses_nothing() {
        let beats = Heartbeats::new(Duration::from_secs(1));
        let hb = beats.register("source sim");
        let (tx, mut rx) = mpsc::channel(1);
        tx.send(event(1.0)).await.unwrap();
        let waiting = tokio::spawn({
            let hb = hb.clone();
            async move { forward(&tx, event(2.0), &hb, "sim").await }
        });
        // The pipeline is stuck (a full disk) for a minute.
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(
                beats.stale(Duration::from_secs(3)).is_empty(),
                "the waiting source still beats"
            );
        }
        assert!(!waiting.is_finished(), "it waits, it does not drop");
        assert_eq!(
            rx.recv().await.unwrap().event.value,
            crate::event::Value::Number(1.0)
        );
        waiting.await.unwrap().unwrap();
        assert_eq!(
            rx.recv().await.unwrap().event.value,
            crate::event::Value::Number(2.0)
        );
    }
}
