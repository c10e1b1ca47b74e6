//! The one way new messages enter the outbox: [`Outbox::commit`] writes a batch's new
//! messages and their lane links, the receipts of the upstream deliveries they came from,
//! the rules engine's state, the publications rules built and D365's verdicts, in one
//! transaction with one flush. After a crash all or none of it is there, so a counted
//! piece is never lost between the engine and the outbox, nor reported twice, and a
//! redelivered publish is recognised.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::record::encode;
use super::{
    admit, key, lanes, verdict, Committed, Ingest, Outbox, Record, State, WriteKind, NEXT_ID,
};
use super::{done_key, done_value};
use crate::store::kv::{Span, T};
use crate::store::{owner, publications, receipts, StoreError};

impl Outbox {
    /// Stores new messages, the receipts they came from, an owner's state, publications
    /// and D365's verdicts ([`Ingest::processed`]) in one transaction; one flush. Returns
    /// the new records in order and what became of each verdict. A retried batch (the disk
    /// refused it) reuses the ids of its first attempt.
    /// [`Outbox::commit_shared`], also applying D365's verdicts ([`Ingest::processed`])
    /// in the same transaction, and saying what became of each.
    pub async fn commit(&self, ingest: impl Into<Arc<Ingest>>) -> Result<Committed, StoreError> {
        let ingest: Arc<Ingest> = ingest.into();
        if ingest.is_empty() {
            return Ok(Committed::default());
        }
        // Verdicts change records the dispatcher and the operators change too; batches
        // without one (nearly all) do not wait for them.
        let _transition = if ingest.processed.is_empty() {
            None
        } else {
            Some(self.transitions.lock().await)
        };
        let next_id = self.next_id.clone();
        let store = self.store.clone();
        let indexing = self.index_contents.load(Ordering::Acquire);
        let writes = self.writes.clone();
        // Batches with D365's verdicts change records the dispatcher may hold: they never
        // mark (admit.rs).
        let admission = self.admission().filter(|_| ingest.processed.is_empty());
        let joining = self.joining();
        let (records, plan, marked) = self
            .store
            .write(move |kv| {
                let records = match ingest.prepared.get() {
                    Some(records) => records,
                    None => {
                        let now = jiff::Timestamp::now();
                        let n = ingest.messages.len() as u64;
                        let first = next_id.fetch_add(n, Ordering::AcqRel);
                        let records = ingest
                            .messages
                            .iter()
                            .zip(first..)
                            .map(|(m, id)| {
                                let mut r = Record::new(id, m, now);
                                if indexing {
                                    r.content_digest =
                                        Some(verdict::content_digest(&m.message_type, &m.content));
                                }
                                r
                            })
                            .collect();
                        ingest.prepared.get_or_init(|| records)
                    }
                };
                let encoded = records.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
                let plan = if ingest.processed.is_empty() {
                    verdict::Plan::default()
                } else {
                    verdict::plan(kv, &ingest.processed)?
                };
                let updated = plan
                    .updated
                    .iter()
                    .map(|(r, _)| encode(r))
                    .collect::<Result<Vec<_>, _>>()?;
                let publications = publications::stage(&store, &ingest.publications)?;
                let started = std::time::Instant::now();
                let mut reserved = Vec::new();
                let written = kv.write(true, |tx| {
                    lanes::append_all(
                        tx,
                        records.iter().map(|r| (r.production_order.as_str(), r.id)),
                    )?;
                    for (r, bytes) in records.iter().zip(&encoded) {
                        tx.insert(T::Messages, &key(r.id), bytes)?;
                        if let Some(digest) = r.content_digest {
                            tx.insert(T::Contents, &verdict::content_key(digest, r.id), &[])?;
                        }
                    }
                    receipts::put(tx, &ingest.receipts, &ingest.seen)?;
                    for ((r, old), bytes) in plan.updated.iter().zip(&updated) {
                        tx.insert(T::Messages, &key(r.id), bytes)?;
                        if *old == State::Sending {
                            tx.remove(T::Sending, &key(r.id))?;
                        }
                        if *old == State::Delivered {
                            tx.remove(T::Delivered, &key(r.id))?;
                        }
                        if r.state.is_terminal() && !old.is_terminal() {
                            tx.insert(T::Done, &done_key(r), &done_value(r))?;
                            lanes::remove(tx, &r.production_order, r.id)?;
                        }
                        if r.duplicate {
                            tx.insert(T::Duplicates, &key(r.id), &[])?;
                        }
                        if r.d365.as_ref().is_some_and(|v| v.failed) {
                            tx.insert(T::Rejected, &key(r.id), &[])?;
                        } else {
                            tx.remove(T::Rejected, &key(r.id))?;
                        }
                    }
                    for (k, v) in &plan.unmatched {
                        tx.insert(T::Unmatched, k, v)?;
                    }
                    if !plan.unmatched.is_empty() {
                        let over = tx.len(T::Unmatched)?.saturating_sub(verdict::MAX_UNMATCHED);
                        if over > 0 {
                            // Keys begin with the time received: the first are the oldest.
                            for (k, _) in tx.collect(T::Unmatched, Span::all(), over as usize)? {
                                tx.remove(T::Unmatched, &k)?;
                            }
                        }
                    }
                    for k in &plan.stale {
                        tx.remove(T::Contents, k)?;
                    }
                    publications::put(tx, &publications)?;
                    if let Some((name, bytes)) = &ingest.state {
                        owner::put(tx, name, bytes)?;
                    }
                    if let Some(last) = records.last() {
                        // Never lowered: a batch that took its ids earlier may commit
                        // after one that took later ids.
                        let saved = tx
                            .get(T::State, NEXT_ID)?
                            .and_then(|v| v.as_slice().try_into().ok())
                            .map_or(0, u64::from_be_bytes);
                        let next = saved.max(last.id + 1);
                        tx.insert(T::State, NEXT_ID, &next.to_be_bytes())?;
                    }
                    match &admission {
                        Some(admission) => {
                            admit::mark_new_heads(tx, records, admission, &joining, &mut reserved)
                        }
                        None => Ok(Vec::new()),
                    }
                });
                let marked = match written {
                    Ok(marked) => marked,
                    Err(e) => {
                        if let Some(admission) = &admission {
                            admission.release(&reserved);
                        }
                        return Err(e);
                    }
                };
                writes.record(WriteKind::Ingest, records.len(), started.elapsed());
                if let Some(admission) = &admission {
                    // On disk: the requests are the dispatcher's to send (members go out
                    // in their lead's request).
                    admission.hand_over(
                        marked
                            .iter()
                            .filter(|(r, _)| !r.is_member())
                            .map(|(r, _)| r.clone())
                            .collect(),
                    );
                }
                Ok((records.clone(), plan, marked))
            })
            .await?;
        for _ in &records {
            self.count(None, Some(State::Queued));
        }
        for (r, old) in &marked {
            self.count(Some(*old), Some(r.state));
        }
        for (r, old) in &plan.updated {
            if r.state != *old {
                self.count(Some(*old), Some(r.state));
            }
        }
        self.changed();
        Ok(Committed {
            records,
            reconciled: plan.reconciled,
        })
    }
}
