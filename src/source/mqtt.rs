//! MQTT source (rumqttc): subscribes, turns each publish into an event, and acknowledges
//! a QoS 1 publish to the broker only after what it produced is durable in the outbox.
//!
//! The session is persistent (`clean_session = false`, a stable client id) and acks are
//! manual, so a publish the gateway received but had not stored when it died is
//! delivered again by the broker after the restart. When the broker reports no session
//! (first connect, or it lost its state), the subscriptions are made again.
//! Connection errors are retried forever with capped exponential backoff; the state is
//! logged when it changes, not at every attempt.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Ack, SourceError, SourceEvent, SourceHealth};
use crate::config::{MqttConfig, PayloadFormat};
use crate::event::{Event, Value};
use crate::systemd::Heartbeat;

/// Requests buffered between this task and rumqttc's event loop (acks, subscribes).
const CLIENT_CAPACITY: usize = 256;
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct MqttSource {
    config: MqttConfig,
    heartbeat: Heartbeat,
    health: Arc<SourceHealth>,
}

/// Decodes a payload as configured. `Err` holds a printable reason.
pub fn decode(format: PayloadFormat, payload: &[u8]) -> Result<Value, String> {
    let text = || std::str::from_utf8(payload).map_err(|e| format!("not UTF-8 ({e})"));
    match format {
        PayloadFormat::Text => Ok(Value::Text(text()?.to_string())),
        PayloadFormat::Number => {
            let t = text()?;
            t.trim()
                .parse::<f64>()
                .map(Value::Number)
                .map_err(|_| format!("not a number: {:?}", excerpt(payload)))
        }
        PayloadFormat::Json => serde_json::from_slice(payload)
            .map(Value::Json)
            .map_err(|e| format!("not JSON ({e})")),
        PayloadFormat::Auto => {
            let t = text()?;
            let trimmed = t.trim();
            if let Ok(n) = trimmed.parse::<f64>() {
                return Ok(Value::Number(n));
            }
            match trimmed {
                "true" => return Ok(Value::Bool(true)),
                "false" => return Ok(Value::Bool(false)),
                _ => {}
            }
            if trimmed.starts_with('{') || trimmed.starts_with('[') {
                if let Ok(j) = serde_json::from_str(trimmed) {
                    return Ok(Value::Json(j));
                }
            }
            Ok(Value::Text(t.to_string()))
        }
    }
}

/// A printable excerpt of a payload for logs: at most 80 characters, control bytes escaped.
pub fn excerpt(payload: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(&payload[..payload.len().min(80)])
        .chars()
        .flat_map(char::escape_default)
        .collect();
    if payload.len() > 80 {
        format!("{s}…")
    } else {
        s
    }
}

impl MqttSource {
    pub fn new(config: MqttConfig, heartbeat: Heartbeat, health: Arc<SourceHealth>) -> MqttSource {
        MqttSource {
            config,
            heartbeat,
            health,
        }
    }

    fn options(&self) -> Result<MqttOptions, SourceError> {
        let c = &self.config;
        let mut options = MqttOptions::new(&c.client_id, &c.host, c.port);
        options.set_keep_alive(c.keep_alive);
        // A persistent session and manual acks: unacknowledged publishes come back.
        options.set_clean_session(false);
        options.set_manual_acks(true);
        if let (Some(user), Some(password)) = (&c.username, &c.password) {
            options.set_credentials(user, password.expose());
        }
        if c.tls {
            let ca = match &c.ca_file {
                Some(path) => std::fs::read(path).map_err(|e| SourceError::Setup {
                    id: c.id.clone(),
                    detail: format!("cannot read CA file {}: {e}", path.display()),
                })?,
                None => Vec::new(),
            };
            let client_auth = match (&c.client_cert_file, &c.client_key_file) {
                (Some(cert), Some(key)) => {
                    let read = |p: &std::path::Path| {
                        std::fs::read(p).map_err(|e| SourceError::Setup {
                            id: c.id.clone(),
                            detail: format!("cannot read {}: {e}", p.display()),
                        })
                    };
                    Some((read(cert)?, read(key)?))
                }
                _ => None,
            };
            options.set_transport(Transport::Tls(TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            }));
        }
        Ok(options)
    }

    pub async fn run(
        self,
        out: mpsc::Sender<SourceEvent>,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let (client, mut eventloop) = AsyncClient::new(self.options()?, CLIENT_CAPACITY);
        let id: Arc<str> = self.config.id.as_str().into();
        let mut backoff = RECONNECT_MIN;
        let mut subscribed_once = false;
        let mut heartbeat_ticks = tokio::time::interval(self.heartbeat.period());
        tracing::info!(source = %id, broker = %format!("{}:{}", self.config.host, self.config.port), client_id = %self.config.client_id,
            subscriptions = self.config.subscriptions.len(), "MQTT source starting.");
        loop {
            self.heartbeat.beat();
            let polled = tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = client.try_disconnect();
                    return Ok(());
                }
                _ = heartbeat_ticks.tick() => continue,
                p = eventloop.poll() => p,
            };
            match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    backoff = RECONNECT_MIN;
                    self.health.set_connected(&id, true, None);
                    // Subscribe when the broker has no session for us, and always on the
                    // first connection of this process: a previous run may have died
                    // between CONNACK and SUBACK, leaving a session without subscriptions.
                    if !ack.session_present || !subscribed_once {
                        for s in &self.config.subscriptions {
                            if let Err(e) = client.subscribe(s.topic.clone(), s.qos).await {
                                tracing::error!(source = %id, topic = %s.topic, error = %e, "Cannot subscribe.");
                            }
                        }
                    }
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                    subscribed_once = true;
                    let refused = ack
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        .count();
                    if refused > 0 {
                        tracing::error!(source = %id, refused, "The broker refused subscriptions (check its ACL).");
                    } else {
                        tracing::info!(source = %id, topics = ack.return_codes.len(), "Subscribed.");
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                    let ack_client = client.clone();
                    let ack_publish = publish.clone();
                    let ack = Ack::new(move || {
                        if let Err(e) = ack_client.try_ack(&ack_publish) {
                            tracing::warn!(error = %e, "Cannot acknowledge an MQTT message; the broker will send it again.");
                        }
                    });
                    match decode(self.config.payload, &publish.payload) {
                        Ok(value) => {
                            self.health.event();
                            let event = Event {
                                source: id.clone(),
                                point: publish.topic.as_str().into(),
                                value,
                                at: jiff::Timestamp::now(),
                            };
                            out.send(SourceEvent {
                                event,
                                ack: Some(ack),
                            })
                            .await
                            .map_err(|_| SourceError::Closed { id: id.to_string() })?;
                        }
                        Err(reason) => {
                            self.health.decode_error();
                            tracing::warn!(source = %id, topic = %publish.topic, %reason, payload = %excerpt(&publish.payload),
                                "Undecodable MQTT payload; skipped (and acknowledged, so it does not come back forever).");
                            ack.run();
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let first = self.health.set_connected(&id, false, Some(&e.to_string()));
                    if first {
                        tracing::warn!(source = %id, error = %e, "MQTT connection lost; reconnecting with backoff.");
                    }
                    if !super::pause(&cancel, backoff).await {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
    }
}

/// QoS from the configuration's 0/1/2.
pub fn qos(n: u8) -> Option<QoS> {
    match n {
        0 => Some(QoS::AtMostOnce),
        1 => Some(QoS::AtLeastOnce),
        2 => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_decode_as_configured() {
        assert_eq!(
            decode(PayloadFormat::Auto, b" 42.5 ").unwrap(),
            Value::Number(42.5)
        );
        assert_eq!(
            decode(PayloadFormat::Auto, b"true").unwrap(),
            Value::Bool(true)
        );
        assert_eq!(
            decode(PayloadFormat::Auto, br#"{"a":1}"#).unwrap(),
            Value::Json(serde_json::json!({"a":1}))
        );
        assert_eq!(
            decode(PayloadFormat::Auto, b"P000123").unwrap(),
            Value::Text("P000123".into())
        );
        assert_eq!(
            decode(PayloadFormat::Text, b"12").unwrap(),
            Value::Text("12".into())
        );
        assert!(decode(PayloadFormat::Number, b"twelve").is_err());
        assert!(decode(PayloadFormat::Json, b"{oops").is_err());
        assert!(decode(PayloadFormat::Auto, &[0xff, 0xfe])
            .unwrap_err()
            .contains("not UTF-8"));
        assert_eq!(excerpt(b"a\nb"), "a\\nb");
    }
}
