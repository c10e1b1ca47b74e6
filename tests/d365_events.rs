//! D365 business events through the gateway's webhook (issue 12, the webhook way in),
//! against the real binary: a "production order released" event in the `/Date(ms)/`
//! form with fields the gateway does not know sets line1's order and starts it in D365;
//! a status change in ISO 8601 ends it; a redelivered event (also after a restart) is
//! answered 200 and produces nothing; a caller without the secret gets 401, an
//! unreadable event 400.

mod support;

use serde_json::{json, Value};
use support::mqtt::free_port;
use support::process::{self, path_str, Output};
use support::{d365_yaml, write_config, FakeD365};

const SECRET: &str = "webhook-secret-0123456789";

fn released(event_id: &str) -> Value {
    json!({
        "BusinessEventId": "ProductionOrderReleasedBusinessEvent",
        "BusinessEventLegalEntity": "USMF",
        "ControlNumber": 5637144577u64,
        "EventId": event_id,
        "EventTime": "/Date(1764240678000)/",
        "MajorVersion": 0,
        "ProductionOrderNumber": "P000555",
        "ItemNumber": "A0007",
        "ProductionWarehouseId": "11",
        "SomethingD365AddedLater": { "nested": [1, 2] }
    })
}

async fn post(port: u16, secret: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/events/d365/d365"))
        .json(body);
    if let Some(s) = secret {
        request = request.header("X-Webhook-Secret", s);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or_default(),
    )
}

async fn get(port: u16, path: &str) -> Value {
    reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Messages in the outbox, all states.
async fn outbox_total(port: u16) -> u64 {
    let status = get(port, "/api/v1/status").await;
    status["outbox"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum()
}

fn types_for(fake: &FakeD365, order: &str) -> Vec<String> {
    fake.accepted()
        .iter()
        .filter(|r| r.order == order)
        .map(|r| r.envelope["_messageType"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_events_drive_the_line_once_each_and_redeliveries_change_nothing() {
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    write_config(
        dir,
        &format!(
            "{}storage:\n  data_dir: data\nsources:\n  - type: d365_events\n    id: d365\n    webhook_secret_file: webhook-secret\napi:\n  listen: 127.0.0.1:{api_port}\n",
            d365_yaml(&fake)
        ),
    );
    std::fs::write(dir.join("webhook-secret"), SECRET).unwrap();
    std::fs::create_dir_all(dir.join("rules.d")).unwrap();
    std::fs::write(
        dir.join("rules.d/orders.yaml"),
        "rules:\n  - name: released\n    line: line1\n    when: { source: d365, point: released }\n    set_context: { order: \"{payload.ProductionOrderNumber}\", item: \"{payload.ItemNumber}\" }\n    emit:\n      type: ProdProductionOrderStart\n      fields: { ProductionOrderNumber: \"{payload.ProductionOrderNumber}\" }\n  - name: ended\n    line: line1\n    when: { source: d365, point: status_changed, field: ProductionOrderStatus, equals: Ended }\n    clear_context: true\n    emit:\n      type: ProdProductionOrderEnd\n      fields: { ProductionOrderNumber: \"{payload.ProductionOrderNumber}\" }\n",
    )
    .unwrap();
    let cfg = path_str(dir).to_string();
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Gateway running.").await;

    // The release: durable when answered; the line runs the order; D365 gets its start.
    let (status, answer) = post(api_port, Some(SECRET), &released("E-1")).await;
    assert_eq!((status, answer), (200, json!({ "status": "stored" })));
    let lines = get(api_port, "/api/v1/lines").await;
    assert_eq!(lines["lines"]["line1"]["order"], "P000555");
    assert_eq!(lines["lines"]["line1"]["item"], "A0007");
    fake.wait_until("the start", |r| r.iter().any(|r| r.order == "P000555"))
        .await;

    // D365 delivers at least once: the same event again changes nothing.
    let (status, _) = post(api_port, Some(SECRET), &released("E-1")).await;
    assert_eq!(status, 200);
    assert_eq!(
        outbox_total(api_port).await,
        1,
        "one message for one release"
    );

    // Callers without the secret, and events the gateway cannot read.
    for secret in [None, Some("not-the-secret-0123456789")] {
        let (status, answer) = post(api_port, secret, &released("E-9")).await;
        assert_eq!(status, 401, "{answer}");
    }
    let (status, answer) = post(api_port, Some(SECRET), &json!({ "BusinessEventId": "ProductionOrderReleasedBusinessEvent", "ProductionOrderNumber": "P1" })).await;
    assert_eq!(status, 400);
    assert_eq!(
        answer["error"],
        "no `EventId` or `ControlNumber`: a redelivery could not be recognised"
    );
    let (status, _) = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api_port}/events/d365/elsewhere"))
        .header("X-Webhook-Secret", SECRET)
        .body("{}")
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 404);

    // The status change, with an ISO 8601 time and only a ControlNumber: the order ends.
    let ended = json!({
        "BusinessEventId": "ProductionOrderStatusChangedBusinessEvent",
        "ControlNumber": 5637144600u64,
        "EventTime": "2026-12-01T10:00:00Z",
        "ProductionOrderNumber": "P000555",
        "ProductionOrderStatus": "Ended"
    });
    let (status, _) = post(api_port, Some(SECRET), &ended).await;
    assert_eq!(status, 200);
    assert!(get(api_port, "/api/v1/lines").await["lines"]["line1"].is_null());
    fake.wait_until("the end", |r| {
        r.iter().filter(|r| r.order == "P000555").count() == 2
    })
    .await;
    assert_eq!(gw.terminate().await, 0);

    // After a restart the event ids are still known: redeliveries produce nothing.
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for_count("Gateway running.", 2).await;
    for event in [released("E-1"), ended] {
        let (status, _) = post(api_port, Some(SECRET), &event).await;
        assert_eq!(status, 200);
    }
    assert!(
        get(api_port, "/api/v1/lines").await["lines"]["line1"].is_null(),
        "the old release did not set the line again"
    );
    assert_eq!(
        outbox_total(api_port).await,
        2,
        "nothing new after the redeliveries"
    );
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(
        types_for(&fake, "P000555"),
        ["ProdProductionOrderStart", "ProdProductionOrderEnd"],
        "once each, in order"
    );
    let metrics_line = out.text();
    assert!(
        !metrics_line.contains(SECRET),
        "the secret never reaches the log"
    );
}

/// Load and a crash: 500 releases posted (each twice, as D365's at-least-once delivery
/// may) during a 10,000-impulse QoS 1 burst from MQTT, the gateway killed with SIGKILL
/// half-way and started again, and then every release posted once more (D365 sends again
/// what was not answered, and may send again what was). Every release produces exactly
/// one Start; every impulse one report, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_events_and_redeliveries_with_a_kill_in_the_middle_is_stored_once_each() {
    use support::mqtt::{
        burst_orders, count_burst, publish_burst, write_burst_config, Mosquitto, EXACT,
    };
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    write_burst_config(
        dir,
        &fake,
        &broker.url(),
        &format!("  - type: d365_events\n    id: d365\n    webhook_secret_file: webhook-secret\napi:\n  listen: 127.0.0.1:{api_port}\n"),
    );
    std::fs::write(dir.join("webhook-secret"), SECRET).unwrap();
    std::fs::write(
        dir.join("rules.d/orders.yaml"),
        "rules:\n  - name: released\n    line: \"{payload.ProductionOrderNumber}\"\n    when: { source: d365, point: released }\n    emit:\n      type: ProdProductionOrderStart\n      fields: { ProductionOrderNumber: \"{payload.ProductionOrderNumber}\" }\n",
    )
    .unwrap();
    let cfg = path_str(dir).to_string();
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Subscribed.").await;
    out.wait_for("Gateway running.").await;

    // D365 posts several events at a time, not hundreds: 32 requests in flight. Returns
    // how many were answered 200 (a request the kill cuts off is not, and is sent again).
    let post_all = |copies: usize| async move {
        let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut posts = tokio::task::JoinSet::new();
        for _ in 0..copies {
            for n in 0..500 {
                let in_flight = in_flight.clone();
                posts.spawn(async move {
                    let _slot = in_flight.acquire().await.unwrap();
                    let mut event = released(&format!("E-{n}"));
                    event["ProductionOrderNumber"] = format!("R{n:04}").into();
                    let sent = reqwest::Client::new()
                        .post(format!("http://127.0.0.1:{api_port}/events/d365/d365"))
                        .header("X-Webhook-Secret", SECRET)
                        .json(&event)
                        .send()
                        .await;
                    sent.is_ok_and(|r| r.status() == 200)
                });
            }
        }
        let mut stored = 0;
        while let Some(ok) = posts.join_next().await {
            stored += usize::from(ok.unwrap());
        }
        stored
    };
    let burst = tokio::spawn(async move {
        publish_burst(broker.port, &burst_orders(), 1, 200).await;
        broker
    });
    let first_round = tokio::spawn(post_all(2));
    // Half-way through the releases (the kill is the fault injected; this waits on it).
    fake.wait_until("half the releases", |r| {
        r.iter().filter(|r| r.order.starts_with('R')).count() >= 250
    })
    .await;
    gw.kill9().await;
    let answered = first_round.await.unwrap();
    assert!(
        answered < 1000,
        "the kill cut some requests off ({answered} answered)"
    );
    support::settle_interrupted(&fake, dir).await;
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for_count("Gateway running.", 2).await;
    assert_eq!(
        post_all(1).await,
        500,
        "every release answered after the restart"
    );
    let _broker = burst.await.unwrap();
    fake.wait_accepted_count(burst_orders().len() * 200 + 500)
        .await;
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(count_burst(&fake, 200), EXACT);
    let starts: Vec<String> = fake
        .accepted()
        .into_iter()
        .filter(|r| r.order.starts_with('R'))
        .map(|r| r.order)
        .collect();
    let distinct: std::collections::BTreeSet<&String> = starts.iter().collect();
    assert_eq!(
        (starts.len(), distinct.len()),
        (500, 500),
        "one Start per release"
    );
}
