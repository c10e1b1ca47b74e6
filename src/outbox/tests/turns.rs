//! The dispatcher's turns: outcomes carrying their record, turns written as answers come.

use super::*;

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
