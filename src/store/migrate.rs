//! The one-time move of an outbox written by an earlier build (sled 0.34, before December
//! 2026) into the redb store: a plant that upgrades with messages still queued keeps every
//! one of them, with its id, state and history, and the rules engine's counters.
//!
//! ```text
//! 1. <outbox>/outbox.redb.migrating  built from every sled tree (same names, same keys
//!                                    and values), committed durably, synced
//! 2. → <outbox>/outbox.redb          rename (atomic), directory synced
//! 3. sled's files removed            (db, conf, blobs/, snap.*)
//! ```
//!
//! A crash before step 2 leaves the sled store as it was, and the next start migrates again
//! from scratch; after step 2 the redb store is the truth and sled's leftovers are removed
//! at the next start. This is the only place (with its dependency) that knows sled.

use std::path::Path;

use super::kv::{Kv, T};
use super::{storage, StoreError, STORE_FILE};

/// What is being built, next to the store file.
const MIGRATING: &str = "outbox.redb.migrating";
/// Entries per write batch while copying.
const COPY_BATCH: usize = 10_000;

/// sled's files in its directory.
fn sled_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| matches!(n, "db" | "conf" | "blobs") || n.starts_with("snap."))
        })
        .collect()
}

/// Migrates a sled store in `dir` into the redb store file, when there is one to migrate.
pub(super) fn from_sled(dir: &Path, cache_bytes: usize) -> Result<(), StoreError> {
    let open_error = |cause: std::io::Error| StoreError::Open {
        path: dir.to_path_buf(),
        cause,
    };
    let leftovers = sled_files(dir);
    if leftovers.is_empty() {
        return Ok(());
    }
    if dir.join(STORE_FILE).exists() {
        // Step 3 was interrupted: the redb store is complete.
        remove(&leftovers).map_err(open_error)?;
        return Ok(());
    }
    tracing::warn!(dir = %dir.display(), "Moving the outbox from the old store format (sled) into the new one (redb); once only.");
    let migrating = dir.join(MIGRATING);
    match std::fs::remove_file(&migrating) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(open_error(e)),
        _ => {}
    }
    let copied = copy(dir, &migrating, cache_bytes)?;
    std::fs::File::open(&migrating)
        .and_then(|f| f.sync_all())
        .map_err(open_error)?;
    std::fs::rename(&migrating, dir.join(STORE_FILE)).map_err(open_error)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(open_error)?;
    // Listed again: sled writes a snapshot when it closes.
    remove(&sled_files(dir)).map_err(open_error)?;
    tracing::warn!(dir = %dir.display(), entries = copied, "Outbox moved to the new store format.");
    Ok(())
}

fn copy(dir: &Path, into: &Path, cache_bytes: usize) -> Result<u64, StoreError> {
    let unreadable = |why: String| StoreError::Open {
        path: dir.to_path_buf(),
        cause: std::io::Error::other(format!(
            "the outbox in the old format (sled) cannot be read: {why}; it is left as it is"
        )),
    };
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes as u64);
    // sled 0.34 panics on some stores a power cut tore; the daemon never panics on its input.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())).map_err(
        |panic| {
            unreadable(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "sled panicked".into()),
            )
        },
    )?;
    let old = opened.map_err(|e| match e {
        sled::Error::Io(io) if io.to_string().contains("lock") => StoreError::Locked {
            path: dir.to_path_buf(),
        },
        // Its Display adds an empty "backtrace ()"; an operator needs what and where.
        sled::Error::Corruption { at, .. } => unreadable(match at {
            Some(at) => format!("corrupted data at {at:?}"),
            None => "corrupted data".into(),
        }),
        other => unreadable(other.to_string()),
    })?;
    let new = Kv::open(into, cache_bytes).map_err(|e| e.at(dir, into))?;
    let mut copied = 0u64;
    for table in T::ALL {
        let tree = old.open_tree(table.name()).map_err(storage)?;
        let mut batch = Vec::with_capacity(COPY_BATCH);
        let mut items = tree.iter();
        loop {
            let item = items.next();
            let done = item.is_none();
            if let Some(item) = item {
                let (k, v) = item.map_err(|e| unreadable(e.to_string()))?;
                batch.push((k, v));
            }
            if batch.len() == COPY_BATCH || (done && !batch.is_empty()) {
                copied += batch.len() as u64;
                new.write(false, |tx| {
                    for (k, v) in batch.drain(..) {
                        tx.insert(table, &k, &v)?;
                    }
                    Ok(())
                })?;
            }
            if done {
                break;
            }
        }
    }
    // One durable commit makes every batch before it durable.
    new.write(true, |tx| {
        tx.insert(T::State, b"outbox.migrated_from", b"sled 0.34")
    })?;
    Ok(copied)
}

fn remove(files: &[std::path::PathBuf]) -> std::io::Result<()> {
    for f in files {
        let removed = if f.is_dir() {
            std::fs::remove_dir_all(f)
        } else {
            std::fs::remove_file(f)
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}
