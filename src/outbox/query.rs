//! Reading the outbox for people: listings and pages with filters, the messages D365
//! rejected, and D365's verdicts that matched no message.

use super::settle::scanned;
use super::MessageId;
use super::{key, record_in, Outbox, Record, State, UnmatchedEvent};
use crate::store::kv::{Span, T};
use crate::store::StoreError;

impl Outbox {
    /// Forgets the unmatched verdicts received before `before` (kept as long as their
    /// event ids are remembered). Not flushed: bookkeeping a crash merely keeps longer.
    pub async fn forget_unmatched(&self, before: jiff::Timestamp) -> Result<usize, StoreError> {
        let before_key = crate::store::time_key(before);
        self.store
            .write(move |kv| {
                kv.write(false, |tx| {
                    let old = tx.collect(T::Unmatched, Span::to(&before_key), usize::MAX)?;
                    for (k, _) in &old {
                        tx.remove(T::Unmatched, k)?;
                    }
                    Ok(old.len())
                })
            })
            .await
    }

    /// Messages D365 may have twice (sent again on the evidence of D365's events, then
    /// reported received twice): up to `limit`, oldest first, and how many there are.
    pub fn duplicates(&self, limit: usize) -> Result<(Vec<Record>, usize), StoreError> {
        let rx = self.store.read()?;
        let mut records = Vec::new();
        rx.scan(T::Duplicates, Span::all(), false, |k, _| {
            if let Some(id) = k.try_into().ok().map(u64::from_be_bytes) {
                match record_in(&rx, id) {
                    Ok(r) => records.push(r),
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(records.len() < limit)
        })?;
        Ok((records, rx.len(T::Duplicates)? as usize))
    }

    /// Messages whose latest verdict from D365 is Failed (D365 holds their order's later
    /// messages): up to `limit` of them, oldest first, and how many there are.
    pub fn rejected_in_d365(&self, limit: usize) -> Result<(Vec<Record>, usize), StoreError> {
        let rx = self.store.read()?;
        let mut ids = Vec::new();
        rx.scan(T::Rejected, Span::all(), false, |k, _| {
            if let Some(id) = k.try_into().ok().map(u64::from_be_bytes) {
                ids.push(id);
            }
            Ok(ids.len() < limit)
        })?;
        let mut records = Vec::new();
        for id in ids {
            match record_in(&rx, id) {
                Ok(r) => records.push(r),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((records, rx.len(T::Rejected)? as usize))
    }

    /// D365 verdicts that matched no message, newest first (up to `limit`), and how many
    /// are kept.
    pub fn unmatched_verdicts(
        &self,
        limit: usize,
    ) -> Result<(Vec<UnmatchedEvent>, usize), StoreError> {
        let rx = self.store.read()?;
        let mut kept = Vec::new();
        if limit > 0 {
            rx.scan(T::Unmatched, Span::all(), true, |_, v| {
                match serde_json::from_slice(v) {
                    Ok(e) => kept.push(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "A kept unmatched D365 event cannot be read; skipped.")
                    }
                }
                Ok(kept.len() < limit)
            })?;
        }
        Ok((kept, rx.len(T::Unmatched)? as usize))
    }

    /// All records in id order, optionally filtered.
    pub fn list(
        &self,
        state: Option<State>,
        order: Option<&str>,
    ) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        let rx = self.store.read()?;
        rx.scan(T::Messages, Span::all(), false, |_, v| {
            if let Some(r) = scanned(&rx, v)? {
                if state.is_none_or(|s| s == r.state)
                    && order.is_none_or(|o| o == r.production_order)
                {
                    out.push(r);
                }
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// One page of records matching `filter`, oldest or newest first, starting after the
    /// id `after` (the previous page's cursor). Reads records in id order from the cursor
    /// and stops at `limit` matches, so a page costs what it shows plus what the filter
    /// skips — not the whole outbox. Returns the page and the cursor of the next one.
    pub fn page(
        &self,
        filter: &ListFilter,
        after: Option<MessageId>,
        limit: usize,
        newest_first: bool,
    ) -> Result<(Vec<Record>, Option<MessageId>), StoreError> {
        let kv = self.store.kv()?;
        let bound = after.map(|id| {
            if newest_first {
                key(id)
            } else {
                key(id.saturating_add(1))
            }
        });
        let span = match (&bound, newest_first) {
            (None, _) => Span::all(),
            (Some(b), false) => Span::from(b),
            (Some(b), true) => Span::to(b),
        };
        let mut out = Vec::new();
        if limit > 0 {
            let rx = kv.read()?;
            rx.scan(T::Messages, span, newest_first, |_, v| {
                if let Some(r) = scanned(&rx, v)? {
                    if filter.matches(&r) {
                        out.push(r);
                    }
                }
                Ok(out.len() < limit)
            })?;
        }
        let next = match out.last() {
            Some(last) if out.len() == limit => Some(last.id),
            _ => None,
        };
        Ok((out, next))
    }
}

/// Which records a listing shows; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    /// Created at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<jiff::Timestamp>,
    /// Created before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<jiff::Timestamp>,
}

impl ListFilter {
    pub fn matches(&self, r: &Record) -> bool {
        self.state.is_none_or(|s| s == r.state)
            && self
                .order
                .as_deref()
                .is_none_or(|o| o == r.production_order)
            && self
                .message_type
                .as_deref()
                .is_none_or(|t| t == r.message_type)
            && self
                .line
                .as_deref()
                .is_none_or(|l| r.line.as_deref() == Some(l))
            && self.since.is_none_or(|t| r.created_at >= t)
            && self.until.is_none_or(|t| r.created_at < t)
    }
}
