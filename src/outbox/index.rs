//! The outbox's indexes and its housekeeping: the done index (one key per delivered or
//! cancelled message, what pruning and the counts at open read without decoding records),
//! building the indexes of a store written before they existed, counting messages per
//! state, and pruning.

use std::collections::{BTreeMap, HashMap};

use super::record::decode;
use super::settle::lay_delivery;
use super::{
    done_key, done_value, id_after_stamp, key, lanes, record_in, state_from_byte, verdict,
    MessageId, Outbox, State,
};
use crate::store::kv::{self, Span, T};
use crate::store::{time_key, StoreError};

impl Outbox {
    /// Deletes delivered and cancelled messages last changed before `before`. One flush.
    /// Reads the done index only (no record is decoded).
    pub async fn prune(&self, before: jiff::Timestamp) -> Result<usize, StoreError> {
        let removed = self
            .store
            .write(move |kv| {
                let end = time_key(before);
                let mut removed = Vec::new();
                // In slices, so pruning a week's deliveries holds neither much memory nor
                // the write lock for long.
                loop {
                    let slice = kv.write(true, |tx| {
                        let done = tx.collect(T::Done, Span::to(&end), PRUNE_SLICE)?;
                        for (k, v) in &done {
                            let Some(id) = id_after_stamp(k) else {
                                continue;
                            };
                            tx.remove(T::Messages, &key(id))?;
                            tx.remove(T::Delivered, &key(id))?;
                            tx.remove(T::Done, k)?;
                            tx.remove(T::Rejected, &key(id))?;
                            tx.remove(T::Duplicates, &key(id))?;
                            // Its content's digest, and a joined request's (done_value).
                            for at in [1..9, 9..17] {
                                if let Some(digest) = v
                                    .get(at)
                                    .and_then(|b| b.try_into().ok())
                                    .map(u64::from_be_bytes)
                                {
                                    tx.remove(T::Contents, &verdict::content_key(digest, id))?;
                                }
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
}

/// Records removed per transaction by [`Outbox::prune`].
const PRUNE_SLICE: usize = 10_000;

/// One pass over a store written before the indexes existed (version 0.1 kept lanes in
/// memory): every record joins its lane or gets its done key.
pub(super) fn build_indexes(
    tx: &mut kv::Tx<'_>,
    corrupt: &mut Vec<MessageId>,
) -> Result<(), StoreError> {
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
/// heads are ever sent) but a joined request's members, which are in their lead's state
/// (join.rs); so only heads are read; terminal ones come from the done index.
pub(super) fn count_states(rx: &kv::Rx) -> Result<BTreeMap<State, usize>, StoreError> {
    let mut counts = BTreeMap::new();
    let (lanes, members) = lanes::sizes(rx)?;
    let mut behind_heads = members.saturating_sub(lanes) as usize;
    for id in lanes::all_heads(rx)? {
        match record_in(rx, id) {
            Ok(r) => {
                let joined = r.members().len().min(behind_heads);
                behind_heads -= joined;
                *counts.entry(r.state).or_default() += 1 + joined;
            }
            Err(StoreError::NotFound(_)) => {}
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
    if behind_heads > 0 {
        *counts.entry(State::Queued).or_default() += behind_heads;
    }
    Ok(counts)
}
