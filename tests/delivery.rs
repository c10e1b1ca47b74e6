//! Delivery to D365 against a fake over real HTTP on 127.0.0.1:0: the outcome table of
//! `src/d365/retry.rs` (README, "How it works"), end to end through the outbox and the dispatcher. Backoff and pauses run
//! on paused tokio time.

use mes_gateway_testkit as support;

use std::time::Duration;

use mes_gateway::message::{
    TYPE_END, TYPE_PICKING_LIST, TYPE_REPORT_FINISHED, TYPE_ROUTE_CARD, TYPE_START,
};
use mes_gateway::outbox::{Sending, State, WriteKind};
use serde_json::json;
use support::{report, FakeD365, Gateway, Reply};

/// Short backoffs, and every message in a request of its own: these tests are about what
/// becomes of one message's request (a message queued behind another of its order would
/// otherwise join its request or not depending on when the dispatcher marked the first;
/// joining has its own tests, outbox/tests/joins.rs and tests/d365_events.rs).
const FAST: &str = "  backoff_initial: 1s\n  backoff_max: 10s\n  join:\n    max_lines: 1\n";
/// Every message in a request of its own (the dispatcher's `join`, outbox join.rs).
const NOT_JOINED: &str = "  join:\n    max_lines: 1\n";

/// A message that arrives while the dispatcher is idle is marked `sending` in the commit
/// that stores it (outbox admit.rs): its only delivery write is its outcome, and its
/// request goes out once.
#[tokio::test]
async fn a_lone_message_is_marked_in_the_commit_that_stores_it() {
    let fake = FakeD365::start().await;
    let gw = Gateway::start(&fake, FAST).await;
    // The first one fetches the token: admission opens only with one in hand.
    let first = gw.enqueue(TYPE_REPORT_FINISHED, report("A", 1)).await;
    gw.wait_until("the first delivered and the dispatcher idle", |o| {
        o.get(first).unwrap().state == State::Delivered && o.admits()
    })
    .await;
    let delivery_writes = || gw.outbox.write_stats().summary(WriteKind::Delivery).writes;
    let before = delivery_writes();
    let lone = gw.enqueue(TYPE_REPORT_FINISHED, report("B", 1)).await;
    gw.wait_until("the lone one delivered", |o| {
        o.get(lone).unwrap().state == State::Delivered
    })
    .await;
    assert_eq!(
        delivery_writes() - before,
        1,
        "marked when stored: only its outcome is written by the dispatcher"
    );
    assert_eq!(
        fake.received()
            .iter()
            .filter(|r| r.message_id == Some(lone))
            .count(),
        1
    );
    gw.stop().await;
}

/// What D365's MES page shows is the `_messageContent` string as sent: fields in the
/// order of the field tables (whatever order they were given in), date-times in UTC with
/// the milliseconds that were given.
#[tokio::test]
async fn content_arrives_in_field_table_order_with_its_milliseconds() {
    let fake = FakeD365::start().await;
    let gw = Gateway::start(&fake, FAST).await;
    gw.enqueue(
        TYPE_PICKING_LIST,
        json!({"PickingListLines":[{"OperationNumber":10,"IsConsumptionEnded":"No","BOMUnitSymbol":"kg","ConsumptionBOMQuantity":2.5,"ItemNumber":"M0001"}],"JournalNameId":"PickList","ProductionOrderNumber":"P000123"}),
    )
    .await;
    gw.enqueue(
        TYPE_END,
        json!({"AutoReportAsFinished":"No","ExecutedDateTime":"2024-01-15T10:30:00.123+02:00","ProductionOrderNumber":"P000123"}),
    )
    .await;
    fake.wait_until("two messages", |r| r.len() == 2).await;
    let raw: Vec<String> = fake
        .received()
        .iter()
        .map(|r| r.envelope["_messageContent"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        raw,
        [
            r#"{"ProductionOrderNumber":"P000123","JournalNameId":"PickList","PickingListLines":[{"ItemNumber":"M0001","ConsumptionBOMQuantity":2.5,"BOMUnitSymbol":"kg","OperationNumber":10,"IsConsumptionEnded":"No"}]}"#,
            r#"{"ProductionOrderNumber":"P000123","ExecutedDateTime":"2024-01-15T08:30:00.123Z","AutoReportAsFinished":"No"}"#,
        ]
    );
}

#[tokio::test]
async fn each_message_type_arrives_with_the_official_envelope_and_content() {
    let fake = FakeD365::start().await;
    let gw = Gateway::start(&fake, FAST).await;
    // The official examples of each type (docs/d365-api.md), one per type, with enums, dates and lines.
    let examples = [
        (
            TYPE_START,
            json!({"ProductionOrderNumber":"P000123","StartedQuantity":10,"StartedDate":"2021-01-01","AutomaticBOMConsumptionRule":"FlushingPrincip"}),
        ),
        (
            TYPE_REPORT_FINISHED,
            json!({"ProductionOrderNumber":"P000123","ReportFinishedLines":[{"ItemNumber":"A0001","ReportedGoodQuantity":10,"ReportAsFinishedDate":"2021-01-01"}]}),
        ),
        (
            TYPE_PICKING_LIST,
            json!({"ProductionOrderNumber":"P000123","JournalNameId":"PickList","PickingListLines":[{"ItemNumber":"M0001","ConsumptionBOMQuantity":2.5,"BOMUnitSymbol":"kg","IsConsumptionEnded":"No","OperationNumber":10}]}),
        ),
        (
            TYPE_ROUTE_CARD,
            json!({"ProductionOrderNumber":"P000123","RouteCardLines":[{"OperationNumber":10,"OperationPriority":"Primary","Hours":1.5,"GoodQuantity":10,"TaskType":"Process","OperationCompleted":"Yes"}]}),
        ),
        (
            TYPE_END,
            json!({"ProductionOrderNumber":"P000123","ExecutedDateTime":"2024-01-15T08:30:00Z","EndedDate":"2024-01-15","AutoReportAsFinished":"No"}),
        ),
    ];
    for (t, content) in &examples {
        gw.enqueue(t, content.clone()).await;
    }
    fake.wait_until("five messages", |r| r.len() == 5).await;
    let received = fake.received();
    for ((t, content), got) in examples.iter().zip(&received) {
        assert_eq!(got.status, Some(200));
        assert_eq!(got.envelope["_companyId"], "USMF");
        assert_eq!(got.envelope["_messageQueue"], "JmgMES3P");
        assert_eq!(got.envelope["_messageType"], *t);
        assert!(
            got.envelope["_messageContent"].is_string(),
            "content must be a JSON string"
        );
        assert_eq!(&got.content, content, "{t}");
        assert_eq!(got.authorization, "Bearer token-1");
    }
    let tokens = fake.token_requests();
    assert_eq!(tokens.len(), 1, "one token serves all five");
    assert_eq!(tokens[0]["scope"], format!("{}/.default", fake.base_url()));
    assert_eq!(tokens[0]["client_secret"], support::TEST_SECRET);
    gw.wait_until("all delivered", |o| {
        o.counts().get(&State::Delivered) == Some(&5)
    })
    .await;
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn service_unavailable_twice_then_ok_delivers_once_in_order() {
    let fake = FakeD365::start().await;
    fake.script([Reply::Status(503), Reply::Status(503)]);
    let gw = Gateway::start(&fake, FAST).await;
    let ids = [
        gw.enqueue(TYPE_REPORT_FINISHED, report("P1", 1)).await,
        gw.enqueue(TYPE_REPORT_FINISHED, report("P1", 2)).await,
        gw.enqueue(TYPE_REPORT_FINISHED, report("P1", 3)).await,
    ];
    gw.wait_until("three delivered", |o| {
        o.counts().get(&State::Delivered) == Some(&3)
    })
    .await;

    // Per message, the answers to the requests that carried it.
    let answers = |id: u64| -> Vec<u16> {
        fake.received()
            .iter()
            .filter(|r| r.ids().contains(&id))
            .map(|r| r.status.unwrap())
            .collect()
    };
    assert_eq!(answers(ids[0]), vec![503, 503, 200]);
    assert_eq!(answers(ids[1]), vec![200]);
    assert_eq!(answers(ids[2]), vec![200]);
    let accepted: Vec<u64> = fake.accepted().iter().flat_map(|r| r.ids()).collect();
    assert_eq!(accepted, ids, "each delivered once, in order");
    assert_eq!(gw.record(ids[0]).attempt_count, 3);
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn throttling_pauses_every_lane_for_retry_after() {
    let fake = FakeD365::start().await;
    fake.script([Reply::Throttle(2)]);
    // One request at a time, so a lane-local pause would let order B go at once.
    let gw = Gateway::start(&fake, &format!("{FAST}  max_in_flight: 1\n")).await;
    gw.enqueue(TYPE_REPORT_FINISHED, report("A", 1)).await;
    gw.enqueue(TYPE_REPORT_FINISHED, report("B", 1)).await;
    gw.wait_until("both delivered", |o| {
        o.counts().get(&State::Delivered) == Some(&2)
    })
    .await;

    let received = fake.received();
    assert_eq!(received[0].status, Some(429));
    let throttled_at = received[0].at;
    assert_eq!(received.len(), 3, "{received:#?}");
    for r in &received[1..] {
        assert!(
            r.at >= throttled_at + Duration::from_secs(2),
            "request for {} came {:?} after the 429",
            r.order,
            r.at - throttled_at
        );
    }
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn unauthorized_once_fetches_one_new_token_then_delivers() {
    let fake = FakeD365::start().await;
    let gw = Gateway::start(&fake, FAST).await;
    gw.enqueue(TYPE_START, json!({"ProductionOrderNumber":"P1"}))
        .await;
    gw.wait_until("first delivered", |o| {
        o.counts().get(&State::Delivered) == Some(&1)
    })
    .await;

    fake.revoke_tokens();
    let id = gw
        .enqueue(TYPE_END, json!({"ProductionOrderNumber":"P1"}))
        .await;
    gw.wait_until("second delivered", |o| {
        o.counts().get(&State::Delivered) == Some(&2)
    })
    .await;

    assert_eq!(fake.token_requests().len(), 2, "exactly one new token");
    let statuses: Vec<_> = fake
        .received()
        .iter()
        .map(|r| (r.status.unwrap(), r.authorization.clone()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (200, "Bearer token-1".into()),
            (401, "Bearer token-1".into()),
            (200, "Bearer token-2".into())
        ]
    );
    assert_eq!(gw.record(id).state, State::Delivered);
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn wrong_credentials_pause_delivery_and_keep_the_message() {
    let fake = FakeD365::start().await;
    fake.reject_credentials();
    let gw = Gateway::start(&fake, &format!("{FAST}  auth_pause: 60s\n")).await;
    let id = gw
        .enqueue(TYPE_START, json!({"ProductionOrderNumber":"P1"}))
        .await;
    fake.wait_for_token_requests(1).await;
    gw.wait_for_dispatcher_error("AADSTS7000215").await;
    let r = gw.record(id);
    assert_eq!(
        (r.state, r.attempt_count),
        (State::Queued, 0),
        "the message is kept, not failed, and was never marked sending without a token"
    );
    assert!(
        fake.received().is_empty(),
        "nothing was posted without a token"
    );
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn server_error_three_times_fails_and_holds_only_its_order() {
    let fake = FakeD365::start().await;
    fake.script_order(
        "A",
        [Reply::Status(500), Reply::Status(500), Reply::Status(500)],
    );
    let gw = Gateway::start(&fake, FAST).await;
    let a1 = gw.enqueue(TYPE_REPORT_FINISHED, report("A", 1)).await;
    let a2 = gw.enqueue(TYPE_REPORT_FINISHED, report("A", 2)).await;
    let b1 = gw.enqueue(TYPE_REPORT_FINISHED, report("B", 1)).await;
    let b2 = gw.enqueue(TYPE_REPORT_FINISHED, report("B", 2)).await;
    gw.wait_until("A1 failed and B delivered", |o| {
        o.get(a1).unwrap().state == State::Failed && o.get(b2).unwrap().state == State::Delivered
    })
    .await;
    assert_eq!(gw.state(b1), State::Delivered);
    assert_eq!(gw.state(a2), State::Queued, "A2 waits behind the failed A1");
    assert_eq!(
        fake.received()
            .iter()
            .filter(|r| r.message_id == Some(a2))
            .count(),
        0,
        "A2 never sent while A1 is failed"
    );
    assert_eq!(gw.record(a1).server_errors, 3);

    gw.outbox
        .retry(a1, "operator", None, Sending::InFlight)
        .await
        .unwrap();
    gw.wait_until("A drained", |o| {
        o.get(a2).unwrap().state == State::Delivered
    })
    .await;
    let a_accepted: Vec<u64> = fake
        .accepted()
        .iter()
        .filter(|r| r.order == "A")
        .map(|r| r.message_id.unwrap())
        .collect();
    assert_eq!(a_accepted, vec![a1, a2], "in order, once each");
    let history = gw.record(a1).history;
    assert!(history
        .iter()
        .any(|c| c.by == "operator" && c.action == "retried"));
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn timeout_after_the_request_was_written_is_uncertain_and_resolve_releases_the_order() {
    let fake = FakeD365::start().await;
    fake.script_order("A", [Reply::Hang]);
    let gw = Gateway::start(&fake, FAST).await;
    let a1 = gw.enqueue(TYPE_REPORT_FINISHED, report("A", 1)).await;
    let a2 = gw.enqueue(TYPE_REPORT_FINISHED, report("A", 2)).await;
    let b1 = gw.enqueue(TYPE_REPORT_FINISHED, report("B", 1)).await;
    gw.wait_until("A1 uncertain", |o| {
        o.get(a1).unwrap().state == State::Uncertain
    })
    .await;
    gw.wait_until("B1 delivered", |o| {
        o.get(b1).unwrap().state == State::Delivered
    })
    .await;
    assert_eq!(gw.state(a2), State::Queued);
    assert_eq!(
        fake.received()
            .iter()
            .filter(|r| r.message_id == Some(a1))
            .count(),
        1,
        "never resent blindly"
    );

    gw.outbox
        .resolve_delivered(a1, "operator", Sending::InFlight)
        .await
        .unwrap();
    gw.wait_until("A2 delivered", |o| {
        o.get(a2).unwrap().state == State::Delivered
    })
    .await;
    assert_eq!(
        fake.received()
            .iter()
            .filter(|r| r.message_id == Some(a1))
            .count(),
        1
    );
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn dropped_connection_follows_the_resend_policy_of_its_type() {
    let fake = FakeD365::start().await;
    fake.script_order("A", [Reply::Drop]);
    fake.script_order("B", [Reply::Drop]);
    let gw = Gateway::start(&fake, &format!("{FAST}  on_ambiguous:\n    default: hold\n    per_type:\n      ProdProductionOrderStart: resend\n")).await;
    let held = gw.enqueue(TYPE_REPORT_FINISHED, report("A", 1)).await;
    let resent = gw
        .enqueue(TYPE_START, json!({"ProductionOrderNumber":"B"}))
        .await;
    gw.wait_until("held uncertain, resent delivered", |o| {
        o.get(held).unwrap().state == State::Uncertain
            && o.get(resent).unwrap().state == State::Delivered
    })
    .await;
    assert_eq!(
        fake.received()
            .iter()
            .filter(|r| r.message_id == Some(resent))
            .count(),
        2
    );
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_request_fails_at_once() {
    let fake = FakeD365::start().await;
    fake.script([Reply::Status(400)]);
    let gw = Gateway::start(&fake, FAST).await;
    let id = gw
        .enqueue(TYPE_START, json!({"ProductionOrderNumber":"P1"}))
        .await;
    gw.wait_until("failed", |o| o.get(id).unwrap().state == State::Failed)
        .await;
    assert_eq!(gw.record(id).attempt_count, 1);
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_token_fetch_serves_many_concurrent_requests() {
    let fake = FakeD365::start().await;
    // The token answer takes a while, so all eight lanes ask for a token before it comes.
    fake.delay_tokens(Duration::from_secs(1));
    let gw = Gateway::start(&fake, &format!("{FAST}  max_in_flight: 8\n")).await;
    for i in 0..8 {
        gw.enqueue(
            TYPE_START,
            json!({ "ProductionOrderNumber": format!("P{i}") }),
        )
        .await;
    }
    gw.wait_until("all delivered", |o| {
        o.counts().get(&State::Delivered) == Some(&8)
    })
    .await;
    assert_eq!(
        fake.token_requests().len(),
        1,
        "eight lanes waited for one token fetch"
    );
    let first = fake.received().iter().map(|r| r.at).min().unwrap();
    let last = fake.received().iter().map(|r| r.at).max().unwrap();
    assert!(
        last - first < Duration::from_secs(1),
        "the eight requests went out together, after the one fetch"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_redirect_is_never_followed_and_fails_with_its_location() {
    let fake = FakeD365::start().await;
    fake.script_order(
        "P1",
        [Reply::Redirect(format!("{}/login", fake.base_url()))],
    );
    let gw = Gateway::start(&fake, FAST).await;
    let id = gw
        .enqueue(TYPE_START, json!({"ProductionOrderNumber":"P1"}))
        .await;
    gw.wait_until("failed", |o| o.get(id).unwrap().state == State::Failed)
        .await;
    let r = gw.record(id);
    assert!(
        r.last_error.as_deref().unwrap().contains(&format!(
            "HTTP 302: redirected to {}/login",
            fake.base_url()
        )),
        "{:?}",
        r.last_error
    );
    assert_eq!(
        fake.received().len(),
        1,
        "the POST was not followed by a GET to the login page"
    );
    gw.stop().await;
}

#[tokio::test]
async fn lanes_are_served_round_robin_so_a_long_backlog_does_not_starve_an_order() {
    let fake = FakeD365::start().await;
    // Joining off (FAST): A's backlog would go out as one request (outbox join.rs).
    let gw = Gateway::start(&fake, &format!("{FAST}  max_in_flight: 1\n")).await;
    // One commit: A's backlog of 20, then B's and C's single messages.
    let mut batch: Vec<_> = (1..=20).map(|n| new_report("A", n)).collect();
    batch.push(new_report("B", 1));
    batch.push(new_report("C", 1));
    gw.outbox
        .commit(mes_gateway::outbox::Ingest::of(batch))
        .await
        .unwrap();
    fake.wait_until("all 22", |r| r.len() == 22).await;
    gw.stop().await;
    let orders: Vec<String> = fake.received().iter().map(|r| r.order.clone()).collect();
    assert_eq!(
        orders[..4],
        ["A", "B", "C", "A"],
        "B and C go out in the first round, not after A's backlog: {orders:?}"
    );
}

fn new_report(order: &str, n: u32) -> mes_gateway::outbox::NewMessage {
    mes_gateway::outbox::NewMessage {
        production_order: order.into(),
        message_type: TYPE_REPORT_FINISHED.into(),
        content: report(order, n).to_string(),
        origin: "test".into(),
        line: None,
    }
}

#[tokio::test]
async fn a_slow_token_endpoint_at_shutdown_leaves_messages_queued_not_uncertain() {
    let fake = FakeD365::start().await;
    fake.delay_tokens(Duration::from_secs(3600));
    let gw = Gateway::start(&fake, FAST).await;
    let id = gw
        .enqueue(TYPE_START, json!({"ProductionOrderNumber":"P1"}))
        .await;
    fake.wait_for_token_requests(1).await;
    let outbox = gw.outbox.clone();
    gw.stop().await;
    let r = outbox.get(id).unwrap();
    assert_eq!(
        (r.state, r.attempt_count),
        (State::Queued, 0),
        "never marked sending while waiting for the token"
    );
}

#[tokio::test]
async fn a_token_announced_to_live_for_ever_does_not_overflow_the_clock() {
    let fake = FakeD365::start().await;
    fake.token_lifetime(u64::MAX);
    let gw = Gateway::start(&fake, FAST).await;
    let id = gw
        .enqueue(TYPE_START, json!({"ProductionOrderNumber":"P1"}))
        .await;
    gw.wait_until("delivered", |o| {
        o.get(id).unwrap().state == State::Delivered
    })
    .await;
    let id2 = gw
        .enqueue(TYPE_START, json!({"ProductionOrderNumber":"P2"}))
        .await;
    gw.wait_until("delivered", |o| {
        o.get(id2).unwrap().state == State::Delivered
    })
    .await;
    assert_eq!(fake.token_requests().len(), 1, "the token is cached");
    gw.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_keeps_the_backoff_of_a_message_waiting_for_a_retry() {
    let fake = FakeD365::start().await;
    // A 500 belongs to the message (a 503 is D365's outage, shared by every lane).
    fake.script([Reply::Status(500)]);
    let gw = Gateway::start(&fake, "  backoff_initial: 1h\n  backoff_max: 1h\n").await;
    let id = gw
        .enqueue(TYPE_START, json!({"ProductionOrderNumber":"P1"}))
        .await;
    gw.wait_until("the 500 recorded", |o| {
        o.get(id).unwrap().attempt_count == 1
    })
    .await;
    let retry_at = gw.record(id).retry_at.expect("the retry time is on disk");

    let gw = gw.restart().await;
    let left = retry_at.duration_since(jiff::Timestamp::now());
    let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
    if left > Duration::from_millis(50) {
        tokio::time::sleep(left - Duration::from_millis(20)).await;
        assert_eq!(
            fake.received().len(),
            1,
            "restarted, the message waits for its backoff ({left:?}) instead of going at once"
        );
    }
    gw.wait_until("delivered after the backoff", |o| {
        o.get(id).unwrap().state == State::Delivered
    })
    .await;
    assert_eq!(gw.record(id).retry_at, None);
    gw.stop().await;
}

/// D365 down is D365's state, not each message's: after the first round fails, one
/// request at a time probes it (never two at the same instant), and the first answer
/// releases every order at once — the backlog goes out together, not each order after a
/// backoff of its own (which spread it over up to `backoff_max`).
#[tokio::test(start_paused = true)]
async fn an_outage_is_probed_one_request_at_a_time_and_its_end_releases_every_order() {
    const ORDERS: usize = 20;
    let fake = FakeD365::start().await;
    fake.unavailable(true);
    let gw = Gateway::start(&fake, FAST).await;
    for n in 0..ORDERS {
        gw.enqueue(TYPE_REPORT_FINISHED, report(&format!("P{n:03}"), 1))
            .await;
    }
    // The first round (one per order), then five probes.
    fake.wait_until("five probes after the first round", |r| {
        r.len() >= ORDERS + 5
    })
    .await;
    let probes: Vec<_> = fake.received()[ORDERS..].to_vec();
    assert!(probes.iter().all(|r| r.status == Some(503)));
    for pair in probes.windows(2) {
        assert!(
            pair[1].at > pair[0].at,
            "one probe at a time: {:?} and {:?} went out together",
            pair[0].message_id,
            pair[1].message_id
        );
    }

    fake.unavailable(false);
    gw.wait_until("every order delivered", |o| {
        o.counts().get(&State::Delivered) == Some(&ORDERS)
    })
    .await;
    let received = fake.received();
    let accepted: Vec<_> = received.iter().filter(|r| r.status == Some(200)).collect();
    assert_eq!(accepted.len(), ORDERS, "each message once");
    let first = accepted.first().unwrap().at;
    let last = accepted.last().unwrap().at;
    assert!(
        last.duration_since(first) < Duration::from_millis(100),
        "released at once: {:?} between the first and the last delivery",
        last.duration_since(first)
    );
    assert_eq!(
        received.iter().filter(|r| r.status == Some(503)).count(),
        received.len() - ORDERS,
        "no request failed after D365 came back"
    );
    gw.stop().await;
}

/// D365's request budget is shared by every order and never exceeded: 50 orders with 20
/// messages each against a D365 that enforces 100 requests per 10 s (and answers 429 past
/// it), with the gateway's budget set to that: every message delivered once, in order per
/// order, no 429, and never more than 100 requests in any 10 s.
#[tokio::test(start_paused = true)]
async fn the_request_budget_is_shared_by_every_order_and_never_exceeded() {
    const ORDERS: usize = 50;
    const EACH: u32 = 20;
    let per = Duration::from_secs(10);
    let fake = FakeD365::start().await;
    fake.limit(100, per);
    let gw = Gateway::start(
        &fake,
        &format!("  max_in_flight: 50\n  request_budget: 100/10s\n  backoff_initial: 1s\n  backoff_max: 10s\n{NOT_JOINED}"),
    )
    .await;
    for n in 1..=EACH {
        for o in 0..ORDERS {
            gw.enqueue(TYPE_REPORT_FINISHED, report(&format!("P{o:03}"), n))
                .await;
        }
    }
    gw.wait_until("every message delivered", |o| {
        o.counts().get(&State::Delivered) == Some(&(ORDERS * EACH as usize))
    })
    .await;
    let received = fake.received();
    assert!(
        received.iter().all(|r| r.status == Some(200)),
        "no request over D365's limit"
    );
    assert_eq!(received.len(), ORDERS * EACH as usize, "each message once");
    for (i, r) in received.iter().enumerate() {
        let in_window = received[i..]
            .iter()
            .take_while(|later| later.at.duration_since(r.at) < per)
            .count();
        assert!(in_window <= 100, "{in_window} requests within 10 s");
    }
    for o in 0..ORDERS {
        let order = format!("P{o:03}");
        let quantities: Vec<u64> = received
            .iter()
            .filter(|r| r.order == order)
            .map(|r| {
                r.content["ReportFinishedLines"][0]["ReportedGoodQuantity"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            quantities,
            (1..=u64::from(EACH)).collect::<Vec<_>>(),
            "order {order} in order"
        );
    }
    gw.stop().await;
}
