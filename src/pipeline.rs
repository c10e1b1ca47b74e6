//! The stage between sources and the outbox: events in, rules applied, messages
//! validated and committed together with the rules engine's state (the outbox's change
//! feed then wakes the dispatcher).
//!
//! # Invariants
//!
//! - Events that arrive together are handled as one batch and one outbox commit (group
//!   commit): the messages, the engine's state and the upstream delivery identities in
//!   one atomic write, so a crash keeps all of them or none.
//! - An event from an acknowledging source carries the identity of its upstream
//!   delivery: a redelivery (MQTT DUP = 1) whose result the outbox already holds, or that
//!   is in the same batch, is acknowledged and produces nothing (see
//!   `outbox::DeliveryId`).
//! - Acknowledgements go back to their sources only after the commit, in arrival order.
//! - If the disk refuses the commit (full, read-only), the batch is kept in memory and
//!   retried with the same ids; meanwhile the bounded event channel fills up and the
//!   sources wait (the watchdog is fed while waiting).
//! - When the sources stop (shutdown, reload), what is still aggregated is reported.
//! - An operator's change to a line's order context ([`LineCommand`]) is applied between
//!   two batches, committed like a rule's, and answered once it is durable.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::message::FieldNames;

use crate::outbox::{
    Ingest, NewMessage, Outbox, ProcessedEvent, Receipt, ReceiptId, Reconciled, Record, SeenEvent,
};
use crate::rules::state::{EngineState, OrderContext};
use crate::rules::{BuiltMessage, Engine};
use crate::source::SourceEvent;
use crate::systemd::Heartbeat;

/// Most events handled in one batch (one outbox commit).
const MAX_BATCH_EVENTS: usize = 256;
/// The outbox key of the rules engine's state.
pub const RULES_STATE: &str = "rules";

#[derive(Debug, Default)]
pub struct PipelineStats {
    pub events: AtomicU64,
    pub messages: AtomicU64,
    pub invalid_messages: AtomicU64,
    pub store_errors: AtomicU64,
    /// Redelivered upstream messages whose result was already stored.
    pub duplicates: AtomicU64,
    /// D365's verdicts ("message processed" events): recorded on a message as processed,
    /// as failed, resolving an `uncertain` one, or matching no message.
    pub verdicts_processed: AtomicU64,
    pub verdicts_failed: AtomicU64,
    pub verdicts_resolved: AtomicU64,
    pub verdicts_unmatched: AtomicU64,
    /// Each line's order context as last committed, for `/health`: published by the
    /// pipeline, so readers never parse the stored rules state.
    pub lines: std::sync::RwLock<BTreeMap<String, OrderContext>>,
}

/// What one batch (or one tick, or one operator command) produced, committed together.
#[derive(Default)]
struct Batch {
    built: Vec<BuiltMessage>,
    deliveries: Vec<Receipt>,
    seen: Vec<SeenEvent>,
    processed: Vec<ProcessedEvent>,
}

impl Batch {
    fn built(built: Vec<BuiltMessage>) -> Batch {
        Batch {
            built,
            ..Batch::default()
        }
    }
}

/// What a batch's redeliveries already have in the outbox.
#[derive(Default)]
struct Stored<'a> {
    deliveries: HashSet<&'a ReceiptId>,
    events: HashSet<&'a SeenEvent>,
}

/// Loads the rules engine's saved state; a state that cannot be read is reported and
/// replaced by an empty one (the outbox's messages are not affected).
pub fn load_engine_state(outbox: &Outbox) -> EngineState {
    match outbox.store().owners().load(RULES_STATE) {
        Ok(None) => EngineState::default(),
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!(error = %e, "Saved rules state (counters, accumulators, order contexts) cannot be read; starting empty.");
            EngineState::default()
        }),
        Err(e) => {
            tracing::error!(error = %e, "Cannot read the saved rules state; starting empty.");
            EngineState::default()
        }
    }
}

/// An operator's change to a line's order context, applied by the pipeline (which owns
/// the rules engine's state) between batches and answered once it is durable.
#[derive(Debug)]
pub struct LineCommand {
    pub line: String,
    /// `None` clears the line.
    pub context: Option<OrderContext>,
    pub by: String,
    /// The previous context.
    pub reply: tokio::sync::oneshot::Sender<Option<OrderContext>>,
}

/// How many operator commands may wait for the pipeline.
pub const COMMAND_CHANNEL_CAPACITY: usize = 16;

#[derive(Debug)]
pub struct Pipeline {
    pub engine: Engine,
    pub outbox: Outbox,
    pub field_names: FieldNames,
    /// Print each stored message (the `run --dry-run` mode).
    pub print_messages: bool,
    pub stats: Arc<PipelineStats>,
    /// Beaten on every batch and while idle, for the systemd watchdog.
    pub heartbeat: Heartbeat,
}

fn until(deadline: Option<jiff::Timestamp>) -> Option<Duration> {
    let d = deadline?.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(d).unwrap_or(Duration::ZERO))
}

impl Pipeline {
    /// Runs until every event sender is gone (the sources have stopped) and the channel
    /// is drained, so nothing accepted from a source is lost at shutdown, and until the
    /// operator's command channel is closed (the app closes it first when stopping); then
    /// reports what is still aggregated.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        mut commands: mpsc::Receiver<LineCommand>,
    ) {
        let mut batch = Vec::with_capacity(MAX_BATCH_EVENTS);
        let mut commands_open = true;
        // Runs until the sources are gone and no operator can send a command any more
        // (without sources only the operator's commands arrive).
        let mut events_open = true;
        let mut heartbeat_ticks = tokio::time::interval(self.heartbeat.period());
        self.publish_lines();
        while events_open || commands_open {
            self.heartbeat.beat();
            let timer = until(self.engine.next_deadline());
            let produced = tokio::select! {
                n = events.recv_many(&mut batch, MAX_BATCH_EVENTS), if events_open => {
                    if n == 0 {
                        events_open = false;
                        continue;
                    }
                    self.stats.events.fetch_add(n as u64, Ordering::Relaxed);
                    let stored = self.redeliveries_stored(&batch).await;
                    self.process_batch(&batch, &stored)
                }
                _ = sleep(timer), if timer.is_some() => Batch::built(self.engine.tick(jiff::Timestamp::now())),
                _ = heartbeat_ticks.tick() => continue,
                command = commands.recv(), if commands_open => {
                    let Some(c) = command else {
                        commands_open = false;
                        continue;
                    };
                    let (previous, built) = self.engine.set_line(&c.line, c.context, &c.by, jiff::Timestamp::now());
                    self.persist(Batch::built(built)).await;
                    // The operator may have given up waiting; the change stands.
                    let _ = c.reply.send(previous);
                    continue;
                }
            };
            self.persist(produced).await;
            // Only now is what these events produced durable: acknowledge upstream, in order.
            for acked in batch.drain(..) {
                if let Some(ack) = acked.ack {
                    ack.send().await;
                }
            }
        }
        let rest = self.engine.flush_all(jiff::Timestamp::now());
        if !rest.is_empty() {
            tracing::info!(
                messages = rest.len(),
                "Reporting aggregated quantities before stopping."
            );
        }
        self.persist(Batch::built(rest)).await;
    }

    /// The redelivered publishes of a batch whose result the outbox already holds. Asks
    /// until the outbox can answer (it cannot while a failed disk is being reopened):
    /// guessing "not stored" would report a piece twice, and nothing can be stored
    /// meanwhile anyway.
    async fn redeliveries_stored<'a>(&self, batch: &'a [SourceEvent]) -> Stored<'a> {
        let mut wait = crate::backoff::STORE_WRITE.start();
        'ask: loop {
            let mut stored = Stored::default();
            for e in batch {
                let held = match (&e.delivery, &e.seen) {
                    (Some(d), _) if d.redelivered => {
                        self.outbox.store().receipts().holds(&d.id).map(|held| {
                            if held {
                                stored.deliveries.insert(&d.id);
                            }
                        })
                    }
                    (_, Some(seen)) => {
                        self.outbox
                            .store()
                            .receipts()
                            .holds_event(seen)
                            .map(|held| {
                                if held {
                                    stored.events.insert(seen);
                                }
                            })
                    }
                    _ => Ok(()),
                };
                if let Err(e) = held {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, retry_in_ms = wait.next_wait().as_millis() as u64,
                        "Cannot check the outbox for a redelivered message; waiting for it. Sources wait meanwhile.");
                    self.heartbeat.sleep_beating(wait.fail()).await;

                    continue 'ask;
                }
            }
            return stored;
        }
    }

    /// Runs the rules over a batch, leaving out redeliveries of what is already stored
    /// (`stored`) or earlier in the batch. Returns what was built and the deliveries to
    /// record with it.
    fn process_batch(&mut self, batch: &[SourceEvent], stored: &Stored<'_>) -> Batch {
        let mut built = Vec::new();
        let mut deliveries = Vec::new();
        let mut seen = Vec::new();
        let mut processed = Vec::new();
        let mut in_batch: HashSet<&ReceiptId> = HashSet::new();
        let mut events_in_batch: HashSet<&SeenEvent> = HashSet::new();
        for e in batch {
            if let Some(s) = &e.seen {
                if stored.events.contains(s) || !events_in_batch.insert(s) {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(source = %s.source, event_id = %crate::text::for_log(&s.id), "Event already stored; acknowledged, nothing produced.");
                    continue;
                }
                seen.push(s.clone());
            }
            processed.extend(e.processed.clone());
            if let Some(d) = &e.delivery {
                let duplicate = d.redelivered
                    && (in_batch.contains(&d.id) || stored.deliveries.contains(&d.id));
                // Recorded again even when it is a duplicate: the new receipt is what
                // the source forgets once the broker confirms this acknowledgement.
                deliveries.push(d.clone());
                if duplicate {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(source = %d.id.source, packet_id = d.id.packet_id, "Redelivered message already stored; acknowledged, nothing produced.");
                    continue;
                }
                in_batch.insert(&d.id);
            }
            // A D365 verdict is applied to its message by the outbox whether or not a
            // rule also takes the event: no rule taking it is not "dropped".
            built.extend(self.engine.process_event(&e.event, e.processed.is_some()));
        }
        Batch {
            built,
            deliveries,
            seen,
            processed,
        }
    }

    /// Commits the built messages and the engine's state (if it changed) together.
    async fn persist(&mut self, produced: Batch) {
        let messages = self.to_new_messages(produced.built);
        let publications = self.engine.take_publications();
        let state = self
            .engine
            .take_dirty_state()
            .map(|s| serde_json::to_vec(s).unwrap_or_default());
        if messages.is_empty()
            && state.is_none()
            && produced.deliveries.is_empty()
            && produced.seen.is_empty()
            && produced.processed.is_empty()
            && publications.is_empty()
        {
            return;
        }
        let state_changed = state.is_some();
        let records = self
            .store(
                Ingest::new(
                    messages,
                    state.map(|s| (RULES_STATE.to_string(), s)),
                    produced.deliveries,
                )
                .with_seen(produced.seen)
                .with_processed(produced.processed)
                .with_publications(publications),
            )
            .await;
        if state_changed {
            self.publish_lines();
        }
        if records.is_empty() {
            return;
        }
        self.stats
            .messages
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        if self.print_messages {
            for r in &records {
                println!(
                    "stored message {} ({}, order {}): {}",
                    r.id, r.message_type, r.production_order, r.content
                );
            }
        }
    }

    /// Publishes the lines' order contexts when they differ from the published ones
    /// (counting changes the state far more often than an order changes).
    fn publish_lines(&self) {
        let contexts = &self.engine.state().contexts;
        let unchanged = self
            .stats
            .lines
            .read()
            .is_ok_and(|published| published.eq(contexts));
        if !unchanged {
            let mut published = self.stats.lines.write().unwrap_or_else(|p| p.into_inner());
            published.clone_from(contexts);
        }
    }

    fn to_new_messages(&self, built: Vec<BuiltMessage>) -> Vec<NewMessage> {
        let mut out = Vec::new();
        for b in built {
            match b.message.to_content(&self.field_names) {
                Ok(content) => out.push(NewMessage {
                    production_order: b.message.production_order().to_string(),
                    message_type: b.message.message_type().to_string(),
                    content,
                    origin: format!("rule {}", b.rule),
                    line: Some(b.line),
                }),
                Err(e) => {
                    self.stats.invalid_messages.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(rule = %b.rule, error = %e, "Rule built an invalid message; not stored.");
                }
            }
        }
        out
    }

    /// Reports what became of D365's verdicts (the outbox recorded them).
    fn report_reconciled(&self, ingest: &Ingest, reconciled: &[Reconciled]) {
        for (event, outcome) in ingest.processed.iter().zip(reconciled) {
            let v = &event.verdict;
            match outcome {
                Reconciled::Matched {
                    id,
                    failed,
                    resolved,
                } => {
                    if *resolved {
                        self.stats.verdicts_resolved.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(message_id = id, d365_state = %crate::text::for_log(&v.state), event_id = %crate::text::for_log(&v.event_id), "Uncertain message resolved: D365 reports it received.");
                    }
                    if *failed {
                        self.stats.verdicts_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(message_id = id, message_type = %crate::text::for_log(&event.message_type), event_id = %crate::text::for_log(&v.event_id),
                            infolog = v.infolog.as_deref().unwrap_or(""), "D365 failed to process a message; it holds the order's later messages until the message is fixed there.");
                    } else {
                        self.stats
                            .verdicts_processed
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(message_id = id, d365_state = %crate::text::for_log(&v.state), "D365 processed a message.");
                    }
                }
                Reconciled::Unmatched { reason } => {
                    self.stats
                        .verdicts_unmatched
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = %event.source, event_id = %crate::text::for_log(&v.event_id), message_type = %crate::text::for_log(&event.message_type), d365_state = %crate::text::for_log(&v.state), reason = %crate::text::for_log(reason),
                        "D365 verdict matches no message of the gateway; kept for inspection (mes-gateway outbox unmatched).");
                }
            }
        }
    }

    async fn store(&self, ingest: Ingest) -> Vec<Record> {
        let mut wait = crate::backoff::STORE_WRITE.start();
        let ingest = Arc::new(ingest);
        loop {
            match self.outbox.commit(ingest.clone()).await {
                Ok(committed) => {
                    self.report_reconciled(&ingest, &committed.reconciled);
                    return committed.records;
                }
                Err(e) => {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, messages = ingest.messages.len(), retry_in_ms = wait.next_wait().as_millis() as u64,
                        "Cannot store messages in the outbox; keeping them in memory and retrying. Sources wait meanwhile.");
                    // Waiting for the disk is progress of a kind: keep the watchdog fed
                    // (a restart would not free space, and would feed the uncertain path).
                    self.heartbeat.sleep_beating(wait.fail()).await;
                }
            }
        }
    }
}

async fn sleep(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
