//! The operator service: every action a person takes on the gateway — list and show
//! messages, retry (optionally with edited content), cancel, resolve, queue a message by
//! hand, read and set a line's order context, reload the configuration, status. The Unix
//! socket, the HTTP API, the web console and the CLI (when the daemon is stopped) all
//! call these same functions, so a rule holds whichever door is used.
//!
//! # Invariants
//!
//! - Every action is checked against the outbox's state machine under its transition
//!   lock; a refused action is an error that says what state the message is in and what
//!   would be allowed ([`OpError::Conflict`]), never a silent change. While the daemon
//!   runs a `sending` message is on the wire and only the dispatcher settles it.
//! - Edited or hand-queued content is checked like a rule's message (type known, content
//!   fits the type, mandatory fields and formats): a bad one is refused with the field
//!   named ([`OpError::Invalid`]) and nothing is written.
//! - Every change is recorded with who and when: in the message's history, or (for an
//!   order context) in the log. The outbox's change feed wakes the dispatcher at once.
//! - A line's order context is owned by the rules engine: while the daemon runs the
//!   change goes through the pipeline (so it lands between two batches, never inside
//!   one) and the answer comes once it is durable.

mod views;

pub use views::{
    BudgetStatus, EvidenceLine, LinesView, MessagePage, SourceStatus, Status, UnmatchedView,
    VerdictCounts,
};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{mpsc, oneshot};

use crate::alert::Board;
use crate::live::Live;
use crate::message::{FieldNames, Message, MessageTypes};
use crate::outbox::{Ingest, ListFilter, MessageId, NewMessage, Outbox, Record, Sending};
use crate::pipeline::LineCommand;
use crate::rules::state::OrderContext;
use crate::signal::Control;
use crate::store::StoreError;

/// Most records one page lists.
pub const MAX_PAGE: usize = 1000;

/// Why an action was refused or failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    /// The state machine does not allow it.
    #[error("{0}")]
    Conflict(String),
    /// The request is wrong; `field` names the offending field when there is one.
    #[error("{message}")]
    Invalid {
        field: Option<String>,
        message: String,
    },
    /// The configuration to reload has errors; the running one stays.
    #[error("the configuration has {} error(s); the running configuration stays", .0.len())]
    Config(Vec<String>),
    /// Only the running daemon can do this, or it is between two configurations.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl OpError {
    pub fn http_status(&self) -> u16 {
        match self {
            OpError::NotFound(_) => 404,
            OpError::Conflict(_) => 409,
            OpError::Invalid { .. } | OpError::Config(_) => 400,
            OpError::Unavailable(_) => 503,
            OpError::Internal(_) => 500,
        }
    }

    fn invalid(message: impl Into<String>) -> OpError {
        OpError::Invalid {
            field: None,
            message: message.into(),
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => OpError::NotFound(e.to_string()),
            StoreError::WrongState { .. } | StoreError::Joined { .. } => {
                OpError::Conflict(e.to_string())
            }
            StoreError::Locked { .. } => OpError::Unavailable(e.to_string()),
            other => OpError::Internal(other.to_string()),
        }
    }
}

impl From<crate::message::MessageError> for OpError {
    fn from(e: crate::message::MessageError) -> Self {
        use crate::message::MessageError as E;
        let field = match &e {
            // The field's name without the explanation some carry ("… (at least one line)").
            E::Missing { field, .. } | E::Invalid { field, .. } => {
                Some(field.split(" (").next().unwrap_or(field).to_string())
            }
            // serde's path to the value that does not fit, when it names one
            // (`ReportFinishedLines[0].ReportedGoodQuantity: invalid type: …`).
            // or the field serde misses or does not know (`missing field `X``).
            E::Shape { detail, .. } => detail
                .split_once(": ")
                .map(|(path, _)| path)
                .filter(|path| !path.is_empty() && !path.contains(' '))
                .or_else(|| {
                    ["missing field `", "unknown field `"]
                        .iter()
                        .find_map(|start| {
                            let rest = &detail[detail.find(start)? + start.len()..];
                            rest.split('`').next()
                        })
                })
                .map(str::to_string),
        };
        OpError::Invalid {
            field,
            message: e.to_string(),
        }
    }
}

/// What content is checked against: replaced on reload.
#[derive(Debug, Clone, Default)]
pub struct ContentChecks {
    pub field_names: FieldNames,
    pub message_types: MessageTypes,
    /// The lines the rules read an order context from, when that is known: `None` when a
    /// rule's line is a template (any name may be in use) or the rules were not read.
    pub lines: Option<BTreeSet<String>>,
}

impl ContentChecks {
    /// The lines `rules` use, as [`ContentChecks::lines`] wants them.
    pub fn lines_of(rules: &[crate::rules::Rule]) -> Option<BTreeSet<String>> {
        rules
            .iter()
            .filter_map(|r| r.line.as_ref())
            .map(|t| t.literal())
            .collect()
    }
}

/// What only the running daemon has.
#[derive(Debug, Clone)]
pub struct Running {
    pub started: jiff::Timestamp,
    pub live: Live,
    pub alerts: Arc<Board>,
    /// The current pipeline's command channel; `None` between two configurations.
    pub lines: Arc<Mutex<Option<mpsc::Sender<LineCommand>>>>,
    pub control: mpsc::Sender<Control>,
}

/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Operator {
    outbox: Outbox,
    checks: Arc<RwLock<ContentChecks>>,
    running: Option<Running>,
}

impl Operator {
    /// The service of the running daemon.
    pub fn running(outbox: Outbox, checks: ContentChecks, running: Running) -> Operator {
        Operator {
            outbox,
            checks: Arc::new(RwLock::new(checks)),
            running: Some(running),
        }
    }

    /// The service on a data directory while the daemon is stopped (the CLI's fallback).
    pub fn stopped(outbox: Outbox, checks: ContentChecks) -> Operator {
        Operator {
            outbox,
            checks: Arc::new(RwLock::new(checks)),
            running: None,
        }
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// After a reload: check new content against the new configuration.
    pub fn set_checks(&self, checks: ContentChecks) {
        *self.checks.write().unwrap_or_else(|p| p.into_inner()) = checks;
    }

    fn checks(&self) -> ContentChecks {
        self.checks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn sending(&self) -> Sending {
        if self.running.is_some() {
            Sending::InFlight
        } else {
            Sending::Interrupted
        }
    }

    /// One page of messages; `cursor` is the previous page's `next`.
    pub async fn list(
        &self,
        filter: ListFilter,
        cursor: Option<MessageId>,
        limit: usize,
        newest_first: bool,
    ) -> Result<MessagePage, OpError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let outbox = self.outbox.clone();
        let (messages, next) = blocking(move || {
            outbox
                .page(&filter, cursor, limit, newest_first)
                .map_err(OpError::from)
        })
        .await?;
        Ok(MessagePage {
            messages,
            next,
            counts: views::counts(&self.outbox),
        })
    }

    pub async fn show(&self, id: MessageId) -> Result<Record, OpError> {
        let outbox = self.outbox.clone();
        blocking(move || outbox.get(id).map_err(OpError::from)).await
    }

    /// Sends a `failed` or `uncertain` message again; with `content` (the
    /// `_messageContent` object as it goes on the wire) it is edited first.
    pub async fn retry(
        &self,
        id: MessageId,
        content: Option<serde_json::Value>,
        by: &str,
    ) -> Result<Record, OpError> {
        let new_content = match content {
            None => None,
            Some(value) => {
                let current = self.show(id).await?;
                Some(self.checked_edit(&current, value)?)
            }
        };
        Ok(self
            .outbox
            .retry(id, by, new_content, self.sending())
            .await?)
    }

    /// Edited wire content, checked against the message's type and order.
    fn checked_edit(&self, current: &Record, value: serde_json::Value) -> Result<String, OpError> {
        if !value.is_object() {
            return Err(OpError::invalid(
                "the content must be a JSON object (the `_messageContent` of the message)",
            ));
        }
        let checks = self.checks();
        let message = Message::from_wire_json(&current.message_type, value, &checks.field_names)?;
        checks.message_types.check_message(&message)?;
        message.validate()?;
        if message.production_order() != current.production_order {
            return Err(OpError::Invalid {
                field: Some("ProductionOrderNumber".into()),
                message: format!(
                    "the edited content names order {:?} but message {} belongs to order {:?}; cancel it and queue a new one instead",
                    message.production_order(),
                    current.id,
                    current.production_order
                ),
            });
        }
        Ok(message.to_content(&checks.field_names)?)
    }

    pub async fn cancel(&self, id: MessageId, by: &str) -> Result<Record, OpError> {
        Ok(self.outbox.cancel(id, by).await?)
    }

    pub async fn resolve(&self, id: MessageId, by: &str) -> Result<Record, OpError> {
        Ok(self
            .outbox
            .resolve_delivered(id, by, self.sending())
            .await?)
    }

    /// Queues a message by hand: `input` is the envelope form (`_messageType` and
    /// `_messageContent` as an object or a string) or, with `message_type`, the content.
    pub async fn send(
        &self,
        input: serde_json::Value,
        message_type: Option<&str>,
        by: &str,
    ) -> Result<Record, OpError> {
        let checks = self.checks();
        let message = parse_send_input(input, message_type, &checks)?;
        let new = NewMessage {
            production_order: message.production_order().to_string(),
            message_type: message.message_type().to_string(),
            content: message.to_content(&checks.field_names)?,
            origin: by.to_string(),
            line: None,
        };
        let mut records = self.outbox.commit(Ingest::of(vec![new])).await?.records;
        records
            .pop()
            .ok_or_else(|| OpError::Internal("the outbox stored nothing".into()))
    }

    /// Each line's order context and what is aggregated and not yet reported.
    pub async fn lines(&self) -> Result<LinesView, OpError> {
        let outbox = self.outbox.clone();
        let state = blocking(move || Ok(crate::pipeline::load_engine_state(&outbox))).await?;
        Ok(LinesView::from_state(&state))
    }

    /// Sets (`Some`) or clears (`None`) a line's order context; returns the previous one.
    pub async fn set_line(
        &self,
        line: &str,
        context: Option<OrderContext>,
        by: &str,
    ) -> Result<Option<OrderContext>, OpError> {
        if line.trim().is_empty() {
            return Err(OpError::Invalid {
                field: Some("line".into()),
                message: "the line name is empty".into(),
            });
        }
        let context = match context {
            Some(mut c) => {
                if c.order.trim().is_empty() {
                    return Err(OpError::Invalid {
                        field: Some("order".into()),
                        message: "order is mandatory: the production order number".into(),
                    });
                }
                c.since.get_or_insert_with(jiff::Timestamp::now);
                Some(c)
            }
            None => None,
        };
        // A typo in a line name would set an order no rule ever reads, and the line's
        // pieces would go on being reported for its old order: refused where the rules'
        // lines are known. Clearing is always allowed (it removes a stale context).
        if let (Some(_), Some(known)) = (&context, &self.checks().lines) {
            if !known.contains(line) {
                let used = if known.is_empty() {
                    "no rule reads a line's order".to_string()
                } else {
                    format!(
                        "the rules read these lines: {}",
                        known.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                };
                return Err(OpError::Invalid {
                    field: Some("line".into()),
                    message: format!(
                        "no rule reads line {line:?}: an order set there would never be reported ({used})"
                    ),
                });
            }
        }
        match &self.running {
            Some(running) => {
                let sender = running
                    .lines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .ok_or_else(|| {
                        OpError::Unavailable(
                            "the gateway is between two configurations; try again".into(),
                        )
                    })?;
                let (reply, answer) = oneshot::channel();
                sender
                    .send(LineCommand {
                        line: line.to_string(),
                        context,
                        by: by.to_string(),
                        reply,
                    })
                    .await
                    .map_err(|_| {
                        OpError::Unavailable("the pipeline is stopping; try again".into())
                    })?;
                answer.await.map_err(|_| {
                    OpError::Unavailable(
                        "the pipeline stopped before the change was stored; check `lines`".into(),
                    )
                })
            }
            None => {
                let mut state = crate::pipeline::load_engine_state(&self.outbox);
                let previous = match context {
                    Some(c) => state.contexts.insert(line.to_string(), c),
                    None => state.contexts.remove(line),
                };
                let bytes =
                    serde_json::to_vec(&state).map_err(|e| OpError::Internal(e.to_string()))?;
                self.outbox
                    .store()
                    .owners()
                    .save(crate::pipeline::RULES_STATE, bytes)
                    .await?;
                tracing::info!(%line, %by, "Order context changed while the gateway is stopped.");
                Ok(previous)
            }
        }
    }

    /// Loads the configuration again; on errors the running one stays and every error is
    /// returned (`file:line:column: …`).
    pub async fn reload(&self, by: &str) -> Result<String, OpError> {
        let running = self.running.as_ref().ok_or_else(|| {
            OpError::Unavailable(
                "the gateway is not running; it reads the configuration when it starts".into(),
            )
        })?;
        let (reply, answer) = oneshot::channel();
        running
            .control
            .send(Control::Reload {
                by: by.to_string(),
                reply: Some(reply),
            })
            .await
            .map_err(|_| OpError::Unavailable("the gateway is stopping".into()))?;
        match answer.await {
            Ok(Ok(summary)) => Ok(summary),
            Ok(Err(errors)) => Err(OpError::Config(errors)),
            Err(_) => Err(OpError::Unavailable(
                "the gateway stopped before the reload finished".into(),
            )),
        }
    }

    /// Everything `status` shows, in one read.
    pub async fn status(&self) -> Result<Status, OpError> {
        let outbox = self.outbox.clone();
        let (oldest, verdicts) = blocking(move || {
            let verdicts = VerdictCounts {
                failed_in_d365: outbox.rejected_in_d365(0)?.1,
                unmatched: outbox.unmatched_verdicts(0)?.1,
                twice_in_d365: outbox.duplicates(0)?.1,
            };
            Ok((views::oldest_queued(&outbox), verdicts))
        })
        .await?;
        let lines = self.lines().await?;
        Ok(views::status(
            &self.outbox,
            self.running.as_ref(),
            oldest,
            lines,
            verdicts,
        ))
    }

    /// D365's verdicts that matched no message (newest first, up to `limit`, at most
    /// [`MAX_PAGE`]).
    pub async fn unmatched(&self, limit: usize) -> Result<UnmatchedView, OpError> {
        let outbox = self.outbox.clone();
        blocking(move || {
            let (events, total) = outbox.unmatched_verdicts(limit.min(MAX_PAGE))?;
            Ok(UnmatchedView { events, total })
        })
        .await
    }
}

/// Runs outbox reads off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::Internal(format!("outbox read failed: {e}")))?
}

/// Reads a hand-queued message: the envelope form or, with `message_type`, the content.
pub fn parse_send_input(
    value: serde_json::Value,
    message_type: Option<&str>,
    checks: &ContentChecks,
) -> Result<Message, OpError> {
    let (message_type, content) = match message_type {
        Some(t) => (t.to_string(), value),
        None => {
            let t = value
                .get("_messageType")
                .and_then(|v| v.as_str())
                .ok_or_else(|| OpError::Invalid {
                    field: Some("_messageType".into()),
                    message: "input has no `_messageType`: pass the type or use the envelope form"
                        .into(),
                })?
                .to_string();
            let content = match value.get("_messageContent") {
                Some(serde_json::Value::String(s)) => {
                    serde_json::from_str(s).map_err(|e| OpError::Invalid {
                        field: Some("_messageContent".into()),
                        message: format!("`_messageContent` string is not JSON: {e}"),
                    })?
                }
                Some(v) => v.clone(),
                None => {
                    return Err(OpError::Invalid {
                        field: Some("_messageContent".into()),
                        message: "input has no `_messageContent`".into(),
                    })
                }
            };
            (t, content)
        }
    };
    // The type first: a typo must be named as one, not as content that does not fit.
    checks
        .message_types
        .check(&message_type)
        .map_err(|e| OpError::Invalid {
            field: Some("_messageType".into()),
            message: e.to_string(),
        })?;
    let message = Message::from_wire_json(&message_type, content, &checks.field_names)?;
    checks.message_types.check_message(&message)?;
    message.validate()?;
    Ok(message)
}

/// Per-state counts with every state present.
pub fn state_counts(outbox: &Outbox) -> BTreeMap<String, usize> {
    views::counts(outbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_edit_names_the_field() {
        let checks = ContentChecks::default();
        let field = |content: serde_json::Value| match parse_send_input(
            content,
            Some("ProdProductionOrderReportFinished"),
            &checks,
        ) {
            Err(OpError::Invalid { field, .. }) => field,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(
            field(
                serde_json::json!({ "ProductionOrderNumber": "P1", "ReportFinishedLines": [{ "ReportedGoodQuantity": "many" }] })
            ),
            Some("ReportFinishedLines[0].ReportedGoodQuantity".to_string())
        );
        assert_eq!(
            field(serde_json::json!({ "ProductionOrderNumber": "P1", "ReportFinishedLines": [] })),
            Some("ReportFinishedLines".to_string())
        );
        assert_eq!(
            field(serde_json::json!({ "ReportFinishedLines": [{ "ReportedGoodQuantity": 1 }] })),
            Some("ProductionOrderNumber".to_string())
        );
    }
}
