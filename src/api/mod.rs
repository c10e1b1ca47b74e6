//! The operator service's doors: an HTTP listener (`api.listen`) and a Unix socket
//! (`api.socket`), both serving the same `/api/v1` handlers ([`v1`]), plus `/health`,
//! `/ready`, `/metrics` and the web console ([`console`]) on HTTP.
//!
//! # Who may do what
//!
//! - Unix socket: file permissions are the authentication (mode 0660, the service's
//!   group); every request is allowed.
//! - HTTP: every request that changes something needs `Authorization: Bearer <token>`
//!   (`api.token_file`); when the listener is not on loopback every request does. Without
//!   a token configured, HTTP is read-only. The console logs in with the same token and
//!   keeps a session cookie (`HttpOnly`, `SameSite=Strict`); its forms carry a per-session
//!   token against cross-site request forgery.

pub mod config;
pub mod console;
mod metrics;
pub mod v1;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::alert::Board;
use crate::config::Secret;
use crate::live::Live;
use crate::operator::Operator;
use crate::outbox::{Outbox, State as MessageState};

#[derive(Debug, Clone)]
pub struct ApiState {
    pub operator: Operator,
    pub outbox: Outbox,
    pub live: Live,
    pub alerts: Arc<Board>,
    pub token: Option<Arc<Secret>>,
    /// Every request needs the token (the listener is not on loopback).
    pub token_for_reading: bool,
    pub sessions: Arc<console::Sessions>,
}

impl ApiState {
    pub fn new(operator: Operator, live: Live, alerts: Arc<Board>) -> ApiState {
        ApiState {
            outbox: operator.outbox().clone(),
            operator,
            live,
            alerts,
            token: None,
            token_for_reading: false,
            sessions: Arc::default(),
        }
    }

    pub fn with_token(mut self, token: Option<Secret>, token_for_reading: bool) -> ApiState {
        self.token = token.map(Arc::new);
        self.token_for_reading = token_for_reading;
        self
    }

    /// Whether `presented` is the configured token (in time independent of where they
    /// differ).
    pub fn token_matches(&self, presented: &str) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| constant_time_eq(t.expose().as_bytes(), presented.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Which door a request came through; handlers record it with the operator's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Socket,
    Http,
}

/// The HTTP listener's routes.
pub fn http_router(state: ApiState) -> Router {
    let api = v1::routes()
        .layer(axum::Extension(Door::Http))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), bearer));
    let probes = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), bearer));
    Router::new()
        .nest("/api/v1", api)
        .merge(probes)
        .merge(console::routes())
        // Authenticated by the source's own webhook secret, not the API token: D365 is
        // the caller, not an operator.
        .route("/events/d365/{source}", axum::routing::post(d365_event))
        .with_state(state)
}

/// How long the webhook waits for an event to be durable before telling D365 to send
/// it again.
const WEBHOOK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// D365's HTTPS business-event endpoint: answers 200 once the event is durable (or was
/// already), 400 for an unreadable event, 401 without the source's secret, 404 for a
/// source that does not run here, 503 when it cannot be stored now (D365 retries).
async fn d365_event(
    State(state): State<ApiState>,
    axum::extract::Path(source): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use crate::source::d365_events::{Delivery, Outcome};
    let answer = |status: StatusCode, body: serde_json::Value| (status, Json(body)).into_response();
    let (intake, starting) = {
        let live = state.live.get();
        (live.webhooks.get(&source).cloned(), live.pipeline.is_none())
    };
    let Some(intake) = intake else {
        if starting {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": "the gateway is starting or reloading; send it again" }),
            );
        }
        return answer(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("no d365_events source `{source}` runs here") }),
        );
    };
    let presented = headers
        .get("x-webhook-secret")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), intake.secret.expose().as_bytes()))
    {
        tracing::warn!(%source, "D365 business event refused: missing or wrong webhook secret.");
        return answer(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "error": "missing or wrong webhook secret (X-Webhook-Secret)" }),
        );
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let unavailable = || {
        answer(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": "the event could not be stored now; send it again" }),
        )
    };
    if intake
        .deliveries
        .send(Delivery {
            body: body.to_vec(),
            answer: tx,
        })
        .await
        .is_err()
    {
        return unavailable();
    }
    match tokio::time::timeout(WEBHOOK_WAIT, rx).await {
        Ok(Ok(Outcome::Stored)) => {
            answer(StatusCode::OK, serde_json::json!({ "status": "stored" }))
        }
        Ok(Ok(Outcome::Refused(reason))) => answer(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": reason }),
        ),
        _ => unavailable(),
    }
}

/// The Unix socket's routes: the same handlers, no token.
pub fn socket_router(state: ApiState) -> Router {
    Router::new()
        .nest("/api/v1", v1::routes().layer(axum::Extension(Door::Socket)))
        .route("/health", get(health))
        .with_state(state)
}

/// Refuses a request without the bearer token where one is needed.
async fn bearer(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if !changes && !state.token_for_reading {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if state.token_matches(t) => next.run(request).await,
        _ => {
            let why = if state.token.is_none() {
                "this HTTP listener is read-only: set api.token_file to allow actions (the CLI on the Unix socket needs no token)"
            } else {
                "missing or wrong bearer token (Authorization: Bearer <api.token_file>)"
            };
            let mut response = (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({ "error": why })),
            )
                .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

/// Serves `router` on the Unix socket at `path` until `cancel`: replaces a socket file a
/// previous run left behind, and makes it mode 0660 (owner and group: the service's).
pub async fn serve_socket(
    path: &Path,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{}: another gateway answers on this socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    let owned = path.to_path_buf();
    tokio::spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "Operator socket stopped.");
        }
        let _ = std::fs::remove_file(&owned);
    });
    Ok(())
}

async fn health(State(state): State<ApiState>) -> impl IntoResponse {
    let counts = state.outbox.counts();
    let live = state.live.get();
    let sources: Vec<serde_json::Value> = live
        .sources
        .iter()
        .map(|(id, h)| {
            serde_json::json!({
                "id": id,
                "connected": h.is_connected(),
                "events": h.events.load(Ordering::Relaxed),
                "decode_errors": h.decode_errors.load(Ordering::Relaxed),
                "reconnects": h.reconnects.load(Ordering::Relaxed),
                "last_error": h.last_error(),
            })
        })
        .collect();
    let held = counts.get(&MessageState::Failed).copied().unwrap_or(0)
        + counts.get(&MessageState::Uncertain).copied().unwrap_or(0);
    let all_up = live.sources.iter().all(|(_, h)| h.is_connected());
    let status = if held > 0 || !all_up {
        "degraded"
    } else {
        "ok"
    };
    let outbox = crate::operator::state_counts(&state.outbox);
    // The order contexts as the pipeline last committed them.
    let lines = live
        .pipeline
        .as_ref()
        .map(|p| p.lines.read().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or_default();
    Json(
        serde_json::json!({ "status": status, "sources": sources, "outbox": outbox, "lines": lines, "alerts": state.alerts.open_alerts() }),
    )
}

/// 200 when the gateway can do its work: every source connected and (when delivering)
/// a D365 token obtained; 503 with the reasons otherwise.
async fn ready(State(state): State<ApiState>) -> impl IntoResponse {
    let live = state.live.get();
    let mut reasons: Vec<String> = live
        .sources
        .iter()
        .filter(|(_, h)| !h.is_connected())
        .map(|(id, h)| {
            format!(
                "source {id} is down: {}",
                h.last_error().unwrap_or_default()
            )
        })
        .collect();
    if let Some(e) = live.dispatch.as_ref().and_then(|d| d.last_error()) {
        reasons.push(format!("no D365 token: {e}"));
    }
    if live.pipeline.is_none() {
        reasons.push("the gateway is starting or reloading".into());
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": reasons.is_empty(), "reasons": reasons })),
    )
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&state),
    )
}

/// `text` percent-encoded for one segment of a URL path (a line name in `/lines/LINE`).
pub fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The operator's name a request gives (`X-Operator`), for the history.
pub fn operator_name(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-operator")
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.trim()
                .chars()
                .filter(|c| !c.is_control())
                .take(64)
                .collect::<String>()
        })
        .filter(|s| !s.is_empty())
}
