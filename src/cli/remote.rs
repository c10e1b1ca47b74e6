//! The CLI's way to the operator service: the running daemon's Unix socket when it
//! answers, else the data directory itself (the daemon is stopped). Both give the same
//! answers, so the commands print the same whichever it was.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::de::DeserializeOwned;

use crate::operator::{
    ContentChecks, LinesView, MessagePage, OpError, Operator, Status, UnmatchedView,
};
use crate::outbox::{ListFilter, MessageId, Outbox, Record};
use crate::rules::state::OrderContext;
use crate::settings::OutboxSettings;
use crate::store::StoreError;

/// Where the commands go.
#[derive(Debug)]
pub enum Service {
    /// The running daemon, through its socket.
    Socket { path: PathBuf, by: String },
    /// The data directory of a stopped daemon.
    Local { operator: Operator, by: String },
}

impl Service {
    /// Connects to the running daemon, or opens the data directory when none runs.
    /// `by` is the operator's name for the history.
    pub async fn connect(settings: &OutboxSettings, by: &str) -> Result<Service, OpError> {
        let path = settings.socket.clone();
        match tokio::net::UnixStream::connect(&path).await {
            Ok(_) => {
                return Ok(Service::Socket {
                    path,
                    by: by.to_string(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(OpError::Unavailable(format!(
                    "{}: permission denied: the running gateway's socket is for its group (e.g. `sudo usermod -aG mes-gateway $USER`, then log in again)",
                    path.display()
                )))
            }
            Err(_) => {}
        }
        let dir = settings.storage.data_dir.clone();
        let opened = tokio::task::spawn_blocking(move || Outbox::open(&dir))
            .await
            .map_err(|e| OpError::Internal(e.to_string()))?;
        let outbox = match opened {
            Ok(o) => o,
            Err(StoreError::Locked { .. }) => {
                return Err(OpError::Unavailable(format!(
                    "the gateway runs (its outbox is in use) but does not answer on {}: check `api.socket` in its configuration and its log",
                    path.display()
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let checks = ContentChecks {
            field_names: settings.field_names.clone(),
            message_types: settings.message_types.clone(),
            // The rules are not read here (a broken rule file must not lock operators
            // out of the outbox): no check of line names while the gateway is stopped.
            lines: None,
        };
        Ok(Service::Local {
            operator: Operator::stopped(outbox, checks),
            by: format!("cli:{by}"),
        })
    }

    pub fn is_running(&self) -> bool {
        matches!(self, Service::Socket { .. })
    }

    pub async fn list(
        &self,
        filter: ListFilter,
        cursor: Option<MessageId>,
        limit: usize,
        newest_first: bool,
    ) -> Result<MessagePage, OpError> {
        match self {
            Service::Local { operator, .. } => {
                operator.list(filter, cursor, limit, newest_first).await
            }
            Service::Socket { .. } => {
                let mut query: Vec<(&str, String)> = Vec::new();
                if let Some(s) = filter.state {
                    query.push(("state", s.to_string()));
                }
                if let Some(o) = filter.order {
                    query.push(("order", o));
                }
                if let Some(t) = filter.message_type {
                    query.push(("type", t));
                }
                if let Some(l) = filter.line {
                    query.push(("line", l));
                }
                if let Some(t) = filter.since {
                    query.push(("since", t.to_string()));
                }
                if let Some(t) = filter.until {
                    query.push(("until", t.to_string()));
                }
                if let Some(c) = cursor {
                    query.push(("cursor", c.to_string()));
                }
                query.push(("limit", limit.to_string()));
                query.push(("newest", newest_first.to_string()));
                let query = serde_urlencoded::to_string(&query)
                    .map_err(|e| OpError::Internal(e.to_string()))?;
                self.call("GET", &format!("/api/v1/messages?{query}"), None)
                    .await
            }
        }
    }

    pub async fn show(&self, id: MessageId) -> Result<Record, OpError> {
        match self {
            Service::Local { operator, .. } => operator.show(id).await,
            Service::Socket { .. } => {
                self.call("GET", &format!("/api/v1/messages/{id}"), None)
                    .await
            }
        }
    }

    pub async fn retry(
        &self,
        id: MessageId,
        content: Option<serde_json::Value>,
    ) -> Result<Record, OpError> {
        match self {
            Service::Local { operator, by } => operator.retry(id, content, by).await,
            Service::Socket { .. } => {
                let body = serde_json::json!({ "content": content });
                self.call("POST", &format!("/api/v1/messages/{id}/retry"), Some(body))
                    .await
            }
        }
    }

    pub async fn cancel(&self, id: MessageId) -> Result<Record, OpError> {
        match self {
            Service::Local { operator, by } => operator.cancel(id, by).await,
            Service::Socket { .. } => {
                self.call("POST", &format!("/api/v1/messages/{id}/cancel"), None)
                    .await
            }
        }
    }

    pub async fn resolve(&self, id: MessageId) -> Result<Record, OpError> {
        match self {
            Service::Local { operator, by } => operator.resolve(id, by).await,
            Service::Socket { .. } => {
                self.call("POST", &format!("/api/v1/messages/{id}/resolve"), None)
                    .await
            }
        }
    }

    pub async fn send(
        &self,
        input: serde_json::Value,
        message_type: Option<&str>,
    ) -> Result<Record, OpError> {
        match self {
            Service::Local { operator, by } => operator.send(input, message_type, by).await,
            Service::Socket { .. } => {
                let path = match message_type {
                    Some(t) => format!(
                        "/api/v1/messages?{}",
                        serde_urlencoded::to_string([("type", t)])
                            .map_err(|e| OpError::Internal(e.to_string()))?
                    ),
                    None => "/api/v1/messages".to_string(),
                };
                self.call("POST", &path, Some(input)).await
            }
        }
    }

    pub async fn lines(&self) -> Result<LinesView, OpError> {
        match self {
            Service::Local { operator, .. } => operator.lines().await,
            Service::Socket { .. } => self.call("GET", "/api/v1/lines", None).await,
        }
    }

    /// Sets or clears a line's order; returns the previous one.
    pub async fn set_line(
        &self,
        line: &str,
        context: Option<OrderContext>,
    ) -> Result<Option<OrderContext>, OpError> {
        match self {
            Service::Local { operator, by } => operator.set_line(line, context, by).await,
            Service::Socket { .. } => {
                let path = format!("/api/v1/lines/{}", crate::api::path_segment(line));
                let answer: serde_json::Value = match context {
                    Some(c) => {
                        let body = serde_json::json!({ "order": c.order, "item": c.item, "operation": c.operation, "resource": c.resource });
                        self.call("PUT", &path, Some(body)).await?
                    }
                    None => self.call("DELETE", &path, None).await?,
                };
                serde_json::from_value(answer["previous"].clone())
                    .map_err(|e| OpError::Internal(e.to_string()))
            }
        }
    }

    pub async fn reload(&self) -> Result<String, OpError> {
        match self {
            Service::Local { operator, by } => operator.reload(by).await,
            Service::Socket { .. } => {
                let answer: serde_json::Value = self.call("POST", "/api/v1/reload", None).await?;
                Ok(answer["reloaded"].as_str().unwrap_or_default().to_string())
            }
        }
    }

    pub async fn unmatched(&self, limit: usize) -> Result<UnmatchedView, OpError> {
        match self {
            Service::Local { operator, .. } => operator.unmatched(limit).await,
            Service::Socket { .. } => {
                self.call(
                    "GET",
                    &format!("/api/v1/d365/unmatched?limit={limit}"),
                    None,
                )
                .await
            }
        }
    }

    pub async fn status(&self) -> Result<Status, OpError> {
        match self {
            Service::Local { operator, .. } => operator.status().await,
            Service::Socket { .. } => self.call("GET", "/api/v1/status", None).await,
        }
    }

    /// One request on the socket; an error answer becomes the [`OpError`] it was.
    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, OpError> {
        let Service::Socket { path: socket, by } = self else {
            return Err(OpError::Internal("not connected to a socket".into()));
        };
        let (status, bytes) = request(socket, by, method, path, body)
            .await
            .map_err(|e| OpError::Unavailable(format!("{}: {e}", socket.display())))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| {
                OpError::Internal(format!("unexpected answer from the gateway: {e}"))
            });
        }
        let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let message = answer["error"].as_str().unwrap_or("no detail").to_string();
        Err(match status {
            404 => OpError::NotFound(message),
            409 => OpError::Conflict(message),
            400 if answer.get("errors").is_some() => OpError::Config(
                answer["errors"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| e.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            400 => OpError::Invalid {
                field: answer["field"].as_str().map(str::to_string),
                message,
            },
            503 => OpError::Unavailable(message),
            _ => OpError::Internal(format!("HTTP {status}: {message}")),
        })
    }
}

/// One HTTP/1.1 request over the Unix socket at `socket`.
async fn request(
    socket: &Path,
    by: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, Bytes), String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let body = match body {
        Some(v) => serde_json::to_vec(&v).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("x-operator", by)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}
