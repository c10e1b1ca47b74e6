//! The storage engine under the outbox: one redb file, one table per concern, byte keys and
//! byte values. Only this file (and the one-time migration from the old engine,
//! migrate.rs) knows redb; the rest of the outbox reads and writes through [`Kv`].
//!
//! Why redb (it replaced sled 0.34 in December 2026): a commit is a copy-on-write B-tree whose new
//! root is published by one header write, checksummed, after one fsync. A power cut at any
//! moment leaves the previous commit or the new one, never a torn store (sled panicked
//! while recovering such a store and lost acknowledged messages when forced open; see
//! tests/power_cut.rs). Its page cache is a fixed budget, so memory does not grow with the
//! backlog, and it has no background threads.
//!
//! Every write goes through [`Kv::write`]: one transaction, committed with one fsync
//! (`durable`) or without (`!durable`: bookkeeping that may be lost in a crash, made
//! durable by the next durable commit).

use std::ops::Bound;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{storage, StoreError};

/// The tables. Their names are the file format; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum T {
    Messages,
    /// The lane index before December 2026; emptied at the first open (lanes.rs).
    Lanes,
    Ingress,
    Done,
    State,
    Contents,
    Rejected,
    Unmatched,
    Publishes,
    LaneEnds,
    LaneLinks,
    Sending,
    Delivered,
    /// Messages D365 may have twice (outbox/verdict.rs).
    Duplicates,
}

impl T {
    pub(crate) const ALL: [T; 14] = [
        T::Messages,
        T::Lanes,
        T::Ingress,
        T::Done,
        T::State,
        T::Contents,
        T::Rejected,
        T::Unmatched,
        T::Publishes,
        T::LaneEnds,
        T::LaneLinks,
        T::Sending,
        T::Delivered,
        T::Duplicates,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            T::Messages => "messages",
            T::Lanes => "lanes",
            T::Ingress => "ingress",
            T::Done => "done",
            T::State => "state",
            T::Contents => "contents",
            T::Rejected => "rejected",
            T::Unmatched => "unmatched",
            T::Publishes => "publishes",
            T::LaneEnds => "lane_ends",
            T::LaneLinks => "lane_links",
            T::Sending => "sending",
            T::Delivered => "delivered",
            T::Duplicates => "duplicates",
        }
    }

    fn def(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(self.name())
    }
}

/// Keys from `from` (inclusive) to `to` (exclusive); `None` is open-ended.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Span<'k> {
    pub from: Option<&'k [u8]>,
    pub to: Option<&'k [u8]>,
}

impl<'k> Span<'k> {
    pub fn all() -> Span<'static> {
        Span::default()
    }

    pub fn from(from: &'k [u8]) -> Span<'k> {
        Span {
            from: Some(from),
            to: None,
        }
    }

    pub fn to(to: &'k [u8]) -> Span<'k> {
        Span {
            from: None,
            to: Some(to),
        }
    }

    fn bounds(self) -> (Bound<&'k [u8]>, Bound<&'k [u8]>) {
        (
            self.from.map_or(Bound::Unbounded, Bound::Included),
            self.to.map_or(Bound::Unbounded, Bound::Excluded),
        )
    }
}

/// Every key that starts with a prefix: owns the bounds a [`Span`] borrows.
pub(crate) struct Prefix {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Prefix {
    pub fn new(prefix: &[u8]) -> Prefix {
        Prefix {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    pub fn span(&self) -> Span<'_> {
        Span {
            from: Some(&self.start),
            to: self.end.as_deref(),
        }
    }
}

/// The first key after every key that starts with `prefix` (`None`: no such key, the
/// prefix is all 0xff).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A copy of the value under `key` in `table`.
fn copy_of<Tbl: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &Tbl,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table.get(key).map_err(storage)?.map(|v| v.value().to_vec()))
}

/// Walks `table`'s keys in `span` (backwards when `rev`), calling `visit` until it says
/// stop (`false`).
fn walk<Tbl: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &Tbl,
    span: Span<'_>,
    rev: bool,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let range = table.range::<&[u8]>(span.bounds()).map_err(storage)?;
    type Item<'a> = Result<
        (
            redb::AccessGuard<'a, &'static [u8]>,
            redb::AccessGuard<'a, &'static [u8]>,
        ),
        redb::StorageError,
    >;
    let mut step = |item: Item<'_>| -> Result<bool, StoreError> {
        let (k, v) = item.map_err(storage)?;
        visit(k.value(), v.value())
    };
    if rev {
        for item in range.rev() {
            if !step(item)? {
                break;
            }
        }
    } else {
        for item in range {
            if !step(item)? {
                break;
            }
        }
    }
    Ok(())
}

/// A key and its value, copied out of the store.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// The open store file.
pub(crate) struct Kv {
    db: redb::Database,
}

/// Why a store could not be opened.
pub(crate) enum OpenError {
    /// Another process (or handle) has it open.
    Locked,
    Io(std::io::Error),
    Other(String),
}

impl OpenError {
    /// The outbox's error for the store file `file` in the outbox directory `dir`.
    pub(crate) fn at(self, dir: &Path, file: &Path) -> StoreError {
        match self {
            OpenError::Locked => StoreError::Locked {
                path: dir.to_path_buf(),
            },
            OpenError::Io(cause) => StoreError::Open {
                path: file.to_path_buf(),
                cause,
            },
            OpenError::Other(why) => StoreError::Open {
                path: file.to_path_buf(),
                cause: std::io::Error::other(why),
            },
        }
    }
}

impl Kv {
    /// Opens (or creates) the store file. A store a crash interrupted is repaired first
    /// (redb checks the last commit's checksums and falls back to the one before).
    pub(crate) fn open(file: &Path, cache_bytes: usize) -> Result<Kv, OpenError> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .set_repair_callback(|session| {
                // Called repeatedly while a repair runs; one line per tenth is plenty.
                let tenth = (session.progress() * 10.0) as u32;
                tracing::warn!(
                    progress = format!("{}%", tenth * 10),
                    "Repairing the outbox after an unclean stop (power cut or kill)."
                );
            })
            .create(file)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => OpenError::Locked,
                redb::DatabaseError::Storage(redb::StorageError::Io(io)) => OpenError::Io(io),
                other => OpenError::Other(other.to_string()),
            })?;
        let kv = Kv { db };
        // Every table exists from the start, so reads never meet a missing one.
        kv.write(true, |tx| {
            for t in T::ALL {
                tx.table(t)?;
            }
            Ok(())
        })
        .map_err(|e| OpenError::Other(e.to_string()))?;
        Ok(kv)
    }

    /// A consistent view of the last commit (any number at once, alongside a write).
    pub(crate) fn read(&self) -> Result<Rx, StoreError> {
        Ok(Rx {
            txn: self.db.begin_read().map_err(storage)?,
            open: Default::default(),
        })
    }

    /// Runs `f` in one write transaction (writes wait for each other) and commits it when
    /// `f` succeeds; `durable`: on disk when this returns (one fsync).
    pub(crate) fn write<R>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Tx<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(storage)?;
        }
        let result = {
            let mut tx = Tx {
                txn: &txn,
                open: Default::default(),
            };
            f(&mut tx)
        };
        match result {
            Ok(r) => {
                txn.commit().map_err(storage)?;
                Ok(r)
            }
            Err(e) => {
                txn.abort().map_err(storage)?;
                Err(e)
            }
        }
    }
}

/// Point reads, wherever they come from: a read transaction ([`Rx`]) or a write
/// transaction that sees its own writes ([`Reading`]). What reads a record and what lies
/// over it is written once against this.
pub(crate) trait Get {
    fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
}

impl Get for Rx {
    fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Rx::get(self, t, key)
    }
}

/// A write transaction lent for reading through a shared reference (see [`Get`]).
pub(crate) struct Reading<'a, 'txn>(std::cell::RefCell<&'a mut Tx<'txn>>);

impl<'a, 'txn> Reading<'a, 'txn> {
    pub(crate) fn new(tx: &'a mut Tx<'txn>) -> Self {
        Reading(std::cell::RefCell::new(tx))
    }
}

impl Get for Reading<'_, '_> {
    fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        // A point read borrows only for its own duration and calls nothing back, so the
        // borrow can never be taken twice.
        self.0.borrow_mut().get(t, key)
    }
}

/// A read transaction, and its tables, each opened at its first use and kept open: a
/// dispatcher turn reads three tables per record, and opening one is a search of its own.
pub(crate) struct Rx {
    txn: redb::ReadTransaction,
    open: [std::cell::OnceCell<ReadTable>; T::ALL.len()],
}

type ReadTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

impl Rx {
    fn table(&self, t: T) -> Result<&ReadTable, StoreError> {
        let slot = &self.open[t as usize];
        if let Some(table) = slot.get() {
            return Ok(table);
        }
        let table = self.txn.open_table(t.def()).map_err(storage)?;
        Ok(slot.get_or_init(|| table))
    }

    pub(crate) fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        copy_of(self.table(t)?, key)
    }

    pub(crate) fn scan(
        &self,
        t: T,
        span: Span<'_>,
        rev: bool,
        visit: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        walk(self.table(t)?, span, rev, visit)
    }

    /// The first entry in `span` (the last when `rev`).
    pub(crate) fn first(
        &self,
        t: T,
        span: Span<'_>,
        rev: bool,
    ) -> Result<Option<Entry>, StoreError> {
        let mut found = None;
        self.scan(t, span, rev, |k, v| {
            found = Some((k.to_vec(), v.to_vec()));
            Ok(false)
        })?;
        Ok(found)
    }

    pub(crate) fn len(&self, t: T) -> Result<u64, StoreError> {
        self.table(t)?.len().map_err(storage)
    }
}

type Table<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// A write transaction's tables, each opened at its first use and kept open.
pub(crate) struct Tx<'txn> {
    txn: &'txn redb::WriteTransaction,
    open: [Option<Table<'txn>>; T::ALL.len()],
}

impl<'txn> Tx<'txn> {
    fn table(&mut self, t: T) -> Result<&mut Table<'txn>, StoreError> {
        let slot = &mut self.open[t as usize];
        match slot {
            Some(table) => Ok(table),
            None => Ok(slot.insert(self.txn.open_table(t.def()).map_err(storage)?)),
        }
    }

    pub(crate) fn insert(&mut self, t: T, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.table(t)?.insert(key, value).map_err(storage)?;
        Ok(())
    }

    /// Removes a key; whether it was there.
    pub(crate) fn remove(&mut self, t: T, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.table(t)?.remove(key).map_err(storage)?.is_some())
    }

    pub(crate) fn get(&mut self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        copy_of(&*self.table(t)?, key)
    }

    /// How many keys the table holds, this transaction's writes included.
    pub(crate) fn len(&mut self, t: T) -> Result<u64, StoreError> {
        self.table(t)?.len().map_err(storage)
    }

    /// Walks keys as [`Rx::scan`] does, seeing this transaction's own writes.
    pub(crate) fn scan(
        &mut self,
        t: T,
        span: Span<'_>,
        rev: bool,
        visit: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        walk(&*self.table(t)?, span, rev, visit)
    }

    /// Copies up to `limit` keys (and values) in `span`, for a caller that removes them.
    pub(crate) fn collect(
        &mut self,
        t: T,
        span: Span<'_>,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        self.scan(t, span, false, |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }
}
