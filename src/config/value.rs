//! Values written in YAML where any type fits (a rule's field values, a simulator's
//! values), kept as written and turned into JSON.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A YAML scalar: numbers and booleans keep their type, text may hold `{templates}`.
#[derive(Debug, Clone, PartialEq)]
pub enum ScalarValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// Read by hand rather than as an untagged enum: a list or a mapping here must say what
/// is wanted, not "data did not match any variant of untagged enum".
impl<'de> Deserialize<'de> for ScalarValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ScalarValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("one value (a text, a number, true or false), not a list or a mapping")
            }
            fn visit_bool<E>(self, v: bool) -> Result<ScalarValue, E> {
                Ok(ScalarValue::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<ScalarValue, E> {
                Ok(ScalarValue::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ScalarValue, E> {
                match i64::try_from(v) {
                    Ok(i) => Ok(ScalarValue::Int(i)),
                    Err(_) => Ok(ScalarValue::Float(v as f64)),
                }
            }
            fn visit_f64<E>(self, v: f64) -> Result<ScalarValue, E> {
                Ok(ScalarValue::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<ScalarValue, E> {
                Ok(ScalarValue::Text(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl ScalarValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ScalarValue::Bool(b) => serde_json::Value::Bool(*b),
            ScalarValue::Int(i) => serde_json::Value::from(*i),
            ScalarValue::Float(f) => serde_json::Number::from_f64(*f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            ScalarValue::Text(s) => serde_json::Value::String(s.clone()),
        }
    }
}

/// Any YAML value (a simulated value): a scalar, list or mapping, turned into JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum YamlValue {
    Scalar(ScalarValue),
    List(Vec<YamlValue>),
    Map(BTreeMap<String, YamlValue>),
}

impl YamlValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            YamlValue::Scalar(s) => s.to_json(),
            YamlValue::List(l) => {
                serde_json::Value::Array(l.iter().map(YamlValue::to_json).collect())
            }
            YamlValue::Map(m) => {
                serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::document::Document;

    #[test]
    fn order_numbers_with_leading_zeros_stay_text_where_any_value_fits() {
        let doc = Document::parse(
            "fields: { ProductionOrderNumber: 000123, Quantity: 12, Done: true, Weight: 1.5 }\n"
                .into(),
        )
        .unwrap();
        let fields: BTreeMap<String, ScalarValue> = doc.parse_at("fields").unwrap();
        assert_eq!(
            fields["ProductionOrderNumber"],
            ScalarValue::Text("000123".into())
        );
        assert_eq!(fields["Quantity"], ScalarValue::Int(12));
        assert_eq!(fields["Done"], ScalarValue::Bool(true));
        assert_eq!(fields["Weight"], ScalarValue::Float(1.5));
    }

    #[test]
    fn a_list_where_one_value_is_wanted_says_so_without_serde_internals() {
        let doc = Document::parse("fields: { ProductionOrderNumber: [1, 2] }\n".into()).unwrap();
        let err = doc
            .parse_at::<BTreeMap<String, ScalarValue>>("fields")
            .unwrap_err();
        assert_eq!(err.path, "fields.ProductionOrderNumber");
        assert_eq!(
            err.message,
            "invalid type: sequence, expected one value (a text, a number, true or false), not a list or a mapping"
        );
    }
}
