//! Outbox figures: durable appends per second by batch size (one flush per batch), the
//! time and memory to reopen a store with a backlog, and the disk it uses, and the
//! dispatcher's side of delivery without HTTP: turns of picking lane heads, recording
//! the previous turn's deliveries and marking the next heads (one commit per turn), with
//! the CPU they take per message.
//!
//!     cargo bench --bench outbox            # full run, prints a table
//!     cargo bench --bench outbox -- turns   # only the sections named so (appends, reopen, turns, hop, evidence)
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs a few records only,
//! so CI checks that the benchmark still works without spending minutes on it.

use std::time::Instant;

#[path = "measure.rs"]
mod measure;

use mes_gateway::outbox::{Ingest, NewMessage, Outbox, Record, Settlement};

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

/// Appends messages `0..n` made by `make`, 1,000 per commit.
fn queue(rt: &tokio::runtime::Runtime, outbox: &Outbox, n: u64, make: impl Fn(u64) -> NewMessage) {
    rt.block_on(async {
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            outbox
                .commit(Ingest::of(chunk.iter().copied().map(&make).collect()))
                .await
                .expect("append");
        }
    });
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (per_size, backlog) = if full {
        (20_000u64, 200_000u64)
    } else {
        (20, 100)
    };
    // `cargo bench --bench outbox -- turns` runs only the sections whose name contains "turns".
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let section = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    if section("appends") {
        println!("durable appends (one flush per batch), {per_size} records per batch size:");
        println!(
            "{:>10} {:>14} {:>16} {:>16}",
            "batch", "records/s", "CPU µs/commit", "CPU µs/record"
        );
        for batch in [1u64, 10, 100, 1000] {
            let dir = tempfile::tempdir().expect("tempdir");
            let outbox = Outbox::open(dir.path()).expect("open");
            let cpu0 = measure::cpu_seconds(std::process::id() as i32);
            let start = Instant::now();
            let mut i = 0;
            rt.block_on(async {
                while i < per_size {
                    let n = batch.min(per_size - i);
                    outbox
                        .commit(Ingest::of((i..i + n).map(message).collect()))
                        .await
                        .expect("append");
                    i += n;
                }
            });
            let rate = per_size as f64 / start.elapsed().as_secs_f64();
            let cpu = measure::cpu_seconds(std::process::id() as i32) - cpu0;
            let commits = per_size.div_ceil(batch) as f64;
            println!(
                "{batch:>10} {rate:>14.0} {:>16.0} {:>16.1}",
                cpu * 1e6 / commits,
                cpu * 1e6 / per_size as f64
            );
        }
    }
    if section("reopen") {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let outbox = Outbox::open(dir.path()).expect("open");
            queue(&rt, &outbox, backlog, message);
        }
        let rss_before = measure::rss_mib(std::process::id() as i32).0;
        let start = Instant::now();
        let outbox = Outbox::open(dir.path()).expect("reopen");
        let open_time = start.elapsed();
        let rss_after = measure::rss_mib(std::process::id() as i32).0;
        println!(
            "reopen with a backlog of {backlog} queued records: {:.2} s, RSS +{:.0} MiB, {} lanes, store {} MiB on disk",
            open_time.as_secs_f64(),
            (rss_after - rss_before).max(0.0),
            outbox.lane_heads(None, usize::MAX).unwrap().len(),
            outbox.disk_bytes() / (1024 * 1024)
        );
    }
    if section("turns") {
        // The dispatcher's turns, as in a burst's drain: 50 orders whose messages interleave by
        // id, half of the lanes per turn (they settle into two alternating groups), each turn
        // recording the deliveries of the group before and marking the heads after them.
        let orders = 50u64;
        let per_order = if full { 400 } else { 4 };
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path()).expect("open");
        let burst = |i: u64| NewMessage {
            production_order: format!("P{:06}", i % orders),
            ..message(i)
        };
        queue(&rt, &outbox, orders * per_order, burst);
        let group = (orders / 2) as usize;
        let cpu0 = measure::cpu_seconds(std::process::id() as i32);
        let start = Instant::now();
        let (mut turns, mut delivered) = (0u64, 0usize);
        // Each group's requests in flight: id → the record as marked and sent.
        let mut sent: Vec<std::collections::HashMap<u64, Record>> = vec![Default::default(); 2];
        let mut last: Option<String> = None;
        rt.block_on(async {
            loop {
                let g = (turns % 2) as usize;
                let finished = std::mem::take(&mut sent[g]);
                let busy: std::collections::HashSet<&str> = sent[1 - g]
                    .values()
                    .map(|r| r.production_order.as_str())
                    .collect();
                let heads = outbox
                    .lane_head_ids(
                        last.as_deref(),
                        group,
                        |order| busy.contains(order),
                        |id| finished.contains_key(&id),
                    )
                    .expect("heads");
                if let Some((order, _)) = heads.last() {
                    last = Some(order.clone());
                }
                let ids: Vec<u64> = heads.iter().map(|(_, id)| *id).collect();
                // As the dispatcher does: each outcome carries the record it was sent as.
                let outcomes: Vec<Settlement> = finished
                    .into_values()
                    .map(|r| Settlement::delivered(r.id, "HTTP 200").with_record_as_sent(r))
                    .collect();
                let (settled, marked) =
                    outbox.settle_and_mark(&outcomes, &ids).await.expect("turn");
                delivered += settled.len();
                sent[g] = marked.into_iter().map(|r| (r.id, r)).collect();
                turns += 1;
                if sent.iter().all(|s| s.is_empty()) {
                    break;
                }
            }
        });
        let (cpu, wall) = (
            measure::cpu_seconds(std::process::id() as i32) - cpu0,
            start.elapsed().as_secs_f64(),
        );
        assert_eq!(
            delivered as u64,
            orders * per_order,
            "every message delivered once"
        );
        println!(
            "dispatcher turns without HTTP, {} messages over {orders} orders, {group} lanes per turn: {turns} turns, {:.2} ms per turn, {:.0} msg/s, {:.1} µs of CPU per message",
            orders * per_order,
            wall * 1e3 / turns as f64,
            delivered as f64 / wall,
            cpu * 1e6 / delivered as f64
        );
    }
    if section("hop") {
        // Where write transactions run (crate::store): every write goes to the blocking
        // pool. What that hop costs against the writes it carries: a bare round trip to the
        // pool, a write that is not flushed (forgetting an acknowledged publication, the
        // smallest bookkeeping write) and a durable one (an owner's saved state).
        let rounds = if full { 20_000 } else { 20 };
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path()).expect("open");
        let store = outbox.store().clone();
        let per = |start: Instant, n: u32| start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        let (hop, unflushed, durable) = rt.block_on(async {
            let start = Instant::now();
            for _ in 0..rounds {
                tokio::task::spawn_blocking(|| ()).await.expect("hop");
            }
            let hop = per(start, rounds);
            let start = Instant::now();
            for seq in 0..rounds {
                store
                    .publications()
                    .forget("bench", u64::from(seq))
                    .await
                    .expect("write");
            }
            let unflushed = per(start, rounds);
            let durable_rounds = rounds / 20;
            let start = Instant::now();
            for i in 0..durable_rounds {
                store
                    .owners()
                    .save("bench", i.to_be_bytes().to_vec())
                    .await
                    .expect("write");
            }
            (hop, unflushed, per(start, durable_rounds))
        });
        println!(
            "store write hop: {hop:.1} µs to the blocking pool and back; a write not flushed {unflushed:.1} µs through it; a durable write {durable:.0} µs through it"
        );
    }
    if section("evidence") {
        evidence(&rt, full);
    }
}

/// What the evidence watch (d365/evidence.rs) costs at each look while a message is
/// uncertain: it reads the newest delivered records (up to 5,000) for D365's verdicts and
/// weighs every uncertain message against them, every 5 s.
fn evidence(rt: &tokio::runtime::Runtime, full: bool) {
    use mes_gateway::d365::evidence::{EvidencePolicy, EvidenceWatch};
    use mes_gateway::outbox::{D365Verdict, ProcessedEvent, Settle};
    let delivered = if full { 20_000 } else { 50 };
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(dir.path()).expect("open");
    outbox.index_contents(true);
    queue(rt, &outbox, delivered, message);
    rt.block_on(async {
        // Delivered in order, one turn per order's head, each with D365's verdict.
        loop {
            let heads: Vec<u64> = outbox
                .lane_head_ids(None, usize::MAX, |_| false, |_| false)
                .expect("heads")
                .into_iter()
                .map(|(_, id)| id)
                .collect();
            if heads.is_empty() {
                break;
            }
            let sent = outbox.mark_sending(&heads).await.expect("mark");
            outbox
                .settle(
                    heads
                        .iter()
                        .map(|id| Settlement::delivered(*id, "HTTP 200"))
                        .collect(),
                )
                .await
                .expect("settle");
            let events = sent
                .iter()
                .map(|r| ProcessedEvent {
                    source: "d365".into(),
                    queue: "JmgMES3P".into(),
                    message_type: r.message_type.clone(),
                    content: r.content.clone(),
                    verdict: D365Verdict {
                        at: jiff::Timestamp::now(),
                        state: "Processed".into(),
                        failed: false,
                        result: None,
                        infolog: None,
                        event_id: format!("E{}", r.id),
                        page_url: None,
                    },
                    payload: "{}".into(),
                })
                .collect();
            outbox
                .commit(Ingest::default().with_processed(events))
                .await
                .expect("verdicts");
        }
        // Ten orders held by an uncertain message each.
        let uncertain: Vec<u64> = outbox
            .commit(Ingest::of(
                (0..10)
                    .map(|i| NewMessage {
                        production_order: format!("U{i}"),
                        ..message(i)
                    })
                    .collect(),
            ))
            .await
            .expect("append")
            .records
            .iter()
            .map(|r| r.id)
            .collect();
        outbox.mark_sending(&uncertain).await.expect("mark");
        outbox
            .settle(
                uncertain
                    .iter()
                    .map(|id| Settlement {
                        next: Settle::Uncertain {
                            reason: "bench".into(),
                        },
                        ..Settlement::delivered(*id, "timeout")
                    })
                    .collect(),
            )
            .await
            .expect("uncertain");
    });
    let watch = EvidenceWatch {
        outbox: outbox.clone(),
        // Never enough evidence: every look weighs all ten and resends none.
        policy: EvidencePolicy {
            witnesses: usize::MAX,
            ..EvidencePolicy::default()
        },
        request_timeout: std::time::Duration::from_secs(60),
        board: Default::default(),
    };
    let looks = if full { 50 } else { 2 };
    let cpu0 = measure::cpu_seconds(std::process::id() as i32);
    let start = Instant::now();
    for _ in 0..looks {
        rt.block_on(watch.look(jiff::Timestamp::now()))
            .expect("look");
    }
    let wall = start.elapsed().as_secs_f64() / f64::from(looks);
    let cpu = (measure::cpu_seconds(std::process::id() as i32) - cpu0) / f64::from(looks);
    println!(
        "evidence watch: one look at 10 uncertain messages against the newest of {delivered} delivered ones with verdicts: {:.1} ms wall, {:.1} ms CPU (every 5 s while anything is uncertain: {:.1} % of a core)",
        wall * 1e3,
        cpu * 1e3,
        cpu / 5.0 * 100.0
    );
}
