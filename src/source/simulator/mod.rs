//! A source that needs no hardware. Each interval it emits, on its point:
//! - `impulse`: `true` then `false`, like a light barrier seeing a part go by;
//! - `counter`: the reading of a counter register (see [`SimulatorMode::Counter`]);
//! - `values`: the next of its configured values (barcodes, weights, JSON documents).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{SourceError, SourceEvent};
pub mod config;

use super::SourceHealth;
use crate::event::{Event, Value};
use crate::systemd::Heartbeat;
use config::{SimulatorConfig, SimulatorMode};

#[derive(Debug)]
pub struct Simulator {
    config: SimulatorConfig,
    heartbeat: Heartbeat,
    health: Arc<SourceHealth>,
}

impl Simulator {
    /// The values of emission number `n`.
    fn next_values(&self, n: u64, started: jiff::Timestamp) -> Vec<Value> {
        match &self.config.mode {
            SimulatorMode::Impulse => vec![Value::Bool(true), Value::Bool(false)],
            SimulatorMode::Counter {
                start_at,
                step,
                max,
                stop_at,
            } => {
                let since = jiff::Timestamp::now().duration_since(start_at.unwrap_or(started));
                let ticks = (since.as_secs_f64() / self.config.interval.as_secs_f64())
                    .floor()
                    .max(0.0);
                let mut value = ticks * step;
                if let Some(stop) = stop_at {
                    value = value.min(*stop);
                }
                if let Some(max) = max {
                    value %= max + 1.0;
                }
                vec![Value::Number(value)]
            }
            SimulatorMode::Values(values) => {
                // The list is non-empty (checked when the configuration loaded).
                let v = &values[(n % values.len() as u64) as usize];
                vec![match v {
                    serde_json::Value::Bool(b) => Value::Bool(*b),
                    serde_json::Value::Number(x) => Value::Number(x.as_f64().unwrap_or(0.0)),
                    serde_json::Value::String(t) => Value::Text(t.clone()),
                    other => Value::Json(other.clone()),
                }]
            }
        }
    }

    pub fn new(
        config: SimulatorConfig,
        heartbeat: Heartbeat,
        health: Arc<SourceHealth>,
    ) -> Simulator {
        Simulator {
            config,
            heartbeat,
            health,
        }
    }

    pub async fn run(
        self,
        out: mpsc::Sender<SourceEvent>,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let source: Arc<str> = self.config.id.as_str().into();
        let point: Arc<str> = self.config.point.as_str().into();
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick of an interval fires at once; skip it so the first impulse
        // comes one interval after start, like a real sensor.
        ticks.tick().await;
        // Nothing to connect to: up from the start, so health and alerts see it as such.
        self.health.set_connected(&source, true, None);
        tracing::info!(source = %source, point = %point, interval_ms = self.config.interval.as_millis() as u64, limit = ?self.config.limit, "Simulator source started.");
        let mut sent = 0u64;
        let started = jiff::Timestamp::now();
        let mut counter_stop_logged = false;
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
            for value in self.next_values(sent, started) {
                let stopped = match (&self.config.mode, &value) {
                    (
                        SimulatorMode::Counter {
                            stop_at: Some(stop),
                            ..
                        },
                        Value::Number(v),
                    ) => v >= stop,
                    _ => false,
                };
                let event = Event {
                    source: source.clone(),
                    point: point.clone(),
                    value,
                    at: jiff::Timestamp::now(),
                };
                super::forward(&out, event.into(), &self.heartbeat, &source).await?;
                self.health.event();
                if stopped && !counter_stop_logged {
                    counter_stop_logged = true;
                    tracing::info!(source = %source, point = %point, "Simulated counter reached its stop value.");
                }
            }
            sent += 1;
        }
    }
}
