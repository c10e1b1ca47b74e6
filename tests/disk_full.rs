//! Disk full, on a real small file system (a tmpfs): a clear error, nothing stored twice,
//! nothing acknowledged lost, and the gateway writes again by itself once space is freed.

use mes_gateway_testkit as support;

use std::collections::HashMap;
use std::sync::Arc;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mes_gateway::outbox::{Ingest, NewMessage, Outbox, State};
use support::disk::SmallDisk;
use support::mqtt::{
    burst_orders, count_burst, publish_burst, write_burst_config, Mosquitto, EXACT,
};
use support::process::{self, path_str, Output};
use support::FakeD365;
use tokio::net::UnixDatagram;

fn impulse(n: u32) -> NewMessage {
    NewMessage {
        production_order: format!("P{:03}", n % 7),
        message_type: "ProdProductionOrderReportFinished".into(),
        // Padded so the disk fills after a few thousand messages.
        content: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(300)),
        origin: "test".into(),
        line: None,
    }
}

fn n_of(content: &str) -> u32 {
    let v: serde_json::Value = serde_json::from_str(content).unwrap();
    v["n"].as_u64().unwrap() as u32
}

/// The store alone: writes fail while the disk is full (sled then refuses every write,
/// even after space is freed, until reopened); the batch that failed is retried as it is,
/// succeeds once space is back, and every message is there exactly once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn outbox_resumes_after_disk_full_without_losing_or_doubling() {
    let disk = SmallDisk::mount(24);
    let data = disk.path().join("data");
    let outbox = Outbox::open(&data).unwrap();
    disk.fill(4 * 1024);

    let mut next = 0;
    let mut stored = 0;
    let (failed, error) = loop {
        let batch = Arc::new(Ingest::new(
            (next..next + 100).map(impulse).collect(),
            Some(("rules".into(), next.to_string().into_bytes())),
            Vec::new(),
        ));
        next += 100;
        match outbox.commit(batch.clone()).await.map(|c| c.records) {
            Ok(records) => stored += records.len(),
            Err(e) => break (batch, e),
        }
        assert!(next < 200_000, "the disk never filled");
    };
    assert!(stored > 0, "the disk filled before the first batch");
    assert!(
        error.to_string().contains("No space left on device"),
        "the error says why: {error}"
    );
    // Still full: still refused, nothing half-stored shows up.
    assert!(outbox.commit(failed.clone()).await.is_err());

    disk.free();
    let records = outbox
        .commit(failed.clone())
        .await
        .expect("writes again once space is freed")
        .records;
    assert_eq!(records.len(), 100);
    let later = outbox
        .commit(Ingest::of((next..next + 100).map(impulse).collect()))
        .await
        .expect("and keeps writing")
        .records;
    assert!(later[0].id > records[99].id, "id order is append order");
    let total = stored + 200;
    assert_eq!(outbox.counts().get(&State::Queued), Some(&total));
    assert_eq!(
        outbox.store().owners().load("rules").unwrap(),
        Some((next - 100).to_string().into_bytes()),
        "the rules state of the retried batch is the one saved"
    );
    drop(outbox);

    // What is on disk after a reopen: every impulse once, per order in order.
    let outbox = Outbox::open(&data).unwrap();
    let all = outbox.list(None, None).unwrap();
    let mut seen = HashMap::new();
    let mut last_per_order: HashMap<String, u32> = HashMap::new();
    for r in &all {
        let n = n_of(&r.content);
        *seen.entry(n).or_insert(0) += 1;
        if let Some(prev) = last_per_order.insert(r.production_order.clone(), n) {
            assert!(
                prev < n,
                "order {} out of order: {prev} before {n}",
                r.production_order
            );
        }
    }
    let expected: Vec<u32> = (0..stored as u32).chain(next - 100..next + 100).collect();
    let duplicates = seen.values().filter(|&&c| c > 1).count();
    let lost = expected.iter().filter(|n| !seen.contains_key(n)).count();
    println!(
        "disk full after {stored} messages; stored {} after freeing space; lost {lost}, duplicates {duplicates}",
        all.len()
    );
    assert_eq!((lost, duplicates, all.len()), (0, 0, total));
}

/// Counts systemd watchdog pings the gateway sends to a socket the test owns.
fn count_watchdog_pings(socket: UnixDatagram) -> Arc<AtomicUsize> {
    let pings = Arc::new(AtomicUsize::new(0));
    let counter = pings.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok(n) = socket.recv(&mut buf).await {
            if &buf[..n] == b"WATCHDOG=1" {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    pings
}

/// The whole gateway on a data directory that fills up under an MQTT burst: a clear
/// error, the watchdog keeps being fed (waiting for space is not a hang), nothing the
/// broker had acknowledged to the publishers is lost, and once space is freed the
/// gateway resumes by itself: every impulse reaches D365 once, per order in order.
/// Then the disk fills again and the gateway is killed: started on the full disk it says
/// why it cannot open the outbox; started after space is freed it delivers the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_intake_without_loss_and_the_gateway_resumes_by_itself() {
    let disk = SmallDisk::mount(64);
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("etc");
    write_burst_config(&cfg, &fake, &broker.url(), "");
    let main = cfg.join("gateway.yaml");
    let yaml = std::fs::read_to_string(&main).unwrap().replace(
        "data_dir: data",
        &format!("data_dir: {}", disk.path().join("data").display()),
    );
    std::fs::write(&main, yaml).unwrap();
    let socket_path = tmp.path().join("notify.sock");
    let pings = count_watchdog_pings(UnixDatagram::bind(&socket_path).unwrap());
    let env = [
        ("NOTIFY_SOCKET", path_str(&socket_path)),
        ("WATCHDOG_USEC", "1000000"),
    ];
    let orders = burst_orders();
    let orders_n = orders.len();
    let args = ["run", "-c", path_str(&cfg)];
    let out = Output::new();

    let gw = process::start_with_env(&args, &out, "info", &env);
    out.wait_for("Subscribed.").await;
    publish_burst(broker.port, &orders, 1, 20).await;
    fake.wait_accepted_count(orders_n * 20).await;

    // Full: the next impulses cannot be stored.
    disk.fill(256);
    publish_burst(broker.port, &orders, 21, 60).await;
    out.wait_for("No space left on device").await;
    let before = pings.load(Ordering::Relaxed);
    let stuck = fake.accepted().len();
    // Six more pings (three watchdog periods: systemd would have killed a daemon that
    // stopped pinging) while the disk stays full, and no loop reported as stalled.
    let fed = tokio::time::timeout(Duration::from_secs(15), async {
        while pings.load(Ordering::Relaxed) < before + 6 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        fed.is_ok() && !out.text().contains("No progress"),
        "the watchdog is fed while the disk is full: {}",
        out.text()
    );
    assert!(
        stuck < orders_n * 60,
        "the disk filled before the burst was stored"
    );

    disk.free();
    fake.wait_accepted_count(orders_n * 60).await;
    out.wait_for("Outbox reopened after a write error").await;
    assert_eq!(count_burst(&fake, 60), EXACT);

    // Full again, and killed while full.
    disk.fill(256);
    publish_burst(broker.port, &orders, 61, 100).await;
    out.wait_for_count("No space left on device", 2).await;
    gw.kill9().await;
    // Started on a disk without a free byte: the store opens (its file reuses the pages
    // freed inside it; a repair after the kill needs no new space) and the gateway runs,
    // saying the disk is full, instead of failing into a restart loop.
    disk.fill_completely();
    let full_start = Output::new();
    let gw = process::start_with_env(&args, &full_start, "info", &env);
    full_start.wait_for("Gateway running.").await;
    full_start.wait_for("No space left on device").await;
    // The disk-full incident of the run before is still open: taken back, not announced
    // again (alerts are durable incidents).
    full_start
        .wait_for("Alerts still open from before the restart; not announced again.")
        .await;
    assert!(
        full_start
            .text()
            .lines()
            .any(|l| l.contains("not announced again") && l.contains("disk_free")),
        "{}",
        full_start.text()
    );
    gw.kill9().await;
    assert!(
        !full_start.text().contains("panicked"),
        "no panic on a full disk: {}",
        full_start.text()
    );

    disk.free();
    let (resolved, retried) =
        support::settle_interrupted_in(&fake, &cfg, &disk.path().join("data")).await;
    let gw = process::start_with_env(&args, &out, "info", &env);
    fake.wait_accepted_count(orders_n * 100).await;
    assert_eq!(gw.terminate().await, 0);
    let count = count_burst(&fake, 100);
    println!(
        "disk full twice during {} impulses (killed while full: {resolved} interrupted requests resolved, {retried} sent again): lost {}, duplicates {}",
        orders_n * 100,
        count.lost,
        count.duplicates
    );
    assert_eq!(count, EXACT);
}
