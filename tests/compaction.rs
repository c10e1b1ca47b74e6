//! Compaction killed half-way: `mes-gateway outbox compact` on a store with a drained
//! backlog, SIGKILLed at moments spread over its run; after every kill the store opens
//! with every record, lane and count it had, and a compaction that finished gave back
//! the disk.

use mes_gateway_testkit as support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use mes_gateway::outbox::{Ingest, MessageId, NewMessage, Outbox, Record, Settlement, State};
use support::process::{self, path_str, Output};
use support::{d365_yaml, write_config, FakeD365};

const ORDERS: [&str; 4] = ["P1", "P2", "P3", "P4"];

fn message(i: u32) -> NewMessage {
    let order = ORDERS[i as usize % ORDERS.len()];
    NewMessage {
        production_order: order.into(),
        message_type: "ProdProductionOrderReportFinished".into(),
        content: format!("{{\"ProductionOrderNumber\":\"{order}\",\"n\":{i}}}"),
        origin: "test".into(),
        line: None,
    }
}

/// `total` messages appended; all but the last `live` delivered and pruned.
async fn drained_store(data: &Path, total: u32, live: u32) {
    let outbox = Outbox::open(data).unwrap();
    let mut n = 0;
    while n < total {
        let batch = 2000.min(total - n);
        let recs = outbox
            .commit(Ingest::of((n..n + batch).map(message).collect()))
            .await
            .unwrap()
            .records;
        let done: Vec<MessageId> = recs
            .iter()
            .zip(n..)
            .filter(|(_, i)| *i < total - live)
            .map(|(r, _)| r.id)
            .collect();
        outbox.mark_sending(&done).await.unwrap();
        let settled = done
            .iter()
            .map(|&id| Settlement::delivered(id, "HTTP 200"))
            .collect();
        outbox.settle(settled).await.unwrap();
        n += batch;
    }
    outbox
        .prune(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60))
        .await
        .unwrap();
}

/// What the store holds: records, counts, lanes.
fn contents(data: &Path) -> (Vec<Record>, BTreeMap<State, usize>, Vec<Vec<MessageId>>) {
    let outbox = Outbox::open(data).unwrap();
    let mut counts = outbox.counts();
    counts.retain(|_, n| *n > 0);
    let lanes = ORDERS.iter().map(|o| outbox.lane(o).unwrap()).collect();
    (outbox.list(None, None).unwrap(), counts, lanes)
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

fn dir_mib(dir: &Path) -> f64 {
    let out = std::process::Command::new("du")
        .args(["-sk"])
        .arg(dir)
        .output()
        .unwrap();
    let kib: f64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|k| k.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_killed_at_any_moment_loses_nothing() {
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("etc");
    let data = cfg.join("data");
    write_config(
        &cfg,
        &format!("{}storage:\n  data_dir: data\n", d365_yaml(&fake)),
    );
    let pristine = tmp.path().join("pristine");
    drained_store(&pristine, 60_000, 10_000).await;
    let expected = contents(&pristine);
    let size_before = dir_mib(&pristine.join("outbox"));

    // One undisturbed run, to know how long a compaction takes.
    copy_dir(&pristine, &data);
    let args = ["outbox", "-c", path_str(&cfg), "compact"];
    let started = Instant::now();
    let (code, stdout, stderr) = process::run(&args).await;
    let full_run = started.elapsed();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("outbox compacted"), "{stdout}");
    let size_after = dir_mib(&data.join("outbox"));
    assert!(
        size_after * 2.0 < size_before,
        "gives back disk: {size_before:.1} MiB before, {size_after:.1} MiB after"
    );
    assert_eq!(
        contents(&data),
        expected,
        "an undisturbed compaction keeps everything"
    );
    std::fs::remove_dir_all(&data).unwrap();

    // Killed at moments spread over the run (from the process start, so the earliest
    // ones land while the store is still being opened and copied).
    let mut finished = 0;
    for tenth in [1u32, 3, 5, 6, 7, 8, 9, 10] {
        copy_dir(&pristine, &data);
        let out = Output::new();
        let gw = process::start_logging(&args, &out, "info");
        tokio::time::sleep(full_run * tenth / 10).await;
        gw.kill9().await;
        if out.text().contains("outbox compacted") {
            finished += 1;
        }
        let got = contents(&data);
        assert!(
            got == expected,
            "killed at {tenth}/10 of a compaction: the store changed ({} records, want {})",
            got.0.len(),
            expected.0.len()
        );
        for leftover in ["outbox.compact", "outbox.old"] {
            assert!(
                !data.join(leftover).exists(),
                "{leftover} left at {tenth}/10"
            );
        }
        std::fs::remove_dir_all(&data).unwrap();
    }
    println!(
        "compaction of {size_before:.1} MiB ({} records live) to {size_after:.1} MiB in {:.2} s; killed 8 times, {finished} of them after it finished: nothing lost",
        expected.0.len(),
        full_run.as_secs_f64()
    );
}
