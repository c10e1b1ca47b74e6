use super::*;

fn msg(order: &str, n: u32) -> NewMessage {
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

fn settled(id: MessageId, next: Settle) -> Settlement {
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

#[tokio::test]
async fn a_store_without_indexes_gets_them_built_at_the_first_open() {
    let dir = tempfile::tempdir().unwrap();
    let appended = {
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
        // As version 0.1 left a store: records only, no lane or done keys.
        let store = outbox.store().kv().unwrap();
        store
            .write(true, |tx| {
                for table in [kv::T::LaneEnds, kv::T::LaneLinks, kv::T::Done] {
                    for (k, _) in tx.collect(table, kv::Span::all(), usize::MAX)? {
                        tx.remove(table, &k)?;
                    }
                }
                tx.remove(kv::T::State, INDEXED)
            })
            .unwrap();
        ids(&recs)
    };
    let outbox = Outbox::open(dir.path()).unwrap();
    assert_eq!(
        ids(&outbox.lane_heads(None, 10).unwrap()),
        vec![appended[1]]
    );
    assert_eq!(outbox.counts().get(&State::Delivered).copied(), Some(1));
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
    assert_eq!(outbox.prune(future).await.unwrap(), 1);
}

type Snapshot = (Vec<Record>, BTreeMap<State, usize>, Vec<Vec<MessageId>>);

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

#[tokio::test(flavor = "multi_thread")]
async fn compaction_keeps_every_record_lane_state_and_delivery_and_gives_back_disk() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let delivery = drained_store(&outbox, 30_000).await;
    let before = snapshot(&outbox);
    let max_id = before.0.iter().map(|r| r.id).max().unwrap();

    let (bytes_before, bytes_after) = outbox.compact().await.unwrap();
    assert!(
        bytes_after * 2 < bytes_before,
        "{bytes_before} bytes before, {bytes_after} after"
    );
    assert_same(&snapshot(&outbox), &before, "after compaction");
    assert!(outbox.store().receipts().holds(&delivery.id).unwrap());
    assert_eq!(
        outbox.store().owners().load("rules").unwrap().as_deref(),
        Some(&b"{\"counters\":1}"[..])
    );
    let new = outbox
        .commit(Ingest::of(vec![msg("B", 1)]))
        .await
        .unwrap()
        .records;
    assert!(
        new[0].id > max_id,
        "ids keep growing: {} after {max_id}",
        new[0].id
    );
    drop(outbox);

    let reopened = Outbox::open(dir.path()).unwrap();
    let mut expected = before.0.clone();
    expected.extend(new);
    assert!(
        reopened.list(None, None).unwrap() == expected,
        "after a reopen"
    );
    let later = reopened
        .commit(Ingest::of(vec![msg("C", 2)]))
        .await
        .unwrap()
        .records;
    assert!(
        later[0].id > expected.last().unwrap().id,
        "after a reopen too"
    );
    assert!(!dir.path().join("outbox.compact").exists());
    assert!(!dir.path().join("outbox.old").exists());
}

/// A crash at each step of a compaction leaves a store that opens with everything in it.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_compaction_is_finished_or_undone_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let expected = {
        let outbox = Outbox::open(data).unwrap();
        drained_store(&outbox, 3_000).await;
        snapshot(&outbox)
    };
    let live = data.join("outbox");
    let compacting = data.join("outbox.compact");
    let retired = data.join("outbox.old");
    let build_copy = || {
        let store = crate::store::Store::open(data).unwrap();
        crate::store::compact::build_copy(&store.kv().unwrap(), data, &[]).unwrap();
    };
    let reopen_and_check = |step: &str| {
        let outbox = Outbox::open(data).unwrap();
        assert_same(
            &snapshot(&outbox),
            &expected,
            &format!("after a crash {step}"),
        );
        assert!(!compacting.exists() && !retired.exists(), "{step}");
    };

    // Crash while copying: a copy without its COMPLETE marker.
    build_copy();
    std::fs::remove_file(compacting.join("COMPLETE")).unwrap();
    reopen_and_check("while copying");
    // Crash after the copy, before the swap.
    build_copy();
    reopen_and_check("after copying");
    // Crash between the two renames: no live store, the copy complete.
    build_copy();
    std::fs::rename(&live, &retired).unwrap();
    reopen_and_check("between the renames");
    // Crash after the swap, before the old store is removed.
    build_copy();
    std::fs::rename(&live, &retired).unwrap();
    std::fs::rename(&compacting, &live).unwrap();
    reopen_and_check("before removing the old store");
}

/// Ids are what operators type and read aloud: 1, 2, 3 … across restarts, also when the
/// newest messages were delivered and pruned, and across a compaction.
#[tokio::test]
async fn ids_are_consecutive_across_restarts_pruning_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let outbox = Outbox::open(dir.path()).unwrap();
        ids(&outbox
            .commit(Ingest::of(vec![msg("A", 1), msg("A", 2)]))
            .await
            .unwrap()
            .records)
    };
    assert_eq!(first, [1, 2]);
    let outbox = Outbox::open(dir.path()).unwrap();
    assert_eq!(
        ids(&outbox
            .commit(Ingest::of(vec![msg("A", 3)]))
            .await
            .unwrap()
            .records),
        [3]
    );
    // Deliver and prune everything: no message is left to say where the ids were.
    outbox.mark_sending(&[1]).await.unwrap();
    outbox
        .settle(vec![settled(1, Settle::Delivered)])
        .await
        .unwrap();
    for id in [2, 3] {
        outbox.mark_sending(&[id]).await.unwrap();
        outbox
            .settle(vec![settled(id, Settle::Delivered)])
            .await
            .unwrap();
    }
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
    assert_eq!(outbox.prune(future).await.unwrap(), 3);
    drop(outbox);
    let outbox = Outbox::open(dir.path()).unwrap();
    assert_eq!(
        ids(&outbox
            .commit(Ingest::of(vec![msg("B", 1)]))
            .await
            .unwrap()
            .records),
        [4]
    );
    outbox.compact().await.unwrap();
    drop(outbox);
    let outbox = Outbox::open(dir.path()).unwrap();
    assert_eq!(
        ids(&outbox
            .commit(Ingest::of(vec![msg("B", 2), msg("C", 1)]))
            .await
            .unwrap()
            .records),
        [5, 6]
    );
}

#[tokio::test]
async fn pages_walk_the_outbox_both_ways_with_a_filter() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let all: Vec<NewMessage> = (0..10)
        .map(|i| msg(if i % 2 == 0 { "A" } else { "B" }, i))
        .collect();
    let appended = ids(&outbox.commit(Ingest::of(all)).await.unwrap().records);
    let only_a = ListFilter {
        order: Some("A".into()),
        ..ListFilter::default()
    };
    let (first, next) = outbox.page(&only_a, None, 3, false).unwrap();
    assert_eq!(ids(&first), [appended[0], appended[2], appended[4]]);
    let (second, next) = outbox.page(&only_a, next, 3, false).unwrap();
    assert_eq!(ids(&second), [appended[6], appended[8]]);
    assert_eq!(next, None, "a short page is the last");
    let (newest, next) = outbox.page(&ListFilter::default(), None, 4, true).unwrap();
    assert_eq!(
        ids(&newest),
        [appended[9], appended[8], appended[7], appended[6]]
    );
    let (older, _) = outbox.page(&ListFilter::default(), next, 2, true).unwrap();
    assert_eq!(ids(&older), [appended[5], appended[4]]);
}

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

fn processed(content: &str, state: &str, failed: bool, event_id: &str) -> ProcessedEvent {
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
fn indexing(dir: &std::path::Path) -> Outbox {
    let outbox = Outbox::open(dir).unwrap();
    outbox.index_contents(true);
    outbox
}

async fn reconcile(outbox: &Outbox, events: Vec<ProcessedEvent>) -> Vec<Reconciled> {
    outbox
        .commit(Arc::new(Ingest::default().with_processed(events)))
        .await
        .unwrap()
        .reconciled
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

/// An outbox written by an earlier build (sled, one lane key per member) is moved into redb
/// at the first open, with every record, lane, count, delivery and the rules state; sled's
/// files are gone afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_of_the_old_format_is_migrated_whole_at_the_first_open() {
    let written = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(written.path()).unwrap();
    let delivery = drained_store(&outbox, 3_000).await;
    let before = snapshot(&outbox);
    let next_before = outbox
        .commit(Ingest::of(vec![msg("C", 1)]))
        .await
        .unwrap()
        .records[0]
        .id;
    let before_last = snapshot(&outbox);
    // The same trees, keys and values in a sled store, as earlier builds left them.
    let old = tempfile::tempdir().unwrap();
    let old_dir = old.path().join("outbox");
    {
        let sled_db = sled::Config::new().path(&old_dir).open().unwrap();
        let rx = outbox.store().read().unwrap();
        // Their lane index had one key per member (order ++ id); the lists came later.
        let legacy_lanes = sled_db.open_tree(kv::T::Lanes.name()).unwrap();
        for order in ["A", "B", "C"] {
            for id in outbox.lane(order).unwrap() {
                legacy_lanes
                    .insert(lanes::legacy_key(order, id), &[])
                    .unwrap();
            }
        }
        assert!(!legacy_lanes.is_empty());
        for table in kv::T::ALL {
            if matches!(table, kv::T::LaneEnds | kv::T::LaneLinks) {
                continue;
            }
            let tree = sled_db.open_tree(table.name()).unwrap();
            rx.scan(table, kv::Span::all(), false, |k, v| {
                tree.insert(k, v).unwrap();
                Ok(true)
            })
            .unwrap();
        }
        sled_db.flush().unwrap();
    }
    drop(outbox);
    assert!(old_dir.join("db").exists() && old_dir.join("conf").exists());

    let migrated = Outbox::open(old.path()).unwrap();
    assert_same(&snapshot(&migrated), &before_last, "after migration");
    assert!(migrated.store().receipts().holds(&delivery.id).unwrap());
    assert_eq!(
        migrated.store().owners().load("rules").unwrap().as_deref(),
        Some(&b"{\"counters\":1}"[..])
    );
    let next = migrated
        .commit(Ingest::of(vec![msg("B", 2)]))
        .await
        .unwrap()
        .records[0]
        .id;
    assert_eq!(
        next,
        next_before + 1,
        "ids continue where the old store left them"
    );
    assert!(before.0.len() < before_last.0.len());
    let leftovers: Vec<_> = std::fs::read_dir(&old_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "outbox.redb")
        .collect();
    assert!(
        leftovers.is_empty(),
        "sled's files are removed: {leftovers:?}"
    );
    drop(migrated);
    // Opening again reads the redb store only.
    let again = Outbox::open(old.path()).unwrap();
    assert_eq!(
        again.list(None, None).unwrap().len(),
        before_last.0.len() + 1
    );
}

/// An old-format store that sled itself cannot read (torn by a power cut under an earlier
/// build) is refused with the reason, and left exactly as it was: nothing is migrated
/// half, nothing of it is deleted.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_format_store_sled_cannot_read_is_refused_and_left_untouched() {
    let old = tempfile::tempdir().unwrap();
    let dir = old.path().join("outbox");
    {
        let sled_db = sled::Config::new().path(&dir).open().unwrap();
        let messages = sled_db.open_tree(kv::T::Messages.name()).unwrap();
        for id in 1u64..=2_000 {
            messages.insert(id.to_be_bytes(), vec![1u8; 400]).unwrap();
        }
        sled_db.flush().unwrap();
    }
    // Tear it: garble its configuration file, which sled checks before anything else.
    let conf = dir.join("conf");
    let mut bytes = std::fs::read(&conf).unwrap();
    for b in &mut bytes {
        *b ^= 0x5a;
    }
    std::fs::write(&conf, &bytes).unwrap();
    let files = |dir: &std::path::Path| {
        let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        all.sort();
        all
    };
    let before = files(&dir);

    let Err(e) = Outbox::open(old.path()) else {
        panic!("a torn old store was opened");
    };
    let text = e.to_string();
    assert!(
        text.contains("the outbox in the old format (sled) cannot be read: corrupted data; it is left as it is"),
        "{text}"
    );
    let after: Vec<_> = files(&dir)
        .into_iter()
        .filter(|(name, _)| name != "outbox.redb.migrating")
        .collect();
    assert_eq!(
        after.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        before.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "no file of the old store is removed and no new store appears"
    );
    assert!(after == before, "the old store's files are unchanged");
}

#[tokio::test]
async fn an_outcome_carrying_its_record_as_sent_is_settled_from_it_only_while_its_mark_is_unchanged(
) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let recs = outbox
        .commit(Ingest::of(vec![msg("A", 1)]))
        .await
        .unwrap()
        .records;
    let id = recs[0].id;
    let first = outbox.mark_sending(&[id]).await.unwrap().remove(0);
    let retry = |as_sent: Record| Settlement {
        id,
        attempt: Some("HTTP 500".into()),
        server_error: true,
        next: Settle::Retry {
            reason: "server error".into(),
            at: None,
        },
        as_sent: Some(Box::new(as_sent)),
    };
    // Fresh: settled from the record given, which is what the store holds.
    let settled_now = outbox.settle(vec![retry(first.clone())]).await.unwrap();
    assert_eq!(settled_now[0].state, State::Queued);
    assert_eq!(outbox.get(id).unwrap(), settled_now[0]);
    assert_eq!(outbox.get(id).unwrap().attempts.len(), 1);

    // Marked again: the first record is stale (it lacks the attempt just recorded). An
    // outcome that carries it anyway is settled from the store, and nothing is lost.
    let second = outbox.mark_sending(&[id]).await.unwrap().remove(0);
    assert_ne!(second.updated_at, first.updated_at);
    let failed = Settlement {
        next: Settle::Failed {
            reason: "HTTP 400".into(),
        },
        server_error: false,
        attempt: Some("HTTP 400".into()),
        ..retry(first)
    };
    let settled_now = outbox.settle(vec![failed]).await.unwrap();
    let stored = outbox.get(id).unwrap();
    assert_eq!(stored.state, State::Failed);
    assert_eq!(
        stored
            .attempts
            .iter()
            .map(|a| a.outcome.as_str())
            .collect::<Vec<_>>(),
        ["HTTP 500", "HTTP 400"],
        "the attempt recorded after the stale record was taken is kept"
    );
    assert_eq!(settled_now[0], stored);
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

/// What a test compares of two outboxes: per message its state and attempts, the lanes
/// and the counts.
#[derive(Debug, PartialEq)]
struct Visible {
    records: Vec<(State, Vec<String>)>,
    lanes: Vec<Vec<MessageId>>,
    counts: String,
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

#[tokio::test]
async fn a_turn_filled_as_answers_come_writes_what_one_settle_and_mark_writes() {
    let (dir_one, dir_open) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = Outbox::open(dir_one.path()).unwrap();
    let open = Outbox::open(dir_open.path()).unwrap();
    let heads_one = three_lanes_sending(&one).await;
    let heads_open = three_lanes_sending(&open).await;

    let (settled_one, marked_one) = one
        .settle_and_mark(&answers(&heads_one), &[4])
        .await
        .unwrap();
    let turn = open.begin_turn().expect("nobody holds the transition lock");
    let mut answers_open = answers(&heads_open);
    let last = answers_open.split_off(2);
    turn.settle(Arc::new(answers_open.split_off(1)));
    turn.settle(Arc::new(answers_open));
    let (settled_open, marked_open) = turn.finish(Arc::new(last), vec![4]).await.unwrap();

    let states = |rs: &[Record]| rs.iter().map(|r| (r.id, r.state)).collect::<Vec<_>>();
    assert_eq!(
        states(&settled_open),
        [
            (2, State::Queued),
            (1, State::Delivered),
            (3, State::Failed)
        ],
        "outcomes in the order given"
    );
    assert_eq!(states(&marked_open), [(4, State::Sending)]);
    assert_eq!(states(&marked_one), states(&marked_open));
    let mut sorted_one = states(&settled_one);
    let mut sorted_open = states(&settled_open);
    sorted_one.sort();
    sorted_open.sort();
    assert_eq!(sorted_one, sorted_open);
    assert_eq!(
        marked_open[0],
        open.get(4).unwrap(),
        "the mark is what a read gives"
    );
    let want = visible(&one);
    assert_eq!(visible(&open), want);
    assert_eq!(want.lanes, [vec![4, 7], vec![2, 5, 8], vec![3, 6, 9]]);

    // On disk, not only in this process.
    drop(open);
    let reopened = Outbox::open(dir_open.path()).unwrap();
    assert_eq!(visible(&reopened), want);
}

#[tokio::test]
async fn an_open_turn_is_invisible_until_it_commits_and_other_writes_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let heads = three_lanes_sending(&outbox).await;
    {
        // An operator action in progress: no turn now; the dispatcher writes the
        // ordinary way.
        let _operator = outbox.transitions.clone().lock_owned().await;
        assert!(outbox.begin_turn().is_none());
    }
    let mut turn = outbox.begin_turn().unwrap();
    turn.settle(Arc::new(answers(&heads)));
    turn.opened().await;
    // Nothing of the turn shows before its commit, whenever its writer applied it.
    assert_eq!(outbox.get(1).unwrap().state, State::Sending);
    assert_eq!(outbox.counts().get(&State::Delivered), None);
    let ingest = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            outbox
                .commit(Ingest::of(vec![msg("D", 1)]))
                .await
                .map(|c| c.records)
        }
    });
    let operator = tokio::spawn({
        let outbox = outbox.clone();
        async move { outbox.cancel(9, "operator").await }
    });
    let (settled, marked) = turn.finish(Arc::new(Vec::new()), vec![4]).await.unwrap();
    assert_eq!(ids(&settled), [1, 2, 3]);
    assert_eq!(ids(&marked), [4]);
    // Both ran once the turn had committed, and neither undid it.
    assert_eq!(ids(&ingest.await.unwrap().unwrap()), [10]);
    assert_eq!(operator.await.unwrap().unwrap().state, State::Cancelled);
    assert_eq!(outbox.get(1).unwrap().state, State::Delivered);
    assert_eq!(outbox.get(4).unwrap().state, State::Sending);
    assert_eq!(outbox.lane("C").unwrap(), [3, 6]);
}

#[tokio::test]
async fn a_dropped_turn_writes_nothing_and_the_outcomes_are_written_the_ordinary_way() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let heads = three_lanes_sending(&outbox).await;
    let outcomes = answers(&heads);
    let turn = outbox.begin_turn().unwrap();
    turn.settle(Arc::new(outcomes.clone()));
    drop(turn);
    assert_eq!(outbox.get(1).unwrap().state, State::Sending);
    // The store is free again at once (no wait for the idle limit) and the same outcomes
    // are recorded once.
    let started = std::time::Instant::now();
    outbox.settle(outcomes).await.unwrap();
    assert!(started.elapsed() < TURN_IDLE_MAX);
    let delivered = outbox.get(1).unwrap();
    assert_eq!(delivered.state, State::Delivered);
    assert_eq!(delivered.attempts.len(), 1);
    assert_eq!(outbox.get(3).unwrap().state, State::Failed);
}

#[tokio::test]
async fn a_turn_its_owner_forgets_is_rolled_back_and_frees_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let heads = three_lanes_sending(&outbox).await;
    let mut turn = outbox.begin_turn().unwrap();
    turn.settle(Arc::new(answers(&heads)));
    turn.opened().await;
    // The owner breaks the rule (another write while its turn is open): the write waits
    // for the idle limit, then goes through, instead of hanging for good.
    let appended = outbox
        .commit(Ingest::of(vec![msg("D", 1)]))
        .await
        .unwrap()
        .records;
    assert_eq!(ids(&appended), [10]);
    assert!(matches!(
        turn.finish(Arc::new(Vec::new()), vec![4]).await,
        Err(StoreError::TurnAbandoned)
    ));
    assert_eq!(outbox.get(1).unwrap().state, State::Sending, "rolled back");
    assert_eq!(outbox.get(4).unwrap().state, State::Queued);
}
