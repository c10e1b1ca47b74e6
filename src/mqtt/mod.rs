//! What every MQTT client of the gateway shares: the broker connection (address,
//! credentials, TLS, keep-alive) as configured and as rumqttc options, QoS numbers, and
//! topic filters with captures ([`topic`]). Used by the MQTT source, the rules' publisher
//! and the alert publisher alike; each adds its own session and ack settings.

pub mod topic;

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};

use crate::config::{FileCheck, Secret};

/// One broker connection as configured.
#[derive(Debug, Clone)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls_files: TlsFiles,
    pub keep_alive: Duration,
}

impl Broker {
    /// `host:port`, for log lines.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// rumqttc's options for this broker under `client_id` (TLS files read now: a renewed
    /// file is used at the next connect after a reload); session and ack settings are the
    /// caller's.
    pub fn options(&self, client_id: &str) -> Result<MqttOptions, String> {
        let mut options = MqttOptions::new(client_id, &self.host, self.port);
        options.set_keep_alive(self.keep_alive);
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            options.set_credentials(user, password.expose());
        }
        if self.tls {
            options.set_transport(tls_transport(&self.tls_files)?);
        }
        Ok(options)
    }
}

/// The connection fields of a configuration section (a source, the alert publisher), as
/// written.
#[derive(Debug)]
pub struct BrokerFields<'a> {
    pub url: &'a str,
    pub username: Option<&'a str>,
    pub password_file: Option<&'a str>,
    pub ca_file: Option<&'a str>,
    pub client_cert_file: Option<&'a str>,
    pub client_key_file: Option<&'a str>,
    pub keep_alive: Duration,
}

/// Checks the broker connection of the section at `path`; every problem is reported, and
/// `None` is returned when any was found.
pub fn read_broker(cx: &mut FileCheck<'_>, path: &str, f: BrokerFields<'_>) -> Option<Broker> {
    let before = cx.error_count();
    let url = broker_url(cx, &format!("{path}.url"), f.url);
    let password = f
        .password_file
        .and_then(|file| cx.secret_file(&format!("{path}.password_file"), file))
        .map(|(secret, _origin)| secret);
    if f.password_file.is_some() != f.username.is_some() {
        cx.error(path, "username and password_file go together");
    }
    let tls_files = tls_files(
        cx,
        path,
        url.as_ref().map(|(tls, _, _)| *tls),
        f.ca_file,
        f.client_cert_file,
        f.client_key_file,
    );
    let (tls, host, port) = url?;
    (cx.error_count() == before).then(|| Broker {
        host,
        port,
        tls,
        username: f.username.map(String::from),
        password,
        tls_files,
        keep_alive: f.keep_alive,
    })
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
fn tls_files(
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

/// Reads a broker URL (`mqtt://host[:port]`, `mqtts://host[:port]`) into (TLS, host, port).
fn broker_url(cx: &mut FileCheck<'_>, field: &str, url: &str) -> Option<(bool, String, u16)> {
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

/// A TLS transport with these certificates (read now: a renewed file is used at the next
/// connect after a reload). No CA file means the system's roots.
fn tls_transport(files: &TlsFiles) -> Result<Transport, String> {
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {what} {}: {e}", p.display()))
    };
    let ca = match &files.ca_file {
        Some(path) => read("CA file", path)?,
        None => Vec::new(),
    };
    let client_auth = match (&files.client_cert_file, &files.client_key_file) {
        (Some(cert), Some(key)) => {
            Some((read("client certificate", cert)?, read("client key", key)?))
        }
        _ => None,
    };
    Ok(Transport::Tls(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    }))
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
