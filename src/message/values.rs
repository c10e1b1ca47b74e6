//! The scalar values of D365's message fields as they go on the wire: `Real` (an integer
//! when it has no fraction, as in the official examples), `Int`, dates and times in UTC,
//! and D365's enums (sent as their symbols; extensible ones accept any symbol).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// D365 `Real`: sent as an integer when it has no fractional part (as in the official
/// examples, `"ReportedGoodQuantity":10`), otherwise as a decimal number.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Real(pub f64);

impl Serialize for Real {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 && self.0.abs() < EXACT_INTEGER_LIMIT {
            // Exact: |value| < 2^53 with no fraction converts to i64 without loss.
            s.serialize_i64(self.0 as i64)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

/// A value as a user wrote it, for error texts: `true`, `"abc"`, `1.5`, `a list`.
struct Shown<'a>(serde::de::Unexpected<'a>);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use serde::de::Unexpected as U;
        match self.0 {
            U::Bool(b) => write!(f, "{b}"),
            U::Unsigned(n) => write!(f, "{n}"),
            U::Signed(n) => write!(f, "{n}"),
            U::Float(n) => write!(f, "{n}"),
            U::Str(s) => write!(f, "{s:?}"),
            U::Unit | U::Option => f.write_str("null"),
            U::Seq => f.write_str("a list"),
            U::Map => f.write_str("an object"),
            ref other => write!(f, "{other}"),
        }
    }
}

/// "expected WANTED, got VALUE": what D365's field table wants, in its words.
fn wanted<E: serde::de::Error>(wanted: &str, got: serde::de::Unexpected<'_>) -> E {
    E::custom(format!("expected {wanted}, got {}", Shown(got)))
}

/// A visitor for the D365 scalar types: numbers and text are offered to `parse`, every
/// other value is refused in the field table's words.
struct ScalarVisitor<T> {
    wanted: &'static str,
    from_f64: fn(f64) -> Option<T>,
    from_str: fn(&str) -> Option<T>,
}

impl<'de, T> serde::de::Visitor<'de> for ScalarVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wanted)
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<T, E> {
        Err(wanted(self.wanted, serde::de::Unexpected::Bool(v)))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        (self.from_f64)(v as f64)
            .ok_or_else(|| wanted(self.wanted, serde::de::Unexpected::Signed(v)))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        (self.from_f64)(v as f64)
            .ok_or_else(|| wanted(self.wanted, serde::de::Unexpected::Unsigned(v)))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
        (self.from_f64)(v).ok_or_else(|| wanted(self.wanted, serde::de::Unexpected::Float(v)))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.from_str)(v.trim()).ok_or_else(|| wanted(self.wanted, serde::de::Unexpected::Str(v)))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<T, E> {
        Err(wanted(self.wanted, serde::de::Unexpected::Unit))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(wanted(self.wanted, serde::de::Unexpected::Seq))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(wanted(self.wanted, serde::de::Unexpected::Map))
    }
}

/// The largest integer a JSON number (f64) holds exactly: 2^53.
const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;

/// Values rendered from templates (a regex capture, a context field) arrive as text, so
/// text holding a number is a number.
impl<'de> Deserialize<'de> for Real {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            wanted: "a number (Real)",
            from_f64: |n| n.is_finite().then_some(Real(n)),
            from_str: |t| t.parse::<f64>().ok().filter(|n| n.is_finite()).map(Real),
        })
    }
}

/// D365 `Integer`; accepts text holding an integer, like [`Real`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Int(pub i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            wanted: "a whole number (Integer)",
            from_f64: |n| {
                (n.fract() == 0.0 && n.abs() < EXACT_INTEGER_LIMIT).then_some(Int(n as i64))
            },
            from_str: |t| t.parse().ok().map(Int),
        })
    }
}

impl From<f64> for Real {
    fn from(v: f64) -> Self {
        Real(v)
    }
}

/// D365 `DateTime`: ISO 8601 in UTC, e.g. `2024-01-15T08:30:00Z`. Any offset is accepted
/// and converted to UTC (`2024-01-15T10:30:00+02:00` is sent as `2024-01-15T08:30:00Z`);
/// milliseconds that were given are sent (`08:30:00.123Z`), finer digits are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DateTimeUtc(pub jiff::Timestamp);

const DATE_TIME_WANTED: &str =
    "a date-time with a zone like 2024-01-15T08:30:00Z or 2024-01-15T10:30:00+02:00";

impl Serialize for DateTimeUtc {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let millis = self.0.subsec_millisecond();
        if millis == 0 {
            s.collect_str(&self.0.strftime("%Y-%m-%dT%H:%M:%SZ"))
        } else {
            s.collect_str(&format_args!(
                "{}.{millis:03}Z",
                self.0.strftime("%Y-%m-%dT%H:%M:%S")
            ))
        }
    }
}

impl<'de> Deserialize<'de> for DateTimeUtc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            wanted: DATE_TIME_WANTED,
            from_f64: |_| None,
            from_str: |t| t.parse::<jiff::Timestamp>().ok().map(DateTimeUtc),
        })
    }
}

/// D365 `Date`: `YYYY-MM-DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date(pub jiff::civil::Date);

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            wanted: "a date like 2024-01-15",
            from_f64: |_| None,
            // Only the plain form: a date-time here is a mistake, not a date.
            from_str: |t| {
                (t.len() == 10)
                    .then(|| t.parse::<jiff::civil::Date>().ok())
                    .flatten()
                    .map(Date)
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoYes {
    No,
    Yes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BomConsumptionRule {
    FlushingPrincip,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteConsumptionRule {
    RouteDependent,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskType {
    QueueBefore,
    Setup,
    Process,
    Overlap,
    Transport,
    QueueAfter,
    Burden,
}

/// An extensible D365 enum (customers add values): any symbol is accepted; the
/// documented symbols are listed on the fields that use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Symbol(pub String);
