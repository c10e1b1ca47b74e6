//! Outbox figures: durable appends per second by batch size (one flush per batch), the
//! time and memory to reopen a store with a backlog, and the disk it uses.
//!
//!     cargo bench --bench outbox            # full run, prints a table
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs a few records only,
//! so CI checks that the benchmark still works without spending minutes on it.

use std::time::Instant;

use mes_gateway::outbox::{NewMessage, Outbox};

fn message(i: u64) -> NewMessage {
    // About 350 bytes stored, like a typical ReportFinished message with its history.
    NewMessage {
        production_order: format!("P{:06}", i % 20),
        message_type: "ProdProductionOrderReportFinished".into(),
        content: format!(
            r#"{{"ProductionOrderNumber":"P{:06}","ReportFinishedLines":[{{"ItemNumber":"A0001","ReportedGoodQuantity":{},"ReportAsFinishedDate":"2026-11-24"}}]}}"#,
            i % 20,
            i % 50 + 1
        ),
        origin: "rule good-parts".into(),
        line: None,
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (per_size, backlog) = if full {
        (20_000u64, 200_000u64)
    } else {
        (20, 100)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!("durable appends (one flush per batch), {per_size} records per batch size:");
    println!("{:>10} {:>14}", "batch", "records/s");
    for batch in [1u64, 10, 100, 1000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path()).expect("open");
        let start = Instant::now();
        let mut i = 0;
        rt.block_on(async {
            while i < per_size {
                let n = batch.min(per_size - i);
                outbox
                    .append((i..i + n).map(message).collect())
                    .await
                    .expect("append");
                i += n;
            }
        });
        let rate = per_size as f64 / start.elapsed().as_secs_f64();
        println!("{batch:>10} {rate:>14.0}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    {
        let outbox = Outbox::open(dir.path()).expect("open");
        rt.block_on(async {
            for chunk in (0..backlog).collect::<Vec<_>>().chunks(1000) {
                outbox
                    .append(chunk.iter().copied().map(message).collect())
                    .await
                    .expect("append");
            }
        });
    }
    let rss_before = rss_kib();
    let start = Instant::now();
    let outbox = Outbox::open(dir.path()).expect("reopen");
    let open_time = start.elapsed();
    let rss_after = rss_kib();
    println!(
        "reopen with a backlog of {backlog} queued records: {:.2} s, RSS +{} MiB, {} lanes, store {} MiB on disk",
        open_time.as_secs_f64(),
        rss_after.saturating_sub(rss_before) / 1024,
        outbox.lane_heads(None, usize::MAX).unwrap().len(),
        outbox.disk_bytes() / (1024 * 1024)
    );
}
