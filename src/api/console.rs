//! The web console on the HTTP listener: server-rendered pages laid out like D365's
//! "Manufacturing execution systems integration" page (messages in arrival order with
//! state and production order, a detail pane with content, attempts and history, the
//! actions Retry, Edit and retry, Cancel, Resolve), a lines page and a sources page.
//! No build step and no framework: HTML from Rust strings, a few lines of script for
//! the refresh.
//!
//! Login with the API token; a session cookie (`HttpOnly`, `SameSite=Strict`, `Secure`
//! under TLS) carries the session, and each form carries the session's own anti-forgery
//! token, checked on every POST in constant time. A session ends after `session_idle`
//! without an operator's action (the page's own reload is not one) and `session_lifetime`
//! after login whatever happens; a token rotation ends them all. Failed logins are
//! throttled per client address ([`LoginThrottle`]). The page's script and style are
//! files of their own, so the Content-Security-Policy allows no inline script; a link
//! from D365's data is rendered only when it is `https:`. Every action goes through the
//! same operator service as the API.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::config::SessionTimes;
use super::serve::Peer;
use super::ApiState;
use crate::operator::OpError;
use crate::outbox::{ListFilter, MessageId, Record, State as MessageState};
use crate::rules::state::OrderContext;

const COOKIE: &str = "mesgw_session";
/// How often the pages reload themselves (unless an edit is under way).
const REFRESH_SECONDS: u32 = 10;
/// The query parameter the page's self-reload adds: such a request does not count as
/// the operator's activity.
const REFRESH_PARAM: &str = "refresh";
const GRID_ROWS: usize = 200;
/// The most sessions kept at once; a new login beyond it ends the least recently used.
const MAX_SESSIONS: usize = 256;

#[derive(Debug, Clone)]
struct Session {
    csrf: String,
    name: String,
    created: Instant,
    last_used: Instant,
}

/// The console's logged-in sessions (in memory: a restart logs everyone out).
#[derive(Debug, Default)]
pub struct Sessions {
    times: SessionTimes,
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(times: SessionTimes) -> Sessions {
        Sessions {
            times,
            open: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn alive(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.last_used) < self.times.idle
            && now.duration_since(s.created) < self.times.lifetime
    }

    fn create(&self, name: String) -> Option<String> {
        self.create_at(name, Instant::now())
    }

    fn create_at(&self, name: String, now: Instant) -> Option<String> {
        let id = random_hex()?;
        let csrf = random_hex()?;
        let mut sessions = self.lock();
        sessions.retain(|_, s| self.alive(s, now));
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                csrf,
                name,
                created: now,
                last_used: now,
            },
        );
        Some(id)
    }

    /// The session of `headers`' cookie if it is still alive; `activity`: the operator
    /// did something (not the page's self-reload), which resets the idle clock.
    fn get(&self, headers: &HeaderMap, activity: bool) -> Option<(String, Session)> {
        self.get_at(headers, activity, Instant::now())
    }

    fn get_at(
        &self,
        headers: &HeaderMap,
        activity: bool,
        now: Instant,
    ) -> Option<(String, Session)> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = self.lock();
        let s = sessions.get(&id)?;
        if !self.alive(s, now) {
            sessions.remove(&id);
            return None;
        }
        let s = sessions.get_mut(&id)?;
        if activity {
            s.last_used = now;
        }
        Some((id, s.clone()))
    }

    fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Ends every session (the token they were made with changed); how many.
    pub fn end_all(&self) -> usize {
        let mut sessions = self.lock();
        let n = sessions.len();
        sessions.clear();
        n
    }
}

/// Failed logins per client address: after [`LOGIN_FREE_FAILURES`] failures, each
/// further attempt from that address waits out a pause that doubles up to
/// [`LOGIN_MAX_PAUSE`] (refused with 429 meanwhile, the token not even compared). Logged
/// once per address and pause, counted always.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    addresses: Mutex<HashMap<std::net::IpAddr, Failures>>,
    pub failures: std::sync::atomic::AtomicU64,
    pub throttled: std::sync::atomic::AtomicU64,
}

/// Wrong tokens allowed from one address before it is slowed down.
pub const LOGIN_FREE_FAILURES: u32 = 5;
/// The first pause after the free failures; doubles with each further failure.
pub const LOGIN_FIRST_PAUSE: Duration = Duration::from_secs(2);
pub const LOGIN_MAX_PAUSE: Duration = Duration::from_secs(300);
/// Addresses tracked at once; beyond it the one that failed longest ago is forgotten.
const MAX_TRACKED_ADDRESSES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    /// No attempt before this.
    until: Option<Instant>,
    /// This pause was logged already.
    logged: bool,
}

/// What the throttle says of a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Allowed,
    /// Wait this long.
    Wait(Duration),
}

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<std::net::IpAddr, Failures>> {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn check(&self, ip: std::net::IpAddr, now: Instant) -> Attempt {
        let mut map = self.lock();
        let Some(f) = map.get_mut(&ip) else {
            return Attempt::Allowed;
        };
        // A quiet hour forgets an address's failures.
        if now.duration_since(f.last) > LOGIN_MAX_PAUSE * 12 {
            map.remove(&ip);
            return Attempt::Allowed;
        }
        match f.until {
            Some(until) if until > now => {
                self.throttled
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !f.logged {
                    f.logged = true;
                    tracing::warn!(client = %ip, failures = f.count, wait_s = until.duration_since(now).as_secs_f64().ceil(),
                        "Console logins from this address are paused after repeated wrong tokens (logged once per pause).");
                }
                Attempt::Wait(until.duration_since(now))
            }
            _ => Attempt::Allowed,
        }
    }

    pub fn failed(&self, ip: std::net::IpAddr, now: Instant) {
        self.failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = self.lock();
        if map.len() >= MAX_TRACKED_ADDRESSES && !map.contains_key(&ip) {
            if let Some(oldest) = map.iter().min_by_key(|(_, f)| f.last).map(|(a, _)| *a) {
                map.remove(&oldest);
            }
        }
        let f = map.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
            until: None,
            logged: false,
        });
        f.count += 1;
        f.last = now;
        if f.count >= LOGIN_FREE_FAILURES {
            let pause = crate::backoff::Backoff::doubling(LOGIN_FIRST_PAUSE, LOGIN_MAX_PAUSE)
                .ceiling(f.count - LOGIN_FREE_FAILURES);
            f.until = Some(now + pause);
            f.logged = false;
        }
    }

    pub fn succeeded(&self, ip: std::net::IpAddr) {
        self.lock().remove(&ip);
    }
}

/// A request from a logged-in browser; any other is sent to the login page.
struct LoggedIn(Session);

impl axum::extract::FromRequestParts<ApiState> for LoggedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let refresh = parts.uri.query().is_some_and(|q| {
            q.split('&')
                .any(|kv| kv.strip_prefix(REFRESH_PARAM) == Some("=1"))
        });
        match state.sessions.get(&parts.headers, !refresh) {
            Some((_, session)) => Ok(LoggedIn(session)),
            None => Err(to_login()),
        }
    }
}

impl LoggedIn {
    /// The refusal of a form that does not carry this session's anti-forgery token.
    fn refusal(&self, csrf: &str) -> Option<Response> {
        (!super::constant_time_eq(self.0.csrf.as_bytes(), csrf.as_bytes())).then(|| {
            (
                StatusCode::FORBIDDEN,
                "the form is stale or forged: reload the page",
            )
                .into_response()
        })
    }
}

/// 32 random bytes from the system's generator, as hex.
fn random_hex() -> Option<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    Some(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/messages") }))
        .route(
            "/console",
            get(|| async { Redirect::to("/console/messages") }),
        )
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/messages", get(messages_page))
        .route("/console/messages/{id}/{action}", post(message_action))
        .route("/console/lines", get(lines_page).post(set_line))
        .route("/console/lines/{line}/clear", post(clear_line))
        .route("/console/sources", get(sources_page))
        .route("/console/static/console.css", get(stylesheet))
        .route("/console/static/console.js", get(script))
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        SCRIPT.replace("REFRESH_MS", &(REFRESH_SECONDS * 1000).to_string()),
    )
        .into_response()
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string()
}

const STYLE: &str = r#"
body{font-family:"Segoe UI",system-ui,sans-serif;margin:0;background:#faf9f8;color:#201f1e;font-size:14px}
header{background:#002050;color:#fff;padding:8px 16px;display:flex;gap:24px;align-items:center}
header a{color:#fff;text-decoration:none}header a.here{border-bottom:2px solid #fff}
header .who{margin-left:auto}
main{padding:12px 16px}
h1{font-size:20px;font-weight:600;margin:4px 0 12px}
h2{font-size:16px;font-weight:600;margin:16px 0 8px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #edebe9;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f3f2f1;font-weight:600}
tr.selected td{background:#deecf9}
td.state-failed,td.state-uncertain{color:#a4262c;font-weight:600}
td.state-delivered{color:#107c10}
td.d365-failed{color:#a4262c;font-weight:600}
td.d365-ok{color:#107c10}
.panes{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:16px}
.pane{background:#fff;border:1px solid #edebe9;padding:12px;overflow-x:auto}
pre{white-space:pre-wrap;word-break:break-all;background:#f3f2f1;padding:8px}
textarea{width:100%;min-height:180px;font-family:monospace}
.actions{display:flex;gap:8px;flex-wrap:wrap;margin:8px 0}
button{background:#0078d4;color:#fff;border:0;padding:6px 14px;cursor:pointer}
button.secondary{background:#fff;color:#201f1e;border:1px solid #8a8886}
.note{background:#dff6dd;padding:8px;margin-bottom:8px}
.error{background:#fde7e9;padding:8px;margin-bottom:8px}
form.filters{display:flex;gap:8px;margin-bottom:8px;align-items:end}
form.login{max-width:420px}
label{display:flex;flex-direction:column;font-size:12px;gap:2px}
"#;

/// Reloads the page every few seconds unless the operator is editing something. The
/// reload asks with `refresh=1`, which does not count as the operator's activity, and
/// takes it off the address bar again, so a bookmark or a click is a real visit.
const SCRIPT: &str = r#"
(function(){
var u=new URL(location.href);
if(u.searchParams.has('refresh')){u.searchParams.delete('refresh');history.replaceState(null,'',u.toString());}
document.body.dataset.refresh='on';
document.querySelectorAll('textarea,input[type=text]').forEach(function(e){e.addEventListener('input',function(){document.body.dataset.editing='1';});});
setInterval(function(){if(!document.body.dataset.editing){var r=new URL(location.href);r.searchParams.set('refresh','1');location.replace(r.toString());}},REFRESH_MS);
})();
"#;

fn page(title: &str, here: &str, session: Option<&Session>, body: &str) -> Html<String> {
    let nav = [
        ("messages", "/console/messages", "Messages"),
        ("lines", "/console/lines", "Lines"),
        ("sources", "/console/sources", "Sources"),
    ]
    .iter()
    .map(|(key, href, label)| {
        let class = if *key == here { " class=\"here\"" } else { "" };
        format!("<a href=\"{href}\"{class}>{label}</a>")
    })
    .collect::<String>();
    let who = match session {
        Some(s) => format!(
            "<span class=\"who\">{}</span><form method=\"post\" action=\"/console/logout\">{}<button class=\"secondary\" type=\"submit\">Log out</button></form>",
            esc(&s.name),
            csrf_field(s)
        ),
        None => String::new(),
    };
    let script = if who.is_empty() {
        ""
    } else {
        "<script src=\"/console/static/console.js\"></script>"
    };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} — mes-gateway</title><link rel=\"stylesheet\" href=\"/console/static/console.css\"></head>\
         <body><header><strong>mes-gateway</strong>{nav}{who}</header><main><h1>{title}</h1>{body}</main>{script}</body></html>",
        title = esc(title)
    ))
}

fn to_login() -> Response {
    Redirect::to("/console/login").into_response()
}

fn csrf_field(session: &Session) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        session.csrf
    )
}

#[derive(Debug, Deserialize)]
struct Notes {
    note: Option<String>,
    error: Option<String>,
}

fn notes(n: &Notes) -> String {
    let mut out = String::new();
    if let Some(note) = &n.note {
        let _ = write!(out, "<div class=\"note\" id=\"note\">{}</div>", esc(note));
    }
    if let Some(error) = &n.error {
        let _ = write!(
            out,
            "<div class=\"error\" id=\"error\">{}</div>",
            esc(error)
        );
    }
    out
}

/// Redirects to `path` with `key=text` in the query.
fn redirect_with(path: &str, params: &[(&str, &str)]) -> Response {
    let query = serde_urlencoded::to_string(params).unwrap_or_default();
    Redirect::to(&format!("{path}?{query}")).into_response()
}

async fn login_page(State(state): State<ApiState>) -> Html<String> {
    login_form(&state, None)
}

fn login_form(state: &ApiState, error: Option<&str>) -> Html<String> {
    let body = if !state.has_token() {
        "<div class=\"error\">The console needs a token: set <code>api.token_file</code> in gateway.yaml and reload.</div>".to_string()
    } else {
        format!(
            "{}<form method=\"post\" action=\"/console/login\" class=\"pane login\">\
             <label>Your name (recorded with your actions)<input type=\"text\" name=\"name\" id=\"name\" required></label><br>\
             <label>API token<input type=\"password\" name=\"token\" id=\"token\" required></label><br>\
             <button type=\"submit\" id=\"login\">Log in</button></form>",
            error.map(|e| format!("<div class=\"error\">{}</div>", esc(e))).unwrap_or_default()
        )
    };
    page("Log in", "", None, &body)
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    name: String,
    token: String,
}

async fn login(
    State(state): State<ApiState>,
    peer: Option<axum::Extension<Peer>>,
    Form(form): Form<LoginForm>,
) -> Response {
    // Throttled per address; the Unix socket serves no console, so a request without a
    // TCP peer is an in-process one (tests) and shares one slot.
    let ip = match peer.map(|p| p.0) {
        Some(Peer::Tcp(addr)) => addr.ip(),
        _ => std::net::IpAddr::from([0u8, 0, 0, 0]),
    };
    let now = Instant::now();
    if let Attempt::Wait(wait) = state.logins.check(ip, now) {
        let secs = wait.as_secs().max(1);
        let mut refused = (
            StatusCode::TOO_MANY_REQUESTS,
            login_form(
                &state,
                Some(&format!(
                    "Too many wrong tokens from your address: try again in {secs} s."
                )),
            ),
        )
            .into_response();
        if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
            refused.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return refused;
    }
    if !state.token_matches(form.token.trim()) {
        state.logins.failed(ip, now);
        tracing::warn!(name = %crate::text::for_log(&form.name), client = %ip, "Console login refused: wrong token.");
        return (
            StatusCode::UNAUTHORIZED,
            login_form(&state, Some("Wrong token.")),
        )
            .into_response();
    }
    state.logins.succeeded(ip);
    let name: String = form
        .name
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    let name = if name.is_empty() {
        "operator".to_string()
    } else {
        name
    };
    let Some(id) = state.sessions.create(name.clone()) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the system's random generator failed",
        )
            .into_response();
    };
    tracing::info!(name = %crate::text::for_log(&name), client = %ip, "Console login.");
    let secure = if state.tls.is_on() { "; Secure" } else { "" };
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}"),
        )],
        Redirect::to("/console/messages"),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some((id, session)) = state.sessions.get(&headers, true) {
        if super::constant_time_eq(session.csrf.as_bytes(), form.csrf.as_bytes()) {
            state.sessions.end(&id);
        }
    }
    (
        [(header::SET_COOKIE, format!("{COOKIE}=; Path=/; Max-Age=0"))],
        Redirect::to("/console/login"),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct MessagesQuery {
    state: Option<String>,
    order: Option<String>,
    line: Option<String>,
    id: Option<MessageId>,
    note: Option<String>,
    error: Option<String>,
}

async fn messages_page(
    State(state): State<ApiState>,
    logged_in: LoggedIn,
    Query(q): Query<MessagesQuery>,
) -> Response {
    let session = &logged_in.0;
    let filter = ListFilter {
        state: q.state.as_deref().and_then(|s| s.parse().ok()),
        order: q.order.clone().filter(|o| !o.trim().is_empty()),
        line: q.line.clone().filter(|l| !l.trim().is_empty()),
        ..ListFilter::default()
    };
    // Newest first, as D365's page opens; the arrival order is the id order.
    let page_result = state
        .operator
        .list(filter.clone(), None, GRID_ROWS, true)
        .await;
    let mut body = notes(&Notes {
        note: q.note.clone(),
        error: q.error.clone(),
    });
    let states: String = std::iter::once(("", "All states".to_string()))
        .chain(
            MessageState::ALL
                .iter()
                .map(|s| (s.as_str(), s.to_string())),
        )
        .map(|(value, label)| {
            let selected = if q.state.as_deref().unwrap_or("") == value {
                " selected"
            } else {
                ""
            };
            format!("<option value=\"{value}\"{selected}>{label}</option>")
        })
        .collect();
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\"><label>State<select name=\"state\">{states}</select></label>\
         <label>Production order<input type=\"text\" name=\"order\" value=\"{}\"></label>\
         <label>Line<input type=\"text\" name=\"line\" value=\"{}\"></label><button type=\"submit\">Filter</button></form>",
        esc(q.order.as_deref().unwrap_or("")),
        esc(q.line.as_deref().unwrap_or(""))
    );
    let page_data = match page_result {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(body, "<div class=\"error\">{}</div>", esc(&e.to_string()));
            return page(
                "Manufacturing execution systems integration",
                "messages",
                Some(session),
                &body,
            )
            .into_response();
        }
    };
    let counts: Vec<String> = page_data
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    let _ = write!(
        body,
        "<p id=\"counts\">Outbox: {}</p>",
        esc(&if counts.is_empty() {
            "empty".into()
        } else {
            counts.join(", ")
        })
    );
    let link_query = |id: MessageId| {
        serde_urlencoded::to_string([
            ("state", q.state.as_deref().unwrap_or("")),
            ("order", q.order.as_deref().unwrap_or("")),
            ("line", q.line.as_deref().unwrap_or("")),
            ("id", &id.to_string()),
        ])
        .unwrap_or_default()
    };
    let mut grid = String::from(
        "<table id=\"messages\"><thead><tr><th>Message ID</th><th>Production order</th><th>Message type</th><th>Line</th><th>State</th><th>D365</th><th>Created</th><th>Attempts</th><th>Last error</th></tr></thead><tbody>",
    );
    for r in &page_data.messages {
        let selected = if q.id == Some(r.id) {
            " class=\"selected\""
        } else {
            ""
        };
        let _ = write!(
            grid,
            "<tr{selected} data-id=\"{id}\"><td><a href=\"/console/messages?{link}\" id=\"open-{id}\">{id}</a></td><td>{order}</td><td title=\"{ty}\">{short_ty}</td><td>{line}</td><td class=\"state-{st}\">{st}</td>{verdict}<td>{created}</td><td>{attempts}</td><td>{error}</td></tr>",
            id = r.id,
            verdict = verdict_cell(r),
            link = esc(&link_query(r.id)),
            order = esc(&r.production_order),
            ty = esc(&r.message_type),
            // The grid is narrow: "ReportFinished" says it; the full name is the tooltip.
            short_ty = esc(r.message_type.strip_prefix("ProdProductionOrder").unwrap_or(&r.message_type)),
            line = esc(r.line.as_deref().unwrap_or("")),
            st = r.state,
            created = time(r.created_at),
            attempts = r.attempt_count,
            error = esc(r.last_error.as_deref().unwrap_or("")),
        );
    }
    grid.push_str("</tbody></table>");
    if page_data.messages.is_empty() {
        grid.push_str("<p>No messages.</p>");
    }
    let detail = match q.id {
        None => "<p>Select a message to see its content, attempts and history.</p>".to_string(),
        Some(id) => match state.operator.show(id).await {
            Ok(r) => detail_pane(&r, session, &link_query(id)),
            Err(e) => format!("<div class=\"error\">{}</div>", esc(&e.to_string())),
        },
    };
    let _ = write!(
        body,
        "<div class=\"panes\"><div class=\"pane\">{grid}</div><div class=\"pane\" id=\"detail\">{detail}</div></div>"
    );
    page(
        "Manufacturing execution systems integration",
        "messages",
        Some(session),
        &body,
    )
    .into_response()
}

/// D365's verdict on a message as a table cell: what D365's processing made of it.
fn verdict_cell(r: &Record) -> String {
    match &r.d365 {
        None => "<td class=\"d365-none\"></td>".to_string(),
        Some(v) if v.failed => format!(
            "<td class=\"d365-failed\" title=\"{title}\">failed in D365</td>",
            title = esc(v.infolog.as_deref().or(v.result.as_deref()).unwrap_or(""))
        ),
        Some(v) => format!("<td class=\"d365-ok\">{}</td>", esc(&v.state)),
    }
}

fn detail_pane(r: &Record, session: &Session, back: &str) -> String {
    let content = serde_json::from_str::<serde_json::Value>(&r.content)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| r.content.clone());
    let mut out = format!(
        "<h2>Message {id}</h2><table><tr><th>Production order</th><td>{order}</td></tr><tr><th>Message type</th><td>{ty}</td></tr>\
         <tr><th>State</th><td id=\"detail-state\" class=\"state-{st}\">{st}</td></tr><tr><th>Created</th><td>{created}</td></tr>\
         <tr><th>Last error</th><td>{error}</td></tr></table>",
        id = r.id,
        order = esc(&r.production_order),
        ty = esc(&r.message_type),
        st = r.state,
        created = time(r.created_at),
        error = esc(r.last_error.as_deref().unwrap_or("")),
    );
    if let Some(v) = &r.d365 {
        let _ = write!(
            out,
            "<h2>In D365</h2><table id=\"d365\"><tr><th>D365 state</th>{cell}</tr><tr><th>Processed</th><td>{at}</td></tr>\
             <tr><th>Result</th><td>{result}</td></tr><tr><th>Infolog</th><td id=\"d365-infolog\">{infolog}</td></tr><tr><th>Event</th><td>{event}</td></tr>{page}</table>",
            cell = verdict_cell(r),
            at = time(v.at),
            result = esc(v.result.as_deref().unwrap_or("")),
            infolog = esc(v.infolog.as_deref().unwrap_or("")),
            event = esc(&v.event_id),
            page = v.page_url.as_deref().map_or(String::new(), page_link),
        );
    }
    let form = |action: &str, label: &str, class: &str| {
        format!(
            "<form method=\"post\" action=\"/console/messages/{id}/{action}?{back}\">{csrf}<button type=\"submit\" class=\"{class}\" id=\"{action}\">{label}</button></form>",
            id = r.id,
            back = esc(back),
            csrf = csrf_field(session),
        )
    };
    let mut actions = String::new();
    let held = matches!(r.state, MessageState::Failed | MessageState::Uncertain);
    if held {
        actions.push_str(&form("retry", "Retry", ""));
    }
    if matches!(
        r.state,
        MessageState::Queued | MessageState::Failed | MessageState::Uncertain
    ) {
        actions.push_str(&form("cancel", "Cancel", "secondary"));
    }
    if r.state == MessageState::Uncertain {
        actions.push_str(&form("resolve", "Resolve (found in D365)", "secondary"));
    }
    let _ = write!(out, "<div class=\"actions\">{actions}</div>");
    if held {
        let _ = write!(
            out,
            "<h2>Edit and retry</h2><form method=\"post\" action=\"/console/messages/{id}/retry?{back}\">{csrf}\
             <textarea name=\"content\" id=\"content\">{content}</textarea><div class=\"actions\"><button type=\"submit\" id=\"edit-retry\">Edit and retry</button></div></form>",
            id = r.id,
            back = esc(back),
            csrf = csrf_field(session),
            content = esc(&content),
        );
    } else {
        let _ = write!(
            out,
            "<h2>Content</h2><pre id=\"content\">{}</pre>",
            esc(&content)
        );
    }
    out.push_str("<h2>Attempts</h2><table><tr><th>At</th><th>Outcome</th></tr>");
    for a in &r.attempts {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td></tr>",
            time(a.at),
            esc(&a.outcome)
        );
    }
    out.push_str("</table><h2>History</h2><table id=\"history\"><tr><th>At</th><th>By</th><th>Action</th><th>Detail</th></tr>");
    for c in &r.history {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            time(c.at),
            esc(&c.by),
            esc(&c.action),
            esc(c.detail.as_deref().unwrap_or(""))
        );
    }
    out.push_str("</table>");
    out
}

/// D365's MES page for a message: a link only when the event gave an `https:` URL;
/// anything else (a forged `javascript:` one) is shown as text, never followed.
fn page_link(url: &str) -> String {
    let https = reqwest::Url::parse(url).is_ok_and(|u| u.scheme() == "https");
    if https {
        format!(
            "<tr><th>MES page</th><td><a id=\"d365-page\" href=\"{u}\" rel=\"noreferrer noopener\">open in D365</a></td></tr>",
            u = esc(url)
        )
    } else {
        format!(
            "<tr><th>MES page</th><td id=\"d365-page-refused\">not a link (only https is followed): {}</td></tr>",
            esc(&crate::text::bounded(url, 200))
        )
    }
}

#[derive(Debug, Deserialize)]
struct ActionForm {
    csrf: String,
    content: Option<String>,
}

async fn message_action(
    State(state): State<ApiState>,
    logged_in: LoggedIn,
    Path((id, action)): Path<(MessageId, String)>,
    Query(back): Query<HashMap<String, String>>,
    Form(form): Form<ActionForm>,
) -> Response {
    let session = &logged_in.0;
    if let Some(refused) = logged_in.refusal(&form.csrf) {
        return refused;
    }
    let by = format!("console:{}", session.name);
    let result = match action.as_str() {
        "retry" => {
            let content = match form
                .content
                .as_deref()
                .map(serde_json::from_str::<serde_json::Value>)
            {
                None => Ok(None),
                Some(Ok(v)) => Ok(Some(v)),
                Some(Err(e)) => Err(OpError::Invalid {
                    field: None,
                    message: format!("the content is not JSON: {e}"),
                }),
            };
            match content {
                Ok(content) => state
                    .operator
                    .retry(id, content, &by)
                    .await
                    .map(|_| "queued again"),
                Err(e) => Err(e),
            }
        }
        "cancel" => state.operator.cancel(id, &by).await.map(|_| "cancelled"),
        "resolve" => state
            .operator
            .resolve(id, &by)
            .await
            .map(|_| "resolved as delivered"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let id_text = id.to_string();
    let mut params: Vec<(&str, &str)> = ["state", "order", "line"]
        .iter()
        .filter_map(|k| back.get(*k).map(|v| (*k, v.as_str())))
        .collect();
    params.push(("id", &id_text));
    let text = match &result {
        Ok(done) => format!("Message {id} {done}."),
        Err(e) => e.to_string(),
    };
    params.push((if result.is_ok() { "note" } else { "error" }, &text));
    redirect_with("/console/messages", &params)
}

async fn lines_page(
    State(state): State<ApiState>,
    logged_in: LoggedIn,
    Query(n): Query<Notes>,
) -> Response {
    let session = &logged_in.0;
    let mut body = notes(&n);
    match state.operator.lines().await {
        Err(e) => {
            let _ = write!(body, "<div class=\"error\">{}</div>", esc(&e.to_string()));
        }
        Ok(view) => {
            body.push_str("<table id=\"lines\"><tr><th>Line</th><th>Production order</th><th>Item</th><th>Operation</th><th>Resource</th><th>Since</th><th></th></tr>");
            for (line, c) in &view.lines {
                let _ = write!(
                    body,
                    "<tr><td>{l}</td><td>{o}</td><td>{i}</td><td>{op}</td><td>{r}</td><td>{s}</td><td><form method=\"post\" action=\"/console/lines/{lq}/clear\">{csrf}<button class=\"secondary\" type=\"submit\">Clear</button></form></td></tr>",
                    l = esc(line),
                    lq = esc(&super::path_segment(line)),
                    o = esc(&c.order),
                    i = esc(c.item.as_deref().unwrap_or("")),
                    op = esc(c.operation.as_deref().unwrap_or("")),
                    r = esc(c.resource.as_deref().unwrap_or("")),
                    s = c.since.map(time).unwrap_or_default(),
                    csrf = csrf_field(session),
                );
            }
            if view.lines.is_empty() {
                body.push_str("<tr><td colspan=\"7\">No line has a production order.</td></tr>");
            }
            body.push_str("</table>");
            if !view.released.is_empty() {
                body.push_str("<h2>Released orders</h2><table id=\"released\"><tr><th>Line</th><th>Production order</th><th>Item</th><th>Released</th><th>By rule</th><th></th></tr>");
                for (line, orders) in &view.released {
                    for r in orders {
                        let running = view.lines.get(line).is_some_and(|c| c.order == r.order);
                        let action = if running {
                            "running".to_string()
                        } else {
                            format!(
                                "<form method=\"post\" action=\"/console/lines\">{csrf}<input type=\"hidden\" name=\"line\" value=\"{l}\"><input type=\"hidden\" name=\"order\" value=\"{o}\"><input type=\"hidden\" name=\"item\" value=\"{i}\"><button type=\"submit\" class=\"secondary\">Run on {l}</button></form>",
                                csrf = csrf_field(session),
                                l = esc(line),
                                o = esc(&r.order),
                                i = esc(r.item.as_deref().unwrap_or("")),
                            )
                        };
                        let _ = write!(
                            body,
                            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{action}</td></tr>",
                            esc(line),
                            esc(&r.order),
                            esc(r.item.as_deref().unwrap_or("")),
                            time(r.at),
                            esc(&r.rule),
                        );
                    }
                }
                body.push_str("</table>");
            }
            if !view.open_aggregates.is_empty() {
                body.push_str("<h2>Counted, not yet reported</h2><table><tr><th>Rule</th><th>Line</th><th>Order</th><th>Quantity</th></tr>");
                for a in &view.open_aggregates {
                    let _ = write!(
                        body,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(&a.rule),
                        esc(&a.line),
                        esc(a.order.as_deref().unwrap_or("")),
                        a.quantity
                    );
                }
                body.push_str("</table>");
            }
        }
    }
    let _ = write!(
        body,
        "<h2>Set a line's order</h2><form method=\"post\" action=\"/console/lines\" class=\"filters\">{csrf}\
         <label>Line<input type=\"text\" name=\"line\" id=\"line\" required></label>\
         <label>Production order<input type=\"text\" name=\"order\" id=\"order\" required></label>\
         <label>Item<input type=\"text\" name=\"item\"></label><label>Operation<input type=\"text\" name=\"operation\"></label>\
         <label>Resource<input type=\"text\" name=\"resource\"></label><button type=\"submit\" id=\"set-line\">Set</button></form>",
        csrf = csrf_field(session)
    );
    page("Lines", "lines", Some(session), &body).into_response()
}

#[derive(Debug, Deserialize)]
struct LineForm {
    csrf: String,
    line: String,
    order: String,
    item: Option<String>,
    operation: Option<String>,
    resource: Option<String>,
}

async fn set_line(
    State(state): State<ApiState>,
    logged_in: LoggedIn,
    Form(form): Form<LineForm>,
) -> Response {
    let session = &logged_in.0;
    if let Some(refused) = logged_in.refusal(&form.csrf) {
        return refused;
    }
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let context = OrderContext {
        order: form.order.trim().to_string(),
        item: nonempty(form.item),
        operation: nonempty(form.operation),
        resource: nonempty(form.resource),
        since: None,
    };
    let line = form.line.trim().to_string();
    match state
        .operator
        .set_line(
            &line,
            Some(context.clone()),
            &format!("console:{}", session.name),
        )
        .await
    {
        Ok(_) => redirect_with(
            "/console/lines",
            &[(
                "note",
                &format!("Line {line} runs order {}.", context.order),
            )],
        ),
        Err(e) => redirect_with("/console/lines", &[("error", &e.to_string())]),
    }
}

async fn clear_line(
    State(state): State<ApiState>,
    logged_in: LoggedIn,
    Path(line): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let session = &logged_in.0;
    if let Some(refused) = logged_in.refusal(&form.csrf) {
        return refused;
    }
    match state
        .operator
        .set_line(&line, None, &format!("console:{}", session.name))
        .await
    {
        Ok(_) => redirect_with(
            "/console/lines",
            &[("note", &format!("Line {line} cleared."))],
        ),
        Err(e) => redirect_with("/console/lines", &[("error", &e.to_string())]),
    }
}

async fn sources_page(State(state): State<ApiState>, logged_in: LoggedIn) -> Response {
    let session = &logged_in.0;
    let status = match state.operator.status().await {
        Ok(s) => s,
        Err(e) => {
            let body = format!("<div class=\"error\">{}</div>", esc(&e.to_string()));
            return page("Sources", "sources", Some(session), &body).into_response();
        }
    };
    let mut body = String::from("<table id=\"sources\"><tr><th>Source</th><th>State</th><th>Since</th><th>Last event</th><th>Events</th><th>Decode errors</th><th>Last error</th></tr>");
    for s in &status.sources {
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"state-{cls}\">{st}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.id),
            s.since.map(time).unwrap_or_default(),
            s.last_event.map(time).unwrap_or_default(),
            s.events,
            s.decode_errors,
            esc(s.last_error.as_deref().unwrap_or("")),
            cls = if s.connected { "delivered" } else { "failed" },
            st = if s.connected { "connected" } else { "down" },
        );
    }
    body.push_str("</table><h2>D365</h2>");
    let _ = write!(
        body,
        "<p>{}</p>",
        esc(&status.last_d365_error.map_or_else(
            || "No problem reported.".to_string(),
            |e| format!("Last error: {e}")
        ))
    );
    body.push_str("<h2>Open alerts</h2><table id=\"alerts\"><tr><th>Since</th><th>Alert</th><th>What</th></tr>");
    for a in &status.alerts {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            time(a.since),
            esc(&a.key),
            esc(&a.text)
        );
    }
    if status.alerts.is_empty() {
        body.push_str("<tr><td colspan=\"3\">None.</td></tr>");
    }
    body.push_str("</table>");
    if let Some(up) = status.uptime_seconds {
        let _ = write!(
            body,
            "<p>mes-gateway {} running for {}.</p>",
            esc(&status.version),
            crate::config::format_duration(Duration::from_secs(up.max(0) as u64))
        );
    }
    page("Sources", "sources", Some(session), &body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            header::HeaderValue::from_str(&format!("other=1; {COOKIE}={id}")).unwrap(),
        );
        h
    }

    const TIMES: SessionTimes = SessionTimes {
        idle: Duration::from_secs(60),
        lifetime: Duration::from_secs(600),
    };

    #[test]
    fn a_session_ends_when_idle_and_the_self_reload_does_not_keep_it() {
        let sessions = Sessions::new(TIMES);
        let t0 = Instant::now();
        let id = sessions.create_at("ann".into(), t0).unwrap();
        let h = with_cookie(&id);
        // Reloads every 10 s for 50 s: alive, but the idle clock runs from the login.
        for s in (10..=50).step_by(10) {
            assert!(sessions
                .get_at(&h, false, t0 + Duration::from_secs(s))
                .is_some());
        }
        assert!(
            sessions
                .get_at(&h, false, t0 + Duration::from_secs(61))
                .is_none(),
            "reloads alone do not extend it"
        );
        // Gone for good once ended.
        assert!(sessions
            .get_at(&h, true, t0 + Duration::from_secs(62))
            .is_none());
        // An operator's own clicks do.
        let id = sessions.create_at("bob".into(), t0).unwrap();
        let h = with_cookie(&id);
        assert!(sessions
            .get_at(&h, true, t0 + Duration::from_secs(50))
            .is_some());
        assert!(sessions
            .get_at(&h, false, t0 + Duration::from_secs(100))
            .is_some());
        assert!(sessions
            .get_at(&h, false, t0 + Duration::from_secs(111))
            .is_none());
    }

    #[test]
    fn a_session_ends_at_its_lifetime_however_busy_the_operator_is() {
        let sessions = Sessions::new(TIMES);
        let t0 = Instant::now();
        let id = sessions.create_at("ann".into(), t0).unwrap();
        let h = with_cookie(&id);
        for s in (30..600).step_by(30) {
            assert!(
                sessions
                    .get_at(&h, true, t0 + Duration::from_secs(s))
                    .is_some(),
                "{s}"
            );
        }
        assert!(sessions
            .get_at(&h, true, t0 + Duration::from_secs(600))
            .is_none());
    }

    #[test]
    fn ending_all_sessions_logs_everyone_out() {
        let sessions = Sessions::new(TIMES);
        let t0 = Instant::now();
        let a = sessions.create_at("a".into(), t0).unwrap();
        let b = sessions.create_at("b".into(), t0).unwrap();
        assert_eq!(sessions.end_all(), 2);
        for id in [a, b] {
            assert!(sessions.get_at(&with_cookie(&id), true, t0).is_none());
        }
    }

    #[test]
    fn logins_from_one_address_are_paused_after_repeated_failures_with_a_doubling_pause() {
        let throttle = LoginThrottle::default();
        let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let other: std::net::IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..LOGIN_FREE_FAILURES - 1 {
            assert_eq!(throttle.check(ip, t0), Attempt::Allowed, "{i}");
            throttle.failed(ip, t0);
        }
        assert_eq!(throttle.check(ip, t0), Attempt::Allowed);
        throttle.failed(ip, t0);
        assert_eq!(throttle.check(ip, t0), Attempt::Wait(LOGIN_FIRST_PAUSE));
        assert_eq!(throttle.check(other, t0), Attempt::Allowed, "per address");
        let t1 = t0 + LOGIN_FIRST_PAUSE;
        assert_eq!(throttle.check(ip, t1), Attempt::Allowed);
        throttle.failed(ip, t1);
        assert_eq!(throttle.check(ip, t1), Attempt::Wait(LOGIN_FIRST_PAUSE * 2));
        // Capped.
        let mut t = t1;
        for _ in 0..20 {
            t += LOGIN_MAX_PAUSE;
            throttle.failed(ip, t);
        }
        assert_eq!(throttle.check(ip, t), Attempt::Wait(LOGIN_MAX_PAUSE));
        assert_eq!(
            throttle.failures.load(std::sync::atomic::Ordering::Relaxed),
            u64::from(LOGIN_FREE_FAILURES) + 21
        );
        assert!(
            throttle
                .throttled
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 3
        );
        // A success forgets the address.
        throttle.succeeded(ip);
        assert_eq!(throttle.check(ip, t), Attempt::Allowed);
    }

    #[test]
    fn only_an_https_link_from_d365_is_rendered_as_a_link() {
        assert!(
            page_link("https://contoso.operations.dynamics.com/?mi=JmgMES3P")
                .contains("<a id=\"d365-page\" href=\"https://contoso")
        );
        for hostile in [
            "javascript:alert(document.domain)",
            "JAVASCRIPT:alert(1)",
            " javascript:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "http://contoso.example/",
            "//evil.example/",
        ] {
            let html = page_link(hostile);
            assert!(!html.contains("<a "), "{hostile}: {html}");
            assert!(!html.contains("<script>"), "{hostile}: {html}");
        }
    }
}
