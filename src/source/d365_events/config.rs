//! The `d365_events` source's configuration: D365 business events delivered to the
//! gateway's HTTPS webhook, which business event ids become which points, and how long
//! event ids are remembered against redelivery.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{FileCheck, Secret};

/// The business event ids the gateway knows, and the point each becomes. The
/// status-change id is unverified (d365-mes-api.md §3.2): `events` overrides any of them.
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
    /// Bearer`).
    pub webhook_secret: Secret,
    /// Business event id → point.
    pub events: BTreeMap<String, String>,
    /// How long an event id is remembered: a redelivery within it produces nothing.
    pub remember: Duration,
    /// The queue whose "message processed" verdicts are matched to the gateway's messages
    /// (the `d365.queue` the gateway posts to); events about other queues are not.
    pub queue: String,
}

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
    webhook_secret_file: String,
    #[serde(default)]
    events: BTreeMap<String, String>,
    remember: Option<String>,
    queue: Option<String>,
}

pub fn read(cx: &mut FileCheck<'_>, path: &str) -> Option<D365EventsConfig> {
    let raw: RawD365Events = cx.parse(path)?;
    let before = cx.error_count();
    let secret = cx
        .secret_file(
            &format!("{path}.webhook_secret_file"),
            &raw.webhook_secret_file,
        )
        .map(|(s, _)| s);
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
        events,
        remember,
        queue: raw
            .queue
            .unwrap_or_else(|| crate::message::DEFAULT_QUEUE.to_string()),
    })
}
