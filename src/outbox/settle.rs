//! The dispatcher's side of the state machine: marking lane heads `sending` before their
//! requests leave, and recording what became of each request, one write and one flush
//! per turn (group commit). The "sending" and "delivered" tables keep a mark or a
//! delivery as a small key instead of rewriting the record; every read lays them over the
//! record (module doc of `outbox`, "Marks and deliveries").

use std::collections::HashMap;

use super::record::Group;
use super::record::{decode, encode};
use super::MessageId;
use super::{done_key, done_value};
use super::{
    join, key, lanes, record_in, verdict, JoinPolicy, Outbox, Record, Settle, Settlement, State,
    WriteKind, GATEWAY,
};
use crate::store::kv::{self, T};
use crate::store::StoreError;

impl Outbox {
    /// Writes changed records and their lanes; one flush. `old` is each record's
    /// state before the change.
    pub(super) async fn write(
        &self,
        changed: Vec<(Record, State)>,
    ) -> Result<Vec<Record>, StoreError> {
        let changed = self.write_turn(changed, HashMap::new()).await?;
        Ok(self.counted(changed))
    }

    /// [`Outbox::write`], where the records in `deliveries` are written as their delivered
    /// table value (module doc) instead.
    async fn write_turn(
        &self,
        changed: Vec<(Record, State)>,
        deliveries: HashMap<MessageId, Vec<u8>>,
    ) -> Result<Vec<(Record, State)>, StoreError> {
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let writes = self.writes.clone();
        let changed = self
            .store
            .write(move |kv| {
                let started = std::time::Instant::now();
                kv.write(true, |tx| apply_changes(tx, &changed, &deliveries))?;
                writes.record(WriteKind::Delivery, changed.len(), started.elapsed());
                Ok(changed)
            })
            .await?;
        Ok(changed)
    }

    /// Counts and announces committed changes; the records as they now are.
    fn counted(&self, changed: Vec<(Record, State)>) -> Vec<Record> {
        for (r, old) in &changed {
            self.count(Some(*old), Some(r.state));
        }
        if !changed.is_empty() {
            self.changed();
        }
        changed.into_iter().map(|(r, _)| r).collect()
    }

    /// A turn's committed changes (outcomes first, from `sending`, then marks, from
    /// `queued`), counted; returns (settled, marked), with the heads the turn found
    /// `already_marked` among the marked.
    pub(super) fn written(
        &self,
        changed: Vec<(Record, State)>,
        mut already_marked: Vec<Record>,
    ) -> (Vec<Record>, Vec<Record>) {
        let settled = changed
            .iter()
            .filter(|(_, old)| *old == State::Sending)
            .count();
        let mut written = self.counted(changed);
        let mut marked = written.split_off(settled);
        marked.append(&mut already_marked);
        // A joined request's members go out in their lead's request (join.rs).
        marked.retain(|r| !r.is_member());
        (written, marked)
    }

    /// Marks queued messages `sending`, one write and one flush for all: call it right
    /// before their requests go out. Returns the marked records; an id that is no longer
    /// queued (an operator cancelled it meanwhile) is left out.
    pub async fn mark_sending(&self, ids: &[MessageId]) -> Result<Vec<Record>, StoreError> {
        Ok(self.settle_and_mark(&[], ids).await?.1)
    }

    /// Records the outcomes of finished requests, one write and one flush for all.
    pub async fn settle(&self, outcomes: Vec<Settlement>) -> Result<Vec<Record>, StoreError> {
        Ok(self.settle_and_mark(&outcomes, &[]).await?.0)
    }

    /// Records outcomes and marks the next messages `sending` in one write and one flush:
    /// a lane's next message goes out right after its predecessor's outcome, with no
    /// second wait for the disk. Returns (settled, marked).
    pub async fn settle_and_mark(
        &self,
        outcomes: &[Settlement],
        mark: &[MessageId],
    ) -> Result<(Vec<Record>, Vec<Record>), StoreError> {
        let _transition = self.transitions.lock().await;
        let mut changed = Vec::with_capacity(outcomes.len() + mark.len());
        let mut already_marked = Vec::new();
        let mut deliveries = HashMap::new();
        // One read transaction for every record of the turn (the transition lock keeps
        // them as read); dropped before the write, which may have to reopen the store.
        {
            let kv = self.store.kv()?;
            let rx = kv.read()?;
            plan_settlements(&rx, outcomes, &mut changed, &mut deliveries)?;
            plan_marks(
                &rx,
                mark,
                &self.joining(),
                &mut HashMap::new(),
                &mut changed,
                &mut already_marked,
            )?;
        }
        let changed = self.write_turn(changed, deliveries).await?;
        Ok(self.written(changed, already_marked))
    }

    /// Messages left `sending` by a crash or a kill: settles each with what `decide`
    /// says (uncertain, or queued again where the message type's policy is resend). Only
    /// lane heads can be `sending`, so this reads one record per order.
    pub async fn recover_interrupted(
        &self,
        decide: impl Fn(&Record) -> Settle,
    ) -> Result<Vec<Record>, StoreError> {
        let sending: Vec<Settlement> = self
            .lane_heads(None, usize::MAX)?
            .into_iter()
            .filter(|r| r.state == State::Sending)
            .map(|r| Settlement::unattempted(r.id, decide(&r)))
            .collect();
        self.settle(sending).await
    }
}

/// What recording `outcomes` changes: each settled record (from `sending`) into
/// `changed`, a delivery kept as a small key (module doc) also into `deliveries`.
pub(super) fn plan_settlements(
    rx: &impl kv::Get,
    outcomes: &[Settlement],
    changed: &mut Vec<(Record, State)>,
    deliveries: &mut HashMap<MessageId, Vec<u8>>,
) -> Result<(), StoreError> {
    let now = jiff::Timestamp::now();
    for s in outcomes {
        let found = match &s.as_sent {
            Some(sent) if sent.id == s.id && still_as_marked(rx, sent)? => Ok(Record::clone(sent)),
            _ => record_in(rx, s.id),
        };
        let r = match found {
            Ok(r) if r.state == State::Sending => r,
            // Someone else settled it meanwhile (an operator, or a retried write that
            // did reach the disk): the record says what happened; keep it.
            Ok(r) => {
                tracing::warn!(message_id = r.id, state = %r.state, "Outcome of a request not recorded: the message is no longer sending.");
                continue;
            }
            Err(StoreError::NotFound(id)) => {
                tracing::warn!(
                    message_id = id,
                    "Outcome of a request not recorded: the message is gone."
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        let members = r.members().to_vec();
        settle_one(r, s, now, changed, deliveries);
        // A joined request's outcome is every member's (join.rs).
        for id in members {
            match record_in(rx, id) {
                Ok(m) if m.state == State::Sending && m.lead() == s.id => {
                    settle_one(m, s, now, changed, deliveries)
                }
                Ok(m) => {
                    tracing::warn!(message_id = m.id, lead = s.id, state = %m.state, "A member of a joined request is no longer sending with it; its outcome is not recorded on it.");
                }
                Err(e) => {
                    tracing::warn!(message_id = id, lead = s.id, error = %e, "A member of a joined request cannot be read; its outcome is not recorded on it.");
                }
            }
        }
    }
    Ok(())
}

/// Records settlement `s` on `r`, a message of the request it settles.
fn settle_one(
    mut r: Record,
    s: &Settlement,
    now: jiff::Timestamp,
    changed: &mut Vec<(Record, State)>,
    deliveries: &mut HashMap<MessageId, Vec<u8>>,
) {
    match (&s.next, &s.attempt) {
        // The common case, kept as a small key (module doc).
        (Settle::Delivered, Some(outcome)) if !s.server_error => {
            deliver_at(&mut r, outcome, now);
            deliveries.insert(r.id, delivery_value(now, outcome));
        }
        _ => apply_settlement(&mut r, s),
    }
    changed.push((r, State::Sending));
}

/// What marking `mark` `sending` changes: each record still queued, into `changed`, with
/// the messages joined into its request (join.rs: formed now as `joining` allows, or
/// formed before); heads found already marked go to `already_marked`.
/// `read_ahead` holds records already read in this transaction (see turn.rs).
pub(super) fn plan_marks(
    rx: &impl kv::Get,
    mark: &[MessageId],
    joining: &JoinPolicy,
    read_ahead: &mut HashMap<MessageId, Record>,
    changed: &mut Vec<(Record, State)>,
    already_marked: &mut Vec<Record>,
) -> Result<(), StoreError> {
    let now = jiff::Timestamp::now();
    for &id in mark {
        let mut r = match read_ahead.remove(&id) {
            Some(r) => r,
            None => record_in(rx, id)?,
        };
        match r.state {
            State::Queued => {}
            // Marked by an earlier call whose write failed after this record reached
            // the disk (the caller retries the same marks): its request never left,
            // since requests leave only after a mark succeeds.
            State::Sending => {
                already_marked.push(r);
                continue;
            }
            _ => continue,
        }
        let members = match &r.group {
            None => join::plan(rx, &mut r, joining, now)?,
            Some(Group::Lead { members, .. }) => {
                let mut found = Vec::with_capacity(members.len());
                for &id in members {
                    // One unreadable member must not stop every turn: its lines go out
                    // in the group's content all the same, and reading it says why.
                    match record_in(rx, id) {
                        Ok(m) if m.state == State::Queued && m.lead() == r.id => found.push(m),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(message_id = id, lead = r.id, error = %e, "A member of a joined request cannot be read; its lead's request goes out without marking it.");
                        }
                    }
                }
                found
            }
            // Its lead is gone from the lane before it: cannot be, since a group is
            // settled in one write. Never sent on its own.
            Some(Group::Member { lead }) => {
                tracing::error!(message_id = r.id, lead, "A member of a joined request heads its order's lane without its lead; not sent. Check it with `outbox show`.");
                continue;
            }
        };
        for mut m in std::iter::once(r).chain(members) {
            m.state = State::Sending;
            m.updated_at = now;
            changed.push((m, State::Queued));
        }
    }
    Ok(())
}

/// Writes a turn's planned changes into `tx`: marks and deliveries as small keys, every
/// other change as the record, with the indexes that follow a state.
pub(super) fn apply_changes(
    tx: &mut kv::Tx<'_>,
    changed: &[(Record, State)],
    deliveries: &HashMap<MessageId, Vec<u8>>,
) -> Result<(), StoreError> {
    for (r, old) in changed {
        if *old == State::Queued && r.state == State::Sending {
            if r.group.is_some() {
                // A joined request's records carry their group (join.rs): stored queued,
                // with the mark laid over them like any other.
                let mut stored = r.clone();
                stored.state = State::Queued;
                tx.insert(T::Messages, &key(r.id), &encode(&stored)?)?;
                if let Some(Group::Lead {
                    digest: Some(digest),
                    ..
                }) = &r.group
                {
                    tx.insert(T::Contents, &verdict::content_key(*digest, r.id), &[])?;
                }
            }
            // The mark alone (see the module doc).
            tx.insert(T::Sending, &key(r.id), &stamp(r.updated_at))?;
            continue;
        }
        match deliveries.get(&r.id) {
            Some(delivery) => tx.insert(T::Delivered, &key(r.id), delivery)?,
            None => {
                tx.insert(T::Messages, &key(r.id), &encode(r)?)?;
                if *old == State::Delivered {
                    tx.remove(T::Delivered, &key(r.id))?;
                }
            }
        }
        if *old == State::Sending {
            tx.remove(T::Sending, &key(r.id))?;
        }
        // An operator's retry may have edited the content: index it again (the old key
        // turns stale and goes when a verdict meets it, or at pruning).
        if matches!(old, State::Failed | State::Uncertain) && r.state == State::Queued {
            if let Some(digest) = r.content_digest {
                tx.insert(T::Contents, &verdict::content_key(digest, r.id), &[])?;
            }
        }
        if r.state.is_terminal() {
            if !old.is_terminal() {
                tx.insert(T::Done, &done_key(r), &done_value(r))?;
            }
            lanes::remove(tx, &r.production_order, r.id)?;
        }
    }
    Ok(())
}

/// Whether `sent`, a record as [`Outbox::settle_and_mark`] marked it, is what a read
/// would give now: its mark is still in the store with the same time. Sound because every
/// write of a record removes its mark in the same transaction, a mark is only written over
/// a record stored `queued` (and none with a delivery), and a record marked again gets a
/// mark of a later time: so an unchanged mark means an unchanged record, and the turn
/// spares reading and decoding it (most of a settlement's cost besides the write).
fn still_as_marked(rx: &impl kv::Get, sent: &Record) -> Result<bool, StoreError> {
    Ok(sent.state == State::Sending
        && rx
            .get(T::Sending, &key(sent.id))?
            .is_some_and(|mark| mark[..] == stamp(sent.updated_at)))
}

/// Lays a record's delivery or sending mark (module doc) over it as read from the messages
/// table.
pub(super) fn lay_over(rx: &impl kv::Get, r: &mut Record) -> Result<(), StoreError> {
    if let Some(delivery) = rx.get(T::Delivered, &key(r.id))? {
        lay_delivery(r, &delivery);
    } else if let Some(mark) = rx.get(T::Sending, &key(r.id))? {
        lay_mark(r, &mark);
    }
    Ok(())
}

/// A time in the sending and delivered tables: nanoseconds since 1970, i128 BE.
fn stamp(at: jiff::Timestamp) -> [u8; 16] {
    at.as_nanosecond().to_be_bytes()
}

/// The time at the start of a sending or delivered value.
fn unstamp(v: &[u8]) -> Option<jiff::Timestamp> {
    let ns = i128::from_be_bytes(v.get(..16)?.try_into().ok()?);
    jiff::Timestamp::from_nanosecond(ns).ok()
}

/// The delivered table's value: when, and the attempt's outcome.
fn delivery_value(at: jiff::Timestamp, outcome: &str) -> Vec<u8> {
    let mut v = stamp(at).to_vec();
    v.extend_from_slice(outcome.as_bytes());
    v
}

pub(super) fn lay_delivery(r: &mut Record, v: &[u8]) {
    // A record written after the delivery removed its key; a terminal one is the truth.
    if r.state.is_terminal() {
        return;
    }
    let Some(at) = unstamp(v) else {
        tracing::error!(
            message_id = r.id,
            "Outbox delivery record cannot be decoded; the message is shown as stored before it."
        );
        return;
    };
    deliver_at(r, &String::from_utf8_lossy(&v[16..]), at);
}

/// The dispatcher's delivery of `r` at `at` with this attempt outcome: computed once when
/// it is recorded and again at each read (the delivered table), so it must depend on
/// nothing else.
fn deliver_at(r: &mut Record, outcome: &str, at: jiff::Timestamp) {
    r.record_attempt_at(outcome, at);
    r.retry_at = None;
    r.last_error = None;
    r.change_at(State::Delivered, GATEWAY, "delivered", None, at);
}

/// A record as read, with its sending mark (see the module doc) laid over it.
fn lay_mark(r: &mut Record, mark: &[u8]) {
    // Only a queued record can carry a mark; anything else was written after it (and the
    // write removed it), so the record is the truth.
    if r.state != State::Queued {
        return;
    }
    r.state = State::Sending;
    if let Some(at) = unstamp(mark) {
        r.updated_at = at;
    }
}

/// A record met in a scan over the messages table, with what is laid over it.
pub(super) fn scanned(rx: &kv::Rx, v: &[u8]) -> Result<Option<Record>, StoreError> {
    let Ok(mut r) = decode(v) else {
        return Ok(None);
    };
    lay_over(rx, &mut r)?;
    Ok(Some(r))
}

fn apply_settlement(r: &mut Record, s: &Settlement) {
    if let Some(attempt) = &s.attempt {
        r.record_attempt(attempt.as_str());
    }
    if s.server_error {
        r.server_errors += 1;
    }
    r.retry_at = None;
    match &s.next {
        Settle::Delivered => {
            r.last_error = None;
            r.change(State::Delivered, GATEWAY, "delivered", None);
        }
        Settle::Retry { reason, at } => {
            r.last_error = Some(reason.clone());
            r.retry_at = *at;
            r.state = State::Queued;
            r.updated_at = jiff::Timestamp::now();
        }
        Settle::Requeue { reason } => {
            r.change(State::Queued, GATEWAY, "requeued", Some(reason.clone()));
        }
        Settle::Failed { reason } => {
            r.last_error = Some(reason.clone());
            r.change(State::Failed, GATEWAY, "failed", Some(reason.clone()));
        }
        // D365's verdict came back while the request still waited for its answer (D365
        // processed it before the answer was lost): it arrived, it is not uncertain.
        Settle::Uncertain { reason } if r.d365.is_some() => {
            r.last_error = None;
            r.change(
                State::Delivered,
                GATEWAY,
                "delivered: D365 reported it received before its answer was lost",
                Some(reason.clone()),
            );
        }
        Settle::Uncertain { reason } => {
            // As read for this settlement, the record carries its `sending` mark's time.
            r.left_at = Some(r.updated_at);
            r.last_error = Some(reason.clone());
            r.change(State::Uncertain, GATEWAY, "uncertain", Some(reason.clone()));
        }
    }
}
