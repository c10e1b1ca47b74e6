//! Power cut (issue 9, scenario 2): the data directory is an ext4 file system on a loop
//! device. Under continuous MQTT load the power is cut at random moments: the gateway is
//! frozen, the device is copied as it is (what was written to it survives; the page
//! cache, everything not yet fsynced, is lost), the gateway is killed, and the machine
//! "boots" from that copy. After each cut the messages left `sending` are settled as an
//! operator would (resolved where the fake D365 has them). At the end every impulse the
//! broker acknowledged to its publisher has reached D365 exactly once, per order in
//! order: nothing acknowledged upstream was only in memory or in the page cache.
//!
//! Why not dm-flakey: this machine's kernel has no device-mapper. A copy of the loop
//! device's backing file is the same crash image: it holds exactly the blocks the
//! device received, including every fsync's, and none of the page cache above it.
//!
//! `POWER_CUTS` sets the number of cuts (default 3):
//! `POWER_CUTS=20 cargo test --release --test power_cut -- --nocapture`.
//!
//! This is the test that made the gateway replace its storage engine: sled 0.34 could not
//! recover its store from such a crash image (a panic inside its recovery, "tried to
//! serialize Uninitialized"; forced open with its snapshots set aside, it had lost 2,256
//! of 9,000 acknowledged impulses). redb publishes each commit with one checksummed
//! header write after an fsync, so a cut leaves the commit before or the one after.
//! Measured: `POWER_CUTS=20 cargo test --release --test power_cut -- --nocapture`:
//! 20 cuts, 60,000 impulses, lost 0, duplicates 0, out of order 0.

use mes_gateway_testkit as support;

use std::time::Duration;

use support::disk::LoopDisk;
use support::mqtt::{
    burst_orders, count_burst, spawn_steady_load, write_burst_config, Mosquitto, EXACT,
};
use support::process::{self, path_str, Output};
use support::FakeD365;

fn cuts() -> usize {
    std::env::var("POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_load_lose_nothing_acknowledged_and_send_nothing_twice() {
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    // Answers take a moment, so cuts land while requests are on the wire.
    fake.delay_responses(Duration::from_millis(5));
    let mut disk = LoopDisk::create(256);
    let data = disk.path().join("data");
    let tmp = tempfile::tempdir().unwrap();
    write_burst_config(tmp.path(), &fake, &broker.url(), "shutdown_grace: 5s\n");
    let main = tmp.path().join("gateway.yaml");
    let yaml = std::fs::read_to_string(&main)
        .unwrap()
        .replace("data_dir: data", &format!("data_dir: {}", data.display()));
    std::fs::write(&main, yaml).unwrap();
    let cfg = path_str(tmp.path()).to_string();
    let out = Output::new();
    let cuts = cuts();
    let per_round = 20u32;
    let rounds = (cuts as u32) * 3;

    let mut rng = fastrand::Rng::with_seed(cuts as u64);
    let (mut resolved, mut retried) = (0, 0);
    let mut load = None;
    for k in 0..cuts {
        let gw = process::start_logging(&["run", "-c", &cfg], &out, "info");
        out.wait_for_count("Subscribed.", k + 1).await;
        if load.is_none() {
            // The gateway's session exists now (what is published before it goes nowhere);
            // the load goes on for as long as the cuts do.
            load = Some(spawn_steady_load(broker.port, rounds, per_round));
        }
        // A random moment while messages flow (the cut is the fault being injected; no
        // test condition waits on this sleep).
        tokio::time::sleep(Duration::from_millis(rng.u64(100..600))).await;
        // SAFETY: kill(2) on our own child with a valid signal.
        unsafe { libc::kill(gw.pid(), libc::SIGSTOP) };
        disk.cut_power();
        gw.kill9().await;
        disk.power_back();
        let (r, s) = support::settle_interrupted_in(&fake, tmp.path(), &data).await;
        resolved += r;
        retried += s;
    }

    // The last run drains everything.
    let gw = process::start_logging(&["run", "-c", &cfg], &out, "info");
    load.expect("load started").await.unwrap();
    let total = burst_orders().len() * (rounds * per_round) as usize;
    fake.wait_accepted_count(total).await;
    assert_eq!(gw.terminate().await, 0);
    let count = count_burst(&fake, u64::from(rounds * per_round));
    println!(
        "power cuts: {cuts} cuts, {total} MQTT impulses, {} messages delivered, {resolved} interrupted requests resolved, {retried} sent again; lost {}, duplicates {}, out of order {}",
        fake.accepted_messages(),
        count.lost,
        count.duplicates,
        count.out_of_order.len()
    );
    assert_eq!(count, EXACT);
}
