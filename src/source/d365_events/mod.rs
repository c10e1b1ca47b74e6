//! D365 business events as a source: production order releases and status changes (and
//! the message processor's verdicts), delivered by D365 to the gateway's HTTPS webhook
//! (`POST /events/d365/<source id>` on `api.listen`).
//!
//! # Invariants
//!
//! - The webhook answers 200 only once what the event produced is durable (the pipeline
//!   acknowledges after its commit), so D365's at-least-once delivery never loses one.
//! - An event's id (`EventId`, else `ControlNumber`) is committed with what it produced
//!   and remembered for `remember`; a redelivery inside that window is answered 200 and
//!   produces nothing.
//! - Parsing is tolerant: unknown fields are kept in the payload, `EventTime` may be
//!   `/Date(<ms>)/` or ISO 8601 (a missing or unreadable one means "now"). An event that
//!   is not a JSON object or has no id is refused with 400 and counted.
//! - An event becomes an [`Event`] whose point is the configured name of its
//!   `BusinessEventId` (`released`, `status_changed`, `message_processed`, or the id
//!   itself) and whose value is the whole JSON payload, so rules match it like any other
//!   (`field:` paths, `{payload.ProductionOrderNumber}` templates).

pub mod config;
pub mod service_bus;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Ack, AckTicket, SourceError, SourceEvent, SourceHealth};
use crate::event::{Event, Value};
use crate::outbox::{D365Verdict, ProcessedEvent, SeenEvent};
use crate::systemd::Heartbeat;
use config::D365EventsConfig;

/// Deliveries waiting for the source (the webhook hands them over here).
const INTAKE_CAPACITY: usize = 64;

/// What the webhook tells its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durable; the event id is remembered.
    Stored,
    /// Not an event the gateway can read.
    Refused(String),
}

/// One webhook delivery: the body, and where the answer goes.
#[derive(Debug)]
pub struct Delivery {
    pub body: Vec<u8>,
    pub answer: oneshot::Sender<Outcome>,
}

/// The webhook's way into a running `d365_events` source.
#[derive(Debug, Clone)]
pub struct Intake {
    pub secret: crate::config::Secret,
    pub deliveries: mpsc::Sender<Delivery>,
}

/// A business event read from its JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct BusinessEvent {
    pub business_event_id: String,
    /// `EventId`, else `ControlNumber`.
    pub id: String,
    pub at: Option<jiff::Timestamp>,
    pub payload: serde_json::Value,
}

/// Reads one business event; the error says what is wrong.
pub fn parse(body: &[u8]) -> Result<BusinessEvent, String> {
    let payload: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let object = payload
        .as_object()
        .ok_or("the body must be a JSON object (one business event)")?;
    let text = |key: &str| -> Option<String> {
        match object.get(key)? {
            serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let business_event_id = text("BusinessEventId").ok_or("no `BusinessEventId`")?;
    let id = text("EventId")
        .or_else(|| text("ControlNumber"))
        .ok_or("no `EventId` or `ControlNumber`: a redelivery could not be recognised")?;
    let at = object
        .get("EventTime")
        .and_then(|v| v.as_str())
        .and_then(event_time)
        .or_else(|| {
            object
                .get("EventTimeIso8601")
                .and_then(|v| v.as_str())
                .and_then(event_time)
        });
    Ok(BusinessEvent {
        business_event_id,
        id,
        at,
        payload,
    })
}

/// Reads D365's verdict from a "message processed" event: `None` when it is about another
/// queue than `queue` (D365 reports on every queue the event is activated for).
pub fn processed_event(
    source: &Arc<str>,
    event: &BusinessEvent,
    queue: &str,
) -> Result<Option<ProcessedEvent>, String> {
    let object = event.payload.as_object().ok_or("not a JSON object")?;
    // Enum fields may come as names, labels or numbers: text of any of them.
    let text = |key: &str| -> Option<String> {
        match object.get(key)? {
            serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            serde_json::Value::Null => None,
            serde_json::Value::String(_) => None,
            other => Some(other.to_string()),
        }
    };
    let message_queue = text("MessageQueue").ok_or("no `MessageQueue`")?;
    if !message_queue.eq_ignore_ascii_case(queue) {
        return Ok(None);
    }
    let message_type = text("MessageType").ok_or("no `MessageType`")?;
    let content = match object.get("MessageContent") {
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => return Err("no `MessageContent` (the message D365 processed)".into()),
    };
    let state = text("MessageState")
        .filter(|s| s.parse::<f64>().is_err())
        .or_else(|| text("MessageStateLabel"))
        .or_else(|| text("MessageState"))
        .ok_or("no `MessageState`")?;
    let failed = [
        "MessageState",
        "MessageStateLabel",
        "MessageProcessingResult",
        "MessageProcessingResultLabel",
    ]
    .iter()
    .filter_map(|k| text(k))
    .any(|v| v.eq_ignore_ascii_case("failed") || v.eq_ignore_ascii_case("error"));
    let result = text("MessageProcessingResultLabel").or_else(|| text("MessageProcessingResult"));
    Ok(Some(ProcessedEvent {
        source: source.clone(),
        queue: message_queue,
        message_type,
        content,
        verdict: D365Verdict {
            at: event.at.unwrap_or_else(jiff::Timestamp::now),
            state,
            failed,
            result,
            infolog: text("MessageInfolog"),
            event_id: event.id.clone(),
            page_url: text("MessageProcessorMessagePageUrl"),
        },
        payload: event.payload.to_string(),
    }))
}

/// `/Date(1764240678000)/` (milliseconds since 1970) or ISO 8601.
pub fn event_time(text: &str) -> Option<jiff::Timestamp> {
    if let Some(ms) = text
        .strip_prefix("/Date(")
        .and_then(|r| r.strip_suffix(")/"))
    {
        // `/Date(ms+0100)/` carries an offset for display only; the ms are UTC.
        let digits = ms.split(['+', '-']).find(|s| !s.is_empty()).unwrap_or(ms);
        let sign = if ms.starts_with('-') { -1 } else { 1 };
        return jiff::Timestamp::from_millisecond(sign * digits.parse::<i64>().ok()?).ok();
    }
    text.parse::<jiff::Timestamp>().ok()
}

#[derive(Debug)]
pub struct D365EventsSource {
    config: D365EventsConfig,
    heartbeat: Heartbeat,
    health: Arc<SourceHealth>,
    deliveries: mpsc::Receiver<Delivery>,
    /// Service Bus receivers hand their events in here too.
    intake: mpsc::Sender<Delivery>,
}

impl D365EventsSource {
    /// The source and, when it has a webhook, the webhook's way into it.
    pub fn new(
        config: D365EventsConfig,
        heartbeat: Heartbeat,
        health: Arc<SourceHealth>,
    ) -> (D365EventsSource, Option<Intake>) {
        let (tx, rx) = mpsc::channel(INTAKE_CAPACITY);
        let intake = config.webhook_secret.clone().map(|secret| Intake {
            secret,
            deliveries: tx.clone(),
        });
        (
            D365EventsSource {
                config,
                heartbeat,
                health,
                deliveries: rx,
                intake: tx,
            },
            intake,
        )
    }

    pub async fn run(
        mut self,
        out: mpsc::Sender<SourceEvent>,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let source: Arc<str> = self.config.id.as_str().into();
        match self.config.service_bus.clone() {
            // Up once Service Bus answers.
            Some(sb) => {
                let receiver = service_bus::Receiver::new(
                    sb,
                    source.clone(),
                    self.intake.clone(),
                    self.health.clone(),
                )
                .map_err(|detail| SourceError::Setup {
                    id: source.to_string(),
                    detail,
                })?;
                tokio::spawn(receiver.run(cancel.clone()));
            }
            // Waiting for D365 to post is this source's normal state: it is up.
            None => {
                self.health.set_connected(&source, true, None);
            }
        }
        let (acks_tx, mut acks) = mpsc::channel::<AckTicket>(INTAKE_CAPACITY);
        let mut waiting: HashMap<AckTicket, oneshot::Sender<Outcome>> = HashMap::new();
        // Parsed events waiting for room in the pipeline's channel. The loop never blocks
        // on that channel: the pipeline may be waiting for this source to take its
        // acknowledgements (a full ack channel) while the channel is full of other
        // sources' events, and blocking here would deadlock both.
        let mut ready: VecDeque<SourceEvent> = VecDeque::new();
        let mut next_ticket = 0u64;
        let mut heartbeat_ticks = tokio::time::interval(self.heartbeat.period());
        loop {
            self.heartbeat.beat();
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = heartbeat_ticks.tick() => {}
                Some(ticket) = acks.recv() => {
                    if let Some(answer) = waiting.remove(&ticket) {
                        let _ = answer.send(Outcome::Stored);
                    }
                }
                permit = out.reserve(), if !ready.is_empty() => {
                    let permit = permit.map_err(|_| SourceError::Closed { id: source.to_string() })?;
                    if let Some(event) = ready.pop_front() {
                        permit.send(event);
                        self.health.event();
                    }
                }
                // Back-pressure towards D365: while events wait for the pipeline, no new
                // delivery is taken (the webhook's requests wait, then time out with 503).
                delivery = self.deliveries.recv(), if ready.len() < INTAKE_CAPACITY => {
                    let Some(delivery) = delivery else { return Ok(()) };
                    let event = match parse(&delivery.body) {
                        Ok(e) => e,
                        Err(reason) => {
                            self.health.decode_error();
                            tracing::warn!(source = %source, %reason, body = %crate::text::excerpt(&delivery.body, crate::text::PAYLOAD_EXCERPT), "Unreadable D365 business event refused.");
                            let _ = delivery.answer.send(Outcome::Refused(reason));
                            continue;
                        }
                    };
                    next_ticket += 1;
                    let ticket = AckTicket(next_ticket);
                    waiting.insert(ticket, delivery.answer);
                    let point = self.config.point_of(&event.business_event_id);
                    let processed = if point == config::VERDICT_POINT {
                        match processed_event(&source, &event, &self.config.queue) {
                            Ok(p) => p,
                            Err(reason) => {
                                // Still stored and given to the rules; only not reconciled.
                                self.health.decode_error();
                                tracing::warn!(source = %source, event_id = %crate::text::for_log(&event.id), reason = %crate::text::for_log(&reason), "D365 verdict event cannot be matched to a message.");
                                None
                            }
                        }
                    } else {
                        None
                    };
                    tracing::debug!(source = %source, point = %crate::text::for_log(&point), event_id = %crate::text::for_log(&event.id), "D365 business event received.");
                    ready.push_back(SourceEvent {
                        event: Event {
                            source: source.clone(),
                            point: point.into(),
                            value: Value::Json(event.payload),
                            at: event.at.unwrap_or_else(jiff::Timestamp::now),
                        },
                        ack: Some(Ack::new(acks_tx.clone(), ticket)),
                        delivery: None,
                        seen: Some(SeenEvent {
                            source: source.clone(),
                            id: event.id,
                        }),
                        processed,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_date_forms_and_unknown_fields_are_read() {
        let e = parse(br#"{"BusinessEventId":"ProductionOrderReleasedBusinessEvent","ControlNumber":5637144576,"EventId":"9C2E","EventTime":"/Date(1764240678000)/","ProductionOrderNumber":"P000123","SomethingNew":{"x":1}}"#).unwrap();
        assert_eq!(e.id, "9C2E");
        assert_eq!(e.at, Some("2025-11-27T10:51:18Z".parse().unwrap()));
        assert_eq!(e.payload["SomethingNew"]["x"], 1);
        let iso = parse(
            br#"{"BusinessEventId":"X","ControlNumber":7,"EventTime":"2025-11-27T10:51:18.5Z"}"#,
        )
        .unwrap();
        assert_eq!(iso.id, "7", "ControlNumber when there is no EventId");
        assert_eq!(iso.at, Some("2025-11-27T10:51:18.5Z".parse().unwrap()));
        assert_eq!(
            event_time("/Date(1764240678000+0100)/"),
            Some("2025-11-27T10:51:18Z".parse().unwrap())
        );
    }

    #[test]
    fn an_event_without_an_id_or_type_is_refused_with_the_reason() {
        assert_eq!(
            parse(br#"{"BusinessEventId":"X"}"#).unwrap_err(),
            "no `EventId` or `ControlNumber`: a redelivery could not be recognised"
        );
        assert_eq!(
            parse(br#"{"EventId":"1"}"#).unwrap_err(),
            "no `BusinessEventId`"
        );
        assert!(parse(b"[1]")
            .unwrap_err()
            .starts_with("the body must be a JSON object"));
    }
}
