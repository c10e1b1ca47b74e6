//! Which lane heads go out: the deadlines and the pause restored at start, the pause saved
//! on disk, picking heads round-robin past busy, backed-off and held lanes, and the held
//! heads (failed or uncertain), said once per change.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use super::state::{DispatchState, LaneHead};
use super::{wall_clock_after, Dispatcher, SavedPause, DISPATCHER_STATE};
use crate::outbox::{MessageId, Record, State};
use crate::store::StoreError;

impl Dispatcher {
    /// Backoff deadlines and the pause of every lane, from the outbox: a restart keeps
    /// waiting where the previous run was waiting, instead of retrying everything at once.
    pub(super) fn restore_deadlines(&self, state: &mut DispatchState) -> Result<(), StoreError> {
        let now = jiff::Timestamp::now();
        let left = |at: jiff::Timestamp| {
            Duration::try_from(at.duration_since(now))
                .ok()
                .filter(|d| !d.is_zero())
        };
        let mut held = Vec::new();
        for head in self.outbox.lane_heads(None, usize::MAX)? {
            // Held before this start (or just now, by an interrupted request, said above):
            // known, so not announced again by the first turn that meets it.
            if matches!(head.state, State::Failed | State::Uncertain) {
                state.held.insert(head.id);
                held.push(head.id.to_string());
            }
            if let Some(wait) = head
                .retry_at
                .filter(|_| head.state == State::Queued)
                .and_then(left)
            {
                if let Some(t) = Instant::now().checked_add(wait) {
                    state.not_before.insert(head.id, t);
                }
            }
        }
        let saved = self
            .outbox
            .store()
            .owners()
            .load(DISPATCHER_STATE)?
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
                state.paused_until = Instant::now().checked_add(wait);
            }
            None => {}
        }
        if !state.not_before.is_empty() {
            tracing::info!(
                waiting = state.not_before.len(),
                "Messages waiting for a retry keep their backoff."
            );
        }
        if !held.is_empty() {
            tracing::info!(orders = held.len(), messages = %held.join(", "),
                "Orders held by a message that needs an operator (failed or uncertain), as before the restart: outbox retry, cancel or resolve.");
        }
        Ok(())
    }

    /// Remembers a pause of every lane on disk (a failure to do so only costs an early
    /// retry after a restart).
    pub(super) async fn save_pause(&self, pause: Duration, credentials: bool) {
        let Some(until) = wall_clock_after(pause) else {
            return;
        };
        let bytes = serde_json::to_vec(&SavedPause { until, credentials }).unwrap_or_default();
        if let Err(e) = self
            .outbox
            .store()
            .owners()
            .save(DISPATCHER_STATE, bytes)
            .await
        {
            tracing::warn!(error = %e, "Cannot save the delivery pause; a restart would retry early.");
        }
    }

    /// Chooses the lane heads to send now, round-robin; returns them and when the next
    /// backoff deadline falls. `delivered` are heads whose delivery is being recorded in
    /// this turn: their successors may go out in the same write. Works on the lane index only
    /// (no record is read): [`Outbox::settle_and_mark`] marks only what is still queued,
    /// and [`Dispatcher::unmarked`] looks at the rest.
    pub(super) fn pick(
        &self,
        state: &mut DispatchState,
        now: Instant,
        delivered: &HashSet<MessageId>,
        settling: &HashSet<MessageId>,
    ) -> Result<(Vec<LaneHead>, Option<Instant>), StoreError> {
        // Heads an ingest commit is marking count as in flight (outbox admit.rs).
        let mut free = self
            .max_in_flight
            .saturating_sub(state.in_flight.len() + self.admission.pending());
        state.heads_left = true;
        if let Some(budget) = &mut state.budget {
            // Spent when the marked requests go out (send_marked), in this same turn.
            free = free.min(budget.available(now));
            self.stats.budget_used.store(
                budget.used(now) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            if free == 0 && state.in_flight.len() < self.max_in_flight {
                return Ok((Vec::new(), budget.next_free(now)));
            }
        }
        if let Some(outage) = &mut state.outage {
            // A probe that never went out (its message was settled another way) is over.
            if let Some(probe) = outage.probe {
                if !state.in_flight.values().any(|(id, _)| *id == probe) {
                    outage.probe = None;
                }
            }
            if outage.probe.is_some() {
                return Ok((Vec::new(), None));
            }
            if outage.next_probe > now {
                return Ok((Vec::new(), Some(outage.next_probe)));
            }
            free = free.min(1);
        }
        let mut next_wake: Option<Instant> = None;
        let mut picked = Vec::new();
        if free == 0 {
            return Ok((picked, next_wake));
        }
        // Busy lanes are passed over while reading; every other head that can be passed
        // over is in backoff or held: reading that many more than we can send finds the
        // sendable ones.
        let scan = free + state.not_before.len() + state.held.len();
        let busy = &state.busy_orders;
        let admission = &self.admission;
        // A head whose delivery this turn records comes back as the message after it,
        // which may go out in the same write.
        let heads = self.outbox.lane_head_ids(
            state.last_served.as_deref(),
            scan,
            // A head an ingest commit marked is the dispatcher's already: picked again it
            // would go out twice.
            |order| busy.contains(order) || admission.is_reserved(order),
            |id| delivered.contains(&id),
        )?;
        let read = heads.len();
        for (order, id) in heads {
            if picked.len() >= free {
                break;
            }
            if settling.contains(&id) {
                // Retried, failed or uncertain in this turn: not again right away.
                continue;
            }
            if state.held.contains(&id) {
                continue;
            }
            if let Some(t) = state.not_before.get(&id).copied() {
                if t > now {
                    next_wake = Some(next_wake.map_or(t, |w| w.min(t)));
                    continue;
                }
            }
            state.last_served = Some(order.clone());
            picked.push((order, id));
        }
        state.heads_left = picked.len() >= free || read >= scan;
        if let (Some(outage), Some((_, probe))) = (&mut state.outage, picked.first()) {
            outage.probe = Some(*probe);
        }
        Ok((picked, next_wake))
    }

    /// Heads that were picked but not marked: held (failed or uncertain, reported once),
    /// settled in this very turn, or a lane member a crash left behind (removed).
    pub(super) fn unmarked(
        &self,
        state: &mut DispatchState,
        picked: &[LaneHead],
        marked: &[Record],
    ) {
        let marked: HashSet<MessageId> = marked.iter().map(|r| r.id).collect();
        let mut stale = false;
        for (_, id) in picked.iter().filter(|(_, id)| !marked.contains(id)) {
            match self.outbox.get(*id) {
                Ok(head) if matches!(head.state, State::Failed | State::Uncertain) => {
                    if state.held.insert(head.id) {
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
    pub(super) fn recheck_held(&self, state: &mut DispatchState) {
        let outbox = &self.outbox;
        state.held.retain(|id| {
            outbox
                .get(*id)
                .is_ok_and(|r| matches!(r.state, State::Failed | State::Uncertain))
        });
    }
}
