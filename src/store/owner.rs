//! Owner state: what a component saves to continue where it stopped (the rules engine's
//! counters, accumulators and order contexts, written with the messages they produced; the
//! dispatcher's pause). Table "state": key = owner name, value = opaque bytes of that
//! owner. The outbox keeps its own bookkeeping there too (the next message id).

use super::kv::{Tx, T};
use super::{Store, StoreError};

/// The owner state table (module doc).
#[derive(Debug, Clone)]
pub struct Owners {
    store: Store,
}

impl Store {
    pub fn owners(&self) -> Owners {
        Owners {
            store: self.clone(),
        }
    }
}

impl Owners {
    /// Saves an owner's state on its own (the dispatcher's pause); one flush.
    pub async fn save(&self, owner: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let owner = owner.to_string();
        self.store
            .write(move |kv| kv.write(true, |tx| put(tx, &owner, &bytes)))
            .await
    }

    /// The state an owner saved.
    pub fn load(&self, owner: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.read()?.get(T::State, owner.as_bytes())
    }
}

/// Saves an owner's state in a transaction that writes what goes with it.
pub(crate) fn put(tx: &mut Tx<'_>, owner: &str, bytes: &[u8]) -> Result<(), StoreError> {
    tx.insert(T::State, owner.as_bytes(), bytes)
}
