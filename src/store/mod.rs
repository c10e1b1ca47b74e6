//! The ground floor: the gateway's one database file and its life — open (with the
//! one-time move from sled), reopen after a failed write, compaction, and where write
//! transactions run. Everything durable lives in it, each concern in its own tables and
//! its own module on top:
//!
//! | tables | owner |
//! |---|---|
//! | messages, lanes, sending, delivered, done, contents, rejected, unmatched | [`crate::outbox`] (messages, their lanes and D365's verdicts) |
//! | ingress | [`receipts`] (MQTT deliveries and event ids already stored) |
//! | publishes | [`publications`] (rules' MQTT messages not yet acknowledged) |
//! | state | [`owner`] (the rules engine's and the dispatcher's saved state) |
//!
//! redb types never leave [`kv`] (and sled's, kept to migrate an old store, `migrate.rs`).
//! The file is `<data_dir>/outbox/outbox.redb`: the directory kept its name from the days
//! when the outbox was the whole database, so an upgraded plant moves nothing.
//!
//! # Where writes run: one rule
//!
//! Every write transaction runs on tokio's blocking pool, through [`Store::write`] (or
//! [`Store::spawn_write`] for the dispatcher's open turn, which the caller awaits later).
//! Never on an async worker: a write waits for the single write transaction, which an
//! open dispatcher turn may hold for up to `TURN_IDLE_MAX`, and for an fsync. Measured
//! (`cargo bench --bench outbox -- hop`, 2-core VM, 2026-12-07): the hop to the blocking
//! pool and back costs 7.9 µs; a write that is not flushed costs 13.1 µs through it, a
//! durable one 81 µs (this VM's fsync; a plant PC's disk is slower, which only makes the
//! hop smaller by comparison). Cheap enough for the one rule to hold for every write, the
//! small bookkeeping ones included. A dedicated writer thread would serialise the writes,
//! which redb's single write transaction already does, and would add a channel hop of its
//! own.

pub(crate) mod compact;
pub(crate) mod kv;
mod migrate;
pub mod owner;
pub mod publications;
pub mod receipts;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use kv::Kv;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
    NotFound(u64),
    #[error("message {id} is {state}: cannot {action} it (allowed from: {allowed})")]
    WrongState {
        id: u64,
        state: String,
        action: &'static str,
        allowed: String,
    },
    #[error("message {id} went out in one request with other messages of its order (lead: message {lead}); its content cannot be edited on its own: retry it unchanged, or cancel the group and queue a corrected message")]
    Joined { id: u64, lead: u64 },
    #[error(
        "the dispatcher's open turn got no step for {}s and was rolled back",
        TURN_IDLE_MAX_SECS
    )]
    TurnAbandoned,
}

/// How long an open turn may wait for its owner's next step, in seconds (the outbox's
/// `TURN_IDLE_MAX`; here for the error's message).
pub const TURN_IDLE_MAX_SECS: u64 = 2;

pub fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

/// redb's page cache: reads of records and index pages, and the pages a write
/// transaction changes. A fixed budget, whatever the backlog (docs/performance.md says
/// what it was measured at).
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// How long [`Store::replace`] waits for operations still using the failed database.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long opening waits for a directory lock before reporting it as held by another
/// process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The store file in its directory.
const STORE_FILE: &str = "outbox.redb";

type ReopenHook = Box<dyn Fn(&Kv) + Send + Sync>;

/// The database, cheap to clone: every clone shares it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` only after a failed [`Store::replace`] (then `broken` is set).
    slot: RwLock<Option<Arc<Kv>>>,
    /// A write failed. redb then refuses every later write ("previous I/O error") until
    /// the file is reopened, so the next operation reopens it, which recovers everything
    /// that was committed.
    broken: AtomicBool,
    reopening: Mutex<()>,
    /// `<data_dir>/outbox`.
    path: PathBuf,
    /// Run on every store opened again (the owners' counts may have to be read anew).
    on_reopen: Mutex<Vec<ReopenHook>>,
    /// The sequence number of the next publication (above every stored one).
    next_publication: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Store {
    /// Opens (or creates) the database in `data_dir/outbox`: finishes an interrupted
    /// compaction, moves a sled store over, and creates every table. Blocking: call it
    /// before starting work or from a blocking context.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join("outbox");
        let open_error = |cause| StoreError::Open {
            path: path.clone(),
            cause,
        };
        std::fs::create_dir_all(data_dir).map_err(open_error)?;
        compact::finish_interrupted(data_dir).map_err(open_error)?;
        std::fs::create_dir_all(&path).map_err(open_error)?;
        let kv = open_kv(&path)?;
        let next_publication = AtomicU64::new(1 + publications::max_seq(&kv.read()?)?);
        Ok(Store {
            inner: Arc::new(Inner {
                slot: RwLock::new(Some(Arc::new(kv))),
                broken: AtomicBool::new(false),
                reopening: Mutex::new(()),
                path,
                on_reopen: Mutex::new(Vec::new()),
                next_publication,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Disk use of the store, in bytes.
    pub fn disk_bytes(&self) -> u64 {
        compact::dir_bytes(&self.inner.path)
    }

    /// Calls `f` on every store opened again after a failed write or a compaction.
    pub(crate) fn on_reopen(&self, f: impl Fn(&Kv) + Send + Sync + 'static) {
        self.inner
            .on_reopen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(f));
    }

    /// The open database; reopens it first if a write failed. Blocking when it reopens.
    pub(crate) fn kv(&self) -> Result<Arc<Kv>, StoreError> {
        if self.inner.broken.load(Ordering::Acquire) {
            self.reopen()?;
        }
        self.inner
            .slot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| storage("the outbox is being reopened after a write error"))
    }

    /// A consistent view of the last commit.
    pub(crate) fn read(&self) -> Result<kv::Rx, StoreError> {
        self.kv()?.read()
    }

    /// Runs write work on the blocking pool (the one rule, module doc); a storage error
    /// marks the database for reopening.
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Kv) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.spawn_write(f)
            .await
            .map_err(|e| storage(format!("store task failed: {e}")))?
    }

    /// [`Store::write`], started now and awaited by the caller when it wants the result.
    pub(crate) fn spawn_write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Kv) -> Result<T, StoreError> + Send + 'static,
    ) -> tokio::task::JoinHandle<Result<T, StoreError>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_here(f))
    }

    /// Blocking work on the store that may also write (reads that drop a stale entry),
    /// from a thread that may block: the CLI, or the blocking pool itself.
    pub(crate) fn write_here<T>(
        &self,
        f: impl FnOnce(&Kv) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let kv = self.kv()?;
        let result = f(&kv);
        drop(kv);
        if matches!(result, Err(StoreError::Storage(_))) {
            self.inner.broken.store(true, Ordering::Release);
        }
        result
    }

    /// Replaces a database that refuses writes with a freshly opened one.
    fn reopen(&self) -> Result<(), StoreError> {
        let _only_one = self
            .inner
            .reopening
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !self.inner.broken.load(Ordering::Acquire) {
            return Ok(()); // another caller did it while this one waited
        }
        self.replace(|_| Ok(()), || Ok(()))
            .map_err(|e| storage(format!("cannot reopen the outbox after a write error: {e}")))?;
        tracing::warn!(path = %self.inner.path.display(), "Outbox reopened after a write error; writing again.");
        Ok(())
    }

    /// Closes the open store and opens what is then at its path, with every other
    /// operation held back (they wait on the store lock). Operations that started before
    /// still hold the store: this waits up to `REOPEN_WAIT` for them, or gives up with the
    /// store unchanged. `prepare` runs on the store before it is closed (when there is
    /// one), `while_closed` after (the store file is locked while open, so the old store
    /// must be gone before the new one opens). If the new one cannot be opened the store
    /// is left broken and the next operation tries again. Callers hold `reopening`.
    fn replace<T>(
        &self,
        prepare: impl FnOnce(&Kv) -> Result<(), StoreError>,
        while_closed: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let inner = &self.inner;
        let mut slot = inner.slot.write().unwrap_or_else(|p| p.into_inner());
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
        let data_dir = inner.path.parent().unwrap_or(Path::new("."));
        let opened = compact::finish_interrupted(data_dir)
            .map_err(|cause| StoreError::Open {
                path: inner.path.clone(),
                cause,
            })
            .and_then(|()| open_kv(&inner.path));
        match opened {
            Ok(kv) => {
                for hook in inner
                    .on_reopen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                {
                    hook(&kv);
                }
                *slot = Some(Arc::new(kv));
                inner.broken.store(false, Ordering::Release);
            }
            Err(e) => {
                inner.broken.store(true, Ordering::Release);
                return Err(e);
            }
        }
        result
    }

    /// Rewrites the store into a fresh one (crash-safe; see compact.rs), with `finally`
    /// written into the copy by its one durable commit. Every other operation waits
    /// meanwhile. Returns the disk use before and after, in bytes.
    pub(crate) async fn compact(
        &self,
        finally: Vec<(kv::T, Vec<u8>, Vec<u8>)>,
    ) -> Result<(u64, u64), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.compact_blocking(&finally))
            .await
            .map_err(|e| storage(format!("store task failed: {e}")))?
    }

    fn compact_blocking(
        &self,
        finally: &[(kv::T, Vec<u8>, Vec<u8>)],
    ) -> Result<(u64, u64), StoreError> {
        let _only_one = self
            .inner
            .reopening
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.inner.broken.load(Ordering::Acquire) {
            return Err(storage("the outbox is being reopened after a write error"));
        }
        let before = self.disk_bytes();
        let data_dir = self.inner.path.parent().unwrap_or(Path::new("."));
        self.replace(
            |live| compact::build_copy(live, data_dir, finally),
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
}

/// Opens the store file in `dir`; waits up to `LOCK_WAIT` for a lock another handle of
/// this process may still hold (a reopen right after an operation that still had it).
fn open_kv(dir: &Path) -> Result<Kv, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match open_kv_once(dir) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn open_kv_once(dir: &Path) -> Result<Kv, StoreError> {
    migrate::from_sled(dir, CACHE_BYTES)?;
    let file = dir.join(STORE_FILE);
    Kv::open(&file, CACHE_BYTES).map_err(|e| e.at(dir, &file))
}

/// Seconds since 1970, ordered as bytes (sign bit flipped: times before 1970 sort first).
pub fn time_key(t: jiff::Timestamp) -> [u8; 8] {
    ((t.as_second() as u64) ^ (1 << 63)).to_be_bytes()
}

/// `len(name) as u32 BE ++ name`: the prefix of every key of one source or publisher.
pub fn name_prefix(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + name.len() + 2);
    k.extend_from_slice(&(name.len() as u32).to_be_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}
