//! The `api` section: where the operator service listens (HTTP or HTTPS, and a Unix
//! socket), the token HTTP clients must show, and the limits every listener enforces.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{FileCheck, Secret};

/// The socket's name in the data directory, unless `api.socket` says otherwise. Not a
/// fixed path under /run: the daemon and the CLI both find it from the configuration
/// alone, two gateways on one PC never share it, and the data directory already has the
/// service's owner and group.
pub const SOCKET_FILE: &str = "api.sock";

/// Shortest token or webhook secret accepted: one an attacker could guess is no protection.
pub const MIN_SECRET_CHARS: usize = 16;

/// The certificate and key files of the HTTPS listener (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate, followed by its intermediates.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What every listener enforces, so no client can hold the operator service or exhaust
/// the process's file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections on the TCP listener; one more is closed at once and counted.
    /// (The Unix socket has its own cap of the same size: a flood on TCP never takes
    /// the CLI's door.)
    pub max_connections: usize,
    /// From connect until a request's headers are complete (TLS handshake included);
    /// also the longest wait for the next request on a kept-alive connection.
    pub header_timeout: Duration,
    /// Reading a request's body, from its headers to its last byte.
    pub body_timeout: Duration,
    /// A connection on which nothing moved this long is closed (no request in flight).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// These limits with the connection cap lowered, if need be, so that both doors
    /// full together still leave `reserve` file descriptors of `open_files` (the
    /// process's limit) to the data path: a flood hits the cap, never `EMFILE` in a
    /// source, the store or the CLI's socket. The cap as configured when it fits.
    pub fn within_open_files(self, open_files: u64, reserve: u64) -> Limits {
        let room = open_files.saturating_sub(reserve) / 2;
        let cap = (self.max_connections as u64).min(room.max(1)) as usize;
        Limits {
            max_connections: cap,
            ..self
        }
    }
}

/// The soft limit on open files of this process (`/proc/self/limits`), if it says.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// How long a console login lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimes {
    /// Without an operator's own action (a click, a form; not the page's self-reload).
    pub idle: Duration,
    /// From login, whatever happens: a shift, then log in again.
    pub lifetime: Duration,
}

impl Default for SessionTimes {
    fn default() -> SessionTimes {
        SessionTimes {
            idle: Duration::from_secs(3600),
            lifetime: Duration::from_secs(12 * 3600),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// HTTP listener (`/health`, `/ready`, `/metrics`, `/api/v1`, `/console`); `None`: off.
    pub listen: Option<SocketAddr>,
    /// Bearer token for HTTP requests that change something (and every request when the
    /// listener is not on loopback); `None`: HTTP is read-only.
    pub token: Option<Secret>,
    /// The Unix socket of the local CLI (file permissions are its authentication);
    /// `None`: `api.sock` in the data directory.
    pub socket: Option<PathBuf>,
    /// HTTPS on `listen`; `None`: plain HTTP (loopback, or by explicit choice).
    pub tls: Option<TlsFiles>,
    /// The operator chose plain HTTP on a listener other hosts can reach
    /// (`insecure_plain_http`): allowed, warned about at every start.
    pub insecure_plain_http: bool,
    pub limits: Limits,
    pub sessions: SessionTimes,
}

impl ApiConfig {
    pub fn socket_path(&self, data_dir: &Path) -> PathBuf {
        socket_path(self.socket.as_deref(), data_dir)
    }

    /// Whether every request needs the token, not only those that change something,
    /// whoever calls: a listener other hosts can reach shows nothing to strangers. (On a
    /// loopback listener, a caller that is not itself local — a proxy's forwarded
    /// request — needs it too: see `api::Caller`.)
    pub fn token_for_reading(&self) -> bool {
        self.listen.is_some_and(|a| !a.ip().is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_leaves_descriptors_for_the_data_path() {
        let limits = Limits::default();
        assert_eq!(limits.within_open_files(4096, 128).max_connections, 256);
        assert_eq!(limits.within_open_files(64, 32).max_connections, 16);
        assert_eq!(limits.within_open_files(16, 128).max_connections, 1);
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    cert_file: String,
    key_file: String,
}

/// `configured`, or `api.sock` in `data_dir`.
pub fn socket_path(configured: Option<&Path>, data_dir: &Path) -> PathBuf {
    configured.map_or_else(|| data_dir.join(SOCKET_FILE), Path::to_path_buf)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    /// `ip:port`; keep it on loopback or a management network.
    pub listen: Option<String>,
    /// File holding the bearer token (systemd `LoadCredential`).
    pub token_file: Option<String>,
    /// Path of the Unix socket for the local CLI.
    pub socket: Option<String>,
    pub tls: Option<RawTls>,
    /// `true`: serve plain HTTP on a non-loopback `listen` anyway (a warning at every start).
    pub insecure_plain_http: Option<bool>,
    pub max_connections: Option<usize>,
    pub header_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub session_idle: Option<String>,
    pub session_lifetime: Option<String>,
}

/// Checks the `api` section; reads the token file.
pub fn read(cx: &mut FileCheck<'_>) -> ApiConfig {
    let Some(raw) = cx.parse::<RawApi>("api") else {
        return ApiConfig::default();
    };
    let listen = match raw.listen.as_deref().map(str::parse::<SocketAddr>) {
        None => None,
        Some(Ok(addr)) => Some(addr),
        Some(Err(_)) => {
            cx.error(
                "api.listen",
                format!(
                    "{:?}: expected ip:port, e.g. 127.0.0.1:9464",
                    raw.listen.clone().unwrap_or_default()
                ),
            );
            None
        }
    };
    let token = raw
        .token_file
        .as_deref()
        .and_then(|f| cx.secret_file("api.token_file", f))
        .map(|(secret, _)| secret);
    if let Some(t) = &token {
        if t.expose().chars().count() < MIN_SECRET_CHARS {
            cx.error(
                "api.token_file",
                format!("the token is shorter than {MIN_SECRET_CHARS} characters; generate one, e.g. `openssl rand -hex 32`"),
            );
        }
    }
    let tls = raw.tls.as_ref().and_then(|t| {
        let cert = cx.file_path("api.tls.cert_file", &t.cert_file)?;
        let key = cx.file_path("api.tls.key_file", &t.key_file)?;
        let files = TlsFiles { cert, key };
        // Loaded here so `check` says what is wrong with them, not the first start.
        match super::tls::server_config(&files) {
            Ok(_) => Some(files),
            Err(e) => {
                cx.error("api.tls", e.to_string());
                None
            }
        }
    });
    let insecure_plain_http = raw.insecure_plain_http.unwrap_or(false);
    if let Some(addr) = listen {
        if !addr.ip().is_loopback() {
            if raw.token_file.is_none() {
                cx.error(
                    "api.listen",
                    format!("{addr} can be reached from other hosts: set api.token_file, or listen on 127.0.0.1"),
                );
            }
            if raw.tls.is_none() && !insecure_plain_http {
                cx.error(
                    "api.listen",
                    format!("{addr} can be reached from other hosts, and the token, the console's cookie and webhook secrets would cross the network in clear text: set api.tls (cert_file, key_file), listen on 127.0.0.1 behind a TLS proxy, or set api.insecure_plain_http: true to accept the risk"),
                );
            } else if raw.tls.is_none() {
                cx.warn(
                    "api.insecure_plain_http",
                    format!("{addr} serves plain HTTP to other hosts: the API token and console cookies can be read off the network"),
                );
            }
        }
    }
    let defaults = Limits::default();
    let max_connections = raw.max_connections.unwrap_or(defaults.max_connections);
    if max_connections == 0 {
        cx.error("api.max_connections", "must be at least 1");
    }
    let at_least = Duration::from_millis(100);
    let limits = Limits {
        max_connections: max_connections.max(1),
        header_timeout: cx.duration_at_least(
            "api.header_timeout",
            raw.header_timeout.clone(),
            defaults.header_timeout,
            at_least,
            "a client needs time to send its headers",
        ),
        body_timeout: cx.duration_at_least(
            "api.body_timeout",
            raw.body_timeout.clone(),
            defaults.body_timeout,
            at_least,
            "a client needs time to send its body",
        ),
        idle_timeout: cx.duration_at_least(
            "api.idle_timeout",
            raw.idle_timeout.clone(),
            defaults.idle_timeout,
            at_least,
            "a browser keeps its connection between page loads",
        ),
    };
    let session_defaults = SessionTimes::default();
    let sessions = SessionTimes {
        idle: cx.duration_at_least(
            "api.session_idle",
            raw.session_idle.clone(),
            session_defaults.idle,
            Duration::from_secs(1),
            "an operator needs time to read a page",
        ),
        lifetime: cx.duration_at_least(
            "api.session_lifetime",
            raw.session_lifetime.clone(),
            session_defaults.lifetime,
            Duration::from_secs(1),
            "an operator needs time to work",
        ),
    };
    ApiConfig {
        listen,
        token,
        socket: socket(cx, &raw),
        tls,
        insecure_plain_http,
        limits,
        sessions,
    }
}

/// Only where the socket is (`None`: the default), for the CLI, which must not need the
/// token file.
pub fn read_socket(cx: &mut FileCheck<'_>) -> Option<PathBuf> {
    let raw = cx.node("api").and_then(|_| cx.parse::<RawApi>("api"))?;
    socket(cx, &raw)
}

fn socket(cx: &mut FileCheck<'_>, raw: &RawApi) -> Option<PathBuf> {
    raw.socket
        .as_deref()
        .and_then(|s| cx.file_path("api.socket", s))
}
