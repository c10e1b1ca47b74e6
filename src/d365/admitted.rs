//! The dispatcher's side of admission (outbox admit.rs): when ingest commits may mark new
//! lane heads `sending` themselves, and taking what they marked.
//!
//! Admission is open only between the end of a turn and the start of the next: then every
//! outcome the dispatcher judged is on disk (so an order whose lane is empty on disk has
//! nothing in flight), and the turn's pick left no sendable head waiting (so a new arrival
//! never overtakes a lane that round-robin would serve first).

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::state::{Cycle, DispatchState};
use super::Dispatcher;
use crate::outbox::{Settle, Settlement};

/// The longest the dispatcher waits at its end for an ingest commit that is marking heads
/// for it (a commit takes about a millisecond).
const ADMITTED_AT_END: Duration = Duration::from_secs(5);

impl Dispatcher {
    /// At the start of a turn: no more marks by ingest commits until it ends, and the
    /// requests they marked go out now, as if this turn had marked them.
    pub(super) async fn take_admitted(&self, cycle: &mut Cycle, cancel: &CancellationToken) {
        self.admission.close();
        let marked = self.admission.take();
        if marked.is_empty() {
            return;
        }
        let token = match self.client.tokens.cached() {
            Some(t) => Some(t),
            None => {
                // Expired since admission opened: fetching may take long, and no write of
                // this turn may stay open meanwhile (nor while requeueing below).
                drop(cycle.turn.take());
                self.token(cancel).await.and_then(Result::ok)
            }
        };
        match token {
            Some(token) => self.send_marked(cycle, Vec::new(), marked, Some(token)),
            None => {
                self.requeue_unsent(marked, "no access token to send it with")
                    .await
            }
        }
    }

    /// At the end of a turn: opens admission for as many requests as may start now, or
    /// keeps it closed (module doc).
    pub(super) fn open_admission(&self, state: &mut DispatchState, cancel: &CancellationToken) {
        let now = Instant::now();
        let idle = !cancel.is_cancelled()
            && state.paused_until.is_none_or(|t| t <= now)
            && state.outage.is_none()
            && !state.unreadable
            && !state.heads_left
            && self.client.tokens.cached().is_some();
        if !idle {
            return;
        }
        let mut room = self
            .max_in_flight
            .saturating_sub(state.in_flight.len() + self.admission.pending());
        if let Some(budget) = &mut state.budget {
            room = room.min(budget.available(now));
        }
        self.admission.open(room);
    }

    /// At the dispatcher's end: no more marks, and what ingest commits marked but the
    /// dispatcher did not send goes back to `queued` (it never left).
    pub(super) async fn end_admission(&self) {
        let marked = self.admission.end(Instant::now() + ADMITTED_AT_END).await;
        self.outbox.withdraw_admission(&self.admission);
        if !marked.is_empty() {
            self.requeue_unsent(marked, "the gateway stopped before sending it")
                .await;
        }
    }

    async fn requeue_unsent(&self, marked: Vec<crate::outbox::Record>, why: &str) {
        let n = marked.len();
        let back: Vec<Settlement> = marked
            .into_iter()
            .map(|r| {
                let reason = format!("not sent: {why}");
                Settlement::unattempted(r.id, Settle::Requeue { reason })
            })
            .collect();
        if let Err(e) = self.outbox.settle(back).await {
            // Left `sending`: the next start finds them interrupted and says so.
            tracing::warn!(error = %e, messages = n, "Cannot put messages marked for sending back in the queue.");
        }
    }
}
