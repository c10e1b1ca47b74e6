//! Joining an order's queued messages into one request: D365 allows each integration
//! about 20 requests a second (docs/d365-api.md, "Service protection limits"), so after an
//! outage a backlog sent one message per request drains at D365's pace, for hours. A
//! report-as-finished, picking-list or route-card message carries a list of lines, and
//! consecutive messages of one order that differ only in their lines can go out as one
//! message whose lines are theirs, in order.
//!
//! # What is joined
//!
//! When the dispatcher marks a lane head `sending` ([`plan`], from `plan_marks`), the
//! messages after it in its lane join its request while each one
//! - has the same message type, of a type the [`JoinPolicy`] joins;
//! - was never touched: queued, never sent (no attempt, never marked, never resent), never
//!   edited, no verdict, in no group — the head too;
//! - has the same content apart from the lines (every header field equal);
//! - keeps the request within the policy's line cap.
//!
//! The first message that fails one of these ends the group: a Start, an End or another
//! type between two reports is never joined across, and order is kept. Nothing is added
//! up or changed: the request's lines are the members' lines as they were built.
//!
//! # A group is one request
//!
//! The head becomes the group's *lead* ([`Group::Lead`]: the members and the joined
//! content, exactly as posted) and each other message a *member* ([`Group::Member`]), in
//! the same write as the `sending` marks, before the request leaves. From then on the
//! group is fixed: every outcome of the lead's request is recorded on every member in the
//! same write (settle.rs), an operator's action on any of them acts on all (actions.rs),
//! and D365's verdict on the joined content is recorded on all (verdict.rs). A member's
//! history names the lead, whose request carried it.

use serde_json::{Map, Value};

use super::record::{Change, Group};
use super::{lanes, record_in, verdict, Record, State, GATEWAY};
use crate::message::{lines_field, TYPE_REPORT_FINISHED, TYPE_ROUTE_CARD};
use crate::store::kv::Get;
use crate::store::StoreError;

/// Which message types are joined, and the most lines a request may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinPolicy {
    types: Vec<String>,
    max_lines: usize,
}

impl JoinPolicy {
    /// D365 posts one message in one transaction: a line it cannot post fails the whole
    /// message, so a request of many lines holds them all back. 100 lines keep that within
    /// what an operator can look through on D365's message page, and still make a
    /// backlog cost a hundredth of the requests.
    pub const DEFAULT_MAX_LINES: usize = 100;

    /// Joined unless configured otherwise: report as finished and route cards. Their lines
    /// book quantities and time against the order's own item and operations, so what fails
    /// one of them (the order's status, a closed period, an unknown operation) fails its
    /// neighbours alike. Picking-list lines each consume another item, batch or location,
    /// and one short of stock would hold back every other consumption: not joined.
    pub const DEFAULT_TYPES: [&'static str; 2] = [TYPE_REPORT_FINISHED, TYPE_ROUTE_CARD];

    /// Joins `types` (each must be a type with lines) up to `max_lines` lines a request.
    pub fn new(types: impl IntoIterator<Item = String>, max_lines: usize) -> JoinPolicy {
        JoinPolicy {
            types: types
                .into_iter()
                .filter(|t| lines_field(t).is_some())
                .collect(),
            max_lines,
        }
    }

    /// Nothing is joined: every message goes out on its own.
    pub fn off() -> JoinPolicy {
        JoinPolicy::new([], JoinPolicy::DEFAULT_MAX_LINES)
    }

    pub fn joins(&self, message_type: &str) -> bool {
        self.max_lines > 1 && self.types.iter().any(|t| t == message_type)
    }

    pub fn types(&self) -> &[String] {
        &self.types
    }

    pub fn max_lines(&self) -> usize {
        self.max_lines
    }
}

impl Default for JoinPolicy {
    fn default() -> Self {
        JoinPolicy::new(
            JoinPolicy::DEFAULT_TYPES.map(String::from),
            JoinPolicy::DEFAULT_MAX_LINES,
        )
    }
}

/// A content as a JSON object and the number of lines in `field`, when it has that shape.
fn parse(content: &str, field: &str) -> Option<(Map<String, Value>, usize)> {
    match serde_json::from_str::<Value>(content).ok()? {
        Value::Object(map) => {
            let lines = map.get(field)?.as_array()?.len();
            Some((map, lines))
        }
        _ => None,
    }
}

/// Whether two contents are equal in every field but the lines.
fn same_header(a: &Map<String, Value>, b: &Map<String, Value>, field: &str) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| k == field || b.get(k) == Some(v))
}

/// Whether `r` was never sent nor changed since it was created: the only messages a
/// group may take (module doc).
fn untouched(r: &Record) -> bool {
    r.state == State::Queued
        && r.attempt_count == 0
        && r.group.is_none()
        && r.resent_unreceived.is_none()
        && r.d365.is_none()
        && r.history.iter().all(|c| c.action == "created")
}

/// Joins into `lead`'s request the messages after it in its lane that may join it
/// (module doc): sets the lead's group and returns the members, each with its group and
/// a history entry naming the lead. Returns nothing, and changes nothing, when no message
/// may join. `rx` sees the transaction that will write them.
pub(super) fn plan(
    rx: &impl Get,
    lead: &mut Record,
    policy: &JoinPolicy,
    now: jiff::Timestamp,
) -> Result<Vec<Record>, StoreError> {
    let mut members = Vec::new();
    if !policy.joins(&lead.message_type) || !untouched(lead) {
        return Ok(members);
    }
    // Most heads have nothing behind them: look before parsing anything.
    let Some(mut next) = lanes::after(rx, lead.id)? else {
        return Ok(members);
    };
    let Some(field) = lines_field(&lead.message_type) else {
        return Ok(members);
    };
    let Some((mut joined, mut lines)) = parse(&lead.content, field) else {
        return Ok(members);
    };
    let mut all_lines: Vec<Value> = Vec::new();
    loop {
        if lines >= policy.max_lines {
            break;
        }
        // A member that cannot be read ends the group; reading it on its own turn says why.
        let Ok(r) = record_in(rx, next) else {
            break;
        };
        if r.message_type != lead.message_type
            || r.production_order != lead.production_order
            || !untouched(&r)
        {
            break;
        }
        let Some((content, more)) = parse(&r.content, field) else {
            break;
        };
        if !same_header(&joined, &content, field) || lines + more > policy.max_lines {
            break;
        }
        if let Some(Value::Array(l)) = content.get(field) {
            all_lines.extend(l.iter().cloned());
        }
        lines += more;
        members.push(r);
        match lanes::after(rx, next)? {
            Some(id) => next = id,
            None => break,
        }
    }
    if members.is_empty() {
        return Ok(members);
    }
    // The lead's own lines first, then the members' in lane order; every other field, and
    // the fields' order, as the lead has them.
    if let Some(Value::Array(own)) = joined.get_mut(field) {
        own.append(&mut all_lines);
    }
    let content = Value::Object(joined).to_string();
    let ids: Vec<_> = members.iter().map(|m| m.id).collect();
    let listed = ids
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    lead.group = Some(Group::Lead {
        members: ids,
        digest: lead
            .content_digest
            .map(|_| verdict::content_digest(&lead.message_type, &content)),
        content,
        lines: u32::try_from(lines).unwrap_or(u32::MAX),
    });
    lead.history.push(Change {
        at: now,
        by: GATEWAY.to_string(),
        action: "joined: its request carries later messages of its order".into(),
        detail: Some(format!("messages {listed}; {lines} lines in all")),
    });
    for m in &mut members {
        m.group = Some(Group::Member { lead: lead.id });
        m.history.push(Change {
            at: now,
            by: GATEWAY.to_string(),
            action: format!("joined into the request of message {}", lead.id),
            detail: Some(format!(
                "with messages {}, {listed}; {lines} lines in all",
                lead.id
            )),
        });
    }
    Ok(members)
}
