//! The MQTT source's configuration (`type: mqtt`): broker URL, session, TLS files,
//! credentials, subscriptions and payload format.

use std::time::Duration;

use serde::Deserialize;

use crate::config::FileCheck;
use crate::mqtt::topic::TopicFilter;
use crate::mqtt::{Broker, BrokerFields};

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub id: String,
    pub broker: Broker,
    /// Stable across restarts: the broker keeps the session (and unacknowledged
    /// messages) under this id.
    pub client_id: String,
    pub payload: PayloadFormat,
    pub subscriptions: Vec<Subscription>,
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub topic: String,
    pub qos: rumqttc::QoS,
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

/// Checks the MQTT source at `path` (`sources[i]`).
pub fn read(cx: &mut FileCheck<'_>, path: &str) -> Option<MqttConfig> {
    let raw: RawMqtt = cx.parse(path)?;
    let before = cx.error_count();
    // Not returned yet: the rest of the source is checked too.
    if raw.subscriptions.is_empty() {
        cx.error(
            &format!("{path}.subscriptions"),
            "subscribe to at least one topic",
        );
    }
    let mut subscriptions = Vec::new();
    for (i, s) in raw.subscriptions.iter().enumerate() {
        let qos = s.qos.unwrap_or(1);
        match crate::mqtt::qos(qos) {
            Some(q) => subscriptions.push(Subscription {
                topic: s.topic.clone(),
                qos: q,
            }),
            None => cx.error(
                &format!("{path}.subscriptions[{i}].qos"),
                format!("{qos}: expected 0, 1 or 2"),
            ),
        }
        if let Err(e) = TopicFilter::parse(&s.topic) {
            cx.error(&format!("{path}.subscriptions[{i}].topic"), e);
        }
    }
    let keep_alive = cx.duration(
        &format!("{path}.keep_alive"),
        raw.keep_alive,
        Duration::from_secs(30),
    );
    // MQTT counts keep-alive in whole seconds; 0 turns it off.
    if !keep_alive.is_zero() && keep_alive < Duration::from_secs(1) {
        cx.error(
            &format!("{path}.keep_alive"),
            "must be 0 (off) or at least 1s: MQTT counts keep-alive in seconds",
        );
    }
    let keep_alive = if keep_alive < Duration::from_secs(1) {
        Duration::ZERO
    } else {
        keep_alive
    };
    let broker = crate::mqtt::read_broker(
        cx,
        path,
        BrokerFields {
            url: &raw.url,
            username: raw.username.as_deref(),
            password_file: raw.password_file.as_deref(),
            ca_file: raw.ca_file.as_deref(),
            client_cert_file: raw.client_cert_file.as_deref(),
            client_key_file: raw.client_key_file.as_deref(),
            keep_alive,
        },
    );
    let broker = broker?;
    if cx.error_count() > before {
        return None;
    }
    Some(MqttConfig {
        client_id: raw
            .client_id
            .unwrap_or_else(|| format!("mes-gateway-{}", raw.id)),
        id: raw.id,
        broker,
        payload: raw.payload.unwrap_or_default(),
        subscriptions,
    })
}
