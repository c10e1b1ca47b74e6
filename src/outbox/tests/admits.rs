//! Ingest commits marking new lane heads `sending` for the dispatcher (admit.rs): only the
//! head of an empty lane, only as far as the dispatcher made room, with the batch's
//! messages behind it joined, handed over once on disk, and never while closed.

use super::*;
use crate::message::TYPE_REPORT_FINISHED;

fn report(order: &str, quantity: u32) -> NewMessage {
    NewMessage {
        production_order: order.into(),
        message_type: TYPE_REPORT_FINISHED.into(),
        content: serde_json::json!({
            "ProductionOrderNumber": order,
            "ReportFinishedLines": [{"ItemNumber": "A0001", "ReportedGoodQuantity": quantity}],
        })
        .to_string(),
        origin: "test".into(),
        line: None,
    }
}

fn admitting(dir: &std::path::Path) -> (Outbox, Arc<Admission>) {
    let outbox = Outbox::open(dir).unwrap();
    outbox.join_with(JoinPolicy::new([TYPE_REPORT_FINISHED.to_string()], 100));
    let admission = Arc::new(Admission::default());
    outbox.admit_with(admission.clone());
    (outbox, admission)
}

#[tokio::test]
async fn a_new_head_of_an_empty_lane_is_marked_in_its_own_commit_and_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, admission) = admitting(dir.path());
    // B already has a queued head: its new message waits behind it.
    let b1 = ids(&outbox
        .commit(Ingest::of(vec![report("B", 1)]))
        .await
        .unwrap()
        .records)[0];
    admission.open(10);
    let ingest_writes = outbox.write_stats().summary(WriteKind::Ingest).writes;
    let delivery_writes = outbox.write_stats().summary(WriteKind::Delivery).writes;
    let new = ids(&outbox
        .commit(Ingest::of(vec![
            report("A", 1),
            report("B", 2),
            report("A", 2),
        ]))
        .await
        .unwrap()
        .records);
    let (a1, b2, a2) = (new[0], new[1], new[2]);

    let handed = admission.take();
    assert_eq!(
        ids(&handed),
        vec![a1],
        "only A's new head, with A2 in its request"
    );
    assert_eq!(handed[0].members(), &[a2]);
    assert_eq!(outbox.get(a1).unwrap().state, State::Sending);
    assert_eq!(outbox.get(a2).unwrap().state, State::Sending);
    assert_eq!(outbox.get(b1).unwrap().state, State::Queued);
    assert_eq!(outbox.get(b2).unwrap().state, State::Queued);
    assert_eq!(
        outbox.write_stats().summary(WriteKind::Ingest).writes,
        ingest_writes + 1,
        "stored and marked in one write"
    );
    assert_eq!(
        outbox.write_stats().summary(WriteKind::Delivery).writes,
        delivery_writes,
        "no write of its own for the mark"
    );
    assert_eq!(outbox.counts().get(&State::Sending), Some(&2));
    assert!(
        !admission.is_reserved("A"),
        "taken: the dispatcher's from now"
    );

    // The mark is on disk like the dispatcher's: a restart finds the request interrupted.
    drop(outbox);
    let outbox = Outbox::open(dir.path()).unwrap();
    assert_eq!(outbox.get(a1).unwrap().state, State::Sending);
    assert_eq!(outbox.get(a1).unwrap().members(), &[a2]);
}

#[tokio::test]
async fn nothing_is_marked_while_admission_is_closed_or_past_its_room() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, admission) = admitting(dir.path());
    let closed = ids(&outbox
        .commit(Ingest::of(vec![report("A", 1)]))
        .await
        .unwrap()
        .records);
    assert!(admission.take().is_empty());
    assert_eq!(outbox.get(closed[0]).unwrap().state, State::Queued);

    admission.open(2);
    let new = ids(&outbox
        .commit(Ingest::of(vec![
            report("B", 1),
            report("C", 1),
            report("D", 1),
        ]))
        .await
        .unwrap()
        .records);
    // Until the dispatcher takes them, their orders are its: it must not pick them.
    assert!(admission.is_reserved("B") && admission.is_reserved("C"));
    assert!(!admission.is_reserved("D"));
    assert_eq!(admission.pending(), 2);
    assert_eq!(ids(&admission.take()), vec![new[0], new[1]], "room for two");
    assert_eq!(outbox.get(new[2]).unwrap().state, State::Queued);
    assert_eq!(admission.pending(), 0);

    // The room is spent: the next arrival waits for the dispatcher.
    let later = ids(&outbox
        .commit(Ingest::of(vec![report("E", 1)]))
        .await
        .unwrap()
        .records);
    assert!(admission.take().is_empty());
    assert_eq!(outbox.get(later[0]).unwrap().state, State::Queued);

    // Withdrawn: ingest commits never mark again.
    admission.open(10);
    outbox.withdraw_admission(&admission);
    let after = ids(&outbox
        .commit(Ingest::of(vec![report("F", 1)]))
        .await
        .unwrap()
        .records);
    assert!(admission.take().is_empty());
    assert_eq!(outbox.get(after[0]).unwrap().state, State::Queued);
}

#[tokio::test]
async fn ending_admission_returns_what_was_marked_and_stops_marking() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, admission) = admitting(dir.path());
    admission.open(5);
    let a = ids(&outbox
        .commit(Ingest::of(vec![report("A", 1)]))
        .await
        .unwrap()
        .records);
    let ended = admission
        .end(tokio::time::Instant::now() + std::time::Duration::from_secs(5))
        .await;
    assert_eq!(ids(&ended), a);
    let b = ids(&outbox
        .commit(Ingest::of(vec![report("B", 1)]))
        .await
        .unwrap()
        .records);
    assert!(admission.take().is_empty());
    assert_eq!(outbox.get(b[0]).unwrap().state, State::Queued);
}
