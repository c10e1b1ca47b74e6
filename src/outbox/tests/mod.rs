use super::*;

pub(crate) fn msg(order: &str, n: u32) -> NewMessage {
    NewMessage {
        production_order: order.into(),
        message_type: "ProdProductionOrderStart".into(),
        content: format!("{{\"ProductionOrderNumber\":\"{order}\",\"n\":{n}}}"),
        origin: "test".into(),
        line: None,
    }
}

fn ids(records: &[Record]) -> Vec<MessageId> {
    records.iter().map(|r| r.id).collect()
}

pub(crate) fn settled(id: MessageId, next: Settle) -> Settlement {
    Settlement {
        id,
        attempt: Some("HTTP 200".into()),
        server_error: false,
        next,
        as_sent: None,
    }
}

#[tokio::test]
async fn lanes_are_fifo_per_order_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let appended = {
        let outbox = Outbox::open(dir.path()).unwrap();
        let recs = outbox
            .commit(Ingest::of(vec![msg("A", 1), msg("B", 1), msg("A", 2)]))
            .await
            .unwrap()
            .records;
        ids(&recs)
    };
    assert!(appended[0] < appended[1] && appended[1] < appended[2]);
    let outbox = Outbox::open(dir.path()).unwrap();
    let heads = outbox.lane_heads(None, 10).unwrap();
    assert_eq!(ids(&heads), vec![appended[0], appended[1]]);

    let sent = outbox.mark_sending(&[appended[0]]).await.unwrap();
    assert_eq!(sent[0].state, State::Sending);
    outbox
        .settle(vec![settled(appended[0], Settle::Delivered)])
        .await
        .unwrap();
    let heads = outbox.lane_heads(None, 10).unwrap();
    assert_eq!(ids(&heads), vec![appended[2], appended[1]]);
    assert_eq!(
        outbox.oldest_pending(),
        Some(outbox.get(appended[1]).unwrap().created_at),
        "A1 is delivered: the oldest pending is B1"
    );
    assert_eq!(outbox.counts()[&State::Delivered], 1);
    assert_eq!(outbox.counts()[&State::Queued], 2);
    assert_eq!(outbox.lane("A").unwrap(), vec![appended[2]]);
}

#[tokio::test]
async fn lane_heads_go_round_robin_from_the_order_after_the_last_served() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    outbox
        .commit(Ingest::of(vec![
            msg("A", 1),
            msg("B", 1),
            msg("C", 1),
            msg("A", 2),
        ]))
        .await
        .unwrap();
    let orders = |rs: Vec<Record>| {
        rs.into_iter()
            .map(|r| r.production_order)
            .collect::<Vec<_>>()
    };
    assert_eq!(orders(outbox.lane_heads(None, 2).unwrap()), ["A", "B"]);
    assert_eq!(orders(outbox.lane_heads(Some("B"), 2).unwrap()), ["C", "A"]);
}

#[tokio::test]
async fn transitions_are_checked_against_the_state_machine() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let r = outbox
        .commit(Ingest::of(vec![msg("A", 1)]))
        .await
        .unwrap()
        .records
        .remove(0);
    assert!(
        outbox
            .settle(vec![settled(r.id, Settle::Delivered)])
            .await
            .unwrap()
            .is_empty(),
        "a message that is not sending is not settled"
    );
    assert_eq!(outbox.get(r.id).unwrap().state, State::Queued);
    let marked = outbox.mark_sending(&[r.id]).await.unwrap();
    // Marking again (the dispatcher repeating marks after a failed write that partly
    // reached the disk) changes nothing and hands the record back: its request never left.
    let again = outbox.mark_sending(&[r.id]).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].history.len(), marked[0].history.len());
    assert_eq!(
        again[0].updated_at, marked[0].updated_at,
        "not written again"
    );
    let err = outbox.cancel(r.id, "op").await.unwrap_err();
    assert!(matches!(err, StoreError::WrongState { .. }), "{err}");
    let s = outbox
        .settle(vec![Settlement {
            id: r.id,
            attempt: Some("HTTP 500".into()),
            server_error: true,
            next: Settle::Retry {
                reason: "HTTP 500".into(),
                at: None,
            },
            as_sent: None,
        }])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (s.state, s.server_errors, s.attempt_count),
        (State::Queued, 1, 1)
    );
}

#[tokio::test]
async fn a_message_on_the_wire_is_left_to_the_dispatcher_while_the_gateway_runs() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let r = outbox
        .commit(Ingest::of(vec![msg("A", 1)]))
        .await
        .unwrap()
        .records
        .remove(0);
    outbox.mark_sending(&[r.id]).await.unwrap();
    for refused in [
        outbox.retry(r.id, "op", None, Sending::InFlight).await,
        outbox
            .resolve_delivered(r.id, "op", Sending::InFlight)
            .await,
        outbox.cancel(r.id, "op").await,
    ] {
        let err = refused.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("message {} is sending: cannot", r.id)),
            "{err}"
        );
    }
    assert_eq!(outbox.get(r.id).unwrap().state, State::Sending);
    // Stopped gateway: the same message was interrupted by a crash.
    let resolved = outbox
        .resolve_delivered(r.id, "op", Sending::Interrupted)
        .await
        .unwrap();
    assert_eq!(resolved.state, State::Delivered);
}

#[tokio::test]
async fn a_second_open_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Outbox::open(dir.path()).unwrap();
    let err = Outbox::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
}

#[tokio::test]
async fn operator_actions_check_state_and_record_history() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let r = outbox
        .commit(Ingest::of(vec![msg("A", 1)]))
        .await
        .unwrap()
        .records
        .remove(0);
    assert!(matches!(
        outbox
            .resolve_delivered(r.id, "op", Sending::InFlight)
            .await,
        Err(StoreError::WrongState { .. })
    ));
    assert!(matches!(
        outbox.retry(r.id, "op", None, Sending::InFlight).await,
        Err(StoreError::WrongState { .. })
    ));

    outbox.mark_sending(&[r.id]).await.unwrap();
    outbox
        .settle(vec![Settlement {
            id: r.id,
            attempt: Some("HTTP 500".into()),
            server_error: true,
            next: Settle::Failed {
                reason: "HTTP 500".into(),
            },
            as_sent: None,
        }])
        .await
        .unwrap();
    let retried = outbox
        .retry(r.id, "alice", Some("{\"x\":1}".into()), Sending::InFlight)
        .await
        .unwrap();
    assert_eq!(retried.state, State::Queued);
    assert_eq!(retried.server_errors, 0);
    assert_eq!(retried.content, "{\"x\":1}");
    let last = retried.history.last().unwrap();
    assert_eq!(
        (last.by.as_str(), last.action.as_str()),
        ("alice", "edited and retried")
    );

    let cancelled = outbox.cancel(r.id, "bob").await.unwrap();
    assert_eq!(cancelled.state, State::Cancelled);
    assert!(outbox.lane_heads(None, 10).unwrap().is_empty());
    assert_eq!(outbox.counts()[&State::Cancelled], 1);
    assert_eq!(outbox.counts()[&State::Queued], 0);
}

#[tokio::test]
async fn interrupted_sends_are_recovered_by_the_callers_decision() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1), msg("B", 1)]))
        .await
        .unwrap()
        .records;
    outbox.mark_sending(&ids(&recs)).await.unwrap();
    let recovered = outbox
        .recover_interrupted(|r| {
            if r.production_order == "A" {
                Settle::Uncertain {
                    reason: "interrupted".into(),
                }
            } else {
                Settle::Requeue {
                    reason: "resend".into(),
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(recovered.len(), 2);
    assert_eq!(outbox.get(recs[0].id).unwrap().state, State::Uncertain);
    assert_eq!(outbox.get(recs[1].id).unwrap().state, State::Queued);
}

/// The sending mark is kept apart from the record (module doc): every way of reading a
/// record shows it, it survives a restart, and the outcome's write takes it away.
#[tokio::test]
async fn a_sending_mark_shows_in_every_read_survives_reopen_and_goes_with_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let outbox = Outbox::open(dir.path()).unwrap();
        let recs = outbox
            .commit(Ingest::of(vec![msg("A", 1), msg("B", 1)]))
            .await
            .unwrap()
            .records;
        let before = jiff::Timestamp::now();
        let marked = outbox.mark_sending(&[recs[0].id]).await.unwrap();
        assert_eq!(ids(&marked), [recs[0].id]);
        assert_eq!(marked[0].state, State::Sending);
        let got = outbox.get(recs[0].id).unwrap();
        assert_eq!(got.state, State::Sending);
        assert!(
            got.updated_at >= before,
            "the mark's time is the record's updated_at"
        );
        assert_eq!(
            ids(&outbox.list(Some(State::Sending), None).unwrap()),
            [recs[0].id]
        );
        assert_eq!(
            ids(&outbox.list(Some(State::Queued), None).unwrap()),
            [recs[1].id]
        );
        let (page, _) = outbox
            .page(&ListFilter::default(), None, 10, false)
            .unwrap();
        assert_eq!(page[0].state, State::Sending);
        assert_eq!(outbox.counts()[&State::Sending], 1);
        (got, recs[1].clone())
    };
    // A crash or a stop while it was on the wire.
    let outbox = Outbox::open(dir.path()).unwrap();
    assert_eq!(outbox.counts()[&State::Sending], 1, "counted at open");
    assert_eq!(outbox.counts()[&State::Queued], 1);
    let heads = outbox.lane_heads(None, 10).unwrap();
    assert_eq!(
        heads.iter().map(|r| r.state).collect::<Vec<_>>(),
        [State::Sending, State::Queued]
    );
    assert_eq!(heads[0].updated_at, a.updated_at);
    outbox
        .settle(vec![settled(a.id, Settle::Delivered)])
        .await
        .unwrap();
    let delivered = outbox.get(a.id).unwrap();
    assert_eq!(delivered.state, State::Delivered);
    let store = outbox.store().kv().unwrap();
    assert_eq!(
        store.read().unwrap().len(kv::T::Sending).unwrap(),
        0,
        "the outcome's write removed the mark"
    );
    drop(store);
    // Marking again after a requeue: the mark is new, the record's history intact.
    outbox.mark_sending(&[b.id]).await.unwrap();
    outbox
        .settle(vec![settled(
            b.id,
            Settle::Requeue {
                reason: "resend".into(),
            },
        )])
        .await
        .unwrap();
    let requeued = outbox.get(b.id).unwrap();
    assert_eq!(requeued.state, State::Queued);
    assert_eq!(requeued.attempt_count, 1);
    assert_eq!(outbox.list(Some(State::Sending), None).unwrap().len(), 0);
}

/// A delivery by the dispatcher is kept apart from the record (module doc): every read
/// gives exactly the record the dispatcher was handed, also after a restart; a verdict's
/// full write takes the key away and keeps the delivery; pruning removes both.
#[tokio::test]
async fn a_delivery_kept_apart_reads_as_the_record_it_made_until_written_or_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = indexing(dir.path());
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1), msg("A", 2), msg("B", 1)]))
        .await
        .unwrap()
        .records;
    outbox
        .mark_sending(&[recs[0].id, recs[2].id])
        .await
        .unwrap();
    let (settled_now, marked) = outbox
        .settle_and_mark(
            &[
                settled(recs[0].id, Settle::Delivered),
                Settlement {
                    id: recs[2].id,
                    attempt: Some("HTTP 500".into()),
                    server_error: true,
                    next: Settle::Retry {
                        reason: "server error".into(),
                        at: None,
                    },
                    as_sent: None,
                },
            ],
            &[recs[1].id],
        )
        .await
        .unwrap();
    let delivered = settled_now[0].clone();
    assert_eq!(delivered.state, State::Delivered);
    assert_eq!(delivered.attempts.last().unwrap().outcome, "HTTP 200");
    assert_eq!(delivered.history.last().unwrap().action, "delivered");
    assert_eq!(
        ids(&marked),
        [recs[1].id],
        "its successor went out in the same write"
    );
    let delivered_keys = |o: &Outbox| o.store().read().unwrap().len(kv::T::Delivered).unwrap();
    assert_eq!(
        delivered_keys(&outbox),
        1,
        "only the 2xx delivery is kept apart"
    );
    assert_eq!(outbox.get(recs[0].id).unwrap(), delivered);
    assert_eq!(
        outbox.list(Some(State::Delivered), None).unwrap(),
        vec![delivered.clone()]
    );
    let (page, _) = outbox
        .page(&ListFilter::default(), None, 10, false)
        .unwrap();
    assert_eq!(page[0], delivered);
    assert_eq!(outbox.get(recs[2].id).unwrap().server_errors, 1);
    drop(outbox);

    let outbox = indexing(dir.path());
    assert_eq!(
        outbox.get(recs[0].id).unwrap(),
        delivered,
        "after a restart"
    );
    assert_eq!(outbox.counts()[&State::Delivered], 1);
    // D365's verdict rewrites the record whole: the key goes, the delivery stays.
    reconcile(
        &outbox,
        vec![processed(&recs[0].content, "Processed", false, "ev-1")],
    )
    .await;
    let with_verdict = outbox.get(recs[0].id).unwrap();
    assert!(with_verdict.d365.is_some(), "{with_verdict:?}");
    assert_eq!(with_verdict.state, State::Delivered);
    assert_eq!(with_verdict.attempts, delivered.attempts);
    assert_eq!(
        with_verdict.history[..delivered.history.len()],
        delivered.history[..]
    );
    assert_eq!(delivered_keys(&outbox), 0);
    // Delivered again (the second one) and pruned: nothing of it is left.
    outbox
        .settle(vec![settled(recs[1].id, Settle::Delivered)])
        .await
        .unwrap();
    assert_eq!(delivered_keys(&outbox), 1);
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
    assert_eq!(outbox.prune(future).await.unwrap(), 2);
    assert_eq!(delivered_keys(&outbox), 0);
    assert!(matches!(
        outbox.get(recs[1].id),
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn prune_removes_only_old_terminal_messages() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1), msg("A", 2)]))
        .await
        .unwrap()
        .records;
    outbox.mark_sending(&[recs[0].id]).await.unwrap();
    outbox
        .settle(vec![settled(recs[0].id, Settle::Delivered)])
        .await
        .unwrap();
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
    assert_eq!(outbox.prune(future).await.unwrap(), 1);
    assert!(matches!(
        outbox.get(recs[0].id),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(outbox.get(recs[1].id).unwrap().state, State::Queued);
}

#[tokio::test]
async fn deliveries_are_recorded_with_their_messages_and_forgotten_by_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let source: std::sync::Arc<str> = "plc".into();
    let first = Receipt {
        id: ReceiptId::of_publish(source.clone(), 7, "line1/count", b"1"),
        redelivered: false,
        receipt: 1,
    };
    {
        let outbox = Outbox::open(dir.path()).unwrap();
        assert!(!outbox.store().receipts().holds(&first.id).unwrap());
        outbox
            .commit(Ingest::new(
                vec![msg("A", 1)],
                Some(("rules".into(), b"{}".to_vec())),
                vec![first.clone()],
            ))
            .await
            .unwrap();
    }
    let outbox = Outbox::open(dir.path()).unwrap();
    assert!(
        outbox.store().receipts().holds(&first.id).unwrap(),
        "survives reopen"
    );
    let other_payload = ReceiptId::of_publish(source.clone(), 7, "line1/count", b"2");
    assert!(!outbox.store().receipts().holds(&other_payload).unwrap());

    // The packet id is reused for a new publish (receipt 2): forgetting receipt 1 must
    // not remove the newer recording.
    let second = Receipt {
        receipt: 2,
        ..first.clone()
    };
    outbox
        .commit(Ingest {
            receipts: vec![second.clone()],
            ..Ingest::default()
        })
        .await
        .unwrap();
    outbox
        .store()
        .receipts()
        .forget(vec![first.clone()])
        .await
        .unwrap();
    assert!(outbox.store().receipts().holds(&first.id).unwrap());
    outbox
        .store()
        .receipts()
        .forget(vec![second])
        .await
        .unwrap();
    assert!(!outbox.store().receipts().holds(&first.id).unwrap());

    outbox
        .commit(Ingest {
            receipts: vec![first.clone()],
            ..Ingest::default()
        })
        .await
        .unwrap();
    assert_eq!(
        outbox
            .store()
            .receipts()
            .forget_source("plc")
            .await
            .unwrap(),
        1
    );
    assert!(!outbox.store().receipts().holds(&first.id).unwrap());
}

#[tokio::test]
async fn counts_and_pruning_come_from_the_indexes_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let recs = {
        let outbox = Outbox::open(dir.path()).unwrap();
        let recs = outbox
            .commit(Ingest::of(vec![
                msg("A", 1),
                msg("A", 2),
                msg("A", 3),
                msg("B", 1),
            ]))
            .await
            .unwrap()
            .records;
        outbox
            .mark_sending(&[recs[0].id, recs[3].id])
            .await
            .unwrap();
        outbox
            .settle(vec![
                settled(recs[0].id, Settle::Delivered),
                Settlement {
                    id: recs[3].id,
                    attempt: Some("HTTP 400".into()),
                    server_error: false,
                    next: Settle::Failed {
                        reason: "HTTP 400".into(),
                    },
                    as_sent: None,
                },
            ])
            .await
            .unwrap();
        outbox.cancel(recs[2].id, "op").await.unwrap();
        recs
    };
    let outbox = Outbox::open(dir.path()).unwrap();
    let counts = outbox.counts();
    let n = |s: State| counts.get(&s).copied().unwrap_or(0);
    assert_eq!(
        (
            n(State::Queued),
            n(State::Failed),
            n(State::Delivered),
            n(State::Cancelled)
        ),
        (1, 1, 1, 1),
        "{counts:?}"
    );
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
    assert_eq!(outbox.prune(future).await.unwrap(), 2);
    assert_eq!(outbox.counts().get(&State::Delivered).copied(), Some(0));
    assert!(matches!(
        outbox.get(recs[0].id),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        outbox.get(recs[2].id),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        outbox.prune(future).await.unwrap(),
        0,
        "nothing left to prune"
    );
    assert_eq!(outbox.get(recs[1].id).unwrap().state, State::Queued);
}

/// Compares two snapshots, naming the first difference (not printing thousands of records).
fn assert_same(got: &Snapshot, want: &Snapshot, what: &str) {
    assert_eq!(got.0.len(), want.0.len(), "{what}: number of records");
    if let Some((g, w)) = got.0.iter().zip(&want.0).find(|(g, w)| g != w) {
        panic!("{what}: record differs:\n got {g:?}\nwant {w:?}");
    }
    assert_eq!(got.1, want.1, "{what}: counts");
    for (i, (g, w)) in got.2.iter().zip(&want.2).enumerate() {
        assert!(
            g == w,
            "{what}: lane {i}: {} ids, want {}",
            g.len(),
            w.len()
        );
    }
}

/// Everything an outbox answers, to compare a store before and after compaction.
fn snapshot(outbox: &Outbox) -> Snapshot {
    let lanes = ["A", "B", "C"]
        .iter()
        .map(|o| outbox.lane(o).unwrap())
        .collect();
    let mut counts = outbox.counts();
    counts.retain(|_, n| *n > 0);
    (outbox.list(None, None).unwrap(), counts, lanes)
}

/// A store with a drained backlog behind it: `n` messages over three orders, the first
/// two thirds delivered and pruned, a few left queued, one failed, rules state and an
/// upstream delivery recorded.
async fn drained_store(outbox: &Outbox, n: u32) -> Receipt {
    let orders = ["A", "B", "C"];
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let recs = outbox
            .commit(Ingest::of(
                chunk
                    .iter()
                    .map(|&i| msg(orders[i as usize % 3], i))
                    .collect(),
            ))
            .await
            .unwrap()
            .records;
        let deliver: Vec<MessageId> = recs
            .iter()
            .filter(|r| (r.id as u32) < n * 2 / 3)
            .map(|r| r.id)
            .collect();
        outbox.mark_sending(&deliver).await.unwrap();
        outbox
            .settle(
                deliver
                    .iter()
                    .map(|&id| settled(id, Settle::Delivered))
                    .collect(),
            )
            .await
            .unwrap();
    }
    outbox
        .prune(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60))
        .await
        .unwrap();
    let head = outbox.lane("A").unwrap()[0];
    outbox.mark_sending(&[head]).await.unwrap();
    outbox
        .settle(vec![settled(
            head,
            Settle::Failed {
                reason: "HTTP 400".into(),
            },
        )])
        .await
        .unwrap();
    let delivery = Receipt {
        id: ReceiptId::of_publish("mqtt:plc".into(), 9, "line1/count", b"1"),
        redelivered: false,
        receipt: 1,
    };
    outbox
        .commit(Ingest::new(
            Vec::new(),
            Some(("rules".into(), b"{\"counters\":1}".to_vec())),
            vec![delivery.clone()],
        ))
        .await
        .unwrap();
    delivery
}

pub(crate) fn processed(
    content: &str,
    state: &str,
    failed: bool,
    event_id: &str,
) -> ProcessedEvent {
    ProcessedEvent {
        source: "d365".into(),
        queue: "JmgMES3P".into(),
        message_type: "ProdProductionOrderStart".into(),
        content: content.into(),
        verdict: D365Verdict {
            at: jiff::Timestamp::now(),
            state: state.into(),
            failed,
            result: None,
            infolog: failed.then(|| "Production order P1 is not released.".to_string()),
            event_id: event_id.into(),
            page_url: None,
        },
        payload: format!("{{\"EventId\":\"{event_id}\"}}"),
    }
}

/// Marks a message sending and records its outcome, as the dispatcher does.
async fn send_and_settle(outbox: &Outbox, id: MessageId, next: Settle) -> Record {
    outbox.mark_sending(&[id]).await.unwrap();
    outbox
        .settle(vec![settled(id, next)])
        .await
        .unwrap()
        .pop()
        .unwrap()
}

/// An outbox that indexes contents, as with a d365_events source configured.
pub(crate) fn indexing(dir: &std::path::Path) -> Outbox {
    let outbox = Outbox::open(dir).unwrap();
    outbox.index_contents(true);
    outbox
}

pub(crate) async fn reconcile(outbox: &Outbox, events: Vec<ProcessedEvent>) -> Vec<Reconciled> {
    outbox
        .commit(Arc::new(Ingest::default().with_processed(events)))
        .await
        .unwrap()
        .reconciled
}

/// Nine messages over orders A, B and C (ids 1–9: A1 B1 C1 A2 …), the heads 1–3 marked
/// `sending` as the dispatcher marks them.
async fn three_lanes_sending(outbox: &Outbox) -> Vec<Record> {
    let batch = (1..=3)
        .flat_map(|n| ["A", "B", "C"].map(|order| msg(order, n)))
        .collect();
    outbox.commit(Ingest::of(batch)).await.unwrap();
    let heads: Vec<MessageId> = outbox
        .lane_head_ids(None, 10, |_| false, |_| false)
        .unwrap()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(heads, [1, 2, 3]);
    outbox.mark_sending(&heads).await.unwrap()
}

/// What D365 answered to the heads: A's delivered (settled from the record as sent), B's
/// to be retried, C's rejected.
fn answers(heads: &[Record]) -> Vec<Settlement> {
    vec![
        Settlement::delivered(1, "HTTP 200").with_record_as_sent(heads[0].clone()),
        Settlement {
            server_error: true,
            ..settled(
                2,
                Settle::Retry {
                    reason: "HTTP 500".into(),
                    at: None,
                },
            )
        },
        settled(
            3,
            Settle::Failed {
                reason: "HTTP 400".into(),
            },
        ),
    ]
}

fn visible(outbox: &Outbox) -> Visible {
    let records = (1..=9)
        .map(|id| {
            let r = outbox.get(id).unwrap();
            (r.state, r.attempts.into_iter().map(|a| a.outcome).collect())
        })
        .collect();
    let lanes = ["A", "B", "C"].map(|o| outbox.lane(o).unwrap()).to_vec();
    Visible {
        records,
        lanes,
        counts: format!("{:?}", outbox.counts()),
    }
}

type Snapshot = (Vec<Record>, BTreeMap<State, usize>, Vec<Vec<MessageId>>);

/// What a test compares of two outboxes: per message its state and attempts, the lanes
/// and the counts.
#[derive(Debug, PartialEq)]
struct Visible {
    records: Vec<(State, Vec<String>)>,
    lanes: Vec<Vec<MessageId>>,
    counts: String,
}

mod admits;
mod joins;
mod migrate;
mod store;
mod turns;
mod verdicts;
