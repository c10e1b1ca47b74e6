//! The stage between sources and the outbox: events in, rules applied, messages
//! validated and appended durably, the dispatcher woken.
//!
//! Events that arrive together are handled as one batch and one outbox flush (group
//! commit). If the disk refuses the append (full, read-only), the batch is kept in memory
//! and retried; meanwhile the bounded event channel fills up and the sources wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::event::Event;
use crate::message::FieldNames;
use crate::outbox::{NewMessage, Outbox, Record};
use crate::rules::Engine;
use crate::systemd::Heartbeat;

/// Most events handled in one batch (one outbox flush).
const MAX_BATCH_EVENTS: usize = 256;
/// Waits between attempts to store a batch the disk refused.
const STORE_RETRY_MIN: Duration = Duration::from_millis(500);
const STORE_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct PipelineStats {
    pub events: AtomicU64,
    pub messages: AtomicU64,
    pub invalid_messages: AtomicU64,
    pub store_errors: AtomicU64,
}

#[derive(Debug)]
pub struct Pipeline {
    pub engine: Engine,
    pub outbox: Outbox,
    pub field_names: FieldNames,
    pub wake: Arc<Notify>,
    /// Print each stored message (the `run --dry-run` mode).
    pub print_messages: bool,
    pub stats: Arc<PipelineStats>,
    /// Beaten on every batch and while idle, for the systemd watchdog.
    pub heartbeat: Heartbeat,
}

impl Pipeline {
    /// Runs until every event sender is gone (the sources have stopped) and the channel
    /// is drained, so nothing accepted from a source is lost at shutdown.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        let mut batch = Vec::with_capacity(MAX_BATCH_EVENTS);
        let mut heartbeat_ticks = tokio::time::interval(self.heartbeat.period());
        loop {
            self.heartbeat.beat();
            let received = tokio::select! {
                n = events.recv_many(&mut batch, MAX_BATCH_EVENTS) => n,
                _ = heartbeat_ticks.tick() => continue,
            };
            if received == 0 {
                break;
            }
            let messages = self.build(&batch);
            batch.clear();
            if messages.is_empty() {
                continue;
            }
            let records = self.store(messages).await;
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
            self.wake.notify_one();
        }
    }

    fn build(&mut self, batch: &[Event]) -> Vec<NewMessage> {
        let mut out = Vec::new();
        for event in batch {
            self.stats.events.fetch_add(1, Ordering::Relaxed);
            for built in self.engine.apply(event) {
                match built.message.to_content(&self.field_names) {
                    Ok(content) => out.push(NewMessage {
                        production_order: built.message.production_order().to_string(),
                        message_type: built.message.message_type().to_string(),
                        content,
                        origin: format!("rule {}", built.rule),
                    }),
                    Err(e) => {
                        self.stats.invalid_messages.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(rule = %built.rule, source = %event.source, point = %event.point, error = %e, "Rule built an invalid message; not stored.");
                    }
                }
            }
        }
        out
    }

    async fn store(&self, messages: Vec<NewMessage>) -> Vec<Record> {
        let mut wait = STORE_RETRY_MIN;
        loop {
            match self.outbox.append(messages.clone()).await {
                Ok(records) => return records,
                Err(e) => {
                    // Retrying is progress of a kind: keep the watchdog fed, the disk may come back.
                    self.heartbeat.beat();
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, messages = messages.len(), retry_in_ms = wait.as_millis() as u64,
                        "Cannot store messages in the outbox; keeping them in memory and retrying. Sources wait meanwhile.");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(STORE_RETRY_MAX);
                }
            }
        }
    }
}
