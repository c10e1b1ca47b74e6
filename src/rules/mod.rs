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
use matcher::counter_delta;
use state::{Accumulator, EngineState, OrderContext, ReleasedOrder, Trigger};
use template::{Missing, Scope, Template, Var};

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

/// A value as a number. Text like "nan" or "inf" parses as a float but is no number to
/// count with: a counter based on it would report garbage and could not be saved.
/// A rule's actions for one trigger, built before any is applied (see `Engine::fire`).
#[derive(Debug, Default)]
struct Plan {
    context: Option<OrderContext>,
    released: Option<ReleasedOrder>,
    withdrawn: Option<String>,
    publication: Option<Publication>,
    quantity: Option<f64>,
    /// The message, when it goes out now (not aggregated).
    message: Option<BuiltMessage>,
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

    /// `release` and `withdraw`: the line's list of released orders.
    /// `publish`: the topic and payload rendered in `scope`; the pipeline stores the
    /// message with the batch and the publisher sends it.
    fn publication(
        rule: &Rule,
        publish: &Publish,
        scope: &Scope<'_>,
    ) -> Result<Publication, Missing> {
        let topic = publish.topic.render_text(scope)?;
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(Missing::Other(format!(
                "publish.topic rendered {topic:?}, not a topic to publish to"
            )));
        }
        let payload = match &publish.payload {
            PublishPayload::Text(t) => t.render_text(scope)?,
            PublishPayload::Fields(fields) => {
                let mut object = serde_json::Map::new();
                for (name, t) in fields {
                    object.insert(name.clone(), t.render(scope)?);
                }
                Json::Object(object).to_string()
            }
        };
        Ok(Publication {
            via: publish.via.clone(),
            topic,
            payload,
            retain: publish.retain,
            rule: rule.name.clone(),
        })
    }

    fn rule_index(&self, name: &str) -> Option<usize> {
        self.rules.iter().position(|r| r.name == name)
    }

    /// Runs a rule's actions for one trigger: context, releases, publication, counting,
    /// emit — all or nothing. Every action is built first, against the context the rule
    /// itself sets; if any cannot be built, none runs, and the log says which part failed
    /// and why. (A line without an order is not a failure: the event is counted as
    /// unassigned, as before.)
    fn fire(&mut self, i: usize, trigger: Trigger, out: &mut Vec<BuiltMessage>) {
        let rule = self.rules[i].clone();
        let line = match &rule.line {
            None => None,
            Some(t) => match t.render_text(&self.scope(&rule, &trigger, None, None)) {
                Ok(l) => Some(l),
                Err(m) => {
                    self.refuse(&rule, &trigger, "line", &m);
                    return;
                }
            },
        };
        let plan = match self.plan(&rule, &trigger, line.as_deref()) {
            Ok(plan) => plan,
            Err((part, m)) => {
                self.refuse(&rule, &trigger, part, &m);
                return;
            }
        };

        if let (Some(ctx), Some(line)) = (plan.context, &line) {
            let current = self.state.contexts.get(line).cloned();
            if current
                .as_ref()
                .is_some_and(|c| c.order != ctx.order || c.item != ctx.item)
            {
                self.flush_line(line, trigger.at, out);
            }
            if current.as_ref().is_none_or(|c| c.order != ctx.order) {
                tracing::info!(%line, order = %crate::text::for_log(&ctx.order), item = ?ctx.item, rule = %rule.name, "Order context set.");
            }
            self.warned_unassigned.remove(line);
            self.state.contexts.insert(line.clone(), ctx);
            self.dirty = true;
        }
        if rule.clear_context {
            if let Some(line) = &line {
                self.flush_line(line, trigger.at, out);
                if let Some(old) = self.state.contexts.remove(line) {
                    tracing::info!(%line, order = %crate::text::for_log(&old.order), rule = %rule.name, "Order context cleared.");
                    self.dirty = true;
                }
            }
        }
        if let Some(line) = &line {
            self.apply_release(&rule, line, plan.released, plan.withdrawn);
        }
        if let Some(p) = plan.publication {
            self.publications.push(p);
        }

        let quantity = match &rule.count {
            None => None,
            Some(counting) => {
                if counting.mode == CountMode::Delta {
                    // The plan read the counter; now it is stored.
                    if let Some(v) = as_f64(&trigger.value) {
                        self.state.counters.insert(rule.key(&trigger.point), v);
                        self.dirty = true;
                    }
                }
                match plan.quantity {
                    Some(q) if q > 0.0 && q.is_finite() => Some(q),
                    _ => return,
                }
            }
        };
        let Some(emit) = &rule.emit else { return };
        let Some(line) = line else { return };
        let context = self.state.contexts.get(&line).cloned();
        if context.is_none() && self.needs_context(emit) {
            self.unassigned(&rule, &line, &trigger, quantity);
            return;
        }
        match (&rule.aggregate, quantity) {
            (Some(aggregate), Some(q)) => {
                // Without a context the rule names its production order itself.
                let key = match &context {
                    Some(ctx) => {
                        Accumulator::key(&rule.name, &line, &ctx.order, ctx.item.as_deref())
                    }
                    None => Accumulator::key(&rule.name, &line, "", None),
                };
                let acc = self
                    .state
                    .accumulators
                    .entry(key.clone())
                    .or_insert_with(|| Accumulator {
                        rule: rule.name.clone(),
                        line: line.clone(),
                        context: context.clone(),
                        quantity: 0.0,
                        opened_at: trigger.at,
                        trigger: trigger.clone(),
                    });
                acc.quantity += q;
                acc.trigger = trigger.clone();
                self.dirty = true;
                if aggregate.every.is_some_and(|every| acc.quantity >= every) {
                    self.flush_accumulator(&key, trigger.at, out);
                }
            }
            _ => {
                if let Some(b) = plan.message {
                    out.push(b);
                }
            }
        }
    }

    /// Builds every action of `rule` for `trigger` without changing anything: the
    /// context it sets, its release and withdrawal, its publication, the quantity it
    /// counts, and (when not aggregated) its message. The first part that cannot be built
    /// is the error, named.
    fn plan(
        &self,
        rule: &Rule,
        trigger: &Trigger,
        line: Option<&str>,
    ) -> Result<Plan, (&'static str, Missing)> {
        let mut plan = Plan::default();
        let current = line.and_then(|l| self.state.contexts.get(l)).cloned();
        if let (Some(set), Some(line)) = (&rule.set_context, line) {
            let scope = self.scope(rule, trigger, current.as_ref(), Some(line));
            let render =
                |t: &Option<Template>| t.as_ref().map(|t| t.render_text(&scope)).transpose();
            let part = |m| ("set_context", m);
            let ctx = OrderContext {
                order: set.order.render_text(&scope).map_err(part)?,
                item: render(&set.item).map_err(part)?,
                operation: render(&set.operation).map_err(part)?,
                resource: render(&set.resource).map_err(part)?,
                since: Some(trigger.at),
            };
            if ctx.order.trim().is_empty() {
                return Err(part(Missing::Other(
                    "set_context.order rendered empty".into(),
                )));
            }
            plan.context = Some(ctx);
        }
        // What the other actions see: the context this rule sets, else the line's.
        let context = if rule.clear_context {
            None
        } else {
            plan.context.clone().or(current)
        };
        let scope = self.scope(rule, trigger, context.as_ref(), line);
        if line.is_some() {
            if let Some(r) = &rule.release {
                let part = |m| ("release", m);
                let released = ReleasedOrder {
                    order: r.order.render_text(&scope).map_err(part)?,
                    item: r
                        .item
                        .as_ref()
                        .map(|t| t.render_text(&scope))
                        .transpose()
                        .map_err(part)?,
                    at: trigger.at,
                    rule: rule.name.clone(),
                };
                if released.order.trim().is_empty() {
                    return Err(part(Missing::Other("release.order rendered empty".into())));
                }
                plan.released = Some(released);
            }
            if let Some(w) = &rule.withdraw {
                plan.withdrawn = Some(w.render_text(&scope).map_err(|m| ("withdraw", m))?);
            }
        }
        if let Some(publish) = &rule.publish {
            plan.publication =
                Some(Self::publication(rule, publish, &scope).map_err(|m| ("publish", m))?);
        }
        if let Some(counting) = &rule.count {
            plan.quantity = Some(match counting.mode {
                CountMode::Impulse => counting.quantity,
                CountMode::Value => as_f64(&trigger.value).map_or(0.0, |v| v * counting.quantity),
                CountMode::Delta => match as_f64(&trigger.value) {
                    // Not a number: nothing counted, nothing else done (as before).
                    None => {
                        return Err(("count", Missing::Other("the value is not a number".into())))
                    }
                    // The first reading only sets the base: what the counter showed
                    // before the gateway watched it was not counted by us.
                    Some(v) => self
                        .state
                        .counters
                        .get(&rule.key(&trigger.point))
                        .map_or(0.0, |last| {
                            counter_delta(*last, v, counting.counter_max) * counting.quantity
                        }),
                },
            });
        }
        if let (Some(emit), Some(line)) = (&rule.emit, line) {
            let counted_nothing =
                rule.count.is_some() && !plan.quantity.is_some_and(|q| q > 0.0 && q.is_finite());
            let unassigned = context.is_none() && self.needs_context(emit);
            // An aggregated message is built when its window closes (from the window's
            // context and last event); building it for every event here as well would
            // double the hot path's cost, so it is not checked now.
            if !counted_nothing && !unassigned && rule.aggregate.is_none() {
                plan.message = Some(
                    self.build_message(rule, emit, trigger, context.as_ref(), line, plan.quantity)
                        .map_err(|m| ("emit", m))?,
                );
            }
        }
        Ok(plan)
    }

    /// Stores a planned release and withdrawal for `line`.
    fn apply_release(
        &mut self,
        rule: &Rule,
        line: &str,
        released: Option<ReleasedOrder>,
        withdrawn: Option<String>,
    ) {
        if let Some(r) = released {
            let list = self.state.released.entry(line.to_string()).or_default();
            list.retain(|o| o.order != r.order);
            tracing::info!(%line, order = %crate::text::for_log(&r.order), item = ?r.item, rule = %rule.name, "Order released for the line.");
            list.push(r);
            if list.len() > MAX_RELEASED_PER_LINE {
                let dropped = list.remove(0);
                tracing::warn!(%line, order = %crate::text::for_log(&dropped.order), kept = MAX_RELEASED_PER_LINE, "Too many released orders for one line; the oldest is no longer listed (withdraw finished orders with a rule).");
            }
            self.dirty = true;
        }
        if let Some(order) = withdrawn {
            if let Some(list) = self.state.released.get_mut(line) {
                let before = list.len();
                list.retain(|o| o.order != order);
                if list.len() != before {
                    tracing::info!(%line, order = %crate::text::for_log(&order), rule = %rule.name, "Order withdrawn from the line's released list.");
                    self.dirty = true;
                }
                if list.is_empty() {
                    self.state.released.remove(line);
                }
            }
        }
    }

    /// A rule's action that could not be built: none of its actions ran.
    fn refuse(&self, rule: &Rule, trigger: &Trigger, part: &str, missing: &Missing) {
        self.stats.build_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(rule = %rule.name, origin = %rule.origin, source = %trigger.source, point = %crate::text::for_log(&trigger.point), part, problem = ?missing,
            "Rule not applied: its {part} could not be built, so none of its actions ran (no context change, release, publication, count or message).");
    }

    fn needs_context(&self, emit: &Emit) -> bool {
        let uses = |fields: &[(String, Template)]| {
            fields
                .iter()
                .any(|(_, t)| t.vars().any(|v| matches!(v, Var::Context(_))))
        };
        let sets_order = emit
            .header
            .iter()
            .any(|(n, _)| n == "ProductionOrderNumber");
        !sets_order || uses(&emit.header) || uses(&emit.line)
    }

    fn unassigned(&mut self, rule: &Rule, line: &str, trigger: &Trigger, quantity: Option<f64>) {
        self.stats.unassigned.fetch_add(1, Ordering::Relaxed);
        if self.warned_unassigned.insert(line.to_string()) {
            tracing::warn!(%line, rule = %rule.name, point = %trigger.point, quantity = ?quantity,
                "Line has no production order: events are counted as unassigned and no message is built until an order is set (further ones are not logged until then).");
        }
    }

    fn build_error(&self, rule: &Rule, trigger: &Trigger, missing: &Missing) {
        self.stats.build_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(rule = %rule.name, origin = %rule.origin, source = %trigger.source, point = %trigger.point, problem = ?missing, "Rule could not build its message; event skipped.");
    }

    fn flush_line(&mut self, line: &str, now: jiff::Timestamp, out: &mut Vec<BuiltMessage>) {
        let keys: Vec<String> = self
            .state
            .accumulators
            .iter()
            .filter(|(_, a)| a.line == line)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.flush_accumulator(&key, now, out);
        }
    }

    fn flush_accumulator(&mut self, key: &str, now: jiff::Timestamp, out: &mut Vec<BuiltMessage>) {
        let Some(acc) = self.state.accumulators.remove(key) else {
            return;
        };
        self.dirty = true;
        let Some(i) = self.rule_index(&acc.rule) else {
            tracing::warn!(rule = %acc.rule, quantity = acc.quantity, order = ?acc.context.as_ref().map(|c| &c.order),
                "Accumulated quantity of a rule that no longer exists is dropped.");
            return;
        };
        let rule = self.rules[i].clone();
        let Some(emit) = &rule.emit else { return };
        let mut trigger = acc.trigger.clone();
        trigger.at = now.max(acc.trigger.at);
        if let Some(b) = self.build(
            &rule,
            emit,
            &trigger,
            acc.context.as_ref(),
            &acc.line,
            Some(acc.quantity),
        ) {
            out.push(b);
        }
    }

    fn scope<'a>(
        &'a self,
        rule: &'a Rule,
        trigger: &'a Trigger,
        context: Option<&'a OrderContext>,
        line: Option<&'a str>,
    ) -> Scope<'a> {
        Scope {
            quantity: None,
            context,
            captures: &trigger.captures,
            payload: trigger.payload.as_ref(),
            value: &trigger.value,
            at: trigger.at,
            time_zone: &self.time_zone,
            line,
            source: &trigger.source,
            point: &trigger.point,
            rule: &rule.name,
        }
    }

    /// The message of `emit`, logged and counted when it cannot be built (a window that
    /// closes later: its context may have lost a field since).
    fn build(
        &self,
        rule: &Rule,
        emit: &Emit,
        trigger: &Trigger,
        context: Option<&OrderContext>,
        line: &str,
        quantity: Option<f64>,
    ) -> Option<BuiltMessage> {
        match self.build_message(rule, emit, trigger, context, line, quantity) {
            Ok(b) => Some(b),
            Err(m) => {
                self.build_error(rule, trigger, &m);
                None
            }
        }
    }

    /// The message of `emit` for `trigger` in `context`, checked as D365 will check it.
    fn build_message(
        &self,
        rule: &Rule,
        emit: &Emit,
        trigger: &Trigger,
        context: Option<&OrderContext>,
        line: &str,
        quantity: Option<f64>,
    ) -> Result<BuiltMessage, Missing> {
        let mut scope = self.scope(rule, trigger, context, Some(line));
        scope.quantity = quantity;
        let mut header = serde_json::Map::new();
        for (name, t) in &emit.header {
            header.insert(name.clone(), t.render(&scope)?);
        }
        if !header.contains_key("ProductionOrderNumber") {
            let order = context
                .map(|c| c.order.clone())
                .ok_or(Missing::Context("order"))?;
            header.insert("ProductionOrderNumber".into(), Json::String(order));
        }
        if let Some(key) = emit.lines_key {
            let mut l = serde_json::Map::new();
            for (name, t) in &emit.line {
                l.insert(name.clone(), t.render(&scope)?);
            }
            header.insert(key.into(), Json::Array(vec![Json::Object(l)]));
        }
        let message = Message::from_json(&emit.message_type, Json::Object(header))
            .and_then(|m| m.validate().map(|()| m))
            .map_err(|e| Missing::Other(format!("the message is not valid: {e}")))?;
        Ok(BuiltMessage {
            message,
            rule: rule.name.clone(),
            line: line.to_string(),
        })
    }
}

#[cfg(test)]
mod tests;
