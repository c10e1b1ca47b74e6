//! The store under the outbox: indexes built once, compaction (whole and interrupted),
//! ids across restarts, paging.

use super::*;

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
