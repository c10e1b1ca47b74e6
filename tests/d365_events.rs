//! D365 business events through the gateway's webhook (issue 12, the webhook way in),
//! against the real binary: a "production order released" event in the `/Date(ms)/`
//! form with fields the gateway does not know sets line1's order and starts it in D365;
//! a status change in ISO 8601 ends it; a redelivered event (also after a restart) is
//! answered 200 and produces nothing; a caller without the secret gets 401, an
//! unreadable event 400.

use mes_gateway_testkit as support;

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

/// The burst configuration (an MQTT source, one ReportFinished per impulse) with D365's
/// events arriving on the webhook of a `d365_events` source `d365` on `api_port`.
fn burst_with_webhook(
    dir: &std::path::Path,
    fake: &FakeD365,
    broker: &support::mqtt::Mosquitto,
    api_port: u16,
) {
    support::mqtt::write_burst_config(
        dir,
        fake,
        &broker.url(),
        &format!("  - type: d365_events\n    id: d365\n    webhook_secret_file: webhook-secret\napi:\n  listen: 127.0.0.1:{api_port}\n"),
    );
    std::fs::write(dir.join("webhook-secret"), SECRET).unwrap();
}

/// The API token [`events_gateway`] writes.
const API_TOKEN: &str = "api-token-0123456789abcdef";

/// A configuration with a `d365_events` source `d365` (webhook secret [`SECRET`]), the API
/// on `api_port` (token [`API_TOKEN`]), `d365` (the fake's section, maybe changed), a
/// `dispatcher` section's lines (or nothing) and alerts to `alerts_url` when given.
fn events_gateway(
    dir: &std::path::Path,
    d365: &str,
    dispatcher: &str,
    api_port: u16,
    alerts_url: Option<&str>,
) {
    let dispatcher = if dispatcher.is_empty() {
        String::new()
    } else {
        format!("dispatcher:\n{dispatcher}")
    };
    let alerts = alerts_url.map_or(String::new(), |url| {
        format!("alerts:\n  check_interval: 200ms\n  webhook:\n    url: {url}\n")
    });
    write_config(
        dir,
        &format!(
            "{d365}storage:\n  data_dir: data\n{dispatcher}sources:\n  - type: d365_events\n    id: d365\n    webhook_secret_file: webhook-secret\napi:\n  listen: 127.0.0.1:{api_port}\n  token_file: api-token\n{alerts}"
        ),
    );
    std::fs::write(dir.join("webhook-secret"), SECRET).unwrap();
    std::fs::write(dir.join("api-token"), API_TOKEN).unwrap();
}

/// Queues a ReportFinished of `quantity` for `order` through the API; its message id.
async fn queue_report(http: &reqwest::Client, api_port: u16, order: &str, quantity: u32) -> u64 {
    let answer: Value = http
        .post(format!(
            "http://127.0.0.1:{api_port}/api/v1/messages?type=ProdProductionOrderReportFinished"
        ))
        .bearer_auth(API_TOKEN)
        .json(&support::report(order, quantity))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("queued: {answer}"))
}

/// Posts one event to the gateway's webhook; whether it was taken (200).
async fn post_event(http: &reqwest::Client, port: u16, event: &Value) -> bool {
    http.post(format!("http://127.0.0.1:{port}/events/d365/d365"))
        .header("X-Webhook-Secret", SECRET)
        .json(event)
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

/// Posts `events` to the webhook 32 at a time (D365 posts several at once, not hundreds)
/// with one client (as D365 keeps its connections); how many were answered 200 (a request
/// a kill cuts off is not).
async fn post_events(http: reqwest::Client, port: u16, events: Vec<Value>) -> usize {
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut posts = tokio::task::JoinSet::new();
    for event in events {
        let (in_flight, http) = (in_flight.clone(), http.clone());
        posts.spawn(async move {
            let _slot = in_flight.acquire().await.unwrap();
            post_event(&http, port, &event).await
        });
    }
    let mut stored = 0;
    while let Some(ok) = posts.join_next().await {
        stored += usize::from(ok.unwrap());
    }
    stored
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
    use support::mqtt::{burst_orders, count_burst, publish_burst, Mosquitto, EXACT};
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    burst_with_webhook(dir, &fake, &broker, api_port);
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

    // Every release, `copies` times; a request the kill cuts off is sent again later.
    let http = reqwest::Client::new();
    let post_all = |copies: usize| {
        let events: Vec<Value> = (0..copies)
            .flat_map(|_| 0..500)
            .map(|n| {
                let mut event = released(&format!("E-{n}"));
                event["ProductionOrderNumber"] = format!("R{n:04}").into();
                event
            })
            .collect();
        post_events(http.clone(), api_port, events)
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

/// A "message processed" event as D365 sends it for one message the gateway posted.
fn processed(event_id: &str, sent: &support::Received, state: &str, infolog: &str) -> Value {
    json!({
        "BusinessEventId": "SysMessageProcessorMessageProcessedBusinessEvent",
        "ControlNumber": 5637150001u64,
        "EventId": event_id,
        "EventTime": "2026-12-02T04:00:00Z",
        "MajorVersion": 0,
        "MinorVersion": 0,
        "MessageQueue": "JmgMES3P",
        "MessageQueueLabel": "MES integration",
        "MessageType": sent.envelope["_messageType"],
        "MessageTypeLabel": "Report as finished",
        "MessageContent": sent.envelope["_messageContent"],
        "MessageState": state,
        "MessageStateLabel": state,
        "MessageProcessingResult": if state == "Failed" { "Failed" } else { "Success" },
        "MessageInfolog": infolog,
        "MessageProcessorMessagePageUrl": "https://d365.example/?mi=SysMessageProcessorMessage",
        "MessageSourceCompanyId": "USMF"
    })
}

/// Reconciliation (issue 12, part 4): a message D365 accepted and then failed in its
/// batch job shows "failed in D365" with the infolog, in the API, the status and an alert;
/// an `uncertain` message (the answer was lost) is resolved by the event that shows D365
/// received it, and its order's next message goes out; an event about no message of the
/// gateway is counted and kept; a reformatted content still matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d365_verdicts_show_on_their_messages_raise_the_alert_and_resolve_uncertain_ones() {
    let fake = FakeD365::start().await;
    // Order P-LOST: the first request is read, then the connection drops (no answer).
    fake.script_order("P-LOST", [support::Reply::Drop]);
    let webhook = support::alerts::Webhook::start(0).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    events_gateway(dir, &d365_yaml(&fake), "", api_port, Some(&webhook.url));
    let cfg = path_str(dir).to_string();
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Gateway running.").await;
    let http = reqwest::Client::new();
    let send = |order: &'static str, quantity: u32| queue_report(&http, api_port, order, quantity);

    // Accepted by D365 (HTTP 200), then failed in its batch job.
    let failing = send("P-BAD", 3).await;
    fake.wait_until("P-BAD sent", |r| r.iter().any(|r| r.order == "P-BAD"))
        .await;
    let sent = fake
        .accepted()
        .into_iter()
        .find(|r| r.order == "P-BAD")
        .unwrap();
    let infolog = "Production order P-BAD is not started. Update has been canceled.";
    let (status, _) = post(
        api_port,
        Some(SECRET),
        &processed("V-1", &sent, "Failed", infolog),
    )
    .await;
    assert_eq!(status, 200);
    let record = get(api_port, &format!("/api/v1/messages/{failing}")).await;
    assert_eq!(record["d365"]["failed"], true, "{record}");
    assert_eq!(record["d365"]["state"], "Failed");
    assert_eq!(record["d365"]["infolog"], infolog);
    let alert = webhook
        .received
        .wait_for(&format!("message/{failing}/d365"), "firing")
        .await;
    assert_eq!(alert["kind"], "message_failed");
    assert!(alert["text"].as_str().unwrap().contains(infolog), "{alert}");
    let status = get(api_port, "/api/v1/status").await;
    assert_eq!(status["d365_verdicts"]["failed_in_d365"], 1, "{status}");

    // Reprocessed in D365 after the fix: the alert clears.
    let (status, _) = post(
        api_port,
        Some(SECRET),
        &processed("V-2", &sent, "Processed", ""),
    )
    .await;
    assert_eq!(status, 200);
    webhook
        .received
        .wait_for(&format!("message/{failing}/d365"), "cleared")
        .await;
    assert_eq!(
        get(api_port, &format!("/api/v1/messages/{failing}")).await["d365"]["state"],
        "Processed"
    );

    // The answer is lost: uncertain, holding P-LOST's next message.
    let lost = send("P-LOST", 1).await;
    let next = send("P-LOST", 2).await;
    fake.wait_until("P-LOST's first request", |r| {
        r.iter().any(|r| r.order == "P-LOST")
    })
    .await;
    let sent = fake
        .received()
        .into_iter()
        .find(|r| r.message_id == Some(lost))
        .unwrap();
    // D365 reformats nothing in practice; reformatted JSON matches all the same.
    let mut reformatted = sent.clone();
    reformatted.envelope["_messageContent"] =
        serde_json::to_string_pretty(&sent.content).unwrap().into();
    let (status, _) = post(
        api_port,
        Some(SECRET),
        &processed("V-3", &reformatted, "Processed", ""),
    )
    .await;
    assert_eq!(status, 200);
    // Whether the event or the lost answer came first, the message is delivered and the
    // order's next message goes out once.
    fake.wait_until("P-LOST's next message", |r| {
        r.iter()
            .any(|r| r.message_id == Some(next) && r.status == Some(200))
    })
    .await;
    let record = get(api_port, &format!("/api/v1/messages/{lost}")).await;
    assert_eq!(record["state"], "delivered", "{record}");
    assert_eq!(record["d365"]["state"], "Processed");
    let history = record["history"].as_array().unwrap();
    assert!(
        history.iter().any(|c| c["action"]
            .as_str()
            .is_some_and(|a| a.contains("D365") && a.contains("received"))),
        "{record}"
    );
    assert_eq!(
        fake.received()
            .iter()
            .filter(|r| r.message_id == Some(lost))
            .count(),
        1,
        "resolved, never sent again"
    );

    // An event about a message the gateway never sent: counted and kept.
    let mut stranger = sent.clone();
    stranger.envelope["_messageContent"] = "{\"ProductionOrderNumber\":\"P-OTHER\"}".into();
    let (status, _) = post(
        api_port,
        Some(SECRET),
        &processed("V-4", &stranger, "Processed", ""),
    )
    .await;
    assert_eq!(status, 200);
    let kept = get(api_port, "/api/v1/d365/unmatched").await;
    assert_eq!(kept["total"], 1, "{kept}");
    assert_eq!(kept["events"][0]["event_id"], "V-4");
    assert_eq!(
        kept["events"][0]["payload"]["MessageContent"],
        "{\"ProductionOrderNumber\":\"P-OTHER\"}"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{api_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "mes_gateway_d365_verdicts_total{verdict=\"failed\"} 1",
        "mes_gateway_d365_verdicts_total{verdict=\"processed\"} 2",
        "mes_gateway_d365_verdicts_total{verdict=\"unmatched\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // The CLI shows the same, through the socket.
    let (code, cli, err) = process::run(&["outbox", "-c", &cfg, "unmatched"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(cli.contains("V-4"), "{cli}");
    assert_eq!(gw.terminate().await, 0);
}

/// The plant learns its orders from D365 (issue 12, part 3), with a real mosquitto: a
/// "production order released" event adds the order to line1's released list, sets
/// line1's order and publishes it (retained, QoS 1) for the HMI; impulses on line1 then
/// report against that order; a status change withdraws it from the list. The list is in
/// `status`, the API and the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_sets_the_line_publishes_it_to_mqtt_and_impulses_report_against_it() {
    let broker = support::mqtt::Mosquitto::start().await;
    let hmi = support::alerts::subscribe(broker.port, "hmi/#").await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    write_config(
        dir,
        &format!(
            "{}storage:\n  data_dir: data\nsources:\n  - type: mqtt\n    id: plant\n    url: {}\n    client_id: gw-release-test\n    subscriptions:\n      - topic: line1/count\n  - type: d365_events\n    id: d365\n    webhook_secret_file: webhook-secret\napi:\n  listen: 127.0.0.1:{api_port}\n",
            d365_yaml(&fake),
            broker.url()
        ),
    );
    std::fs::write(dir.join("webhook-secret"), SECRET).unwrap();
    std::fs::create_dir_all(dir.join("rules.d")).unwrap();
    std::fs::write(
        dir.join("rules.d/orders.yaml"),
        r#"rules:
  - name: released
    line: line1
    when: { source: d365, point: released }
    release: { order: "{payload.ProductionOrderNumber}", item: "{payload.ItemNumber}" }
    set_context: { order: "{payload.ProductionOrderNumber}", item: "{payload.ItemNumber}" }
    publish:
      via: plant
      topic: "hmi/{line}/order"
      payload: { order: "{context.order}", item: "{context.item}", warehouse: "{payload.ProductionWarehouseId}" }
      retain: true
  - name: ended
    line: line1
    when: { source: d365, point: status_changed, field: ProductionOrderStatus, equals: Ended }
    withdraw: "{payload.ProductionOrderNumber}"
  - name: count
    line: line1
    when: { source: plant, topic: line1/count }
    count: impulse
    emit:
      type: ProdProductionOrderReportFinished
      fields: { ProductionOrderNumber: "{context.order}", ItemNumber: "{context.item}", ReportedGoodQuantity: "{quantity}" }
"#,
    )
    .unwrap();
    let cfg = path_str(dir).to_string();
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Subscribed.").await;
    out.wait_for("Publisher connected to the MQTT broker.")
        .await;

    let (status, _) = post(api_port, Some(SECRET), &released("E-1")).await;
    assert_eq!(status, 200);
    let on_hmi = hmi.wait_for_topic("hmi/line1/order").await;
    assert_eq!(on_hmi["order"], "P000555");
    assert_eq!(on_hmi["item"], "A0007");
    assert_eq!(on_hmi["warehouse"], "11");
    assert_eq!(on_hmi["retained"], false, "live delivery to a subscriber");
    // Retained: an HMI that connects later learns the order too.
    let late = support::alerts::subscribe(broker.port, "hmi/line1/order").await;
    assert_eq!(
        late.wait_for_topic("hmi/line1/order").await["retained"],
        true
    );

    let lines = get(api_port, "/api/v1/lines").await;
    assert_eq!(lines["lines"]["line1"]["order"], "P000555");
    assert_eq!(lines["released"]["line1"][0]["order"], "P000555", "{lines}");
    assert_eq!(
        get(api_port, "/api/v1/status").await["released"]["line1"][0]["item"],
        "A0007"
    );

    // Impulses on line1 report against the released order.
    support::mqtt::publish(
        broker.port,
        &[
            ("line1/count", b"1"),
            ("line1/count", b"1"),
            ("line1/count", b"1"),
        ],
    )
    .await;
    // Three reports, in one request or several (joined, outbox join.rs).
    fake.wait_until("three reports", |r| support::pieces(r, "P000555") == 3)
        .await;
    assert_eq!(support::pieces(&fake.accepted(), "P000555"), 3);

    // The status change withdraws it from the list; a redelivered release changes nothing.
    let ended = json!({
        "BusinessEventId": "ProductionOrderStatusChangedBusinessEvent",
        "EventId": "E-2",
        "EventTime": "2026-12-02T05:00:00Z",
        "ProductionOrderNumber": "P000555",
        "ProductionOrderStatus": "Ended"
    });
    assert_eq!(post(api_port, Some(SECRET), &ended).await.0, 200);
    assert_eq!(post(api_port, Some(SECRET), &released("E-1")).await.0, 200);
    let lines = get(api_port, "/api/v1/lines").await;
    assert!(lines["released"]["line1"].is_null(), "{lines}");
    let (code, cli, err) = process::run(&["lines", "-c", &cfg]).await;
    assert_eq!(code, 0, "{err}");
    assert!(cli.contains("line1: order P000555"), "{cli}");
    // A line no rule reads (a typo) is refused, naming the lines the rules read; the
    // line's order stays.
    let (code, cli, err) =
        process::run(&["lines", "-c", &cfg, "set", "lin1", "--order", "P000556"]).await;
    assert_ne!(code, 0, "{cli}");
    assert!(
        err.contains(
            "no rule reads line \"lin1\": an order set there would never be reported (the rules read these lines: line1)"
        ),
        "{err}"
    );
    let (_, cli, _) = process::run(&["lines", "-c", &cfg]).await;
    assert!(
        cli.contains("line1: order P000555") && !cli.contains("lin1:"),
        "{cli}"
    );
    assert_eq!(
        hmi.all()
            .iter()
            .filter(|n| n["topic"] == "hmi/line1/order")
            .count(),
        1,
        "published once: the redelivered release built nothing"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{api_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("mes_gateway_mqtt_published_total{via=\"plant\"} 1"),
        "{metrics}"
    );
    assert_eq!(gw.terminate().await, 0);
}

/// Load and a crash on the verdict path: a 5,000-impulse QoS 1 burst over 50 orders is
/// delivered, then D365's 5,000 "message processed" events are posted (each twice, 32 at
/// a time) and the gateway is killed with SIGKILL half-way, started again, and every
/// event posted once more. Each message ends with exactly one verdict recorded and none
/// is unmatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_verdicts_with_redeliveries_and_a_kill_records_each_once() {
    use support::mqtt::{burst_orders, publish_burst, Mosquitto};
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    burst_with_webhook(dir, &fake, &broker, api_port);
    // One request, hence one event, per message: the flood is 5,000 events.
    support::mqtt::join_at_most(dir, 1);
    let cfg = path_str(dir).to_string();
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Subscribed.").await;
    let orders = burst_orders();
    publish_burst(broker.port, &orders, 1, 100).await;
    let total = orders.len() * 100;
    fake.wait_accepted_count(total).await;
    // What D365 received, in the order it received it (it processes each order's
    // messages in that order).
    let accepted = std::sync::Arc::new(fake.accepted());
    // One event per request: a joined request's event settles every message it carried.
    let requests = accepted.len();
    assert_eq!(accepted.iter().map(|r| r.ids().len()).sum::<usize>(), total);

    let http = reqwest::Client::new();
    let post_all = |copies: usize| {
        let events: Vec<Value> = (0..copies)
            .flat_map(|_| accepted.iter().enumerate())
            .map(|(n, sent)| processed(&format!("V-{n}"), sent, "Processed", ""))
            .collect();
        post_events(http.clone(), api_port, events)
    };
    let first_round = tokio::spawn(post_all(2));
    // Half-way through (the kill is the fault injected; this waits on the log for it).
    out.wait_for_count("D365 business event received.", requests / 2)
        .await;
    gw.kill9().await;
    let answered = first_round.await.unwrap();
    assert!(
        answered < 2 * requests,
        "the kill cut some requests off ({answered} answered)"
    );
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for_count("Gateway running.", 2).await;
    assert_eq!(
        post_all(1).await,
        requests,
        "every event answered after the restart"
    );
    assert_eq!(gw.terminate().await, 0);

    // Every record, a page (at most 1,000) at a time.
    let mut records: Vec<Value> = Vec::new();
    loop {
        let after = records
            .last()
            .map(|r| r["id"].as_u64().unwrap().to_string());
        let mut args = vec!["outbox", "-c", &cfg, "list", "--json", "--limit", "1000"];
        if let Some(after) = &after {
            args.extend(["--after", after.as_str()]);
        }
        let (code, listing, err) = process::run(&args).await;
        assert_eq!(code, 0, "{err}");
        let page: Vec<Value> = listing
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if page.is_empty() {
            break;
        }
        records.extend(page);
    }
    assert_eq!(records.len(), total);
    let mut without = Vec::new();
    let mut applications = 0;
    for r in &records {
        assert_eq!(r["state"], "delivered", "{r}");
        if r["d365"].is_null() {
            without.push(r["id"].clone());
        }
        applications += r["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["by"] == "d365")
            .count();
    }
    assert!(
        without.is_empty(),
        "messages without a verdict: {without:?}"
    );
    assert_eq!(applications, total, "one verdict per message, never two");
    let (code, unmatched, err) = process::run(&["outbox", "-c", &cfg, "unmatched"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        unmatched.contains("no D365 verdict is unmatched"),
        "{unmatched}"
    );
}

/// Posts a "message processed" event for every request D365 (the fake) accepted, until
/// `stop`: D365's batch job and its business events. Most come 200 ms after, every fifth
/// late (1.5 s), and each batch in reverse order (events of different orders are not
/// delivered in the order processed). At least once, as D365 does: a post the gateway did
/// not answer (it was being killed) is posted again.
async fn emit_processed_events(
    fake: FakeD365,
    port: u16,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    use std::time::Duration;
    let http = reqwest::Client::new();
    let mut emitted = 0;
    let mut pending: Vec<(tokio::time::Instant, Value)> = Vec::new();
    let mut accepted_more = fake.changes();
    loop {
        let now = tokio::time::Instant::now();
        let accepted = fake.accepted();
        for (n, sent) in accepted.iter().enumerate().skip(emitted) {
            let lag = if n % 5 == 0 {
                Duration::from_millis(1_500)
            } else {
                Duration::from_millis(200)
            };
            pending.push((
                now + lag,
                processed(&format!("P-{n}"), sent, "Processed", ""),
            ));
        }
        emitted = accepted.len();
        let (due, later): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(at, _)| *at <= now);
        pending = later;
        for (_, event) in due.into_iter().rev() {
            if !post_event(&http, port, &event).await {
                // The gateway is being killed: posted again a moment later, as D365 does.
                pending.push((now + Duration::from_millis(200), event));
            }
        }
        let next_due = pending.iter().map(|(at, _)| *at).min();
        tokio::select! {
            _ = stop.cancelled() => return emitted,
            // More requests accepted: their events to schedule.
            Ok(()) = accepted_more.changed() => {}
            _ = tokio::time::sleep_until(next_due.unwrap_or(now)), if next_due.is_some() => {}
        }
    }
}

/// Issue 32: a kill loop under load with D365's "message processed" events configured
/// ends with nothing for an operator to do and nothing doubled. Every kill -9 may leave
/// messages `uncertain`; those D365 received are resolved by their events, those it never
/// received are sent again once its events for later messages of other orders prove it.
/// At the end: no message uncertain, every impulse reported once (the quantities per
/// order add up exactly), and no message flagged as a possible duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_loop_with_events_configured_leaves_nothing_uncertain_and_nothing_doubled() {
    use support::mqtt::{burst_orders, publish_burst, Mosquitto};
    const ROUNDS: u32 = 4;
    const PER_ROUND: u32 = 40;
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    burst_with_webhook(dir, &fake, &broker, api_port);
    let main = dir.join("gateway.yaml");
    // A witness counts from its answer minus the request timeout (the earliest it can
    // have left): a short timeout, so the evidence comes within the test.
    let yaml = std::fs::read_to_string(&main)
        .unwrap()
        .replace(
            "dispatcher:\n",
            "dispatcher:\n  unreceived_after: 200ms\n  unreceived_witnesses: 3\n  unreceived_grace: 3s\n",
        )
        .replace("request_timeout: 30s", "request_timeout: 1s");
    std::fs::write(&main, yaml).unwrap();
    let cfg = path_str(dir).to_string();
    let stop = tokio_util::sync::CancellationToken::new();
    let emitter = tokio::spawn(emit_processed_events(fake.clone(), api_port, stop.clone()));

    let orders = burst_orders();
    let out = Output::new();
    let mut gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Subscribed.").await;
    for round in 0..ROUNDS {
        let first = round * PER_ROUND + 1;
        let publishing = tokio::spawn({
            let (port, orders) = (broker.port, orders.clone());
            async move { publish_burst(port, &orders, first, first + PER_ROUND - 1).await }
        });
        // Killed while D365 accepts this round's messages (a moment chosen by progress,
        // not by time).
        let before = support::accepted_lines(&fake.received());
        fake.wait_until("part of the round delivered", |r| {
            support::accepted_lines(r) >= before + orders.len()
        })
        .await;
        gw.kill9().await;
        publishing.await.unwrap();
        gw = process::start(&["run", "-c", &cfg], &out);
        out.wait_for_count("Gateway running.", round as usize + 2)
            .await;
    }
    // The plant goes on producing, an impulse per order at a time: D365's events for
    // these later messages are the evidence for what the last kill left uncertain. Until
    // nothing is left for an operator (at most 300 more impulses per order: the watch
    // weighs the evidence every 5 s, and a round takes a fraction of a second).
    let mut last = ROUNDS * PER_ROUND;
    let status = loop {
        last += 1;
        publish_burst(broker.port, &orders, last, last).await;
        let per_order: u32 = (1..=last).sum();
        let (code, text, err) = process::run(&["status", "--json", "-c", &cfg]).await;
        assert_eq!(code, 0, "{err}");
        let status: Value = serde_json::from_str(&text).unwrap();
        let held = status["outbox"]["uncertain"].as_u64().unwrap_or(0)
            + status["outbox"]["failed"].as_u64().unwrap_or(0);
        let reported = orders
            .iter()
            .all(|o| support::pieces(&fake.received(), o) == per_order);
        if (held == 0 && reported) || last >= ROUNDS * PER_ROUND + 300 {
            break status;
        }
        fake.wait_until("the impulse reported on every order not held", |r| {
            orders
                .iter()
                .filter(|o| support::pieces(r, o) >= (1..=last).sum())
                .count()
                + held as usize
                >= orders.len()
        })
        .await;
    };
    let per_order: u32 = (1..=last).sum();
    stop.cancel();
    emitter.await.unwrap();
    assert_eq!(status["outbox"]["uncertain"], 0, "{status}");
    assert_eq!(status["outbox"]["failed"], 0, "{status}");
    fake.wait_until("every impulse reported", |r| {
        orders.iter().all(|o| support::pieces(r, o) >= per_order)
    })
    .await;
    let received = fake.received();
    for o in &orders {
        assert_eq!(
            support::pieces(&received, o),
            per_order,
            "order {o}: every impulse once"
        );
    }
    let text = out.text();
    assert!(!text.contains("may have it twice"), "no duplicate flagged");
    println!(
        "kills: {ROUNDS}; messages left uncertain by the kills: {}, of which D365 never received (sent again on evidence): {}",
        text.matches("Marked uncertain").count(),
        text.matches("D365 never received an uncertain message").count()
    );
    assert_eq!(gw.terminate().await, 0);
}

/// Joining (issue 31, outbox join.rs) through the real binary: reports queued behind an
/// order's message while D365 is down go out as one request when it is back; a kill -9
/// while that request is on the wire leaves every message of it uncertain together, and
/// D365's "message processed" event for the joined content resolves them all at once.
/// Each member's history names the request that carried it; `outbox show` shows the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_request_cut_by_a_kill_is_uncertain_as_one_and_resolved_by_its_event() {
    let fake = FakeD365::start().await;
    fake.unavailable(true);
    // Once D365 is back: the order's first message is accepted, the joined request hangs.
    fake.script_order("P-J", [support::Reply::Status(200), support::Reply::Hang]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    events_gateway(
        dir,
        &d365_yaml(&fake),
        "  backoff_initial: 50ms\n  backoff_max: 200ms\n  join:\n    max_lines: 10\n",
        api_port,
        None,
    );
    let cfg = path_str(dir).to_string();
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Gateway running.").await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for quantity in 1..=5 {
        ids.push(queue_report(&http, api_port, "P-J", quantity).await);
        if quantity == 1 {
            // The first one has been tried (503): it goes alone, the rest may join.
            fake.wait_until("the first report tried", |r| {
                r.iter().any(|r| r.order == "P-J")
            })
            .await;
        }
    }
    fake.unavailable(false);
    fake.wait_until("the joined request", |r| {
        r.iter().any(|r| !r.joined.is_empty())
    })
    .await;
    let joined = fake
        .received()
        .into_iter()
        .find(|r| !r.joined.is_empty())
        .unwrap();
    assert_eq!(joined.message_id, Some(ids[1]));
    assert_eq!(joined.joined, ids[2..].to_vec());
    let quantities: Vec<u64> = joined
        .lines("ReportFinishedLines")
        .iter()
        .map(|l| l["ReportedGoodQuantity"].as_u64().unwrap())
        .collect();
    assert_eq!(quantities, vec![2, 3, 4, 5], "every line once, in order");
    gw.kill9().await;

    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Gateway running.").await;
    out.wait_for("Message was being sent when the gateway stopped")
        .await;
    for &id in &ids[1..] {
        let r = get(api_port, &format!("/api/v1/messages/{id}")).await;
        assert_eq!(r["state"], "uncertain", "message {id}: {r}");
    }
    let (code, shown, err) =
        process::run(&["outbox", "-c", &cfg, "show", &ids[3].to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        shown.contains(&format!("sent in the request of message {}", ids[1])),
        "{shown}"
    );

    let (status, _) = post(
        api_port,
        Some(SECRET),
        &processed("J-1", &joined, "Processed", ""),
    )
    .await;
    assert_eq!(status, 200);
    for &id in &ids[1..] {
        let r = get(api_port, &format!("/api/v1/messages/{id}")).await;
        assert_eq!(r["state"], "delivered", "message {id}: {r}");
        assert_eq!(r["d365"]["event_id"], "J-1", "{r}");
        if id != ids[1] {
            let history = r["history"].as_array().unwrap();
            assert!(
                history.iter().any(|c| c["action"]
                    == format!("joined into the request of message {}", ids[1]).as_str()),
                "{r}"
            );
        }
    }
    assert_eq!(
        fake.received()
            .iter()
            .filter(|r| r.message_id == Some(ids[1]))
            .count(),
        1,
        "resolved by the event, never sent again"
    );
    assert_eq!(gw.terminate().await, 0);
}

/// The wrong inference (issue 32), through the real binary: D365 did receive an order's
/// message (the fake read it, then dropped the connection: uncertain), but its event is
/// late. D365's events for later messages of other orders are evidence that it never
/// arrived, so the gateway sends it again; then D365 reports both copies. The second
/// report flags the message at once: its history, the API, `status`, an alert and
/// `/metrics` say D365 may have it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_after_a_resend_on_evidence_flags_the_duplicate_with_an_alert_and_a_metric() {
    let fake = FakeD365::start().await;
    fake.script_order("P-DUP", [support::Reply::Drop]);
    let webhook = support::alerts::Webhook::start(0).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    let d365 = d365_yaml(&fake).replace("request_timeout: 30s", "request_timeout: 1s");
    assert!(d365.contains("request_timeout: 1s"), "{d365}");
    events_gateway(
        dir,
        &d365,
        "  unreceived_after: 100ms\n  unreceived_witnesses: 3\n  unreceived_grace: 1s\n",
        api_port,
        Some(&webhook.url),
    );
    let cfg = path_str(dir).to_string();
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Gateway running.").await;
    let http = reqwest::Client::new();
    let lost = queue_report(&http, api_port, "P-DUP", 7).await;
    fake.wait_until("P-DUP's first request", |r| {
        r.iter().any(|r| r.message_id == Some(lost))
    })
    .await;
    let first_copy = fake
        .received()
        .into_iter()
        .find(|r| r.message_id == Some(lost))
        .unwrap();
    assert_eq!(first_copy.status, None, "read, then the connection dropped");

    // The plant goes on: other orders' messages are delivered and D365 reports them at
    // once; P-DUP's event is late. Until the gateway sends P-DUP's message again.
    let mut n = 0;
    let resent = loop {
        n += 1;
        assert!(n <= 200, "never sent again on the evidence");
        let id = queue_report(&http, api_port, &format!("P-W{}", n % 5), n).await;
        fake.wait_until("the witness accepted", |r| {
            r.iter()
                .any(|r| r.message_id == Some(id) && r.status == Some(200))
        })
        .await;
        let sent = fake
            .received()
            .into_iter()
            .find(|r| r.message_id == Some(id))
            .unwrap();
        let (status, _) = post(
            api_port,
            Some(SECRET),
            &processed(&format!("W-{n}"), &sent, "Processed", ""),
        )
        .await;
        assert_eq!(status, 200);
        let again = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            fake.wait_until("P-DUP sent again", |r| {
                r.iter()
                    .filter(|r| r.message_id == Some(lost) && r.status == Some(200))
                    .count()
                    == 1
            }),
        )
        .await;
        if again.is_ok() {
            break fake
                .received()
                .into_iter()
                .find(|r| r.message_id == Some(lost) && r.status == Some(200))
                .unwrap();
        }
    };
    let record = get(api_port, &format!("/api/v1/messages/{lost}")).await;
    assert_eq!(record["state"], "delivered", "{record}");
    assert!(
        record["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["action"] == "resent: D365 never received it"
                && c["detail"].as_str().is_some_and(|d| d.contains("W-"))),
        "the resend names its evidence: {record}"
    );

    // D365 reports the first copy, late, then the second.
    for (event, copy) in [("DUP-1", &first_copy), ("DUP-2", &resent)] {
        let (status, _) = post(
            api_port,
            Some(SECRET),
            &processed(event, copy, "Processed", ""),
        )
        .await;
        assert_eq!(status, 200);
    }
    let record = get(api_port, &format!("/api/v1/messages/{lost}")).await;
    assert_eq!(record["duplicate"], true, "{record}");
    assert!(
        record["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("DUPLICATE in D365"))),
        "{record}"
    );
    let alert = webhook
        .received
        .wait_for(&format!("message/{lost}/duplicate"), "firing")
        .await;
    assert_eq!(alert["kind"], "message_duplicate");
    let metrics = reqwest::get(format!("http://127.0.0.1:{api_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("mes_gateway_d365_duplicates 1"),
        "{metrics}"
    );
    let (code, status, err) = process::run(&["status", "-c", &cfg]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        status.contains("1 message(s) may be in D365 TWICE"),
        "{status}"
    );
    assert_eq!(gw.terminate().await, 0);
}
