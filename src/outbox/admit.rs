//! Marking a lone message `sending` in the commit that stores it.
//!
//! Why: under a steady trickle (a plant at 1,000 impulses a second over 50 orders) each
//! message arrives at an empty lane and used to pay two durable commits before its request
//! could leave: the ingest commit that stored it, then the dispatcher's commit that marked
//! it `sending`. A commit costs about 160 µs of CPU here however little it writes
//! (docs/performance.md), so the second one was a large part of a lone message's cost.
//! When the dispatcher is idle with room for more requests, the ingest commit marks the
//! new heads of empty lanes itself (with the messages of the same batch joined into their
//! request, join.rs) and hands them to the dispatcher, which sends them.
//!
//! Exactly once is unchanged: the mark is on disk, in the same transaction as the message,
//! before the request leaves; a crash after the commit finds the message `sending`, as it
//! would after the dispatcher's own mark.
//!
//! The dispatcher owns the decision ([`Admission::open`]): it opens admission only at the
//! end of a turn in which every outcome it judged is written and no sendable lane head was
//! left waiting (so arrivals never overtake a backlog that round-robin would serve first),
//! with a token in hand, outside any pause or outage, for as many requests as
//! `max_in_flight` and the request budget allow; it closes it at the start of every turn.
//! An order whose lane is empty on disk has nothing in flight and nothing waiting: a
//! request's message stays in its lane until its outcome is committed.
//!
//! A message marked here belongs to the dispatcher from the moment of the reservation:
//! until the dispatcher takes it ([`Admission::take`]) its order counts as busy, so the
//! dispatcher never picks and marks it a second time (which would send it twice).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::settle::{apply_changes, plan_marks};
use super::{lanes, JoinPolicy, Record, State};
use crate::store::kv::{Reading, Tx};
use crate::store::StoreError;

/// What the dispatcher lets ingest commits mark, and what they marked (module doc).
#[derive(Debug, Default)]
pub struct Admission {
    inner: Mutex<Admitted>,
    /// Told when a reservation ends (handed over or released).
    ended: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Admitted {
    /// Requests ingest commits may still start; 0: closed.
    room: usize,
    /// Orders whose new head an ingest commit marked or is marking, until the dispatcher
    /// takes it.
    reserved: HashSet<String>,
    /// Marked and committed: the leads of the requests to send, in commit order.
    handed: Vec<Record>,
}

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, Admitted> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets ingest commits start up to `room` requests (0 closes).
    pub fn open(&self, room: usize) {
        self.lock().room = room;
    }

    /// Requests ingest commits may still start.
    pub fn room(&self) -> usize {
        self.lock().room
    }

    /// No more marks by ingest commits until the next [`Admission::open`].
    pub fn close(&self) {
        self.open(0);
    }

    /// The requests marked by committed ingests, now the dispatcher's: their orders stop
    /// counting as reserved (the dispatcher counts them busy from here on).
    pub fn take(&self) -> Vec<Record> {
        let mut a = self.lock();
        let handed = std::mem::take(&mut a.handed);
        for r in &handed {
            a.reserved.remove(&r.production_order);
        }
        handed
    }

    /// Whether an ingest commit marked, or is marking, the head of `order`.
    pub fn is_reserved(&self, order: &str) -> bool {
        self.lock().reserved.contains(order)
    }

    /// Orders reserved and not yet taken (each one request).
    pub fn pending(&self) -> usize {
        self.lock().reserved.len()
    }

    /// Closes admission and takes everything marked for the dispatcher, waiting (until
    /// `deadline`) for the ingest commits still marking heads.
    pub async fn end(&self, deadline: tokio::time::Instant) -> Vec<Record> {
        self.close();
        let mut marked = Vec::new();
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before looking, so an ending between the look and the wait
            // is not missed.
            ended.as_mut().enable();
            marked.extend(self.take());
            if self.pending() == 0 || tokio::time::timeout_at(deadline, ended).await.is_err() {
                return marked;
            }
        }
    }

    fn reserve(&self, order: &str) -> bool {
        let mut a = self.lock();
        if a.room == 0 || a.reserved.contains(order) {
            return false;
        }
        a.room -= 1;
        a.reserved.insert(order.to_string());
        true
    }

    /// The commit that reserved `orders` failed: nothing of it is on disk.
    pub(super) fn release(&self, orders: &[String]) {
        let mut a = self.lock();
        for o in orders {
            a.reserved.remove(o);
        }
        drop(a);
        self.ended.notify_waiters();
    }

    /// The commit is on disk: its marked requests go to the dispatcher.
    pub(super) fn hand_over(&self, marked: Vec<Record>) {
        self.lock().handed.extend(marked);
        self.ended.notify_waiters();
    }
}

/// In an ingest transaction that has just appended `records`: marks `sending` the first
/// new record of each order whose lane it now heads (the lane was empty), as far as
/// `admission` has room, with the records behind it joined as `joining` allows. Returns
/// the changes (each record with its state before) and the orders reserved, which the
/// caller releases if the transaction does not commit.
pub(super) fn mark_new_heads(
    tx: &mut Tx<'_>,
    records: &[Record],
    admission: &Admission,
    joining: &JoinPolicy,
    reserved: &mut Vec<String>,
) -> Result<Vec<(Record, State)>, StoreError> {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut heads = Vec::new();
    for r in records {
        if !seen.insert(r.production_order.as_str()) {
            continue;
        }
        if lanes::head(tx, &r.production_order)? != Some(r.id) {
            continue;
        }
        if !admission.reserve(&r.production_order) {
            continue;
        }
        reserved.push(r.production_order.clone());
        heads.push(r.id);
    }
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    let mut changed = Vec::with_capacity(heads.len());
    let mut already_marked = Vec::new();
    // The heads as this transaction wrote them: not read back.
    let mut written: HashMap<_, _> = records
        .iter()
        .filter(|r| heads.contains(&r.id))
        .map(|r| (r.id, r.clone()))
        .collect();
    plan_marks(
        &Reading::new(tx),
        &heads,
        joining,
        &mut written,
        &mut changed,
        &mut already_marked,
    )?;
    // Every head was queued and new, so each is marked; should one not be, its order is
    // not the dispatcher's to wait for.
    let marked: HashSet<&str> = changed
        .iter()
        .filter(|(r, _)| !r.is_member())
        .map(|(r, _)| r.production_order.as_str())
        .collect();
    let unmarked: Vec<String> = reserved
        .iter()
        .filter(|o| !marked.contains(o.as_str()))
        .cloned()
        .collect();
    if !unmarked.is_empty() {
        admission.release(&unmarked);
        reserved.retain(|o| marked.contains(o.as_str()));
    }
    apply_changes(tx, &changed, &HashMap::new())?;
    Ok(changed)
}
