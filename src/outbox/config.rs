//! The outbox's storage settings (`storage`): where the store lives, how long delivered
//! messages are kept, how often pruning runs.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{resolve, FileCheck};

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// How long delivered and cancelled messages are kept before pruning.
    pub retention: Duration,
    pub prune_interval: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub data_dir: Option<String>,
    pub retention: Option<String>,
    pub prune_interval: Option<String>,
}

/// Checks the `storage` section (defaults where it is not written).
pub fn read_storage(cx: &mut FileCheck<'_>) -> StorageConfig {
    let raw = match cx.node("storage") {
        Some(_) => cx.parse::<RawStorage>("storage").unwrap_or_default(),
        None => RawStorage::default(),
    };
    let data_dir = match raw.data_dir {
        Some(d) if d.trim().is_empty() => {
            cx.error("storage.data_dir", "must not be empty");
            PathBuf::new()
        }
        // Relative paths are relative to the configuration directory, not to the
        // working directory, so `run -c DIR` behaves the same from anywhere.
        Some(d) => resolve(cx.dir(), &d),
        None => PathBuf::from("/var/lib/mes-gateway"),
    };
    StorageConfig {
        data_dir,
        retention: cx.duration(
            "storage.retention",
            raw.retention,
            Duration::from_secs(7 * 86_400),
        ),
        prune_interval: cx.duration_at_least(
            "storage.prune_interval",
            raw.prune_interval,
            Duration::from_secs(3600),
            Duration::from_secs(1),
            "pruning reads the whole outbox",
        ),
    }
}
