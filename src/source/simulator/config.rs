//! The simulator source's configuration (`type: simulator`): impulses, a counter
//! register, or a list of values, at an interval.

use std::time::Duration;

use serde::Deserialize;

use crate::config::value::YamlValue;
use crate::config::FileCheck;

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    pub id: String,
    pub interval: Duration,
    pub point: String,
    pub limit: Option<u64>,
    pub mode: SimulatorMode,
}

/// What a simulator emits each interval.
#[derive(Debug, Clone, PartialEq)]
pub enum SimulatorMode {
    /// A pulse: `true` then `false` (a part passing a light barrier).
    Impulse,
    /// The reading of a counter register that counts `step` per interval since
    /// `start_at`, wrapping after `max`. With a fixed `start_at` the count goes on while
    /// the gateway is stopped, like a PLC's.
    Counter {
        start_at: Option<jiff::Timestamp>,
        step: f64,
        max: Option<f64>,
        /// The count stops here (a batch of N parts).
        stop_at: Option<f64>,
    },
    /// The given values in turn (texts, numbers, JSON objects).
    Values(Vec<serde_json::Value>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSimulator {
    /// The source type, read by the loader to choose this struct.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub interval: String,
    pub point: Option<String>,
    /// Stop after this many emissions (for demos and tests); unset = forever.
    pub limit: Option<u64>,
    /// impulse (default), counter or values.
    pub mode: Option<String>,
    pub start_at: Option<String>,
    pub step: Option<f64>,
    pub counter_max: Option<f64>,
    /// Counter mode: the counter stops counting at this value (a batch of N parts).
    pub stop_at: Option<f64>,
    pub values: Option<Vec<YamlValue>>,
}

/// Checks the simulator source at `path` (`sources[i]`).
pub fn read(cx: &mut FileCheck<'_>, path: &str) -> Option<SimulatorConfig> {
    let raw: RawSimulator = cx.parse(path)?;
    let interval = cx.duration(
        &format!("{path}.interval"),
        Some(raw.interval),
        Duration::ZERO,
    );
    if interval.is_zero() {
        cx.error(&format!("{path}.interval"), "must be greater than zero");
        return None;
    }
    let mode = simulator_mode(
        cx,
        path,
        raw.mode.as_deref(),
        raw.start_at.as_deref(),
        raw.step,
        raw.counter_max,
        raw.stop_at,
        raw.values,
    )?;
    Some(SimulatorConfig {
        id: raw.id,
        interval,
        point: raw.point.unwrap_or_else(|| "impulse".into()),
        limit: raw.limit,
        mode,
    })
}

#[allow(clippy::too_many_arguments)]
fn simulator_mode(
    cx: &mut FileCheck<'_>,
    path: &str,
    mode: Option<&str>,
    start_at: Option<&str>,
    step: Option<f64>,
    counter_max: Option<f64>,
    stop_at: Option<f64>,
    values: Option<Vec<YamlValue>>,
) -> Option<SimulatorMode> {
    Some(match (mode.unwrap_or("impulse"), values) {
        ("impulse", None) => SimulatorMode::Impulse,
        ("counter", None) => {
            let start_at = match start_at.map(str::parse::<jiff::Timestamp>) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    cx.error(
                        &format!("{path}.start_at"),
                        format!("invalid time (use RFC 3339, e.g. 2026-01-01T00:00:00Z): {e}"),
                    );
                    return None;
                }
            };
            SimulatorMode::Counter {
                start_at,
                step: step.unwrap_or(1.0),
                max: counter_max,
                stop_at,
            }
        }
        ("values", Some(values)) if !values.is_empty() => {
            SimulatorMode::Values(values.iter().map(YamlValue::to_json).collect())
        }
        ("values", _) => {
            cx.error(
                &format!("{path}.values"),
                "mode `values` needs a non-empty `values` list",
            );
            return None;
        }
        (m @ ("impulse" | "counter"), Some(_)) => {
            cx.error(
                &format!("{path}.values"),
                format!("`values` needs `mode: values` (mode is {m})"),
            );
            return None;
        }
        (other, _) => {
            cx.error(
                &format!("{path}.mode"),
                format!(
                    "unknown simulator mode `{other}`, expected one of impulse, counter, values"
                ),
            );
            return None;
        }
    })
}
