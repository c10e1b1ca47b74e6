//! The D365 connection (`d365`) and the dispatcher's settings (`dispatcher`): endpoint,
//! credentials, timeouts, concurrency, retry and what to do with an ambiguous outcome.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::retry::{AmbiguousPolicy, RetryPolicy};
use crate::backoff::Backoff;
use crate::config::value::YamlValue;
use crate::config::{FileCheck, Secret};
use crate::entra::{AppCredentials, TokenApi};
use crate::message::{ContentSchema, CustomType, FieldNames, MessageTypes, KNOWN_TYPES};
use crate::outbox::JoinPolicy;

/// D365's per-user concurrency limit: more requests in flight than this get 429s.
pub const D365_CONCURRENCY_LIMIT: u32 = 52;

#[derive(Debug, Clone)]
pub struct D365Config {
    pub base_url: reqwest::Url,
    pub company: String,
    pub message_queue: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Where the secret came from, for log lines (`file /run/…` or `env VAR`).
    pub secret_origin: String,
    pub token_url: reqwest::Url,
    pub token_api: TokenApi,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub field_names: FieldNames,
    /// The documented message types and those the plant declared.
    pub message_types: MessageTypes,
}

impl D365Config {
    /// The SendMessage endpoint.
    pub fn send_message_url(&self) -> reqwest::Url {
        let mut url = self.base_url.clone();
        url.set_path("/api/services/SysMessageServices/SysMessageService/SendMessage");
        url
    }

    /// The D365 resource identifier: the base URL without a trailing slash.
    pub fn resource(&self) -> String {
        self.base_url.as_str().trim_end_matches('/').to_string()
    }

    /// The app registration the gateway signs in as (D365 and Service Bus alike).
    pub fn app(&self) -> AppCredentials {
        AppCredentials {
            token_url: self.token_url.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            api: self.token_api,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Requests in flight across all orders (one per order at most).
    pub max_in_flight: usize,
    /// Requests per window, shared by every order (`None`: off).
    pub budget: Option<super::budget::BudgetConfig>,
    /// Settling uncertain messages by D365's events (`None`: off).
    pub evidence: Option<super::evidence::EvidencePolicy>,
    /// Which queued messages of an order go out joined in one request (outbox join.rs).
    pub join: JoinPolicy,
    /// How each outcome is answered.
    pub retry: RetryPolicy,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            max_in_flight: 4,
            budget: Some(super::budget::BudgetConfig::DEFAULT),
            evidence: Some(super::evidence::EvidencePolicy::default()),
            join: JoinPolicy::default(),
            retry: RetryPolicy::default(),
        }
    }
}

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
    /// Read by [`read_message_types`].
    pub custom_message_types: Option<Vec<RawCustomType>>,
}

/// A message type the plant added to the queue in D365.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCustomType {
    pub name: String,
    /// The shape of its content (a small part of JSON Schema); none: any content.
    pub schema: Option<YamlValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDispatcher {
    pub max_in_flight: Option<u32>,
    pub request_budget: Option<String>,
    pub resend_unreceived: Option<bool>,
    pub unreceived_after: Option<String>,
    pub unreceived_witnesses: Option<u32>,
    pub unreceived_grace: Option<String>,
    pub backoff_initial: Option<String>,
    pub backoff_max: Option<String>,
    pub max_attempts: Option<u32>,
    pub throttle_fallback: Option<String>,
    pub auth_pause: Option<String>,
    pub on_ambiguous: Option<RawAmbiguous>,
    pub join: Option<RawJoin>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJoin {
    pub max_lines: Option<u32>,
    #[serde(default)]
    pub per_type: BTreeMap<String, bool>,
}

/// The most lines `dispatcher.join.max_lines` accepts: D365 posts a message in one
/// transaction, and a request of thousands of lines would hold a plant's reports back
/// together on the first bad one.
const MAX_JOINED_LINES: u32 = 1_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmbiguous {
    pub default: Option<AmbiguousPolicy>,
    #[serde(default)]
    pub per_type: BTreeMap<String, AmbiguousPolicy>,
}

/// Checks the `d365` section.
pub fn read_d365(cx: &mut FileCheck<'_>) -> Option<D365Config> {
    let raw: RawD365 = cx.parse("d365")?;
    let before = cx.error_count();
    let base_url = cx.https_url("d365.base_url", &raw.base_url);
    cx.non_empty("d365.company", &raw.company);
    cx.non_empty("d365.client_id", &raw.client_id);
    let message_queue = raw
        .message_queue
        .unwrap_or_else(|| crate::message::DEFAULT_QUEUE.to_string());
    cx.non_empty("d365.message_queue", &message_queue);
    let token_api = raw.token_api.unwrap_or(TokenApi::V2);
    let token_url = match (&raw.token_url, &raw.tenant_id) {
        (Some(url), _) => cx.https_url("d365.token_url", url),
        (None, Some(tenant)) if !tenant.trim().is_empty() => {
            let path = match token_api {
                TokenApi::V2 => "oauth2/v2.0/token",
                TokenApi::V1 => "oauth2/token",
            };
            cx.https_url(
                "d365.tenant_id",
                &format!("https://login.microsoftonline.com/{}/{path}", tenant.trim()),
            )
        }
        _ => {
            cx.error(
                "d365",
                "set tenant_id (or token_url to override the token endpoint)",
            );
            None
        }
    };
    let secret = match (&raw.client_secret_file, &raw.client_secret_env) {
        (Some(_), Some(_)) => {
            cx.error(
                "d365.client_secret_env",
                "set client_secret_file or client_secret_env, not both",
            );
            None
        }
        (None, None) => {
            cx.error(
                "d365",
                "set client_secret_file (e.g. a systemd credential) or client_secret_env",
            );
            None
        }
        (Some(file), None) => cx.secret_file("d365.client_secret_file", file),
        (None, Some(var)) => cx.secret_env("d365.client_secret_env", var),
    };
    let connect_timeout = cx.duration_at_least(
        "d365.connect_timeout",
        raw.connect_timeout,
        Duration::from_secs(10),
        Duration::from_millis(100),
        "no connection could be made",
    );
    let request_timeout = cx.duration_at_least(
        "d365.request_timeout",
        raw.request_timeout,
        Duration::from_secs(60),
        Duration::from_secs(1),
        "every request would time out after it was written and be uncertain",
    );
    if cx.error_count() > before {
        return None;
    }
    let secret = secret?;
    Some(D365Config {
        base_url: base_url?,
        company: raw.company.trim().to_string(),
        message_queue,
        client_id: raw.client_id.trim().to_string(),
        client_secret: secret.0,
        secret_origin: secret.1,
        token_url: token_url?,
        token_api,
        connect_timeout,
        request_timeout,
        field_names: raw.field_names.unwrap_or_default(),
        message_types: read_message_types(cx),
    })
}

/// Checks the `dispatcher` section; its defaults where it is not written or not valid.
pub fn read_dispatcher(cx: &mut FileCheck<'_>) -> DispatcherConfig {
    let d = DispatcherConfig::default();
    let Some(raw) = cx.parse::<RawDispatcher>("dispatcher") else {
        return d;
    };
    let max_in_flight = raw.max_in_flight.unwrap_or(d.max_in_flight as u32);
    if !(1..=D365_CONCURRENCY_LIMIT).contains(&max_in_flight) {
        cx.error("dispatcher.max_in_flight",
            format!("{max_in_flight} is out of range: 1 to {D365_CONCURRENCY_LIMIT} (D365 answers 429 above {D365_CONCURRENCY_LIMIT} concurrent requests per user)"),
        );
    }
    let budget = match raw.request_budget.as_deref() {
        None => d.budget,
        Some(text) => match super::budget::BudgetConfig::parse(text) {
            Ok(budget) => budget,
            Err(e) => {
                cx.error("dispatcher.request_budget", e);
                d.budget
            }
        },
    };
    let evidence = match raw.resend_unreceived {
        Some(false) => None,
        _ => {
            let e = super::evidence::EvidencePolicy::default();
            let witnesses = raw.unreceived_witnesses.unwrap_or(e.witnesses as u32);
            if witnesses == 0 {
                cx.error("dispatcher.unreceived_witnesses", "must be at least 1");
            }
            Some(super::evidence::EvidencePolicy {
                after: cx.duration("dispatcher.unreceived_after", raw.unreceived_after, e.after),
                witnesses: witnesses.max(1) as usize,
                grace: cx.duration("dispatcher.unreceived_grace", raw.unreceived_grace, e.grace),
            })
        }
    };
    let join = read_join(cx, raw.join, d.join);
    let r = d.retry;
    let backoff_initial = cx.duration(
        "dispatcher.backoff_initial",
        raw.backoff_initial,
        r.backoff.initial(),
    );
    let backoff_max = cx.duration("dispatcher.backoff_max", raw.backoff_max, r.backoff.max());
    let backoff = match Backoff::try_new(backoff_initial, backoff_max) {
        Ok(b) => b,
        Err(e) => {
            cx.error("dispatcher.backoff_max", e.to_string());
            r.backoff
        }
    };
    let max_attempts = raw.max_attempts.unwrap_or(r.max_attempts);
    if max_attempts == 0 {
        cx.error("dispatcher.max_attempts", "must be at least 1");
    }
    let ambiguous = raw.on_ambiguous.unwrap_or_default();
    DispatcherConfig {
        max_in_flight: max_in_flight as usize,
        budget,
        evidence,
        join,
        retry: RetryPolicy {
            backoff,
            max_attempts,
            throttle_fallback: cx.duration(
                "dispatcher.throttle_fallback",
                raw.throttle_fallback,
                r.throttle_fallback,
            ),
            auth_pause: cx.duration("dispatcher.auth_pause", raw.auth_pause, r.auth_pause),
            ambiguous_default: ambiguous.default.unwrap_or(r.ambiguous_default),
            ambiguous_per_type: ambiguous.per_type,
        },
    }
}

/// Checks `dispatcher.join`: the defaults (`default`) changed per type and the cap.
fn read_join(cx: &mut FileCheck<'_>, raw: Option<RawJoin>, default: JoinPolicy) -> JoinPolicy {
    let Some(raw) = raw else {
        return default;
    };
    let max_lines = raw.max_lines.unwrap_or(default.max_lines() as u32);
    if !(1..=MAX_JOINED_LINES).contains(&max_lines) {
        cx.error(
            "dispatcher.join.max_lines",
            format!("{max_lines} is out of range: 1 (nothing joined) to {MAX_JOINED_LINES}"),
        );
    }
    let mut types: Vec<String> = default.types().to_vec();
    for (message_type, on) in raw.per_type {
        if crate::message::lines_field(&message_type).is_none() {
            cx.error(
                &format!("dispatcher.join.per_type.{message_type}"),
                format!(
                    "only messages with lines can be joined: {}, {}, {}",
                    crate::message::TYPE_REPORT_FINISHED,
                    crate::message::TYPE_PICKING_LIST,
                    crate::message::TYPE_ROUTE_CARD
                ),
            );
            continue;
        }
        types.retain(|t| *t != message_type);
        if on {
            types.push(message_type);
        }
    }
    JoinPolicy::new(types, max_lines.clamp(1, MAX_JOINED_LINES) as usize)
}

/// Reads `d365.custom_message_types`: the types a plant added to the queue in D365.
pub fn read_message_types(cx: &mut FileCheck<'_>) -> MessageTypes {
    const PATH: &str = "d365.custom_message_types";
    if cx.node(PATH).is_none() {
        return MessageTypes::default();
    }
    let Some(raw) = cx.parse::<Vec<RawCustomType>>(PATH) else {
        return MessageTypes::default();
    };
    let mut custom: Vec<CustomType> = Vec::new();
    for (i, t) in raw.into_iter().enumerate() {
        let path = format!("{PATH}[{i}]");
        let name = t.name.trim().to_string();
        if name.is_empty() {
            cx.error(&format!("{path}.name"), "must not be empty");
            continue;
        }
        if KNOWN_TYPES.contains(&name.as_str()) {
            cx.error(
                &format!("{path}.name"),
                format!("{name} is a documented type; declare only types your D365 added"),
            );
            continue;
        }
        if custom.iter().any(|c| c.name == name) {
            cx.error(&format!("{path}.name"), format!("{name} is declared twice"));
            continue;
        }
        let schema = match t
            .schema
            .as_ref()
            .map(|s| ContentSchema::from_json(&s.to_json()))
        {
            None => None,
            Some(Ok(schema)) => Some(schema),
            Some(Err(e)) => {
                cx.error(&format!("{path}.schema"), e);
                continue;
            }
        };
        custom.push(CustomType { name, schema });
    }
    MessageTypes::new(custom)
}

/// Checks the message types named in a map keyed by message type (`path.<type>`).
pub fn check_type_keys<'k>(
    cx: &mut FileCheck<'_>,
    path: &str,
    keys: impl Iterator<Item = &'k String>,
    types: &MessageTypes,
) {
    for key in keys {
        if let Err(e) = types.check(key) {
            cx.error(&format!("{path}.{key}"), e.to_string());
        }
    }
}
