//! The MQTT source's configuration (`type: mqtt`): broker URL, session, TLS files,
//! credentials, subscriptions and payload format.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{FileCheck, Secret};
use crate::source::mqtt::topic::TopicFilter;

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub id: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Stable across restarts: the broker keeps the session (and unacknowledged
    /// messages) under this id.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls_files: TlsFiles,
    pub keep_alive: Duration,
    pub payload: PayloadFormat,
    pub subscriptions: Vec<Subscription>,
}

/// Certificates of a connection over TLS (`mqtts://`): the CA that signed the broker's
/// certificate (the system's roots when absent), and a client certificate with its key
/// for brokers that authenticate clients by certificate.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

/// The certificate files of a broker connection at `path` (a source, or the alert
/// publisher): each must exist, the client certificate and key go together, and any of
/// them needs an mqtts:// URL (`tls`: what the URL said, `None` when it was unreadable).
pub fn tls_files(
    cx: &mut FileCheck<'_>,
    path: &str,
    tls: Option<bool>,
    ca_file: Option<&str>,
    client_cert_file: Option<&str>,
    client_key_file: Option<&str>,
) -> TlsFiles {
    let mut file = |key: &str, written: Option<&str>| -> Option<PathBuf> {
        let field = format!("{path}.{key}");
        let p = cx.file_path(&field, written?)?;
        if !p.is_file() {
            cx.error(&field, format!("{} not found", p.display()));
        }
        Some(p)
    };
    let files = TlsFiles {
        ca_file: file("ca_file", ca_file),
        client_cert_file: file("client_cert_file", client_cert_file),
        client_key_file: file("client_key_file", client_key_file),
    };
    if files.client_cert_file.is_some() != files.client_key_file.is_some() {
        cx.error(path, "client_cert_file and client_key_file go together");
    }
    let any = files.ca_file.is_some() || files.client_cert_file.is_some();
    if tls == Some(false) && any {
        cx.error(&format!("{path}.url"), "certificates need an mqtts:// URL");
    }
    files
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

/// Reads a broker URL (`mqtt://host[:port]`, `mqtts://host[:port]`) into (TLS, host, port).
pub fn broker_url(cx: &mut FileCheck<'_>, field: &str, url: &str) -> Option<(bool, String, u16)> {
    let (tls, default_port, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, 8883, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, 1883, r)
    } else {
        cx.error(
            field,
            format!("{url:?}: expected mqtt://host[:port] or mqtts://host[:port]"),
        );
        return None;
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => (h.to_string(), p),
            Err(_) => {
                cx.error(field, format!("{url:?}: invalid port {p:?}"));
                return None;
            }
        },
        None => (rest.to_string(), default_port),
    };
    if host.is_empty() {
        cx.error(field, format!("{url:?}: no host"));
        return None;
    }
    Some((tls, host, port))
}

/// Checks the MQTT source at `path` (`sources[i]`).
pub fn read(cx: &mut FileCheck<'_>, path: &str) -> Option<MqttConfig> {
    let raw: RawMqtt = cx.parse(path)?;
    let before = cx.error_count();
    // Not returned yet: the rest of the source is checked too.
    let broker = broker_url(cx, &format!("{path}.url"), &raw.url);
    let password = raw
        .password_file
        .as_deref()
        .and_then(|f| cx.secret_file(&format!("{path}.password_file"), f))
        .map(|(secret, _origin)| secret);
    if password.is_some() != raw.username.is_some() {
        cx.error(path, "username and password_file go together");
    }
    let tls_files = tls_files(
        cx,
        path,
        broker.as_ref().map(|(tls, _, _)| *tls),
        raw.ca_file.as_deref(),
        raw.client_cert_file.as_deref(),
        raw.client_key_file.as_deref(),
    );
    if raw.subscriptions.is_empty() {
        cx.error(
            &format!("{path}.subscriptions"),
            "subscribe to at least one topic",
        );
    }
    let mut subscriptions = Vec::new();
    for (i, s) in raw.subscriptions.iter().enumerate() {
        let qos = s.qos.unwrap_or(1);
        match super::qos(qos) {
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
    let (tls, host, port) = broker?;
    if cx.error_count() > before {
        return None;
    }
    Some(MqttConfig {
        client_id: raw
            .client_id
            .unwrap_or_else(|| format!("mes-gateway-{}", raw.id)),
        id: raw.id,
        host,
        port,
        tls,
        username: raw.username,
        password,
        tls_files,
        keep_alive,
        payload: raw.payload.unwrap_or_default(),
        subscriptions,
    })
}
