//! The console's pages: the messages (a grid like D365's MES integration page and a detail
//! pane with the actions), the lines with their orders, and the sources with their health.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use crate::api::ApiState;
use crate::operator::OpError;
use crate::outbox::{ListFilter, MessageId, Record, State as MessageState};
use crate::rules::state::OrderContext;

use super::auth::{CsrfForm, LoggedIn, Session};
use super::*;

#[derive(Debug, Deserialize)]
pub(super) struct MessagesQuery {
    state: Option<String>,
    order: Option<String>,
    line: Option<String>,
    id: Option<MessageId>,
    note: Option<String>,
    error: Option<String>,
}

pub(super) async fn messages_page(
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
    // Where each uncertain message's evidence stands (d365/evidence.rs), once for the grid.
    let evidence: std::collections::BTreeMap<MessageId, (usize, usize)> = state
        .live
        .get()
        .dispatch
        .as_ref()
        .map(|d| d.evidence.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default();
    for r in &page_data.messages {
        let selected = if q.id == Some(r.id) {
            " class=\"selected\""
        } else {
            ""
        };
        let _ = write!(
            grid,
            "<tr{selected} data-id=\"{id}\"><td><a href=\"/console/messages?{link}\" id=\"open-{id}\">{id}</a></td><td>{order}</td><td title=\"{ty}\">{short_ty}</td><td>{line}</td><td class=\"state-{st}\">{st}{group}</td>{verdict}<td>{created}</td><td>{attempts}</td><td>{error}</td></tr>",
            id = r.id,
            verdict = verdict_cell(r),
            link = esc(&link_query(r.id)),
            order = esc(&r.production_order),
            ty = esc(&r.message_type),
            // The grid is narrow: "ReportFinished" says it; the full name is the tooltip.
            short_ty = esc(r.message_type.strip_prefix("ProdProductionOrder").unwrap_or(&r.message_type)),
            line = esc(r.line.as_deref().unwrap_or("")),
            st = r.state,
            group = group_mark(r) + &evidence_mark(r, &evidence),
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
            Ok(r) => {
                // Where an uncertain message's evidence stands (d365/evidence.rs).
                let evidence = state.live.get().dispatch.as_ref().and_then(|d| {
                    d.evidence
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&r.id)
                        .copied()
                });
                let mut pane = detail_pane(&r, session, &link_query(id));
                if let (Some((seen, needed)), MessageState::Uncertain) = (evidence, r.state) {
                    let _ = write!(
                        pane,
                        "<p id=\"evidence\">Waiting for D365 to process messages sent after it: {seen} of {needed} seen. Then it is sent again on that evidence, or resolved by D365's event for it.</p>"
                    );
                }
                pane
            }
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

/// An uncertain message's evidence (d365/evidence.rs), beside the state in the grid.
fn evidence_mark(
    r: &Record,
    board: &std::collections::BTreeMap<MessageId, (usize, usize)>,
) -> String {
    match (r.state, board.get(&r.id)) {
        (MessageState::Uncertain, Some((seen, needed))) => format!(
            " <span class=\"evidence\" title=\"waiting for D365 to process messages sent after it: {seen} of {needed} seen\">(evidence {seen}/{needed})</span>"
        ),
        _ => String::new(),
    }
}

/// A joined request's part (outbox join.rs), beside the state in the grid.
fn group_mark(r: &Record) -> String {
    let (Some(summary), Some(tag)) = (r.group_summary(), r.group_tag()) else {
        return String::new();
    };
    format!(
        " <span class=\"group\" title=\"{}\">({})</span>",
        esc(&summary),
        esc(&tag)
    )
}

/// D365's verdict on a message as a table cell: what D365's processing made of it.
pub(super) fn verdict_cell(r: &Record) -> String {
    match &r.d365 {
        None => "<td class=\"d365-none\"></td>".to_string(),
        Some(v) if v.failed => format!(
            "<td class=\"d365-failed\" title=\"{title}\">failed in D365</td>",
            title = esc(v.infolog.as_deref().or(v.result.as_deref()).unwrap_or(""))
        ),
        Some(v) => format!("<td class=\"d365-ok\">{}</td>", esc(&v.state)),
    }
}

pub(super) fn detail_pane(r: &Record, session: &Session, back: &str) -> String {
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
    if let Some(summary) = r.group_summary() {
        let _ = write!(
            out,
            "<h2>Joined request</h2><p id=\"group\">{}</p>",
            esc(&summary)
        );
        if let Some(crate::outbox::Group::Lead { content, .. }) = &r.group {
            let posted = serde_json::from_str::<serde_json::Value>(content)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_else(|| content.clone());
            let _ = write!(
                out,
                "<h3>Content of the request</h3><pre id=\"request-content\">{}</pre>",
                esc(&posted)
            );
        }
    }
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
    // A joined request is sent again as it was: its messages are not edited one by one.
    if held && r.group.is_none() {
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
pub(super) fn page_link(url: &str) -> String {
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
pub(super) struct ActionForm {
    csrf: String,
    content: Option<String>,
}

pub(super) async fn message_action(
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

pub(super) async fn lines_page(
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
                    lq = esc(&crate::api::path_segment(line)),
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
pub(super) struct LineForm {
    csrf: String,
    line: String,
    order: String,
    item: Option<String>,
    operation: Option<String>,
    resource: Option<String>,
}

pub(super) async fn set_line(
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

pub(super) async fn clear_line(
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

pub(super) async fn sources_page(State(state): State<ApiState>, logged_in: LoggedIn) -> Response {
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
