//! The value type that flows from sources to the rules engine.

use std::sync::Arc;

/// One observation from the shop floor.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The source's configured id.
    pub source: Arc<str>,
    /// What was observed: a topic, a Modbus point name, a serial line name.
    pub point: Arc<str>,
    pub value: Value,
    pub at: jiff::Timestamp,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Number(f64),
    Text(String),
    /// A decoded JSON payload.
    Json(serde_json::Value),
}
