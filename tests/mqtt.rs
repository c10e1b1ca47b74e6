//! The MQTT source against a real mosquitto broker on a loopback port, with the real
//! gateway binary and the fake D365.

use mes_gateway_testkit as support;

use std::path::Path;
use std::time::Duration;

use support::mqtt::{publish, Mosquitto, Proxy};
use support::process::{self, path_str, Output};
use support::{d365_yaml, write_config, FakeD365};

fn config(dir: &Path, fake: &FakeD365, broker: &Mosquitto) {
    config_for(dir, fake, &broker.url());
}

fn config_for(dir: &Path, fake: &FakeD365, url: &str) {
    write_config(
        dir,
        &format!(
            "{}storage:\n  data_dir: data\nsources:\n  - type: mqtt\n    id: broker\n    url: {}\n    client_id: gw-test\n    subscriptions:\n      - topic: plant/+/count\n        qos: 1\n",
            d365_yaml(fake),
            url
        ),
    );
    std::fs::create_dir_all(dir.join("rules.d")).unwrap();
    std::fs::write(
        dir.join("rules.d/count.yaml"),
        "rules:\n  - name: count\n    line: \"{capture.line}\"\n    when: { source: broker, topic: \"plant/{line}/count\" }\n    count: value\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: { ProductionOrderNumber: P1, ItemNumber: \"{capture.line}\", ReportedGoodQuantity: \"{quantity}\" }\n",
    )
    .unwrap();
}

/// Every line D365 accepted, in order (a joined request's lines one by one).
fn reported(fake: &FakeD365) -> Vec<(String, f64)> {
    fake.accepted()
        .iter()
        .flat_map(|r| r.lines("ReportFinishedLines"))
        .map(|line| {
            (
                line["ItemNumber"].as_str().unwrap().to_string(),
                line["ReportedGoodQuantity"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Report lines the fake received, joined into one request or not (outbox join.rs).
fn lines(received: &[support::Received]) -> usize {
    received
        .iter()
        .map(|r| r.lines("ReportFinishedLines").len())
        .sum()
}

/// A broker, a fake D365 and a configuration directory for a gateway between them.
async fn setup() -> (Mosquitto, FakeD365, tempfile::TempDir) {
    let broker = Mosquitto::start().await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    config(tmp.path(), &fake, &broker);
    (broker, fake, tmp)
}

async fn started(dir: &Path, out: &Output) -> process::Running {
    let gw = process::start(&["run", "-c", path_str(dir)], out);
    out.wait_for("Subscribed.").await;
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_become_d365_messages_and_bad_payloads_do_not_stop_the_source() {
    let (broker, fake, tmp) = setup().await;
    let out = Output::new();
    let gw = started(tmp.path(), &out).await;
    publish(
        broker.port,
        &[
            ("plant/l1/count", b"5"),
            ("plant/l2/count", b"7"),
            ("plant/l1/count", &[0xff, 0xfe, 0x00]),
            ("plant/l1/count", b"9"),
        ],
    )
    .await;
    fake.wait_until("three reports", |r| lines(r) == 3).await;
    assert_eq!(
        reported(&fake),
        vec![("l1".into(), 5.0), ("l2".into(), 7.0), ("l1".into(), 9.0)]
    );
    assert_eq!(gw.terminate().await, 0);
    let text = out.text();
    assert!(
        text.contains("Undecodable MQTT payload") && text.contains("topic=plant/l1/count"),
        "{text}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_reconnects_after_a_broker_restart_and_loses_nothing_acknowledged() {
    let (broker, fake, tmp) = setup().await;
    let port = broker.port;
    let out = Output::new();
    let gw = started(tmp.path(), &out).await;
    publish(
        port,
        &[
            ("plant/a/count", b"1"),
            ("plant/a/count", b"2"),
            ("plant/a/count", b"3"),
        ],
    )
    .await;
    fake.wait_until("first three", |r| lines(r) == 3).await;

    broker.stop().await;
    out.wait_for("MQTT connection lost").await;
    let broker = Mosquitto::start_on(port).await;
    // The restarted broker has no session: the source must subscribe again by itself.
    out.wait_for_count("Subscribed.", 2).await;
    publish(port, &[("plant/a/count", b"4"), ("plant/a/count", b"5")]).await;
    fake.wait_until("all five", |r| lines(r) == 5).await;
    let quantities: Vec<f64> = reported(&fake).into_iter().map(|(_, q)| q).collect();
    assert_eq!(quantities, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(gw.terminate().await, 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_not_yet_acknowledged_when_the_gateway_dies_comes_again() {
    let (broker, fake, tmp) = setup().await;
    let out = Output::new();
    let gw = started(tmp.path(), &out).await;
    // Freeze the gateway: the broker delivers, nothing is stored or acknowledged.
    // SAFETY: kill(2) on our own child with valid signals.
    unsafe { libc::kill(gw.pid(), libc::SIGSTOP) };
    publish(broker.port, &[("plant/z/count", b"42")]).await;
    gw.kill9().await;
    assert!(fake.received().is_empty());

    let gw = process::start(&["run", "-c", path_str(tmp.path())], &out);
    fake.wait_until("the redelivered message", |r| lines(r) == 1)
        .await;
    assert_eq!(reported(&fake), vec![("z".into(), 42.0)]);
    assert_eq!(gw.terminate().await, 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_show_the_sources_and_the_outbox() {
    let (broker, fake, tmp) = setup().await;
    let port = support::mqtt::free_port();
    // Subscribe to more than the rules take, so one event is unmatched.
    let yaml = std::fs::read_to_string(tmp.path().join("gateway.yaml"))
        .unwrap()
        .replace("topic: plant/+/count", "topic: plant/#")
        + &format!("api:\n  listen: 127.0.0.1:{port}\n");
    std::fs::write(tmp.path().join("gateway.yaml"), yaml).unwrap();
    std::fs::write(
        tmp.path().join("rules.d/order.yaml"),
        "rules:\n  - name: order\n    line: \"{capture.line}\"\n    when: { source: broker, topic: \"plant/{line}/order\" }\n    set_context: { order: \"{value}\", item: A0001 }\n",
    )
    .unwrap();
    let out = Output::new();
    let gw = started(tmp.path(), &out).await;
    out.wait_for("Operator API listening").await;
    // The order and the unmatched one first: once the report reaches D365 all three have
    // been through the rules and committed.
    publish(
        broker.port,
        &[
            ("plant/l1/order", b"P000777"),
            ("plant/l1/temperature", b"21.5"),
            ("plant/l1/count", b"5"),
        ],
    )
    .await;
    fake.wait_until("one report", |r| lines(r) == 1).await;

    let http = reqwest::Client::new();
    let health: serde_json::Value = http
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["sources"][0]["id"], "broker");
    assert_eq!(health["sources"][0]["connected"], true);
    assert_eq!(
        (
            &health["lines"]["l1"]["order"],
            &health["lines"]["l1"]["item"]
        ),
        (&serde_json::json!("P000777"), &serde_json::json!("A0001")),
        "the order context the pipeline committed: {health}"
    );
    // The fake has read the request; its outcome is written once the answer is back.
    let scrape = || async {
        http.get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let delivered = "mes_gateway_outbox_messages{state=\"delivered\"} 1\n";
    let metrics = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let metrics = scrape().await;
            if metrics.contains(delivered) {
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the delivery is recorded");
    assert!(
        metrics.contains("mes_gateway_source_connected{source=\"broker\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mes_gateway_source_events_total{source=\"broker\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mes_gateway_outbox_messages{state=\"queued\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mes_gateway_oldest_pending_age_seconds 0.0\n"),
        "everything delivered: {metrics}"
    );
    assert!(
        metrics.contains("mes_gateway_unmatched_events_total 1"),
        "the other topic is counted: {metrics}"
    );
    // The latency histogram saw the one delivery.
    assert!(
        metrics.contains("mes_gateway_outbox_messages{state=\"delivered\"} 1\n")
            && metrics.contains("mes_gateway_delivery_latency_seconds_count 1\n")
            && metrics.contains("mes_gateway_delivery_latency_seconds_bucket{le=\"+Inf\"} 1\n"),
        "{metrics}"
    );
    // The outbox's durable writes: the one message stored (in one or more ingest writes:
    // the other events commit their acknowledgements), then marked and settled in two
    // delivery writes.
    for expected in [
        "mes_gateway_outbox_written_messages_total{kind=\"ingest\"} 1\n",
        "mes_gateway_outbox_written_messages_total{kind=\"delivery\"} 2\n",
        "mes_gateway_outbox_write_seconds_count{kind=\"delivery\"} 2\n",
        "mes_gateway_outbox_write_seconds_bucket{le=\"+Inf\",kind=\"delivery\"} 2\n",
    ] {
        assert!(metrics.contains(expected), "{expected}: {metrics}");
    }
    // D365's request budget (the default, 3000 per 5 minutes): the one request spent.
    for expected in [
        "mes_gateway_d365_budget_requests{kind=\"used\"} 1\n",
        "mes_gateway_d365_budget_requests{kind=\"limit\"} 3000\n",
        "mes_gateway_d365_backlog_seconds{budget=\"3000/300s\"} 0\n",
    ] {
        assert!(metrics.contains(expected), "{expected}: {metrics}");
    }
    let ingest_writes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mes_gateway_outbox_write_seconds_count{kind=\"ingest\"} "))
        .and_then(|v| v.parse().ok())
        .expect("an ingest write count");
    assert!(ingest_writes >= 1, "{metrics}");
    // `status` shows the same writes with their recent mean duration.
    let cfg = path_str(tmp.path());
    let (code, text, err) = process::run(&["status", "--json", "-c", cfg]).await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    let delivery = &status["outbox_writes"]["delivery"];
    assert_eq!(
        (&delivery["writes"], &delivery["messages"]),
        (&serde_json::json!(2), &serde_json::json!(2)),
        "{status}"
    );
    assert!(
        delivery["recent_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{status}"
    );
    assert_eq!(status["outbox_writes"]["ingest"]["messages"], 1, "{status}");
    assert_eq!(
        status["d365_budget"],
        serde_json::json!({"used": 1, "limit": 3000, "window_seconds": 300, "backlog_seconds": 0}),
        "{status}"
    );
    let (code, text, err) = process::run(&["status", "-c", cfg]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("durable writes (transaction and fsync): delivery ")
            && text.contains("(2 so far, 1 messages each on average)"),
        "{text}"
    );
    assert!(
        text.contains(
            "request budget: 1 of 3000 per 5 min used; what waits needs at most 0 s at that rate"
        ),
        "{text}"
    );
    assert!(metrics.ends_with("# EOF\n"), "OpenMetrics text: {metrics}");
    assert_eq!(gw.terminate().await, 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_verifies_the_broker_with_the_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (broker, ca) = Mosquitto::start_tls(certs.path()).await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    config(tmp.path(), &fake, &broker);
    let plain = std::fs::read_to_string(tmp.path().join("gateway.yaml")).unwrap();
    let tls = |ca: &Path| {
        plain.replace(
            &format!("url: {}", broker.url()),
            &format!(
                "url: mqtts://127.0.0.1:{}\n    ca_file: {}",
                broker.port,
                ca.display()
            ),
        )
    };

    // A CA that did not sign the broker's certificate: refused, and said so.
    let other = tempfile::tempdir().unwrap();
    let other_ca = support::mqtt::make_ca(other.path(), "other-ca");
    std::fs::write(tmp.path().join("gateway.yaml"), tls(&other_ca)).unwrap();
    let log = Output::new();
    let gw = process::start(&["run", "-c", path_str(tmp.path())], &log);
    log.wait_for("MQTT connection lost").await;
    assert_eq!(gw.terminate().await, 0);
    assert!(
        log.text().to_lowercase().contains("certificate"),
        "the log names the certificate problem: {}",
        log.text()
    );

    // The right CA: connected over TLS, messages flow.
    std::fs::write(tmp.path().join("gateway.yaml"), tls(&ca)).unwrap();
    let log = Output::new();
    let gw = process::start(&["run", "-c", path_str(tmp.path())], &log);
    log.wait_for("Subscribed.").await;
    assert_eq!(gw.terminate().await, 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_redelivered_after_its_ack_was_lost_produces_nothing_and_is_acknowledged() {
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let proxy = Proxy::start(broker.port).await;
    let tmp = tempfile::tempdir().unwrap();
    config_for(tmp.path(), &fake, &proxy.url());
    let out = Output::new();
    let gw = started(tmp.path(), &out).await;

    // The gateway stores the publish and acks it, but the ack is lost on the way; then
    // the connection drops. The broker delivers the publish again (DUP = 1).
    proxy.lose_client_bytes(true);
    publish(broker.port, &[("plant/l1/count", b"5")]).await;
    fake.wait_until("the first report", |r| lines(r) == 1).await;
    proxy.lose_client_bytes(false);
    proxy.cut();
    out.wait_for("Redelivered message already stored").await;

    publish(broker.port, &[("plant/l1/count", b"7")]).await;
    fake.wait_until("the second report", |r| lines(r) == 2)
        .await;
    assert_eq!(gw.terminate().await, 0);

    // The redelivery was acknowledged: started again, the broker has nothing left for us.
    let gw = process::start(&["run", "-c", path_str(tmp.path())], &out);
    out.wait_for_count("Subscribed.", 2).await;
    publish(broker.port, &[("plant/l1/count", b"9")]).await;
    fake.wait_until("the third report", |r| lines(r) == 3).await;
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(
        reported(&fake),
        vec![("l1".into(), 5.0), ("l1".into(), 7.0), ("l1".into(), 9.0)],
        "the lost ack did not double the first report"
    );
    assert_eq!(
        out.text()
            .matches("Redelivered message already stored")
            .count(),
        1,
        "redelivered once, acknowledged then"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_disconnects_from_the_broker() {
    let (broker, _fake, tmp) = setup().await;
    let out = Output::new();
    let gw = started(tmp.path(), &out).await;
    assert_eq!(gw.terminate().await, 0);
    assert!(
        out.text().contains("Disconnected from the MQTT broker."),
        "DISCONNECT sent at shutdown (so the broker publishes no will message)"
    );
    drop(broker);
}

/// Alerts go to a broker that takes TLS only (`mqtts://` with the plant's CA): the
/// publisher verifies the broker, and a watcher over TLS sees the alert fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_published_to_a_broker_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let (broker, ca) = Mosquitto::start_tls(certs.path()).await;
    let watcher = support::alerts::subscribe_tls(broker.port, "alerts/gw/#", &ca).await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    // The source's broker is down (nothing listens there): its alert fires after 1 s.
    let dead = support::mqtt::free_port();
    support::mqtt::write_burst_config(
        tmp.path(),
        &fake,
        &format!("mqtt://127.0.0.1:{dead}"),
        &format!(
            "alerts:\n  check_interval: 200ms\n  source_down_after: 1s\n  mqtt:\n    url: mqtts://127.0.0.1:{}\n    ca_file: {}\n    topic: alerts/gw\n",
            broker.port,
            ca.display()
        ),
    );
    let log = Output::new();
    let gw = process::start(&["run", "-c", path_str(tmp.path())], &log);
    let notice = watcher.wait_for("source_down/broker", "firing").await;
    assert_eq!(notice["topic"], "alerts/gw/source_down/broker");
    assert!(
        log.text()
            .contains("Alert publisher connected to the MQTT broker."),
        "{}",
        log.text()
    );
    assert_eq!(gw.terminate().await, 0);
    broker.stop().await;
}
