//! The `api` section: where the operator service listens (HTTP and a Unix socket) and the
//! token HTTP clients must show.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{FileCheck, Secret};

/// The socket's name in the data directory, unless `api.socket` says otherwise. Not a
/// fixed path under /run: the daemon and the CLI both find it from the configuration
/// alone, two gateways on one PC never share it, and the data directory already has the
/// service's owner and group.
pub const SOCKET_FILE: &str = "api.sock";

/// Shortest token accepted: a token an operator could guess is no protection.
const MIN_TOKEN_CHARS: usize = 16;

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
}

impl ApiConfig {
    pub fn socket_path(&self, data_dir: &Path) -> PathBuf {
        socket_path(self.socket.as_deref(), data_dir)
    }

    /// Whether every request needs the token, not only those that change something: a
    /// listener other hosts can reach shows nothing to strangers.
    pub fn token_for_reading(&self) -> bool {
        self.listen.is_some_and(|a| !a.ip().is_loopback())
    }
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
        if t.expose().chars().count() < MIN_TOKEN_CHARS {
            cx.error(
                "api.token_file",
                format!("the token is shorter than {MIN_TOKEN_CHARS} characters; generate one, e.g. `openssl rand -hex 32`"),
            );
        }
    }
    if let Some(addr) = listen {
        if !addr.ip().is_loopback() && raw.token_file.is_none() {
            cx.error(
                "api.listen",
                format!("{addr} can be reached from other hosts: set api.token_file, or listen on 127.0.0.1"),
            );
        }
    }
    ApiConfig {
        listen,
        token,
        socket: socket(cx, &raw),
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
