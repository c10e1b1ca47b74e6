//! What each answer means and how it is written: judging finished requests into
//! outcomes (as data, `retry.rs`), into the open turn as they come, the turn's write, the
//! token for the next requests, and the send tasks themselves with the pause gate they
//! check before writing a request.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::D365Client;
use super::retry::{self, Decision, Outcome, RetryPolicy, SendHistory};
use super::state::{DispatchState, InTurn, Joined, Judged, Outage, SendResult, TURN_STEP};
use super::{wall_clock_after, Dispatcher};
use crate::entra::Token;
use crate::outbox::{MessageId, OpenTurn, Record, Settle, Settlement};
use crate::systemd::Heartbeat;

impl Dispatcher {
    /// Writes a turn: the outcomes given to the open turn (if any) and `settlements`, and
    /// the `sending` marks of `marks`; returns the marked records once on disk. Through
    /// the open turn when it commits, else every outcome the ordinary way. When the disk
    /// refuses it (full, read-only), the outcomes are kept and written again with backoff,
    /// the marks are dropped (nothing goes out meanwhile), and the watchdog keeps being
    /// fed: waiting for the disk is not a hang. `None` when cancelled while waiting; the
    /// requests' messages then stay `sending` and are judged at the next start.
    pub(super) async fn write_turn(
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

    /// A token for the next requests; `None` when cancelled while waiting for it.
    pub(super) async fn token(
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
    pub(super) fn start(
        &self,
        state: &mut DispatchState,
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
            state.busy_orders.insert(order.clone());
            state.in_flight.insert(handle.id(), (id, order));
            started.push(handle.id());
        }
        started
    }

    /// Judges finished sends into the open turn, which applies their outcomes while the
    /// others come in; without one they stay in `done` for the next turn.
    pub(super) fn judge_into(
        &self,
        state: &mut DispatchState,
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
        let mut judged = self.judge(state, std::mem::take(done));
        let outcomes = Arc::new(std::mem::take(&mut judged.settlements));
        turn.settle(outcomes.clone());
        in_turn.outcomes.push(outcomes);
        in_turn.judged.absorb(judged);
    }

    /// Turns finished sends into settlements (written by the caller, with the next marks);
    /// frees their lanes in memory.
    pub(super) fn judge(&self, state: &mut DispatchState, done: Vec<Joined>) -> Judged {
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
                    let Some((id, order)) = state.in_flight.remove(&e.id()) else {
                        continue;
                    };
                    state.busy_orders.remove(&order);
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
            if let Some((_, order)) = state.in_flight.remove(&task) {
                state.busy_orders.remove(&order);
            }
            let SendResult {
                record,
                outcome,
                decision,
                resent,
            } = finished;
            if let (true, Some(budget)) = (resent, &mut state.budget) {
                budget.spend(Instant::now(), 1);
            }
            state.held.remove(&record.id);
            let id = record.id;
            let order = &record.production_order;
            // Any answer from D365 ends an outage; no answer keeps it (or starts it).
            if matches!(outcome, Outcome::Http { .. })
                && !matches!(decision, Decision::Unavailable { .. })
            {
                if let Some(outage) = state.outage.take() {
                    tracing::info!(
                        down_s = outage.since.elapsed().as_secs_f64(),
                        probes = outage.failed_probes + 1,
                        "D365 answers again: every order's messages go out now."
                    );
                }
            }
            let next = match decision {
                Decision::Delivered => {
                    state.not_before.remove(&id);
                    delivered.insert(id);
                    // A joined request delivers its members with it (outbox join.rs).
                    delivered.extend(record.members());
                    self.stats
                        .delivered
                        .fetch_add(1 + record.members().len() as u64, Ordering::Relaxed);
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
                Decision::Unavailable { reason } => {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    match &mut state.outage {
                        None => {
                            tracing::warn!(message_id = id, %reason,
                                "D365 is unavailable: one request at a time tries it until it answers; every message waits in the outbox.");
                            state.outage = Some(Outage {
                                since: now,
                                failed_probes: 0,
                                next_probe: now + self.policy.backoff.delay(0),
                                probe: None,
                            });
                        }
                        Some(outage) if outage.probe == Some(id) => {
                            outage.probe = None;
                            outage.failed_probes = outage.failed_probes.saturating_add(1);
                            outage.next_probe =
                                now + self.policy.backoff.delay(outage.failed_probes);
                            tracing::debug!(message_id = id, %reason, probes = outage.failed_probes, "D365 still unavailable.");
                        }
                        // Sent before the outage showed: its failure says nothing new.
                        Some(_) => {}
                    }
                    // No backoff of its own: it goes out when D365 answers a probe.
                    Settle::Retry { reason, at: None }
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
                    state.not_before.remove(&id);
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    Settle::Failed { reason }
                }
                Decision::Uncertain { reason } => {
                    tracing::warn!(message_id = id, %order, message_type = %record.message_type, %reason,
                        "No answer from D365 after the request was written: message is uncertain and holds its order. Check the MES page, then `outbox resolve` (it arrived) or `outbox retry` (it did not).");
                    state.not_before.remove(&id);
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
    pub(super) fn log_credentials_pause(&self, reason: &str, pause: Duration) {
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

/// Sends one message; after a first 401 fetches a new token and sends once more.
pub(super) async fn send_one(
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
                        resent: false,
                    };
                }
            }
        }
        return SendResult {
            record,
            outcome,
            decision,
            resent: token_refreshed,
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
