//! The rule files' syntax (`rules.d/*.yaml`, see `config/RULES.md`): rules exactly as
//! written, read one by one so every mistake is reported; [`super::Rule::compile`] checks and
//! compiles them.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::value::ScalarValue;
use crate::config::{join_path, FileCheck, Node, Shape};
use crate::source::config::BrokenSource;
use crate::source::SourceConfig;

use super::Rule;

/// One rule as written in `rules.d/*.yaml`; see `config/RULES.md`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    /// The line whose order context the rule reads and writes; may be a template
    /// (`"{capture.line}"`).
    pub line: Option<String>,
    pub when: RawWhen,
    pub count: Option<CountMode>,
    /// Quantity per impulse (`count: impulse`) or factor (`delta`, `value`); default 1.
    pub quantity: Option<f64>,
    /// Largest value of a counter register (65535 for 16 bits), for wrap-around.
    pub counter_max: Option<f64>,
    pub aggregate: Option<RawAggregate>,
    pub set_context: Option<RawSetContext>,
    #[serde(default)]
    pub clear_context: bool,
    /// Adds an order to the line's list of released orders.
    pub release: Option<RawRelease>,
    /// Removes an order (a template of its number) from the line's released list.
    pub withdraw: Option<String>,
    /// Publishes a message to MQTT (through an `mqtt` source's broker).
    pub publish: Option<RawPublish>,
    pub emit: Option<RawEmit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelease {
    pub order: String,
    pub item: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublish {
    /// The `mqtt` source whose broker, credentials and TLS are used.
    pub via: String,
    pub topic: String,
    /// A mapping (published as a JSON object, each value a template) or a text template.
    pub payload: RawPayload,
    #[serde(default)]
    pub retain: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawPayload {
    Fields(BTreeMap<String, ScalarValue>),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWhen {
    pub source: String,
    pub point: Option<String>,
    pub topic: Option<String>,
    pub pattern: Option<String>,
    pub field: Option<String>,
    pub equals: Option<ScalarValue>,
    pub above: Option<f64>,
    pub below: Option<f64>,
    #[serde(default)]
    pub changed: bool,
    pub edge: Option<Edge>,
    pub debounce: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    Rising,
    Falling,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CountMode {
    /// Each trigger counts `quantity`.
    Impulse,
    /// The value is a counter register: count the increase since the last reading.
    Delta,
    /// The value is the quantity (a weight, a count sent by an HMI).
    Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAggregate {
    pub every: Option<f64>,
    pub interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSetContext {
    pub order: String,
    pub item: Option<String>,
    pub operation: Option<String>,
    pub resource: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmit {
    #[serde(rename = "type")]
    pub message_type: String,
    #[serde(default)]
    pub fields: BTreeMap<String, ScalarValue>,
}

/// Compiles the rules of one rule file; `sources` are the configured sources they may
/// refer to.
/// `broken` are the sources whose own section has errors (see [`BrokenSource`]).
pub fn read_rule_file(
    cx: &mut FileCheck<'_>,
    sources: &[SourceConfig],
    broken: &[BrokenSource],
) -> Vec<Rule> {
    let Some(entries) = cx.node("").and_then(Node::entries) else {
        cx.error("", "a rule file must be a mapping with a `rules` list");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, value) in entries {
        if key != "rules" {
            cx.error(key, format!("unknown field `{key}`, expected `rules`"));
            continue;
        }
        let items: &[Node] = match &value.shape {
            Shape::Seq(items) => items,
            _ if value.is_null() => &[],
            _ => {
                cx.error("rules", "must be a list of rules");
                continue;
            }
        };
        for (i, item) in items.iter().enumerate() {
            let path = format!("rules[{i}]");
            let Some(raw) = cx.parse::<RawRule>(&path) else {
                continue;
            };
            let origin = format!("{}:{}", cx.path().display(), item.mark.line);
            match Rule::compile(raw, origin, sources, broken) {
                Ok(rule) => out.push(rule),
                Err(problems) => {
                    for (sub, message) in problems {
                        cx.error(&join_path(&path, &sub), message);
                    }
                }
            }
        }
    }
    out
}
