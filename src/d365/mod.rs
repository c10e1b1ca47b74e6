//! The dispatcher: drains the outbox to D365.
//!
//! - One lane per production order; only the head of a lane is sent, and at most one
//!   request per order is in flight (D365 processes an order's messages in arrival order).
//! - At most `max_in_flight` requests across all orders.
//! - A message is marked `sending` on disk before its request goes out.
//! - What follows each outcome is decided by [`retry::decide`]; a 429 or a credentials
//!   problem pauses every lane, since D365's limits and credentials are per user.
//! - A `failed` or `uncertain` head holds its order; other orders keep flowing.
//!
//! Backoff deadlines live in memory (tokio time): after a restart every queued message is
//! tried at once, which is what an operator restarting the service expects.

pub mod client;
pub mod retry;
pub mod token;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AmbiguousPolicy, DispatcherConfig};
use crate::outbox::{MessageId, Outbox, OutboxError, Record, State};
use crate::systemd::Heartbeat;
use client::D365Client;
use retry::{Backoff, Context, Decision, Outcome};

/// Who the gateway is in a message's history.
const GATEWAY: &str = "gateway";

/// Counters the dispatcher keeps for the operator surface and for the watchdog.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
    pub uncertain: AtomicU64,
    pub throttled: AtomicU64,
}

#[derive(Debug)]
pub struct Dispatcher {
    outbox: Outbox,
    client: Arc<D365Client>,
    config: DispatcherConfig,
    backoff: Backoff,
    wake: Arc<Notify>,
    stats: Arc<DispatchStats>,
    /// How long in-flight requests may finish after cancellation before they are abandoned.
    drain_grace: Duration,
    /// Beaten on every turn of the loop, for the systemd watchdog.
    heartbeat: Option<Heartbeat>,
}

struct Finished {
    record: Record,
    outcome: Outcome,
    decision: Decision,
}

impl Dispatcher {
    pub fn new(
        outbox: Outbox,
        client: Arc<D365Client>,
        config: DispatcherConfig,
        wake: Arc<Notify>,
        drain_grace: Duration,
    ) -> Result<Dispatcher, retry::InvalidBackoff> {
        Ok(Dispatcher {
            backoff: Backoff::try_new(config.backoff_initial, config.backoff_max)?,
            outbox,
            client,
            config,
            wake,
            stats: Arc::default(),
            drain_grace,
            heartbeat: None,
        })
    }

    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Dispatcher {
        self.heartbeat = Some(heartbeat);
        self
    }

    pub fn stats(&self) -> Arc<DispatchStats> {
        self.stats.clone()
    }

    /// Messages found `sending` were interrupted by a crash or a kill: they may have
    /// reached D365. They become `uncertain` (or are queued again where the message
    /// type's policy is `resend`).
    async fn recover_interrupted(&self) -> Result<(), OutboxError> {
        for mut r in self.outbox.list(Some(State::Sending), None)? {
            match self.config.ambiguous_policy(&r.message_type) {
                AmbiguousPolicy::Hold => {
                    tracing::warn!(message_id = r.id, order = %r.production_order, message_type = %r.message_type,
                        "Message was being sent when the gateway stopped; D365 may have it. Marked uncertain: check the MES page, then `outbox resolve` or `outbox retry`.");
                    r.change(
                        State::Uncertain,
                        GATEWAY,
                        "interrupted",
                        Some(
                            "the gateway stopped while the request may have been on the wire"
                                .into(),
                        ),
                    );
                    self.stats.uncertain.fetch_add(1, Ordering::Relaxed);
                }
                AmbiguousPolicy::Resend => {
                    r.change(State::Queued, GATEWAY, "interrupted, resending", Some("the gateway stopped while the request may have been on the wire; policy resend".into()));
                }
            }
            self.outbox.put(&r).await?;
        }
        Ok(())
    }

    pub async fn run(self, cancel: CancellationToken) -> Result<(), OutboxError> {
        self.recover_interrupted().await?;
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut not_before: HashMap<MessageId, Instant> = HashMap::new();
        let mut paused_until: Option<Instant> = None;
        let mut held_reported: HashSet<MessageId> = HashSet::new();
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        let mut heartbeat_ticks = tokio::time::interval(
            self.heartbeat
                .as_ref()
                .map_or(crate::systemd::DEFAULT_HEARTBEAT_PERIOD, Heartbeat::period),
        );

        loop {
            if let Some(hb) = &self.heartbeat {
                hb.beat();
            }
            let now = Instant::now();
            let mut next_wake = paused_until.filter(|t| *t > now);
            if next_wake.is_none() {
                paused_until = None;
                for head in self.outbox.lane_heads() {
                    if in_flight.len() >= self.config.max_in_flight {
                        break;
                    }
                    match head.state {
                        State::Queued => {}
                        State::Failed | State::Uncertain => {
                            if held_reported.insert(head.id) {
                                tracing::warn!(order = %head.production_order, message_id = head.id, state = %head.state,
                                    "Order is held: its first message needs an operator (outbox retry, cancel or resolve); later messages of this order wait.");
                            }
                            continue;
                        }
                        _ => continue,
                    }
                    if in_flight.contains(&head.production_order) {
                        continue;
                    }
                    if let Some(t) = not_before.get(&head.id).copied() {
                        if t > now {
                            next_wake = Some(next_wake.map_or(t, |w| w.min(t)));
                            continue;
                        }
                    }
                    let mut record = head;
                    record.state = State::Sending;
                    record.updated_at = jiff::Timestamp::now();
                    self.outbox.put(&record).await?;
                    in_flight.insert(record.production_order.clone());
                    tasks.spawn(send_one(
                        self.client.clone(),
                        record,
                        self.context_for_send(),
                    ));
                }
            }

            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(joined) = tasks.join_next() => {
                    let finished = match joined {
                        Ok(f) => f,
                        Err(e) => {
                            // A send task cannot panic on input; if it did, the record stays
                            // `sending` and becomes uncertain at the next start.
                            tracing::error!(error = %e, "A send task ended abnormally.");
                            continue;
                        }
                    };
                    in_flight.remove(&finished.record.production_order);
                    held_reported.remove(&finished.record.id);
                    if let Some(pause) = self.apply(finished, &mut not_before).await? {
                        let until = Instant::now() + pause;
                        paused_until = Some(paused_until.map_or(until, |p| p.max(until)));
                    }
                }
                _ = self.wake.notified() => {}
                _ = heartbeat_ticks.tick() => {}
                _ = sleep_until(next_wake), if next_wake.is_some() => {}
            }
        }

        if !tasks.is_empty() {
            tracing::info!(
                in_flight = tasks.len(),
                grace_s = self.drain_grace.as_secs_f64(),
                "Waiting for requests in flight to finish."
            );
            let deadline = Instant::now() + self.drain_grace;
            while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, tasks.join_next()).await
            {
                if let Ok(finished) = joined {
                    self.apply(finished, &mut not_before).await?;
                }
            }
            if !tasks.is_empty() {
                tracing::warn!(abandoned = tasks.len(), "Abandoned requests still in flight at shutdown; they will be marked uncertain at the next start.");
                tasks.abort_all();
            }
        }
        Ok(())
    }

    fn context_for_send(&self) -> SendPolicy {
        SendPolicy {
            max_attempts: self.config.max_attempts,
            throttle_fallback: self.config.throttle_fallback,
            auth_pause: self.config.auth_pause,
            per_type: self.config.ambiguous_per_type.clone(),
            default: self.config.ambiguous_default,
        }
    }

    /// Records the outcome of one send; returns a pause for all lanes if one is due.
    async fn apply(
        &self,
        finished: Finished,
        not_before: &mut HashMap<MessageId, Instant>,
    ) -> Result<Option<Duration>, OutboxError> {
        let Finished {
            mut record,
            outcome,
            decision,
        } = finished;
        record.record_attempt(outcome.to_string());
        if matches!(outcome, Outcome::Http { status: 500, .. }) {
            record.server_errors += 1;
        }
        let id = record.id;
        let order = record.production_order.clone();
        let mut pause = None;
        match decision {
            Decision::Delivered => {
                record.last_error = None;
                record.change(State::Delivered, GATEWAY, "delivered", None);
                not_before.remove(&id);
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(message_id = id, %order, "Delivered.");
            }
            Decision::Retry { reason } => {
                let wait = self.backoff.delay(record.attempt_count.saturating_sub(1));
                tracing::info!(message_id = id, %order, attempt = record.attempt_count, retry_in_ms = wait.as_millis() as u64, %reason, "Delivery failed; will retry.");
                record.last_error = Some(reason);
                record.state = State::Queued;
                not_before.insert(id, Instant::now() + wait);
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Throttle { pause: p } => {
                tracing::warn!(
                    message_id = id,
                    pause_s = p.as_secs_f64(),
                    "D365 throttled the gateway (HTTP 429): pausing all deliveries."
                );
                record.last_error = Some(outcome.to_string());
                record.state = State::Queued;
                self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                pause = Some(p);
            }
            Decision::AuthPause { pause: p, reason } => {
                tracing::error!(message_id = id, pause_s = p.as_secs_f64(), %reason, "D365 authentication failed: pausing all deliveries. Messages are kept.");
                record.last_error = Some(reason);
                record.state = State::Queued;
                pause = Some(p);
            }
            Decision::RefreshToken => {
                // send_one handles the refresh itself; reaching here means it could not.
                record.state = State::Queued;
            }
            Decision::Failed { reason } => {
                tracing::warn!(message_id = id, %order, message_type = %record.message_type, %reason,
                    "D365 rejected a message: it is failed and holds its order. Fix it and run `outbox retry`, or `outbox cancel` it.");
                record.last_error = Some(reason.clone());
                record.change(State::Failed, GATEWAY, "failed", Some(reason));
                not_before.remove(&id);
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Uncertain { reason } => {
                tracing::warn!(message_id = id, %order, message_type = %record.message_type, %reason,
                    "No answer from D365 after the request was written: message is uncertain and holds its order. Check the MES page, then `outbox resolve` (it arrived) or `outbox retry` (it did not).");
                record.last_error = Some(reason.clone());
                record.change(State::Uncertain, GATEWAY, "uncertain", Some(reason));
                not_before.remove(&id);
                self.stats.uncertain.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.outbox.put(&record).await?;
        Ok(pause)
    }
}

#[derive(Debug, Clone)]
struct SendPolicy {
    max_attempts: u32,
    throttle_fallback: Duration,
    auth_pause: Duration,
    per_type: std::collections::BTreeMap<String, AmbiguousPolicy>,
    default: AmbiguousPolicy,
}

/// Sends one message; after a first 401 fetches a new token and sends once more.
async fn send_one(client: Arc<D365Client>, record: Record, policy: SendPolicy) -> Finished {
    let mut ctx = Context {
        server_errors_before: record.server_errors,
        token_refreshed: false,
        ambiguous: policy
            .per_type
            .get(&record.message_type)
            .copied()
            .unwrap_or(policy.default),
        max_attempts: policy.max_attempts,
        throttle_fallback: policy.throttle_fallback,
        auth_pause: policy.auth_pause,
    };
    loop {
        let (outcome, token) = client.send(&record).await;
        let decision = retry::decide(&outcome, &ctx);
        if decision == Decision::RefreshToken {
            if let Some(token) = token {
                tracing::info!(
                    message_id = record.id,
                    "D365 answered 401: fetching a new token and sending once more."
                );
                client.tokens.invalidate(&token).await;
                ctx.token_refreshed = true;
                continue;
            }
        }
        return Finished {
            record,
            outcome,
            decision,
        };
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
