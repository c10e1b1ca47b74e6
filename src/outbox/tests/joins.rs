//! Joining an order's queued messages into one request (join.rs): what is joined, what
//! never is, and a group settled, acted on and reconciled as one.

use super::*;
use crate::message::{TYPE_REPORT_FINISHED, TYPE_START};

/// A report as finished of `quantity` for `order`, with `header` fields besides the order.
fn report_with(order: &str, quantity: u32, header: serde_json::Value) -> NewMessage {
    let mut content = serde_json::json!({
        "ProductionOrderNumber": order,
        "ReportFinishedLines": [{"ItemNumber": "A0001", "ReportedGoodQuantity": quantity}],
    });
    if let (Some(c), Some(h)) = (content.as_object_mut(), header.as_object()) {
        c.extend(h.clone());
    }
    NewMessage {
        production_order: order.into(),
        message_type: TYPE_REPORT_FINISHED.into(),
        content: content.to_string(),
        origin: "test".into(),
        line: None,
    }
}

fn report(order: &str, quantity: u32) -> NewMessage {
    report_with(order, quantity, serde_json::json!({}))
}

fn start(order: &str) -> NewMessage {
    NewMessage {
        production_order: order.into(),
        message_type: TYPE_START.into(),
        content: format!("{{\"ProductionOrderNumber\":\"{order}\"}}"),
        origin: "test".into(),
        line: None,
    }
}

/// The quantities of a request's lines, in order.
fn quantities(content: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(content).unwrap();
    v["ReportFinishedLines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ReportedGoodQuantity"].as_u64().unwrap())
        .collect()
}

async fn queued(outbox: &Outbox, messages: Vec<NewMessage>) -> Vec<MessageId> {
    ids(&outbox.commit(Ingest::of(messages)).await.unwrap().records)
}

fn joining(dir: &std::path::Path, max_lines: usize) -> Outbox {
    let outbox = indexing(dir);
    outbox.join_with(JoinPolicy::new(
        [TYPE_REPORT_FINISHED.to_string()],
        max_lines,
    ));
    outbox
}

/// Records the outcome of message `id`'s request, as the dispatcher does; what it changed.
async fn answer(outbox: &Outbox, id: MessageId, next: Settle) -> Vec<Record> {
    outbox.settle(vec![settled(id, next)]).await.unwrap()
}

fn rejected() -> Settle {
    Settle::Failed {
        reason: "HTTP 400".into(),
    }
}

fn timed_out() -> Settle {
    Settle::Uncertain {
        reason: "timeout".into(),
    }
}

/// Marks the head of each order, as the dispatcher does; returns what goes out.
async fn mark_heads(outbox: &Outbox) -> Vec<Record> {
    let heads: Vec<MessageId> = outbox
        .lane_head_ids(None, usize::MAX, |_| false, |_| false)
        .unwrap()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    outbox.mark_sending(&heads).await.unwrap()
}

#[tokio::test]
async fn consecutive_reports_of_one_order_go_out_as_one_request_with_every_line_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = joining(dir.path(), 100);
    let ids = queued(&outbox, (1..=4).map(|q| report("P1", q)).collect()).await;
    let other = queued(&outbox, vec![report("P2", 7)]).await;

    let sent = mark_heads(&outbox).await;
    assert_eq!(sent.len(), 2, "one request per order: {sent:?}");
    let lead = sent.iter().find(|r| r.id == ids[0]).unwrap();
    assert_eq!(lead.members(), &ids[1..]);
    assert_eq!(quantities(lead.request_content()), vec![1, 2, 3, 4]);
    // Nothing else of the content changed, and the lead's own content is its own.
    let joined: serde_json::Value = serde_json::from_str(lead.request_content()).unwrap();
    assert_eq!(joined["ProductionOrderNumber"], "P1");
    assert_eq!(joined["ReportFinishedLines"][2]["ItemNumber"], "A0001");
    assert_eq!(quantities(&lead.content), vec![1]);
    let alone = sent.iter().find(|r| r.id == other[0]).unwrap();
    assert!(alone.group.is_none(), "a single message is sent as it is");
    for &m in &ids[1..] {
        let member = outbox.get(m).unwrap();
        assert_eq!(member.state, State::Sending);
        assert_eq!(member.lead(), ids[0]);
        let last = member.history.last().unwrap();
        assert_eq!(
            last.action,
            format!("joined into the request of message {}", ids[0])
        );
    }

    answer(&outbox, ids[0], Settle::Delivered).await;
    for &id in &ids {
        let r = outbox.get(id).unwrap();
        assert_eq!(r.state, State::Delivered, "message {id}");
        assert_eq!(r.attempt_count, 1, "message {id}");
    }
    assert!(outbox.lane("P1").unwrap().is_empty());
    assert_eq!(outbox.counts().get(&State::Delivered), Some(&4));
    // And it survives a restart as it was.
    drop(outbox);
    let outbox = Outbox::open(dir.path()).unwrap();
    assert_eq!(outbox.get(ids[3]).unwrap().state, State::Delivered);
    assert_eq!(outbox.get(ids[3]).unwrap().lead(), ids[0]);
}

#[tokio::test]
async fn a_start_between_reports_is_never_joined_across() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = joining(dir.path(), 100);
    let ids = queued(
        &outbox,
        vec![
            report("P1", 1),
            start("P1"),
            report("P1", 2),
            report("P1", 3),
        ],
    )
    .await;
    let mut sent_order = Vec::new();
    loop {
        let sent = mark_heads(&outbox).await;
        let Some(r) = sent.first() else { break };
        sent_order.push((r.id, r.members().to_vec()));
        answer(&outbox, r.id, Settle::Delivered).await;
    }
    assert_eq!(
        sent_order,
        vec![(ids[0], vec![]), (ids[1], vec![]), (ids[2], vec![ids[3]]),],
        "report, start, then the two reports after the start together"
    );
}

#[tokio::test]
async fn reports_whose_headers_differ_are_never_joined() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = joining(dir.path(), 100);
    let ids = queued(
        &outbox,
        vec![
            report_with("P1", 1, serde_json::json!({"PrintLabel": "Yes"})),
            report_with("P1", 2, serde_json::json!({"PrintLabel": "No"})),
            report("P1", 3),
            report("P1", 4),
        ],
    )
    .await;
    let sent = mark_heads(&outbox).await;
    assert!(sent[0].group.is_none(), "{:?}", sent[0].group);
    answer(&outbox, ids[0], Settle::Delivered).await;
    let sent = mark_heads(&outbox).await;
    assert_eq!(sent[0].id, ids[1]);
    assert!(sent[0].group.is_none(), "PrintLabel No vs none: not joined");
    answer(&outbox, ids[1], Settle::Delivered).await;
    let sent = mark_heads(&outbox).await;
    assert_eq!(sent[0].members(), &[ids[3]]);
}

#[tokio::test]
async fn a_message_once_sent_or_edited_is_never_joined() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = joining(dir.path(), 100);
    let ids = queued(&outbox, vec![report("P1", 1), report("P1", 2)]).await;
    // Sent on its own while the policy was off, answered 503: queued again, but once sent.
    outbox.join_with(JoinPolicy::off());
    let sent = mark_heads(&outbox).await;
    assert!(sent[0].group.is_none());
    answer(
        &outbox,
        ids[0],
        Settle::Retry {
            reason: "HTTP 503".into(),
            at: None,
        },
    )
    .await;
    outbox.join_with(JoinPolicy::new([TYPE_REPORT_FINISHED.to_string()], 100));
    let sent = mark_heads(&outbox).await;
    assert_eq!(sent[0].id, ids[0]);
    assert!(
        sent[0].group.is_none(),
        "a message sent before is sent alone"
    );

    // Rejected, then edited and retried by an operator: alone again.
    answer(&outbox, ids[0], rejected()).await;
    let edited = report("P1", 10).content;
    outbox
        .retry(ids[0], "op", Some(edited), Sending::InFlight)
        .await
        .unwrap();
    let sent = mark_heads(&outbox).await;
    assert_eq!(sent[0].id, ids[0]);
    assert!(sent[0].group.is_none(), "an edited message is sent alone");
    assert_eq!(quantities(sent[0].request_content()), vec![10]);
}

#[tokio::test]
async fn the_line_cap_splits_a_long_run_into_requests_of_at_most_that_many_lines() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = joining(dir.path(), 3);
    let mut messages: Vec<NewMessage> = (1..=5).map(|q| report("P1", q)).collect();
    // Two lines in one message: does not fit behind two others under a cap of three.
    let mut two = report("P1", 6);
    two.content = serde_json::json!({
        "ProductionOrderNumber": "P1",
        "ReportFinishedLines": [{"ReportedGoodQuantity": 6}, {"ReportedGoodQuantity": 7}],
    })
    .to_string();
    messages.push(two);
    queued(&outbox, messages).await;
    let mut requests = Vec::new();
    loop {
        let sent = mark_heads(&outbox).await;
        let Some(r) = sent.first() else { break };
        requests.push(quantities(r.request_content()));
        answer(&outbox, r.id, Settle::Delivered).await;
    }
    assert_eq!(requests, vec![vec![1, 2, 3], vec![4, 5], vec![6, 7]]);
}

#[tokio::test]
async fn an_ambiguous_answer_holds_the_whole_group_and_operators_act_on_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = joining(dir.path(), 100);
    let ids = queued(&outbox, (1..=3).map(|q| report("P1", q)).collect()).await;
    let first = mark_heads(&outbox).await.remove(0);
    let uncertain = answer(&outbox, ids[0], timed_out()).await;
    assert_eq!(uncertain.len(), 3, "every member is settled with its lead");
    for &id in &ids {
        assert_eq!(outbox.get(id).unwrap().state, State::Uncertain, "{id}");
    }
    // An edit of one member would break the group's request: refused, nothing changed.
    let err = outbox
        .retry(
            ids[2],
            "op",
            Some(report("P1", 9).content),
            Sending::InFlight,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Joined { .. }), "{err}");
    assert_eq!(outbox.get(ids[2]).unwrap().state, State::Uncertain);

    // Retrying a member retries the group: sent again as the same one request.
    let lead = outbox
        .retry(ids[2], "op", None, Sending::InFlight)
        .await
        .unwrap();
    assert_eq!(lead.id, ids[0]);
    for &id in &ids {
        assert_eq!(outbox.get(id).unwrap().state, State::Queued, "{id}");
    }
    let again = mark_heads(&outbox).await.remove(0);
    assert_eq!(again.request_content(), first.request_content());
    assert_eq!(again.members(), &ids[1..]);
    answer(&outbox, ids[0], timed_out()).await;
    // Resolving a member resolves the group.
    outbox
        .resolve_delivered(ids[1], "op", Sending::InFlight)
        .await
        .unwrap();
    for &id in &ids {
        let r = outbox.get(id).unwrap();
        assert_eq!(r.state, State::Delivered, "{id}");
        assert_eq!(r.history.last().unwrap().action, "resolved as delivered");
    }
    assert!(outbox.lane("P1").unwrap().is_empty());

    // Cancelling a failed member cancels its group.
    let ids = queued(&outbox, (1..=2).map(|q| report("P2", q)).collect()).await;
    mark_heads(&outbox).await;
    answer(&outbox, ids[0], rejected()).await;
    outbox.cancel(ids[1], "op").await.unwrap();
    assert_eq!(outbox.get(ids[0]).unwrap().state, State::Cancelled);
    assert_eq!(outbox.get(ids[1]).unwrap().state, State::Cancelled);
    assert!(outbox.lane("P2").unwrap().is_empty());
}

#[tokio::test]
async fn a_crash_during_a_joined_request_leaves_all_its_messages_uncertain_together() {
    let dir = tempfile::tempdir().unwrap();
    let ids = {
        let outbox = joining(dir.path(), 100);
        let ids = queued(&outbox, (1..=3).map(|q| report("P1", q)).collect()).await;
        mark_heads(&outbox).await;
        ids
    };
    let outbox = Outbox::open(dir.path()).unwrap();
    // Counted at open from the lanes: the members are in their lead's state, not queued.
    assert_eq!(outbox.counts().get(&State::Sending), Some(&3));
    assert_eq!(outbox.counts().get(&State::Queued), None);
    let recovered = outbox
        .recover_interrupted(|_| Settle::Uncertain {
            reason: "interrupted".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        recovered.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids,
        "the lead and both members"
    );
    for &id in &ids {
        let r = outbox.get(id).unwrap();
        assert_eq!(r.state, State::Uncertain);
        assert!(r.left_at.is_some());
    }
    assert_eq!(outbox.counts().get(&State::Uncertain), Some(&3));
    drop(outbox);
    let outbox = Outbox::open(dir.path()).unwrap();
    assert_eq!(outbox.counts().get(&State::Uncertain), Some(&3));
}

#[tokio::test]
async fn d365s_verdict_on_the_joined_content_resolves_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = joining(dir.path(), 100);
    let ids = queued(&outbox, (1..=3).map(|q| report("P1", q)).collect()).await;
    let lead = mark_heads(&outbox).await.remove(0);
    answer(&outbox, ids[0], timed_out()).await;
    let event = |content: &str, id: &str| {
        let mut e = processed(content, "Processed", false, id);
        e.message_type = TYPE_REPORT_FINISHED.into();
        e
    };
    // A member's own content was never posted: an event naming it matches nothing.
    let member_alone = outbox.get(ids[1]).unwrap().content;
    let got = reconcile(&outbox, vec![event(&member_alone, "E0")]).await;
    assert!(matches!(got[0], Reconciled::Unmatched { .. }), "{got:?}");
    assert_eq!(outbox.get(ids[1]).unwrap().state, State::Uncertain);

    // D365 reformats the content (key order, spacing): still the joined request.
    let reformatted = serde_json::to_string_pretty(
        &serde_json::from_str::<serde_json::Value>(lead.request_content()).unwrap(),
    )
    .unwrap();
    let got = reconcile(&outbox, vec![event(&reformatted, "E1")]).await;
    assert_eq!(
        got,
        vec![Reconciled::Matched {
            id: ids[0],
            failed: false,
            resolved: true
        }]
    );
    for &id in &ids {
        let r = outbox.get(id).unwrap();
        assert_eq!(r.state, State::Delivered, "{id}");
        assert_eq!(r.d365.as_ref().unwrap().event_id, "E1", "{id}");
    }
    assert!(outbox.lane("P1").unwrap().is_empty());

    // Pruned with its messages: the joined content's index entry goes too.
    let pruned = outbox
        .prune(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(pruned, 3);
    let got = reconcile(&outbox, vec![event(lead.request_content(), "E2")]).await;
    assert!(matches!(got[0], Reconciled::Unmatched { .. }), "{got:?}");
    let rx = outbox.store.read().unwrap();
    assert_eq!(
        rx.len(T::Contents).unwrap(),
        0,
        "no content key left behind"
    );
}
