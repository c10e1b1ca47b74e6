//! What the operator service answers with: plain data, serialised as JSON by the API and
//! the socket and printed as tables by the CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::alert::Alert;
use crate::outbox::{MessageId, Outbox, Record, State, WriteKind, WriteSummary};
use crate::rules::state::{EngineState, OrderContext, ReleasedOrder};

use super::Running;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessagePage {
    pub messages: Vec<Record>,
    /// The cursor of the next page; `None` on the last.
    pub next: Option<MessageId>,
    /// The whole outbox's count per state.
    pub counts: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenAggregate {
    pub rule: String,
    pub line: String,
    pub order: Option<String>,
    pub quantity: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinesView {
    pub lines: BTreeMap<String, OrderContext>,
    pub open_aggregates: Vec<OpenAggregate>,
    /// Per line, the orders D365 released for it (rules' `release`), oldest first.
    #[serde(default)]
    pub released: BTreeMap<String, Vec<ReleasedOrder>>,
}

impl LinesView {
    pub fn from_state(state: &EngineState) -> LinesView {
        LinesView {
            lines: state.contexts.clone(),
            released: state.released.clone(),
            open_aggregates: state
                .accumulators
                .values()
                .map(|a| OpenAggregate {
                    rule: a.rule.clone(),
                    line: a.line.clone(),
                    order: a.context.as_ref().map(|c| c.order.clone()),
                    quantity: a.quantity,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceStatus {
    pub id: String,
    pub connected: bool,
    /// Since when connected or down.
    pub since: Option<jiff::Timestamp>,
    pub last_event: Option<jiff::Timestamp>,
    pub events: u64,
    pub decode_errors: u64,
    pub last_error: Option<String>,
    /// What the source says about itself beyond up/down (OPC UA: its session and since
    /// when, its application certificate and how long it is valid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OldestQueued {
    pub id: MessageId,
    pub production_order: String,
    pub message_type: String,
    pub state: State,
    pub created_at: jiff::Timestamp,
    pub age_seconds: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// `false`: read from the data directory of a stopped gateway.
    pub running: bool,
    pub started_at: Option<jiff::Timestamp>,
    pub uptime_seconds: Option<i64>,
    pub sources: Vec<SourceStatus>,
    pub outbox: BTreeMap<String, usize>,
    pub oldest_queued: Option<OldestQueued>,
    pub last_d365_error: Option<String>,
    pub alerts: Vec<Alert>,
    pub lines: BTreeMap<String, OrderContext>,
    /// Per line, the orders released for it.
    #[serde(default)]
    pub released: BTreeMap<String, Vec<ReleasedOrder>>,
    /// What D365's processing made of the messages (its "message processed" events).
    #[serde(default)]
    pub d365_verdicts: VerdictCounts,
    /// The outbox's durable writes since the start (a running gateway only).
    #[serde(default)]
    pub outbox_writes: Option<OutboxWrites>,
    /// D365's request budget (a running gateway with a budget only).
    #[serde(default)]
    pub d365_budget: Option<BudgetStatus>,
    /// Where each uncertain message's evidence stands (d365/evidence.rs): D365 has
    /// processed `seen` of the `needed` later messages of other orders.
    #[serde(default)]
    pub uncertain_evidence: Vec<EvidenceLine>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceLine {
    pub id: u64,
    pub seen: usize,
    pub needed: usize,
}

/// D365's request budget: its use in the current window, and what the backlog needs at
/// its rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetStatus {
    pub used: u64,
    pub limit: u64,
    pub window_seconds: u64,
    /// Seconds the messages waiting now need at the budget's rate (one request each).
    pub backlog_seconds: u64,
}

/// The outbox's two kinds of durable writes (see `outbox/writes.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OutboxWrites {
    pub ingest: WriteSummary,
    pub delivery: WriteSummary,
}

/// D365's verdicts that need someone: messages D365 failed, events that matched nothing,
/// messages D365 may have twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictCounts {
    pub failed_in_d365: usize,
    pub unmatched: usize,
    /// Messages sent again on the evidence of D365's events, then reported twice by it.
    #[serde(default)]
    pub twice_in_d365: usize,
}

/// D365's verdicts that matched no message, newest first, as kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnmatchedView {
    pub events: Vec<crate::outbox::UnmatchedEvent>,
    pub total: usize,
}

pub(super) fn counts(outbox: &Outbox) -> BTreeMap<String, usize> {
    let counts = outbox.counts();
    State::ALL
        .iter()
        .map(|s| (s.to_string(), counts.get(s).copied().unwrap_or(0)))
        .collect()
}

/// The message that has waited longest for delivery (lane heads are their orders'
/// oldest).
pub(super) fn oldest_queued(outbox: &Outbox) -> Option<OldestQueued> {
    let heads = outbox.lane_heads(None, usize::MAX).ok()?;
    let oldest = heads.into_iter().min_by_key(|r| r.created_at)?;
    Some(OldestQueued {
        id: oldest.id,
        age_seconds: jiff::Timestamp::now()
            .duration_since(oldest.created_at)
            .as_secs(),
        production_order: oldest.production_order,
        message_type: oldest.message_type,
        state: oldest.state,
        created_at: oldest.created_at,
    })
}

pub(super) fn status(
    outbox: &Outbox,
    running: Option<&Running>,
    oldest_queued: Option<OldestQueued>,
    lines: LinesView,
    d365_verdicts: VerdictCounts,
) -> Status {
    let now = jiff::Timestamp::now();
    let (sources, last_d365_error) = match running {
        Some(r) => {
            let live = r.live.get();
            let sources = live
                .sources
                .iter()
                .map(|(id, h)| SourceStatus {
                    id: id.clone(),
                    connected: h.is_connected(),
                    since: h.since(),
                    last_event: h.last_event(),
                    events: h.events.load(std::sync::atomic::Ordering::Relaxed),
                    decode_errors: h.decode_errors.load(std::sync::atomic::Ordering::Relaxed),
                    last_error: h.last_error(),
                    detail: h.detail(),
                })
                .collect();
            (sources, live.dispatch.as_ref().and_then(|d| d.last_error()))
        }
        None => (Vec::new(), None),
    };
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        running: running.is_some(),
        started_at: running.map(|r| r.started),
        uptime_seconds: running.map(|r| now.duration_since(r.started).as_secs()),
        sources,
        outbox: counts(outbox),
        oldest_queued,
        last_d365_error,
        alerts: running.map(|r| r.alerts.open_alerts()).unwrap_or_default(),
        lines: lines.lines,
        released: lines.released,
        d365_verdicts,
        uncertain_evidence: running
            .and_then(|r| {
                let board = r.live.get().dispatch.as_ref()?.evidence.clone();
                let lines = board
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|(id, (seen, needed))| EvidenceLine {
                        id: *id,
                        seen: *seen,
                        needed: *needed,
                    })
                    .collect();
                Some(lines)
            })
            .unwrap_or_default(),
        d365_budget: running.and_then(|r| {
            let (used, limit, window_seconds) = r.live.get().dispatch.as_ref()?.budget()?;
            let backlog_seconds =
                crate::d365::budget::backlog_seconds(outbox.waiting(), limit, window_seconds);
            Some(BudgetStatus {
                used,
                limit,
                window_seconds,
                backlog_seconds,
            })
        }),
        outbox_writes: running.map(|_| {
            let stats = outbox.write_stats();
            OutboxWrites {
                ingest: stats.summary(WriteKind::Ingest),
                delivery: stats.summary(WriteKind::Delivery),
            }
        }),
    }
}
