//! The `alerts` section: thresholds, and where alerts go besides the log and the metrics
//! (an MQTT topic, an HTTP webhook).

use std::time::Duration;

use serde::Deserialize;

use crate::config::{FileCheck, Secret};

#[derive(Debug, Clone)]
pub struct AlertConfig {
    /// A source down longer than this raises `source_down`.
    pub source_down_after: Duration,
    /// The oldest message waiting for delivery older than this raises `oldest_queued`.
    pub oldest_queued_after: Duration,
    /// Free space of the data directory's file system under this raises `disk_free`.
    pub disk_free_below_mib: u64,
    /// An `unassigned` incident (events on a line with no order) clears after this long
    /// without such events.
    pub unassigned_quiet: Duration,
    /// How often the conditions are evaluated.
    pub check_interval: Duration,
    pub mqtt: Option<AlertMqtt>,
    pub webhook: Option<AlertWebhook>,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            source_down_after: Duration::from_secs(120),
            oldest_queued_after: Duration::from_secs(30 * 60),
            disk_free_below_mib: 512,
            unassigned_quiet: Duration::from_secs(300),
            check_interval: Duration::from_secs(5),
            mqtt: None,
            webhook: None,
        }
    }
}

/// Each alert is published retained to `<topic>/<alert key>` (QoS 1), so a dashboard that
/// subscribes later sees what is open; a cleared alert's retained message says so.
#[derive(Debug, Clone)]
pub struct AlertMqtt {
    pub broker: crate::mqtt::Broker,
    pub client_id: String,
    pub topic: String,
}

/// Each alert is POSTed as JSON (`text` holds a line Teams and Slack incoming webhooks
/// show as is); retried until the endpoint takes it.
#[derive(Debug, Clone)]
pub struct AlertWebhook {
    pub url: reqwest::Url,
    /// Sent as `Authorization: Bearer …` when set.
    pub token: Option<Secret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    source_down_after: Option<String>,
    oldest_queued_after: Option<String>,
    disk_free_below_mib: Option<u64>,
    unassigned_quiet: Option<String>,
    check_interval: Option<String>,
    mqtt: Option<RawAlertMqtt>,
    webhook: Option<RawAlertWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlertMqtt {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    url: String,
    client_id: Option<String>,
    /// Prefix of the alert topics.
    topic: String,
    username: Option<String>,
    password_file: Option<String>,
    ca_file: Option<String>,
    client_cert_file: Option<String>,
    client_key_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlertWebhook {
    url: String,
    token_file: Option<String>,
}

pub fn read(cx: &mut FileCheck<'_>) -> AlertConfig {
    let defaults = AlertConfig::default();
    let Some(raw) = cx.parse::<RawAlerts>("alerts") else {
        return defaults;
    };
    let mqtt = raw.mqtt.and_then(|m| {
        if m.topic.is_empty() || m.topic.contains(['+', '#']) {
            cx.error(
                "alerts.mqtt.topic",
                format!("{:?}: a topic prefix without wildcards", m.topic),
            );
        }
        let broker = crate::mqtt::read_broker(
            cx,
            "alerts.mqtt",
            crate::mqtt::BrokerFields {
                url: &m.url,
                username: m.username.as_deref(),
                password_file: m.password_file.as_deref(),
                ca_file: m.ca_file.as_deref(),
                client_cert_file: m.client_cert_file.as_deref(),
                client_key_file: m.client_key_file.as_deref(),
                keep_alive: Duration::from_secs(30),
            },
        )?;
        Some(AlertMqtt {
            broker,
            client_id: m
                .client_id
                .unwrap_or_else(|| "mes-gateway-alerts".to_string()),
            topic: m.topic.trim_end_matches('/').to_string(),
        })
    });
    let webhook = raw.webhook.and_then(|w| {
        let url = match reqwest::Url::parse(&w.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => u,
            _ => {
                cx.error(
                    "alerts.webhook.url",
                    // Not repeated in full: a Teams or Slack webhook's URL is its credential.
                    format!(
                        "expected an http:// or https:// URL, found {}",
                        crate::text::url_origin(&w.url)
                    ),
                );
                return None;
            }
        };
        let token = w
            .token_file
            .as_deref()
            .and_then(|f| cx.secret_file("alerts.webhook.token_file", f))
            .map(|(s, _)| s);
        Some(AlertWebhook { url, token })
    });
    let second = Duration::from_secs(1);
    AlertConfig {
        source_down_after: cx.duration_at_least(
            "alerts.source_down_after",
            raw.source_down_after,
            defaults.source_down_after,
            second,
            "a blip is not an incident",
        ),
        oldest_queued_after: cx.duration_at_least(
            "alerts.oldest_queued_after",
            raw.oldest_queued_after,
            defaults.oldest_queued_after,
            second,
            "a message is queued for a moment on its way",
        ),
        disk_free_below_mib: raw
            .disk_free_below_mib
            .unwrap_or(defaults.disk_free_below_mib),
        unassigned_quiet: cx.duration_at_least(
            "alerts.unassigned_quiet",
            raw.unassigned_quiet,
            defaults.unassigned_quiet,
            second,
            "or every event would open and close an incident",
        ),
        check_interval: cx.duration_at_least(
            "alerts.check_interval",
            raw.check_interval,
            defaults.check_interval,
            Duration::from_millis(100),
            "(the checks read the outbox)",
        ),
        mqtt,
        webhook,
    }
}
