//! The durable outbox: every message the gateway builds is stored here before anything
//! else happens to it, and stays until it is delivered (then pruned after the retention
//! period) or cancelled by an operator.
//!
//! # On disk
//!
//! ```text
//! sled database in <data_dir>/outbox
//!   tree "messages":  key = message id (u64, big-endian)
//!                     value = FORMAT_VERSION (1 byte) ++ JSON of Record
//!   tree "state":     key = owner name ("rules")
//!                     value = opaque bytes of that owner (the rules engine's counters,
//!                     accumulators and order contexts)
//! ```
//!
//! Ids come from sled's `generate_id`, which is monotonic across restarts, so id order is
//! append order. Per production order the outbox is a FIFO queue: the *lane* of an order is
//! its non-terminal messages in id order, and only the head of a lane may be sent.
//!
//! # Invariants
//!
//! - [`Outbox::commit`] writes new messages and the rules engine's state in one sled
//!   transaction: after a crash both or neither are there, so a counted piece is never
//!   lost between the engine and the outbox, nor reported twice.
//! - A call that writes ([`Outbox::append`], [`Outbox::put`], operator actions) returns only
//!   after `flush()`, i.e. when the data is on disk. One call = one flush, whatever the
//!   number of records (group commit: batching is what makes it fast).
//! - A message is marked `sending` on disk *before* its request goes out. A message found
//!   `sending` when the outbox is opened may have reached D365; the dispatcher decides what
//!   that means ([`crate::config::AmbiguousPolicy`]), never a blind resend.
//! - States: `queued → sending → delivered | queued (retry) | failed | uncertain`;
//!   operators move `failed | uncertain → queued` (retry), `→ cancelled`, and
//!   `uncertain → delivered` (resolve). Every change is recorded in the message's history.
//! - sled types never leave this module.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub type MessageId = u64;

const FORMAT_VERSION: u8 = 1;
/// Attempts kept per message: a message retried for a week of outage must not grow
/// without bound; the count is kept separately.
const MAX_ATTEMPTS_KEPT: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Sending,
    Delivered,
    Failed,
    Uncertain,
    Cancelled,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Queued,
        State::Sending,
        State::Delivered,
        State::Failed,
        State::Uncertain,
        State::Cancelled,
    ];

    /// Terminal messages no longer belong to their order's lane.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Delivered | State::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Sending => "sending",
            State::Delivered => "delivered",
            State::Failed => "failed",
            State::Uncertain => "uncertain",
            State::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state {s:?}, expected one of queued, sending, delivered, failed, uncertain, cancelled"))
    }
}

/// A message to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub production_order: String,
    pub message_type: String,
    /// The `_messageContent` string, exactly as it will be posted.
    pub content: String,
    /// Who or what created it (`rule good-parts`, `cli root`).
    pub origin: String,
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub at: jiff::Timestamp,
    pub outcome: String,
}

/// One change of state or content, by the gateway or an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub at: jiff::Timestamp,
    pub by: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: MessageId,
    pub production_order: String,
    pub message_type: String,
    pub content: String,
    pub state: State,
    pub created_at: jiff::Timestamp,
    pub updated_at: jiff::Timestamp,
    /// All attempts ever made.
    pub attempt_count: u32,
    /// HTTP 500 answers so far, counted against `max_attempts`; reset by an operator retry.
    pub server_errors: u32,
    /// The most recent attempts (at most 20, see `MAX_ATTEMPTS_KEPT`).
    pub attempts: Vec<Attempt>,
    pub history: Vec<Change>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Record {
    pub fn record_attempt(&mut self, outcome: impl Into<String>) {
        self.attempt_count += 1;
        self.attempts.push(Attempt {
            at: jiff::Timestamp::now(),
            outcome: outcome.into(),
        });
        if self.attempts.len() > MAX_ATTEMPTS_KEPT {
            let excess = self.attempts.len() - MAX_ATTEMPTS_KEPT;
            self.attempts.drain(..excess);
        }
    }

    pub fn change(&mut self, state: State, by: &str, action: &str, detail: Option<String>) {
        let now = jiff::Timestamp::now();
        self.state = state;
        self.updated_at = now;
        self.history.push(Change {
            at: now,
            by: by.to_string(),
            action: action.to_string(),
            detail,
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("{path}: the outbox is in use by another process (is the gateway running? stop it first: systemctl stop mes-gateway)")]
    Locked { path: PathBuf },
    #[error("{path}: cannot open the outbox: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
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
        allowed: &'static str,
    },
}

fn storage(e: impl fmt::Display) -> OutboxError {
    OutboxError::Storage(e.to_string())
}

#[derive(Default)]
struct Index {
    /// Non-terminal messages per production order, in FIFO (id) order.
    lanes: BTreeMap<String, BTreeSet<MessageId>>,
    counts: BTreeMap<State, usize>,
    /// Undecodable records found when opening; kept on disk, reported, never sent.
    corrupt: Vec<MessageId>,
}

impl Index {
    fn add(&mut self, r: &Record) {
        *self.counts.entry(r.state).or_default() += 1;
        if !r.state.is_terminal() {
            self.lanes
                .entry(r.production_order.clone())
                .or_default()
                .insert(r.id);
        }
    }

    fn remove(&mut self, r: &Record) {
        if let Some(n) = self.counts.get_mut(&r.state) {
            *n = n.saturating_sub(1);
        }
        if let Some(lane) = self.lanes.get_mut(&r.production_order) {
            lane.remove(&r.id);
            if lane.is_empty() {
                self.lanes.remove(&r.production_order);
            }
        }
    }
}

/// Cheap to clone: all clones share the database and the index.
#[derive(Clone)]
pub struct Outbox {
    db: sled::Db,
    messages: sled::Tree,
    state: sled::Tree,
    index: Arc<Mutex<Index>>,
    path: PathBuf,
    /// Bumped after every durable change, for whoever wants to watch the outbox
    /// (the operator surface, tests) without polling.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox").field("path", &self.path).finish()
    }
}

fn encode(r: &Record) -> Result<Vec<u8>, OutboxError> {
    let mut v = vec![FORMAT_VERSION];
    serde_json::to_writer(&mut v, r).map_err(storage)?;
    Ok(v)
}

fn decode(bytes: &[u8]) -> Result<Record, String> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, json)) => serde_json::from_slice(json).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("unknown record format version {v}")),
        None => Err("empty record".into()),
    }
}

fn key(id: MessageId) -> [u8; 8] {
    id.to_be_bytes()
}

impl Outbox {
    /// Opens (or creates) the outbox in `data_dir/outbox`. Blocking: call it before
    /// starting work or from a blocking context. Opening a store with a large backlog
    /// reads every record once to build the lane index.
    pub fn open(data_dir: &Path) -> Result<Outbox, OutboxError> {
        let path = data_dir.join("outbox");
        std::fs::create_dir_all(&path).map_err(|source| OutboxError::Open {
            path: path.clone(),
            source,
        })?;
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    OutboxError::Locked { path: path.clone() }
                }
                sled::Error::Io(source) => OutboxError::Open {
                    path: path.clone(),
                    source,
                },
                other => storage(other),
            })?;
        let messages = db.open_tree("messages").map_err(storage)?;
        let state = db.open_tree("state").map_err(storage)?;
        let mut index = Index::default();
        for item in messages.iter() {
            let (k, v) = item.map_err(storage)?;
            match decode(&v) {
                Ok(r) => index.add(&r),
                Err(e) => {
                    let id = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                    tracing::error!(message_id = id, error = %e, "Outbox record cannot be decoded; it is kept on disk and skipped.");
                    index.corrupt.push(id);
                }
            }
        }
        Ok(Outbox {
            db,
            messages,
            state,
            index: Arc::new(Mutex::new(index)),
            path,
            changes: Arc::new(tokio::sync::watch::channel(0).0),
        })
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // A panic while holding this lock would leave a consistent index anyway (every
        // update is a remove+add pair done without await points), so poisoning is ignored.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores new messages durably and returns their records, in order. One flush.
    pub async fn append(&self, messages: Vec<NewMessage>) -> Result<Vec<Record>, OutboxError> {
        self.commit(messages, None).await
    }

    /// The state an owner (such as the rules engine) saved with [`Outbox::commit`].
    pub fn load_state(&self, owner: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        Ok(self
            .state
            .get(owner.as_bytes())
            .map_err(storage)?
            .map(|v| v.to_vec()))
    }

    /// Stores new messages and, in the same transaction, an owner's state; one flush.
    /// Returns the new records in order.
    pub async fn commit(
        &self,
        messages: Vec<NewMessage>,
        state: Option<(String, Vec<u8>)>,
    ) -> Result<Vec<Record>, OutboxError> {
        if messages.is_empty() && state.is_none() {
            return Ok(Vec::new());
        }
        let this = self.clone();
        let records = run_blocking(move || {
            use sled::transaction::{ConflictableTransactionError, TransactionError};
            use sled::Transactional;
            let now = jiff::Timestamp::now();
            let abort = |e: OutboxError| ConflictableTransactionError::Abort(e);
            // Ids are taken before the transaction: generate_id may flush, which must not
            // happen inside a transaction (it would wait for the transaction itself).
            // +1: sled ids start at 0 and 0 reads badly to an operator.
            let ids = messages
                .iter()
                .map(|_| this.db.generate_id().map(|id| id + 1))
                .collect::<Result<Vec<u64>, _>>()
                .map_err(storage)?;
            let result = (&this.messages, &this.state).transaction(|(tx_messages, tx_state)| {
                let mut records = Vec::with_capacity(messages.len());
                for (m, &id) in messages.iter().zip(&ids) {
                    let mut r = Record {
                        id,
                        production_order: m.production_order.clone(),
                        message_type: m.message_type.clone(),
                        content: m.content.clone(),
                        state: State::Queued,
                        created_at: now,
                        updated_at: now,
                        attempt_count: 0,
                        server_errors: 0,
                        attempts: Vec::new(),
                        history: Vec::new(),
                        last_error: None,
                    };
                    r.change(State::Queued, &m.origin, "created", None);
                    tx_messages.insert(&key(id), encode(&r).map_err(abort)?)?;
                    records.push(r);
                }
                if let Some((owner, bytes)) = &state {
                    tx_state.insert(owner.as_bytes(), bytes.as_slice())?;
                }
                Ok(records)
            });
            let records = match result {
                Ok(r) => r,
                Err(TransactionError::Abort(e)) => return Err(e),
                Err(TransactionError::Storage(e)) => return Err(storage(e)),
            };
            this.db.flush().map_err(storage)?;
            Ok(records)
        })
        .await?;
        {
            let mut index = self.lock();
            for r in &records {
                index.add(r);
            }
        }
        self.changed();
        Ok(records)
    }

    /// Writes a changed record durably.
    pub async fn put(&self, record: &Record) -> Result<(), OutboxError> {
        let this = self.clone();
        let new = record.clone();
        let old = run_blocking(move || {
            let old = this
                .messages
                .insert(key(new.id), encode(&new)?)
                .map_err(storage)?;
            this.db.flush().map_err(storage)?;
            Ok(old.and_then(|v| decode(&v).ok()))
        })
        .await?;
        {
            let mut index = self.lock();
            if let Some(old) = old {
                index.remove(&old);
            }
            index.add(record);
        }
        self.changed();
        Ok(())
    }

    pub fn get(&self, id: MessageId) -> Result<Record, OutboxError> {
        let bytes = self
            .messages
            .get(key(id))
            .map_err(storage)?
            .ok_or(OutboxError::NotFound(id))?;
        decode(&bytes).map_err(|e| storage(format!("message {id}: {e}")))
    }

    /// The first message of every order's lane, in order of production order number.
    pub fn lane_heads(&self) -> Vec<Record> {
        let heads: Vec<MessageId> = self
            .lock()
            .lanes
            .values()
            .filter_map(|lane| lane.first().copied())
            .collect();
        heads
            .into_iter()
            .filter_map(|id| self.get(id).ok())
            .collect()
    }

    /// All records in id order, optionally filtered.
    pub fn list(
        &self,
        state: Option<State>,
        order: Option<&str>,
    ) -> Result<Vec<Record>, OutboxError> {
        let mut out = Vec::new();
        for item in self.messages.iter() {
            let (_, v) = item.map_err(storage)?;
            let Ok(r) = decode(&v) else { continue };
            if state.is_some_and(|s| s != r.state) || order.is_some_and(|o| o != r.production_order)
            {
                continue;
            }
            out.push(r);
        }
        Ok(out)
    }

    /// When the oldest message still waiting to be delivered was created (the heads of the
    /// lanes are the oldest of their orders).
    pub fn oldest_pending(&self) -> Option<jiff::Timestamp> {
        self.lane_heads()
            .iter()
            .filter(|r| !r.state.is_terminal())
            .map(|r| r.created_at)
            .min()
    }

    /// Number of messages per state.
    pub fn counts(&self) -> BTreeMap<State, usize> {
        self.lock().counts.clone()
    }

    /// Ids of records that could not be decoded when the outbox was opened.
    pub fn corrupt_records(&self) -> Vec<MessageId> {
        self.lock().corrupt.clone()
    }

    /// Deletes delivered and cancelled messages last changed before `before`. One flush.
    pub async fn prune(&self, before: jiff::Timestamp) -> Result<usize, OutboxError> {
        let this = self.clone();
        run_blocking(move || {
            let mut removed = 0;
            for item in this.messages.iter() {
                let (k, v) = item.map_err(storage)?;
                let Ok(r) = decode(&v) else { continue };
                if r.state.is_terminal() && r.updated_at < before {
                    this.messages.remove(k).map_err(storage)?;
                    let mut index = this.lock();
                    if let Some(n) = index.counts.get_mut(&r.state) {
                        *n = n.saturating_sub(1);
                    }
                    removed += 1;
                }
            }
            if removed > 0 {
                this.db.flush().map_err(storage)?;
                this.changed();
            }
            Ok(removed)
        })
        .await
    }

    /// Operator: send a `failed` or `uncertain` message again, optionally with new content.
    /// A message still `sending` here was interrupted by a crash (operator commands run
    /// while the gateway is stopped): it is as uncertain as an `uncertain` one.
    pub async fn retry(
        &self,
        id: MessageId,
        by: &str,
        new_content: Option<String>,
    ) -> Result<Record, OutboxError> {
        let mut r = self.get(id)?;
        if !matches!(r.state, State::Failed | State::Uncertain | State::Sending) {
            return Err(OutboxError::WrongState {
                id,
                state: r.state,
                action: "retry",
                allowed: "failed, uncertain (or sending, after a crash)",
            });
        }
        let detail = match new_content {
            Some(content) if content != r.content => {
                let detail = format!("content edited; previous content: {}", r.content);
                r.content = content;
                Some(detail)
            }
            _ => None,
        };
        r.server_errors = 0;
        r.last_error = None;
        let action = if detail.is_some() {
            "edited and retried"
        } else {
            "retried"
        };
        r.change(State::Queued, by, action, detail);
        self.put(&r).await?;
        Ok(r)
    }

    /// Operator: never send this message. Releases the order's lane.
    pub async fn cancel(&self, id: MessageId, by: &str) -> Result<Record, OutboxError> {
        let mut r = self.get(id)?;
        if !matches!(r.state, State::Queued | State::Failed | State::Uncertain) {
            return Err(OutboxError::WrongState {
                id,
                state: r.state,
                action: "cancel",
                allowed: "queued, failed, uncertain",
            });
        }
        r.change(State::Cancelled, by, "cancelled", None);
        self.put(&r).await?;
        Ok(r)
    }

    /// Operator: an `uncertain` message (or one left `sending` by a crash) did reach
    /// D365 (checked on the MES page).
    pub async fn resolve_delivered(&self, id: MessageId, by: &str) -> Result<Record, OutboxError> {
        let mut r = self.get(id)?;
        if !matches!(r.state, State::Uncertain | State::Sending) {
            return Err(OutboxError::WrongState {
                id,
                state: r.state,
                action: "resolve",
                allowed: "uncertain (or sending, after a crash)",
            });
        }
        r.change(State::Delivered, by, "resolved as delivered", None);
        self.put(&r).await?;
        Ok(r)
    }
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
mod tests {
    use super::*;

    fn msg(order: &str, n: u32) -> NewMessage {
        NewMessage {
            production_order: order.into(),
            message_type: "ProdProductionOrderStart".into(),
            content: format!("{{\"ProductionOrderNumber\":\"{order}\",\"n\":{n}}}"),
            origin: "test".into(),
        }
    }

    #[tokio::test]
    async fn lanes_are_fifo_per_order_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids = {
            let outbox = Outbox::open(dir.path()).unwrap();
            let recs = outbox
                .append(vec![msg("A", 1), msg("B", 1), msg("A", 2)])
                .await
                .unwrap();
            recs.iter().map(|r| r.id).collect::<Vec<_>>()
        };
        assert!(ids[0] < ids[1] && ids[1] < ids[2]);
        let outbox = Outbox::open(dir.path()).unwrap();
        let heads = outbox.lane_heads();
        assert_eq!(
            heads.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![ids[0], ids[1]]
        );

        let mut first = heads[0].clone();
        first.change(State::Delivered, "test", "delivered", None);
        outbox.put(&first).await.unwrap();
        let heads = outbox.lane_heads();
        assert_eq!(
            heads.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![ids[2], ids[1]]
        );
        assert_eq!(
            outbox.oldest_pending(),
            Some(outbox.get(ids[1]).unwrap().created_at),
            "A1 is delivered: the oldest pending is B1"
        );
        assert_eq!(outbox.counts()[&State::Delivered], 1);
        assert_eq!(outbox.counts()[&State::Queued], 2);
    }

    #[tokio::test]
    async fn a_second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Outbox::open(dir.path()).unwrap();
        let err = Outbox::open(dir.path()).unwrap_err();
        assert!(matches!(err, OutboxError::Locked { .. }), "{err}");
    }

    #[tokio::test]
    async fn operator_actions_check_state_and_record_history() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let r = outbox.append(vec![msg("A", 1)]).await.unwrap().remove(0);
        assert!(matches!(
            outbox.resolve_delivered(r.id, "op").await,
            Err(OutboxError::WrongState { .. })
        ));
        assert!(matches!(
            outbox.retry(r.id, "op", None).await,
            Err(OutboxError::WrongState { .. })
        ));

        let mut failed = r.clone();
        failed.server_errors = 3;
        failed.change(State::Failed, "gateway", "failed", Some("HTTP 500".into()));
        outbox.put(&failed).await.unwrap();
        let retried = outbox
            .retry(r.id, "alice", Some("{\"x\":1}".into()))
            .await
            .unwrap();
        assert_eq!(retried.state, State::Queued);
        assert_eq!(retried.server_errors, 0);
        assert_eq!(retried.content, "{\"x\":1}");
        let last = retried.history.last().unwrap();
        assert_eq!(
            (last.by.as_str(), last.action.as_str()),
            ("alice", "edited and retried")
        );

        let cancelled = outbox.cancel(r.id, "bob").await.unwrap();
        assert_eq!(cancelled.state, State::Cancelled);
        assert!(outbox.lane_heads().is_empty());
    }

    #[tokio::test]
    async fn prune_removes_only_old_terminal_messages() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let recs = outbox.append(vec![msg("A", 1), msg("A", 2)]).await.unwrap();
        let mut done = recs[0].clone();
        done.change(State::Delivered, "t", "delivered", None);
        outbox.put(&done).await.unwrap();
        let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
        assert_eq!(outbox.prune(future).await.unwrap(), 1);
        assert!(matches!(
            outbox.get(recs[0].id),
            Err(OutboxError::NotFound(_))
        ));
        assert_eq!(outbox.get(recs[1].id).unwrap().state, State::Queued);
    }
}
