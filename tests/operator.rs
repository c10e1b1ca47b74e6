//! Operating the running gateway (issue 11): the CLI through the Unix socket, the HTTP
//! API with its token, reload through the API, and alerts on MQTT and a webhook — all
//! against the real binary while its sources keep delivering.

use mes_gateway_testkit as support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::alerts::{self, Webhook};
use support::device::PtyPair;
use support::mqtt::{
    burst_orders, count_burst, free_port, spawn_steady_load, write_burst_config, Mosquitto, EXACT,
};
use support::plant::{self, send_frame, PLC_ORDER, SERIAL_ORDER};
use support::plc::CounterPlc;
use support::process::{self, path_str, Output};
use support::{pieces, FakeD365, Operated, Reply};

const BAD_ORDER: &str = "PBAD01";
const TOKEN: &str = "test-token-0123456789abcdef";

fn api_yaml(api_port: u16) -> String {
    format!("api:\n  listen: 127.0.0.1:{api_port}\n  token_file: api-token\n")
}

fn write_token(dir: &Path) {
    std::fs::write(dir.join("api-token"), format!("{TOKEN}\n")).unwrap();
}

fn report(order: &str, quantity: u32) -> Value {
    json!({
        "ProductionOrderNumber": order,
        "ReportFinishedLines": [{ "ItemNumber": "A0001", "ReportedGoodQuantity": quantity }]
    })
}

/// Runs a CLI command against `cfg` as operator `alice`.
async fn cli(cfg: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = args.to_vec();
    all.insert(1, "-c");
    all.insert(2, cfg);
    all.extend(["--by", "alice"]);
    process::run(&all).await
}

fn write_json(dir: &Path, name: &str, value: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path_str(&path).to_string()
}

/// A message fails (HTTP 500 three times): the alert reaches a real mosquitto and a
/// webhook (which fails once and gets it again); an operator fixes the content and
/// retries it with the CLI through the socket while MQTT, Modbus and serial keep
/// delivering; the order drains in order and the alert clears. Everything the sources
/// produced reaches D365 exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_is_alerted_fixed_through_the_socket_and_drains_while_sources_deliver() {
    // Durable: a broker's default queue for an offline session (1,000) would drop what
    // arrives while the gateway reconnects, and the count would blame the gateway.
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    fake.script_order(
        BAD_ORDER,
        [Reply::Status(500), Reply::Status(500), Reply::Status(500)],
    );
    let (plc, plc_addr, _plc_server) = CounterPlc::start().await;
    let webhook = Webhook::start(1).await;
    let mqtt_alerts = alerts::subscribe(broker.port, "alerts/gw/#").await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    plant::write_plant_config(
        dir,
        &fake,
        &broker,
        plc_addr,
        &format!(
            "{}alerts:\n  check_interval: 200ms\n  mqtt:\n    url: {}\n    topic: alerts/gw\n  webhook:\n    url: {}\n",
            api_yaml(api_port),
            broker.url(),
            webhook.url
        ),
    );
    write_token(dir);
    let device = dir.join(plant::DEVICE_END);
    let _pty = PtyPair::start(dir, plant::DEVICE_END, plant::GATEWAY_END).await;
    let cfg = path_str(dir).to_string();
    let out = Output::new();
    let gw = process::start_logging(&["run", "-c", &cfg], &out, "info");
    out.wait_for("Subscribed.").await;
    out.wait_for("Operator socket listening.").await;

    // Two messages for one order, queued by hand while the gateway runs: through the
    // socket (the outbox is the daemon's).
    for quantity in [1, 2] {
        let file = write_json(
            dir,
            &format!("q{quantity}.json"),
            &report(BAD_ORDER, quantity),
        );
        let (code, stdout, stderr) = cli(
            &cfg,
            &["send", "--type", "ProdProductionOrderReportFinished", &file],
        )
        .await;
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.starts_with("queued message "), "{stdout}");
    }

    // The sources keep delivering throughout.
    plc.add(1);
    fake.wait_until("the PLC's first piece", |r| pieces(r, PLC_ORDER) >= 1)
        .await;
    let (rounds, per_round) = (10u32, 10u32);
    let mqtt_load = spawn_steady_load(broker.port, rounds, per_round);
    let running = Arc::new(AtomicBool::new(true));
    let frames = Arc::new(AtomicU32::new(0));
    let other_load = {
        let (plc, running, frames, device) =
            (plc.clone(), running.clone(), frames.clone(), device.clone());
        tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                plc.add(1);
                if send_frame(&device).await {
                    frames.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let fired = webhook.received.wait_for("message/", "firing").await;
    assert_eq!(fired["kind"], "message_failed");
    let text = fired["text"].as_str().unwrap();
    assert!(
        text.contains(BAD_ORDER) && text.contains("is failed"),
        "{text}"
    );
    let id: u64 = fired["alert"].as_str().unwrap()["message/".len()..]
        .parse()
        .unwrap();
    let on_mqtt = mqtt_alerts.wait_for("message/", "firing").await;
    assert_eq!(on_mqtt["topic"], format!("alerts/gw/message/{id}"));
    assert_eq!(on_mqtt["text"], fired["text"]);

    // An edit that breaks the message is refused with the field named; nothing changes.
    let bad = write_json(
        dir,
        "bad.json",
        &json!({ "ProductionOrderNumber": BAD_ORDER, "ReportFinishedLines": [{ "ItemNumber": "A0001", "ReportedGoodQuantity": "many" }] }),
    );
    let id_text = id.to_string();
    let (code, stdout, stderr) = cli(&cfg, &["outbox", "retry", &id_text, "--content", &bad]).await;
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(stderr.contains("ReportedGoodQuantity"), "{stderr}");

    let fixed = write_json(dir, "fixed.json", &report(BAD_ORDER, 5));
    let (code, stdout, stderr) =
        cli(&cfg, &["outbox", "retry", &id_text, "--content", &fixed]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        format!("message {id} queued again (order {BAD_ORDER})")
    );

    fake.wait_until("the failed order drained", |r| {
        pieces(r, BAD_ORDER) >= 5 + 2
    })
    .await;
    let bad_order: Vec<u64> = fake
        .accepted()
        .iter()
        .filter(|r| r.order == BAD_ORDER)
        .flat_map(|r| r.lines("ReportFinishedLines"))
        .map(|line| line["ReportedGoodQuantity"].as_u64().unwrap())
        .collect();
    assert_eq!(
        bad_order,
        [5, 2],
        "the edited message first, then the one behind it, once each"
    );
    let cleared = webhook
        .received
        .wait_for(&format!("message/{id}"), "cleared")
        .await;
    assert!(cleared["text"].as_str().unwrap().starts_with("cleared: "));
    let cleared_on_mqtt = mqtt_alerts
        .wait_for(&format!("message/{id}"), "cleared")
        .await;
    assert_eq!(
        cleared_on_mqtt["retained"], false,
        "a live publish (retained only for late subscribers)"
    );

    // The state machine refuses what makes no sense, with the reason.
    let (code, _, stderr) = cli(&cfg, &["outbox", "retry", &id_text]).await;
    assert_eq!(code, 64);
    assert!(
        stderr.contains(&format!("message {id} is delivered: cannot retry it")),
        "{stderr}"
    );
    let (code, stdout, stderr) = cli(&cfg, &["outbox", "show", &id_text]).await;
    assert_eq!(code, 0, "{stderr}");
    let shown: Value = serde_json::from_str(&stdout).unwrap();
    let edit = shown["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["action"] == "edited and retried")
        .expect("the edit is in the history");
    assert_eq!(edit["by"], "cli:alice");

    mqtt_load.await.unwrap();
    running.store(false, Ordering::Relaxed);
    other_load.await.unwrap();
    let (plc_count, frame_count) = (plc.count(), frames.load(Ordering::Relaxed));
    fake.wait_until("every PLC piece and serial frame", |r| {
        pieces(r, PLC_ORDER) >= plc_count && pieces(r, SERIAL_ORDER) >= frame_count
    })
    .await;
    let others = fake
        .accepted()
        .iter()
        .filter(|r| [PLC_ORDER, SERIAL_ORDER, BAD_ORDER].contains(&r.order.as_str()))
        // Messages, not requests: a joined request carries several.
        .map(|r| r.ids().len())
        .sum::<usize>();
    let mqtt_total = burst_orders().len() * (rounds * per_round) as usize;
    fake.wait_accepted_count(mqtt_total + others).await;
    assert_eq!(gw.terminate().await, 0);
    let received = fake.accepted();
    assert_eq!(count_burst(&fake, u64::from(rounds * per_round)), EXACT);
    assert_eq!(
        pieces(&received, PLC_ORDER),
        plc_count,
        "every PLC piece once"
    );
    assert_eq!(
        pieces(&received, SERIAL_ORDER),
        frame_count,
        "every serial frame once"
    );
    assert_eq!(
        webhook.received.all().len(),
        2,
        "one firing and one clearing, the failed POST retried: {:#?}",
        webhook.received.all()
    );
}

async fn http(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A request with the token.
async fn with_token(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    http(method, url, Some(TOKEN), body).await
}

/// A request without a token.
async fn get(url: String) -> (u16, Value) {
    http(reqwest::Method::GET, url, None, None).await
}

/// Every endpoint that changes something answers 401 without the token; with it, an
/// edit that breaks a mandatory field is 400 with the field named, an action the state
/// machine refuses is 409, an unknown message 404. A listener other hosts can reach
/// wants the token for reading too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_wants_its_token_and_answers_400_404_409_as_documented() {
    let Operated {
        fake,
        dir: tmp,
        api_port,
        out,
        gw,
    } = Operated::start_with_rules(
        BAD_ORDER,
        TOKEN,
        "sources:\n  - type: simulator\n    id: barrier\n    interval: 1h\n",
        Some("rules:\n  - name: good\n    line: line1\n    when: { source: barrier, point: impulse, edge: rising }\n    count: impulse\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: { ItemNumber: A0001, ReportedGoodQuantity: \"{quantity}\" }\n"),
    )
    .await;
    let dir = tmp.path();
    let base = format!("http://127.0.0.1:{api_port}/api/v1");

    // Ready: no source to wait for, and no token problem (the token is fetched when
    // there is something to send).
    let ready = async {
        loop {
            let (status, body) = get(format!("http://127.0.0.1:{api_port}/ready")).await;
            if status == 200 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let body = tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("/ready says 200");
    assert_eq!(body, json!({ "ready": true, "reasons": [] }));
    // Reading needs no token on loopback.
    let (status, body) = get(format!("{base}/status")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["running"], true);

    let (status, sent) = with_token(
        reqwest::Method::POST,
        format!("{base}/messages?type=ProdProductionOrderReportFinished"),
        Some(report(BAD_ORDER, 1)),
    )
    .await;
    assert_eq!(status, 201, "{sent}");
    let id = sent["id"].as_u64().unwrap();
    let changes = [
        (
            reqwest::Method::POST,
            format!("{base}/messages"),
            Some(report("P1", 1)),
        ),
        (
            reqwest::Method::POST,
            format!("{base}/messages/{id}/retry"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("{base}/messages/{id}/cancel"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("{base}/messages/{id}/resolve"),
            None,
        ),
        (
            reqwest::Method::PUT,
            format!("{base}/lines/line1"),
            Some(json!({ "order": "P1" })),
        ),
        (reqwest::Method::DELETE, format!("{base}/lines/line1"), None),
        (reqwest::Method::POST, format!("{base}/reload"), None),
    ];
    for (method, url, body) in &changes {
        for token in [None, Some("wrong-token-0123456789")] {
            let (status, answer) = http(method.clone(), url.clone(), token, body.clone()).await;
            assert_eq!(status, 401, "{method} {url} with {token:?}: {answer}");
            assert!(
                answer["error"].as_str().unwrap().contains("bearer token"),
                "{answer}"
            );
        }
    }

    let (status, _) = get(format!("{base}/messages/999999")).await;
    assert_eq!(status, 404);
    fake.wait_until("three answers 500", |r| {
        r.iter().filter(|r| r.order == BAD_ORDER).count() >= 3
    })
    .await;
    let failed = async {
        loop {
            let (_, m) = get(format!("{base}/messages/{id}")).await;
            if m["state"] == "failed" {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), failed)
        .await
        .expect("the message failed");

    let (status, answer) = with_token(
        reqwest::Method::POST,
        format!("{base}/messages/{id}/retry"),
        Some(
            json!({ "content": { "ProductionOrderNumber": BAD_ORDER, "ReportFinishedLines": [] } }),
        ),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "ReportFinishedLines", "{answer}");
    assert_eq!(
        answer["error"],
        "ProdProductionOrderReportFinished: ReportFinishedLines (at least one line) is mandatory"
    );
    let (status, answer) = with_token(
        reqwest::Method::POST,
        format!("{base}/messages/{id}/resolve"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(
        answer["error"],
        format!("message {id} is failed: cannot resolve it (allowed from: uncertain)")
    );
    let (status, answer) = with_token(
        reqwest::Method::POST,
        format!("{base}/messages/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "cancelled");
    assert_eq!(
        answer["history"].as_array().unwrap().last().unwrap()["by"],
        "api"
    );
    let (status, answer) = with_token(
        reqwest::Method::POST,
        format!("{base}/messages/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{answer}");

    let (status, answer) = with_token(
        reqwest::Method::PUT,
        format!("{base}/lines/line1"),
        Some(json!({ "order": "" })),
    )
    .await;
    assert_eq!(
        (status, answer["field"].clone()),
        (400, json!("order")),
        "{answer}"
    );
    // A line no rule reads (a typo) is refused, naming the lines the rules read.
    let (status, answer) = with_token(
        reqwest::Method::PUT,
        format!("{base}/lines/lin1"),
        Some(json!({ "order": "P000777" })),
    )
    .await;
    assert_eq!(
        (status, answer["field"].clone()),
        (400, json!("line")),
        "{answer}"
    );
    assert_eq!(
        answer["error"],
        "no rule reads line \"lin1\": an order set there would never be reported (the rules read these lines: line1)"
    );
    let (status, answer) = with_token(
        reqwest::Method::PUT,
        format!("{base}/lines/line1"),
        Some(json!({ "order": "P000777", "item": "A0001" })),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (_, lines) = get(format!("{base}/lines")).await;
    assert_eq!(lines["lines"]["line1"]["order"], "P000777");
    assert_eq!(gw.terminate().await, 0);

    // The same service on a listener other hosts could reach (plain HTTP by explicit
    // choice, warned about): reading needs the token too.
    let api_port = free_port();
    let yaml = std::fs::read_to_string(dir.join("gateway.yaml"))
        .unwrap()
        .replace(
            "listen: 127.0.0.1:",
            &format!("insecure_plain_http: true\n  listen: 0.0.0.0:{api_port}\n  # was "),
        );
    std::fs::write(dir.join("gateway.yaml"), yaml).unwrap();
    let gw = process::start(&["run", "-c", path_str(dir)], &out);
    out.wait_for_count("Operator socket listening.", 2).await;
    out.wait_for("serves plain HTTP to other hosts").await;
    let base = format!("http://127.0.0.1:{api_port}/api/v1");
    let (status, _) = get(format!("{base}/status")).await;
    assert_eq!(status, 401);
    let (status, _) = get(format!("http://127.0.0.1:{api_port}/metrics")).await;
    assert_eq!(status, 401);
    let (status, body) = with_token(reqwest::Method::GET, format!("{base}/status"), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["lines"]["line1"]["order"], "P000777",
        "the line's order survived the restart"
    );
    assert_eq!(gw.terminate().await, 0);
}

/// A reload through the API with a broken rule file returns every error with its
/// position and the gateway goes on with the old rules; a reload that changes a rule
/// while a burst flows loses nothing and reports nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_through_the_api_refuses_a_broken_rule_and_a_good_one_loses_nothing_under_load() {
    // Durable: a broker's default queue for an offline session (1,000) would drop what
    // arrives while the gateway reconnects, and the count would blame the gateway.
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    write_burst_config(dir, &fake, &broker.url(), &api_yaml(api_port));
    write_token(dir);
    let cfg = path_str(dir).to_string();
    let out = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &out);
    out.wait_for("Subscribed.").await;
    let reload = || {
        with_token(
            reqwest::Method::POST,
            format!("http://127.0.0.1:{api_port}/api/v1/reload"),
            None,
        )
    };

    let rules = dir.join("rules.d/count.yaml");
    let good_rules = std::fs::read_to_string(&rules).unwrap();
    std::fs::write(
        dir.join("rules.d/broken.yaml"),
        "rules:\n  - name: broken\n    when: { source: nowhere, edge: rissing }\n",
    )
    .unwrap();
    let (status, answer) = reload().await;
    assert_eq!(status, 400, "{answer}");
    let errors: Vec<String> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    let broken = dir.join("rules.d/broken.yaml");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(&format!("{}:3:", broken.display()))
                && e.contains("unknown variant `rissing`")),
        "{errors:#?}"
    );
    let (code, _, stderr) = cli(&cfg, &["reload"]).await;
    assert_eq!(code, 64, "the CLI reports the same: {stderr}");
    assert!(
        stderr.contains("unknown variant `rissing`")
            && stderr.contains("keeps running on its current configuration"),
        "{stderr}"
    );
    std::fs::remove_file(&broken).unwrap();

    // Load, and a reload in the middle of it that changes the rule (same quantities,
    // another item number from now on).
    let (rounds, per_round) = (20u32, 20u32);
    let load = spawn_steady_load(broker.port, rounds, per_round);
    fake.wait_accepted_count(burst_orders().len() * 40).await;
    std::fs::write(
        &rules,
        good_rules.replace("ItemNumber: A0001", "ItemNumber: A0002"),
    )
    .unwrap();
    let (status, answer) = reload().await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["reloaded"], "1 source(s), 1 rule(s)");
    load.await.unwrap();
    let total = burst_orders().len() * (rounds * per_round) as usize;
    if tokio::time::timeout(Duration::from_secs(60), fake.wait_accepted_count(total))
        .await
        .is_err()
    {
        panic!(
            "not drained: {} of {total}: {:?}",
            fake.accepted_messages(),
            count_burst(&fake, u64::from(rounds * per_round)),
        );
    }
    // Messages remember the line whose events built them: listing by line finds them.
    let (status, page) = get(format!(
        "http://127.0.0.1:{api_port}/api/v1/messages?line=P007&limit=5&newest=true"
    ))
    .await;
    assert_eq!(status, 200, "{page}");
    let listed = page["messages"].as_array().unwrap();
    assert_eq!(listed.len(), 5);
    assert!(
        listed
            .iter()
            .all(|m| m["line"] == "P007" && m["production_order"] == "P007"),
        "{page}"
    );
    assert!(
        listed
            .windows(2)
            .all(|w| w[0]["id"].as_u64() > w[1]["id"].as_u64()),
        "newest first"
    );
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(count_burst(&fake, u64::from(rounds * per_round)), EXACT);
    let items: std::collections::BTreeSet<String> = fake
        .accepted()
        .iter()
        .flat_map(|r| r.lines("ReportFinishedLines"))
        .map(|line| line["ItemNumber"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        items,
        ["A0001".to_string(), "A0002".to_string()].into(),
        "the new rule took over"
    );
    assert!(
        out.text().contains("by=api"),
        "the reload is logged with who asked"
    );
}
