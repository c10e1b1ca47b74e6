//! The lane index on disk: one key per message that is not terminal, ordered by
//! production order and then by id, so the head of an order's lane is the first key under
//! its prefix. Nothing of it is held in memory: a backlog of a million messages costs
//! disk, not RAM.
//!
//! ```text
//! key = len(order) as u32 BE ++ order (UTF-8) ++ id as u64 BE      value = empty
//! ```

use super::kv::{Rx, Span, T};
use super::{storage, MessageId, OutboxError};

pub(super) fn key(order: &str, id: MessageId) -> Vec<u8> {
    let mut k = prefix(order);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn prefix(order: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + order.len() + 8);
    // An order number longer than 4 GiB cannot come from a parsed message.
    k.extend_from_slice(&(order.len() as u32).to_be_bytes());
    k.extend_from_slice(order.as_bytes());
    k
}

/// The first key after every key of `order`'s lane.
fn past(order: &str) -> Vec<u8> {
    let mut k = prefix(order);
    k.extend_from_slice(&[0xff; 9]);
    k
}

fn parse(key: &[u8]) -> Option<(String, MessageId)> {
    split(key).map(|(order, id)| (order.to_string(), id))
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
) -> Result<Vec<(String, MessageId)>, OutboxError> {
    let mut out: Vec<(String, MessageId)> = Vec::new();
    let start = after.map(past).unwrap_or_default();
    let mut cursor = Vec::with_capacity(64);
    // First pass from `start` to the end, then from the beginning up to `start`.
    for (from, until) in [(start.as_slice(), None), (&[][..], Some(start.as_slice()))] {
        cursor.clear();
        cursor.extend_from_slice(from);
        while out.len() < limit {
            let Some((k, _)) = rx.first(T::Lanes, Span::from(&cursor), false)? else {
                break;
            };
            if until.is_some_and(|u| k.as_slice() >= u) {
                break;
            }
            match split(&k) {
                Some((order, id)) => {
                    // Past every key of this order: its prefix, then 0xff… (ids are u64).
                    cursor.clear();
                    cursor.extend_from_slice(&k[..k.len() - 8]);
                    cursor.extend_from_slice(&[0xff; 9]);
                    if skip(order) || out.iter().any(|(o, _)| o == order) {
                        continue;
                    }
                    out.push((order.to_string(), id));
                }
                None => {
                    // Not written by this module; skip it rather than stop every lane.
                    cursor.clear();
                    cursor.extend_from_slice(&k);
                    cursor.push(0);
                }
            }
        }
    }
    Ok(out)
}

/// The order (as bytes) and id of a lane key, for a pass over every key.
pub(super) fn split_key(key: &[u8]) -> Option<(&[u8], MessageId)> {
    let len = u32::from_be_bytes(key.get(..4)?.try_into().ok()?) as usize;
    let order = key.get(4..4 + len)?;
    let id = u64::from_be_bytes(key.get(4 + len..)?.try_into().ok()?);
    Some((order, id))
}

/// Order and id of a lane key, borrowing the order from the key.
fn split(key: &[u8]) -> Option<(&str, MessageId)> {
    let len = u32::from_be_bytes(key.get(..4)?.try_into().ok()?) as usize;
    let order = std::str::from_utf8(key.get(4..4 + len)?).ok()?;
    if key.len() != 4 + len + 8 {
        return None;
    }
    let id = u64::from_be_bytes(key.get(4 + len..)?.try_into().ok()?);
    Some((order, id))
}

/// The id after `id` in `order`'s lane.
pub(super) fn after(rx: &Rx, order: &str, id: MessageId) -> Result<Option<MessageId>, OutboxError> {
    let start = key(order, id.saturating_add(1));
    let end = past(order);
    Ok(rx
        .first(T::Lanes, Span::between(&start, &end), false)?
        .and_then(|(k, _)| parse(&k))
        .map(|(_, id)| id))
}

/// The ids of one order's lane, in FIFO order.
pub(super) fn lane(rx: &Rx, order: &str) -> Result<Vec<MessageId>, OutboxError> {
    let start = prefix(order);
    let end = past(order);
    let mut ids = Vec::new();
    let mut malformed = false;
    rx.scan(T::Lanes, Span::between(&start, &end), false, |k, _| {
        match parse(k) {
            Some((_, id)) => ids.push(id),
            None => malformed = true,
        }
        Ok(!malformed)
    })?;
    if malformed {
        return Err(storage("malformed lane key"));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_go_round_robin_and_keys_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let Ok(kv) = super::super::Kv::open(&dir.path().join("test.redb"), 1 << 20) else {
            panic!("cannot open a store in a temporary directory");
        };
        kv.write(true, |tx| {
            for (order, id) in [("B", 2), ("A", 1), ("A", 3), ("C", 4), ("B", 5)] {
                tx.insert(T::Lanes, &key(order, id), &[])?;
            }
            Ok(())
        })
        .unwrap();
        let t = kv.read().unwrap();
        assert_eq!(parse(&key("P-000123", 7)), Some(("P-000123".into(), 7)));
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
    }
}
