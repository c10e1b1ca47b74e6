//! The dispatcher's working data: what it remembers between turns, the requests in flight
//! and the turn they went out in, and what a turn judged and chose.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::retry::{Decision, Outcome};
use crate::entra::Token;
use crate::outbox::{MessageId, OpenTurn, Record, Settlement};

/// A send task as the JoinSet hands it back.
pub(super) type Joined = Result<(tokio::task::Id, SendResult), tokio::task::JoinError>;

/// What a send task hands back.
pub(super) struct SendResult {
    pub(super) record: Record,
    pub(super) outcome: Outcome,
    pub(super) decision: Decision,
    /// The request went out twice (again with a fresh token after a 401): one more
    /// request spent from the budget.
    pub(super) resent: bool,
}

/// The working data of the delivery cycle ([`Dispatcher::run`]): what it remembers, the
/// requests in flight, the answers not yet judged, the open turn.
#[derive(Default)]
pub(super) struct Cycle {
    pub(super) state: DispatchState,
    pub(super) tasks: JoinSet<SendResult>,
    /// Answers taken from `tasks`, not yet judged.
    pub(super) done: Vec<Joined>,
    /// How long the last turn that wrote something took to write (group commit).
    pub(super) last_write: Duration,
    /// The next turn's write, open while the answers it records come in (outbox/turn.rs).
    pub(super) turn: Option<OpenTurn>,
    /// What was judged into the open turn so far.
    pub(super) in_turn: InTurn,
}

/// What wakes the cycle besides answers: a change in the outbox (an operator's action),
/// and the heartbeat.
pub(super) struct Wakes {
    pub(super) outbox_changes: tokio::sync::watch::Receiver<u64>,
    pub(super) heartbeat_ticks: tokio::time::Interval,
}

/// What a turn chose to send: the lane heads, the token for them (`None`: nothing goes
/// out), and when the cycle must look again at the latest.
pub(super) struct Choice {
    pub(super) picked: Vec<LaneHead>,
    pub(super) token: Option<Token>,
    pub(super) next_wake: Option<Instant>,
}

/// What the dispatcher remembers between turns (in memory; the per-order lists on disk are
/// the outbox's lanes).
#[derive(Default)]
pub(super) struct DispatchState {
    /// D365's request budget (budget.rs); `None` when configured `off`.
    pub(super) budget: Option<super::budget::Budget>,
    /// D365 does not answer (module doc of `retry.rs`): one probe at a time until it does.
    pub(super) outage: Option<Outage>,
    /// Orders with a request in flight, by the task that sends it.
    pub(super) in_flight: HashMap<tokio::task::Id, (MessageId, String)>,
    pub(super) busy_orders: HashSet<String>,
    /// Lane heads waiting for a retry: not before this instant.
    pub(super) not_before: HashMap<MessageId, Instant>,
    /// No request at all before this instant (429, credentials).
    pub(super) paused_until: Option<Instant>,
    /// Round-robin cursor: the order served last.
    pub(super) last_served: Option<String>,
    /// Lane heads that are failed or uncertain (reported once per incident).
    pub(super) held: HashSet<MessageId>,
    /// Consecutive failures to get a token from an unreachable endpoint.
    pub(super) token_failures: u32,
    /// The last attempt to read the lanes failed (reported once per incident).
    pub(super) unreadable: bool,
    /// The last pick stopped at its limit (in flight, budget): sendable heads may be
    /// waiting, so ingest commits do not mark new ones (admitted.rs).
    pub(super) heads_left: bool,
    /// Which requests went out together (see the run loop's group commit).
    pub(super) batches: SendBatches,
}

/// The requests in flight by the turn that sent them, so the outcome of one can wait
/// for the others sent with it. Entries live as long as their requests.
#[derive(Default)]
pub(super) struct SendBatches {
    pub(super) batch_of: HashMap<tokio::task::Id, u64>,
    /// Requests still in flight per batch, and when the batch went out.
    pub(super) in_flight: HashMap<u64, (usize, Instant)>,
    pub(super) next: u64,
}

impl SendBatches {
    pub(super) fn started(&mut self, tasks: Vec<tokio::task::Id>) {
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
    pub(super) fn finished(&mut self, task: tokio::task::Id) -> Option<u64> {
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
    pub(super) fn collect(
        &mut self,
        joined: Joined,
        seen: &mut HashSet<u64>,
        done: &mut Vec<Joined>,
    ) {
        let task = match &joined {
            Ok((task, _)) => *task,
            Err(e) => e.id(),
        };
        seen.extend(self.finished(task));
        done.push(joined);
    }

    /// The longest time since one of `batches` went out (while it is in flight).
    pub(super) fn round_trip(&self, batches: &HashSet<u64>) -> Duration {
        batches
            .iter()
            .filter_map(|b| self.in_flight.get(b))
            .map(|(_, at)| at.elapsed())
            .max()
            .unwrap_or_default()
    }

    /// Whether a request of one of `batches` is still in flight.
    pub(super) fn waiting(&self, batches: &HashSet<u64>) -> bool {
        batches.iter().any(|b| self.in_flight.contains_key(b))
    }
}

/// A lane's first message: (production order, message id).
pub(super) type LaneHead = (String, MessageId);

/// What the requests that finished in one turn mean.
#[derive(Default)]
pub(super) struct Judged {
    pub(super) settlements: Vec<Settlement>,
    /// The pause is for credentials D365 refused (not kept across a start).
    pub(super) credentials_pause: bool,
    /// A pause for every lane (429, credentials).
    pub(super) pause: Option<Duration>,
    /// Messages to try again after a backoff.
    pub(super) retries: Vec<(MessageId, Duration)>,
    /// Messages delivered in this turn.
    pub(super) delivered: HashSet<MessageId>,
}

impl Judged {
    /// Adds what `other` judged, but not its settlements (the caller keeps those).
    pub(super) fn absorb(&mut self, other: Judged) {
        self.credentials_pause |= other.credentials_pause;
        self.pause = self.pause.max(other.pause);
        self.retries.extend(other.retries);
        self.delivered.extend(other.delivered);
    }
}

/// How many answers are judged into the open turn at once: each step wakes its writer
/// thread, which costs CPU; the last answers go with the turn's end.
pub(super) const TURN_STEP: usize = 16;

/// What was judged into the open turn while its answers came in.
#[derive(Default)]
pub(super) struct InTurn {
    /// The outcomes given to the turn, as given.
    pub(super) outcomes: Vec<Arc<Vec<Settlement>>>,
    /// The rest of the judgement (no settlements), for the turn's end.
    pub(super) judged: Judged,
}

impl InTurn {
    /// Every outcome given to the turn, then `more`: to write them another way.
    pub(super) fn all_with(&mut self, more: Vec<Settlement>) -> Vec<Settlement> {
        let mut all: Vec<Settlement> = std::mem::take(&mut self.outcomes)
            .iter()
            .flat_map(|chunk| chunk.iter().cloned())
            .collect();
        all.extend(more);
        all
    }
}

/// D365 unavailable (connections refused, 502/503/504, nothing sent): D365's state, not a
/// message's. While it lasts one request at a time goes out, a probe, with backoff
/// between probes; the first answer releases every lane at once.
#[derive(Debug)]
pub(super) struct Outage {
    pub(super) since: Instant,
    /// Probes that failed since it began (the backoff between probes follows them).
    pub(super) failed_probes: u32,
    /// No probe before this instant.
    pub(super) next_probe: Instant,
    /// The message of the probe in flight.
    pub(super) probe: Option<MessageId>,
}
