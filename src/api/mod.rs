//! The operator service's doors: an HTTP(S) listener (`api.listen`) and a Unix socket
//! (`api.socket`), both serving the same `/api/v1` handlers ([`v1`]), plus `/health`,
//! `/ready`, `/metrics` and the web console ([`console`]) on HTTP. Both are served by
//! [`serve`]: connection cap, header/idle deadlines, TLS ([`tls`]).
//!
//! # Who may do what
//!
//! - Unix socket: file permissions are the authentication (mode 0660, the service's
//!   group); every request is allowed.
//! - HTTP: every request that changes something needs `Authorization: Bearer <token>`
//!   (`api.token_file`). A read needs it too unless the caller is on this machine: the
//!   peer's address is loopback *and* the request was not forwarded by a proxy
//!   (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`) — decided per request, not by the
//!   listen address, so a TLS proxy in front opens nothing. On a listener other hosts
//!   can reach every request needs it. Without a token configured, HTTP is read-only.
//!   The console logs in with the same token and keeps a session cookie (`HttpOnly`,
//!   `SameSite=Strict`, `Secure` under TLS); its forms carry a per-session token against
//!   cross-site request forgery.
//! - Secrets rotate: a reload reads the token again ([`ApiState::rotate`]); the old one
//!   is refused from then on and the console sessions made with it end.
//! - Every HTTP answer carries headers against framing, sniffing and referrer leaks
//!   (and HSTS under TLS); request bodies are read only within a size and a deadline.

pub mod config;
pub mod console;
mod metrics;
pub mod serve;
pub mod tls;
pub mod v1;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
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
use config::{ApiConfig, Limits};
use serve::{ListenerStats, Peer};

/// The largest request body on `/api/v1` and the console: an edited message's content
/// with its lines, with room to spare.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The largest D365 business event the webhook takes: Service Bus's own limit for a
/// message (256 KiB, standard tier), which every business event D365 sends fits.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// The credentials HTTP callers must show; replaced whole on reload.
#[derive(Debug, Default)]
struct Credentials {
    token: Option<Arc<Secret>>,
    /// Every request needs the token (the listener is not on loopback).
    token_for_reading: bool,
}

#[derive(Debug, Clone)]
pub struct ApiState {
    pub operator: Operator,
    pub outbox: Outbox,
    pub live: Live,
    pub alerts: Arc<Board>,
    credentials: Arc<RwLock<Credentials>>,
    pub sessions: Arc<console::Sessions>,
    pub logins: Arc<console::LoginThrottle>,
    /// The HTTPS listener's certificate (empty: plain HTTP).
    pub tls: tls::TlsSlot,
    pub limits: Limits,
    pub listeners: Arc<ListenerStats>,
}

impl ApiState {
    pub fn new(operator: Operator, live: Live, alerts: Arc<Board>) -> ApiState {
        ApiState {
            outbox: operator.outbox().clone(),
            operator,
            live,
            alerts,
            credentials: Arc::default(),
            sessions: Arc::default(),
            logins: Arc::default(),
            tls: tls::TlsSlot::default(),
            limits: Limits::default(),
            listeners: Arc::default(),
        }
    }

    pub fn with_token(self, token: Option<Secret>, token_for_reading: bool) -> ApiState {
        *self.credentials.write().unwrap_or_else(|p| p.into_inner()) = Credentials {
            token: token.map(Arc::new),
            token_for_reading,
        };
        self
    }

    /// The state for `config`: its token, limits and session times, and its certificate
    /// already loaded in `tls`.
    pub fn configured(self, config: &ApiConfig, tls: tls::TlsSlot) -> ApiState {
        let mut state = self.with_token(config.token.clone(), config.token_for_reading());
        state.limits = config.limits;
        state.tls = tls;
        state.sessions = Arc::new(console::Sessions::new(config.sessions));
        state
    }

    fn credentials(&self) -> std::sync::RwLockReadGuard<'_, Credentials> {
        // Replaced whole; a panic elsewhere cannot leave it half-written.
        self.credentials.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn has_token(&self) -> bool {
        self.credentials().token.is_some()
    }

    /// Whether `presented` is the configured token (in time independent of where they
    /// differ).
    pub fn token_matches(&self, presented: &str) -> bool {
        self.credentials()
            .token
            .as_ref()
            .is_some_and(|t| constant_time_eq(t.expose().as_bytes(), presented.as_bytes()))
    }

    /// Takes the secrets of a reloaded `config`: the token (a changed one ends every
    /// console session) and the certificate. Returns what was re-read, for the log; a
    /// certificate that cannot be loaded keeps the running one and says why.
    pub fn rotate(&self, config: &ApiConfig) -> Vec<String> {
        let mut said = Vec::new();
        {
            let mut credentials = self.credentials.write().unwrap_or_else(|p| p.into_inner());
            let changed = credentials.token.as_deref().map(Secret::expose)
                != config.token.as_ref().map(Secret::expose);
            if changed {
                let ended = self.sessions.end_all();
                said.push(format!(
                    "api.token_file: {} (old token refused from now on; {ended} console session(s) ended)",
                    if config.token.is_some() { "changed" } else { "removed" }
                ));
            } else if config.token.is_some() {
                said.push("api.token_file: unchanged".into());
            }
            *credentials = Credentials {
                token: config.token.clone().map(Arc::new),
                token_for_reading: config.token_for_reading(),
            };
        }
        if let Some(files) = &config.tls {
            if self.tls.is_on() {
                match self.tls.reload(files) {
                    Ok(()) => said.push(format!(
                        "api.tls: certificate {} re-read (new connections use it)",
                        files.cert.display()
                    )),
                    Err(e) => {
                        tracing::error!(error = %e, "The new TLS certificate cannot be used; the running one stays.");
                        said.push(format!("api.tls: NOT re-read ({e})"));
                    }
                }
            }
        }
        said
    }

    /// Whether a read by this request needs the token.
    fn reading_needs_token(&self, request: &Request) -> bool {
        self.credentials().token_for_reading || !Caller::of(request).is_local()
    }
}

/// Who sent a request, as far as the operator service trusts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub peer: Option<Peer>,
    /// A proxy says it forwards the request for someone else.
    pub forwarded: bool,
}

impl Caller {
    pub fn of(request: &Request) -> Caller {
        Caller::from_parts(
            request.extensions().get::<Peer>().copied(),
            request.headers(),
        )
    }

    pub fn from_parts(peer: Option<Peer>, headers: &HeaderMap) -> Caller {
        Caller {
            peer,
            forwarded: ["forwarded", "x-forwarded-for", "x-real-ip"]
                .iter()
                .any(|h| headers.contains_key(*h)),
        }
    }

    /// On this machine, asking for itself. A request with no known peer (an in-process
    /// test) is not local.
    pub fn is_local(self) -> bool {
        !self.forwarded && self.peer.is_some_and(Peer::is_local)
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // The length is not secret (every token is at least 16 characters); the content is.
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
        // Bodies are read whole, within the limits, before any handler sees them...
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            bounded_body,
        ))
        // ... except the webhook's, read only after its secret was checked.
        .route("/events/d365/{source}", axum::routing::post(d365_event))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security_headers,
        ))
        .with_state(state)
}

/// Reads the request's body within `MAX_BODY_BYTES` and the body deadline (413/408
/// otherwise), so no handler waits on a slow or endless upload.
async fn bounded_body(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match serve::read_body(body, MAX_BODY_BYTES, state.limits.body_timeout).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Err(refused) => refused,
    }
}

/// The Content-Security-Policy of every answer: scripts and styles only from the
/// console's own files (no inline script can run, whatever a D365 field holds), forms
/// only to itself, never in a frame.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if state.tls.is_on() {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    response
}

/// How long the webhook waits for an event to be durable before telling D365 to send
/// it again.
const WEBHOOK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// D365's business-event endpoint: answers 200 once the event is durable (or was
/// already), 400 for an unreadable event, 401 without the source's secret (checked from
/// the headers before a byte of the body is read), 404 for a source that does not run
/// here, 413 for a body over [`MAX_EVENT_BYTES`], 503 when it cannot be stored now
/// (D365 retries).
async fn d365_event(
    State(state): State<ApiState>,
    axum::extract::Path(source): axum::extract::Path<String>,
    request: Request,
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
            serde_json::json!({ "error": "no d365_events source of that name runs here" }),
        );
    };
    let headers = request.headers();
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
        let peer = request.extensions().get::<Peer>().copied();
        tracing::warn!(source = %crate::text::for_log(&source), ?peer, "D365 business event refused: missing or wrong webhook secret; its body was not read.");
        let mut refused = answer(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "error": "missing or wrong webhook secret (X-Webhook-Secret)" }),
        );
        // The body was not read: the connection cannot carry another request.
        refused
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return refused;
    }
    let body = match serve::read_body(
        request.into_body(),
        MAX_EVENT_BYTES,
        state.limits.body_timeout,
    )
    .await
    {
        Ok(body) => body,
        Err(refused) => return refused,
    };
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            bounded_body,
        ))
        .with_state(state)
}

/// Refuses a request without the bearer token where one is needed.
async fn bearer(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if !changes && !state.reading_needs_token(&request) {
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
            let why = if !state.has_token() {
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
    limits: Limits,
    stats: Arc<ListenerStats>,
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
        serve::serve_unix(listener, router, limits, stats, cancel).await;
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
