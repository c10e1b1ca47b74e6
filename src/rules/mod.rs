//! The rules engine: turns events into messages and keeps each line's order context.
//!
//! Rules are compiled when the configuration loads ([`Rule::compile`]); the engine itself
//! is pure and synchronous: [`Engine::process`] takes one event, [`Engine::tick`] the
//! passing of time (debounce confirmations, `aggregate.interval` flushes). Neither
//! parses anything.
//!
//! # Order of work for one event
//!
//! Rules apply in configuration order: rule files by file name, rules by position. For
//! each matching rule, in this order: context changes (`set_context`, `clear_context`;
//! a change of order first flushes what was counted for the old one), then counting and
//! aggregation, then `emit`. The messages one event produces are appended to the outbox
//! in exactly this order, so for one production order they reach D365 in this order.
//!
//! # Never an invented order
//!
//! A rule that needs the line's order (for `ProductionOrderNumber` or a `{context.*}`
//! template) while the line has none builds nothing: the event is counted as
//! *unassigned* and a warning is logged once per burst.

mod compile;
pub mod config;
mod fire;
mod index;
pub mod matcher;
pub mod state;
pub mod template;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;

use crate::event::{Event, Value};
use crate::message::Message;
use crate::mqtt::topic::TopicFilter;
use crate::outbox::Publication;
pub use compile::RuleError;
pub use config::{CountMode, Edge};
use state::{EngineState, OrderContext, Trigger};
use template::Template;

#[derive(Debug, Clone)]
pub enum Condition {
    Equals(Json),
    Above(f64),
    Below(f64),
}

#[derive(Debug, Clone)]
pub struct Counting {
    pub mode: CountMode,
    pub quantity: f64,
    pub counter_max: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Aggregate {
    pub every: Option<f64>,
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct SetContext {
    pub order: Template,
    pub item: Option<Template>,
    pub operation: Option<Template>,
    pub resource: Option<Template>,
}

#[derive(Debug, Clone)]
pub struct Emit {
    pub message_type: String,
    /// Fields of the message header.
    pub header: Vec<(String, Template)>,
    /// Fields of the single line, and the key of the lines array (`ReportFinishedLines`).
    pub line: Vec<(String, Template)>,
    pub lines_key: Option<&'static str>,
}

/// Adds an order to a line's released list.
#[derive(Debug, Clone)]
pub struct Release {
    pub order: Template,
    pub item: Option<Template>,
}

/// Publishes a message to MQTT.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The `mqtt` source whose broker gets it.
    pub via: String,
    pub topic: Template,
    pub payload: PublishPayload,
    pub retain: bool,
}

#[derive(Debug, Clone)]
pub enum PublishPayload {
    /// A JSON object, each field rendered.
    Fields(Vec<(String, Template)>),
    Text(Template),
}

/// Most orders kept in one line's released list: a line whose orders are never withdrawn
/// must not grow the saved state without bound; the oldest goes first.
pub const MAX_RELEASED_PER_LINE: usize = 200;

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    /// `file:line` of the rule, for log lines.
    pub origin: String,
    pub line: Option<Template>,
    pub source: String,
    pub point: Option<String>,
    pub topic: Option<TopicFilter>,
    pub pattern: Option<regex::Regex>,
    pub field: Option<Vec<String>>,
    pub condition: Option<Condition>,
    pub changed: bool,
    pub edge: Option<(Edge, Duration)>,
    pub count: Option<Counting>,
    pub aggregate: Option<Aggregate>,
    pub set_context: Option<SetContext>,
    pub clear_context: bool,
    pub release: Option<Release>,
    pub withdraw: Option<Template>,
    pub publish: Option<Publish>,
    pub emit: Option<Emit>,
}

impl Rule {
    fn key(&self, point: &str) -> String {
        format!("{}\u{1f}{point}", self.name)
    }
}

/// A message built by a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltMessage {
    pub message: Message,
    pub rule: String,
    /// The line whose events built it.
    pub line: String,
}

/// Counters for the operator surface.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Events that needed an order on a line that had none.
    pub unassigned: AtomicU64,
    /// Messages not built because a template had nothing to render or the result was invalid.
    pub build_errors: AtomicU64,
    /// Events no rule takes (an unknown topic or point).
    pub unmatched: AtomicU64,
}

#[derive(Debug)]
pub struct Engine {
    rules: Vec<Arc<Rule>>,
    /// The rules by what they match first (index.rs).
    index: index::RuleIndex,
    /// The candidates of the event being processed (kept to spare an allocation per event).
    candidates: Vec<usize>,
    state: EngineState,
    dirty: bool,
    time_zone: jiff::tz::TimeZone,
    /// Lines already warned about in the current unassigned burst.
    warned_unassigned: std::collections::BTreeSet<String>,
    /// (source, point) pairs already reported as taken by no rule.
    reported_unmatched: std::collections::BTreeSet<(String, String)>,
    /// Messages for MQTT built by `publish`, until the pipeline takes them.
    publications: Vec<Publication>,
    pub stats: Arc<RuleStats>,
}

/// The value a rule looks at: the event value or a field of its JSON payload.
fn subject(event: &Event, field: Option<&[String]>) -> Option<Json> {
    let whole = match &event.value {
        Value::Bool(b) => Json::Bool(*b),
        Value::Number(n) => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Value::Text(t) => Json::String(t.clone()),
        Value::Json(j) => j.clone(),
    };
    match field {
        None => Some(whole),
        Some(path) => {
            let mut v = &whole;
            for key in path {
                v = v.get(key)?;
            }
            Some(v.clone())
        }
    }
}

fn as_bool(v: &Json) -> Option<bool> {
    match v {
        Json::Bool(b) => Some(*b),
        Json::Number(n) => n.as_f64().map(|f| f != 0.0),
        Json::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "1" => Some(true),
            "false" | "off" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn as_f64(v: &Json) -> Option<f64> {
    match v {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        Json::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

fn equal(a: &Json, b: &Json) -> bool {
    match (as_f64(a), as_f64(b)) {
        (Some(x), Some(y)) if a.is_number() || b.is_number() => x == y,
        _ => match (a, b) {
            (Json::String(x), Json::String(y)) => x == y,
            _ => a == b,
        },
    }
}

impl Engine {
    pub fn new(rules: Vec<Rule>, time_zone: jiff::tz::TimeZone, state: EngineState) -> Engine {
        let index = index::RuleIndex::new(&rules);
        Engine {
            rules: rules.into_iter().map(Arc::new).collect(),
            index,
            candidates: Vec::new(),
            state,
            dirty: false,
            time_zone,
            warned_unassigned: Default::default(),
            reported_unmatched: Default::default(),
            publications: Vec::new(),
            stats: Arc::default(),
        }
    }

    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// The MQTT messages built since the last call, in the order built.
    pub fn take_publications(&mut self) -> Vec<Publication> {
        std::mem::take(&mut self.publications)
    }

    /// The state to persist, if it changed since the last call.
    pub fn take_dirty_state(&mut self) -> Option<&EngineState> {
        if std::mem::take(&mut self.dirty) {
            Some(&self.state)
        } else {
            None
        }
    }

    /// Applies one event to every rule, in order.
    pub fn process(&mut self, event: &Event) -> Vec<BuiltMessage> {
        self.process_event(event, false)
    }

    /// [`Engine::process`] for an event that is used elsewhere too (`used_elsewhere`: a
    /// D365 verdict the outbox applies): when no rule takes it, it is not counted or
    /// logged as dropped.
    pub fn process_event(&mut self, event: &Event, used_elsewhere: bool) -> Vec<BuiltMessage> {
        let mut out = Vec::new();
        let mut taken = false;
        let mut candidates = std::mem::take(&mut self.candidates);
        self.index
            .candidates(&event.source, &event.point, &mut candidates);
        for &i in &candidates {
            let rule = self.rules[i].clone();
            if *rule.source != *event.source
                || rule.point.as_deref().is_some_and(|p| p != &*event.point)
                || rule
                    .topic
                    .as_ref()
                    .is_some_and(|t| t.matches(&event.point).is_none())
            {
                continue;
            }
            taken = true;
            let mut captures = BTreeMap::new();
            if let Some(filter) = &rule.topic {
                match filter.matches(&event.point) {
                    Some(c) => captures.extend(c),
                    None => continue,
                }
            }
            let Some(value) = subject(event, rule.field.as_deref()) else {
                continue;
            };
            if let Some(pattern) = &rule.pattern {
                let text = match &value {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let Some(caps) = pattern.captures(&text) else {
                    continue;
                };
                for name in pattern.capture_names().flatten() {
                    if let Some(m) = caps.name(name) {
                        captures.insert(name.to_string(), m.as_str().to_string());
                    }
                }
            }
            let matched = match &rule.condition {
                None => true,
                Some(Condition::Equals(v)) => equal(&value, v),
                Some(Condition::Above(x)) => as_f64(&value).is_some_and(|n| n > *x),
                Some(Condition::Below(x)) => as_f64(&value).is_some_and(|n| n < *x),
            };
            if !matched {
                continue;
            }
            let key = rule.key(&event.point);
            if rule.changed {
                let previous = self.state.last_values.insert(key.clone(), value.clone());
                self.dirty = true;
                if previous.is_none_or(|p| equal(&p, &value)) {
                    continue;
                }
            }
            let trigger = Trigger {
                source: event.source.to_string(),
                point: event.point.to_string(),
                captures,
                payload: match &event.value {
                    Value::Json(j) => Some(j.clone()),
                    _ => None,
                },
                value: value.clone(),
                at: event.at,
            };
            match rule.edge {
                None => self.fire(i, trigger, &mut out),
                Some((edge, debounce)) => {
                    let Some(level) = as_bool(&value) else {
                        tracing::debug!(rule = %rule.name, point = %event.point, value = %value, "Edge rule got a value that is not a boolean; ignored.");
                        continue;
                    };
                    let state = self.state.edges.entry(key.clone()).or_default();
                    let confirmed = state.observe(edge, debounce, level, event.at);
                    let pending = state.pending.is_some();
                    self.dirty = true;
                    // A confirmation by this event fires with the trigger that started the
                    // pending level; a new pending level remembers this one.
                    let earlier = self.state.pending_triggers.remove(&key);
                    for at in confirmed {
                        let mut t = earlier.clone().unwrap_or_else(|| trigger.clone());
                        t.at = at;
                        self.fire(i, t, &mut out);
                    }
                    if pending {
                        let keep = match earlier {
                            Some(e)
                                if self
                                    .state
                                    .edges
                                    .get(&key)
                                    .and_then(|s| s.pending)
                                    .is_some_and(|(_, since)| since == e.at) =>
                            {
                                e
                            }
                            _ => trigger,
                        };
                        self.state.pending_triggers.insert(key, keep);
                    }
                }
            }
        }
        self.candidates = candidates;
        if !taken && !used_elsewhere {
            self.stats.unmatched.fetch_add(1, Ordering::Relaxed);
            if self
                .reported_unmatched
                .insert((event.source.to_string(), event.point.to_string()))
            {
                let value = format!("{:?}", event.value);
                let excerpt: String = value.chars().take(80).collect();
                tracing::info!(source = %event.source, point = %event.point, value = %excerpt,
                    "No rule takes events from this topic or point; they are counted and dropped (logged once per point).");
            }
        }
        out
    }

    /// Handles the passing of time: confirms debounced edges and flushes aggregates whose
    /// interval has passed.
    pub fn tick(&mut self, now: jiff::Timestamp) -> Vec<BuiltMessage> {
        let mut out = Vec::new();
        for i in 0..self.rules.len() {
            let Some((edge, debounce)) = self.rules[i].edge else {
                continue;
            };
            let prefix = format!("{}\u{1f}", self.rules[i].name);
            let keys: Vec<String> = self
                .state
                .edges
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for key in keys {
                let Some(state) = self.state.edges.get_mut(&key) else {
                    continue;
                };
                if let Some(at) = state.settle(edge, debounce, now) {
                    self.dirty = true;
                    if let Some(mut t) = self.state.pending_triggers.remove(&key) {
                        t.at = at;
                        self.fire(i, t, &mut out);
                    }
                } else if state.pending.is_none() {
                    self.state.pending_triggers.remove(&key);
                }
            }
        }
        let due: Vec<String> = self
            .state
            .accumulators
            .iter()
            .filter(|(_, acc)| {
                self.rule_index(&acc.rule)
                    .and_then(|i| self.rules[i].aggregate.as_ref()?.interval)
                    .is_some_and(|interval| now >= matcher::later(acc.opened_at, interval))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.flush_accumulator(&key, now, &mut out);
        }
        out
    }

    /// The next time [`Engine::tick`] has work, if any.
    pub fn next_deadline(&self) -> Option<jiff::Timestamp> {
        let edges = self.rules.iter().filter_map(|r| {
            let (_, debounce) = r.edge?;
            let prefix = format!("{}\u{1f}", r.name);
            self.state
                .edges
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(_, s)| s.deadline(debounce))
                .min()
        });
        let aggregates = self.state.accumulators.values().filter_map(|acc| {
            let interval = self.rules[self.rule_index(&acc.rule)?]
                .aggregate
                .as_ref()?
                .interval?;
            Some(matcher::later(acc.opened_at, interval))
        });
        edges.chain(aggregates).min()
    }

    /// Reports everything still accumulated (at shutdown).
    pub fn flush_all(&mut self, now: jiff::Timestamp) -> Vec<BuiltMessage> {
        let mut out = Vec::new();
        let keys: Vec<String> = self.state.accumulators.keys().cloned().collect();
        for key in keys {
            self.flush_accumulator(&key, now, &mut out);
        }
        out
    }

    /// An operator sets (or, with `None`, clears) a line's order context. What the line
    /// aggregated for the previous order is reported first, as when a rule changes it.
    /// Returns the previous context and the messages that flushing built.
    pub fn set_line(
        &mut self,
        line: &str,
        context: Option<OrderContext>,
        by: &str,
        now: jiff::Timestamp,
    ) -> (Option<OrderContext>, Vec<BuiltMessage>) {
        let mut out = Vec::new();
        let previous = self.state.contexts.get(line).cloned();
        let order_changes = match (&previous, &context) {
            (Some(old), Some(new)) => old.order != new.order || old.item != new.item,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if order_changes {
            self.flush_line(line, now, &mut out);
        }
        match context {
            Some(ctx) => {
                tracing::info!(%line, order = %crate::text::for_log(&ctx.order), item = ?ctx.item, %by, "Order context set by an operator.");
                self.warned_unassigned.remove(line);
                self.state.contexts.insert(line.to_string(), ctx);
            }
            None => {
                if previous.is_some() {
                    tracing::info!(%line, %by, "Order context cleared by an operator.");
                }
                self.state.contexts.remove(line);
            }
        }
        self.dirty = true;
        (previous, out)
    }
}

#[cfg(test)]
mod tests;
