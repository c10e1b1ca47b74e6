//! The durable outbox: every message the gateway builds is stored here before anything
//! else happens to it, and stays until it is delivered (then pruned after the retention
//! period) or cancelled by an operator.
//!
//! The outbox owns the state machine: callers never write a record, they ask for a
//! transition ([`Outbox::commit`], [`Outbox::mark_sending`], [`Outbox::settle`], the
//! operator actions), and each call is one write and one flush whatever the number of
//! messages in it (group commit: batching is what makes it fast). The dispatcher's turn
//! may also be written while its answers come in ([`Outbox::begin_turn`], turn.rs): still
//! one transaction and one flush, with the same promises.
//!
//! # On disk
//!
//! ```text
//! tables of the store (crate::store) this module owns:
//!   table "messages":  key = message id (u64, big-endian)
//!                     value = format version (1 byte) ++ JSON of Record
//!   table "lane_ends", "lane_links": the messages that are not terminal, per order a
//!                     linked list in id order (see lanes.rs; table "lanes" held the
//!                     layout before December 2026 and is converted at the first open)
//!   table "sending":   key = id of a message marked `sending`, value = when (i128 BE,
//!                     nanoseconds since 1970): the mark lives here, not in the record
//!                     (see "Marks and deliveries" below)
//!   table "delivered": key = id of a message the dispatcher delivered, value = when (i128
//!                     BE, nanoseconds since 1970) ++ the attempt's outcome (UTF-8): the
//!                     delivery lives here, not in the record, until the record is
//!                     written again or pruned (see "Marks and deliveries" below)
//!   table "done":      one key per delivered or cancelled message:
//!                     key = last change as whole seconds since 1970 (i64 BE, sign bit
//!                     flipped) ++ id (u64 BE), value = the state (1 byte) ++ the
//!                     content digest (u64 BE, when the record has one) ++ a joined
//!                     request's content digest (u64 BE, a group's lead, join.rs)
//!                     — what pruning and the counts at open read, without decoding records
//!   table "contents", "rejected", "unmatched": D365's verdicts (see verdict.rs)
//!   table "state":     key "outbox.next_id": the id the next new message gets
//! ```
//!
//! Ids are consecutive (1, 2, 3, … across restarts: operators type and read them aloud).
//! The next id is kept in the state table and written in the same transaction as the
//! messages that took the ids before it, so id order is append order and no id is given
//! twice, even after the newest messages were pruned. Per production order the outbox is a FIFO queue: the *lane* of an order is
//! its non-terminal messages in id order, and only the head of a lane may be sent.
//!
//! # Marks and deliveries
//!
//! Marking a message `sending` writes one small key in the "sending" table instead of
//! rewriting its record: the record stays `queued` on disk, and every read of a record
//! (`record_in`, the scans) lays the mark over it (state `sending`, `updated_at` the
//! mark's time). Any later write of the record (its outcome) removes the mark in the same
//! transaction. Why: the dispatcher marks one head in each of dozens of orders per write;
//! those records lie in dozens of B-tree leaves, each rewritten and flushed for a change
//! of one field, while the marks (at most one per lane) share one leaf. Measured in
//! docs/performance.md.
//!
//! A delivery by the dispatcher (an answer 2xx, not counted as a server error) is kept the
//! same way: the "delivered" table holds its time and outcome, and a read replays it over
//! the record with `deliver_at`, the very function that computed the record the
//! dispatcher was given. A later full write of the record (D365's verdict) includes it and
//! removes the key; pruning removes both. Its keys are small and lie in a few leaves,
//! where each record would have had a leaf of its own.
//!
//! # Invariants
//!
//! - [`Outbox::commit`] writes new messages, their lane links, the upstream deliveries they
//!   came from and the rules engine's state in one transaction: after a crash all or
//!   none are there, so a counted piece is never lost between the engine and the outbox,
//!   nor reported twice, and a redelivered publish is recognised.
//! - Every call that writes returns only after its transaction is committed durably (one
//!   fsync), i.e. when the data is on disk. The exceptions say so ("not flushed"): they
//!   forget bookkeeping, and a crash merely keeps it a little longer.
//! - A message is marked `sending` on disk *before* its request goes out
//!   ([`Outbox::mark_sending`]), and its outcome is on disk ([`Outbox::settle`]) before the
//!   next message of its lane may be marked. A message found `sending` when the gateway
//!   starts may have reached D365; the dispatcher decides what that means, never a blind
//!   resend.
//! - Only the dispatcher marks `sending`, only lane heads it is not already sending, and
//!   only after [`Outbox::recover_interrupted`]: so a head found `sending` when marked was
//!   marked by a write of this process that failed after part of it reached the disk, and
//!   its request never left. Marking it again hands it back unchanged.
//! - After a failed write (a full disk) the store refuses every later one until it is
//!   reopened; the store then reopens it (what was committed is there) and the caller's
//!   retry writes the same records again: a retried [`Outbox::commit`] reuses the ids of
//!   its first attempt.
//! - States: `queued → sending → delivered | queued (retry) | failed | uncertain`;
//!   operators move `failed | uncertain → queued` (retry), `queued | failed | uncertain →
//!   cancelled`, and `uncertain → delivered` (resolve). Every change of state is recorded in
//!   the message's history; a transition from a state that does not allow it is refused.
//! - A record on disk may be older than what a read shows: a "sending" or "delivered" key
//!   holds its newer state, laid over it by every read. Every full write of a record
//!   removes its keys in the same transaction, and a key is never laid over a record
//!   whose stored state it does not follow (a mark only over `queued`, a delivery only
//!   over a record that is not terminal).
//! - A message is in its order's lane exactly while it is not terminal. A terminal
//!   record and its removal from the lane are one transaction; a store written by the
//!   engine before (sled, not atomic across tables) may hold a stale lane member, which
//!   [`Outbox::lane_heads`] removes when it meets it.
//! - A message's done key exists exactly while the message is terminal (written with the
//!   record in the same write, removed with it by pruning). A store written before this
//!   index existed gets it (and its lanes) built once, at the first open.
//! - Opening reads keys, not records: lane sizes, the head of each lane, the done index.
//!   A record that cannot be decoded is reported when it is read.
//! - Memory: per-state counts and nothing that grows with the backlog.
//! - redb types never leave `crate::store::kv`.
//!
//! # Files
//!
//! `ingest.rs` the one commit of new messages; `join.rs` joining an order's queued messages
//! into one request; `settle.rs` the dispatcher's marks and outcomes (`turn.rs` the same, written while a turn's answers come in); `actions.rs`
//! operators' transitions; `query.rs` listings; `index.rs` the done index, counts and
//! pruning; `lanes.rs` the per-order lists; `verdict.rs` D365's verdicts; `record.rs` the
//! record and its states.

mod actions;
mod admit;
pub mod config;
mod index;
mod ingest;
mod join;
mod lanes;
mod query;
mod record;
mod settle;
mod turn;
mod verdict;
mod writes;

pub use crate::store::publications::Publication;
pub use crate::store::receipts::{Receipt, ReceiptId, SeenEvent};
pub use actions::Sending;
pub use admit::Admission;
pub use join::JoinPolicy;
pub use query::ListFilter;
pub use record::{Attempt, Change, Group, MessageId, NewMessage, Record, State};
pub use turn::{OpenTurn, TURN_IDLE_MAX};
pub use verdict::{D365Verdict, ProcessedEvent, Reconciled, UnmatchedEvent, D365};
pub use writes::{WriteKind, WriteStats, WriteSummary};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::store::kv::{self, Kv, Span, T};
use crate::store::{storage, time_key, Store, StoreError};
use record::decode;
use settle::lay_over;

/// What one batch of upstream events produced, committed as one transaction.
#[derive(Debug, Default)]
pub struct Ingest {
    pub messages: Vec<NewMessage>,
    /// An owner's state (the rules engine's) to save with them.
    pub state: Option<(String, Vec<u8>)>,
    /// The receipts of the upstream deliveries whose result this is, recorded so a
    /// redelivery is known.
    pub receipts: Vec<Receipt>,
    /// Events known by their source's own id whose result this is.
    pub seen: Vec<SeenEvent>,
    /// D365's verdicts to record on the messages they name (see verdict.rs).
    pub processed: Vec<ProcessedEvent>,
    /// MQTT messages rules built, for the publisher.
    pub publications: Vec<Publication>,
    /// The records (ids, timestamps) of the first attempt to commit this batch. A retry
    /// after a failed write uses the same ones, so whatever of a failed attempt did reach
    /// the disk is overwritten with itself, never stored a second time under new ids.
    prepared: std::sync::OnceLock<Vec<Record>>,
}

impl Ingest {
    pub fn new(
        messages: Vec<NewMessage>,
        state: Option<(String, Vec<u8>)>,
        receipts: Vec<Receipt>,
    ) -> Ingest {
        Ingest {
            messages,
            state,
            receipts,
            seen: Vec::new(),
            processed: Vec::new(),
            publications: Vec::new(),
            prepared: std::sync::OnceLock::new(),
        }
    }

    pub fn with_seen(mut self, seen: Vec<SeenEvent>) -> Ingest {
        self.seen = seen;
        self
    }

    pub fn with_processed(mut self, processed: Vec<ProcessedEvent>) -> Ingest {
        self.processed = processed;
        self
    }

    pub fn with_publications(mut self, publications: Vec<Publication>) -> Ingest {
        self.publications = publications;
        self
    }

    /// New messages alone.
    pub fn of(messages: Vec<NewMessage>) -> Ingest {
        Ingest::new(messages, None, Vec::new())
    }

    fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.state.is_none()
            && self.receipts.is_empty()
            && self.seen.is_empty()
            && self.processed.is_empty()
            && self.publications.is_empty()
    }
}

/// What a commit stored: the new records, in order, and what became of each processed
/// event, in order.
#[derive(Debug, Default)]
pub struct Committed {
    pub records: Vec<Record>,
    pub reconciled: Vec<Reconciled>,
}

/// What became of one request: the dispatcher's decision, as a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    Delivered,
    /// Back to `queued` for another attempt, not before `at` (`None`: when the
    /// dispatcher's pause for every lane ends).
    Retry {
        reason: String,
        at: Option<jiff::Timestamp>,
    },
    Failed {
        reason: String,
    },
    Uncertain {
        reason: String,
    },
    /// Back to `queued` without an attempt (the request never left, e.g. abandoned before
    /// it was written).
    Requeue {
        reason: String,
    },
}

/// The outcome of one request for [`Outbox::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub id: MessageId,
    /// What happened, for the attempt list (`None`: no attempt was made).
    pub attempt: Option<String>,
    /// The attempt was answered by HTTP 500 (counted against `max_attempts`).
    pub server_error: bool,
    pub next: Settle,
    /// The record as [`Outbox::settle_and_mark`] marked it and the request was built from,
    /// when the caller still has it: spares reading and decoding it again (see
    /// `plan_settlements`). `None`: read from the store.
    pub as_sent: Option<Box<Record>>,
}

impl Settlement {
    /// A request D365 accepted (2xx), with `attempt` as the attempt list shows it.
    pub fn delivered(id: MessageId, attempt: impl Into<String>) -> Settlement {
        Settlement {
            id,
            attempt: Some(attempt.into()),
            server_error: false,
            next: Settle::Delivered,
            as_sent: None,
        }
    }

    /// `next` for a message whose request was never attempted by this run (interrupted by
    /// a stop, or never sent): nothing goes into its attempt list.
    pub fn unattempted(id: MessageId, next: Settle) -> Settlement {
        Settlement {
            id,
            attempt: None,
            server_error: false,
            next,
            as_sent: None,
        }
    }

    /// The same, with the record as it was marked and sent (see [`Settlement::as_sent`]).
    pub fn with_record_as_sent(mut self, record: Record) -> Settlement {
        self.as_sent = Some(Box::new(record));
        self
    }
}

/// Compaction thresholds (see [`Outbox::compact_if_worthwhile`]). A record with its
/// history takes well under 1 KiB in the store; the estimate errs on the large side so a store
/// full of live messages is never rewritten for nothing.
const COMPACT_MIN: u64 = 64 * 1024 * 1024;
const COMPACT_RATIO: u64 = 4;
const RECORD_BYTES_ESTIMATE: u64 = 1024;
const COMPACT_MAX_RECORDS: usize = 10_000;

/// Who the gateway is in a message's history.
pub const GATEWAY: &str = "gateway";

/// Keys of the old lane index converted per transaction at the first open.
const CONVERT_SLICE: usize = 50_000;
/// Set in the state table once the lane and done indexes cover every record.
const INDEXED: &[u8] = b"outbox.indexed";
/// The id the next new message gets (u64 BE), written with every commit.
const NEXT_ID: &[u8] = b"outbox.next_id";
/// Every id of a compacted store is above this number (u64 BE; written by compaction).
const ID_FLOOR: &[u8] = b"outbox.id_floor";

/// The message queue on top of the store. Cheap to clone: all clones share the store and
/// the counts.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
    counts: Arc<Mutex<BTreeMap<State, usize>>>,
    /// Undecodable records found when opening; kept on disk, reported, never sent.
    corrupt: Arc<Vec<MessageId>>,
    /// Bumped after every durable change, for whoever wants to watch the outbox
    /// (the dispatcher, the operator surface, tests) without polling.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// The id the next new message gets; see the module doc. Kept in memory for the life
    /// of the process, above every id handed out: a batch that took its ids and then hit
    /// a full disk is written after the store is reopened, and must keep them.
    next_id: Arc<AtomicU64>,
    /// Held while a record is read, checked against the state machine and written back
    /// (operator actions, the dispatcher's marks and outcomes): the operator service acts
    /// while the dispatcher runs, and a cancel that read `queued` must not overwrite the
    /// `sending` mark the dispatcher wrote meanwhile (nor the other way round).
    transitions: Arc<tokio::sync::Mutex<()>>,
    /// Whether new messages get a content index entry (see verdict.rs). Only D365's
    /// verdicts use it, and the index costs a table write per message (about 15 % of the
    /// CPU per message and 15 MiB of cache in the burst benchmark, measured on sled), so it is kept
    /// only while a `d365_events` source can deliver verdicts.
    index_contents: Arc<AtomicBool>,
    /// How long the durable writes take (for /metrics; see writes.rs).
    writes: Arc<WriteStats>,
    /// Which messages the dispatcher's marks join into one request (join.rs); nothing
    /// until the dispatcher says.
    joining: Arc<std::sync::RwLock<Arc<JoinPolicy>>>,
    /// The dispatcher's leave for ingest commits to mark new lane heads (admit.rs).
    admission: Arc<std::sync::RwLock<Option<Arc<Admission>>>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.store.path())
            .finish()
    }
}

fn key(id: MessageId) -> [u8; 8] {
    id.to_be_bytes()
}

/// A record as `rx` sees it (one read transaction for several records).
fn record_in(rx: &impl kv::Get, id: MessageId) -> Result<Record, StoreError> {
    let bytes = rx
        .get(T::Messages, &key(id))?
        .ok_or(StoreError::NotFound(id))?;
    let mut r = decode(&bytes).map_err(|e| storage(format!("message {id}: {e}")))?;
    lay_over(rx, &mut r)?;
    Ok(r)
}

impl Outbox {
    /// Opens (or creates) the store in `data_dir` and the outbox in it. Blocking: call it
    /// before starting work or from a blocking context. Opening reads keys, not records
    /// (see the invariants above).
    pub fn open(data_dir: &Path) -> Result<Outbox, StoreError> {
        Outbox::on(Store::open(data_dir)?)
    }

    /// The outbox in an open store: builds its indexes once for a store written before
    /// they existed, converts an old lane index, and counts the messages per state.
    pub fn on(store: Store) -> Result<Outbox, StoreError> {
        let mut corrupt = Vec::new();
        let next_id = store.write_here(|kv| prepare(kv, &mut corrupt))?;
        let counts = Arc::new(Mutex::new(index::count_states(&store.read()?)?));
        let recount = counts.clone();
        store.on_reopen(move |kv| match kv.read().and_then(|rx| index::count_states(&rx)) {
            Ok(fresh) => *recount.lock().unwrap_or_else(|p| p.into_inner()) = fresh,
            Err(e) => tracing::error!(error = %e, "Cannot count the outbox's messages after reopening it; the counts may be off until the next start."),
        });
        Ok(Outbox {
            store,
            counts,
            corrupt: Arc::new(corrupt),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
            next_id: Arc::new(AtomicU64::new(next_id)),
            transitions: Arc::default(),
            index_contents: Arc::default(),
            writes: Arc::default(),
            joining: Arc::new(std::sync::RwLock::new(Arc::new(JoinPolicy::off()))),
            admission: Arc::default(),
        })
    }

    /// The store the outbox lives in (its other tables: receipts, publications, owners).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How long the durable writes of new messages and of the dispatcher's turns take.
    pub fn write_stats(&self) -> Arc<WriteStats> {
        self.writes.clone()
    }

    /// Disk use of the store, in bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.store.disk_bytes()
    }

    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// Rewrites the store when it takes far more disk than what it holds (the file keeps
    /// its high-water mark after a drained backlog): more than `COMPACT_MIN` and more than
    /// `COMPACT_RATIO` times an estimate of the live data, and only once the backlog is
    /// gone (at most `COMPACT_MAX_RECORDS` records: copying them holds every other
    /// operation back for well under a second). Returns the disk use before and after, or
    /// `None` when it was not worth it.
    pub async fn compact_if_worthwhile(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let records: usize = self.counts().values().sum();
        if records > COMPACT_MAX_RECORDS {
            return Ok(None);
        }
        let before = self.disk_bytes();
        let live_estimate = records as u64 * RECORD_BYTES_ESTIMATE;
        if before <= COMPACT_MIN || before <= COMPACT_RATIO * live_estimate {
            return Ok(None);
        }
        self.compact().await.map(Some)
    }

    /// Rewrites the store into a fresh one (crash-safe). Every other operation waits
    /// meanwhile; ids of the new store start above every id this process handed out.
    /// Returns the disk use before and after, in bytes.
    pub async fn compact(&self) -> Result<(u64, u64), StoreError> {
        let floor = self.next_id.load(Ordering::Acquire).saturating_sub(1);
        self.store
            .compact(vec![(
                T::State,
                ID_FLOOR.to_vec(),
                floor.to_be_bytes().to_vec(),
            )])
            .await
    }

    /// A receiver that sees a new value after every durable change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn count(&self, from: Option<State>, to: Option<State>) {
        // A panic while holding this lock cannot leave the map half-updated (no await,
        // plain integer updates), so poisoning is ignored.
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = from.and_then(|s| counts.get_mut(&s)) {
            *n = n.saturating_sub(1);
        }
        if let Some(s) = to {
            *counts.entry(s).or_default() += 1;
        }
    }

    /// Messages still to be delivered (queued or on the wire).
    pub fn waiting(&self) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        [State::Queued, State::Sending]
            .iter()
            .filter_map(|s| counts.get(s))
            .sum()
    }

    /// Whether messages stored from now on get a content index entry, so D365's verdicts
    /// can find them (on while a `d365_events` source is configured).
    pub fn index_contents(&self, on: bool) {
        self.index_contents.store(on, Ordering::Release);
    }

    /// Which messages the dispatcher's marks join into one request from now on (join.rs).
    pub fn join_with(&self, policy: JoinPolicy) {
        *self.joining.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// Lets ingest commits mark new lane heads as `admission` allows (admit.rs), until
    /// [`Outbox::withdraw_admission`]. Set by the dispatcher that sends what they mark.
    pub fn admit_with(&self, admission: Arc<Admission>) {
        *self.admission.write().unwrap_or_else(|p| p.into_inner()) = Some(admission);
    }

    /// Whether an ingest commit would mark a new lane head now (admit.rs).
    pub fn admits(&self) -> bool {
        self.admission().is_some_and(|a| a.room() > 0)
    }

    /// Ends admission by `admission` if it is still the one in force.
    pub fn withdraw_admission(&self, admission: &Arc<Admission>) {
        let mut current = self.admission.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|a| Arc::ptr_eq(a, admission)) {
            *current = None;
        }
    }

    fn admission(&self) -> Option<Arc<Admission>> {
        self.admission
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn joining(&self) -> Arc<JoinPolicy> {
        self.joining
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn get(&self, id: MessageId) -> Result<Record, StoreError> {
        record_in(&self.store.read()?, id)
    }

    /// The (order, id) of the first message of up to `limit` lanes, round-robin from the
    /// order after `after`, without reading the records: what a dispatcher needs each turn.
    /// Lanes for which `skip(order)` holds (busy ones) are passed over and not counted.
    /// A head for which `moved_on(id)` holds (its delivery is being recorded) stands for
    /// the first message after it for which it does not, and its lane is left out when
    /// there is none; all in one read.
    pub fn lane_head_ids(
        &self,
        after: Option<&str>,
        limit: usize,
        skip: impl Fn(&str) -> bool,
        moved_on: impl Fn(MessageId) -> bool,
    ) -> Result<Vec<(String, MessageId)>, StoreError> {
        let rx = self.store.read()?;
        let mut out = Vec::new();
        'lanes: for (order, mut id) in lanes::heads(&rx, after, limit, skip)? {
            // A joined request's members are delivered with its lead.
            while moved_on(id) {
                match lanes::after(&rx, id)? {
                    Some(next) => id = next,
                    None => continue 'lanes,
                }
            }
            out.push((order, id));
        }
        Ok(out)
    }

    /// The first message of up to `limit` orders' lanes, starting with the order after
    /// `after` and wrapping around (round-robin when the caller passes the last order it
    /// served).
    pub fn lane_heads(&self, after: Option<&str>, limit: usize) -> Result<Vec<Record>, StoreError> {
        let kv = self.store.kv()?;
        loop {
            let mut out = Vec::new();
            let mut stale = false;
            let rx = kv.read()?;
            let heads = lanes::heads(&rx, after, limit, |_| false)?;
            for (order, id) in heads {
                match record_in(&rx, id) {
                    Ok(r) if !r.state.is_terminal() => out.push(r),
                    // A crash between writing a terminal record and taking it out of its lane
                    // (a store written by the engine before redb, whose writes were not
                    // atomic; today's writes are).
                    Ok(_) | Err(StoreError::NotFound(_)) => {
                        kv.write(true, |tx| lanes::remove(tx, &order, id))?;
                        stale = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !stale {
                return Ok(out);
            }
        }
    }

    /// The ids of an order's lane (messages not yet delivered or cancelled), FIFO.
    pub fn lane(&self, order: &str) -> Result<Vec<MessageId>, StoreError> {
        lanes::lane(&self.store.read()?, order)
    }

    /// When the oldest message still waiting to be delivered was created (the heads of the
    /// lanes are the oldest of their orders).
    pub fn oldest_pending(&self) -> Option<jiff::Timestamp> {
        self.lane_heads(None, usize::MAX)
            .ok()?
            .iter()
            .map(|r| r.created_at)
            .min()
    }

    /// Number of messages per state.
    pub fn counts(&self) -> BTreeMap<State, usize> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ids of records that could not be decoded when the outbox was opened.
    pub fn corrupt_records(&self) -> Vec<MessageId> {
        self.corrupt.as_ref().clone()
    }
}

/// The done index's value: the state, and the content digest pruning removes with it.
fn done_value(r: &Record) -> Vec<u8> {
    let mut v = vec![state_byte(r.state)];
    if let Some(digest) = r.content_digest {
        v.extend_from_slice(&digest.to_be_bytes());
        // A joined request's lead is also indexed under the request's content (join.rs).
        if let Some(Group::Lead {
            digest: Some(joined),
            ..
        }) = &r.group
        {
            v.extend_from_slice(&joined.to_be_bytes());
        }
    }
    v
}

/// The message id in a 16-byte key that starts with 8 bytes of something else (a time in
/// the done index, a digest in the content index).
fn id_after_stamp(key: &[u8]) -> Option<MessageId> {
    key.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

fn done_key(r: &Record) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&time_key(r.updated_at));
    k[8..].copy_from_slice(&r.id.to_be_bytes());
    k
}

fn state_byte(s: State) -> u8 {
    State::ALL.iter().position(|x| *x == s).unwrap_or(0) as u8
}

fn state_from_byte(b: Option<u8>) -> Option<State> {
    State::ALL.get(usize::from(b?)).copied()
}

/// Readies a store for the outbox and returns the id the next new message gets: builds
/// the indexes of a store written before they existed, converts the lane index of a store
/// written before December 2026.
fn prepare(kv: &Kv, corrupt: &mut Vec<MessageId>) -> Result<u64, StoreError> {
    let rx = kv.read()?;
    let saved_u64 = |name: &[u8]| -> Result<u64, StoreError> {
        Ok(rx
            .get(T::State, name)?
            .and_then(|v| v.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes))
    };
    // Every id of a compacted store is above its floor; a store written before NEXT_ID
    // existed continues after its newest message.
    let id_floor = saved_u64(ID_FLOOR)?;
    let saved_next = saved_u64(NEXT_ID)?;
    let after_newest = rx
        .first(T::Messages, Span::all(), true)?
        .and_then(|(k, _)| k.as_slice().try_into().ok())
        .map_or(0, u64::from_be_bytes)
        + 1;
    let next_id = saved_next.max(after_newest).max(id_floor + 1);
    let indexed = rx.get(T::State, INDEXED)?.is_some();
    drop(rx);
    if !indexed {
        kv.write(true, |tx| {
            index::build_indexes(tx, corrupt)?;
            tx.insert(T::State, INDEXED, &[1])
        })?;
    }
    let old_lanes = kv.read()?.len(T::Lanes)?;
    if old_lanes > 0 {
        tracing::info!(
            messages = old_lanes,
            "Converting the outbox's lane index to the layout of December 2026 (once)."
        );
        let mut moved = 0;
        loop {
            let slice = kv.write(true, |tx| lanes::convert_legacy(tx, CONVERT_SLICE))?;
            if slice == 0 {
                break;
            }
            moved += slice;
            tracing::info!(done = moved, of = old_lanes, "Converting the lane index.");
        }
        tracing::info!(messages = moved, "Converted the lane index.");
    }
    Ok(next_id)
}

#[cfg(test)]
pub(crate) mod tests;
