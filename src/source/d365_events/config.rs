//! The `d365_events` source's configuration: D365 business events pulled from an Azure
//! Service Bus queue or topic subscription and/or delivered to the gateway's HTTPS
//! webhook, which business event ids become which points, and how long event ids are
//! remembered against redelivery.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{FileCheck, Secret};

/// The business event ids the gateway knows, and the point each becomes. The
/// status-change id is unverified (docs/d365-api.md, "Business events"): `events` overrides any of them.
pub const DEFAULT_EVENTS: [(&str, &str); 3] = [
    ("ProductionOrderReleasedBusinessEvent", "released"),
    (
        "ProductionOrderStatusChangedBusinessEvent",
        "status_changed",
    ),
    (
        "SysMessageProcessorMessageProcessedBusinessEvent",
        "message_processed",
    ),
];

#[derive(Debug, Clone)]
pub struct D365EventsConfig {
    pub id: String,
    /// What the webhook's caller must show (`X-Webhook-Secret` or `Authorization:
    /// Bearer`); `None`: no webhook.
    pub webhook_secret: Option<Secret>,
    /// Where events are pulled from; `None`: only the webhook.
    pub service_bus: Option<ServiceBusConfig>,
    /// Business event id → point.
    pub events: BTreeMap<String, String>,
    /// How long an event id is remembered: a redelivery within it produces nothing.
    pub remember: Duration,
    /// The queue whose "message processed" verdicts are matched to the gateway's messages
    /// (the `d365.queue` the gateway posts to); events about other queues are not.
    pub queue: String,
}

/// An Azure Service Bus queue or topic subscription read over HTTPS with peek-lock.
#[derive(Debug, Clone)]
pub struct ServiceBusConfig {
    /// `https://<namespace>.servicebus.windows.net/`
    pub namespace: reqwest::Url,
    /// `<queue>` or `<topic>/subscriptions/<subscription>`.
    pub entity: String,
    pub auth: ServiceBusAuth,
    /// How long one receive waits for an event (long polling).
    pub wait: Duration,
    /// Deliveries of an event the gateway cannot read before it gives up on it (the
    /// entity's MaxDeliveryCount should be the same: Service Bus then dead-letters it).
    pub max_deliveries: u32,
    /// Receives in parallel.
    pub receivers: usize,
}

#[derive(Debug, Clone)]
pub enum ServiceBusAuth {
    /// A shared access policy's name and key.
    Sas { key_name: String, key: Secret },
    /// An Entra token for `https://servicebus.azure.net/.default` with the `d365`
    /// section's app registration (filled in when the whole configuration is read).
    Entra(Option<std::sync::Arc<crate::d365::config::D365Config>>),
}

/// Service Bus waits at most this long in one receive.
const MAX_WAIT: Duration = Duration::from_secs(230);

/// The point whose events are D365's verdicts on messages (reconciled with the outbox).
pub const VERDICT_POINT: &str = "message_processed";

impl D365EventsConfig {
    /// The point of a business event: its configured name, or the id as it came.
    pub fn point_of(&self, business_event_id: &str) -> String {
        self.events
            .get(business_event_id)
            .cloned()
            .unwrap_or_else(|| business_event_id.to_string())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawD365Events {
    #[serde(rename = "type")]
    _kind: String,
    id: String,
    webhook_secret_file: Option<String>,
    service_bus: Option<RawServiceBus>,
    #[serde(default)]
    events: BTreeMap<String, String>,
    remember: Option<String>,
    queue: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceBus {
    namespace: String,
    queue: Option<String>,
    topic: Option<String>,
    subscription: Option<String>,
    sas_key_name: Option<String>,
    sas_key_file: Option<String>,
    wait: Option<String>,
    max_deliveries: Option<u32>,
    receivers: Option<usize>,
}

fn read_service_bus(
    cx: &mut FileCheck<'_>,
    path: &str,
    raw: RawServiceBus,
) -> Option<ServiceBusConfig> {
    let before = cx.error_count();
    let namespace = cx.https_url(&format!("{path}.namespace"), &raw.namespace);
    let entity = match (&raw.queue, &raw.topic, &raw.subscription) {
        (Some(q), None, None) if !q.trim().is_empty() => Some(q.trim().to_string()),
        (None, Some(t), Some(s)) if !t.trim().is_empty() && !s.trim().is_empty() => {
            Some(format!("{}/subscriptions/{}", t.trim(), s.trim()))
        }
        _ => {
            cx.error(
                path,
                "name the entity: `queue`, or `topic` and `subscription` (the endpoint D365's business events go to)",
            );
            None
        }
    };
    let auth = match (&raw.sas_key_name, &raw.sas_key_file) {
        (Some(name), Some(file)) => {
            cx.secret_file(&format!("{path}.sas_key_file"), file)
                .map(|(key, _)| ServiceBusAuth::Sas {
                    key_name: name.clone(),
                    key,
                })
        }
        (None, None) => Some(ServiceBusAuth::Entra(None)),
        _ => {
            cx.error(
                path,
                "set both sas_key_name and sas_key_file (a shared access policy), or neither (an Entra token with the d365 section's app registration)",
            );
            None
        }
    };
    let wait = cx.duration_at_least(
        &format!("{path}.wait"),
        raw.wait,
        Duration::from_secs(55),
        Duration::from_secs(1),
        "a receive that returns at once polls the namespace in a loop",
    );
    if wait > MAX_WAIT {
        cx.error(
            &format!("{path}.wait"),
            "Service Bus waits at most 230s in one receive",
        );
    }
    let max_deliveries = raw.max_deliveries.unwrap_or(10);
    if max_deliveries == 0 {
        cx.error(&format!("{path}.max_deliveries"), "must be at least 1");
    }
    let receivers = raw.receivers.unwrap_or(2);
    if !(1..=16).contains(&receivers) {
        cx.error(&format!("{path}.receivers"), "must be 1 to 16");
    }
    if cx.error_count() > before {
        return None;
    }
    Some(ServiceBusConfig {
        namespace: namespace?,
        entity: entity?,
        auth: auth?,
        wait,
        max_deliveries,
        receivers,
    })
}

pub fn read(cx: &mut FileCheck<'_>, path: &str) -> Option<D365EventsConfig> {
    let raw: RawD365Events = cx.parse(path)?;
    let before = cx.error_count();
    let secret = match &raw.webhook_secret_file {
        Some(file) => cx
            .secret_file(&format!("{path}.webhook_secret_file"), file)
            .map(|(s, _)| Some(s)),
        None => Some(None),
    };
    let service_bus = match raw.service_bus {
        Some(sb) => read_service_bus(cx, &format!("{path}.service_bus"), sb).map(Some),
        None => Some(None),
    };
    if raw.webhook_secret_file.is_none() && matches!(service_bus, Some(None)) {
        cx.error(
            path,
            "say how D365's events arrive: `service_bus` (pulled from a queue or topic subscription) and/or `webhook_secret_file` (posted to the API listener)",
        );
    }
    let mut events: BTreeMap<String, String> = DEFAULT_EVENTS
        .iter()
        .map(|(id, point)| (id.to_string(), point.to_string()))
        .collect();
    for (id, point) in raw.events {
        if point.trim().is_empty() {
            cx.error(&format!("{path}.events.{id}"), "the point name is empty");
        }
        events.insert(id, point);
    }
    let remember = cx.duration_at_least(
        &format!("{path}.remember"),
        raw.remember,
        Duration::from_secs(7 * 24 * 3600),
        Duration::from_secs(60),
        "D365 redelivers for longer than that",
    );
    if cx.error_count() > before {
        return None;
    }
    Some(D365EventsConfig {
        id: raw.id,
        webhook_secret: secret?,
        service_bus: service_bus?,
        events,
        remember,
        queue: raw
            .queue
            .unwrap_or_else(|| crate::message::DEFAULT_QUEUE.to_string()),
    })
}
