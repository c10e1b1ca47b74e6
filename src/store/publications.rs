//! Publications: the MQTT messages rules built, kept until their broker acknowledges them
//! (written in the transaction of the batch that built them, so a crash loses none; sent
//! by `crate::publish`). Table "publishes":
//!
//! ```text
//! key   = len(via) as u32 BE ++ via ++ sequence (u64 BE)
//! value = JSON of the Publication
//! ```

use std::sync::atomic::Ordering;

use super::kv::{self, Prefix, Rx, Span, Tx, T};
use super::{name_prefix, storage, Store, StoreError};

/// One MQTT message a rule built.
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

/// The publications table (module doc).
#[derive(Debug, Clone)]
pub struct Publications {
    store: Store,
}

impl Store {
    pub fn publications(&self) -> Publications {
        Publications {
            store: self.clone(),
        }
    }
}

impl Publications {
    /// Publications for the broker of `via` not yet acknowledged, in the order built,
    /// after sequence `after` (up to `limit`). One that cannot be read is logged and
    /// removed.
    pub async fn pending(
        &self,
        via: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Publication)>, StoreError> {
        let via = via.to_string();
        self.store
            .write(move |kv| {
                let prefix = name_prefix(&via);
                let start = key(&via, after.map_or(0, |a| a.saturating_add(1)));
                let of_via = Prefix::new(&prefix);
                let span = Span {
                    from: Some(&start),
                    ..of_via.span()
                };
                let mut out = Vec::new();
                let mut unreadable = Vec::new();
                kv.read()?.scan(T::Publishes, span, false, |k, v| {
                    let Some(seq) = k[prefix.len()..].try_into().ok().map(u64::from_be_bytes)
                    else {
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
                    kv.write(false, |tx| {
                        for k in &unreadable {
                            tx.remove(T::Publishes, k)?;
                        }
                        Ok(())
                    })?;
                }
                Ok(out)
            })
            .await
    }

    /// The broker acknowledged a publication. Not flushed: a crash before the next flush
    /// publishes it again (at least once).
    pub async fn forget(&self, via: &str, seq: u64) -> Result<(), StoreError> {
        let k = key(via, seq);
        self.store
            .write(move |kv| {
                kv.write(false, |tx| {
                    tx.remove(T::Publishes, &k)?;
                    Ok(())
                })
            })
            .await
    }

    /// How many publications wait for their brokers, all brokers together.
    pub fn waiting(&self) -> usize {
        self.store
            .read()
            .and_then(|rx| rx.len(T::Publishes))
            .map_or(0, |n| n as usize)
    }
}

/// `list` as keys and values, numbered now: called at each attempt of a batch's write, so a
/// retried batch rewrites its publications under new numbers only if the failed attempt
/// wrote nothing (one transaction).
pub(crate) fn stage(store: &Store, list: &[Publication]) -> Result<Vec<kv::Entry>, StoreError> {
    list.iter()
        .map(|p| {
            let seq = store.inner.next_publication.fetch_add(1, Ordering::AcqRel);
            Ok((key(&p.via, seq), serde_json::to_vec(p).map_err(storage)?))
        })
        .collect()
}

/// Writes staged publications into the batch's transaction.
pub(crate) fn put(tx: &mut Tx<'_>, staged: &[kv::Entry]) -> Result<(), StoreError> {
    for (k, v) in staged {
        tx.insert(T::Publishes, k, v)?;
    }
    Ok(())
}

fn key(via: &str, seq: u64) -> Vec<u8> {
    let mut k = name_prefix(via);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The highest publication sequence stored (0 when none): pending ones are few.
pub(super) fn max_seq(rx: &Rx) -> Result<u64, StoreError> {
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
