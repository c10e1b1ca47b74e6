//! The dispatcher: drains the outbox to D365.
//!
//! - One lane per production order; only the head of a lane is sent, and at most one
//!   request per order is in flight (D365 processes an order's messages in arrival order).
//! - At most `max_in_flight` requests across all orders; lanes are served round-robin
//!   (each turn starts after the order served last), so a long backlog of one order does
//!   not starve the others.
//! - Group commit: every ready lane head of a turn is marked `sending` in one write and one
//!   flush, after the access token is in hand (so a slow token endpoint never leaves
//!   messages `sending` that were not sent); the outcomes of all requests that finished
//!   are recorded in one write and one flush; a lane's next message goes out once its
//!   predecessor's outcome is on disk. While the dispatcher is idle with room to send,
//!   an ingest commit marks the new head of an empty lane in the same write that stores
//!   it and hands it over (admitted.rs, outbox admit.rs): one write instead of two.
//! - What follows each outcome is decided by [`retry::decide`]; a 429 or a credentials
//!   problem pauses every lane, since D365's limits and credentials are per user.
//! - A 429 stops every request at once: the send task that reads it closes the
//!   [`PauseGate`] before it reports back, and every task checks the gate right before it
//!   writes, so a request prepared in the same turn does not go out inside the pause.
//! - A `failed` or `uncertain` head holds its order; other orders keep flowing.
//! - A send task that panics frees its lane: the message becomes `uncertain` (the request
//!   may have been written).
//!
//! - A retry's deadline is written with its outcome (`Record::retry_at`) and a pause of
//!   every lane in the outbox's state table: a restart keeps waiting where the last run
//!   was waiting. When the disk refuses a write, the outcomes stay in memory and the
//!   write is retried; nothing is sent meanwhile.
//!
//! - The dispatcher wakes when the outbox changes (its change feed, [`Outbox::subscribe`]:
//!   an append by the pipeline, an operator's retry), when a request finishes, when a
//!   deadline falls, and on the heartbeat tick.
//!
//! Memory: the in-flight set (≤ `max_in_flight`), one backoff deadline per lane head that
//! is waiting for a retry, and the held heads.

mod admitted;
pub mod budget;
pub mod client;
pub mod config;
pub mod evidence;
mod heads;
mod outcomes;
pub mod retry;
mod state;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::entra::Token;
use crate::outbox::{Admission, MessageId, Outbox, Record, Settle, Settlement, State};
use crate::store::StoreError;
use crate::systemd::Heartbeat;
use client::D365Client;
use config::DispatcherConfig;
use retry::AmbiguousPolicy;
use retry::RetryPolicy;
use state::{Choice, Cycle, Joined, Judged, LaneHead, Wakes};

pub use outcomes::PauseGate;

/// The outbox key of the dispatcher's saved pause.
const DISPATCHER_STATE: &str = "dispatcher";

/// A pause of every lane, as saved on disk.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedPause {
    until: jiff::Timestamp,
    /// A credentials pause is not kept across a start: an operator restarts or reloads
    /// after fixing the secret, and wants it tried at once (a wrong one pauses again
    /// after one token request). A 429 pause is D365's and is kept.
    #[serde(default)]
    credentials: bool,
}

/// The wall-clock time `wait` from now (what survives a restart; tokio's clock does not).
fn wall_clock_after(wait: Duration) -> Option<jiff::Timestamp> {
    let wait = jiff::SignedDuration::try_from(wait).ok()?;
    jiff::Timestamp::now().checked_add(wait).ok()
}

/// The longest a finished request waits for others to share its write (see the run loop).
const LINGER_MAX: Duration = Duration::from_millis(5);

/// Counters the dispatcher keeps for the operator surface and for the watchdog.
#[derive(Debug)]
pub struct DispatchStats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
    pub uncertain: AtomicU64,
    pub throttled: AtomicU64,
    /// D365's request budget: requests spent in the current window, the budget and its
    /// window in seconds (the last two 0 when the budget is off).
    pub budget_used: AtomicU64,
    pub budget_limit: AtomicU64,
    pub budget_window_s: AtomicU64,
    /// Where each uncertain message's evidence stands (evidence.rs), for `status`.
    pub evidence: evidence::EvidenceBoard,
    /// The last problem that stopped every lane (token endpoint, credentials), for the
    /// operator surface: such problems belong to no single message.
    last_error: std::sync::Mutex<Option<String>>,
    /// Seconds from a message's creation to D365's acceptance (queueing, retries and
    /// outages included).
    pub delivery_latency: prometheus_client::metrics::histogram::Histogram,
}

impl Default for DispatchStats {
    fn default() -> Self {
        DispatchStats {
            delivered: AtomicU64::default(),
            retried: AtomicU64::default(),
            failed: AtomicU64::default(),
            uncertain: AtomicU64::default(),
            throttled: AtomicU64::default(),
            budget_used: AtomicU64::default(),
            budget_limit: AtomicU64::default(),
            budget_window_s: AtomicU64::default(),
            evidence: evidence::EvidenceBoard::default(),
            last_error: std::sync::Mutex::default(),
            // 10 ms … about 3 days.
            delivery_latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.01, 4.0, 14),
            ),
        }
    }
}

impl DispatchStats {
    /// The budget's use and size as requests (used, limit) and its window, when it is on.
    pub fn budget(&self) -> Option<(u64, u64, u64)> {
        let limit = self.budget_limit.load(Ordering::Relaxed);
        (limit > 0).then(|| {
            (
                self.budget_used.load(Ordering::Relaxed),
                limit,
                self.budget_window_s.load(Ordering::Relaxed),
            )
        })
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_last_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
}

#[derive(Debug)]
pub struct Dispatcher {
    outbox: Outbox,
    client: Arc<D365Client>,
    max_in_flight: usize,
    /// D365's request budget shared by every lane (budget.rs); `None`: off.
    budget: Option<budget::BudgetConfig>,
    /// Shared with every send task: the one copy of the `dispatcher` retry settings.
    policy: Arc<RetryPolicy>,
    /// Shared with every send task: no request is written while it is closed.
    gate: Arc<PauseGate>,
    stats: Arc<DispatchStats>,
    /// How long in-flight requests may finish after cancellation before they are abandoned.
    drain_grace: Duration,
    /// Beaten on every turn of the loop, for the systemd watchdog.
    heartbeat: Option<Heartbeat>,
    /// What ingest commits may mark `sending` for this dispatcher (outbox admit.rs).
    admission: Arc<Admission>,
}

impl Drop for Dispatcher {
    /// However the dispatcher ends (an error, a panic), ingest commits stop marking heads
    /// nobody would send (outbox admit.rs).
    fn drop(&mut self) {
        self.admission.close();
        self.outbox.withdraw_admission(&self.admission);
    }
}

impl Dispatcher {
    pub fn new(
        outbox: Outbox,
        client: Arc<D365Client>,
        config: DispatcherConfig,
        drain_grace: Duration,
    ) -> Dispatcher {
        outbox.join_with(config.join.clone());
        let admission = Arc::new(Admission::default());
        outbox.admit_with(admission.clone());
        Dispatcher {
            outbox,
            client,
            max_in_flight: config.max_in_flight,
            budget: config.budget,
            policy: Arc::new(config.retry),
            gate: Arc::default(),
            stats: Arc::default(),
            drain_grace,
            heartbeat: None,
            admission,
        }
    }

    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Dispatcher {
        self.heartbeat = Some(heartbeat);
        self
    }

    pub fn stats(&self) -> Arc<DispatchStats> {
        self.stats.clone()
    }

    fn beat(&self) {
        if let Some(hb) = &self.heartbeat {
            hb.beat();
        }
    }

    /// Messages found `sending` were interrupted by a crash or a kill: they may have
    /// reached D365. They become `uncertain` (or are queued again where the message
    /// type's policy is `resend`).
    async fn recover_interrupted(&self) -> Result<(), StoreError> {
        let recovered = self
            .outbox
            .recover_interrupted(|r| match self.policy.ambiguous_for(&r.message_type) {
                AmbiguousPolicy::Hold => Settle::Uncertain {
                    reason: "interrupted: the gateway stopped while the request may have been on the wire".into(),
                },
                AmbiguousPolicy::Resend => Settle::Requeue {
                    reason: "interrupted, resending: the gateway stopped while the request may have been on the wire; policy resend".into(),
                },
            })
            .await?;
        for r in recovered {
            if r.state == State::Uncertain {
                self.stats.uncertain.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(message_id = r.id, order = %r.production_order, message_type = %r.message_type,
                    "Message was being sent when the gateway stopped; D365 may have it. Marked uncertain: check the MES page, then `outbox resolve` or `outbox retry`.");
            }
        }
        Ok(())
    }

    /// The delivery cycle (README, "How it works"), one turn per round: judge the answers
    /// that came in, choose the lane heads that may go out now, record the outcomes and
    /// mark the chosen `sending` in one write, send what was marked, and wait for the next
    /// answer, an operator's action or a deadline. At the end, the requests in flight get
    /// `drain_grace` to finish.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), StoreError> {
        self.recover_interrupted().await?;
        let mut cycle = Cycle::default();
        cycle.state.budget = self.budget.map(budget::Budget::new);
        if let Some(b) = self.budget {
            self.stats
                .budget_limit
                .store(u64::from(b.requests), Ordering::Relaxed);
            self.stats
                .budget_window_s
                .store(b.per.as_secs(), Ordering::Relaxed);
        }
        self.restore_deadlines(&mut cycle.state)?;
        let mut wakes = Wakes {
            outbox_changes: self.outbox.subscribe(),
            heartbeat_ticks: tokio::time::interval(
                self.heartbeat
                    .as_ref()
                    .map_or(crate::systemd::DEFAULT_HEARTBEAT_PERIOD, Heartbeat::period),
            ),
        };
        loop {
            self.beat();
            self.take_admitted(&mut cycle, &cancel).await;
            let judged = self.judge_answers(&mut cycle).await;
            let Some(choice) = self.choose(&mut cycle, &judged, &cancel).await else {
                // Cancelled while waiting for a token: what was judged is still written.
                drop(cycle.turn.take());
                let outcomes = cycle.in_turn.all_with(judged.settlements);
                self.outbox.settle(outcomes).await?;
                break;
            };
            let Judged {
                settlements,
                retries,
                ..
            } = judged;
            let Some(marked) = self
                .record(&mut cycle, settlements, &choice.picked, &cancel)
                .await
            else {
                break;
            };
            self.send_marked(&mut cycle, retries, marked, choice.token);
            self.open_admission(&mut cycle.state, &cancel);
            if !self
                .wait(&mut cycle, &mut wakes, choice.next_wake, &cancel)
                .await
            {
                break;
            }
        }
        self.end_admission().await;
        self.drain(cycle).await
    }

    /// Step 1: the answers that came in since the last turn, judged (those already given
    /// to the open turn included). A pause of every lane (429, credentials) starts now.
    async fn judge_answers(&self, cycle: &mut Cycle) -> Judged {
        let mut judged = self.judge(&mut cycle.state, std::mem::take(&mut cycle.done));
        judged.absorb(std::mem::take(&mut cycle.in_turn.judged));
        if let Some(pause) = judged.pause {
            // Saving the pause is a write of its own: none while a turn is open.
            drop(cycle.turn.take());
            let until = Instant::now().checked_add(pause);
            cycle.state.paused_until = cycle.state.paused_until.max(until);
            self.save_pause(pause, judged.credentials_pause).await;
        }
        judged
    }

    /// Step 2: the lane heads that may go out now (round-robin, none in a pause, none in
    /// backoff, none held), and a token for them; `None` when cancelled while waiting for
    /// the token.
    async fn choose(
        &self,
        cycle: &mut Cycle,
        judged: &Judged,
        cancel: &CancellationToken,
    ) -> Option<Choice> {
        let state = &mut cycle.state;
        let now = Instant::now();
        let mut choice = Choice {
            picked: Vec::new(),
            token: None,
            next_wake: state.paused_until.filter(|t| *t > now),
        };
        if choice.next_wake.is_some() {
            return Some(choice);
        }
        state.paused_until = None;
        let settling: HashSet<MessageId> = judged
            .settlements
            .iter()
            .chain(cycle.in_turn.outcomes.iter().flat_map(|chunk| chunk.iter()))
            .map(|s| s.id)
            .collect();
        let (picked, wake_at) = match self.pick(state, now, &judged.delivered, &settling) {
            Ok(picked) => {
                if std::mem::take(&mut state.unreadable) {
                    tracing::info!("The outbox can be read again; delivering.");
                }
                picked
            }
            // The outbox is being reopened after a write error (a full disk): nothing goes
            // out until it can be read; the outcomes are kept by write_turn until they are
            // written.
            Err(e) => {
                if !std::mem::replace(&mut state.unreadable, true) {
                    tracing::error!(error = %e, "Cannot read the outbox; nothing is sent until it can be read again.");
                }
                (
                    Vec::new(),
                    now.checked_add(crate::backoff::STORE_WRITE.initial()),
                )
            }
        };
        choice.next_wake = wake_at;
        if picked.is_empty() {
            return Some(choice);
        }
        if self.client.tokens.cached().is_none() {
            // Fetching a token may take long; ingest must not wait for it.
            drop(cycle.turn.take());
        }
        match self.token(cancel).await? {
            Ok(t) => {
                if cycle.state.token_failures > 0 || self.stats.last_error().is_some() {
                    self.stats.set_last_error(None);
                }
                cycle.state.token_failures = 0;
                choice.picked = picked;
                choice.token = Some(t);
            }
            Err(e) => {
                // Saving the pause below is a write of its own.
                drop(cycle.turn.take());
                self.stats.set_last_error(Some(e.to_string()));
                let pause = if e.is_rejection() {
                    self.log_credentials_pause(&e.to_string(), self.policy.auth_pause);
                    self.policy.auth_pause
                } else {
                    let wait = self.policy.backoff.delay(cycle.state.token_failures);
                    cycle.state.token_failures = cycle.state.token_failures.saturating_add(1);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                        "Cannot get a D365 access token; nothing was sent, will try again.");
                    wait
                };
                cycle.state.paused_until = Instant::now().checked_add(pause);
                self.save_pause(pause, e.is_rejection()).await;
                choice.next_wake = cycle.state.paused_until;
            }
        }
        Some(choice)
    }

    /// Step 3: one write and one flush for the outcomes and the `sending` marks of what
    /// was chosen (the open turn's, when one is open). Returns the records marked; `None`
    /// when cancelled while the disk refused the write.
    async fn record(
        &self,
        cycle: &mut Cycle,
        settlements: Vec<Settlement>,
        picked: &[LaneHead],
        cancel: &CancellationToken,
    ) -> Option<Vec<Record>> {
        let ids: Vec<MessageId> = picked.iter().map(|(_, id)| *id).collect();
        let write_started = Instant::now();
        let writes = !settlements.is_empty() || cycle.turn.is_some() || !ids.is_empty();
        let marked = self
            .write_turn(
                cycle.turn.take(),
                &mut cycle.in_turn,
                settlements,
                ids,
                cancel,
            )
            .await?;
        if writes {
            cycle.last_write = write_started.elapsed();
        }
        if marked.len() < picked.len() {
            self.unmarked(&mut cycle.state, picked, &marked);
        }
        Some(marked)
    }

    /// Step 4: with the outcomes on disk the lanes move on: messages to retry wait for
    /// their backoff, the marked ones go out.
    fn send_marked(
        &self,
        cycle: &mut Cycle,
        retries: Vec<(MessageId, Duration)>,
        marked: Vec<Record>,
        token: Option<Token>,
    ) {
        let now = Instant::now();
        for (id, wait) in retries {
            if let Some(t) = now.checked_add(wait) {
                cycle.state.not_before.insert(id, t);
            }
        }
        if let Some(token) = token {
            if let Some(budget) = &mut cycle.state.budget {
                budget.spend(now, marked.len());
                self.stats
                    .budget_used
                    .store(budget.used(now) as u64, Ordering::Relaxed);
            }
            let started = self.start(&mut cycle.state, &mut cycle.tasks, marked, token);
            cycle.state.batches.started(started);
        }
    }

    /// Step 5: waits for the next answer (and, briefly, the others sent with it), an
    /// operator's action, a heartbeat or `next_wake`. False when cancelled.
    async fn wait(
        &self,
        cycle: &mut Cycle,
        wakes: &mut Wakes,
        next_wake: Option<Instant>,
        cancel: &CancellationToken,
    ) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => return false,
            Some(joined) = cycle.tasks.join_next_with_id() => self.collect_answers(cycle, joined).await,
            Ok(()) = wakes.outbox_changes.changed() => self.recheck_held(&mut cycle.state),
            _ = wakes.heartbeat_ticks.tick() => self.recheck_held(&mut cycle.state),
            _ = crate::backoff::sleep_until(next_wake), if next_wake.is_some() => {}
        }
        true
    }

    /// An answer came: takes it and every other one ready, judges them into the open turn,
    /// and waits a moment for the requests sent together with it (group commit).
    async fn collect_answers(&self, cycle: &mut Cycle, joined: Joined) {
        let state = &mut cycle.state;
        let mut seen = HashSet::new();
        let round_trip = {
            let task = match &joined {
                Ok((task, _)) => *task,
                Err(e) => e.id(),
            };
            let batch = state.batches.batch_of.get(&task).copied();
            state.batches.round_trip(&batch.into_iter().collect())
        };
        state.batches.collect(joined, &mut seen, &mut cycle.done);
        while let Some(more) = cycle.tasks.try_join_next_with_id() {
            state.batches.collect(more, &mut seen, &mut cycle.done);
        }
        // The turn that records these outcomes opens now and takes them as they come
        // (outbox/turn.rs): only the marks and the commit are left for after the last of
        // them.
        if cycle.turn.is_none() && cycle.in_turn.outcomes.is_empty() {
            cycle.turn = self.outbox.begin_turn();
        }
        self.judge_into(
            &mut cycle.state,
            &mut cycle.done,
            cycle.turn.as_ref(),
            &mut cycle.in_turn,
        );
        // Group commit: the requests that went out together with one that has finished
        // are waited for (briefly) so their outcomes share its write. Measured with 50
        // lanes and a fast D365: without it the lanes split into two groups that
        // alternate, about 25 outcomes per write and two writes in every message's wait.
        // Requests sent later are not waited for, and only while a write costs much
        // against a round trip: with a slow D365 (answers after 50 ms) waiting added
        // itself to every round trip (89 % of the in-flight bound instead of 94 %), where
        // small writes as answers come cost little. Up to twice the last write: what is
        // left of a write once its turn is filled while answers come is short against the
        // spread of a group's answers, and a group split in two pays a second commit.
        let linger = if cycle.last_write * 10 > round_trip {
            (cycle.last_write * 2).min(LINGER_MAX)
        } else {
            Duration::ZERO
        };
        let linger_until = Instant::now() + linger;
        while cycle.state.batches.waiting(&seen) {
            match tokio::time::timeout_at(linger_until, cycle.tasks.join_next_with_id()).await {
                Ok(Some(more)) => {
                    cycle
                        .state
                        .batches
                        .collect(more, &mut seen, &mut cycle.done);
                    self.judge_into(
                        &mut cycle.state,
                        &mut cycle.done,
                        cycle.turn.as_ref(),
                        &mut cycle.in_turn,
                    );
                }
                _ => break,
            }
        }
    }

    /// At the end: the requests in flight get `drain_grace` to finish and their outcomes
    /// are written; the rest are abandoned (uncertain at the next start).
    async fn drain(&self, mut cycle: Cycle) -> Result<(), StoreError> {
        let tasks = &mut cycle.tasks;
        if tasks.is_empty() {
            return Ok(());
        }
        tracing::info!(
            in_flight = tasks.len(),
            grace_s = self.drain_grace.as_secs_f64(),
            "Waiting for requests in flight to finish."
        );
        let deadline = Instant::now() + self.drain_grace;
        while let Ok(Some(joined)) =
            tokio::time::timeout_at(deadline, tasks.join_next_with_id()).await
        {
            let mut finished = vec![joined];
            while let Some(more) = tasks.try_join_next_with_id() {
                finished.push(more);
            }
            let judged = self.judge(&mut cycle.state, finished);
            self.outbox.settle(judged.settlements).await?;
        }
        if !tasks.is_empty() {
            tracing::warn!(abandoned = tasks.len(), "Abandoned requests still in flight at shutdown; they will be marked uncertain at the next start.");
            tasks.abort_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
