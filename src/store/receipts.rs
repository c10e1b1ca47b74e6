//! Receipts: the upstream deliveries (MQTT publishes, D365 event ids) the store already
//! holds the result of, so a redelivered one produces nothing (exactly-once ingress for
//! sources that acknowledge, such as MQTT QoS 1). Table "ingress".
//!
//! # Identity of a receipt
//!
//! `(source id, packet id, digest of topic and payload)`. MQTT reuses a packet id only
//! once the broker has our PUBACK for the previous holder, and a redelivery carries the
//! same packet id with DUP = 1. So:
//!
//! - A publish with DUP = 0 is the broker's first attempt: always new. It is processed
//!   and its identity replaces whatever was recorded for that packet id.
//! - A publish with DUP = 1 whose identity is recorded is a redelivery of something the
//!   outbox already holds: it is acknowledged and produces nothing. Otherwise (the first
//!   copy was never committed) it is processed.
//!
//! The identity is written in the same transaction as the messages and the rules state
//! it produced. It is forgotten once the broker has *confirmed* our PUBACK (the source
//! sends a barrier after its acks; the broker answers in order), because from then on the
//! broker will never redeliver it and may reuse the packet id for a new publish.
//!
//! A device that sends the same payload twice on purpose is safe: the second publish
//! arrives with DUP = 0 (new), or with another packet id. The one case left: the broker
//! reuses a packet id for an identical publish between receiving our PUBACK and our
//! barrier's answer, and the gateway dies before committing that new publish; its
//! redelivery is then taken for the old one. The window is one round trip to the broker.
//!
//! ```text
//! key   = len(source) as u32 BE ++ source ++ packet id as u16 BE
//! value = digest as u64 BE ++ receipt as u64 BE   (the receipt tells one recording of a
//!                                                   packet id from the next, for forgetting)
//! ```

use std::sync::Arc;

use super::kv::{Prefix, Tx, T};
use super::{name_prefix, Store, StoreError};

/// An event a source knows by its own id (a D365 business event's `EventId`), remembered
/// for a window so a redelivery produces nothing. Kept in the same table as the MQTT
/// identities, under its own prefix:
///
/// ```text
/// key   = "event\0" ++ len(source) as u32 BE ++ source ++ event id
/// value = when it was recorded, whole seconds since 1970 (i64 BE)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeenEvent {
    pub source: Arc<str>,
    pub id: String,
}

const SEEN_PREFIX: &[u8] = b"event\0";

impl SeenEvent {
    fn key(&self) -> Vec<u8> {
        let mut k = SEEN_PREFIX.to_vec();
        k.extend_from_slice(&name_prefix(&self.source));
        k.extend_from_slice(self.id.as_bytes());
        k
    }
}

/// What identifies one upstream delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReceiptId {
    pub source: Arc<str>,
    pub packet_id: u16,
    pub digest: u64,
}

/// One delivery as the source saw it: identity, whether the broker marked it as a
/// redelivery, and a receipt number unique within the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: ReceiptId,
    pub redelivered: bool,
    pub receipt: u64,
}

impl ReceiptId {
    /// The identity of a publish: a stable 64-bit FNV-1a digest of topic and payload
    /// (stable across builds and versions, unlike std's hasher, so a redelivery after an
    /// upgrade is still recognised).
    pub fn of_publish(source: Arc<str>, packet_id: u16, topic: &str, payload: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in topic.bytes().chain([0u8]).chain(payload.iter().copied()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        ReceiptId {
            source,
            packet_id,
            digest: h,
        }
    }

    fn key(&self) -> Vec<u8> {
        let mut k = name_prefix(&self.source);
        k.extend_from_slice(&self.packet_id.to_be_bytes());
        k
    }
}

fn value(digest: u64, receipt: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&digest.to_be_bytes());
    v[8..].copy_from_slice(&receipt.to_be_bytes());
    v
}

fn digest_of(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// The receipts table (module doc).
#[derive(Debug, Clone)]
pub struct Receipts {
    store: Store,
}

impl Store {
    pub fn receipts(&self) -> Receipts {
        Receipts {
            store: self.clone(),
        }
    }
}

impl Receipts {
    /// Whether the store holds the result of this upstream delivery.
    pub fn holds(&self, id: &ReceiptId) -> Result<bool, StoreError> {
        Ok(self
            .store
            .read()?
            .get(T::Ingress, &id.key())?
            .and_then(|v| digest_of(&v))
            == Some(id.digest))
    }

    /// Forgets receipts the broker will never redeliver (it confirmed our PUBACK). Only
    /// the recording made by that receipt is removed, never a newer one of the same packet
    /// id. Not flushed: forgetting is made durable by the next flush; until then a crash
    /// merely keeps them a little longer.
    pub async fn forget(&self, receipts: Vec<Receipt>) -> Result<(), StoreError> {
        self.store
            .write(move |kv| {
                kv.write(false, |tx| {
                    for r in &receipts {
                        let k = r.id.key();
                        // A different value is a newer recording of the same packet id: keep it.
                        let expected = value(r.id.digest, r.receipt);
                        if tx.get(T::Ingress, &k)?.as_deref() == Some(&expected[..]) {
                            tx.remove(T::Ingress, &k)?;
                        }
                    }
                    Ok(())
                })
            })
            .await
    }

    /// Forgets every receipt of a source whose broker lost the session: nothing of it
    /// will be redelivered. Not flushed (see [`Receipts::forget`]).
    pub async fn forget_source(&self, source: &str) -> Result<usize, StoreError> {
        let of_source = Prefix::new(&name_prefix(source));
        self.store
            .write(move |kv| {
                kv.write(false, |tx| {
                    let keys = tx.collect(T::Ingress, of_source.span(), usize::MAX)?;
                    for (k, _) in &keys {
                        tx.remove(T::Ingress, k)?;
                    }
                    Ok(keys.len())
                })
            })
            .await
    }

    /// Whether the store holds the result of this event (see [`SeenEvent`]).
    pub fn holds_event(&self, event: &SeenEvent) -> Result<bool, StoreError> {
        Ok(self.store.read()?.get(T::Ingress, &event.key())?.is_some())
    }

    /// Forgets event ids recorded before `before` (their redelivery window is over).
    /// Returns how many. Not flushed, like [`Receipts::forget`].
    pub async fn forget_events(&self, before: jiff::Timestamp) -> Result<usize, StoreError> {
        let seen = Prefix::new(SEEN_PREFIX);
        self.store
            .write(move |kv| {
                kv.write(false, |tx| {
                    let mut old = Vec::new();
                    tx.scan(T::Ingress, seen.span(), false, |k, v| {
                        let at = v.try_into().ok().map_or(i64::MIN, i64::from_be_bytes);
                        if at < before.as_second() {
                            old.push(k.to_vec());
                        }
                        Ok(true)
                    })?;
                    for k in &old {
                        tx.remove(T::Ingress, k)?;
                    }
                    Ok(old.len())
                })
            })
            .await
    }
}

/// Records `receipts` and `seen` in the transaction that stores what they produced.
pub(crate) fn put(
    tx: &mut Tx<'_>,
    receipts: &[Receipt],
    seen: &[SeenEvent],
) -> Result<(), StoreError> {
    for r in receipts {
        tx.insert(T::Ingress, &r.id.key(), &value(r.id.digest, r.receipt))?;
    }
    let now = jiff::Timestamp::now().as_second().to_be_bytes();
    for e in seen {
        tx.insert(T::Ingress, &e.key(), &now)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_stable_and_separates_topic_from_payload() {
        let s: Arc<str> = "plc".into();
        let a = ReceiptId::of_publish(s.clone(), 1, "line1/count", b"1");
        // Pinned: the digest is stored on disk and must not change between versions.
        assert_eq!(a.digest, 0x55f7_1712_e989_c6e1);
        let b = ReceiptId::of_publish(s.clone(), 1, "line1/coun", b"t1");
        assert_ne!(a.digest, b.digest);
        assert_eq!(a.key(), ReceiptId::of_publish(s, 1, "x", b"y").key());
    }
}
