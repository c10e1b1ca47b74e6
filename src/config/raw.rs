//! The configuration exactly as written in YAML: strings and numbers, no checks beyond
//! shape. Every struct rejects unknown fields. `validate()` in the parent module turns
//! these into the checked types the rest of the gateway uses.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::message::FieldNames;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawD365 {
    pub base_url: String,
    pub company: String,
    pub message_queue: Option<String>,
    pub tenant_id: Option<String>,
    pub client_id: String,
    pub client_secret_file: Option<String>,
    pub client_secret_env: Option<String>,
    pub token_url: Option<String>,
    pub token_api: Option<TokenApi>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub field_names: Option<FieldNames>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenApi {
    /// Microsoft identity platform v2: `scope=<base url>/.default`.
    V2,
    /// Legacy v1 (ADAL-style): `resource=<base url>`.
    V1,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDispatcher {
    pub max_in_flight: Option<u32>,
    pub backoff_initial: Option<String>,
    pub backoff_max: Option<String>,
    pub max_attempts: Option<u32>,
    pub throttle_fallback: Option<String>,
    pub auth_pause: Option<String>,
    pub on_ambiguous: Option<RawAmbiguous>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmbiguous {
    pub default: Option<AmbiguousPolicy>,
    #[serde(default)]
    pub per_type: BTreeMap<String, AmbiguousPolicy>,
}

/// What to do when a request may or may not have reached D365 (timeout or reset after
/// the request was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AmbiguousPolicy {
    /// Mark the message `uncertain`, hold its order, alert: an operator decides.
    Hold,
    /// Send it again (accepting a possible duplicate in D365).
    Resend,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub data_dir: Option<String>,
    pub retention: Option<String>,
    pub prune_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSimulator {
    /// The source type, read by the loader to choose this struct.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub interval: String,
    pub point: Option<String>,
    /// Stop after this many emissions (for demos and tests); unset = forever.
    pub limit: Option<u64>,
    /// impulse (default), counter or values.
    pub mode: Option<String>,
    pub start_at: Option<String>,
    pub step: Option<f64>,
    pub counter_max: Option<f64>,
    /// Counter mode: the counter stops counting at this value (a batch of N parts).
    pub stop_at: Option<f64>,
    pub values: Option<Vec<ScalarOrJson>>,
}

/// A simulated value: a YAML scalar, list or mapping, turned into JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ScalarOrJson {
    Scalar(ScalarValue),
    List(Vec<ScalarOrJson>),
    Map(BTreeMap<String, ScalarOrJson>),
}

impl ScalarOrJson {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ScalarOrJson::Scalar(s) => s.to_json(),
            ScalarOrJson::List(l) => {
                serde_json::Value::Array(l.iter().map(ScalarOrJson::to_json).collect())
            }
            ScalarOrJson::Map(m) => {
                serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    /// `ip:port` for `/health` and `/metrics`; keep it on loopback or a management network.
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlant {
    /// IANA time zone of the plant, for dates in messages; default: the system's.
    pub time_zone: Option<String>,
}

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
    pub emit: Option<RawEmit>,
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

/// A YAML scalar: numbers and booleans keep their type, text may hold `{templates}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ScalarValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// The source type, read by the loader to choose this struct.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    /// `mqtt://host:1883` or `mqtts://host:8883`.
    pub url: String,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub ca_file: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    pub keep_alive: Option<String>,
    pub payload: Option<PayloadFormat>,
    pub subscriptions: Vec<RawSubscription>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    pub topic: String,
    pub qos: Option<u8>,
}

/// How MQTT payloads are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// A number or true/false if it reads as one, JSON if it is an object or array, else text.
    #[default]
    Auto,
    Json,
    Text,
    Number,
}
