//! A dispatcher turn written while its answers come in: [`Outbox::begin_turn`] opens the
//! turn's write transaction on a blocking thread, [`OpenTurn::settle`] applies outcomes to
//! it as soon as they are judged, and [`OpenTurn::finish`] adds the last outcomes and the
//! next `sending` marks and commits, one write and one flush as [`Outbox::settle_and_mark`].
//!
//! Why: a turn records the outcomes of a group of requests that went out together and
//! marks the next head of each of their lanes; every one of those lanes waits for the
//! commit. Written after the group's last answer, the whole write (reading the records,
//! about ten B-tree changes per message, the commit) stood between that answer and the
//! next requests; filled while the group's other answers are still on their way, only the
//! marks and the commit do (docs/performance.md, "The delivery cycle, timed").
//!
//! Durability is unchanged: nothing of a turn is on disk, or visible to any reader, before
//! its commit, and `finish` returns only after the commit's fsync, so a `sending` mark is
//! on disk before its request leaves and an outcome before its lane moves on. A turn that
//! is dropped, fails or is abandoned is rolled back whole: its caller still holds every
//! outcome it gave it and writes them the ordinary way.
//!
//! While a turn is open it holds the store's single write transaction and the outbox's
//! transition lock: ingest, operator actions and pruning wait for it (about a
//! millisecond). Hence the one rule for its owner: **no other write to the outbox while
//! it holds an open turn** — finish or drop the turn first. A turn that gets no step for
//! [`TURN_IDLE_MAX`] is abandoned, so that breaking the rule costs a pause, not a hang.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use super::settle::{apply_changes, plan_marks, plan_settlements};
use super::{lanes, record_in, MessageId, Outbox, Record, Settlement, State, WriteKind};
use crate::store::kv::{Reading, Tx};
use crate::store::StoreError;

/// How long an open turn waits for its owner's next step before it rolls back.
pub const TURN_IDLE_MAX: Duration = Duration::from_secs(crate::store::TURN_IDLE_MAX_SECS);

/// What the owner of a turn sends to its writer.
#[derive(Debug)]
enum Step {
    Settle(Arc<Vec<Settlement>>),
    Finish {
        outcomes: Arc<Vec<Settlement>>,
        mark: Vec<MessageId>,
    },
}

/// A turn's write transaction, open on a blocking thread (module doc).
#[derive(Debug)]
pub struct OpenTurn {
    outbox: Outbox,
    steps: mpsc::Sender<Step>,
    written: tokio::task::JoinHandle<Result<Written, StoreError>>,
    /// Fires once the turn holds the store's write transaction.
    opened: tokio::sync::oneshot::Receiver<()>,
}

/// What a committed turn changed: every record with its state before (outcomes, then
/// marks), and heads found already marked.
type Written = (Vec<(Record, State)>, Vec<Record>);

impl Outbox {
    /// Opens a turn, or `None` when an operator action holds the transition lock right
    /// now (the caller then writes the turn the ordinary way).
    pub fn begin_turn(&self) -> Option<OpenTurn> {
        let transition = self.transitions.clone().try_lock_owned().ok()?;
        let (steps, received) = mpsc::channel();
        let (open, opened) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let joining = self.joining();
        // On the blocking pool like every write (crate::store), awaited by the owner: one
        // hand-off at the end.
        let written = self.store.spawn_write(move |kv| {
            let _transition = transition;
            this.write_open_turn(kv, received, open, &joining)
        });
        Some(OpenTurn {
            outbox: self.clone(),
            steps,
            written,
            opened,
        })
    }

    fn write_open_turn(
        &self,
        kv: &crate::store::kv::Kv,
        steps: mpsc::Receiver<Step>,
        open: tokio::sync::oneshot::Sender<()>,
        joining: &super::JoinPolicy,
    ) -> Result<Written, StoreError> {
        let writes = self.writes.clone();
        let mut open = Some(open);
        {
            let mut changed: Vec<(Record, State)> = Vec::new();
            let mut already_marked = Vec::new();
            let mut read_ahead = HashMap::new();
            let mut last_step = std::time::Instant::now();
            kv.write(true, |tx| loop {
                if let Some(open) = open.take() {
                    let _ = open.send(());
                }
                let step = steps
                    .recv_timeout(TURN_IDLE_MAX)
                    .map_err(|_| StoreError::TurnAbandoned)?;
                last_step = std::time::Instant::now();
                let (outcomes, mark) = match step {
                    Step::Settle(outcomes) => (outcomes, None),
                    Step::Finish { outcomes, mark } => (outcomes, Some(mark)),
                };
                let mut step_changes = Vec::with_capacity(outcomes.len());
                let mut deliveries = HashMap::new();
                {
                    let reading = Reading::new(tx);
                    plan_settlements(&reading, &outcomes, &mut step_changes, &mut deliveries)?;
                    if let Some(mark) = &mark {
                        plan_marks(
                            &reading,
                            mark,
                            joining,
                            &mut read_ahead,
                            &mut step_changes,
                            &mut already_marked,
                        )?;
                    }
                }
                apply_changes(tx, &step_changes, &deliveries)?;
                if mark.is_none() {
                    read_next_heads(tx, &step_changes, &mut read_ahead)?;
                }
                changed.append(&mut step_changes);
                if mark.is_some() {
                    return Ok(());
                }
            })?;
            // What the lanes waited for: the last step and the commit.
            writes.record(WriteKind::Delivery, changed.len(), last_step.elapsed());
            Ok((changed, already_marked))
        }
    }
}

/// Reads the records that now head the lanes of the messages `changed` took out of
/// them: the dispatcher marks most of them at the turn's end, and reading them while
/// answers still come in takes that off the lanes' wait. Sound because this transaction
/// is the only writer until it commits, and a record it changes afterwards is dropped
/// from `read_ahead` first.
fn read_next_heads(
    tx: &mut Tx<'_>,
    changed: &[(Record, State)],
    read_ahead: &mut HashMap<MessageId, Record>,
) -> Result<(), StoreError> {
    for (r, _) in changed {
        read_ahead.remove(&r.id);
    }
    for (r, _) in changed.iter().filter(|(r, _)| r.state.is_terminal()) {
        if let Some(head) = lanes::head(tx, &r.production_order)? {
            let record = record_in(&Reading::new(tx), head)?;
            read_ahead.insert(head, record);
        }
    }
    Ok(())
}

impl OpenTurn {
    /// Returns once the turn holds the store's write transaction (every other write
    /// waits from then on), or its writer has given up.
    pub async fn opened(&mut self) {
        let _ = (&mut self.opened).await;
    }

    /// Applies outcomes to the open transaction (not yet on disk: see `finish`).
    pub fn settle(&self, outcomes: Arc<Vec<Settlement>>) {
        // A writer that has gone (failed or abandoned) reports it at `finish`.
        let _ = self.steps.send(Step::Settle(outcomes));
    }

    /// Applies the last outcomes, marks `mark` as [`Outbox::mark_sending`] does, and
    /// commits; returns (settled, marked) once it is on disk. On an error the caller writes
    /// the turn again with [`Outbox::settle_and_mark`], which recognises whatever of it
    /// did reach the disk.
    pub async fn finish(
        self,
        outcomes: Arc<Vec<Settlement>>,
        mark: Vec<MessageId>,
    ) -> Result<(Vec<Record>, Vec<Record>), StoreError> {
        let _ = self.steps.send(Step::Finish { outcomes, mark });
        drop(self.steps);
        let (changed, already_marked) = self
            .written
            .await
            .map_err(|e| StoreError::Storage(format!("turn writer failed: {e}")))??;
        Ok(self.outbox.written(changed, already_marked))
    }
}
