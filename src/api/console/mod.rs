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

mod auth;
mod pages;

use auth::{login, login_page, logout, Session};
use pages::{clear_line, lines_page, message_action, messages_page, set_line, sources_page};

pub use auth::{
    Attempt, LoginThrottle, Sessions, LOGIN_FIRST_PAUSE, LOGIN_FREE_FAILURES, LOGIN_MAX_PAUSE,
};

use std::fmt::Write as _;

use axum::http::header;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use super::ApiState;

const COOKIE: &str = "mesgw_session";
/// How often the pages reload themselves (unless an edit is under way).
const REFRESH_SECONDS: u32 = 10;
/// The query parameter the page's self-reload adds: such a request does not count as
/// the operator's activity.
const REFRESH_PARAM: &str = "refresh";
const GRID_ROWS: usize = 200;
/// The most sessions kept at once; a new login beyond it ends the least recently used.
const MAX_SESSIONS: usize = 256;

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

#[cfg(test)]
mod tests;
