//! OPC UA benchmark: a real OPC UA server on a loopback port (async-opcua's, the PLC
//! stand-in of the tests) with 200 UInt32 counters, changed 1,000 times a second in
//! total (10 counters every 10 ms, round robin), monitored by the release gateway (one
//! subscription, 200 items, sampling on change), each counter counted by `delta` into
//! ReportFinished messages for a fake D365.
//!
//! Run: `cargo bench --bench opcua` (20 s of load; `cargo test --all-targets` runs it for
//! 1 s as a smoke test).
//!
//! Prints: notifications sent and seen by the gateway, the gateway's CPU per notification
//! (µs) and its CPU share, its RSS (current and peak), and that every piece reached D365.

#[path = "measure.rs"]
mod measure;
use mes_gateway_testkit as support;

use std::time::{Duration, Instant};

use measure::{cpu_seconds, rss_mib};
use support::opcua::UaPlc;
use support::process::{self, path_str, Output};

const ITEMS: usize = 200;
const PER_TICK: usize = 10;
const TICK: Duration = Duration::from_millis(10);

/// Waits until the gateway's source has had `n` events; how many it had.
async fn events_at_least(cfg: &str, n: u64) -> u64 {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let (_, status, _) = process::run(&["status", "-c", cfg, "--json"]).await;
            let v: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
            let events = v["sources"][0]["events"].as_u64().unwrap_or(0);
            if events >= n {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the gateway never had {n} notifications"))
}

async fn run(seconds: u64) {
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let names = plc.add_counters(ITEMS);
    let fake = support::FakeD365::start().await;
    let etc = dir.path().join("etc");
    let nodes: String = names
        .iter()
        .map(|n| {
            format!(
                "      - name: {n}\n        node_id: \"ns={};s={n}\"\n",
                plc.ns
            )
        })
        .collect();
    support::write_config(
        &etc,
        &format!(
            "{}dispatcher:\n  request_budget: off\nstorage:\n  data_dir: data\nsources:\n  - type: opcua\n    id: plc\n    endpoint: {}\n    trust_any_server: true\n    publishing_interval: 50ms\n    queue_size: 100\n    nodes:\n{nodes}",
            support::d365_yaml(&fake),
            plc.endpoint(),
        ),
    );
    std::fs::create_dir_all(etc.join("rules.d")).unwrap();
    let rules: String = names
        .iter()
        .map(|n| format!("  - name: count-{n}\n    line: line1\n    when: {{ source: plc, point: {n} }}\n    count: delta\n    aggregate: {{ every: 50, interval: 1h }}\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: {{ ProductionOrderNumber: P{n}, ItemNumber: A0001, ReportedGoodQuantity: \"{{quantity}}\" }}\n"))
        .collect();
    std::fs::write(
        etc.join("rules.d/counters.yaml"),
        format!("rules:\n{rules}"),
    )
    .unwrap();
    let cfg = path_str(&etc).to_string();
    let out = Output::new();
    let gw = process::start_logging(&["run", "-c", &cfg], &out, "warn,mes_gateway=info");
    out.wait_for("OPC UA subscription created.").await;
    // Each counter's first value (its delta base) first.
    events_at_least(&cfg, ITEMS as u64).await;
    let pid = gw.pid();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let mut ticks = tokio::time::interval(TICK);
    let mut counters = vec![0u32; ITEMS];
    let mut next = 0usize;
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        ticks.tick().await;
        for _ in 0..PER_TICK {
            counters[next] += 1;
            plc.set(&names[next], counters[next]);
            next = (next + 1) % ITEMS;
            sent += 1;
        }
    }
    let elapsed = started.elapsed();
    // Everything counted reaches D365 (the last partial windows at shutdown).
    let total: u64 = counters.iter().map(|c| u64::from(*c)).sum();
    let seen_before_stop = events_at_least(&cfg, sent + ITEMS as u64).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let (rss, peak) = rss_mib(pid);
    assert_eq!(gw.terminate().await, 0);
    let again = Output::new();
    let gw = process::start_logging(&["run", "-c", &cfg], &again, "warn");
    fake.wait_until("every piece", |_| {
        let pieces: u64 = names
            .iter()
            .map(|n| u64::from(support::pieces(&fake.received(), &format!("P{n}"))))
            .sum();
        pieces >= total
    })
    .await;
    assert_eq!(gw.terminate().await, 0);
    let pieces: u64 = names
        .iter()
        .map(|n| u64::from(support::pieces(&fake.received(), &format!("P{n}"))))
        .sum();
    assert_eq!(pieces, total, "lost 0, doubled 0");
    println!(
        "opcua: {ITEMS} items, {sent} notifications in {:.1} s ({:.0}/s); gateway saw {seen_before_stop} (incl. the first values); gateway CPU {:.2} s = {:.0} µs per notification ({:.1} % of one core); RSS {:.1} MiB, peak {:.1} MiB; pieces at D365 {pieces} of {total}",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        cpu,
        cpu * 1e6 / sent as f64,
        cpu * 100.0 / elapsed.as_secs_f64(),
        rss,
        peak,
    );
    plc.stop().await;
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(if full { 20 } else { 1 }));
}
