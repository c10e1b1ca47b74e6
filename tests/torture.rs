//! Crash loop (issue 9, scenario 1): under continuous load — MQTT QoS 1 bursts on 50
//! orders and a Modbus PLC whose piece counter keeps counting — the gateway is killed with
//! SIGKILL at random moments and started again, many times. After each kill the messages
//! it left `sending` are settled as an operator would: resolved where the fake D365 has
//! them, sent again where it does not. At the end every impulse the broker acknowledged to
//! its publisher has reached D365 exactly once, per order in order, and the pieces
//! reported for the PLC's order add up to exactly what its counter counted (the counter
//! base is committed with the messages, so a kill neither loses nor repeats a delta).
//!
//! `TORTURE_KILLS` sets the number of kills (default 5, the CI's short version):
//! `TORTURE_KILLS=50 cargo test --release --test torture -- --nocapture`.

use mes_gateway_testkit as support;

use std::time::Duration;

use mes_gateway::outbox::Outbox;
use support::mqtt::{
    burst_orders, count_burst, spawn_steady_load, write_burst_config, Mosquitto, EXACT,
};
use support::plc::CounterPlc;
use support::process::{self, path_str, Output};
use support::FakeD365;

fn kills() -> usize {
    std::env::var("TORTURE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_kills_under_load_lose_nothing_and_send_nothing_twice() {
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    // Answers take a moment, so kills land while requests are on the wire.
    fake.delay_responses(Duration::from_millis(5));
    let (plc, plc_addr, _plc_server) = CounterPlc::start().await;
    let tmp = tempfile::tempdir().unwrap();
    write_burst_config(
        tmp.path(),
        &fake,
        &broker.url(),
        &format!("{}shutdown_grace: 5s\n", CounterPlc::gateway_yaml(plc_addr)),
    );
    std::fs::write(
        tmp.path().join("rules.d/plc.yaml"),
        CounterPlc::rules_yaml(PLC_ORDER),
    )
    .unwrap();
    let cfg = path_str(tmp.path()).to_string();
    let data = tmp.path().join("data");
    let out = Output::new();
    let kills = kills();
    let per_round = 20u32;
    let rounds = (kills as u32) * 3;

    let mut rng = fastrand::Rng::with_seed(kills as u64);
    let (mut resolved, mut retried) = (0, 0);
    let mut load = None;
    let mut counter = None;
    for k in 0..kills {
        let gw = process::start_logging(&["run", "-c", &cfg], &out, "info");
        out.wait_for_count("Subscribed.", k + 1).await;
        if load.is_none() {
            // The first reading of a counter only sets its base: count once the base is
            // durable, i.e. once a first delta has reached D365.
            while plc.reads() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            plc.add(1);
            fake.wait_until("the PLC's first pieces", |r| {
                r.iter().any(|r| r.order == PLC_ORDER)
            })
            .await;
            let counting = plc.clone();
            counter = Some(tokio::spawn(async move {
                // The machine makes a piece every 2 ms while the kills go on.
                for _ in 0..(rounds * 40) {
                    counting.add(1);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
            // The gateway's session exists now (what is published before it goes nowhere);
            // the load goes on for as long as the kills do.
            load = Some(spawn_steady_load(broker.port, rounds, per_round));
        }
        // A random moment while messages flow (the kill is the fault being injected; no
        // test condition waits on this sleep).
        tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await;
        gw.kill9().await;
        let (r, s) = support::settle_interrupted(&fake, tmp.path()).await;
        resolved += r;
        retried += s;
    }

    // The last run drains everything.
    let gw = process::start_logging(&["run", "-c", &cfg], &out, "info");
    load.expect("load started").await.unwrap();
    counter.expect("counter started").await.unwrap();
    let pieces = plc.count();
    let total = burst_orders().len() * (rounds * per_round) as usize;
    let drained = tokio::time::timeout(Duration::from_secs(120), async {
        // Cheap waits only: the fake may hold 150,000 requests by now. Accepted requests
        // count the PLC's messages too, so: most of it, then every PLC piece, then all
        // the MQTT impulses besides the PLC's messages.
        fake.wait_accepted_count(total).await;
        fake.wait_until("the PLC's pieces", |r| plc_pieces(r) >= pieces)
            .await;
        let plc_messages = fake
            .accepted()
            .iter()
            .filter(|r| r.order == PLC_ORDER)
            .map(|r| r.ids().len())
            .sum::<usize>();
        fake.wait_accepted_count(total + plc_messages).await;
    })
    .await;
    assert_eq!(gw.terminate().await, 0);
    if drained.is_err() {
        let outbox = Outbox::open(&data).unwrap();
        let stuck: Vec<_> = outbox
            .list(None, None)
            .unwrap()
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .map(|r| (r.id, r.production_order, r.state, r.last_error))
            .take(20)
            .collect();
        panic!(
            "not drained: {} of {total} accepted; outbox {:?}; first waiting: {stuck:#?}\n{}",
            fake.accepted().len(),
            outbox.counts(),
            out.text()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    let count = count_burst(&fake, u64::from(rounds * per_round));
    let reported = plc_pieces(&fake.received());
    println!(
        "crash loop: {kills} kills, {total} MQTT impulses and {pieces} PLC pieces, {} messages delivered, {resolved} interrupted requests resolved, {retried} sent again; MQTT lost {}, duplicates {}; PLC pieces reported {reported} of {pieces}",
        fake.accepted().len(),
        count.lost,
        count.duplicates
    );
    assert_eq!(count, EXACT);
    assert_eq!(reported, pieces, "every counted piece reported once");
}

/// The order of the PLC's pieces.
const PLC_ORDER: &str = "PLC001";

/// Pieces D365 accepted for the PLC's order.
fn plc_pieces(received: &[support::Received]) -> u32 {
    support::pieces(received, PLC_ORDER)
}
