//! Upstream deliveries the outbox already holds the result of, so a redelivered one
//! produces nothing (exactly-once ingress for sources that acknowledge, such as MQTT QoS 1).
//!
//! # Identity of a delivery
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

/// An event a source knows by its own id (a D365 business event's `EventId`), remembered
/// for a window so a redelivery produces nothing. Kept in the same tree as the MQTT
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

pub(super) const SEEN_PREFIX: &[u8] = b"event\0";

impl SeenEvent {
    pub(super) fn key(&self) -> Vec<u8> {
        let mut k = SEEN_PREFIX.to_vec();
        k.extend_from_slice(&source_prefix(&self.source));
        k.extend_from_slice(self.id.as_bytes());
        k
    }
}

/// What identifies one upstream delivery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryId {
    pub source: Arc<str>,
    pub packet_id: u16,
    pub digest: u64,
}

/// One delivery as the source saw it: identity, whether the broker marked it as a
/// redelivery, and a receipt number unique within the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: DeliveryId,
    pub redelivered: bool,
    pub receipt: u64,
}

impl DeliveryId {
    /// The identity of a publish: a stable 64-bit FNV-1a digest of topic and payload
    /// (stable across builds and versions, unlike std's hasher, so a redelivery after an
    /// upgrade is still recognised).
    pub fn of_publish(source: Arc<str>, packet_id: u16, topic: &str, payload: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in topic.bytes().chain([0u8]).chain(payload.iter().copied()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        DeliveryId {
            source,
            packet_id,
            digest: h,
        }
    }

    pub(super) fn key(&self) -> Vec<u8> {
        let mut k = source_prefix(&self.source);
        k.extend_from_slice(&self.packet_id.to_be_bytes());
        k
    }
}

pub(super) fn source_prefix(source: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + source.len() + 2);
    k.extend_from_slice(&(source.len() as u32).to_be_bytes());
    k.extend_from_slice(source.as_bytes());
    k
}

pub(super) fn value(digest: u64, receipt: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&digest.to_be_bytes());
    v[8..].copy_from_slice(&receipt.to_be_bytes());
    v
}

pub(super) fn digest_of(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_stable_and_separates_topic_from_payload() {
        let s: Arc<str> = "plc".into();
        let a = DeliveryId::of_publish(s.clone(), 1, "line1/count", b"1");
        // Pinned: the digest is stored on disk and must not change between versions.
        assert_eq!(a.digest, 0x55f7_1712_e989_c6e1);
        let b = DeliveryId::of_publish(s.clone(), 1, "line1/coun", b"t1");
        assert_ne!(a.digest, b.digest);
        assert_eq!(a.key(), DeliveryId::of_publish(s, 1, "x", b"y").key());
    }
}
