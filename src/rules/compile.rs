//! Compiling a rule as written ([`RawRule`]) into a [`Rule`]: every reference (source,
//! point, message type, field, template variable) checked at load time, so the engine
//! never parses anything at run time.

use std::time::Duration;

use crate::config::value::ScalarValue;
use crate::message::{
    Message, KNOWN_TYPES, TYPE_PICKING_LIST, TYPE_REPORT_FINISHED, TYPE_ROUTE_CARD,
};
use crate::mqtt::topic::TopicFilter;
use crate::source::config::BrokenSource;
use crate::source::SourceConfig;

use super::config::{CountMode, RawPayload, RawRule};
use super::template::{Template, Var};
use super::{
    Aggregate, Condition, Counting, Emit, Publish, PublishPayload, Release, Rule, SetContext,
};

/// A compile error: a field path inside the rule, and the message.
pub type RuleError = (String, String);

fn header_fields(message_type: &str) -> &'static [&'static str] {
    match message_type {
        TYPE_REPORT_FINISHED => &["ProductionOrderNumber", "PrintLabel"],
        TYPE_PICKING_LIST | TYPE_ROUTE_CARD => &["ProductionOrderNumber", "JournalNameId"],
        _ => &[],
    }
}

/// Whether `field` is a field of `message_type` (header or line), by asking the message
/// model itself: every optional field accepts `null`, an unknown one is refused by name.
fn check_field(message_type: &str, field: &str, in_line: bool) -> Result<(), String> {
    let probe = match (in_line, crate::message::lines_field(message_type)) {
        (true, Some(key)) => {
            serde_json::json!({ "ProductionOrderNumber": "x", key: [{ field: null }] })
        }
        _ => serde_json::json!({ "ProductionOrderNumber": "x", field: null }),
    };
    match Message::from_json(message_type, probe) {
        Err(e) if e.to_string().contains("unknown field") => {
            Err(format!("`{field}` is not a field of {message_type}"))
        }
        _ => Ok(()),
    }
}

impl Rule {
    /// Compiles one rule; `sources` are the configured sources it may refer to.
    pub fn compile(
        raw: RawRule,
        origin: String,
        sources: &[SourceConfig],
        broken: &[BrokenSource],
    ) -> Result<Rule, Vec<RuleError>> {
        // A RefCell so the helper closures below can all report errors.
        let errors: std::cell::RefCell<Vec<RuleError>> = Default::default();
        let err = |path: &str, msg: String| errors.borrow_mut().push((path.to_string(), msg));
        if raw.name.trim().is_empty() {
            err("name", "must not be empty".into());
        }
        let when = raw.when;
        let source = sources.iter().find(|s| s.id() == when.source);
        // A source whose own section has errors is not "unknown": say this error is theirs.
        let follows = |id: &str| {
            broken.iter().find(|b| b.id == id).map(|b| {
                format!(
                    "source `{id}` did not load (follows from the errors at {} above)",
                    b.at
                )
            })
        };
        match source {
            None if follows(&when.source).is_some() => {
                err("when.source", follows(&when.source).unwrap_or_default())
            }
            None => err(
                "when.source",
                format!(
                    "unknown source `{}`; configured sources: {}",
                    when.source,
                    if sources.is_empty() {
                        "none".to_string()
                    } else {
                        sources
                            .iter()
                            .map(SourceConfig::id)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            ),
            Some(s) => {
                if let (Some(point), Some(points)) = (&when.point, s.points()) {
                    if !points.contains(point) {
                        err(
                            "when.point",
                            format!(
                                "source `{}` has no point `{point}`; its points: {}",
                                s.id(),
                                points.join(", ")
                            ),
                        );
                    }
                }
                if when.topic.is_some() && !s.has_topics() {
                    err(
                        "when.topic",
                        format!(
                            "source `{}` is not an MQTT source; match its points with `point`",
                            s.id()
                        ),
                    );
                }
            }
        }
        let topic = when
            .topic
            .as_deref()
            .and_then(|t| TopicFilter::parse(t).map_err(|e| err("when.topic", e)).ok());
        let pattern = when.pattern.as_deref().and_then(|p| {
            regex::Regex::new(p)
                .map_err(|e| err("when.pattern", format!("invalid regular expression: {e}")))
                .ok()
        });
        let mut captures: Vec<String> = Vec::new();
        if let Some(t) = &topic {
            captures.extend(t.capture_names().map(str::to_string));
        }
        if let Some(p) = &pattern {
            captures.extend(p.capture_names().flatten().map(str::to_string));
        }
        let field = when
            .field
            .as_ref()
            .map(|f| f.split('.').map(str::to_string).collect::<Vec<_>>());
        if field
            .as_ref()
            .is_some_and(|f| f.iter().any(String::is_empty))
        {
            err(
                "when.field",
                format!(
                    "bad payload path {:?}",
                    when.field.as_deref().unwrap_or_default()
                ),
            );
        }
        let conditions = [
            when.equals.is_some(),
            when.above.is_some(),
            when.below.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if conditions > 1 {
            err("when", "use one of equals, above, below".into());
        }
        let condition = match (&when.equals, when.above, when.below) {
            (Some(v), _, _) => Some(Condition::Equals(v.to_json())),
            (_, Some(a), _) => Some(Condition::Above(a)),
            (_, _, Some(b)) => Some(Condition::Below(b)),
            _ => None,
        };
        let debounce = match &when.debounce {
            None => Duration::ZERO,
            Some(d) => crate::config::parse_duration(d).unwrap_or_else(|e| {
                err("when.debounce", e);
                Duration::ZERO
            }),
        };
        if when.debounce.is_some() && when.edge.is_none() {
            err(
                "when.debounce",
                "debounce applies to edges: set `edge` too".into(),
            );
        }

        let count = raw.count.map(|mode| Counting {
            mode,
            quantity: raw.quantity.unwrap_or(1.0),
            counter_max: raw.counter_max,
        });
        if let Some(q) = raw.quantity {
            if !q.is_finite() || q <= 0.0 {
                err("quantity", format!("{q} must be a positive number"));
            }
            if count.is_none() {
                err("quantity", "quantity needs `count`".into());
            }
        }
        if raw.counter_max.is_some() && raw.count != Some(CountMode::Delta) {
            err(
                "counter_max",
                "counter_max applies to `count: delta`".into(),
            );
        }
        let aggregate = raw.aggregate.map(|a| {
            let interval =
                a.interval
                    .as_deref()
                    .and_then(|i| match crate::config::parse_duration(i) {
                        Ok(d) if !d.is_zero() => Some(d),
                        Ok(_) => {
                            err("aggregate.interval", "must be greater than zero".into());
                            None
                        }
                        Err(e) => {
                            err("aggregate.interval", e);
                            None
                        }
                    });
            if let Some(every) = a.every {
                if !every.is_finite() || every <= 0.0 {
                    err(
                        "aggregate.every",
                        format!("{every} must be a positive number"),
                    );
                }
            }
            if a.every.is_none() && a.interval.is_none() {
                err("aggregate", "set `every`, `interval` or both".into());
            }
            Aggregate {
                every: a.every,
                interval,
            }
        });
        if aggregate.is_some() && count.is_none() {
            err("aggregate", "aggregate needs `count`".into());
        }

        let template = |path: &str, text: &str| -> Option<Template> {
            match Template::parse(text) {
                Ok(t) => {
                    for v in t.vars() {
                        match v {
                            Var::Capture(name) if !captures.contains(name) => err(
                                path,
                                format!("`{{capture.{name}}}`: no such capture in `topic` or `pattern` (captures: {})", if captures.is_empty() { "none".to_string() } else { captures.join(", ") }),
                            ),
                            Var::Quantity if count.is_none() => err(path, "`{quantity}` needs `count`".into()),
                            _ => {}
                        }
                    }
                    Some(t)
                }
                Err(e) => {
                    err(path, e);
                    None
                }
            }
        };
        let line = raw.line.as_deref().and_then(|l| template("line", l));
        let set_context = raw.set_context.as_ref().and_then(|c| {
            Some(SetContext {
                order: template("set_context.order", &c.order)?,
                item: c
                    .item
                    .as_deref()
                    .and_then(|t| template("set_context.item", t)),
                operation: c
                    .operation
                    .as_deref()
                    .and_then(|t| template("set_context.operation", t)),
                resource: c
                    .resource
                    .as_deref()
                    .and_then(|t| template("set_context.resource", t)),
            })
        });
        let release = raw.release.as_ref().and_then(|r| {
            Some(Release {
                order: template("release.order", &r.order)?,
                item: r.item.as_deref().and_then(|t| template("release.item", t)),
            })
        });
        let withdraw = raw
            .withdraw
            .as_deref()
            .and_then(|t| template("withdraw", t));
        let publish = raw.publish.as_ref().and_then(|p| {
            match sources.iter().find(|s| s.id() == p.via) {
                None if follows(&p.via).is_some() => {
                    err("publish.via", follows(&p.via).unwrap_or_default())
                }
                None => err(
                    "publish.via",
                    format!(
                        "unknown source `{}`: name the `mqtt` source whose broker gets the message",
                        p.via
                    ),
                ),
                Some(s) if !s.has_topics() => err(
                    "publish.via",
                    format!("source `{}` is not an MQTT source", p.via),
                ),
                Some(_) => {}
            }
            if p.topic.contains(['+', '#']) {
                err(
                    "publish.topic",
                    "a topic to publish to has no wildcards (`+`, `#`)".into(),
                );
            }
            let topic = template("publish.topic", &p.topic);
            let payload = match &p.payload {
                RawPayload::Text(t) => PublishPayload::Text(template("publish.payload", t)?),
                RawPayload::Fields(fields) => PublishPayload::Fields(
                    fields
                        .iter()
                        .filter_map(|(name, value)| {
                            let t = match value {
                                ScalarValue::Text(text) => {
                                    template(&format!("publish.payload.{name}"), text)?
                                }
                                other => Template::constant(other.to_json()),
                            };
                            Some((name.clone(), t))
                        })
                        .collect(),
                ),
            };
            Some(Publish {
                via: p.via.clone(),
                topic: topic?,
                payload,
                retain: p.retain,
            })
        });
        let emit = raw.emit.as_ref().map(|e| {
            let mut header = Vec::new();
            let mut line_fields = Vec::new();
            if !KNOWN_TYPES.contains(&e.message_type.as_str()) {
                err(
                    "emit.type",
                    format!(
                        "unknown message type `{}`, expected one of {}",
                        e.message_type,
                        KNOWN_TYPES.join(", ")
                    ),
                );
            }
            let key = crate::message::lines_field(&e.message_type);
            for (name, value) in &e.fields {
                let path = format!("emit.fields.{name}");
                let in_line =
                    key.is_some() && !header_fields(&e.message_type).contains(&name.as_str());
                if KNOWN_TYPES.contains(&e.message_type.as_str()) {
                    if let Err(msg) = check_field(&e.message_type, name, in_line) {
                        err(&path, msg);
                        continue;
                    }
                }
                let t = match value {
                    ScalarValue::Text(text) => template(&path, text),
                    other => Some(Template::constant(other.to_json())),
                };
                if let Some(t) = t {
                    if in_line {
                        line_fields.push((name.clone(), t));
                    } else {
                        header.push((name.clone(), t));
                    }
                }
            }
            if count.is_some()
                && !e
                    .fields
                    .values()
                    .any(|v| matches!(v, ScalarValue::Text(t) if t.contains("{quantity}")))
            {
                err(
                    "emit.fields",
                    "the rule counts, but no field uses `{quantity}`".into(),
                );
            }
            Emit {
                message_type: e.message_type.clone(),
                header,
                line: line_fields,
                lines_key: key,
            }
        });
        let needs_line = set_context.is_some()
            || raw.clear_context
            || emit.is_some()
            || release.is_some()
            || withdraw.is_some();
        if needs_line && line.is_none() {
            err("line", "this rule uses a line's order context: set `line` (a name or a template such as \"{capture.line}\")".into());
        }
        if count.is_some() && emit.is_none() {
            err(
                "emit",
                "a counting rule needs `emit` to report what it counted".into(),
            );
        }
        if set_context.is_some() && raw.clear_context {
            err(
                "clear_context",
                "use set_context or clear_context, not both".into(),
            );
        }
        let errors = errors.into_inner();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Rule {
            name: raw.name,
            origin,
            line,
            source: when.source,
            point: when.point,
            topic,
            pattern,
            field,
            condition,
            changed: when.changed,
            edge: when.edge.map(|e| (e, debounce)),
            count,
            aggregate,
            set_context,
            clear_context: raw.clear_context,
            release,
            withdraw,
            publish,
            emit,
        })
    }
}
