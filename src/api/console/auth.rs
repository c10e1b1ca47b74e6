//! Who may use the console: sessions (a cookie and an anti-forgery token each, ended by
//! idleness, age or a token rotation), the login and logout handlers, and the throttle on
//! failed logins per client address.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use crate::api::config::SessionTimes;
use crate::api::serve::Peer;
use crate::api::ApiState;

use super::*;

#[derive(Debug, Clone)]
pub(super) struct Session {
    pub(super) csrf: String,
    pub(super) name: String,
    pub(super) created: Instant,
    pub(super) last_used: Instant,
}

/// The console's logged-in sessions (in memory: a restart logs everyone out).
#[derive(Debug, Default)]
pub struct Sessions {
    pub(super) times: SessionTimes,
    pub(super) open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(times: SessionTimes) -> Sessions {
        Sessions {
            times,
            open: Mutex::default(),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn alive(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.last_used) < self.times.idle
            && now.duration_since(s.created) < self.times.lifetime
    }

    pub(super) fn create(&self, name: String) -> Option<String> {
        self.create_at(name, Instant::now())
    }

    pub(super) fn create_at(&self, name: String, now: Instant) -> Option<String> {
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
    pub(super) fn get(&self, headers: &HeaderMap, activity: bool) -> Option<(String, Session)> {
        self.get_at(headers, activity, Instant::now())
    }

    pub(super) fn get_at(
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

    pub(super) fn end(&self, id: &str) {
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
    pub(super) addresses: Mutex<HashMap<std::net::IpAddr, Failures>>,
    pub failures: std::sync::atomic::AtomicU64,
    pub throttled: std::sync::atomic::AtomicU64,
}

/// Wrong tokens allowed from one address before it is slowed down.
pub const LOGIN_FREE_FAILURES: u32 = 5;
/// The first pause after the free failures; doubles with each further failure.
pub const LOGIN_FIRST_PAUSE: Duration = Duration::from_secs(2);
pub const LOGIN_MAX_PAUSE: Duration = Duration::from_secs(300);
/// Addresses tracked at once; beyond it the one that failed longest ago is forgotten.
pub(super) const MAX_TRACKED_ADDRESSES: usize = 4096;

#[derive(Debug, Clone, Copy)]
pub(super) struct Failures {
    pub(super) count: u32,
    pub(super) last: Instant,
    /// No attempt before this.
    pub(super) until: Option<Instant>,
    /// This pause was logged already.
    pub(super) logged: bool,
}

/// What the throttle says of a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Allowed,
    /// Wait this long.
    Wait(Duration),
}

impl LoginThrottle {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<std::net::IpAddr, Failures>> {
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
pub(super) struct LoggedIn(pub(super) Session);

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
    pub(super) fn refusal(&self, csrf: &str) -> Option<Response> {
        (!crate::api::constant_time_eq(self.0.csrf.as_bytes(), csrf.as_bytes())).then(|| {
            (
                StatusCode::FORBIDDEN,
                "the form is stale or forged: reload the page",
            )
                .into_response()
        })
    }
}

/// 32 random bytes from the system's generator, as hex.
pub(super) fn random_hex() -> Option<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    Some(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

pub(super) async fn login_page(State(state): State<ApiState>) -> Html<String> {
    login_form(&state, None)
}

pub(super) fn login_form(state: &ApiState, error: Option<&str>) -> Html<String> {
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
pub(super) struct LoginForm {
    pub(super) name: String,
    pub(super) token: String,
}

pub(super) async fn login(
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
pub(super) struct CsrfForm {
    pub(super) csrf: String,
}

pub(super) async fn logout(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some((id, session)) = state.sessions.get(&headers, true) {
        if crate::api::constant_time_eq(session.csrf.as_bytes(), form.csrf.as_bytes()) {
            state.sessions.end(&id);
        }
    }
    (
        [(header::SET_COOKIE, format!("{COOKIE}=; Path=/; Max-Age=0"))],
        Redirect::to("/console/login"),
    )
        .into_response()
}
