//! Exactly once under load: a burst of QoS 1 impulses from 50 production orders through a
//! real mosquitto, the real gateway binary and a fake D365, with a restart, a kill -9 and a
//! broker restart in the middle. Every test counts what D365 received: every impulse
//! exactly once, per order in order.
//!
//! `BURST_PER_ORDER` sets the impulses per order (default 400: 20,000 in all).

use mes_gateway_testkit as support;

use std::path::Path;

use mes_gateway::outbox::{Outbox, State};
use support::mqtt::{
    burst_orders, count_burst, publish_burst, write_burst_config, Mosquitto, EXACT,
};
use support::process::{self, path_str, Output};
use support::FakeD365;

/// Production orders in a burst (see `burst_orders`).
const ORDERS: usize = 50;

fn per_order() -> u32 {
    std::env::var("BURST_PER_ORDER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

fn orders() -> Vec<String> {
    burst_orders()
}

/// A durable broker, a fake D365 and a gateway configuration between them.
async fn setup() -> (Mosquitto, FakeD365, tempfile::TempDir) {
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    write_burst_config(tmp.path(), &fake, &broker.url(), "shutdown_grace: 10s\n");
    (broker, fake, tmp)
}

async fn wait_all(fake: &FakeD365, total: usize) {
    fake.wait_accepted_count(total).await;
}

async fn started(dir: &Path, out: &Output, runs: usize) -> process::Running {
    let gw = process::start(&["run", "-c", path_str(dir)], out);
    out.wait_for_count("Subscribed.", runs).await;
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_reported_once_and_a_restart_reports_nothing_again() {
    let (broker, fake, tmp) = setup().await;
    let out = Output::new();
    let n = per_order();

    let gw = started(tmp.path(), &out, 1).await;
    publish_burst(broker.port, &orders(), 1, n).await;
    wait_all(&fake, ORDERS * n as usize).await;
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(count_burst(&fake, u64::from(n)), EXACT);

    // Started again on the same data and broker: nothing comes back, and one more impulse
    // per order flows after what was there.
    let gw = started(tmp.path(), &out, 2).await;
    publish_burst(broker.port, &orders(), n + 1, n + 1).await;
    wait_all(&fake, ORDERS * (n as usize + 1)).await;
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(
        count_burst(&fake, u64::from(n + 1)),
        EXACT,
        "after the restart"
    );
    let connections = fake.connections();
    let requests = fake.received().len() as u64;
    println!(
        "burst: {} impulses, {requests} requests over {connections} connections",
        ORDERS * (n as usize + 1)
    );
    // Two runs, each with at most 50 requests at once (max_in_flight) on connections it
    // keeps open, and its token request. (Not a ratio to the requests: joined requests
    // carry up to 100 messages, so their number depends on how the burst queued up.)
    assert!(
        connections <= 2 * (50 + 1) && requests > connections,
        "HTTP connections are reused: {connections} connections for {requests} requests"
    );
    assert!(
        !out.text().contains("Cannot acknowledge"),
        "no ack was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_in_the_middle_of_a_burst_loses_and_doubles_nothing() {
    let (broker, fake, tmp) = setup().await;
    let out = Output::new();
    let n = per_order();
    let total = ORDERS * n as usize;

    let gw = started(tmp.path(), &out, 1).await;
    let port = broker.port;
    let publishers = tokio::spawn(async move { publish_burst(port, &orders(), 1, n).await });
    wait_all(&fake, total / 3).await;
    gw.kill9().await;
    let (resolved, retried) = support::settle_interrupted(&fake, tmp.path()).await;

    let gw = started(tmp.path(), &out, 2).await;
    publishers.await.unwrap();
    wait_all(&fake, total).await;
    assert_eq!(gw.terminate().await, 0);
    println!(
        "kill -9: {total} impulses, {resolved} interrupted requests resolved, {retried} sent again"
    );
    assert_eq!(count_burst(&fake, u64::from(n)), EXACT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_in_the_middle_of_a_burst_loses_and_doubles_nothing() {
    let (mut broker, fake, tmp) = setup().await;
    let out = Output::new();
    let n = per_order();
    let total = ORDERS * n as usize;

    // The gateway's session exists (first run); the burst then sits in the broker while
    // the gateway is down; the gateway drains it and the broker restarts while it does.
    let gw = started(tmp.path(), &out, 1).await;
    assert_eq!(gw.terminate().await, 0);
    publish_burst(broker.port, &orders(), 1, n).await;
    let gw = started(tmp.path(), &out, 2).await;
    wait_all(&fake, total / 3).await;
    broker.restart().await;
    wait_all(&fake, total).await;
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(count_burst(&fake, u64::from(n)), EXACT);
    assert!(
        out.text().contains("MQTT connection lost"),
        "the broker restart was seen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_d365_outage_during_a_burst_delays_but_loses_and_doubles_nothing() {
    let (broker, fake, tmp) = setup().await;
    support::mqtt::resend_when_ambiguous(tmp.path());
    let out = Output::new();
    let n = (per_order() / 4).max(4);
    let total = ORDERS * n as usize;

    let gw = started(tmp.path(), &out, 1).await;
    // D365 down for maintenance (503) while the first half arrives …
    fake.unavailable(true);
    publish_burst(broker.port, &orders(), 1, n / 2).await;
    fake.wait_until("503 answers on many lanes", |r| {
        r.iter().filter(|r| r.status == Some(503)).count() >= ORDERS
    })
    .await;
    // … then unreachable (connections refused) while the second half arrives.
    fake.refuse_connections();
    fake.unavailable(false);
    publish_burst(broker.port, &orders(), n / 2 + 1, n).await;
    out.wait_for("not sent").await;
    // Back: everything goes out, in order, once.
    fake.accept_connections().await;
    fake.wait_accepted_count(total).await;
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(count_burst(&fake, u64::from(n)), EXACT);
    let records = Outbox::open(&tmp.path().join("data"))
        .unwrap()
        .list(None, None)
        .unwrap();
    assert!(
        records.iter().all(|r| r.state == State::Delivered),
        "no message failed or uncertain over a 503 and refused connections"
    );
}
