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
//! redb store <data_dir>/outbox/outbox.redb (kv.rs), one table per concern:
//!   tree "messages":  key = message id (u64, big-endian)
//!                     value = format version (1 byte) ++ JSON of Record
//!   tree "lane_ends", "lane_links": the messages that are not terminal, per order a
//!                     linked list in id order (see lanes.rs; tree "lanes" held the
//!                     layout before December 2026 and is converted at the first open)
//!   tree "sending":   key = id of a message marked `sending`, value = when (i128 BE,
//!                     nanoseconds since 1970): the mark lives here, not in the record
//!                     (see "Marks and deliveries" below)
//!   tree "delivered": key = id of a message the dispatcher delivered, value = when (i128
//!                     BE, nanoseconds since 1970) ++ the attempt's outcome (UTF-8): the
//!                     delivery lives here, not in the record, until the record is
//!                     written again or pruned (see "Marks and deliveries" below)
//!   tree "ingress":   upstream deliveries whose result is stored (see ingress.rs)
//!   tree "done":      one key per delivered or cancelled message:
//!                     key = last change as whole seconds since 1970 (i64 BE, sign bit
//!                     flipped) ++ id (u64 BE), value = the state (1 byte) ++ the
//!                     content digest (u64 BE, when the record has one)
//!                     — what pruning and the counts at open read, without decoding records
//!   tree "contents", "rejected", "unmatched": D365's verdicts (see verdict.rs)
//!   tree "publishes": rules' MQTT publications not yet acknowledged by their broker:
//!                     key = len(via) as u32 BE ++ via ++ sequence (u64 BE), value = JSON
//!                     (see publish.rs; written with the batch that built them)
//!   tree "state":     key = owner name ("rules")
//!                     value = opaque bytes of that owner (the rules engine's counters,
//!                     accumulators and order contexts)
//! ```
//!
//! Ids are consecutive (1, 2, 3, … across restarts: operators type and read them aloud).
//! The next id is kept in the state tree and written in the same transaction as the
//! messages that took the ids before it, so id order is append order and no id is given
//! twice, even after the newest messages were pruned. Per production order the outbox is a FIFO queue: the *lane* of an order is
//! its non-terminal messages in id order, and only the head of a lane may be sent.
//!
//! # Marks and deliveries
//!
//! Marking a message `sending` writes one small key in the "sending" tree instead of
//! rewriting its record: the record stays `queued` on disk, and every read of a record
//! (`record_in`, the scans) lays the mark over it (state `sending`, `updated_at` the
//! mark's time). Any later write of the record (its outcome) removes the mark in the same
//! transaction. Why: the dispatcher marks one head in each of dozens of orders per write;
//! those records lie in dozens of B-tree leaves, each rewritten and flushed for a change
//! of one field, while the marks (at most one per lane) share one leaf. Measured in
//! README → Performance.
//!
//! A delivery by the dispatcher (an answer 2xx, not counted as a server error) is kept the
//! same way: the "delivered" tree holds its time and outcome, and a read replays it over
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
//!   reopened; the outbox then reopens it (what was committed is there) and the caller's
//!   retry writes the same records again: a
//!   retried [`Outbox::commit_shared`] reuses the ids of its first attempt.
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
//!   engine before (sled, not atomic across trees) may hold a stale lane member, which
//!   [`Outbox::lane_heads`] removes when it meets it.
//! - A message's done key exists exactly while the message is terminal (written with the
//!   record in the same write, removed with it by pruning). A store written before this
//!   index existed gets it (and its lanes) built once, at the first open.
//! - Opening reads keys, not records: lane sizes, the head of each lane, the done index.
//!   A record that cannot be decoded is reported when it is read.
//! - Memory: per-state counts and nothing that grows with the backlog.
//! - redb types never leave kv.rs (and sled's, kept to migrate an old store, migrate.rs).

mod compact;
pub mod config;
mod ingress;
mod kv;
mod lanes;
mod migrate;
mod record;
mod turn;
mod verdict;
mod writes;

pub use ingress::{Delivery, DeliveryId, SeenEvent};
pub use record::{Attempt, Change, MessageId, NewMessage, Record, State};
pub use turn::{OpenTurn, TURN_IDLE_MAX};
pub use verdict::{D365Verdict, ProcessedEvent, Reconciled, UnmatchedEvent};
pub use writes::{WriteKind, WriteStats, WriteSummary};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use kv::{Kv, Span, T};
use record::{decode, encode};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("{path}: the outbox is in use by another process (is the gateway running? stop it first: systemctl stop mes-gateway)")]
    Locked { path: PathBuf },
    // Not `source`: the reason is part of this message, and error chains would print it twice.
    #[error("{path}: cannot open the outbox: {cause}")]
    Open {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("outbox storage error: {0}")]
    Storage(String),
    #[error("message {0} not found")]
    NotFound(MessageId),
    #[error("message {id} is {state}: cannot {action} it (allowed from: {allowed})")]
    WrongState {
        id: MessageId,
        state: State,
        action: &'static str,
        allowed: String,
    },
    #[error("the dispatcher's open turn got no step for {}s and was rolled back", TURN_IDLE_MAX.as_secs())]
    TurnAbandoned,
}

fn storage(e: impl fmt::Display) -> OutboxError {
    OutboxError::Storage(e.to_string())
}

/// What one batch of upstream events produced, committed as one transaction.
#[derive(Debug, Default)]
pub struct Ingest {
    pub messages: Vec<NewMessage>,
    /// An owner's state (the rules engine's) to save with them.
    pub state: Option<(String, Vec<u8>)>,
    /// The upstream deliveries whose result this is, recorded so a redelivery is known.
    pub deliveries: Vec<Delivery>,
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
        deliveries: Vec<Delivery>,
    ) -> Ingest {
        Ingest {
            messages,
            state,
            deliveries,
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

    fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.state.is_none()
            && self.deliveries.is_empty()
            && self.seen.is_empty()
            && self.processed.is_empty()
            && self.publications.is_empty()
    }
}

/// One MQTT message a rule built (sent by `crate::publish`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Publication {
    /// The `mqtt` source whose broker gets it.
    pub via: String,
    pub topic: String,
    pub payload: String,
    pub retain: bool,
    /// The rule that built it.
    pub rule: String,
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

    /// The same, with the record as it was marked and sent (see [`Settlement::as_sent`]).
    pub fn with_record_as_sent(mut self, record: Record) -> Settlement {
        self.as_sent = Some(Box::new(record));
        self
    }
}

/// redb's page cache: reads of records and index pages, and the pages a write
/// transaction changes. A fixed budget, whatever the backlog (see the README's
/// Performance section for what it was measured at).
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Compaction thresholds (see [`Outbox::compact_if_worthwhile`]). A record with its
/// history takes well under 1 KiB in the store; the estimate errs on the large side so a store
/// full of live messages is never rewritten for nothing.
const COMPACT_MIN: u64 = 64 * 1024 * 1024;
const COMPACT_RATIO: u64 = 4;
const RECORD_BYTES_ESTIMATE: u64 = 1024;
const COMPACT_MAX_RECORDS: usize = 10_000;

/// Who the gateway is in a message's history.
pub const GATEWAY: &str = "gateway";

/// Cheap to clone: all clones share the database and the counts.
#[derive(Clone)]
pub struct Outbox {
    /// `None` only after a failed [`Outbox::replace_store`] (then `broken` is set).
    store: Arc<RwLock<Option<Arc<Store>>>>,
    /// A write failed. redb then refuses every later write ("previous I/O error") until
    /// the file is reopened, so the next operation reopens it, which recovers everything
    /// that was committed.
    broken: Arc<AtomicBool>,
    reopening: Arc<Mutex<()>>,
    counts: Arc<Mutex<BTreeMap<State, usize>>>,
    /// Undecodable records found when opening; kept on disk, reported, never sent.
    corrupt: Arc<Vec<MessageId>>,
    path: PathBuf,
    /// Bumped after every durable change, for whoever wants to watch the outbox
    /// (the dispatcher, the operator surface, tests) without polling.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Above every id handed out by any store this handle opened: a batch that took its
    /// ids and then hit a full disk is written after the store is reopened, and a reopened
    /// store must not give those ids again (its saved next id is older).
    ids_handed_out: Arc<AtomicU64>,
    /// Held while a record is read, checked against the state machine and written back
    /// (operator actions, the dispatcher's marks and outcomes): the operator service acts
    /// while the dispatcher runs, and a cancel that read `queued` must not overwrite the
    /// `sending` mark the dispatcher wrote meanwhile (nor the other way round).
    transitions: Arc<tokio::sync::Mutex<()>>,
    /// Whether new messages get a content index entry (see verdict.rs). Only D365's
    /// verdicts use it, and the index costs a tree write per message (about 15 % of the
    /// CPU per message and 15 MiB of cache in the burst benchmark, measured on sled), so it is kept
    /// only while a `d365_events` source can deliver verdicts.
    index_contents: Arc<AtomicBool>,
    /// How long the durable writes take (for /metrics; see writes.rs).
    writes: Arc<WriteStats>,
}

/// How long [`Outbox::reopen`] waits for operations still using the failed database.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long opening waits for a directory lock before reporting it as held by another
/// process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The store file in the outbox directory.
const STORE_FILE: &str = "outbox.redb";

/// One open store.
struct Store {
    kv: Kv,
    /// The sequence number of the next publication (above every stored one).
    next_publication: AtomicU64,
    /// The id the next new message gets; see the module doc.
    next_id: AtomicU64,
}

impl Store {
    /// Opens the store; waits up to `LOCK_WAIT` for a lock another handle of this process
    /// may still hold (a reopen right after an operation that still had it).
    fn open(path: &Path, corrupt: &mut Vec<MessageId>) -> Result<Store, OutboxError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match Store::open_once(path, corrupt) {
                Err(OutboxError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &Path, corrupt: &mut Vec<MessageId>) -> Result<Store, OutboxError> {
        migrate::from_sled(path, CACHE_BYTES)?;
        let file = path.join(STORE_FILE);
        let kv = Kv::open(&file, CACHE_BYTES).map_err(|e| e.at(path, &file))?;
        let rx = kv.read()?;
        let saved_u64 = |name: &[u8]| -> Result<u64, OutboxError> {
            Ok(rx
                .get(T::State, name)?
                .and_then(|v| v.as_slice().try_into().ok())
                .map_or(0, u64::from_be_bytes))
        };
        // Every id of a compacted store is above its floor (compact.rs); a store written
        // before NEXT_ID existed continues after its newest message.
        let id_floor = saved_u64(compact::ID_FLOOR)?;
        let saved_next = saved_u64(NEXT_ID)?;
        let after_newest = rx
            .first(T::Messages, Span::all(), true)?
            .and_then(|(k, _)| k.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes)
            + 1;
        let next_id = saved_next.max(after_newest).max(id_floor + 1);
        let next_publication = AtomicU64::new(1 + max_publication(&rx)?);
        let indexed = rx.get(T::State, INDEXED)?.is_some();
        drop(rx);
        let store = Store {
            kv,
            next_publication,
            next_id: AtomicU64::new(next_id),
        };
        if !indexed {
            store.kv.write(true, |tx| {
                build_indexes(tx, corrupt)?;
                tx.insert(T::State, INDEXED, &[1])
            })?;
        }
        let old_lanes = store.kv.read()?.len(T::Lanes)?;
        if old_lanes > 0 {
            tracing::info!(
                messages = old_lanes,
                "Converting the outbox's lane index to the layout of December 2026 (once)."
            );
            let mut moved = 0;
            loop {
                let slice = store
                    .kv
                    .write(true, |tx| lanes::convert_legacy(tx, CONVERT_SLICE))?;
                if slice == 0 {
                    break;
                }
                moved += slice;
                tracing::info!(done = moved, of = old_lanes, "Converting the lane index.");
            }
            tracing::info!(messages = moved, "Converted the lane index.");
        }
        Ok(store)
    }

    fn count_states(&self) -> Result<BTreeMap<State, usize>, OutboxError> {
        count_states(&self.kv.read()?)
    }

    fn get(&self, id: MessageId) -> Result<Record, OutboxError> {
        record_in(&self.kv.read()?, id)
    }
}

/// A record as `rx` sees it (one read transaction for several records).
fn record_in(rx: &impl kv::Get, id: MessageId) -> Result<Record, OutboxError> {
    let bytes = rx
        .get(T::Messages, &key(id))?
        .ok_or(OutboxError::NotFound(id))?;
    let mut r = decode(&bytes).map_err(|e| storage(format!("message {id}: {e}")))?;
    lay_over(rx, &mut r)?;
    Ok(r)
}

/// What recording `outcomes` changes: each settled record (from `sending`) into
/// `changed`, a delivery kept as a small key (module doc) also into `deliveries`.
fn plan_settlements(
    rx: &impl kv::Get,
    outcomes: &[Settlement],
    changed: &mut Vec<(Record, State)>,
    deliveries: &mut HashMap<MessageId, Vec<u8>>,
) -> Result<(), OutboxError> {
    let now = jiff::Timestamp::now();
    for s in outcomes {
        let found = match &s.as_sent {
            Some(sent) if sent.id == s.id && still_as_marked(rx, sent)? => Ok(Record::clone(sent)),
            _ => record_in(rx, s.id),
        };
        let mut r = match found {
            Ok(r) if r.state == State::Sending => r,
            // Someone else settled it meanwhile (an operator, or a retried write that
            // did reach the disk): the record says what happened; keep it.
            Ok(r) => {
                tracing::warn!(message_id = r.id, state = %r.state, "Outcome of a request not recorded: the message is no longer sending.");
                continue;
            }
            Err(OutboxError::NotFound(id)) => {
                tracing::warn!(
                    message_id = id,
                    "Outcome of a request not recorded: the message is gone."
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        match (&s.next, &s.attempt) {
            // The common case, kept as a small key (module doc).
            (Settle::Delivered, Some(outcome)) if !s.server_error => {
                deliver_at(&mut r, outcome, now);
                deliveries.insert(r.id, delivery_value(now, outcome));
            }
            _ => apply_settlement(&mut r, s),
        }
        changed.push((r, State::Sending));
    }
    Ok(())
}

/// What marking `mark` `sending` changes: each record still queued, into `changed`;
/// heads found already marked go to `already_marked`.
/// `read_ahead` holds records already read in this transaction (see turn.rs).
fn plan_marks(
    rx: &impl kv::Get,
    mark: &[MessageId],
    read_ahead: &mut HashMap<MessageId, Record>,
    changed: &mut Vec<(Record, State)>,
    already_marked: &mut Vec<Record>,
) -> Result<(), OutboxError> {
    for &id in mark {
        let mut r = match read_ahead.remove(&id) {
            Some(r) => r,
            None => record_in(rx, id)?,
        };
        match r.state {
            State::Queued => {}
            // Marked by an earlier call whose write failed after this record reached
            // the disk (the caller retries the same marks): its request never left,
            // since requests leave only after a mark succeeds.
            State::Sending => {
                already_marked.push(r);
                continue;
            }
            _ => continue,
        }
        r.state = State::Sending;
        r.updated_at = jiff::Timestamp::now();
        changed.push((r, State::Queued));
    }
    Ok(())
}

/// Writes a turn's planned changes into `tx`: marks and deliveries as small keys, every
/// other change as the record, with the indexes that follow a state.
fn apply_changes(
    tx: &mut kv::Tx<'_>,
    changed: &[(Record, State)],
    deliveries: &HashMap<MessageId, Vec<u8>>,
) -> Result<(), OutboxError> {
    for (r, old) in changed {
        if *old == State::Queued && r.state == State::Sending {
            // The mark alone (see the module doc).
            tx.insert(T::Sending, &key(r.id), &stamp(r.updated_at))?;
            continue;
        }
        match deliveries.get(&r.id) {
            Some(delivery) => tx.insert(T::Delivered, &key(r.id), delivery)?,
            None => {
                tx.insert(T::Messages, &key(r.id), &encode(r)?)?;
                if *old == State::Delivered {
                    tx.remove(T::Delivered, &key(r.id))?;
                }
            }
        }
        if *old == State::Sending {
            tx.remove(T::Sending, &key(r.id))?;
        }
        // An operator's retry may have edited the content: index it again (the old key
        // turns stale and goes when a verdict meets it, or at pruning).
        if matches!(old, State::Failed | State::Uncertain) && r.state == State::Queued {
            if let Some(digest) = r.content_digest {
                tx.insert(T::Contents, &verdict::content_key(digest, r.id), &[])?;
            }
        }
        if r.state.is_terminal() {
            if !old.is_terminal() {
                tx.insert(T::Done, &done_key(r), &done_value(r))?;
            }
            lanes::remove(tx, &r.production_order, r.id)?;
        }
    }
    Ok(())
}

/// Whether `sent`, a record as [`Outbox::settle_and_mark`] marked it, is what a read
/// would give now: its mark is still in the store with the same time. Sound because every
/// write of a record removes its mark in the same transaction, a mark is only written over
/// a record stored `queued` (and none with a delivery), and a record marked again gets a
/// mark of a later time: so an unchanged mark means an unchanged record, and the turn
/// spares reading and decoding it (most of a settlement's cost besides the write).
fn still_as_marked(rx: &impl kv::Get, sent: &Record) -> Result<bool, OutboxError> {
    Ok(sent.state == State::Sending
        && rx
            .get(T::Sending, &key(sent.id))?
            .is_some_and(|mark| mark[..] == stamp(sent.updated_at)))
}

/// Lays a record's delivery or sending mark (module doc) over it as read from the messages
/// tree.
fn lay_over(rx: &impl kv::Get, r: &mut Record) -> Result<(), OutboxError> {
    if let Some(delivery) = rx.get(T::Delivered, &key(r.id))? {
        lay_delivery(r, &delivery);
    } else if let Some(mark) = rx.get(T::Sending, &key(r.id))? {
        lay_mark(r, &mark);
    }
    Ok(())
}

/// A time in the sending and delivered trees: nanoseconds since 1970, i128 BE.
fn stamp(at: jiff::Timestamp) -> [u8; 16] {
    at.as_nanosecond().to_be_bytes()
}

/// The time at the start of a sending or delivered value.
fn unstamp(v: &[u8]) -> Option<jiff::Timestamp> {
    let ns = i128::from_be_bytes(v.get(..16)?.try_into().ok()?);
    jiff::Timestamp::from_nanosecond(ns).ok()
}

/// The delivered tree's value: when, and the attempt's outcome.
fn delivery_value(at: jiff::Timestamp, outcome: &str) -> Vec<u8> {
    let mut v = stamp(at).to_vec();
    v.extend_from_slice(outcome.as_bytes());
    v
}

fn lay_delivery(r: &mut Record, v: &[u8]) {
    // A record written after the delivery removed its key; a terminal one is the truth.
    if r.state.is_terminal() {
        return;
    }
    let Some(at) = unstamp(v) else {
        tracing::error!(
            message_id = r.id,
            "Outbox delivery record cannot be decoded; the message is shown as stored before it."
        );
        return;
    };
    deliver_at(r, &String::from_utf8_lossy(&v[16..]), at);
}

/// The dispatcher's delivery of `r` at `at` with this attempt outcome: computed once when
/// it is recorded and again at each read (the delivered tree), so it must depend on
/// nothing else.
fn deliver_at(r: &mut Record, outcome: &str, at: jiff::Timestamp) {
    r.record_attempt_at(outcome, at);
    r.retry_at = None;
    r.last_error = None;
    r.change_at(State::Delivered, GATEWAY, "delivered", None, at);
}

/// A record as read, with its sending mark (see the module doc) laid over it.
fn lay_mark(r: &mut Record, mark: &[u8]) {
    // Only a queued record can carry a mark; anything else was written after it (and the
    // write removed it), so the record is the truth.
    if r.state != State::Queued {
        return;
    }
    r.state = State::Sending;
    if let Some(at) = unstamp(mark) {
        r.updated_at = at;
    }
}

/// A record met in a scan over the messages tree, with what is laid over it.
fn scanned(rx: &kv::Rx, v: &[u8]) -> Result<Option<Record>, OutboxError> {
    let Ok(mut r) = decode(v) else {
        return Ok(None);
    };
    lay_over(rx, &mut r)?;
    Ok(Some(r))
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox").field("path", &self.path).finish()
    }
}

fn key(id: MessageId) -> [u8; 8] {
    id.to_be_bytes()
}

impl Outbox {
    /// Opens (or creates) the outbox in `data_dir/outbox`. Blocking: call it before
    /// starting work or from a blocking context. Opening reads keys, not records (see the
    /// invariants above).
    pub fn open(data_dir: &Path) -> Result<Outbox, OutboxError> {
        let path = data_dir.join("outbox");
        let open_error = |cause| OutboxError::Open {
            path: path.clone(),
            cause,
        };
        std::fs::create_dir_all(data_dir).map_err(open_error)?;
        compact::finish_interrupted(data_dir).map_err(open_error)?;
        std::fs::create_dir_all(&path).map_err(open_error)?;
        let mut corrupt = Vec::new();
        let store = Store::open(&path, &mut corrupt)?;
        let counts = store.count_states()?;
        Ok(Outbox {
            store: Arc::new(RwLock::new(Some(Arc::new(store)))),
            broken: Arc::new(AtomicBool::new(false)),
            reopening: Arc::new(Mutex::new(())),
            counts: Arc::new(Mutex::new(counts)),
            corrupt: Arc::new(corrupt),
            path,
            changes: Arc::new(tokio::sync::watch::channel(0).0),
            ids_handed_out: Arc::default(),
            transitions: Arc::default(),
            index_contents: Arc::default(),
            writes: Arc::default(),
        })
    }

    /// How long the durable writes of new messages and of the dispatcher's turns take.
    pub fn write_stats(&self) -> Arc<WriteStats> {
        self.writes.clone()
    }

    /// The open database; reopens it first if a write failed. Blocking when it reopens.
    fn store(&self) -> Result<Arc<Store>, OutboxError> {
        if self.broken.load(Ordering::Acquire) {
            self.reopen()?;
        }
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| storage("the outbox is being reopened after a write error"))
    }

    /// Replaces a database that refuses writes with a freshly opened one (see
    /// [`Outbox::replace_store`]).
    fn reopen(&self) -> Result<(), OutboxError> {
        let _only_one = self.reopening.lock().unwrap_or_else(|p| p.into_inner());
        if !self.broken.load(Ordering::Acquire) {
            return Ok(()); // another caller did it while this one waited
        }
        self.replace_store(|_| Ok(()), || Ok(()))
            .map_err(|e| storage(format!("cannot reopen the outbox after a write error: {e}")))?;
        tracing::warn!(path = %self.path.display(), "Outbox reopened after a write error; writing again.");
        Ok(())
    }

    /// Closes the open store and opens what is then at the outbox's path, with every other
    /// operation held back (they wait on the store lock). Operations that started before
    /// still hold the store: this waits up to `REOPEN_WAIT` for them, or gives up with the
    /// store unchanged. `prepare` runs on the store before it is closed (when there is
    /// one), `while_closed` after (the store file is locked while open, so the old store must be gone
    /// before the new one opens). If the new one cannot be opened the outbox is left
    /// broken and the next operation tries again. Callers hold `reopening`.
    fn replace_store<T>(
        &self,
        prepare: impl FnOnce(&Store) -> Result<(), OutboxError>,
        while_closed: impl FnOnce() -> Result<T, OutboxError>,
    ) -> Result<T, OutboxError> {
        let mut slot = self.store.write().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = slot.as_ref() {
            let deadline = std::time::Instant::now() + REOPEN_WAIT;
            while Arc::strong_count(live) > 1 {
                if std::time::Instant::now() > deadline {
                    return Err(storage("the outbox stays busy; trying again later"));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            prepare(live)?;
        }
        drop(slot.take());
        let result = while_closed();
        let data_dir = self.path.parent().unwrap_or(Path::new("."));
        let opened = compact::finish_interrupted(data_dir)
            .map_err(|cause| OutboxError::Open {
                path: self.path.clone(),
                cause,
            })
            .and_then(|()| Store::open(&self.path, &mut Vec::new()))
            .and_then(|store| Ok((store.count_states()?, store)));
        match opened {
            Ok((counts, store)) => {
                store.next_id.fetch_max(
                    self.ids_handed_out.load(Ordering::Acquire),
                    Ordering::AcqRel,
                );
                *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = counts;
                *slot = Some(Arc::new(store));
                self.broken.store(false, Ordering::Release);
            }
            Err(e) => {
                self.broken.store(true, Ordering::Release);
                return Err(e);
            }
        }
        result
    }

    /// Runs write work on a blocking thread; a storage error marks the database for
    /// reopening (see [`Outbox::broken`]).
    async fn write_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let this = self.clone();
        run_blocking(move || this.write_here(f)).await
    }

    /// [`Outbox::write_blocking`]'s work, on the calling (blocking) thread.
    fn write_here<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, OutboxError>,
    ) -> Result<T, OutboxError> {
        let store = self.store()?;
        let result = f(&store);
        drop(store);
        if matches!(result, Err(OutboxError::Storage(_))) {
            self.broken.store(true, Ordering::Release);
        }
        result
    }

    /// Disk use of the store, in bytes.
    pub fn disk_bytes(&self) -> u64 {
        compact::dir_bytes(&self.path)
    }

    /// Rewrites the store into a fresh one when it takes far more disk than what it holds
    /// (the file keeps its high-water mark after a drained backlog): more than `COMPACT_MIN`
    /// and more than `COMPACT_RATIO` times an estimate of the live data, and only once the
    /// backlog is gone (at most `COMPACT_MAX_RECORDS` records: copying them holds every
    /// other operation back for well under a second). Returns the disk
    /// use before and after, or `None` when it was not worth it. See compact.rs.
    pub async fn compact_if_worthwhile(&self) -> Result<Option<(u64, u64)>, OutboxError> {
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

    /// Rewrites the store into a fresh one (crash-safe; see compact.rs). Every other
    /// operation waits meanwhile. Returns the disk use before and after, in bytes.
    pub async fn compact(&self) -> Result<(u64, u64), OutboxError> {
        let this = self.clone();
        run_blocking(move || this.compact_blocking()).await
    }

    fn compact_blocking(&self) -> Result<(u64, u64), OutboxError> {
        let _only_one = self.reopening.lock().unwrap_or_else(|p| p.into_inner());
        if self.broken.load(Ordering::Acquire) {
            return Err(storage("the outbox is being reopened after a write error"));
        }
        let before = self.disk_bytes();
        let data_dir = self.path.parent().unwrap_or(Path::new("."));
        self.replace_store(
            |live| compact::build_copy(live, data_dir),
            || {
                compact::swap(data_dir).map_err(|e| {
                    storage(format!(
                        "{}: swapping in the compacted store: {e}",
                        data_dir.display()
                    ))
                })
            },
        )?;
        Ok((before, self.disk_bytes()))
    }

    pub fn path(&self) -> &Path {
        &self.path
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

    /// Whether messages stored from now on get a content index entry, so D365's verdicts
    /// can find them (on while a `d365_events` source is configured).
    pub fn index_contents(&self, on: bool) {
        self.index_contents.store(on, Ordering::Release);
    }

    /// Stores new messages durably and returns their records, in order. One flush.
    pub async fn append(&self, messages: Vec<NewMessage>) -> Result<Vec<Record>, OutboxError> {
        self.commit(Ingest {
            messages,
            ..Ingest::default()
        })
        .await
    }

    /// Saves an owner's state on its own (the dispatcher's pause); one flush.
    pub async fn save_state(&self, owner: &str, bytes: Vec<u8>) -> Result<(), OutboxError> {
        let owner = owner.to_string();
        self.write_blocking(move |store| {
            store
                .kv
                .write(true, |tx| tx.insert(T::State, owner.as_bytes(), &bytes))
        })
        .await
    }

    /// The state an owner (such as the rules engine) saved with [`Outbox::commit`].
    pub fn load_state(&self, owner: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        self.store()?.kv.get(T::State, owner.as_bytes())
    }

    /// Stores new messages, their deliveries and an owner's state in one transaction; one
    /// flush. Returns the new records in order.
    pub async fn commit(&self, ingest: Ingest) -> Result<Vec<Record>, OutboxError> {
        self.commit_shared(Arc::new(ingest)).await
    }

    /// [`Outbox::commit`] for a caller that keeps the batch to try again if the disk
    /// refuses it (no copy of the messages per attempt).
    pub async fn commit_shared(&self, ingest: Arc<Ingest>) -> Result<Vec<Record>, OutboxError> {
        Ok(self.commit_reconciling(ingest).await?.records)
    }

    /// [`Outbox::commit_shared`], also applying D365's verdicts ([`Ingest::processed`])
    /// in the same transaction, and saying what became of each.
    pub async fn commit_reconciling(&self, ingest: Arc<Ingest>) -> Result<Committed, OutboxError> {
        if ingest.is_empty() {
            return Ok(Committed::default());
        }
        // Verdicts change records the dispatcher and the operators change too; batches
        // without one (nearly all) do not wait for them.
        let _transition = if ingest.processed.is_empty() {
            None
        } else {
            Some(self.transitions.lock().await)
        };
        let ids_handed_out = self.ids_handed_out.clone();
        let indexing = self.index_contents.load(Ordering::Acquire);
        let writes = self.writes.clone();
        let (records, plan) = self
            .write_blocking(move |store| {
                let records = match ingest.prepared.get() {
                    Some(records) => records,
                    None => {
                        let now = jiff::Timestamp::now();
                        let n = ingest.messages.len() as u64;
                        let first = store.next_id.fetch_add(n, Ordering::AcqRel);
                        ids_handed_out.fetch_max(first + n, Ordering::AcqRel);
                        let records = ingest
                            .messages
                            .iter()
                            .zip(first..)
                            .map(|(m, id)| {
                                let mut r = Record::new(id, m, now);
                                if indexing {
                                    r.content_digest =
                                        Some(verdict::content_digest(&m.message_type, &m.content));
                                }
                                r
                            })
                            .collect();
                        ingest.prepared.get_or_init(|| records)
                    }
                };
                let encoded = records.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
                let plan = if ingest.processed.is_empty() {
                    verdict::Plan::default()
                } else {
                    verdict::plan(store, &ingest.processed)?
                };
                let updated = plan
                    .updated
                    .iter()
                    .map(|(r, _)| encode(r))
                    .collect::<Result<Vec<_>, _>>()?;
                // Numbered at each attempt: a retried batch rewrites its publications under
                // new numbers only if the failed attempt wrote nothing (one transaction).
                let publications = ingest
                    .publications
                    .iter()
                    .map(|p| {
                        let seq = store.next_publication.fetch_add(1, Ordering::AcqRel);
                        Ok((
                            publication_key(&p.via, seq),
                            serde_json::to_vec(p).map_err(storage)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, OutboxError>>()?;
                let started = std::time::Instant::now();
                store.kv.write(true, |tx| {
                    lanes::append_all(
                        tx,
                        records.iter().map(|r| (r.production_order.as_str(), r.id)),
                    )?;
                    for (r, bytes) in records.iter().zip(&encoded) {
                        tx.insert(T::Messages, &key(r.id), bytes)?;
                        if let Some(digest) = r.content_digest {
                            tx.insert(T::Contents, &verdict::content_key(digest, r.id), &[])?;
                        }
                    }
                    for d in &ingest.deliveries {
                        tx.insert(
                            T::Ingress,
                            &d.id.key(),
                            &ingress::value(d.id.digest, d.receipt),
                        )?;
                    }
                    let now = jiff::Timestamp::now().as_second().to_be_bytes();
                    for e in &ingest.seen {
                        tx.insert(T::Ingress, &e.key(), &now)?;
                    }
                    for ((r, old), bytes) in plan.updated.iter().zip(&updated) {
                        tx.insert(T::Messages, &key(r.id), bytes)?;
                        if *old == State::Sending {
                            tx.remove(T::Sending, &key(r.id))?;
                        }
                        if *old == State::Delivered {
                            tx.remove(T::Delivered, &key(r.id))?;
                        }
                        if r.state.is_terminal() && !old.is_terminal() {
                            tx.insert(T::Done, &done_key(r), &done_value(r))?;
                            lanes::remove(tx, &r.production_order, r.id)?;
                        }
                        if r.d365.as_ref().is_some_and(|v| v.failed) {
                            tx.insert(T::Rejected, &key(r.id), &[])?;
                        } else {
                            tx.remove(T::Rejected, &key(r.id))?;
                        }
                    }
                    for (k, v) in &plan.unmatched {
                        tx.insert(T::Unmatched, k, v)?;
                    }
                    if !plan.unmatched.is_empty() {
                        let over = tx.len(T::Unmatched)?.saturating_sub(verdict::MAX_UNMATCHED);
                        if over > 0 {
                            // Keys begin with the time received: the first are the oldest.
                            for (k, _) in tx.collect(T::Unmatched, Span::all(), over as usize)? {
                                tx.remove(T::Unmatched, &k)?;
                            }
                        }
                    }
                    for k in &plan.stale {
                        tx.remove(T::Contents, k)?;
                    }
                    for (k, v) in &publications {
                        tx.insert(T::Publishes, k, v)?;
                    }
                    if let Some((owner, bytes)) = &ingest.state {
                        tx.insert(T::State, owner.as_bytes(), bytes)?;
                    }
                    if let Some(last) = records.last() {
                        // Never lowered: a batch that took its ids earlier may commit
                        // after one that took later ids.
                        let saved = tx
                            .get(T::State, NEXT_ID)?
                            .and_then(|v| v.as_slice().try_into().ok())
                            .map_or(0, u64::from_be_bytes);
                        let next = saved.max(last.id + 1);
                        tx.insert(T::State, NEXT_ID, &next.to_be_bytes())?;
                    }
                    Ok(())
                })?;
                writes.record(WriteKind::Ingest, records.len(), started.elapsed());
                Ok((records.clone(), plan))
            })
            .await?;
        for _ in &records {
            self.count(None, Some(State::Queued));
        }
        for (r, old) in &plan.updated {
            if r.state != *old {
                self.count(Some(*old), Some(r.state));
            }
        }
        self.changed();
        Ok(Committed {
            records,
            reconciled: plan.reconciled,
        })
    }

    /// Publications for the broker of `via` not yet acknowledged, in the order built,
    /// after sequence `after` (up to `limit`).
    pub fn pending_publications(
        &self,
        via: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Publication)>, OutboxError> {
        let store = self.store()?;
        let prefix = ingress::source_prefix(via);
        let start = publication_key(via, after.map_or(0, |a| a.saturating_add(1)));
        let of_via = kv::Prefix::new(&prefix);
        let span = Span {
            from: Some(&start),
            ..of_via.span()
        };
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        store.kv.read()?.scan(T::Publishes, span, false, |k, v| {
            let Some(seq) = k[prefix.len()..].try_into().ok().map(u64::from_be_bytes) else {
                return Ok(true);
            };
            match serde_json::from_slice(v) {
                Ok(p) => out.push((seq, p)),
                Err(e) => {
                    tracing::error!(via, seq, error = %e, "A stored publication cannot be read; it is removed.");
                    unreadable.push(k.to_vec());
                }
            }
            Ok(out.len() < limit)
        })?;
        if !unreadable.is_empty() {
            store.kv.write(false, |tx| {
                for k in &unreadable {
                    tx.remove(T::Publishes, k)?;
                }
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// The broker acknowledged a publication. Not flushed: a crash before the next flush
    /// publishes it again (at least once).
    pub fn forget_publication(&self, via: &str, seq: u64) -> Result<(), OutboxError> {
        self.store()?.kv.write(false, |tx| {
            tx.remove(T::Publishes, &publication_key(via, seq))?;
            Ok(())
        })
    }

    /// How many publications wait for their brokers, all brokers together.
    pub fn publications_waiting(&self) -> usize {
        self.store()
            .and_then(|s| s.kv.read()?.len(T::Publishes))
            .map_or(0, |n| n as usize)
    }

    /// Messages whose latest verdict from D365 is Failed (D365 holds their order's later
    /// messages): up to `limit` of them, oldest first, and how many there are.
    pub fn rejected_in_d365(&self, limit: usize) -> Result<(Vec<Record>, usize), OutboxError> {
        let store = self.store()?;
        let rx = store.kv.read()?;
        let mut ids = Vec::new();
        rx.scan(T::Rejected, Span::all(), false, |k, _| {
            if let Some(id) = k.try_into().ok().map(u64::from_be_bytes) {
                ids.push(id);
            }
            Ok(ids.len() < limit)
        })?;
        let mut records = Vec::new();
        for id in ids {
            match store.get(id) {
                Ok(r) => records.push(r),
                Err(OutboxError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((records, rx.len(T::Rejected)? as usize))
    }

    /// D365 verdicts that matched no message, newest first (up to `limit`), and how many
    /// are kept.
    pub fn unmatched_verdicts(
        &self,
        limit: usize,
    ) -> Result<(Vec<UnmatchedEvent>, usize), OutboxError> {
        let rx = self.store()?.kv.read()?;
        let mut kept = Vec::new();
        if limit > 0 {
            rx.scan(T::Unmatched, Span::all(), true, |_, v| {
                match serde_json::from_slice(v) {
                    Ok(e) => kept.push(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "A kept unmatched D365 event cannot be read; skipped.")
                    }
                }
                Ok(kept.len() < limit)
            })?;
        }
        Ok((kept, rx.len(T::Unmatched)? as usize))
    }

    /// Whether the outbox holds the result of this event (see [`SeenEvent`]).
    pub fn holds_event(&self, event: &SeenEvent) -> Result<bool, OutboxError> {
        Ok(self.store()?.kv.get(T::Ingress, &event.key())?.is_some())
    }

    /// Forgets event ids recorded before `before` (their redelivery window is over), and
    /// the unmatched verdicts received before it. Returns how many ids. Not flushed, like [`Outbox::forget_deliveries`].
    pub fn forget_events(&self, before: jiff::Timestamp) -> Result<usize, OutboxError> {
        let seen = kv::Prefix::new(ingress::SEEN_PREFIX);
        let before_key = time_key(before);
        self.store()?.kv.write(false, |tx| {
            let mut old = Vec::new();
            tx.scan(T::Ingress, seen.span(), false, |k, v| {
                let at = v.try_into().ok().map_or(i64::MIN, i64::from_be_bytes);
                if at < before.as_second() {
                    old.push(k.to_vec());
                }
                Ok(true)
            })?;
            for k in &old {
                tx.remove(T::Ingress, k)?;
            }
            // Unmatched verdicts are kept as long as their ids are remembered.
            for (k, _) in tx.collect(T::Unmatched, Span::to(&before_key), usize::MAX)? {
                tx.remove(T::Unmatched, &k)?;
            }
            Ok(old.len())
        })
    }

    /// Whether the outbox holds the result of this upstream delivery.
    pub fn holds_delivery(&self, id: &DeliveryId) -> Result<bool, OutboxError> {
        Ok(self
            .store()?
            .kv
            .get(T::Ingress, &id.key())?
            .and_then(|v| ingress::digest_of(&v))
            == Some(id.digest))
    }

    /// Forgets deliveries the broker will never redeliver (it confirmed our PUBACK). Only
    /// the recording made by that receipt is removed, never a newer one of the same packet
    /// id. Not flushed: forgetting is made durable by the next flush; until then a crash
    /// merely keeps them a little longer.
    pub fn forget_deliveries(&self, deliveries: &[Delivery]) -> Result<(), OutboxError> {
        self.store()?.kv.write(false, |tx| {
            for d in deliveries {
                let k = d.id.key();
                // A different value is a newer recording of the same packet id: keep it.
                let expected = ingress::value(d.id.digest, d.receipt);
                if tx.get(T::Ingress, &k)?.as_deref() == Some(&expected[..]) {
                    tx.remove(T::Ingress, &k)?;
                }
            }
            Ok(())
        })
    }

    /// Forgets every delivery of a source whose broker lost the session: nothing of it
    /// will be redelivered. Not flushed (see [`Outbox::forget_deliveries`]).
    pub fn forget_source(&self, source: &str) -> Result<usize, OutboxError> {
        let of_source = kv::Prefix::new(&ingress::source_prefix(source));
        self.store()?.kv.write(false, |tx| {
            let keys = tx.collect(T::Ingress, of_source.span(), usize::MAX)?;
            for (k, _) in &keys {
                tx.remove(T::Ingress, k)?;
            }
            Ok(keys.len())
        })
    }

    /// Writes changed records and their lanes; one flush. `old` is each record's
    /// state before the change.
    async fn write(&self, changed: Vec<(Record, State)>) -> Result<Vec<Record>, OutboxError> {
        let changed = self.write_turn(changed, HashMap::new()).await?;
        Ok(self.counted(changed))
    }

    /// [`Outbox::write`], where the records in `deliveries` are written as their delivered
    /// tree value (module doc) instead.
    async fn write_turn(
        &self,
        changed: Vec<(Record, State)>,
        deliveries: HashMap<MessageId, Vec<u8>>,
    ) -> Result<Vec<(Record, State)>, OutboxError> {
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let writes = self.writes.clone();
        let changed = self
            .write_blocking(move |this| {
                let started = std::time::Instant::now();
                this.kv
                    .write(true, |tx| apply_changes(tx, &changed, &deliveries))?;
                writes.record(WriteKind::Delivery, changed.len(), started.elapsed());
                Ok(changed)
            })
            .await?;
        Ok(changed)
    }

    /// Counts and announces committed changes; the records as they now are.
    fn counted(&self, changed: Vec<(Record, State)>) -> Vec<Record> {
        for (r, old) in &changed {
            self.count(Some(*old), Some(r.state));
        }
        if !changed.is_empty() {
            self.changed();
        }
        changed.into_iter().map(|(r, _)| r).collect()
    }

    /// A turn's committed changes (outcomes first, from `sending`, then marks, from
    /// `queued`), counted; returns (settled, marked), with the heads the turn found
    /// `already_marked` among the marked.
    fn written(
        &self,
        changed: Vec<(Record, State)>,
        mut already_marked: Vec<Record>,
    ) -> (Vec<Record>, Vec<Record>) {
        let settled = changed
            .iter()
            .filter(|(_, old)| *old == State::Sending)
            .count();
        let mut written = self.counted(changed);
        let mut marked = written.split_off(settled);
        marked.append(&mut already_marked);
        (written, marked)
    }

    /// Marks queued messages `sending`, one write and one flush for all: call it right
    /// before their requests go out. Returns the marked records; an id that is no longer
    /// queued (an operator cancelled it meanwhile) is left out.
    pub async fn mark_sending(&self, ids: &[MessageId]) -> Result<Vec<Record>, OutboxError> {
        Ok(self.settle_and_mark(&[], ids).await?.1)
    }

    /// Records the outcomes of finished requests, one write and one flush for all.
    pub async fn settle(&self, outcomes: Vec<Settlement>) -> Result<Vec<Record>, OutboxError> {
        Ok(self.settle_and_mark(&outcomes, &[]).await?.0)
    }

    /// Records outcomes and marks the next messages `sending` in one write and one flush:
    /// a lane's next message goes out right after its predecessor's outcome, with no
    /// second wait for the disk. Returns (settled, marked).
    pub async fn settle_and_mark(
        &self,
        outcomes: &[Settlement],
        mark: &[MessageId],
    ) -> Result<(Vec<Record>, Vec<Record>), OutboxError> {
        let _transition = self.transitions.lock().await;
        let mut changed = Vec::with_capacity(outcomes.len() + mark.len());
        let mut already_marked = Vec::new();
        let mut deliveries = HashMap::new();
        // One read transaction for every record of the turn (the transition lock keeps
        // them as read); dropped before the write, which may have to reopen the store.
        {
            let store = self.store()?;
            let rx = store.kv.read()?;
            plan_settlements(&rx, outcomes, &mut changed, &mut deliveries)?;
            plan_marks(
                &rx,
                mark,
                &mut HashMap::new(),
                &mut changed,
                &mut already_marked,
            )?;
        }
        let changed = self.write_turn(changed, deliveries).await?;
        Ok(self.written(changed, already_marked))
    }

    /// The (order, id) of the first message of up to `limit` lanes, round-robin from the
    /// order after `after`, without reading the records: what a dispatcher needs each turn.
    /// Lanes for which `skip(order)` holds (busy ones) are passed over and not counted.
    /// A head for which `moved_on(id)` holds (its delivery is being recorded) stands for
    /// the message after it, and its lane is left out when there is none; all in one read.
    pub fn lane_head_ids(
        &self,
        after: Option<&str>,
        limit: usize,
        skip: impl Fn(&str) -> bool,
        moved_on: impl Fn(MessageId) -> bool,
    ) -> Result<Vec<(String, MessageId)>, OutboxError> {
        let rx = self.store()?.kv.read()?;
        let mut out = Vec::new();
        for (order, id) in lanes::heads(&rx, after, limit, skip)? {
            if !moved_on(id) {
                out.push((order, id));
            } else if let Some(next) = lanes::after(&rx, id)? {
                out.push((order, next));
            }
        }
        Ok(out)
    }

    /// Messages left `sending` by a crash or a kill: settles each with what `decide`
    /// says (uncertain, or queued again where the message type's policy is resend). Only
    /// lane heads can be `sending`, so this reads one record per order.
    pub async fn recover_interrupted(
        &self,
        decide: impl Fn(&Record) -> Settle,
    ) -> Result<Vec<Record>, OutboxError> {
        let sending: Vec<Settlement> = self
            .lane_heads(None, usize::MAX)?
            .into_iter()
            .filter(|r| r.state == State::Sending)
            .map(|r| Settlement {
                id: r.id,
                attempt: None,
                server_error: false,
                next: decide(&r),
                as_sent: None,
            })
            .collect();
        self.settle(sending).await
    }

    pub fn get(&self, id: MessageId) -> Result<Record, OutboxError> {
        self.store()?.get(id)
    }

    /// The first message of up to `limit` orders' lanes, starting with the order after
    /// `after` and wrapping around (round-robin when the caller passes the last order it
    /// served).
    pub fn lane_heads(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        let store = self.store()?;
        loop {
            let mut out = Vec::new();
            let mut stale = false;
            let rx = store.kv.read()?;
            let heads = lanes::heads(&rx, after, limit, |_| false)?;
            for (order, id) in heads {
                match record_in(&rx, id) {
                    Ok(r) if !r.state.is_terminal() => out.push(r),
                    // A crash between writing a terminal record and taking it out of its lane
                    // (a store written by the engine before redb, whose writes were not
                    // atomic; today's writes are).
                    Ok(_) | Err(OutboxError::NotFound(_)) => {
                        store.kv.write(true, |tx| lanes::remove(tx, &order, id))?;
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
    pub fn lane(&self, order: &str) -> Result<Vec<MessageId>, OutboxError> {
        lanes::lane(&self.store()?.kv.read()?, order)
    }

    /// All records in id order, optionally filtered.
    pub fn list(
        &self,
        state: Option<State>,
        order: Option<&str>,
    ) -> Result<Vec<Record>, OutboxError> {
        let mut out = Vec::new();
        let rx = self.store()?.kv.read()?;
        rx.scan(T::Messages, Span::all(), false, |_, v| {
            if let Some(r) = scanned(&rx, v)? {
                if state.is_none_or(|s| s == r.state)
                    && order.is_none_or(|o| o == r.production_order)
                {
                    out.push(r);
                }
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// One page of records matching `filter`, oldest or newest first, starting after the
    /// id `after` (the previous page's cursor). Reads records in id order from the cursor
    /// and stops at `limit` matches, so a page costs what it shows plus what the filter
    /// skips — not the whole outbox. Returns the page and the cursor of the next one.
    pub fn page(
        &self,
        filter: &ListFilter,
        after: Option<MessageId>,
        limit: usize,
        newest_first: bool,
    ) -> Result<(Vec<Record>, Option<MessageId>), OutboxError> {
        let store = self.store()?;
        let bound = after.map(|id| {
            if newest_first {
                key(id)
            } else {
                key(id.saturating_add(1))
            }
        });
        let span = match (&bound, newest_first) {
            (None, _) => Span::all(),
            (Some(b), false) => Span::from(b),
            (Some(b), true) => Span::to(b),
        };
        let mut out = Vec::new();
        if limit > 0 {
            let rx = store.kv.read()?;
            rx.scan(T::Messages, span, newest_first, |_, v| {
                if let Some(r) = scanned(&rx, v)? {
                    if filter.matches(&r) {
                        out.push(r);
                    }
                }
                Ok(out.len() < limit)
            })?;
        }
        let next = match out.last() {
            Some(last) if out.len() == limit => Some(last.id),
            _ => None,
        };
        Ok((out, next))
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

    /// Deletes delivered and cancelled messages last changed before `before`. One flush.
    /// Reads the done index only (no record is decoded).
    pub async fn prune(&self, before: jiff::Timestamp) -> Result<usize, OutboxError> {
        let removed = self
            .write_blocking(move |this| {
                let end = time_key(before);
                let mut removed = Vec::new();
                // In slices, so pruning a week's deliveries holds neither much memory nor
                // the write lock for long.
                loop {
                    let slice = this.kv.write(true, |tx| {
                        let done = tx.collect(T::Done, Span::to(&end), PRUNE_SLICE)?;
                        for (k, v) in &done {
                            let Some(id) = id_after_stamp(k) else {
                                continue;
                            };
                            tx.remove(T::Messages, &key(id))?;
                            tx.remove(T::Delivered, &key(id))?;
                            tx.remove(T::Done, k)?;
                            tx.remove(T::Rejected, &key(id))?;
                            if let Some(digest) = v
                                .get(1..9)
                                .and_then(|b| b.try_into().ok())
                                .map(u64::from_be_bytes)
                            {
                                tx.remove(T::Contents, &verdict::content_key(digest, id))?;
                            }
                            removed.push(state_from_byte(v.first().copied()));
                        }
                        Ok(done.len())
                    })?;
                    if slice < PRUNE_SLICE {
                        break;
                    }
                }
                Ok(removed)
            })
            .await?;
        for s in &removed {
            self.count(*s, None);
        }
        if !removed.is_empty() {
            self.changed();
        }
        Ok(removed.len())
    }

    async fn write_one(&self, r: Record, old: State) -> Result<Record, OutboxError> {
        let mut written = self.write(vec![(r, old)]).await?;
        written.pop().ok_or_else(|| storage("nothing written"))
    }

    /// Operator: send a `failed` or `uncertain` message again, optionally with new content.
    /// A `sending` message is retried only when `sending` is [`Sending::Interrupted`].
    pub async fn retry(
        &self,
        id: MessageId,
        by: &str,
        new_content: Option<String>,
        sending: Sending,
    ) -> Result<Record, OutboxError> {
        let allowed = sending.allowing(&[State::Failed, State::Uncertain]);
        self.transition(id, "retry", &allowed, |r| {
            let detail = match new_content {
                Some(content) if content != r.content => {
                    let detail = format!("content edited; previous content: {}", r.content);
                    r.content_digest = Some(verdict::content_digest(&r.message_type, &content));
                    r.content = content;
                    Some(detail)
                }
                _ => None,
            };
            r.server_errors = 0;
            r.last_error = None;
            r.retry_at = None;
            let action = if detail.is_some() {
                "edited and retried"
            } else {
                "retried"
            };
            r.change(State::Queued, by, action, detail);
        })
        .await
    }

    /// Operator: never send this message. Releases the order's lane.
    pub async fn cancel(&self, id: MessageId, by: &str) -> Result<Record, OutboxError> {
        let allowed = &[State::Queued, State::Failed, State::Uncertain];
        self.transition(id, "cancel", allowed, |r| {
            r.change(State::Cancelled, by, "cancelled", None)
        })
        .await
    }

    /// Operator: an `uncertain` message (or one left `sending` by a crash, when `sending`
    /// is [`Sending::Interrupted`]) did reach D365 (checked on the MES page).
    pub async fn resolve_delivered(
        &self,
        id: MessageId,
        by: &str,
        sending: Sending,
    ) -> Result<Record, OutboxError> {
        let allowed = sending.allowing(&[State::Uncertain]);
        self.transition(id, "resolve", &allowed, |r| {
            r.change(State::Delivered, by, "resolved as delivered", None)
        })
        .await
    }

    /// Reads a record, checks the state machine allows `action` from its state, applies
    /// `change` and writes it: all under the transition lock.
    async fn transition(
        &self,
        id: MessageId,
        action: &'static str,
        allowed: &[State],
        change: impl FnOnce(&mut Record),
    ) -> Result<Record, OutboxError> {
        let _transition = self.transitions.lock().await;
        let mut r = self.get(id)?;
        r.require(action, allowed)?;
        let old = r.state;
        change(&mut r);
        self.write_one(r, old).await
    }
}

/// Which records a listing shows; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// Created at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<jiff::Timestamp>,
    /// Created before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<jiff::Timestamp>,
}

impl ListFilter {
    pub fn matches(&self, r: &Record) -> bool {
        self.state.is_none_or(|s| s == r.state)
            && self
                .order
                .as_deref()
                .is_none_or(|o| o == r.production_order)
            && self
                .message_type
                .as_deref()
                .is_none_or(|t| t == r.message_type)
            && self
                .line
                .as_deref()
                .is_none_or(|l| r.line.as_deref() == Some(l))
            && self.since.is_none_or(|t| r.created_at >= t)
            && self.until.is_none_or(|t| r.created_at < t)
    }
}

/// What a message found `sending` is, for an operator action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// The gateway runs: its request is on the wire; only the dispatcher settles it.
    InFlight,
    /// The gateway is stopped: a crash interrupted its request, it is as uncertain as an
    /// `uncertain` message.
    Interrupted,
}

impl Sending {
    /// `states`, plus `sending` when it means interrupted.
    fn allowing(self, states: &[State]) -> Vec<State> {
        let mut allowed = states.to_vec();
        if self == Sending::Interrupted {
            allowed.push(State::Sending);
        }
        allowed
    }
}

fn apply_settlement(r: &mut Record, s: &Settlement) {
    if let Some(attempt) = &s.attempt {
        r.record_attempt(attempt.as_str());
    }
    if s.server_error {
        r.server_errors += 1;
    }
    r.retry_at = None;
    match &s.next {
        Settle::Delivered => {
            r.last_error = None;
            r.change(State::Delivered, GATEWAY, "delivered", None);
        }
        Settle::Retry { reason, at } => {
            r.last_error = Some(reason.clone());
            r.retry_at = *at;
            r.state = State::Queued;
            r.updated_at = jiff::Timestamp::now();
        }
        Settle::Requeue { reason } => {
            r.change(State::Queued, GATEWAY, "requeued", Some(reason.clone()));
        }
        Settle::Failed { reason } => {
            r.last_error = Some(reason.clone());
            r.change(State::Failed, GATEWAY, "failed", Some(reason.clone()));
        }
        // D365's verdict came back while the request still waited for its answer (D365
        // processed it before the answer was lost): it arrived, it is not uncertain.
        Settle::Uncertain { reason } if r.d365.is_some() => {
            r.last_error = None;
            r.change(
                State::Delivered,
                GATEWAY,
                "delivered: D365 reported it received before its answer was lost",
                Some(reason.clone()),
            );
        }
        Settle::Uncertain { reason } => {
            r.last_error = Some(reason.clone());
            r.change(State::Uncertain, GATEWAY, "uncertain", Some(reason.clone()));
        }
    }
}

/// Records removed per transaction by [`Outbox::prune`].
const PRUNE_SLICE: usize = 10_000;
/// Keys of the old lane index converted per transaction at the first open.
const CONVERT_SLICE: usize = 50_000;

/// Set in the state tree once the lane and done indexes cover every record.
const INDEXED: &[u8] = b"outbox.indexed";
/// The id the next new message gets (u64 BE), written with every append.
const NEXT_ID: &[u8] = b"outbox.next_id";

fn state_byte(s: State) -> u8 {
    State::ALL.iter().position(|x| *x == s).unwrap_or(0) as u8
}

fn state_from_byte(b: Option<u8>) -> Option<State> {
    State::ALL.get(usize::from(b?)).copied()
}

/// Seconds since 1970, ordered as bytes (sign bit flipped: times before 1970 sort first).
fn time_key(t: jiff::Timestamp) -> [u8; 8] {
    ((t.as_second() as u64) ^ (1 << 63)).to_be_bytes()
}

fn publication_key(via: &str, seq: u64) -> Vec<u8> {
    let mut k = ingress::source_prefix(via);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The highest publication sequence stored (0 when none): pending ones are few.
fn max_publication(rx: &kv::Rx) -> Result<u64, OutboxError> {
    let mut max = 0;
    rx.scan(T::Publishes, Span::all(), false, |k, _| {
        if let Some(seq) = k
            .len()
            .checked_sub(8)
            .and_then(|at| k[at..].try_into().ok())
            .map(u64::from_be_bytes)
        {
            max = max.max(seq);
        }
        Ok(true)
    })?;
    Ok(max)
}

/// The done index's value: the state, and the content digest pruning removes with it.
fn done_value(r: &Record) -> Vec<u8> {
    let mut v = vec![state_byte(r.state)];
    if let Some(digest) = r.content_digest {
        v.extend_from_slice(&digest.to_be_bytes());
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

/// One pass over a store written before the indexes existed (version 0.1 kept lanes in
/// memory): every record joins its lane or gets its done key.
fn build_indexes(tx: &mut kv::Tx<'_>, corrupt: &mut Vec<MessageId>) -> Result<(), OutboxError> {
    let mut lane_members = Vec::new();
    let mut done_keys = Vec::new();
    // Deliveries kept apart from their records (module doc): none in a store of that
    // version, but the rebuild must not depend on it.
    let mut deliveries = HashMap::new();
    tx.scan(T::Delivered, Span::all(), false, |k, v| {
        if let Ok(id) = k.try_into().map(u64::from_be_bytes) {
            deliveries.insert(id, v.to_vec());
        }
        Ok(true)
    })?;
    tx.scan(T::Messages, Span::all(), false, |k, v| {
        let decoded = decode(v).map(|mut r| {
            if let Some(delivery) = deliveries.get(&r.id) {
                lay_delivery(&mut r, delivery);
            }
            r
        });
        match decoded {
            Ok(r) if r.state.is_terminal() => done_keys.push((done_key(&r), done_value(&r))),
            Ok(r) => lane_members.push((r.production_order, r.id)),
            Err(e) => {
                let id = k.try_into().map(u64::from_be_bytes).unwrap_or(0);
                tracing::error!(message_id = id, error = %e, "Outbox record cannot be decoded; it is kept on disk and skipped.");
                corrupt.push(id);
            }
        }
        Ok(true)
    })?;
    for (order, id) in &lane_members {
        lanes::append(tx, order, *id)?;
    }
    for (k, v) in &done_keys {
        tx.insert(T::Done, k, v)?;
    }
    Ok(())
}

/// Messages per state from the indexes: every lane member behind its head is queued (only
/// heads are ever sent), so only heads are read; terminal ones come from the done index.
fn count_states(rx: &kv::Rx) -> Result<BTreeMap<State, usize>, OutboxError> {
    let mut counts = BTreeMap::new();
    let (lanes, members) = lanes::sizes(rx)?;
    let behind_heads = members.saturating_sub(lanes) as usize;
    if behind_heads > 0 {
        counts.insert(State::Queued, behind_heads);
    }
    for id in lanes::all_heads(rx)? {
        match record_in(rx, id) {
            Ok(r) => *counts.entry(r.state).or_default() += 1,
            Err(OutboxError::NotFound(_)) => {}
            Err(e) => {
                tracing::error!(message_id = id, error = %e, "Outbox record cannot be decoded; its order is held until it is cancelled.");
            }
        }
    }
    rx.scan(T::Done, Span::all(), false, |_, v| {
        if let Some(s) = state_from_byte(v.first().copied()) {
            *counts.entry(s).or_default() += 1;
        }
        Ok(true)
    })?;
    Ok(counts)
}

/// Runs blocking store work off the async threads. (In paused-time tests a blocking task
/// also stops the clock from jumping ahead while the disk is busy.)
async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, OutboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| storage(format!("store task failed: {e}")))?
}

#[cfg(test)]
mod tests;
