//! D365 business events pulled from Azure Service Bus (issue 12, the usual way in), against
//! the real binary and a fake Service Bus REST endpoint on 127.0.0.1:0: peek-lock and
//! completion only once the event is durable, a lost lock and its redelivery, a poison
//! event given up after its deliveries, kill -9 between storing and completing, and
//! credentials Service Bus refuses.

use mes_gateway_testkit as support;

use std::time::Duration;

use serde_json::{json, Value};
use support::process::{self, path_str, Output};
use support::service_bus::FakeServiceBus;
use support::{d365_yaml, write_config, FakeD365};

fn released(event_id: &str, order: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "BusinessEventId": "ProductionOrderReleasedBusinessEvent",
        "ControlNumber": 5637144577u64,
        "EventId": event_id,
        "EventTime": "/Date(1764240678000)/",
        "ProductionOrderNumber": order,
        "ItemNumber": "A0007",
        "SomethingNew": [1, 2]
    }))
    .unwrap()
}

const RULES: &str = "rules:\n  - name: released\n    line: line1\n    when: { source: d365, point: released }\n    set_context: { order: \"{payload.ProductionOrderNumber}\", item: \"{payload.ItemNumber}\" }\n    emit:\n      type: ProdProductionOrderStart\n      fields: { ProductionOrderNumber: \"{payload.ProductionOrderNumber}\" }\n";

fn setup(
    fake: &FakeD365,
    bus: &FakeServiceBus,
    dir: &std::path::Path,
    max_deliveries: u32,
) -> String {
    write_config(
        dir,
        &format!(
            "{}storage:\n  data_dir: data\nsources:\n{}",
            d365_yaml(fake),
            bus.source_yaml(dir, "d365", max_deliveries)
        ),
    );
    std::fs::create_dir_all(dir.join("rules.d")).unwrap();
    std::fs::write(dir.join("rules.d/orders.yaml"), RULES).unwrap();
    path_str(dir).to_string()
}

fn starts(fake: &FakeD365, order: &str) -> usize {
    fake.accepted()
        .iter()
        .filter(|r| r.order == order && r.envelope["_messageType"] == "ProdProductionOrderStart")
        .count()
}

fn completed(bus: &FakeServiceBus, id: &str) -> Option<u32> {
    bus.completed()
        .into_iter()
        .find(|(m, _)| m == id)
        .map(|(_, n)| n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_completed_once_durable_applied_once_and_poison_is_given_up() {
    let fake = FakeD365::start().await;
    let bus = FakeServiceBus::start(Duration::from_secs(1), 3).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(&fake, &bus, tmp.path(), 3);
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Service Bus reachable; receiving events.")
        .await;

    // A release: applied, then completed.
    bus.send("m1", &released("E-1", "P000555"));
    bus.wait_until("m1 completed", |b| completed(b, "m1").is_some())
        .await;
    fake.wait_until("the start", |_| starts(&fake, "P000555") == 1)
        .await;
    let (code, lines, err) = process::run(&["lines", "-c", &cfg]).await;
    assert_eq!(code, 0, "{err}");
    assert!(lines.contains("line1: order P000555"), "{lines}");

    // D365 delivers at least once: the same event in another message produces nothing.
    bus.send("m2", &released("E-1", "P000555"));
    bus.wait_until("m2 completed", |b| completed(b, "m2").is_some())
        .await;

    // The lock expires before the completion arrives (410 Gone): the event comes again,
    // is recognised, and completed.
    bus.lose_locks(1);
    bus.send("m3", &released("E-3", "P000556"));
    bus.wait_until("m3 completed", |b| completed(b, "m3").is_some())
        .await;
    assert_eq!(
        completed(&bus, "m3"),
        Some(2),
        "delivered twice: the lock expired once"
    );
    fake.wait_until("P000556's start", |_| starts(&fake, "P000556") == 1)
        .await;

    // Poison: unreadable each time it comes; after 3 deliveries Service Bus dead-letters it.
    bus.send("m4", b"this is not a business event");
    bus.wait_until("m4 dead-lettered", |b| {
        b.dead_letter().iter().any(|(m, _)| m == "m4")
    })
    .await;
    assert_eq!(bus.dead_letter(), [("m4".to_string(), 3)]);
    out.wait_for("Poison D365 event given up").await;
    assert!(
        out.text()
            .lines()
            .any(|l| l.contains("Poison D365 event given up") && l.contains("m4")),
        "logged with its message id"
    );

    // A release after the poison one still goes through.
    bus.send("m5", &released("E-5", "P000557"));
    bus.wait_until("m5 completed", |b| completed(b, "m5").is_some())
        .await;
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(starts(&fake, "P000555"), 1, "one start for E-1, sent twice");
    assert_eq!(
        starts(&fake, "P000556"),
        1,
        "one start for E-3, delivered twice"
    );
    assert_eq!(starts(&fake, "P000557"), 1);
    assert!(bus.in_queue().is_empty(), "{:?}", bus.in_queue());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_storing_and_completing_redelivers_the_event_and_it_is_applied_once() {
    let fake = FakeD365::start().await;
    let bus = FakeServiceBus::start(Duration::from_secs(1), 10).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(&fake, &bus, tmp.path(), 10);
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Service Bus reachable; receiving events.")
        .await;

    // The completion never gets an answer: the event is stored (the gateway completes only
    // then) and the gateway dies before Service Bus hears of it.
    bus.hang_completes(true);
    bus.send("m1", &released("E-1", "P000555"));
    bus.wait_until("m1's completion sent", |b| {
        b.complete_requests().contains(&"m1".to_string())
    })
    .await;
    // Delivered to D365 first, so the kill leaves no request on the wire (that case,
    // `uncertain`, is the outbox's and tested elsewhere).
    fake.wait_until("the start", |_| starts(&fake, "P000555") == 1)
        .await;
    gw.kill9().await;
    bus.hang_completes(false);

    let gw = process::start(&["run", "-c", &cfg], &out);
    bus.wait_until("m1 completed after the restart", |b| {
        completed(b, "m1").is_some()
    })
    .await;
    assert_eq!(
        completed(&bus, "m1"),
        Some(2),
        "delivered again after the kill"
    );
    fake.wait_until("the start", |_| starts(&fake, "P000555") >= 1)
        .await;
    let status: Value = {
        let (code, text, err) = process::run(&["status", "--json", "-c", &cfg]).await;
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&text).unwrap()
    };
    let total: u64 = status["outbox"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(total, 1, "one message for the event: {status}");
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(starts(&fake, "P000555"), 1, "applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_service_bus_refuses_show_the_source_down_with_the_reason() {
    let fake = FakeD365::start().await;
    let bus = FakeServiceBus::start(Duration::from_secs(1), 10).await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(&fake, &bus, tmp.path(), 10);
    std::fs::write(tmp.path().join("servicebus-key"), "not-the-key").unwrap();
    bus.send("m1", &released("E-1", "P000555"));
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    bus.wait_until("a refused receive", |b| b.refused() > 0)
        .await;
    out.wait_for("Cannot receive D365 events from Service Bus")
        .await;
    let (code, text, err) = process::run(&["status", "-c", &cfg]).await;
    assert_eq!(code, 0, "{err}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("d365"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("DOWN") && line.contains("refuses the credentials"),
        "{text}"
    );
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(bus.in_queue(), [("m1".to_string(), 0)], "nothing taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_shared_key_the_gateway_uses_an_entra_token_for_service_bus() {
    let fake = FakeD365::start().await;
    let bus = FakeServiceBus::start(Duration::from_secs(1), 10).await;
    let tmp = tempfile::tempdir().unwrap();
    write_config(
        tmp.path(),
        &format!(
            "{}storage:\n  data_dir: data\nsources:\n{}",
            d365_yaml(&fake),
            bus.entra_source_yaml("d365")
        ),
    );
    std::fs::create_dir_all(tmp.path().join("rules.d")).unwrap();
    std::fs::write(tmp.path().join("rules.d/orders.yaml"), RULES).unwrap();
    let cfg = path_str(tmp.path()).to_string();
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    bus.send("m1", &released("E-1", "P000555"));
    bus.wait_until("m1 completed", |b| completed(b, "m1").is_some())
        .await;
    assert_eq!(gw.terminate().await, 0);
    let scopes: Vec<String> = fake
        .token_requests()
        .iter()
        .filter_map(|r| r.get("scope").cloned())
        .collect();
    assert!(
        scopes.contains(&"https://servicebus.azure.net/.default".to_string()),
        "{scopes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_subscription_is_read_like_a_queue() {
    let fake = FakeD365::start().await;
    let bus = FakeServiceBus::start_entity(
        Duration::from_secs(1),
        10,
        "mes-events/subscriptions/gateway",
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(&fake, &bus, tmp.path(), 10);
    let gw_yaml = std::fs::read_to_string(tmp.path().join("gateway.yaml")).unwrap();
    assert!(
        gw_yaml.contains("topic: mes-events\n") && gw_yaml.contains("subscription: gateway\n"),
        "{gw_yaml}"
    );
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    bus.send("m1", &released("E-1", "P000555"));
    bus.wait_until("m1 completed", |b| completed(b, "m1").is_some())
        .await;
    fake.wait_until("the start", |_| starts(&fake, "P000555") == 1)
        .await;
    assert_eq!(gw.terminate().await, 0);
}
