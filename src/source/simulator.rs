//! A source that needs no hardware: it emits one impulse (a rising then a falling edge
//! on its point) per interval, like a light barrier seeing a part go by.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::config::SimulatorConfig;
use crate::event::{Event, Value};
use crate::systemd::Heartbeat;

#[derive(Debug)]
pub struct Simulator {
    config: SimulatorConfig,
    heartbeat: Heartbeat,
}

impl Simulator {
    pub fn new(config: SimulatorConfig, heartbeat: Heartbeat) -> Simulator {
        Simulator { config, heartbeat }
    }

    pub async fn run(
        self,
        out: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let source: Arc<str> = self.config.id.as_str().into();
        let point: Arc<str> = self.config.point.as_str().into();
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick of an interval fires at once; skip it so the first impulse
        // comes one interval after start, like a real sensor.
        ticks.tick().await;
        tracing::info!(source = %source, point = %point, interval_ms = self.config.interval.as_millis() as u64, limit = ?self.config.limit, "Simulator source started.");
        let mut sent = 0u64;
        let mut heartbeat_ticks = tokio::time::interval(self.heartbeat.period());
        loop {
            self.heartbeat.beat();
            if self.config.limit.is_some_and(|limit| sent >= limit) {
                tracing::info!(source = %source, impulses = sent, "Simulator reached its limit and stops.");
                return Ok(());
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = heartbeat_ticks.tick() => continue,
                _ = ticks.tick() => {}
            }
            for level in [true, false] {
                let event = Event {
                    source: source.clone(),
                    point: point.clone(),
                    value: Value::Bool(level),
                    at: jiff::Timestamp::now(),
                };
                out.send(event).await.map_err(|_| SourceError::Closed {
                    id: source.to_string(),
                })?;
            }
            sent += 1;
        }
    }
}
