//! What the rules engine remembers across restarts: order contexts per line, open
//! accumulators, edge and debounce states, last counter readings. Stored in the outbox's
//! database in the same atomic write as the messages it produced, so a crash either keeps
//! both (the pieces were reported) or neither (they will be counted again from the
//! counter register, or were never acknowledged upstream).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::matcher::EdgeState;

/// The production order running on a line, and its attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderContext {
    pub order: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    pub since: Option<jiff::Timestamp>,
}

/// What fired a rule: kept with a pending edge or an open accumulator so the message it
/// eventually builds can use the event's captures and payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub source: String,
    pub point: String,
    pub captures: BTreeMap<String, String>,
    pub payload: Option<serde_json::Value>,
    pub value: serde_json::Value,
    pub at: jiff::Timestamp,
}

/// Quantity counted for one (rule, line, order, item) and not yet reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accumulator {
    pub rule: String,
    pub line: String,
    /// The line's order context when the pieces were counted (`None` when the rule names
    /// its production order itself).
    pub context: Option<OrderContext>,
    pub quantity: f64,
    pub opened_at: jiff::Timestamp,
    /// The latest trigger: its captures and payload fill the message's templates.
    pub trigger: Trigger,
}

impl Accumulator {
    pub fn key(rule: &str, line: &str, order: &str, item: Option<&str>) -> String {
        format!(
            "{rule}\u{1f}{line}\u{1f}{order}\u{1f}{}",
            item.unwrap_or("")
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    pub contexts: BTreeMap<String, OrderContext>,
    pub accumulators: BTreeMap<String, Accumulator>,
    /// Per rule and point.
    pub edges: BTreeMap<String, EdgeState>,
    /// The trigger of a pending (debouncing) edge, per rule and point.
    pub pending_triggers: BTreeMap<String, Trigger>,
    /// Last counter reading per rule and point.
    pub counters: BTreeMap<String, f64>,
    /// Last matched value per rule and point, for `changed`.
    pub last_values: BTreeMap<String, serde_json::Value>,
    /// Per line, the orders D365 released for it (rules' `release`), oldest first.
    #[serde(default)]
    pub released: BTreeMap<String, Vec<ReleasedOrder>>,
}

/// An order released for a line, waiting to be produced (or running).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedOrder {
    pub order: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    /// When the event that released it happened.
    pub at: jiff::Timestamp,
    /// The rule that added it.
    pub rule: String,
}
