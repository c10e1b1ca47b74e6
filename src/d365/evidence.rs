//! Settling `uncertain` messages by evidence, from D365's own event stream.
//!
//! A message is `uncertain` when its request may or may not have reached D365 (the
//! gateway was killed after the `sending` mark, or the answer never came). D365 processes
//! each order's messages in arrival order, and its batch job takes every message it has
//! received when it runs (several processor tasks in parallel). So if D365 had received
//! the uncertain message, it would have processed it — and sent its "message processed"
//! event — no later than messages it received well after it. When D365's events show it
//! processed **several messages of other orders that the gateway sent at least `after`
//! later** than the uncertain request may have left, and `grace` has passed since the
//! last of them was reported, with no event for the uncertain message, D365 never
//! received it: it is queued again, and its history names the evidence.
//!
//! Never a guess in the other direction: if D365 reports the first copy after all, the
//! second is flagged at once (outbox/verdict.rs: history, an alert, a metric), so an
//! operator can reverse the duplicate report in D365; if the second had not left yet it
//! is not sent.
//!
//! The defaults (docs/d365-api.md): D365's batch job runs at most once a minute, so a
//! message received a minute before others is in an earlier or the same run as they
//! are: `after` = 60 s. Up to 8 processor tasks share a run, so one processed message of
//! another order proves little about the timing of a bundle: `witnesses` = 5. Business
//! events reach the gateway asynchronously (Service Bus, or a webhook retried by D365):
//! `grace` = 2 min after the fifth witness before judging. A witness's send time is taken
//! as its 2xx answer minus the request timeout, the earliest it can have left.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::outbox::{ListFilter, MessageId, Outbox, Record, State};

/// The thresholds (module doc); `None` in the configuration when switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvidencePolicy {
    pub after: Duration,
    pub witnesses: usize,
    pub grace: Duration,
}

impl Default for EvidencePolicy {
    fn default() -> Self {
        EvidencePolicy {
            after: Duration::from_secs(60),
            witnesses: 5,
            grace: Duration::from_secs(120),
        }
    }
}

/// A message D365 reported processed: what its evidence is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    pub id: MessageId,
    pub order: String,
    /// The earliest its request can have left (its 2xx answer minus the request timeout).
    pub sent_after: jiff::Timestamp,
    /// When D365's event about it reached the gateway.
    pub reported_at: jiff::Timestamp,
    pub event_id: String,
}

/// Where an uncertain message stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// Not enough evidence yet: `seen` of `needed` witnesses (and the grace, when all are
    /// seen).
    Waiting { seen: usize, needed: usize },
    /// D365 never received it; the evidence, for its history.
    NeverReceived { evidence: String },
}

/// Judges one uncertain message whose request may have left at `left_at`. Pure.
pub fn judge(
    order: &str,
    left_at: jiff::Timestamp,
    witnesses: &[Witness],
    now: jiff::Timestamp,
    policy: &EvidencePolicy,
) -> Judgement {
    let after = jiff::SignedDuration::try_from(policy.after).unwrap_or(jiff::SignedDuration::MAX);
    let threshold = left_at.checked_add(after).unwrap_or(jiff::Timestamp::MAX);
    let mut qualifying: Vec<&Witness> = witnesses
        .iter()
        .filter(|w| w.order != order && w.sent_after >= threshold)
        .collect();
    qualifying.sort_by_key(|w| w.reported_at);
    let needed = policy.witnesses.max(1);
    let Some(last) = qualifying.get(needed - 1) else {
        return Judgement::Waiting {
            seen: qualifying.len(),
            needed,
        };
    };
    let grace = jiff::SignedDuration::try_from(policy.grace).unwrap_or(jiff::SignedDuration::MAX);
    if now
        < last
            .reported_at
            .checked_add(grace)
            .unwrap_or(jiff::Timestamp::MAX)
    {
        return Judgement::Waiting {
            seen: needed,
            needed,
        };
    }
    let named: Vec<String> = qualifying[..needed]
        .iter()
        .map(|w| {
            format!(
                "message {} (order {}, sent after {}, reported by event {} at {})",
                w.id, w.order, w.sent_after, w.event_id, w.reported_at
            )
        })
        .collect();
    Judgement::NeverReceived {
        evidence: format!(
            "its request may have left at {left_at}; D365 has since processed {} messages of other orders sent at least {} later, and reported nothing for this one within {} of the last: {}",
            needed,
            crate::config::format_duration(policy.after),
            crate::config::format_duration(policy.grace),
            named.join("; ")
        ),
    }
}

/// A delivered record with a verdict from D365, as a witness.
fn witness(r: &Record, request_timeout: Duration) -> Option<Witness> {
    // A joined request is one witness: its lead stands for its members.
    if r.is_member() {
        return None;
    }
    let verdict = r.d365.as_ref()?;
    let answered = r.attempts.last()?.at;
    let timeout = jiff::SignedDuration::try_from(request_timeout).ok()?;
    let reported_at = r
        .history
        .iter()
        .rev()
        .find(|c| c.by == crate::outbox::D365)
        .map(|c| c.at)?;
    Some(Witness {
        id: r.id,
        order: r.production_order.clone(),
        sent_after: answered.checked_sub(timeout).ok()?,
        reported_at,
        event_id: verdict.event_id.clone(),
    })
}

/// The evidence of each uncertain message, for `status`: (seen, needed) witnesses.
pub type EvidenceBoard = Arc<Mutex<BTreeMap<MessageId, (usize, usize)>>>;

/// How many recent deliveries are read for witnesses at each look.
const WITNESS_WINDOW: usize = 5_000;
/// How often the uncertain messages are weighed again.
const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Weighs the uncertain messages against D365's events, and sends again those D365 never
/// received (module doc).
#[derive(Debug)]
pub struct EvidenceWatch {
    pub outbox: Outbox,
    pub policy: EvidencePolicy,
    pub request_timeout: Duration,
    pub board: EvidenceBoard,
}

impl EvidenceWatch {
    pub async fn run(self, cancel: CancellationToken) {
        let mut ticks = tokio::time::interval(CHECK_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Err(e) = self.look(jiff::Timestamp::now()).await {
                tracing::warn!(error = %e, "Cannot weigh the uncertain messages against D365's events; trying again.");
            }
        }
    }

    /// One look at every uncertain message; returns the ones sent again.
    pub async fn look(
        &self,
        now: jiff::Timestamp,
    ) -> Result<Vec<MessageId>, crate::store::StoreError> {
        let uncertain = self
            .outbox
            .counts()
            .get(&State::Uncertain)
            .copied()
            .unwrap_or(0);
        if uncertain == 0 {
            self.board.lock().unwrap_or_else(|p| p.into_inner()).clear();
            return Ok(Vec::new());
        }
        let of = |state| ListFilter {
            state: Some(state),
            ..ListFilter::default()
        };
        let (held, _) = self
            .outbox
            .page(&of(State::Uncertain), None, 1_000, false)?;
        let (recent, _) = self
            .outbox
            .page(&of(State::Delivered), None, WITNESS_WINDOW, true)?;
        let witnesses: Vec<Witness> = recent
            .iter()
            .filter_map(|r| witness(r, self.request_timeout))
            .collect();
        let mut board = BTreeMap::new();
        let mut resent = Vec::new();
        for r in &held {
            let Some(left_at) = r.left_at else {
                continue;
            };
            match judge(&r.production_order, left_at, &witnesses, now, &self.policy) {
                Judgement::Waiting { seen, needed } => {
                    board.insert(r.id, (seen, needed));
                }
                Judgement::NeverReceived { evidence } => {
                    match self.outbox.resend_unreceived(r.id, evidence).await {
                        Ok(_) => {
                            tracing::warn!(message_id = r.id, order = %crate::text::for_log(&r.production_order),
                                "D365 never received an uncertain message (its events show it processed later messages of other orders): sending it again. Its history names the evidence.");
                            resent.push(r.id);
                        }
                        // An operator acted on it meanwhile.
                        Err(crate::store::StoreError::WrongState { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        *self.board.lock().unwrap_or_else(|p| p.into_inner()) = board;
        Ok(resent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn w(id: u64, order: &str, sent: i64, reported: i64) -> Witness {
        Witness {
            id,
            order: order.into(),
            sent_after: t(sent),
            reported_at: t(reported),
            event_id: format!("E{id}"),
        }
    }

    const POLICY: EvidencePolicy = EvidencePolicy {
        after: Duration::from_secs(60),
        witnesses: 3,
        grace: Duration::from_secs(120),
    };

    /// Only messages of other orders sent at least `after` later count; the judgement
    /// waits for the grace after the last needed witness, and names them.
    #[test]
    fn evidence_needs_enough_later_witnesses_of_other_orders_and_the_grace() {
        let left = t(0);
        let mut ws = vec![
            w(1, "P1", 10, 20),   // too early: sent 10 s after
            w(2, "P9", 100, 110), // its own order: proves nothing
            w(3, "P2", 61, 70),
            w(4, "P3", 90, 95),
        ];
        assert_eq!(
            judge("P9", left, &ws, t(1_000), &POLICY),
            Judgement::Waiting { seen: 2, needed: 3 }
        );
        ws.push(w(5, "P4", 200, 300));
        assert_eq!(
            judge("P9", left, &ws, t(419), &POLICY),
            Judgement::Waiting { seen: 3, needed: 3 },
            "the grace runs from the last witness's report"
        );
        let Judgement::NeverReceived { evidence } = judge("P9", left, &ws, t(420), &POLICY) else {
            panic!("enough evidence after the grace");
        };
        for named in ["message 3 ", "message 4 ", "message 5 ", "event E5"] {
            assert!(evidence.contains(named), "{named}: {evidence}");
        }
        assert!(!evidence.contains("message 1 ") && !evidence.contains("message 2 "));
    }

    /// A witness reported late (out of order) still counts by its send time; one sent
    /// before the threshold never does, however late it is reported.
    #[test]
    fn late_and_out_of_order_reports_count_by_send_time() {
        let ws = vec![
            w(1, "P1", 59, 1_000),
            w(2, "P2", 300, 50),
            w(3, "P3", 61, 500),
            w(4, "P4", 70, 10),
        ];
        assert_eq!(
            judge("P0", t(0), &ws, t(619), &POLICY),
            Judgement::Waiting { seen: 3, needed: 3 }
        );
        assert!(matches!(
            judge("P0", t(0), &ws, t(620), &POLICY),
            Judgement::NeverReceived { .. }
        ));
    }

    use crate::outbox::tests::{indexing, msg, processed, reconcile, settled};
    use crate::outbox::{Ingest, Settle, Settlement};

    /// D365 reports the message of this content processed.
    async fn report(outbox: &Outbox, content: &str, event_id: &str) {
        reconcile(
            outbox,
            vec![processed(content, "Processed", false, event_id)],
        )
        .await;
    }

    /// The whole path on a real outbox: an uncertain message waits while D365 reports
    /// fewer witnesses than needed (the board says how many), is sent again once enough
    /// later messages of other orders are reported processed (its history names them),
    /// and a report of the first copy before the second left means it arrived after all:
    /// not sent, no duplicate.
    #[tokio::test]
    async fn an_uncertain_message_d365_never_received_is_sent_again_on_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = indexing(dir.path());
        let orders = ["P0", "P1", "P2", "P3", "P4", "P5"];
        let records = outbox
            .commit(Ingest::of(orders.iter().map(|o| msg(o, 1)).collect()))
            .await
            .unwrap()
            .records;
        let ids: Vec<MessageId> = records.iter().map(|r| r.id).collect();
        outbox.mark_sending(&ids).await.unwrap();
        let mut outcomes = vec![settled(
            ids[0],
            Settle::Uncertain {
                reason: "interrupted".into(),
            },
        )];
        outcomes.extend(
            ids[1..]
                .iter()
                .map(|id| Settlement::delivered(*id, "HTTP 200")),
        );
        outbox.settle(outcomes).await.unwrap();
        let uncertain = outbox.get(ids[0]).unwrap();
        assert_eq!(uncertain.state, State::Uncertain);
        assert!(uncertain.left_at.is_some(), "the mark's time is kept");

        let watch = EvidenceWatch {
            outbox: outbox.clone(),
            policy: EvidencePolicy {
                after: Duration::ZERO,
                witnesses: 5,
                grace: Duration::ZERO,
            },
            request_timeout: Duration::ZERO,
            board: EvidenceBoard::default(),
        };
        for (n, r) in records[1..5].iter().enumerate() {
            report(&outbox, &r.content, &format!("E{n}")).await;
        }
        let now = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1);
        assert!(watch.look(now).await.unwrap().is_empty());
        assert_eq!(watch.board.lock().unwrap().get(&ids[0]), Some(&(4, 5)));
        report(&outbox, &records[5].content, "E5").await;
        let now = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1);
        assert_eq!(watch.look(now).await.unwrap(), [ids[0]]);
        let resent = outbox.get(ids[0]).unwrap();
        assert_eq!(resent.state, State::Queued);
        let last = resent.history.last().unwrap();
        assert_eq!(last.action, "resent: D365 never received it");
        let evidence = last.detail.as_deref().unwrap();
        for id in &ids[1..] {
            assert!(evidence.contains(&format!("message {id} ")), "{evidence}");
        }

        // D365 reports the first copy after all, before the second left: not sent again.
        report(&outbox, &records[0].content, "E-late").await;
        let after_all = outbox.get(ids[0]).unwrap();
        assert_eq!(after_all.state, State::Delivered);
        assert!(!after_all.duplicate);
        assert_eq!(outbox.duplicates(10).unwrap().1, 0);
    }

    /// The wrong inference: a message sent again on evidence is reported processed twice
    /// (the first copy's event was only late): flagged as a duplicate at once, with its
    /// history saying what to do, and listed for the alert and the metric.
    #[tokio::test]
    async fn a_second_report_after_the_resend_flags_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = indexing(dir.path());
        let r = outbox
            .commit(Ingest::of(vec![msg("P7", 1)]))
            .await
            .unwrap()
            .records
            .remove(0);
        outbox.mark_sending(&[r.id]).await.unwrap();
        outbox
            .settle(vec![settled(
                r.id,
                Settle::Uncertain {
                    reason: "interrupted".into(),
                },
            )])
            .await
            .unwrap();
        outbox
            .resend_unreceived(r.id, "test evidence".into())
            .await
            .unwrap();
        outbox.mark_sending(&[r.id]).await.unwrap();
        outbox
            .settle(vec![Settlement::delivered(r.id, "HTTP 200")])
            .await
            .unwrap();
        report(&outbox, &r.content, "E1").await;
        assert!(
            !outbox.get(r.id).unwrap().duplicate,
            "one report: the resend's"
        );
        report(&outbox, &r.content, "E2").await;
        let twice = outbox.get(r.id).unwrap();
        assert!(twice.duplicate);
        assert!(twice
            .history
            .iter()
            .any(|c| c.action.starts_with("DUPLICATE in D365")));
        let (listed, n) = outbox.duplicates(10).unwrap();
        assert_eq!((listed[0].id, n), (r.id, 1));
    }
}
