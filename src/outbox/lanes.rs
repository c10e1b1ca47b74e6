//! The lanes on disk: per production order, its messages that are not terminal, in id
//! order, as a doubly linked list. Nothing of it is held in memory: a backlog of a million
//! messages costs disk, not RAM.
//!
//! ```text
//! table "lane_ends":  key = order (UTF-8)       value = head id (u64 BE) ++ tail id (u64 BE)
//! table "lane_links": key = id (u64 BE)         value = previous id ++ next id (u64 BE;
//!                                                       0 = none: ids start at 1)
//! ```
//!
//! Why a list and not one key per (order, id), as before December 2026: the dispatcher
//! settles and marks one head in each of dozens of orders per write. Keyed by order, those
//! keys sit in one B-tree leaf per order, so every write touched one page per order (half
//! the pages of a write, and the fsync's cost grows with them). Keyed by id, the heads of
//! a burst lie within a few hundred ids of each other: a few leaves; the ends of all orders
//! fit in one or two.
//!
//! Invariants (kept by [`append`], [`append_all`] and [`remove`], each inside the caller's
//! transaction): an order has an ends entry exactly while its lane is not empty; following
//! `next` from the head visits the lane's ids in increasing order and ends at the tail;
//! `prev` mirrors `next`. The table "lanes" holds the old layout; [`convert_legacy`] moves
//! it once.

use super::MessageId;
use crate::store::kv::{Get, Rx, Span, Tx, T};
use crate::store::{storage, StoreError};

const NONE: MessageId = 0;

fn pair(a: MessageId, b: MessageId) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&a.to_be_bytes());
    v[8..].copy_from_slice(&b.to_be_bytes());
    v
}

fn unpair(v: &[u8]) -> Option<(MessageId, MessageId)> {
    let a = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let b = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    (v.len() == 16).then_some((a, b))
}

fn broken(what: String) -> StoreError {
    storage(format!("lane index is damaged: {what}"))
}

/// (head, tail) of an order's lane, `None` when it is empty.
fn ends_in(tx: &mut Tx<'_>, order: &str) -> Result<Option<(MessageId, MessageId)>, StoreError> {
    match tx.get(T::LaneEnds, order.as_bytes())? {
        None => Ok(None),
        Some(v) => unpair(&v)
            .map(Some)
            .ok_or_else(|| broken(format!("ends of order {order:?}"))),
    }
}

/// (previous, next) of a lane member, `None` when `id` is in no lane.
fn link_in(tx: &mut Tx<'_>, id: MessageId) -> Result<Option<(MessageId, MessageId)>, StoreError> {
    match tx.get(T::LaneLinks, &id.to_be_bytes())? {
        None => Ok(None),
        Some(v) => unpair(&v)
            .map(Some)
            .ok_or_else(|| broken(format!("links of message {id}"))),
    }
}

/// (previous, next) of a member of `order`'s lane, which must be there.
fn linked(
    tx: &mut Tx<'_>,
    order: &str,
    id: MessageId,
) -> Result<(MessageId, MessageId), StoreError> {
    link_in(tx, id)?.ok_or_else(|| broken(format!("message {id} of order {order:?} has no links")))
}

fn set_next(
    tx: &mut Tx<'_>,
    order: &str,
    id: MessageId,
    next: MessageId,
) -> Result<(), StoreError> {
    let (prev, _) = linked(tx, order, id)?;
    set_link(tx, id, prev, next)
}

fn set_prev(
    tx: &mut Tx<'_>,
    order: &str,
    id: MessageId,
    prev: MessageId,
) -> Result<(), StoreError> {
    let (_, next) = linked(tx, order, id)?;
    set_link(tx, id, prev, next)
}

fn set_link(
    tx: &mut Tx<'_>,
    id: MessageId,
    prev: MessageId,
    next: MessageId,
) -> Result<(), StoreError> {
    tx.insert(T::LaneLinks, &id.to_be_bytes(), &pair(prev, next))
}

fn set_ends(
    tx: &mut Tx<'_>,
    order: &str,
    head: MessageId,
    tail: MessageId,
) -> Result<(), StoreError> {
    tx.insert(T::LaneEnds, order.as_bytes(), &pair(head, tail))
}

/// Adds `id` to `order`'s lane at its place by id. Nearly always the tail: ids are handed
/// out in append order, and a batch that took its ids earlier than one committed before it
/// lands a few places from the end (the walk back is that short). Adding a member twice
/// changes nothing.
pub(super) fn append(tx: &mut Tx<'_>, order: &str, id: MessageId) -> Result<(), StoreError> {
    if id == NONE {
        return Err(storage("message id 0 cannot join a lane"));
    }
    if link_in(tx, id)?.is_some() {
        return Ok(());
    }
    let Some((head, tail)) = ends_in(tx, order)? else {
        set_link(tx, id, NONE, NONE)?;
        return set_ends(tx, order, id, id);
    };
    // The member `id` goes after: the last one with a smaller id.
    let mut before = tail;
    while before != NONE && before > id {
        before = linked(tx, order, before)?.0;
    }
    // The links of `before` are read once: this runs for every message appended.
    let after = if before == NONE {
        head
    } else {
        let (prev, next) = linked(tx, order, before)?;
        set_link(tx, before, prev, id)?;
        next
    };
    set_link(tx, id, before, after)?;
    if after != NONE {
        set_prev(tx, order, after, id)?;
    }
    let head = if before == NONE { id } else { head };
    let tail = if after == NONE { id } else { tail };
    set_ends(tx, order, head, tail)
}

/// Adds many members as [`append`] adds each, with each order's ends read and written once
/// and the members after its tail chained without a search (an ingest batch: new ids).
/// Why: one by one, a member cost three reads and three writes (its links, the ends, the
/// tail's links); a batch of 256 messages over 50 orders now costs about one write per
/// member and four per order.
pub(super) fn append_all<'o>(
    tx: &mut Tx<'_>,
    members: impl IntoIterator<Item = (&'o str, MessageId)>,
) -> Result<(), StoreError> {
    let mut by_order: std::collections::BTreeMap<&str, Vec<MessageId>> = Default::default();
    for (order, id) in members {
        by_order.entry(order).or_default().push(id);
    }
    for (order, mut ids) in by_order {
        ids.sort_unstable();
        ids.dedup();
        if ids.first() == Some(&NONE) {
            return Err(storage("message id 0 cannot join a lane"));
        }
        let tail = ends_in(tx, order)?.map_or(NONE, |(_, tail)| tail);
        // At or before the tail (a batch that took its ids before one committed earlier,
        // or a member added twice): one by one, as append places and recognises them.
        let after_tail = ids.partition_point(|&id| id <= tail);
        for &id in &ids[..after_tail] {
            append(tx, order, id)?;
        }
        let fresh = &ids[after_tail..];
        let (Some(&first), Some(&last)) = (fresh.first(), fresh.last()) else {
            continue;
        };
        // The tail is the lane's largest id, so none of these is in the lane yet.
        let (head, tail) = match ends_in(tx, order)? {
            Some((head, tail)) => {
                set_next(tx, order, tail, first)?;
                (head, tail)
            }
            None => (first, NONE),
        };
        for (i, &id) in fresh.iter().enumerate() {
            let prev = if i == 0 { tail } else { fresh[i - 1] };
            let next = fresh.get(i + 1).copied().unwrap_or(NONE);
            set_link(tx, id, prev, next)?;
        }
        set_ends(tx, order, head, last)?;
    }
    Ok(())
}

/// Takes `id` out of `order`'s lane, wherever it is; whether it was there.
pub(super) fn remove(tx: &mut Tx<'_>, order: &str, id: MessageId) -> Result<bool, StoreError> {
    let Some((prev, next)) = link_in(tx, id)? else {
        return Ok(false);
    };
    let Some((head, tail)) = ends_in(tx, order)? else {
        return Err(broken(format!(
            "message {id} is linked but order {order:?} has no lane"
        )));
    };
    tx.remove(T::LaneLinks, &id.to_be_bytes())?;
    if prev != NONE {
        set_next(tx, order, prev, next)?;
    }
    if next != NONE {
        set_prev(tx, order, next, prev)?;
    }
    let head = if head == id { next } else { head };
    let tail = if tail == id { prev } else { tail };
    if head == NONE {
        tx.remove(T::LaneEnds, order.as_bytes())?;
    } else {
        set_ends(tx, order, head, tail)?;
    }
    Ok(true)
}

/// The head (first id) of each lane, at most `limit` of them, starting with the first
/// order after `after` and wrapping around: successive calls that pass the last order
/// served go round-robin over all lanes, so no order starves the others. Lanes for which
/// `skip(order)` is true are passed over without being counted (and without copying
/// their order number: the dispatcher calls this on every turn).
pub(super) fn heads(
    rx: &Rx,
    after: Option<&str>,
    limit: usize,
    skip: impl Fn(&str) -> bool,
) -> Result<Vec<(String, MessageId)>, StoreError> {
    let mut out: Vec<(String, MessageId)> = Vec::new();
    // The first key after `after`'s: `after` followed by a zero byte.
    let start = after
        .map(|o| {
            let mut k = o.as_bytes().to_vec();
            k.push(0);
            k
        })
        .unwrap_or_default();
    // First from `start` to the end, then from the beginning up to `start`.
    for span in [Span::from(&start), Span::to(&start)] {
        rx.scan(T::LaneEnds, span, false, |k, v| {
            if out.len() >= limit {
                return Ok(false);
            }
            // A key or value not written by this module is passed over rather than
            // stopping every lane.
            if let (Ok(order), Some((head, _))) = (std::str::from_utf8(k), unpair(v)) {
                if !skip(order) {
                    out.push((order.to_string(), head));
                }
            }
            Ok(true)
        })?;
    }
    Ok(out)
}

/// The first id of `order`'s lane, as `tx` sees it.
pub(super) fn head(tx: &mut Tx<'_>, order: &str) -> Result<Option<MessageId>, StoreError> {
    Ok(ends_in(tx, order)?.map(|(head, _)| head))
}

/// The id after `id` in its lane.
pub(super) fn after(rx: &impl Get, id: MessageId) -> Result<Option<MessageId>, StoreError> {
    Ok(rx
        .get(T::LaneLinks, &id.to_be_bytes())?
        .as_deref()
        .and_then(unpair)
        .map(|(_, next)| next)
        .filter(|next| *next != NONE))
}

/// The ids of one order's lane, in FIFO order.
pub(super) fn lane(rx: &Rx, order: &str) -> Result<Vec<MessageId>, StoreError> {
    let Some(v) = rx.get(T::LaneEnds, order.as_bytes())? else {
        return Ok(Vec::new());
    };
    let (head, _) = unpair(&v).ok_or_else(|| broken(format!("ends of order {order:?}")))?;
    let mut ids = Vec::new();
    let mut id = head;
    while id != NONE {
        // Ids only grow along a lane: a smaller one would be a cycle.
        if ids.last().is_some_and(|last| *last >= id) {
            return Err(broken(format!(
                "order {order:?} loops back to message {id}"
            )));
        }
        ids.push(id);
        id = rx
            .get(T::LaneLinks, &id.to_be_bytes())?
            .as_deref()
            .and_then(unpair)
            .ok_or_else(|| broken(format!("message {id} of order {order:?} has no links")))?
            .1;
    }
    Ok(ids)
}

/// (lanes, members of all lanes): what the counts at open need, without walking a lane.
pub(super) fn sizes(rx: &Rx) -> Result<(u64, u64), StoreError> {
    Ok((rx.len(T::LaneEnds)?, rx.len(T::LaneLinks)?))
}

/// The head of every lane, for the counts at open.
pub(super) fn all_heads(rx: &Rx) -> Result<Vec<MessageId>, StoreError> {
    Ok(heads(rx, None, usize::MAX, |_| false)?
        .into_iter()
        .map(|(_, id)| id)
        .collect())
}

/// Moves up to `limit` keys of a lane index of the layout before December 2026 (table
/// "lanes", one key per member: len(order) as u32 BE ++ order ++ id as u64 BE) into the
/// lists; returns how many keys it took (0: none left). Each slice is whole in itself
/// (a member joins its list at its place by id whatever was moved before), so a crash
/// between slices leaves a store the next open finishes converting; and memory stays
/// bounded by the slice, not by the backlog.
pub(super) fn convert_legacy(tx: &mut Tx<'_>, limit: usize) -> Result<usize, StoreError> {
    let old = tx.collect(T::Lanes, Span::all(), limit)?;
    for (k, _) in &old {
        match split_legacy(k) {
            Some((order, id)) => append(tx, order, id)?,
            None => {
                tracing::error!(key = ?k, "Malformed key in the old lane index; dropped (its message keeps its record and state).")
            }
        }
        tx.remove(T::Lanes, k)?;
    }
    Ok(old.len())
}

/// Order and id of a key of the old layout.
fn split_legacy(key: &[u8]) -> Option<(&str, MessageId)> {
    let len = u32::from_be_bytes(key.get(..4)?.try_into().ok()?) as usize;
    let order = std::str::from_utf8(key.get(4..4 + len)?).ok()?;
    if key.len() != 4 + len + 8 {
        return None;
    }
    let id = u64::from_be_bytes(key.get(4 + len..)?.try_into().ok()?);
    Some((order, id))
}

/// A key of the old layout, for tests that build an old store.
#[cfg(test)]
pub(super) fn legacy_key(order: &str, id: MessageId) -> Vec<u8> {
    let mut k = (order.len() as u32).to_be_bytes().to_vec();
    k.extend_from_slice(order.as_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, crate::store::kv::Kv) {
        let dir = tempfile::tempdir().unwrap();
        let Ok(kv) = crate::store::kv::Kv::open(&dir.path().join("test.redb"), 1 << 20) else {
            panic!("cannot open a store in a temporary directory");
        };
        (dir, kv)
    }

    #[test]
    fn heads_go_round_robin() {
        let (_dir, kv) = store();
        kv.write(true, |tx| {
            for (order, id) in [("B", 2), ("A", 1), ("A", 3), ("C", 4), ("B", 5)] {
                append(tx, order, id)?;
            }
            Ok(())
        })
        .unwrap();
        let t = kv.read().unwrap();
        let all = heads(&t, None, 10, |_| false).unwrap();
        assert_eq!(all, vec![("A".into(), 1), ("B".into(), 2), ("C".into(), 4)]);
        assert_eq!(
            heads(&t, Some("A"), 2, |_| false).unwrap(),
            vec![("B".into(), 2), ("C".into(), 4)]
        );
        assert_eq!(
            heads(&t, Some("C"), 10, |_| false).unwrap(),
            vec![("A".into(), 1), ("B".into(), 2), ("C".into(), 4)],
            "after the last order the scan wraps around"
        );
        assert_eq!(
            heads(&t, None, 10, |o| o == "B").unwrap(),
            vec![("A".into(), 1), ("C".into(), 4)],
            "skipped lanes are passed over"
        );
        assert_eq!(lane(&t, "A").unwrap(), vec![1, 3]);
        assert_eq!(after(&t, 2).unwrap(), Some(5));
        assert_eq!(after(&t, 5).unwrap(), None);
        assert_eq!(sizes(&t).unwrap(), (3, 5));
    }

    #[test]
    fn members_join_in_id_order_and_leave_from_anywhere() {
        let (_dir, kv) = store();
        // 7 commits before 5 and 6 (a batch that took its ids earlier commits later).
        kv.write(true, |tx| {
            for id in [1, 2, 7, 5, 6, 3] {
                append(tx, "A", id)?;
            }
            append(tx, "A", 7)
        })
        .unwrap();
        assert_eq!(
            lane(&kv.read().unwrap(), "A").unwrap(),
            vec![1, 2, 3, 5, 6, 7]
        );
        // Head, middle, tail; then one that is not there.
        kv.write(true, |tx| {
            assert!(remove(tx, "A", 1)?);
            assert!(remove(tx, "A", 5)?);
            assert!(remove(tx, "A", 7)?);
            assert!(!remove(tx, "A", 7)?);
            Ok(())
        })
        .unwrap();
        let t = kv.read().unwrap();
        assert_eq!(lane(&t, "A").unwrap(), vec![2, 3, 6]);
        assert_eq!(
            heads(&t, None, 10, |_| false).unwrap(),
            vec![("A".into(), 2)]
        );
        assert_eq!(after(&t, 3).unwrap(), Some(6));
        drop(t);
        kv.write(true, |tx| {
            for id in [3, 6, 2] {
                remove(tx, "A", id)?;
            }
            Ok(())
        })
        .unwrap();
        let t = kv.read().unwrap();
        assert_eq!(
            sizes(&t).unwrap(),
            (0, 0),
            "an emptied lane leaves nothing behind"
        );
        assert!(heads(&t, None, 10, |_| false).unwrap().is_empty());
    }

    /// Random joins (mostly in id order, some late; one by one or as ingest batches with
    /// members already there) and leaves (heads mostly, some from the middle) over several
    /// orders and transactions, checked against a plain model after every transaction:
    /// lanes, heads, successors and sizes.
    #[test]
    fn lanes_match_a_model_under_random_joins_and_leaves() {
        let (_dir, kv) = store();
        let mut model: std::collections::BTreeMap<String, std::collections::BTreeSet<MessageId>> =
            Default::default();
        // xorshift: deterministic, no extra crate.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let orders = ["P-1", "P-2", "P-3", "P-4", "P-5"];
        let mut next_id = 1;
        let mut held_back: Vec<(&str, MessageId)> = Vec::new();
        for _round in 0..200 {
            kv.write(true, |tx| {
                for _ in 0..rand(20) {
                    if rand(3) > 0 {
                        // Join: a batch of ids, committed in order or (1 in 5) reversed.
                        let order = orders[rand(orders.len() as u64) as usize];
                        let n = 1 + rand(4);
                        let mut ids: Vec<MessageId> = (next_id..next_id + n).collect();
                        next_id += n;
                        if rand(5) == 0 {
                            ids.reverse();
                        }
                        match rand(4) {
                            // One by one.
                            0 => {
                                for &id in &ids {
                                    append(tx, order, id)?;
                                }
                            }
                            // Held back, to join later with the next batch (behind the
                            // tail by then): not in the model yet.
                            1 => {
                                held_back.extend(ids.iter().map(|&id| (order, id)));
                                continue;
                            }
                            // As an ingest batch: with what was held back, and one member
                            // already in the lane added again.
                            _ => {
                                let again = model
                                    .get(order)
                                    .and_then(|m| m.iter().nth(rand(m.len() as u64) as usize))
                                    .map(|&id| (order, id));
                                let batch: Vec<(&str, MessageId)> = ids
                                    .iter()
                                    .map(|&id| (order, id))
                                    .chain(held_back.drain(..))
                                    .chain(again)
                                    .collect();
                                append_all(tx, batch.iter().copied())?;
                                for (o, id) in batch {
                                    model.entry(o.to_string()).or_default().insert(id);
                                }
                                continue;
                            }
                        }
                        for id in ids {
                            model.entry(order.to_string()).or_default().insert(id);
                        }
                    } else {
                        // Leave: the head, or (1 in 4) any member.
                        let order = orders[rand(orders.len() as u64) as usize];
                        let Some(members) = model.get_mut(order) else {
                            continue;
                        };
                        let pick = if rand(4) == 0 {
                            rand(members.len() as u64) as usize
                        } else {
                            0
                        };
                        let Some(&id) = members.iter().nth(pick) else {
                            continue;
                        };
                        assert!(remove(tx, order, id)?);
                        members.remove(&id);
                        if members.is_empty() {
                            model.remove(order);
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
            let t = kv.read().unwrap();
            for order in orders {
                let want: Vec<MessageId> = model
                    .get(order)
                    .map(|m| m.iter().copied().collect())
                    .unwrap_or_default();
                assert_eq!(lane(&t, order).unwrap(), want, "lane of {order}");
                for pair in want.windows(2) {
                    assert_eq!(after(&t, pair[0]).unwrap(), Some(pair[1]));
                }
                if let Some(last) = want.last() {
                    assert_eq!(after(&t, *last).unwrap(), None);
                }
            }
            let heads = heads(&t, None, usize::MAX, |_| false).unwrap();
            let want_heads: Vec<(String, MessageId)> = model
                .iter()
                .filter_map(|(o, m)| m.first().map(|id| (o.clone(), *id)))
                .collect();
            assert_eq!(heads, want_heads);
            let members: usize = model.values().map(|m| m.len()).sum();
            assert_eq!(sizes(&t).unwrap(), (model.len() as u64, members as u64));
        }
        assert!(
            next_id > 1_000,
            "the run joined enough members to mean something"
        );
    }

    #[test]
    fn the_old_layout_is_converted_whole() {
        let (_dir, kv) = store();
        kv.write(true, |tx| {
            for (order, id) in [("P-2", 4), ("P-1", 1), ("P-1", 3), ("P-2", 9)] {
                tx.insert(T::Lanes, &legacy_key(order, id), &[])?;
            }
            Ok(())
        })
        .unwrap();
        // In slices smaller than the index, as a big store is converted.
        assert_eq!(kv.write(true, |tx| convert_legacy(tx, 3)).unwrap(), 3);
        assert_eq!(kv.write(true, |tx| convert_legacy(tx, 3)).unwrap(), 1);
        assert_eq!(kv.write(true, |tx| convert_legacy(tx, 3)).unwrap(), 0);
        let t = kv.read().unwrap();
        assert_eq!(lane(&t, "P-1").unwrap(), vec![1, 3]);
        assert_eq!(lane(&t, "P-2").unwrap(), vec![4, 9]);
        assert_eq!(t.len(T::Lanes).unwrap(), 0);
    }
}
