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
//!   predecessor's outcome is on disk.
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
//!   every lane in the outbox's state tree: a restart keeps waiting where the last run
//!   was waiting. When the disk refuses a write, the outcomes stay in memory and the
//!   write is retried; nothing is sent meanwhile.
//!
//! - The dispatcher wakes when the outbox changes (its change feed, [`Outbox::subscribe`]:
//!   an append by the pipeline, an operator's retry), when a request finishes, when a
//!   deadline falls, and on the heartbeat tick.
//!
//! Memory: the in-flight set (≤ `max_in_flight`), one backoff deadline per lane head that
//! is waiting for a retry, and the held heads.

pub mod client;
pub mod config;
pub mod retry;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::entra::Token;
use crate::outbox::{MessageId, OpenTurn, Outbox, OutboxError, Record, Settle, Settlement, State};
use crate::systemd::Heartbeat;
use client::D365Client;
use config::DispatcherConfig;
use retry::AmbiguousPolicy;
use retry::{Decision, Outcome, RetryPolicy, SendHistory};

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
            last_error: std::sync::Mutex::default(),
            // 10 ms … about 3 days.
            delivery_latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.01, 4.0, 14),
            ),
        }
    }
}

impl DispatchStats {
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
    /// Shared with every send task: the one copy of the `dispatcher` retry settings.
    policy: Arc<RetryPolicy>,
    /// Shared with every send task: no request is written while it is closed.
    gate: Arc<PauseGate>,
    stats: Arc<DispatchStats>,
    /// How long in-flight requests may finish after cancellation before they are abandoned.
    drain_grace: Duration,
    /// Beaten on every turn of the loop, for the systemd watchdog.
    heartbeat: Option<Heartbeat>,
}

/// A send task as the JoinSet hands it back.
type Joined = Result<(tokio::task::Id, SendResult), tokio::task::JoinError>;

/// What a send task hands back.
struct SendResult {
    record: Record,
    outcome: Outcome,
    decision: Decision,
}

/// The dispatcher loop's memory between turns.
#[derive(Default)]
struct Lanes {
    /// Orders with a request in flight, by the task that sends it.
    in_flight: HashMap<tokio::task::Id, (MessageId, String)>,
    busy_orders: HashSet<String>,
    /// Lane heads waiting for a retry: not before this instant.
    not_before: HashMap<MessageId, Instant>,
    /// No request at all before this instant (429, credentials).
    paused_until: Option<Instant>,
    /// Round-robin cursor: the order served last.
    last_served: Option<String>,
    /// Lane heads that are failed or uncertain (reported once per incident).
    held: HashSet<MessageId>,
    /// Consecutive failures to get a token from an unreachable endpoint.
    token_failures: u32,
    /// The last attempt to read the lanes failed (reported once per incident).
    unreadable: bool,
    /// Which requests went out together (see the run loop's group commit).
    batches: SendBatches,
}

/// The requests in flight by the turn that sent them, so the outcome of one can wait
/// for the others sent with it. Entries live as long as their requests.
#[derive(Default)]
struct SendBatches {
    batch_of: HashMap<tokio::task::Id, u64>,
    /// Requests still in flight per batch, and when the batch went out.
    in_flight: HashMap<u64, (usize, Instant)>,
    next: u64,
}

impl SendBatches {
    fn started(&mut self, tasks: Vec<tokio::task::Id>) {
        if tasks.is_empty() {
            return;
        }
        let batch = self.next;
        self.next += 1;
        self.in_flight.insert(batch, (tasks.len(), Instant::now()));
        for task in tasks {
            self.batch_of.insert(task, batch);
        }
    }

    /// A request finished; the batch it went out with.
    fn finished(&mut self, task: tokio::task::Id) -> Option<u64> {
        let batch = self.batch_of.remove(&task)?;
        if let Some((n, _)) = self.in_flight.get_mut(&batch) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&batch);
            }
        }
        Some(batch)
    }

    /// Files a finished request: its outcome into `done`, its batch into `seen`.
    fn collect(&mut self, joined: Joined, seen: &mut HashSet<u64>, done: &mut Vec<Joined>) {
        let task = match &joined {
            Ok((task, _)) => *task,
            Err(e) => e.id(),
        };
        seen.extend(self.finished(task));
        done.push(joined);
    }

    /// The longest time since one of `batches` went out (while it is in flight).
    fn round_trip(&self, batches: &HashSet<u64>) -> Duration {
        batches
            .iter()
            .filter_map(|b| self.in_flight.get(b))
            .map(|(_, at)| at.elapsed())
            .max()
            .unwrap_or_default()
    }

    /// Whether a request of one of `batches` is still in flight.
    fn waiting(&self, batches: &HashSet<u64>) -> bool {
        batches.iter().any(|b| self.in_flight.contains_key(b))
    }
}

impl Dispatcher {
    pub fn new(
        outbox: Outbox,
        client: Arc<D365Client>,
        config: DispatcherConfig,
        drain_grace: Duration,
    ) -> Dispatcher {
        Dispatcher {
            outbox,
            client,
            max_in_flight: config.max_in_flight,
            policy: Arc::new(config.retry),
            gate: Arc::default(),
            stats: Arc::default(),
            drain_grace,
            heartbeat: None,
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
    async fn recover_interrupted(&self) -> Result<(), OutboxError> {
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

    pub async fn run(self, cancel: CancellationToken) -> Result<(), OutboxError> {
        self.recover_interrupted().await?;
        let mut lanes = Lanes::default();
        self.restore_deadlines(&mut lanes)?;
        let mut tasks: JoinSet<SendResult> = JoinSet::new();
        let mut done = Vec::new();
        let mut outbox_changes = self.outbox.subscribe();
        let mut heartbeat_ticks = tokio::time::interval(
            self.heartbeat
                .as_ref()
                .map_or(crate::systemd::DEFAULT_HEARTBEAT_PERIOD, Heartbeat::period),
        );

        // How long the last turn that wrote something took to write (see below).
        let mut last_write = Duration::ZERO;
        // The next turn's write, open while the answers it records come in
        // (outbox/turn.rs), with what was judged into it so far.
        let mut turn: Option<OpenTurn> = None;
        let mut in_turn = InTurn::default();
        loop {
            self.beat();
            // One turn = one write and one flush: the outcomes of every request that has
            // finished, and the `sending` marks of every head that may go out now
            // (including the successors of the messages just delivered).
            let mut judged = self.judge(&mut lanes, std::mem::take(&mut done));
            judged.absorb(std::mem::take(&mut in_turn.judged));
            if let Some(pause) = judged.pause {
                // Saving the pause is a write of its own: none while a turn is open.
                drop(turn.take());
                let until = Instant::now().checked_add(pause);
                lanes.paused_until = lanes.paused_until.max(until);
                self.save_pause(pause, judged.credentials_pause).await;
            }
            let now = Instant::now();
            let mut next_wake = lanes.paused_until.filter(|t| *t > now);
            let mut picked = Vec::new();
            let mut token = None;
            if next_wake.is_none() {
                lanes.paused_until = None;
                let settling: HashSet<MessageId> = judged
                    .settlements
                    .iter()
                    .chain(in_turn.outcomes.iter().flat_map(|chunk| chunk.iter()))
                    .map(|s| s.id)
                    .collect();
                let (p, wake_at) = match self.pick(&mut lanes, now, &judged.delivered, &settling) {
                    Ok(picked) => {
                        if std::mem::take(&mut lanes.unreadable) {
                            tracing::info!("The outbox can be read again; delivering.");
                        }
                        picked
                    }
                    // The outbox is being reopened after a write error (a full disk):
                    // nothing goes out until it can be read; the outcomes below are
                    // kept by write_turn until they are written.
                    Err(e) => {
                        if !std::mem::replace(&mut lanes.unreadable, true) {
                            tracing::error!(error = %e, "Cannot read the outbox; nothing is sent until it can be read again.");
                        }
                        (
                            Vec::new(),
                            now.checked_add(crate::backoff::STORE_WRITE.initial()),
                        )
                    }
                };
                next_wake = wake_at;
                if !p.is_empty() {
                    if self.client.tokens.cached().is_none() {
                        // Fetching a token may take long; ingest must not wait for it.
                        drop(turn.take());
                    }
                    match self.token(&cancel).await {
                        Some(Ok(t)) => {
                            if lanes.token_failures > 0 || self.stats.last_error().is_some() {
                                self.stats.set_last_error(None);
                            }
                            lanes.token_failures = 0;
                            picked = p;
                            token = Some(t);
                        }
                        Some(Err(e)) => {
                            // Saving the pause below is a write of its own.
                            drop(turn.take());
                            self.stats.set_last_error(Some(e.to_string()));
                            let pause = if e.is_rejection() {
                                self.log_credentials_pause(&e.to_string(), self.policy.auth_pause);
                                self.policy.auth_pause
                            } else {
                                let wait = self.policy.backoff.delay(lanes.token_failures);
                                lanes.token_failures = lanes.token_failures.saturating_add(1);
                                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                                    "Cannot get a D365 access token; nothing was sent, will try again.");
                                wait
                            };
                            lanes.paused_until = Instant::now().checked_add(pause);
                            self.save_pause(pause, e.is_rejection()).await;
                            next_wake = lanes.paused_until;
                        }
                        None => {
                            drop(turn.take());
                            let outcomes = in_turn.all_with(judged.settlements);
                            self.outbox.settle(outcomes).await?;
                            break;
                        }
                    }
                }
            }
            let ids: Vec<MessageId> = picked.iter().map(|(_, id)| *id).collect();
            let write_started = Instant::now();
            let writes = !judged.settlements.is_empty() || turn.is_some() || !ids.is_empty();
            let Some(marked) = self
                .write_turn(turn.take(), &mut in_turn, judged.settlements, ids, &cancel)
                .await
            else {
                break;
            };
            if writes {
                last_write = write_started.elapsed();
            }
            if marked.len() < picked.len() {
                self.unmarked(&mut lanes, &picked, &marked);
            }
            // Only now, with the outcomes on disk, may the lanes move on.
            let now = Instant::now();
            for (id, wait) in judged.retries {
                if let Some(t) = now.checked_add(wait) {
                    lanes.not_before.insert(id, t);
                }
            }
            if let Some(token) = token {
                let started = self.start(&mut lanes, &mut tasks, marked, token);
                lanes.batches.started(started);
            }

            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(joined) = tasks.join_next_with_id() => {
                    let mut seen = HashSet::new();
                    let round_trip = {
                        let task = match &joined {
                            Ok((task, _)) => *task,
                            Err(e) => e.id(),
                        };
                        let batch = lanes.batches.batch_of.get(&task).copied();
                        lanes.batches.round_trip(&batch.into_iter().collect())
                    };
                    lanes.batches.collect(joined, &mut seen, &mut done);
                    while let Some(more) = tasks.try_join_next_with_id() {
                        lanes.batches.collect(more, &mut seen, &mut done);
                    }
                    // The turn that records these outcomes opens now and takes them as
                    // they come (outbox/turn.rs): only the marks and the commit are left
                    // for after the last of them.
                    if turn.is_none() && in_turn.outcomes.is_empty() {
                        turn = self.outbox.begin_turn();
                    }
                    self.judge_into(&mut lanes, &mut done, turn.as_ref(), &mut in_turn);
                    // Group commit: the requests that went out together with one that has
                    // finished are waited for (briefly) so their outcomes share its write.
                    // Measured with 50 lanes and a fast D365: without it the lanes split
                    // into two groups that alternate, about 25 outcomes per write and two
                    // writes in every message's wait. Requests sent later are not waited
                    // for, and only while a write costs much against a round trip: with
                    // a slow D365 (answers after 50 ms) waiting added itself to every
                    // round trip (89 % of the in-flight bound instead of 94 %), where
                    // small writes as answers come cost little. Up to twice the last
                    // write: what is left of a write once its turn is filled while
                    // answers come is short against the spread of a group's answers,
                    // and a group split in two pays a second commit.
                    let linger = if last_write * 10 > round_trip {
                        (last_write * 2).min(LINGER_MAX)
                    } else {
                        Duration::ZERO
                    };
                    let linger_until = Instant::now() + linger;
                    while lanes.batches.waiting(&seen) {
                        match tokio::time::timeout_at(linger_until, tasks.join_next_with_id()).await {
                            Ok(Some(more)) => {
                                lanes.batches.collect(more, &mut seen, &mut done);
                                self.judge_into(&mut lanes, &mut done, turn.as_ref(), &mut in_turn);
                            }
                            _ => break,
                        }
                    }
                }
                Ok(()) = outbox_changes.changed() => self.recheck_held(&mut lanes),
                _ = heartbeat_ticks.tick() => self.recheck_held(&mut lanes),
                _ = crate::backoff::sleep_until(next_wake), if next_wake.is_some() => {}
            }
        }

        if !tasks.is_empty() {
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
                let judged = self.judge(&mut lanes, finished);
                self.outbox.settle(judged.settlements).await?;
            }
            if !tasks.is_empty() {
                tracing::warn!(abandoned = tasks.len(), "Abandoned requests still in flight at shutdown; they will be marked uncertain at the next start.");
                tasks.abort_all();
            }
        }
        Ok(())
    }

    /// Backoff deadlines and the pause of every lane, from the outbox: a restart keeps
    /// waiting where the previous run was waiting, instead of retrying everything at once.
    fn restore_deadlines(&self, lanes: &mut Lanes) -> Result<(), OutboxError> {
        let now = jiff::Timestamp::now();
        let left = |at: jiff::Timestamp| {
            Duration::try_from(at.duration_since(now))
                .ok()
                .filter(|d| !d.is_zero())
        };
        for head in self.outbox.lane_heads(None, usize::MAX)? {
            if let Some(wait) = head
                .retry_at
                .filter(|_| head.state == State::Queued)
                .and_then(left)
            {
                if let Some(t) = Instant::now().checked_add(wait) {
                    lanes.not_before.insert(head.id, t);
                }
            }
        }
        let saved = self
            .outbox
            .load_state(DISPATCHER_STATE)?
            .and_then(|b| serde_json::from_slice::<SavedPause>(&b).ok());
        match saved.and_then(|p| Some((left(p.until)?, p.credentials))) {
            Some((_, true)) => tracing::info!(
                "Deliveries were paused because D365 refused the credentials: trying the configured ones now."
            ),
            Some((wait, false)) => {
                tracing::info!(
                    pause_s = wait.as_secs_f64(),
                    "Deliveries stay paused (D365 throttling) as before the restart."
                );
                lanes.paused_until = Instant::now().checked_add(wait);
            }
            None => {}
        }
        if !lanes.not_before.is_empty() {
            tracing::info!(
                waiting = lanes.not_before.len(),
                "Messages waiting for a retry keep their backoff."
            );
        }
        Ok(())
    }

    /// Remembers a pause of every lane on disk (a failure to do so only costs an early
    /// retry after a restart).
    async fn save_pause(&self, pause: Duration, credentials: bool) {
        let Some(until) = wall_clock_after(pause) else {
            return;
        };
        let bytes = serde_json::to_vec(&SavedPause { until, credentials }).unwrap_or_default();
        if let Err(e) = self.outbox.save_state(DISPATCHER_STATE, bytes).await {
            tracing::warn!(error = %e, "Cannot save the delivery pause; a restart would retry early.");
        }
    }

    /// Writes a turn: the outcomes given to the open turn (if any) and `settlements`, and
    /// the `sending` marks of `marks`; returns the marked records once on disk. Through
    /// the open turn when it commits, else every outcome the ordinary way. When the disk
    /// refuses it (full, read-only), the outcomes are kept and written again with backoff,
    /// the marks are dropped (nothing goes out meanwhile), and the watchdog keeps being
    /// fed: waiting for the disk is not a hang. `None` when cancelled while waiting; the
    /// requests' messages then stay `sending` and are judged at the next start.
    async fn write_turn(
        &self,
        turn: Option<OpenTurn>,
        in_turn: &mut InTurn,
        settlements: Vec<Settlement>,
        marks: Vec<MessageId>,
        cancel: &CancellationToken,
    ) -> Option<Vec<Record>> {
        let settlements = match turn {
            Some(turn) => {
                let last = Arc::new(settlements);
                match turn.finish(last.clone(), marks.clone()).await {
                    Ok((_, marked)) => {
                        in_turn.outcomes.clear();
                        return Some(marked);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot record the outcomes as they came in; writing them again.")
                    }
                }
                Arc::try_unwrap(last).unwrap_or_else(|shared| (*shared).clone())
            }
            None => settlements,
        };
        // Rolled back or never opened: every outcome, the ordinary way.
        let settlements = in_turn.all_with(settlements);
        let mut wait = crate::backoff::STORE_WRITE.start();
        let mut marks = &marks[..];
        loop {
            match self.outbox.settle_and_mark(&settlements, marks).await {
                Ok((_, marked)) => return Some(marked),
                Err(e) => {
                    tracing::error!(error = %e, outcomes = settlements.len(), retry_in_ms = wait.next_wait().as_millis() as u64,
                        "Cannot record delivery outcomes in the outbox; keeping them and retrying. Nothing is sent meanwhile.");
                    marks = &[];
                    let pause = async {
                        match &self.heartbeat {
                            Some(hb) => hb.sleep_beating(wait.fail()).await,
                            None => tokio::time::sleep(wait.fail()).await,
                        }
                    };
                    tokio::select! {
                        _ = pause => {}
                        _ = cancel.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Chooses the lane heads to send now, round-robin; returns them and when the next
    /// backoff deadline falls. `delivered` are heads whose delivery is being recorded in
    /// this turn: their successors may go out in the same write. Works on the lane index only
    /// (no record is read): [`Outbox::settle_and_mark`] marks only what is still queued,
    /// and [`Dispatcher::unmarked`] looks at the rest.
    fn pick(
        &self,
        lanes: &mut Lanes,
        now: Instant,
        delivered: &HashSet<MessageId>,
        settling: &HashSet<MessageId>,
    ) -> Result<(Vec<LaneHead>, Option<Instant>), OutboxError> {
        let free = self.max_in_flight.saturating_sub(lanes.in_flight.len());
        let mut next_wake: Option<Instant> = None;
        let mut picked = Vec::new();
        if free == 0 {
            return Ok((picked, next_wake));
        }
        // Busy lanes are passed over while reading; every other head that can be passed
        // over is in backoff or held: reading that many more than we can send finds the
        // sendable ones.
        let scan = free + lanes.not_before.len() + lanes.held.len();
        let busy = &lanes.busy_orders;
        // A head whose delivery this turn records comes back as the message after it,
        // which may go out in the same write.
        let heads = self.outbox.lane_head_ids(
            lanes.last_served.as_deref(),
            scan,
            |order| busy.contains(order),
            |id| delivered.contains(&id),
        )?;
        for (order, id) in heads {
            if picked.len() >= free {
                break;
            }
            if settling.contains(&id) {
                // Retried, failed or uncertain in this turn: not again right away.
                continue;
            }
            if lanes.held.contains(&id) {
                continue;
            }
            if let Some(t) = lanes.not_before.get(&id).copied() {
                if t > now {
                    next_wake = Some(next_wake.map_or(t, |w| w.min(t)));
                    continue;
                }
            }
            lanes.last_served = Some(order.clone());
            picked.push((order, id));
        }
        Ok((picked, next_wake))
    }

    /// Heads that were picked but not marked: held (failed or uncertain, reported once),
    /// settled in this very turn, or a lane member a crash left behind (removed).
    fn unmarked(&self, lanes: &mut Lanes, picked: &[LaneHead], marked: &[Record]) {
        let marked: HashSet<MessageId> = marked.iter().map(|r| r.id).collect();
        let mut stale = false;
        for (_, id) in picked.iter().filter(|(_, id)| !marked.contains(id)) {
            match self.outbox.get(*id) {
                Ok(head) if matches!(head.state, State::Failed | State::Uncertain) => {
                    if lanes.held.insert(head.id) {
                        tracing::warn!(order = %head.production_order, message_id = head.id, state = %head.state,
                            "Order is held: its first message needs an operator (outbox retry, cancel or resolve); later messages of this order wait.");
                    }
                }
                Ok(head) if head.state.is_terminal() => stale = true,
                Ok(_) => {}
                Err(_) => stale = true,
            }
        }
        if stale {
            // Reading the heads takes terminal messages out of their lanes.
            let _ = self.outbox.lane_heads(None, usize::MAX);
        }
    }

    /// Forgets held heads an operator has acted on (retried: queued again).
    fn recheck_held(&self, lanes: &mut Lanes) {
        let outbox = &self.outbox;
        lanes.held.retain(|id| {
            outbox
                .get(*id)
                .is_ok_and(|r| matches!(r.state, State::Failed | State::Uncertain))
        });
    }

    /// A token for the next requests; `None` when cancelled while waiting for it.
    async fn token(
        &self,
        cancel: &CancellationToken,
    ) -> Option<Result<Token, crate::entra::TokenError>> {
        let fetch = self.client.tokens.get();
        tokio::pin!(fetch);
        let mut ticks = tokio::time::interval(
            self.heartbeat
                .as_ref()
                .map_or(crate::systemd::DEFAULT_HEARTBEAT_PERIOD, Heartbeat::period),
        );
        loop {
            tokio::select! {
                t = &mut fetch => return Some(t),
                _ = cancel.cancelled() => return None,
                // Waiting for the token endpoint is progress of a kind.
                _ = ticks.tick() => self.beat(),
            }
        }
    }

    /// Starts the requests of messages just marked `sending`.
    fn start(
        &self,
        lanes: &mut Lanes,
        tasks: &mut JoinSet<SendResult>,
        marked: Vec<Record>,
        token: Token,
    ) -> Vec<tokio::task::Id> {
        let mut started = Vec::with_capacity(marked.len());
        for record in marked {
            let order = record.production_order.clone();
            let id = record.id;
            let handle = tasks.spawn(send_one(
                self.client.clone(),
                record,
                token.clone(),
                self.policy.clone(),
                self.gate.clone(),
            ));
            lanes.busy_orders.insert(order.clone());
            lanes.in_flight.insert(handle.id(), (id, order));
            started.push(handle.id());
        }
        started
    }

    /// Judges finished sends into the open turn, which applies their outcomes while the
    /// others come in; without one they stay in `done` for the next turn.
    fn judge_into(
        &self,
        lanes: &mut Lanes,
        done: &mut Vec<Joined>,
        turn: Option<&OpenTurn>,
        in_turn: &mut InTurn,
    ) {
        let Some(turn) = turn else {
            return;
        };
        if done.len() < TURN_STEP {
            return;
        }
        let mut judged = self.judge(lanes, std::mem::take(done));
        let outcomes = Arc::new(std::mem::take(&mut judged.settlements));
        turn.settle(outcomes.clone());
        in_turn.outcomes.push(outcomes);
        in_turn.judged.absorb(judged);
    }

    /// Turns finished sends into settlements (written by the caller, with the next marks);
    /// frees their lanes in memory.
    fn judge(&self, lanes: &mut Lanes, done: Vec<Joined>) -> Judged {
        let mut settlements = Vec::with_capacity(done.len());
        let mut pause: Option<Duration> = None;
        let mut credentials_pause = false;
        let mut retries = Vec::new();
        let mut delivered = HashSet::new();
        for joined in done {
            let (task, finished) = match joined {
                Ok(ok) => ok,
                Err(e) => {
                    // A send task cannot panic on input; if one did, free its lane and
                    // hold the message as uncertain: its request may have been written.
                    let Some((id, order)) = lanes.in_flight.remove(&e.id()) else {
                        continue;
                    };
                    lanes.busy_orders.remove(&order);
                    tracing::error!(message_id = id, %order, error = %e, "A send task ended abnormally; the message is uncertain.");
                    self.stats.uncertain.fetch_add(1, Ordering::Relaxed);
                    settlements.push(Settlement {
                        id,
                        attempt: Some(format!("send task failed: {e}")),
                        server_error: false,
                        next: Settle::Uncertain {
                            reason: format!(
                                "the send task failed ({e}); the request may have been written"
                            ),
                        },
                        as_sent: None,
                    });
                    continue;
                }
            };
            // One request in flight per order (pick passes busy orders over).
            if let Some((_, order)) = lanes.in_flight.remove(&task) {
                lanes.busy_orders.remove(&order);
            }
            let SendResult {
                record,
                outcome,
                decision,
            } = finished;
            lanes.held.remove(&record.id);
            let id = record.id;
            let order = &record.production_order;
            let next = match decision {
                Decision::Delivered => {
                    lanes.not_before.remove(&id);
                    delivered.insert(id);
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    self.stats.delivery_latency.observe(
                        jiff::Timestamp::now()
                            .duration_since(record.created_at)
                            .as_secs_f64()
                            .max(0.0),
                    );
                    tracing::debug!(message_id = id, %order, "Delivered.");
                    Settle::Delivered
                }
                Decision::Retry { reason } => {
                    let wait = self.policy.backoff.delay(record.attempt_count);
                    tracing::info!(message_id = id, %order, attempt = record.attempt_count + 1, retry_in_ms = wait.as_millis() as u64, %reason, "Delivery failed; will retry.");
                    retries.push((id, wait));
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    Settle::Retry {
                        reason,
                        at: wall_clock_after(wait),
                    }
                }
                Decision::Throttle { pause: p } => {
                    tracing::warn!(
                        message_id = id,
                        pause_s = p.as_secs_f64(),
                        "D365 throttled the gateway (HTTP 429): pausing all deliveries."
                    );
                    self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    pause = pause.max(Some(p));
                    Settle::Retry {
                        reason: outcome.to_string(),
                        at: None,
                    }
                }
                Decision::AuthPause { pause: p, reason } => {
                    self.log_credentials_pause(&reason, p);
                    credentials_pause = true;
                    pause = pause.max(Some(p));
                    Settle::Retry { reason, at: None }
                }
                Decision::RefreshToken => {
                    // send_one refreshes the token itself; reaching here means it could not.
                    Settle::Retry {
                        reason: outcome.to_string(),
                        at: None,
                    }
                }
                Decision::Failed { reason } => {
                    tracing::warn!(message_id = id, %order, message_type = %record.message_type, %reason,
                        "D365 rejected a message: it is failed and holds its order. Fix it and run `outbox retry`, or `outbox cancel` it.");
                    lanes.not_before.remove(&id);
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    Settle::Failed { reason }
                }
                Decision::Uncertain { reason } => {
                    tracing::warn!(message_id = id, %order, message_type = %record.message_type, %reason,
                        "No answer from D365 after the request was written: message is uncertain and holds its order. Check the MES page, then `outbox resolve` (it arrived) or `outbox retry` (it did not).");
                    lanes.not_before.remove(&id);
                    self.stats.uncertain.fetch_add(1, Ordering::Relaxed);
                    Settle::Uncertain { reason }
                }
            };
            settlements.push(Settlement {
                id,
                attempt: Some(outcome.to_string()),
                server_error: matches!(outcome, Outcome::Http { status: 500, .. }),
                next,
                as_sent: Some(Box::new(record)),
            });
        }
        Judged {
            settlements,
            credentials_pause,
            pause,
            retries,
            delivered,
        }
    }

    /// Says what happened, until when nothing is sent, what to fix, and how to try again
    /// at once: an operator should not have to guess or wait out the pause.
    fn log_credentials_pause(&self, reason: &str, pause: Duration) {
        let until = wall_clock_after(pause)
            .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
            .unwrap_or_default();
        tracing::error!(
            %reason,
            pause_s = pause.as_secs_f64(),
            next_attempt = %until,
            "D365 refused the credentials: no message is sent until {until} (messages are kept). \
             Fix the client secret ({}) or the app registration in Microsoft Entra ID, then run \
             `systemctl reload mes-gateway` (SIGHUP) to try again at once.",
            self.client.secret_origin()
        );
    }
}

/// A lane's first message: (production order, message id).
type LaneHead = (String, MessageId);

/// What the requests that finished in one turn mean.
#[derive(Default)]
struct Judged {
    settlements: Vec<Settlement>,
    /// The pause is for credentials D365 refused (not kept across a start).
    credentials_pause: bool,
    /// A pause for every lane (429, credentials).
    pause: Option<Duration>,
    /// Messages to try again after a backoff.
    retries: Vec<(MessageId, Duration)>,
    /// Messages delivered in this turn.
    delivered: HashSet<MessageId>,
}

impl Judged {
    /// Adds what `other` judged, but not its settlements (the caller keeps those).
    fn absorb(&mut self, other: Judged) {
        self.credentials_pause |= other.credentials_pause;
        self.pause = self.pause.max(other.pause);
        self.retries.extend(other.retries);
        self.delivered.extend(other.delivered);
    }
}

/// How many answers are judged into the open turn at once: each step wakes its writer
/// thread, which costs CPU; the last answers go with the turn's end.
const TURN_STEP: usize = 16;

/// What was judged into the open turn while its answers came in.
#[derive(Default)]
struct InTurn {
    /// The outcomes given to the turn, as given.
    outcomes: Vec<Arc<Vec<Settlement>>>,
    /// The rest of the judgement (no settlements), for the turn's end.
    judged: Judged,
}

impl InTurn {
    /// Every outcome given to the turn, then `more`: to write them another way.
    fn all_with(&mut self, more: Vec<Settlement>) -> Vec<Settlement> {
        let mut all: Vec<Settlement> = std::mem::take(&mut self.outcomes)
            .iter()
            .flat_map(|chunk| chunk.iter().cloned())
            .collect();
        all.extend(more);
        all
    }
}

/// Sends one message; after a first 401 fetches a new token and sends once more.
async fn send_one(
    client: Arc<D365Client>,
    record: Record,
    mut token: Token,
    policy: Arc<RetryPolicy>,
    gate: Arc<PauseGate>,
) -> SendResult {
    let mut token_refreshed = false;
    loop {
        let history = SendHistory {
            message_type: &record.message_type,
            server_errors_before: record.server_errors,
            token_refreshed,
        };
        gate.wait_open().await;
        let outcome = client.send(&record, &token).await;
        let decision = retry::decide(&outcome, &history, &policy);
        if let Decision::Throttle { pause } | Decision::AuthPause { pause, .. } = &decision {
            gate.close_for(*pause);
        }
        if decision == Decision::RefreshToken {
            tracing::info!(
                message_id = record.id,
                "D365 answered 401: fetching a new token and sending once more."
            );
            client.tokens.invalidate(&token).await;
            token_refreshed = true;
            match client.tokens.get().await {
                Ok(fresh) => {
                    token = fresh;
                    continue;
                }
                Err(e) => {
                    let outcome = Outcome::Token {
                        rejected: e.is_rejection(),
                        detail: e.to_string(),
                    };
                    let history = SendHistory {
                        token_refreshed,
                        ..history
                    };
                    let decision = retry::decide(&outcome, &history, &policy);
                    return SendResult {
                        record,
                        outcome,
                        decision,
                    };
                }
            }
        }
        return SendResult {
            record,
            outcome,
            decision,
        };
    }
}

/// The pause of every lane as the send tasks see it (see the module doc): closed by the
/// task that reads a 429 or a second 401, the moment it reads it; checked by every task
/// right before it writes a request. The dispatcher's own pause keeps lanes from being
/// picked; this closes the gap until the dispatcher hears of it.
#[derive(Debug, Default)]
pub struct PauseGate {
    closed_until: std::sync::Mutex<Option<Instant>>,
}

impl PauseGate {
    /// Closes the gate for `pause` from now (a longer pause already set stays).
    pub fn close_for(&self, pause: Duration) {
        let until = Instant::now().checked_add(pause);
        let mut closed = self.closed_until.lock().unwrap_or_else(|p| p.into_inner());
        *closed = (*closed).max(until);
    }

    /// Returns once the gate is open.
    pub async fn wait_open(&self) {
        loop {
            let until = *self.closed_until.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::NewMessage;

    #[tokio::test]
    async fn an_outcome_waits_only_for_the_requests_sent_with_it() {
        let mut set: JoinSet<()> = JoinSet::new();
        let (a, b, c) = (
            set.spawn(async {}).id(),
            set.spawn(async {}).id(),
            set.spawn(async {}).id(),
        );
        let mut batches = SendBatches::default();
        batches.started(vec![a, b]);
        batches.started(vec![c]);
        batches.started(Vec::new());
        let first = batches.finished(a);
        assert_eq!(first, Some(0));
        let seen: HashSet<u64> = first.into_iter().collect();
        assert!(
            batches.waiting(&seen),
            "b went out with a and is still in flight"
        );
        assert_eq!(batches.finished(b), Some(0));
        assert!(
            !batches.waiting(&seen),
            "c went out later: a's write does not wait for it"
        );
        assert!(batches.waiting(&HashSet::from([1])));
        assert_eq!(batches.finished(c), Some(1));
        assert_eq!(batches.finished(c), None, "each request is filed once");
        assert!(batches.batch_of.is_empty() && batches.in_flight.is_empty());
        set.shutdown().await;
    }

    /// A D365 stand-in over real HTTP: every odd SendMessage (the 1st, 3rd, …) gets a
    /// 429 without Retry-After, every even one a 200; it notes when it answered each.
    async fn throttling_d365() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Instant>>>) {
        use axum::routing::post;
        let answered: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let seen = answered.clone();
        let app = axum::Router::new()
            .route(
                "/token",
                post(|| async { r#"{"access_token":"t","expires_in":3600}"# }),
            )
            .route(
                "/api/services/SysMessageServices/SysMessageService/SendMessage",
                post(move || {
                    let seen = seen.clone();
                    async move {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Instant::now());
                        if seen.len() % 2 == 1 {
                            axum::http::StatusCode::TOO_MANY_REQUESTS
                        } else {
                            axum::http::StatusCode::OK
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, answered)
    }

    /// A request prepared in the same turn as one that gets a 429 (its task runs only
    /// after the 429 was read: a busy CPU) must not go out inside the pause: D365 counts
    /// it against the same throttle. The task that reads the 429 closes the gate before it
    /// reports back, so this holds whatever the dispatcher loop is doing meanwhile.
    /// 50 rounds with two threads spinning on this 2-core machine's cores; the bound is
    /// measured from when the stand-in answered 429, which is before the gateway read it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_prepared_before_a_429_is_read_waits_for_the_pause() {
        const PAUSE: Duration = Duration::from_millis(100);
        let (addr, answered) = throttling_d365().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("gateway.yaml"),
            format!("d365:\n  base_url: http://{addr}\n  company: USMF\n  client_id: x\n  token_url: http://{addr}/token\n  client_secret_file: secret\ndispatcher:\n  throttle_fallback: 100ms\nstorage:\n  data_dir: data\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("secret"), "s\n").unwrap();
        let config = crate::settings::load(dir.path()).unwrap();
        let client = Arc::new(D365Client::new(Arc::new(config.d365.clone().unwrap())).unwrap());
        let token = client.tokens.get().await.unwrap();
        let policy = Arc::new(config.dispatcher.retry.clone());
        let record = |id: u64, order: &str| {
            let new = crate::outbox::NewMessage {
                production_order: order.into(),
                message_type: "ProdProductionOrderStart".into(),
                content: format!(r#"{{"ProductionOrderNumber":"{order}"}}"#),
                origin: "test".into(),
                line: None,
            };
            Record::new(id, &new, jiff::Timestamp::now())
        };
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let spinners: Vec<_> = (0..2)
            .map(|_| {
                let busy = busy.clone();
                std::thread::spawn(move || {
                    while busy.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();

        for round in 0..50u64 {
            let gate = Arc::new(PauseGate::default());
            let first = send_one(
                client.clone(),
                record(2 * round + 1, "P1"),
                token.clone(),
                policy.clone(),
                gate.clone(),
            )
            .await;
            assert_eq!(first.decision, Decision::Throttle { pause: PAUSE });
            // Another lane's task, spawned in the same turn, runs only now.
            let second = send_one(
                client.clone(),
                record(2 * round + 2, "P2"),
                token.clone(),
                policy.clone(),
                gate,
            )
            .await;
            assert_eq!(second.decision, Decision::Delivered);
            let answered = answered.lock().unwrap().clone();
            let (throttled, next) = (
                answered[2 * round as usize],
                answered[2 * round as usize + 1],
            );
            assert!(
                next >= throttled + PAUSE,
                "round {round}: a request went out {:?} after the 429, inside the pause",
                next - throttled
            );
        }
        busy.store(false, Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
    }

    #[tokio::test]
    async fn a_send_task_that_panics_frees_its_lane_and_leaves_the_message_uncertain() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("gateway.yaml"),
            "d365:\n  base_url: http://127.0.0.1:9\n  company: USMF\n  client_id: x\n  token_url: http://127.0.0.1:9/token\n  client_secret_file: secret\nstorage:\n  data_dir: data\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("secret"), "s\n").unwrap();
        let config = crate::settings::load(dir.path()).unwrap();
        let outbox = Outbox::open(&config.storage.data_dir).unwrap();
        let client = Arc::new(D365Client::new(Arc::new(config.d365.clone().unwrap())).unwrap());
        let dispatcher = Dispatcher::new(
            outbox.clone(),
            client,
            config.dispatcher.clone(),
            Duration::from_secs(1),
        );
        let r = outbox
            .append(vec![NewMessage {
                production_order: "P1".into(),
                message_type: "ProdProductionOrderStart".into(),
                content: r#"{"ProductionOrderNumber":"P1"}"#.into(),
                origin: "test".into(),
                line: None,
            }])
            .await
            .unwrap()
            .remove(0);
        outbox.mark_sending(&[r.id]).await.unwrap();

        let mut lanes = Lanes::default();
        let mut tasks: JoinSet<SendResult> = JoinSet::new();
        let handle = tasks.spawn(async { panic!("a send task panicked (test)") });
        lanes.busy_orders.insert("P1".into());
        lanes.in_flight.insert(handle.id(), (r.id, "P1".into()));
        let joined = tasks.join_next_with_id().await.unwrap();
        let judged = dispatcher.judge(&mut lanes, vec![joined]);
        assert!(
            lanes.in_flight.is_empty() && lanes.busy_orders.is_empty(),
            "the order's lane is free again"
        );
        outbox.settle(judged.settlements).await.unwrap();
        let after = outbox.get(r.id).unwrap();
        assert_eq!(after.state, State::Uncertain);
        assert!(after
            .last_error
            .unwrap()
            .contains("the request may have been written"));
    }
}
