//! Event ids, D365's verdicts on messages, unmatched events, publications.

use super::*;

#[tokio::test]
async fn event_ids_are_remembered_with_what_they_produced_and_forgotten_after_their_window() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let seen = SeenEvent {
        source: "d365".into(),
        id: "E-1".into(),
    };
    assert!(!outbox.store().receipts().holds_event(&seen).unwrap());
    outbox
        .commit(Ingest::new(vec![msg("A", 1)], None, Vec::new()).with_seen(vec![seen.clone()]))
        .await
        .unwrap();
    drop(outbox);
    let outbox = Outbox::open(dir.path()).unwrap();
    assert!(
        outbox.store().receipts().holds_event(&seen).unwrap(),
        "durable across a reopen"
    );
    let other_source = SeenEvent {
        source: "d365-b".into(),
        id: "E-1".into(),
    };
    assert!(!outbox
        .store()
        .receipts()
        .holds_event(&other_source)
        .unwrap());
    assert_eq!(
        outbox
            .store()
            .receipts()
            .forget_events(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        outbox
            .store()
            .receipts()
            .forget_events(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60))
            .await
            .unwrap(),
        1
    );
    assert!(!outbox.store().receipts().holds_event(&seen).unwrap());
}

#[tokio::test]
async fn a_verdict_is_recorded_on_the_message_whose_content_d365_reports() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = indexing(dir.path());
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1), msg("A", 2)]))
        .await
        .unwrap()
        .records;
    send_and_settle(&outbox, recs[0].id, Settle::Delivered).await;
    // D365 reformats the JSON: spacing and key order do not matter.
    let reported = "{ \"n\": 1, \"ProductionOrderNumber\": \"A\" }";
    let result = reconcile(&outbox, vec![processed(reported, "Failed", true, "E1")]).await;
    assert_eq!(
        result,
        [Reconciled::Matched {
            id: recs[0].id,
            failed: true,
            resolved: false
        }]
    );
    let r = outbox.get(recs[0].id).unwrap();
    assert_eq!(
        r.state,
        State::Delivered,
        "its gateway state does not change"
    );
    let v = r.d365.as_ref().unwrap();
    assert!(v.failed);
    assert_eq!(
        v.infolog.as_deref(),
        Some("Production order P1 is not released.")
    );
    assert_eq!(r.history.last().unwrap().action, "failed in D365");
    let (rejected, n) = outbox.rejected_in_d365(10).unwrap();
    assert_eq!((ids(&rejected), n), (vec![recs[0].id], 1));
    assert!(outbox.get(recs[1].id).unwrap().d365.is_none());

    // Reprocessed in D365: the failed one gets the new verdict, and leaves the list.
    let result = reconcile(&outbox, vec![processed(reported, "Processed", false, "E2")]).await;
    assert_eq!(
        result,
        [Reconciled::Matched {
            id: recs[0].id,
            failed: false,
            resolved: false
        }]
    );
    assert_eq!(outbox.rejected_in_d365(10).unwrap().1, 0);
    drop(outbox);
    let outbox = indexing(dir.path());
    assert_eq!(
        outbox.get(recs[0].id).unwrap().d365.unwrap().state,
        "Processed",
        "durable"
    );
}

#[tokio::test]
async fn an_uncertain_message_d365_received_is_resolved_and_leaves_its_lane() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = indexing(dir.path());
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1), msg("A", 2)]))
        .await
        .unwrap()
        .records;
    send_and_settle(
        &outbox,
        recs[0].id,
        Settle::Uncertain {
            reason: "timed out".into(),
        },
    )
    .await;
    assert_eq!(ids(&outbox.lane_heads(None, 10).unwrap()), [recs[0].id]);
    let result = reconcile(
        &outbox,
        vec![processed(&recs[0].content, "Processed", false, "E1")],
    )
    .await;
    assert_eq!(
        result,
        [Reconciled::Matched {
            id: recs[0].id,
            failed: false,
            resolved: true
        }]
    );
    let r = outbox.get(recs[0].id).unwrap();
    assert_eq!(r.state, State::Delivered);
    let last = r.history.last().unwrap();
    assert_eq!(last.by, "d365");
    assert!(last.action.starts_with("resolved as delivered"), "{last:?}");
    assert_eq!(
        ids(&outbox.lane_heads(None, 10).unwrap()),
        [recs[1].id],
        "the order's next message is free to go"
    );
    assert_eq!(
        outbox.counts().get(&State::Uncertain).copied().unwrap_or(0),
        0
    );
    assert_eq!(outbox.counts()[&State::Delivered], 1);
    // Pruned with its content key: a later event for it matches nothing.
    assert_eq!(
        outbox
            .prune(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(5))
            .await
            .unwrap(),
        1
    );
    let result = reconcile(
        &outbox,
        vec![processed(&recs[0].content, "Processed", false, "E2")],
    )
    .await;
    assert!(
        matches!(result[0], Reconciled::Unmatched { .. }),
        "{result:?}"
    );
}

/// A forged (or foreign) event that names the content of a message the gateway never
/// sent changes nothing: D365 cannot have processed it. It is kept as unmatched, with
/// the reason naming the message.
#[tokio::test]
async fn a_verdict_never_changes_a_message_that_was_never_sent() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = indexing(dir.path());
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1)]))
        .await
        .unwrap()
        .records;
    let result = reconcile(
        &outbox,
        vec![processed(&recs[0].content, "Failed", true, "FORGED")],
    )
    .await;
    let Reconciled::Unmatched { reason } = &result[0] else {
        panic!("{result:?}");
    };
    assert!(reason.contains("never sent"), "{reason}");
    assert!(reason.contains(&recs[0].id.to_string()), "{reason}");
    let r = outbox.get(recs[0].id).unwrap();
    assert!(r.d365.is_none(), "{r:?}");
    assert_eq!(r.state, State::Queued);
    assert_eq!(r.history.len(), 1, "only its creation");
    assert_eq!(outbox.unmatched_verdicts(10).unwrap().1, 1);
    // Once sent, the same event applies.
    send_and_settle(&outbox, recs[0].id, Settle::Delivered).await;
    let result = reconcile(
        &outbox,
        vec![processed(&recs[0].content, "Failed", true, "E2")],
    )
    .await;
    assert!(
        matches!(result[0], Reconciled::Matched { id, failed: true, .. } if id == recs[0].id),
        "{result:?}"
    );
}

/// The unmatched list keeps the newest `MAX_UNMATCHED` events: a flood of events that
/// match nothing cannot fill the disk.
#[tokio::test(flavor = "multi_thread")]
async fn the_unmatched_list_is_capped_and_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = indexing(dir.path());
    let total = super::verdict::MAX_UNMATCHED as usize + 25;
    for chunk in (0..total).collect::<Vec<_>>().chunks(2_000) {
        let events = chunk
            .iter()
            .map(|i| {
                processed(
                    &format!("{{\"n\":{i}}}"),
                    "Processed",
                    false,
                    &format!("U{i:06}"),
                )
            })
            .collect();
        reconcile(&outbox, events).await;
    }
    let (newest, kept) = outbox.unmatched_verdicts(1).unwrap();
    assert_eq!(kept as u64, super::verdict::MAX_UNMATCHED);
    assert_eq!(newest[0].event_id, format!("U{:06}", total - 1));
    let (all, _) = outbox.unmatched_verdicts(usize::MAX).unwrap();
    assert!(
        all.iter().all(|e| e.event_id.as_str() >= "U000025"),
        "the 25 oldest are gone"
    );
}

#[tokio::test]
async fn identical_messages_take_verdicts_in_order_and_unmatched_events_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = indexing(dir.path());
    // The same content three times (three identical reports), on two orders' lanes.
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1), msg("A", 1), msg("A", 1)]))
        .await
        .unwrap()
        .records;
    let content = recs[0].content.clone();
    // The first two went out; the third never did.
    send_and_settle(&outbox, recs[0].id, Settle::Delivered).await;
    send_and_settle(&outbox, recs[1].id, Settle::Delivered).await;
    // One batch: the first fails, then is processed on reprocessing, then the second.
    let result = reconcile(
        &outbox,
        vec![
            processed(&content, "Failed", true, "E1"),
            processed(&content, "Processed", false, "E2"),
            processed(&content, "Processed", false, "E3"),
            processed("{\"other\":1}", "Processed", false, "E4"),
        ],
    )
    .await;
    let matched: Vec<_> = result
        .iter()
        .filter_map(|r| match r {
            Reconciled::Matched { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(matched, [recs[0].id, recs[0].id, recs[1].id]);
    assert!(outbox.get(recs[2].id).unwrap().d365.is_none());
    assert_eq!(
        outbox.get(recs[0].id).unwrap().history.len(),
        4,
        "created, delivered, failed, processed"
    );
    let (kept, n) = outbox.unmatched_verdicts(10).unwrap();
    assert_eq!(n, 1);
    assert_eq!(kept[0].event_id, "E4");
    assert_eq!(kept[0].payload["EventId"], "E4");
    // Forgotten with the event ids.
    outbox
        .forget_unmatched(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(outbox.unmatched_verdicts(10).unwrap().1, 0);
}

#[tokio::test]
async fn an_edited_retry_is_matched_by_its_new_content() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = indexing(dir.path());
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1)]))
        .await
        .unwrap()
        .records;
    send_and_settle(
        &outbox,
        recs[0].id,
        Settle::Failed {
            reason: "HTTP 500".into(),
        },
    )
    .await;
    let edited = "{\"ProductionOrderNumber\":\"A\",\"n\":7}".to_string();
    outbox
        .retry(recs[0].id, "test", Some(edited.clone()), Sending::InFlight)
        .await
        .unwrap();
    let old = reconcile(
        &outbox,
        vec![processed(&recs[0].content, "Processed", false, "E1")],
    )
    .await;
    assert!(
        matches!(old[0], Reconciled::Unmatched { .. }),
        "the old content is not the message any more"
    );
    let new = reconcile(&outbox, vec![processed(&edited, "Processed", false, "E2")]).await;
    assert!(
        matches!(new[0], Reconciled::Matched { id, .. } if id == recs[0].id),
        "{new:?}"
    );
}

#[tokio::test]
async fn a_verdict_that_comes_before_a_lost_answer_makes_the_message_delivered_not_uncertain() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = indexing(dir.path());
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1)]))
        .await
        .unwrap()
        .records;
    outbox.mark_sending(&[recs[0].id]).await.unwrap();
    let result = reconcile(
        &outbox,
        vec![processed(&recs[0].content, "Processed", false, "E1")],
    )
    .await;
    assert_eq!(
        result,
        [Reconciled::Matched {
            id: recs[0].id,
            failed: false,
            resolved: false
        }]
    );
    assert_eq!(
        outbox.get(recs[0].id).unwrap().state,
        State::Sending,
        "still the dispatcher's"
    );
    let settled = outbox
        .settle(vec![settled(
            recs[0].id,
            Settle::Uncertain {
                reason: "timed out".into(),
            },
        )])
        .await
        .unwrap();
    assert_eq!(settled[0].state, State::Delivered);
    assert!(outbox.lane_heads(None, 10).unwrap().is_empty());
}

#[tokio::test]
async fn publications_are_stored_with_their_batch_in_order_per_broker_until_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let publication = |via: &str, n: u32| Publication {
        via: via.into(),
        topic: format!("hmi/{n}"),
        payload: n.to_string(),
        retain: false,
        rule: "r".into(),
    };
    {
        let outbox = indexing(dir.path());
        outbox
            .commit(
                Ingest::new(vec![msg("A", 1)], None, Vec::new()).with_publications(vec![
                    publication("b1", 1),
                    publication("b2", 2),
                    publication("b1", 3),
                ]),
            )
            .await
            .unwrap();
        assert_eq!(outbox.store().publications().waiting(), 3);
    }
    let outbox = indexing(dir.path());
    let b1 = outbox
        .store()
        .publications()
        .pending("b1", None, 10)
        .await
        .unwrap();
    let payloads: Vec<&str> = b1.iter().map(|(_, p)| p.payload.as_str()).collect();
    assert_eq!(
        payloads,
        ["1", "3"],
        "durable, in order, only this broker's"
    );
    let after_first = outbox
        .store()
        .publications()
        .pending("b1", Some(b1[0].0), 10)
        .await
        .unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].1.payload, "3");
    outbox
        .store()
        .publications()
        .forget("b1", b1[0].0)
        .await
        .unwrap();
    // New ones are numbered after what is stored, also after a reopen.
    outbox
        .commit(Ingest::default().with_publications(vec![publication("b1", 4)]))
        .await
        .unwrap();
    let b1: Vec<String> = outbox
        .store()
        .publications()
        .pending("b1", None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, p)| p.payload)
        .collect();
    assert_eq!(b1, ["3", "4"]);
    assert_eq!(
        outbox
            .store()
            .publications()
            .pending("b2", None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        outbox
            .store()
            .publications()
            .pending("b", None, 10)
            .await
            .unwrap()
            .len(),
        0,
        "no prefix mix-up"
    );
}

#[tokio::test]
async fn without_the_index_nothing_is_matched_and_no_index_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1)]))
        .await
        .unwrap()
        .records;
    assert_eq!(recs[0].content_digest, None);
    send_and_settle(&outbox, recs[0].id, Settle::Delivered).await;
    let result = reconcile(
        &outbox,
        vec![processed(&recs[0].content, "Processed", false, "E1")],
    )
    .await;
    assert!(
        matches!(result[0], Reconciled::Unmatched { .. }),
        "{result:?}"
    );
    // Turned on: later messages are found.
    outbox.index_contents(true);
    let later = outbox
        .commit(Ingest::of(vec![msg("A", 2)]))
        .await
        .unwrap()
        .records;
    send_and_settle(&outbox, later[0].id, Settle::Delivered).await;
    let result = reconcile(
        &outbox,
        vec![processed(&later[0].content, "Processed", false, "E2")],
    )
    .await;
    assert!(
        matches!(result[0], Reconciled::Matched { id, .. } if id == later[0].id),
        "{result:?}"
    );
}
