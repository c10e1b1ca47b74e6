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
    pub id: String,
    pub interval: String,
    pub point: Option<String>,
    /// Stop after this many impulses (for demos and tests); unset = forever.
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    pub when: RawWhen,
    pub emit: RawEmit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWhen {
    pub source: String,
    pub point: Option<String>,
    pub edge: Option<Edge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    Rising,
    Falling,
    Both,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmit {
    #[serde(rename = "type")]
    pub message_type: String,
    pub production_order: String,
    pub item_number: Option<String>,
    pub operation_number: Option<i64>,
    pub quantity_per_event: Option<f64>,
    pub every: Option<u32>,
}
