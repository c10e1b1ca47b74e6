//! What D365 did with the messages it received: its "message processor message
//! processed" business events, matched to the messages the gateway sent (reconciliation).
//!
//! A 200 from SendMessage only means "queued" (docs/d365-api.md, "Sending a message"); D365 processes the
//! message later and may mark it Failed, which holds every later message of its order
//! inside D365. The event that says so carries the queue, the message type and the exact
//! content D365 received, and nothing else that names the message: so the outbox keeps a
//! content index and matches on it.
//!
//! # On disk
//!
//! ```text
//! table "contents":   key = digest(type, canonical content) as u64 BE ++ message id (u64 BE), no value
//!                    — written with the message (commit) and after an edit; a key whose
//!                    record is gone or whose content differs is stale and removed when met
//! table "rejected":   key = message id: messages whose latest verdict is Failed in D365
//!                    (what the failed-message alert reads without scanning)
//! table "unmatched":  key = time key ++ source ++ "\0" ++ event id
//!                    value = the event's JSON — events that match no message, kept for
//!                    inspection and forgotten with the event ids (`remember`)
//! ```
//!
//! # Invariants
//!
//! - A verdict is applied in the same transaction as the event's id is remembered: a
//!   redelivered event is recognised and never applied twice.
//! - Matching is exact: the index only finds candidates; a candidate counts when its
//!   message type and content equal the event's (compared as canonical JSON — keys
//!   sorted, no spacing — in case D365 reformats it).
//! - Identical messages (the same content twice) get verdicts in order: D365 processes an
//!   order's messages in the order received and holds the later ones while one is Failed,
//!   so a verdict belongs to the oldest candidate still Failed in D365, else the oldest
//!   with no verdict yet, else the newest (D365 processed it again).
//! - An `uncertain` message D365 reports as received, in any state, did reach D365: it
//!   becomes `delivered` (leaving its lane), and its history says why.
//! - A verdict only changes a message that could have reached D365 (sent at least
//!   once); an event naming only never-sent messages is kept as unmatched, with a warning.
//! - The unmatched list keeps at most [`MAX_UNMATCHED`] events, the newest, each with at
//!   most [`MAX_KEPT_PAYLOAD`] bytes of its payload.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::id_after_stamp;
use super::{record_in, Change, MessageId, Record, State};
use crate::store::kv::{Kv, Prefix, T};
use crate::store::{storage, time_key, StoreError};

/// D365's verdict on one message, as recorded on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct D365Verdict {
    /// When D365 processed it (the event's time).
    pub at: jiff::Timestamp,
    /// D365's message state as it came (`Processed`, `Failed`, `Cancelled`, …).
    pub state: String,
    /// Failed in D365: the order's later messages are held there.
    pub failed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// D365's infolog: why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infolog: Option<String>,
    /// The business event that said so.
    pub event_id: String,
    /// The message on D365's MES page, when the event gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_url: Option<String>,
}

/// A "message processed" business event, as the outbox needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedEvent {
    pub source: Arc<str>,
    pub queue: String,
    pub message_type: String,
    /// The `_messageContent` D365 received.
    pub content: String,
    pub verdict: D365Verdict,
    /// The whole event as it came, kept when it matches nothing.
    pub payload: String,
}

/// What became of one processed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// Recorded on the message; `resolved` when it was `uncertain` and is now delivered.
    Matched {
        id: super::MessageId,
        failed: bool,
        resolved: bool,
    },
    /// No message of the gateway has this type and content (or another queue): kept in
    /// the unmatched list.
    Unmatched { reason: String },
}

/// The content index's digest: 64-bit FNV-1a over type, a zero byte and content. Stable
/// across builds (it is stored on disk).
pub(super) fn digest(message_type: &str, content: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in message_type.bytes().chain([0u8]).chain(content.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub(super) fn content_key(digest: u64, id: super::MessageId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&digest.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The index's digest of a message: over its type and its content in canonical form, so
/// a content D365 reformats (spacing, key order) still finds its message.
pub(super) fn content_digest(message_type: &str, content: &str) -> u64 {
    match canonical(content) {
        Some(c) => digest(message_type, &c),
        None => digest(message_type, content),
    }
}

/// Compact JSON with every object's keys sorted, or `None` when it is not JSON. (The
/// gateway writes its fields in D365's documented order, not sorted.)
pub(super) fn canonical(content: &str) -> Option<String> {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(
                    entries.into_iter().map(|(k, v)| (k, sorted(v))).collect(),
                )
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(sorted).collect())
            }
            other => other,
        }
    }
    serde_json::from_str::<serde_json::Value>(content)
        .ok()
        .map(|v| sorted(v).to_string())
}

/// Whether a stored content is the one D365 reports.
pub(super) fn same_content(stored: &str, reported: &str) -> bool {
    stored == reported || canonical(stored).is_some_and(|c| Some(c) == canonical(reported))
}

pub(super) fn unmatched_key(at: jiff::Timestamp, source: &str, event_id: &str) -> Vec<u8> {
    let mut k = time_key(at).to_vec();
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(event_id.as_bytes());
    k
}

/// A processed event that matched no message, as kept for inspection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmatchedEvent {
    /// When the gateway received it.
    pub received_at: jiff::Timestamp,
    pub source: String,
    pub event_id: String,
    pub reason: String,
    pub queue: String,
    pub message_type: String,
    pub state: String,
    /// The event as it came.
    pub payload: serde_json::Value,
}

/// What applying a batch of processed events changes, read before the transaction that
/// writes it (under the outbox's transition lock, so nobody changes these records
/// meanwhile).
#[derive(Default)]
pub(super) struct Plan {
    /// Changed records and their state before.
    pub updated: Vec<(Record, State)>,
    /// Keys and values for the unmatched table.
    pub unmatched: Vec<(Vec<u8>, Vec<u8>)>,
    /// Content keys whose record is gone or holds another content now.
    pub stale: Vec<[u8; 16]>,
    pub reconciled: Vec<Reconciled>,
}

/// The most unmatched events kept: each may hold up to a whole event (256 KiB), and a
/// flood of forged or foreign events must not fill the disk. The oldest go first.
pub const MAX_UNMATCHED: u64 = 10_000;

/// The most bytes of an unmatched event's payload kept: enough to see what it was, and
/// with [`MAX_UNMATCHED`] a bound on the list's disk (about 160 MiB at worst).
pub const MAX_KEPT_PAYLOAD: usize = 16 * 1024;

/// An unmatched event's payload as kept: its JSON when small enough, else its beginning
/// as text with how much was left out.
fn kept_payload(payload: &str) -> serde_json::Value {
    if payload.len() <= MAX_KEPT_PAYLOAD {
        return serde_json::from_str(payload)
            .unwrap_or_else(|_| serde_json::Value::String(payload.to_string()));
    }
    let mut cut = MAX_KEPT_PAYLOAD;
    while !payload.is_char_boundary(cut) {
        cut -= 1;
    }
    serde_json::Value::String(format!(
        "{}… ({} more bytes not kept)",
        &payload[..cut],
        payload.len() - cut
    ))
}

/// Who D365 is in a message's history.
pub const D365: &str = "d365";

/// Whether D365 can have received `record`: it was sent at least once (a request may
/// have left), or D365 already said so. A verdict may change nothing else: an event
/// naming a queued message's content is forged or belongs to another sender.
fn could_have_reached_d365(record: &Record) -> bool {
    record.attempt_count > 0
        || record.d365.is_some()
        || matches!(record.state, State::Sending | State::Uncertain)
}

pub(super) fn plan(kv: &Kv, events: &[ProcessedEvent]) -> Result<Plan, StoreError> {
    let mut plan = Plan::default();
    // Records already changed by an earlier event of this batch, by id.
    let mut working: BTreeMap<MessageId, (Record, State)> = BTreeMap::new();
    let mut touched: BTreeSet<MessageId> = BTreeSet::new();
    let now = jiff::Timestamp::now();
    for e in events {
        let digest = content_digest(&e.message_type, &e.content);
        let mut candidates: Vec<MessageId> = Vec::new();
        // Same content, but never sent: D365 cannot be speaking of these.
        let mut never_sent: Vec<MessageId> = Vec::new();
        let under_digest = Prefix::new(&digest.to_be_bytes());
        let mut indexed = Vec::new();
        kv.read()?
            .scan(T::Contents, under_digest.span(), false, |k, _| {
                indexed.extend(id_after_stamp(k));
                Ok(true)
            })?;
        for id in indexed {
            let record = match working.get(&id) {
                Some((r, _)) => r.clone(),
                None => match record_in(&kv.read()?, id) {
                    Ok(r) => r,
                    Err(StoreError::NotFound(_)) => {
                        plan.stale.push(content_key(digest, id));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(message_id = id, error = %e, "A message the content index names cannot be read; not matched.");
                        continue;
                    }
                },
            };
            // A key of content its message never posted (a joined request's lead's or
            // member's own, join.rs) is stale too.
            if record.sent_digest() != Some(digest) {
                plan.stale.push(content_key(digest, id));
                continue;
            }
            if record.message_type == e.message_type
                && same_content(record.request_content(), &e.content)
            {
                if !could_have_reached_d365(&record) {
                    never_sent.push(id);
                    continue;
                }
                working.entry(id).or_insert_with(|| {
                    let old = record.state;
                    (record, old)
                });
                candidates.push(id);
            }
        }
        let verdict_of = |id: &MessageId| working.get(id).and_then(|(r, _)| r.d365.as_ref());
        let chosen = candidates
            .iter()
            .find(|id| verdict_of(id).is_some_and(|v| v.failed))
            .or_else(|| candidates.iter().find(|id| verdict_of(id).is_none()))
            .or_else(|| candidates.last())
            .copied();
        let Some(id) = chosen else {
            let reason = if never_sent.is_empty() {
                "no message of the gateway has this type and content".to_string()
            } else {
                tracing::warn!(source = %crate::text::for_log(&e.source), event = %crate::text::for_log(&e.verdict.event_id),
                    messages = ?never_sent, "A D365 event names the content of messages the gateway never sent; kept as unmatched, not applied.");
                format!(
                    "the message(s) with this type and content ({}) were never sent to D365",
                    never_sent
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let kept = UnmatchedEvent {
                received_at: now,
                source: e.source.to_string(),
                event_id: e.verdict.event_id.clone(),
                reason: reason.clone(),
                queue: e.queue.clone(),
                message_type: e.message_type.clone(),
                state: e.verdict.state.clone(),
                payload: kept_payload(&e.payload),
            };
            let bytes = serde_json::to_vec(&kept).map_err(storage)?;
            plan.unmatched
                .push((unmatched_key(now, &e.source, &e.verdict.event_id), bytes));
            plan.reconciled.push(Reconciled::Unmatched { reason });
            continue;
        };
        // `chosen` came from `candidates`, every one of which is in `working`.
        let Some((r, _)) = working.get_mut(&id) else {
            continue;
        };
        let v = &e.verdict;
        let members = r.members().to_vec();
        let resolved = apply_verdict(r, v, now);
        touched.insert(id);
        // A joined request's verdict is every member's (join.rs).
        for m in members {
            let member = match working.get_mut(&m) {
                Some((member, _)) => member,
                None => match record_in(&kv.read()?, m) {
                    Ok(member) => {
                        let old = member.state;
                        &mut working.entry(m).or_insert((member, old)).0
                    }
                    Err(e) => {
                        tracing::warn!(message_id = m, lead = id, error = %e, "A member of a joined request cannot be read; D365's verdict is not recorded on it.");
                        continue;
                    }
                },
            };
            if member.lead() == id {
                apply_verdict(member, v, now);
                touched.insert(m);
            }
        }
        plan.reconciled.push(Reconciled::Matched {
            id,
            failed: v.failed,
            resolved,
        });
    }
    plan.updated = working
        .into_values()
        .filter(|(r, _)| touched.contains(&r.id))
        .collect();
    Ok(plan)
}

/// Records D365's verdict `v` on `r`; whether it resolved an uncertain message.
fn apply_verdict(r: &mut Record, v: &D365Verdict, now: jiff::Timestamp) -> bool {
    let id = r.id;
    let detail = match (&v.infolog, &v.result) {
        (Some(log), _) => Some(format!("{} (event {}): {log}", v.state, v.event_id)),
        (None, Some(result)) => Some(format!("{} (event {}): {result}", v.state, v.event_id)),
        (None, None) => Some(format!("{} (event {})", v.state, v.event_id)),
    };
    // Sent again because D365's events showed it never arrived (d365/evidence.rs):
    // a verdict before the second copy left means the first did arrive after all (the
    // second is not sent); one while it is on the wire, or a second verdict after it,
    // means D365 may have it twice.
    if r.resent_unreceived.is_some() {
        r.verdicts_since_resend += 1;
        let twice = r.state == State::Sending || r.verdicts_since_resend >= 2;
        if twice && !r.duplicate {
            r.duplicate = true;
            tracing::error!(message_id = id, order = %crate::text::for_log(&r.production_order), event = %crate::text::for_log(&v.event_id),
                "D365 reported a message processed that the gateway had judged never received and sent again: D365 may have it twice. Reverse the second report in D365.");
            r.history.push(Change {
                at: now,
                by: D365.to_string(),
                action: "DUPLICATE in D365: the first copy arrived after all".into(),
                detail: Some(format!(
                    "event {} for the content sent again on {}: reverse the second report in D365",
                    v.event_id,
                    r.resent_unreceived
                        .map(|t| t.to_string())
                        .unwrap_or_default()
                )),
            });
        }
    }
    let first_copy_after_all = r.resent_unreceived.is_some() && r.state == State::Queued;
    let resolved = r.state == State::Uncertain;
    if first_copy_after_all {
        r.retry_at = None;
        r.change(
            State::Delivered,
            D365,
            "delivered: D365 had the first copy after all; not sent again",
            detail,
        );
    } else if resolved {
        r.last_error = None;
        r.change(
            State::Delivered,
            D365,
            "resolved as delivered: D365 reports it received",
            detail,
        );
    } else {
        // The state stays; `updated_at` too (a delivered record's done key holds it).
        let action = if v.failed {
            "failed in D365"
        } else {
            "processed in D365"
        };
        r.history.push(Change {
            at: now,
            by: D365.to_string(),
            action: action.to_string(),
            detail,
        });
    }
    r.d365 = Some(v.clone());
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_unmatched_payload_is_kept_cut_and_says_so() {
        let small = r#"{"EventId":"E1"}"#;
        assert_eq!(kept_payload(small)["EventId"], "E1");
        let big = format!("{{\"x\":\"{}\"}}", "é".repeat(MAX_KEPT_PAYLOAD));
        let kept = kept_payload(&big);
        let text = kept.as_str().unwrap();
        assert!(text.len() < MAX_KEPT_PAYLOAD + 100, "{}", text.len());
        assert!(
            text.ends_with("more bytes not kept)"),
            "{}",
            &text[text.len() - 40..]
        );
    }

    #[test]
    fn digest_is_pinned_and_separates_type_from_content() {
        // Pinned: the digest is stored on disk and must not change between versions.
        assert_eq!(digest("A", "{}"), digest("A", "{}"));
        assert_ne!(digest("AB", "{}"), digest("A", "B{}"));
        assert_eq!(digest("", ""), 0xaf63_bd4c_8601_b7df);
    }

    #[test]
    fn reformatted_json_is_the_same_content() {
        assert!(same_content(
            r#"{"b":1,"a":"x"}"#,
            "{ \"a\": \"x\",\n \"b\": 1 }"
        ));
        assert!(!same_content(r#"{"b":1,"a":"x"}"#, r#"{"a":"x","b":2}"#));
        assert!(same_content("not json", "not json"));
        assert!(!same_content("not json", "not  json"));
        assert_eq!(
            content_digest("T", r#"{"b":[{"d":1,"c":2}], "a":1}"#),
            content_digest("T", r#"{"a":1,"b":[{"c":2,"d":1}]}"#)
        );
        assert_ne!(content_digest("T", "{}"), content_digest("U", "{}"));
    }
}
