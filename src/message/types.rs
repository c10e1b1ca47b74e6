//! Which message types may be queued: the five documented ones, and the ones a plant added
//! to the queue in D365 and declared under `d365.custom_message_types` (a name, and
//! optionally the shape of its content). Anything else would be refused by D365 and then
//! hold every later message of its production order, so it is refused here, before the
//! outbox, with the nearest known name.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Message, MessageError, KNOWN_TYPES};

/// The message types this gateway may queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageTypes {
    custom: Vec<CustomType>,
}

/// A message type a plant added to the queue in D365.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomType {
    pub name: String,
    /// `None`: any content (a JSON object naming its `ProductionOrderNumber`).
    pub schema: Option<ContentSchema>,
}

/// An unknown message type, with the nearest known one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown message type `{name}`{}; known types: {}{}",
    nearest.as_ref().map(|n| format!(" (did you mean {n}?)")).unwrap_or_default(),
    known.join(", "),
    if *any_custom { "" } else { " (declare your own under d365.custom_message_types)" })]
pub struct UnknownType {
    pub name: String,
    pub nearest: Option<String>,
    pub known: Vec<String>,
    any_custom: bool,
}

impl MessageTypes {
    pub fn new(custom: Vec<CustomType>) -> MessageTypes {
        MessageTypes { custom }
    }

    /// Every type that may be queued: the documented ones first.
    pub fn names(&self) -> Vec<&str> {
        KNOWN_TYPES
            .iter()
            .copied()
            .chain(self.custom.iter().map(|c| c.name.as_str()))
            .collect()
    }

    /// Refuses a type that is neither documented nor declared.
    pub fn check(&self, name: &str) -> Result<(), UnknownType> {
        let known = self.names();
        if known.contains(&name) {
            return Ok(());
        }
        Err(UnknownType {
            name: name.to_string(),
            nearest: nearest(name, &known).map(str::to_string),
            known: known.iter().map(|s| s.to_string()).collect(),
            any_custom: !self.custom.is_empty(),
        })
    }

    /// Checks a message's type, and a declared type's content against its schema.
    pub fn check_message(&self, message: &Message) -> Result<(), MessageError> {
        self.check(message.message_type())
            .map_err(|e| MessageError::Shape {
                message_type: message.message_type().to_string(),
                detail: e.to_string(),
            })?;
        if let Message::Custom {
            message_type,
            content,
            ..
        } = message
        {
            let schema = self
                .custom
                .iter()
                .find(|c| &c.name == message_type)
                .and_then(|c| c.schema.as_ref());
            if let Some(schema) = schema {
                schema
                    .check(content)
                    .map_err(|detail| MessageError::Shape {
                        message_type: message_type.clone(),
                        detail,
                    })?;
            }
        }
        Ok(())
    }
}

/// The nearest name within a few typing mistakes, if any is near enough.
fn nearest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = name.to_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&lower, &k.to_lowercase()), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The shape of a custom type's content: a small part of JSON Schema (`type: object`,
/// `required`, `properties` with a `type` each, `additionalProperties: false`). A schema
/// that uses anything else is refused when the configuration loads, so it never silently
/// checks less than it says.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentSchema {
    required: Vec<String>,
    properties: BTreeMap<String, JsonType>,
    additional_properties: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JsonType {
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
}

impl JsonType {
    fn parse(name: &str) -> Option<JsonType> {
        Some(match name {
            "string" => JsonType::String,
            "number" => JsonType::Number,
            "integer" => JsonType::Integer,
            "boolean" => JsonType::Boolean,
            "object" => JsonType::Object,
            "array" => JsonType::Array,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            JsonType::String => "a string",
            JsonType::Number => "a number",
            JsonType::Integer => "a whole number",
            JsonType::Boolean => "true or false",
            JsonType::Object => "an object",
            JsonType::Array => "a list",
        }
    }

    fn fits(self, value: &Value) -> bool {
        match self {
            JsonType::String => value.is_string(),
            JsonType::Number => value.is_number(),
            JsonType::Integer => value.as_f64().is_some_and(|n| n.fract() == 0.0),
            JsonType::Boolean => value.is_boolean(),
            JsonType::Object => value.is_object(),
            JsonType::Array => value.is_array(),
        }
    }
}

impl ContentSchema {
    /// Reads the supported part of JSON Schema; names what is not supported.
    pub fn from_json(schema: &Value) -> Result<ContentSchema, String> {
        let Value::Object(top) = schema else {
            return Err("a schema is a mapping (JSON Schema: type, required, properties, additionalProperties)".into());
        };
        let mut out = ContentSchema {
            required: Vec::new(),
            properties: BTreeMap::new(),
            additional_properties: true,
        };
        for (key, value) in top {
            match (key.as_str(), value) {
                ("type", Value::String(t)) if t == "object" => {}
                ("type", other) => {
                    return Err(format!("`type` must be \"object\" (the content is a JSON object), got {other}"))
                }
                ("required", Value::Array(names)) => {
                    for n in names {
                        let Some(n) = n.as_str() else {
                            return Err(format!("`required` lists field names, got {n}"));
                        };
                        out.required.push(n.to_string());
                    }
                }
                ("properties", Value::Object(props)) => {
                    for (name, prop) in props {
                        let t = prop
                            .get("type")
                            .and_then(Value::as_str)
                            .and_then(JsonType::parse)
                            .filter(|_| prop.as_object().is_some_and(|o| o.len() == 1))
                            .ok_or_else(|| {
                                format!("properties.{name}: give only `type`, one of string, number, integer, boolean, object, array")
                            })?;
                        out.properties.insert(name.clone(), t);
                    }
                }
                ("additionalProperties", Value::Bool(b)) => out.additional_properties = *b,
                (other, _) => {
                    return Err(format!(
                        "`{other}` is not supported here (supported: type, required, properties with a type each, additionalProperties)"
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Checks content; the first problem, named by field.
    fn check(&self, content: &serde_json::Map<String, Value>) -> Result<(), String> {
        for name in &self.required {
            if !content.contains_key(name) {
                return Err(format!("{name} is mandatory"));
            }
        }
        for (name, value) in content {
            match self.properties.get(name) {
                Some(t) if !t.fits(value) => {
                    return Err(format!("{name}: expected {}, got {value}", t.name()))
                }
                None if !self.additional_properties && name != "ProductionOrderNumber" => {
                    return Err(format!(
                        "unknown field `{name}` (the schema allows: {})",
                        self.properties
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_scrap_reason() -> MessageTypes {
        MessageTypes::new(vec![
            CustomType {
                name: "ZScrapReason".into(),
                schema: Some(
                    ContentSchema::from_json(&json!({
                        "type": "object",
                        "required": ["Reason"],
                        "properties": { "Reason": { "type": "string" }, "Count": { "type": "integer" } },
                        "additionalProperties": false
                    }))
                    .unwrap(),
                ),
            },
            CustomType {
                name: "ZAnything".into(),
                schema: None,
            },
        ])
    }

    #[test]
    fn an_unknown_type_is_refused_with_the_nearest_known_one() {
        let err = MessageTypes::default()
            .check("ProdProductionOrderStrat")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown message type `ProdProductionOrderStrat` (did you mean ProdProductionOrderStart?); known types: ProdProductionOrderStart, ProdProductionOrderReportFinished, ProdProductionOrderPickingList, ProdProductionOrderRouteCard, ProdProductionOrderEnd (declare your own under d365.custom_message_types)"
        );
        let far = MessageTypes::default().check("Hello").unwrap_err();
        assert_eq!(far.nearest, None);
        assert!(MessageTypes::default()
            .check("ProdProductionOrderEnd")
            .is_ok());
    }

    #[test]
    fn declared_types_pass_and_their_content_is_checked_against_the_schema() {
        let types = with_scrap_reason();
        assert!(types.check("ZScrapReason").is_ok());
        assert_eq!(
            types.check("ZScrapReasn").unwrap_err().nearest.as_deref(),
            Some("ZScrapReason")
        );
        let message = |t: &str, content: Value| Message::from_json(t, content).unwrap();
        let check = |t: &str, content: Value| {
            types
                .check_message(&message(t, content))
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            check(
                "ZScrapReason",
                json!({"ProductionOrderNumber":"P1","Reason":"Dust","Count":3})
            ),
            Ok(())
        );
        assert_eq!(
            check(
                "ZScrapReason",
                json!({"ProductionOrderNumber":"P1","Count":3})
            ),
            Err("ZScrapReason: content does not fit the message type: Reason is mandatory".into())
        );
        assert_eq!(
            check("ZScrapReason", json!({"ProductionOrderNumber":"P1","Reason":"Dust","Count":1.5})),
            Err("ZScrapReason: content does not fit the message type: Count: expected a whole number, got 1.5".into())
        );
        assert_eq!(
            check("ZScrapReason", json!({"ProductionOrderNumber":"P1","Reason":"Dust","Colour":"red"})),
            Err("ZScrapReason: content does not fit the message type: unknown field `Colour` (the schema allows: Count, Reason)".into())
        );
        assert_eq!(
            check(
                "ZAnything",
                json!({"ProductionOrderNumber":"P1","Whatever":[1,2]})
            ),
            Ok(())
        );
    }

    #[test]
    fn unsupported_schema_keywords_are_refused_not_ignored() {
        assert_eq!(
            ContentSchema::from_json(&json!({"type":"object","patternProperties":{}})).unwrap_err(),
            "`patternProperties` is not supported here (supported: type, required, properties with a type each, additionalProperties)"
        );
        assert!(ContentSchema::from_json(
            &json!({"properties":{"A":{"type":"string","maxLength":3}}})
        )
        .is_err());
    }
}
