//! Field templates: `"{context.order}"`, `"{capture.line}"`, `"{payload.weight.net}"`,
//! `"{quantity}"`, `"{today}"`, `"lot-{capture.lot}"`. Parsed once when the configuration
//! loads; rendering only looks values up.
//!
//! A template that is exactly one placeholder renders to that value's own JSON type (a
//! quantity stays a number, a JSON payload field keeps its type); anything else renders
//! to a string.

use std::collections::BTreeMap;

use serde_json::Value as Json;

/// One order-context field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextField {
    Order,
    Item,
    Operation,
    Resource,
}

impl ContextField {
    pub const NAMES: [&'static str; 4] = ["order", "item", "operation", "resource"];

    fn parse(s: &str) -> Option<ContextField> {
        Some(match s {
            "order" => ContextField::Order,
            "item" => ContextField::Item,
            "operation" => ContextField::Operation,
            "resource" => ContextField::Resource,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// The counted or aggregated quantity.
    Quantity,
    Context(ContextField),
    /// A named capture from the topic filter or the pattern.
    Capture(String),
    /// The whole payload (`payload`) or a field of a JSON payload (`payload.a.b`).
    Payload(Vec<String>),
    /// The matched value (the event value, or the `field` of the payload).
    Value,
    /// The time of the event, UTC, `2024-01-15T08:30:00Z`.
    Now,
    /// The date of the event in the plant's time zone, `2024-01-15`.
    Today,
    Line,
    Source,
    Point,
    Rule,
}

impl Var {
    /// The names accepted in templates, for error messages.
    pub const HELP: &'static str = "quantity, context.order, context.item, context.operation, context.resource, capture.NAME, payload, payload.PATH, value, now, today, line, source, point, rule";

    fn parse(s: &str) -> Result<Var, String> {
        let s = s.trim();
        Ok(match s {
            "quantity" => Var::Quantity,
            "value" => Var::Value,
            "now" => Var::Now,
            "today" => Var::Today,
            "line" => Var::Line,
            "source" => Var::Source,
            "point" => Var::Point,
            "rule" => Var::Rule,
            "payload" => Var::Payload(Vec::new()),
            _ => {
                if let Some(field) = s.strip_prefix("context.") {
                    Var::Context(ContextField::parse(field).ok_or_else(|| {
                        format!(
                            "unknown context field `{field}`, expected one of {}",
                            ContextField::NAMES.join(", ")
                        )
                    })?)
                } else if let Some(name) = s.strip_prefix("capture.") {
                    if name.is_empty() {
                        return Err("`capture.` needs a capture name".into());
                    }
                    Var::Capture(name.to_string())
                } else if let Some(path) = s.strip_prefix("payload.") {
                    let path: Vec<String> = path.split('.').map(str::to_string).collect();
                    if path.iter().any(String::is_empty) {
                        return Err(format!("bad payload path `{s}`"));
                    }
                    Var::Payload(path)
                } else {
                    return Err(format!(
                        "unknown template variable `{s}`, expected one of {}",
                        Var::HELP
                    ));
                }
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Var(Var),
}

/// A parsed template, or a constant from the YAML (number, bool, text).
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
    /// A YAML number or bool given as is: rendered with its own type.
    constant: Option<Json>,
}

/// What a template can look up.
#[derive(Debug)]
pub struct Scope<'a> {
    pub quantity: Option<f64>,
    pub context: Option<&'a super::state::OrderContext>,
    pub captures: &'a BTreeMap<String, String>,
    pub payload: Option<&'a Json>,
    pub value: &'a Json,
    pub at: jiff::Timestamp,
    pub time_zone: &'a jiff::tz::TimeZone,
    pub line: Option<&'a str>,
    pub source: &'a str,
    pub point: &'a str,
    pub rule: &'a str,
}

/// Why a template could not be rendered for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// The line has no order context (or not that field).
    Context(&'static str),
    Other(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in {text:?}"))?;
            parts.push(Part::Var(Var::parse(&after[..close])?));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in {text:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template {
            parts,
            constant: None,
        })
    }

    pub fn constant(value: Json) -> Template {
        Template {
            parts: Vec::new(),
            constant: Some(value),
        }
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            Part::Text(_) => None,
        })
    }

    /// The text this template always renders to, when it has no variable.
    pub fn literal(&self) -> Option<String> {
        if let Some(c) = &self.constant {
            return Some(into_text(c.clone()));
        }
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Var(_) => None,
            })
            .collect()
    }

    pub fn uses(&self, var: &Var) -> bool {
        self.vars().any(|v| v == var)
    }

    pub fn render(&self, scope: &Scope<'_>) -> Result<Json, Missing> {
        if let Some(c) = &self.constant {
            return Ok(c.clone());
        }
        if let [Part::Var(v)] = self.parts.as_slice() {
            return lookup(v, scope);
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(v) => match lookup(v, scope)? {
                    Json::String(s) => out.push_str(&s),
                    other => out.push_str(&other.to_string()),
                },
            }
        }
        Ok(Json::String(out))
    }

    /// Renders to text (for line names and context fields).
    pub fn render_text(&self, scope: &Scope<'_>) -> Result<String, Missing> {
        Ok(into_text(self.render(scope)?))
    }
}

/// A rendered value as text: a string as it is, anything else as JSON.
fn into_text(value: Json) -> String {
    match value {
        Json::String(s) => s,
        other => other.to_string(),
    }
}

fn round6(q: f64) -> f64 {
    (q * 1e6).round() / 1e6
}

fn number(n: f64) -> Json {
    serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number)
}

fn lookup(var: &Var, s: &Scope<'_>) -> Result<Json, Missing> {
    Ok(match var {
        // Rounded to 6 decimals: sums of scaled deltas (0.01 h steps) must not reach D365
        // as 0.15999999999999998.
        Var::Quantity => number(round6(s.quantity.ok_or_else(|| {
            Missing::Other("no quantity: this rule does not count".into())
        })?)),
        Var::Context(field) => {
            let ctx = s.context.ok_or(Missing::Context("order"))?;
            let (value, name) = match field {
                ContextField::Order => (Some(&ctx.order), "order"),
                ContextField::Item => (ctx.item.as_ref(), "item"),
                ContextField::Operation => (ctx.operation.as_ref(), "operation"),
                ContextField::Resource => (ctx.resource.as_ref(), "resource"),
            };
            Json::String(
                value
                    .filter(|v| !v.is_empty())
                    .ok_or(Missing::Context(name))?
                    .clone(),
            )
        }
        Var::Capture(name) => Json::String(
            s.captures
                .get(name)
                .ok_or_else(|| Missing::Other(format!("capture `{name}` did not match")))?
                .clone(),
        ),
        Var::Payload(path) => {
            let mut v = s
                .payload
                .ok_or_else(|| Missing::Other("the payload is not JSON".into()))?;
            for key in path {
                v = v.get(key).ok_or_else(|| {
                    Missing::Other(format!("payload has no field `{}`", path.join(".")))
                })?;
            }
            v.clone()
        }
        Var::Value => s.value.clone(),
        Var::Now => Json::String(s.at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
        Var::Today => Json::String(s.at.to_zoned(s.time_zone.clone()).date().to_string()),
        Var::Line => Json::String(
            s.line
                .ok_or_else(|| Missing::Other("the rule has no line".into()))?
                .to_string(),
        ),
        Var::Source => Json::String(s.source.to_string()),
        Var::Point => Json::String(s.point.to_string()),
        Var::Rule => Json::String(s.rule.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::state::OrderContext;

    fn scope<'a>(
        ctx: Option<&'a OrderContext>,
        caps: &'a BTreeMap<String, String>,
        payload: Option<&'a Json>,
        tz: &'a jiff::tz::TimeZone,
    ) -> Scope<'a> {
        Scope {
            quantity: Some(50.0),
            context: ctx,
            captures: caps,
            payload,
            value: &Json::Bool(true),
            at: "2024-01-15T23:30:00Z".parse().unwrap(),
            time_zone: tz,
            line: Some("line1"),
            source: "plc",
            point: "coil",
            rule: "r",
        }
    }

    #[test]
    fn single_placeholders_keep_their_type_and_mixed_ones_are_text() {
        let ctx = OrderContext {
            order: "P1".into(),
            item: Some("A".into()),
            ..Default::default()
        };
        let caps = BTreeMap::from([("lot".to_string(), "L7".to_string())]);
        let payload = serde_json::json!({"w": {"net": 12.5}});
        let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        let s = scope(Some(&ctx), &caps, Some(&payload), &tz);
        assert_eq!(
            Template::parse("{quantity}").unwrap().render(&s).unwrap(),
            serde_json::json!(50.0)
        );
        assert_eq!(
            Template::parse("{payload.w.net}")
                .unwrap()
                .render(&s)
                .unwrap(),
            serde_json::json!(12.5)
        );
        assert_eq!(
            Template::parse("{context.order}")
                .unwrap()
                .render(&s)
                .unwrap(),
            "P1"
        );
        assert_eq!(
            Template::parse("lot-{capture.lot}/{context.item}")
                .unwrap()
                .render(&s)
                .unwrap(),
            "lot-L7/A"
        );
        assert_eq!(
            Template::parse("{now}").unwrap().render(&s).unwrap(),
            "2024-01-15T23:30:00Z"
        );
        // 23:30 UTC is already the next day in Berlin.
        assert_eq!(
            Template::parse("{today}").unwrap().render(&s).unwrap(),
            "2024-01-16"
        );
        assert_eq!(
            Template::constant(serde_json::json!(10))
                .render(&s)
                .unwrap(),
            serde_json::json!(10)
        );
    }

    #[test]
    fn missing_values_are_reported_not_invented() {
        let caps = BTreeMap::new();
        let tz = jiff::tz::TimeZone::UTC;
        let s = scope(None, &caps, None, &tz);
        assert_eq!(
            Template::parse("{context.order}").unwrap().render(&s),
            Err(Missing::Context("order"))
        );
        assert!(matches!(
            Template::parse("{capture.x}").unwrap().render(&s),
            Err(Missing::Other(_))
        ));
        assert!(matches!(
            Template::parse("{payload.a}").unwrap().render(&s),
            Err(Missing::Other(_))
        ));
    }

    #[test]
    fn bad_templates_are_config_errors() {
        assert!(Template::parse("{context.ordr}")
            .unwrap_err()
            .contains("unknown context field"));
        assert!(Template::parse("{qty}")
            .unwrap_err()
            .contains("unknown template variable `qty`"));
        assert!(Template::parse("{quantity")
            .unwrap_err()
            .contains("unclosed"));
        assert!(Template::parse("a}").is_err());
        assert!(Template::parse("{payload.}").is_err());
    }

    #[test]
    fn a_template_without_variables_is_a_literal_and_one_with_a_variable_is_not() {
        assert_eq!(
            Template::parse("line1").unwrap().literal().as_deref(),
            Some("line1")
        );
        assert_eq!(Template::parse("").unwrap().literal().as_deref(), Some(""));
        assert_eq!(
            Template::constant(Json::from(7)).literal().as_deref(),
            Some("7")
        );
        assert_eq!(
            Template::parse("hall-{capture.line}").unwrap().literal(),
            None
        );
        assert_eq!(Template::parse("{capture.line}").unwrap().literal(), None);
    }
}
