//! Compaction: giving back the disk a drained backlog used.
//!
//! The store file keeps its high-water mark (freed pages are reused, never given back):
//! after a week's outage of a million messages has been delivered and pruned, it still
//! takes most of a gigabyte. Compaction
//! rewrites what is live into a fresh store and swaps the directories:
//!
//! ```text
//! 1. <data_dir>/outbox.compact   built from the live store, flushed, closed, synced,
//!                                then marked complete (file COMPLETE, synced)
//! 2. outbox → outbox.old         rename (atomic), directory synced
//! 3. outbox.compact → outbox     rename (atomic), directory synced
//! 4. outbox.old                  removed
//! ```
//!
//! A crash at any point leaves one complete store that [`finish_interrupted`] (run before
//! every open) makes the live one: before step 2 the old store is intact and the copy is
//! thrown away; between 2 and 3 the copy is complete and is moved into place; after 3 the
//! old one is removed. Nothing is written to the live store while it is copied (the outbox
//! holds every other operation back). What the copy must carry beyond the live tables (the
//! outbox's floor for new message ids) is written by the copy's one durable commit.

use std::path::{Path, PathBuf};

use super::kv::{Kv, Span, T};
use super::{storage, StoreError};

/// The store being built.
const COMPACTING: &str = "outbox.compact";
/// The store being retired.
const RETIRED: &str = "outbox.old";
/// Written into the store being built once it is complete and on disk.
const COMPLETE: &str = "COMPLETE";

/// Entries per write batch while copying.
const COPY_BATCH: usize = 10_000;

fn paths(data_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        data_dir.join("outbox"),
        data_dir.join(COMPACTING),
        data_dir.join(RETIRED),
    )
}

/// Brings the directories back to one live store after a compaction was interrupted.
pub fn finish_interrupted(data_dir: &Path) -> std::io::Result<()> {
    let (live, compacting, retired) = paths(data_dir);
    if compacting.exists() {
        if live.exists() {
            // Interrupted before the swap: the live store is the whole truth.
            tracing::warn!(dir = %compacting.display(), "Removing an interrupted outbox compaction; the outbox is unchanged.");
            std::fs::remove_dir_all(&compacting)?;
        } else if compacting.join(COMPLETE).exists() {
            tracing::warn!(dir = %compacting.display(), "Finishing an interrupted outbox compaction: moving the compacted store into place.");
            std::fs::rename(&compacting, &live)?;
            sync_dir(data_dir)?;
        } else if retired.exists() {
            // Cannot happen in the order above; if it does, the retired store is whole.
            std::fs::remove_dir_all(&compacting)?;
            std::fs::rename(&retired, &live)?;
            sync_dir(data_dir)?;
        }
    }
    if retired.exists() {
        if live.exists() {
            std::fs::remove_dir_all(&retired)?;
        } else {
            std::fs::rename(&retired, &live)?;
        }
        sync_dir(data_dir)?;
    }
    Ok(())
}

/// Step 1: copies every table of `live` into a new store and marks it complete. Nothing
/// may write to `live` meanwhile. On error the partial copy is removed.
pub(crate) fn build_copy(
    live: &Kv,
    data_dir: &Path,
    finally: &[(T, Vec<u8>, Vec<u8>)],
) -> Result<(), StoreError> {
    let (_, compacting, _) = paths(data_dir);
    let result = copy_into(live, &compacting, finally);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&compacting);
    }
    result
}

fn copy_into(
    live: &Kv,
    compacting: &Path,
    finally: &[(T, Vec<u8>, Vec<u8>)],
) -> Result<(), StoreError> {
    let io = |e: std::io::Error| storage(format!("{}: {e}", compacting.display()));
    if compacting.exists() {
        std::fs::remove_dir_all(compacting).map_err(io)?;
    }
    std::fs::create_dir_all(compacting).map_err(io)?;
    {
        let copy = super::open_kv(compacting)?;
        let from = live.read()?;
        for table in T::ALL {
            let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(COPY_BATCH);
            let write = |batch: &mut Vec<(Vec<u8>, Vec<u8>)>| {
                copy.write(false, |tx| {
                    for (k, v) in batch.drain(..) {
                        tx.insert(table, &k, &v)?;
                    }
                    Ok(())
                })
            };
            from.scan(table, Span::all(), false, |k, v| {
                batch.push((k.to_vec(), v.to_vec()));
                if batch.len() == COPY_BATCH {
                    write(&mut batch)?;
                }
                Ok(true)
            })?;
            write(&mut batch)?;
        }
        // The one durable commit: it makes every batch before it durable too.
        copy.write(true, |tx| {
            for (table, k, v) in finally {
                tx.insert(*table, k, v)?;
            }
            Ok(())
        })?;
    }
    sync_dir(compacting).map_err(io)?;
    let marker = compacting.join(COMPLETE);
    std::fs::write(&marker, b"").map_err(io)?;
    std::fs::File::open(&marker)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    sync_dir(compacting).map_err(io)?;
    Ok(())
}

/// Steps 2–4, once the live store is closed.
pub(super) fn swap(data_dir: &Path) -> std::io::Result<()> {
    let (live, compacting, retired) = paths(data_dir);
    std::fs::rename(&live, &retired)?;
    sync_dir(data_dir)?;
    std::fs::rename(&compacting, &live)?;
    sync_dir(data_dir)?;
    match std::fs::remove_file(live.join(COMPLETE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::remove_dir_all(&retired)?;
    sync_dir(data_dir)
}

/// Makes renames and new files in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Bytes under a directory (what compaction gives back is measured with it).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
