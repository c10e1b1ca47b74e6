//! Sources recover by themselves under load (issue 9, scenario 4): while MQTT bursts, a
//! counting Modbus PLC and a serial presence sensor keep the gateway busy, the PLC's
//! Modbus server restarts and the serial adapter is unplugged and plugged back (and, in
//! the test kept ignored for a known defect, the broker restarts). `/health` shows each source go down and come back, and at the end D365
//! has every MQTT impulse once and in order, exactly the pieces the PLC counted, and one
//! piece per serial frame the sensor sent while its adapter was plugged in.

use mes_gateway_testkit as support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::device::PtyPair;
use support::mqtt::{burst_orders, count_burst, free_port, publish_burst, Mosquitto, EXACT};
use support::plant::{self, send_frame, PLC_ORDER, SERIAL_ORDER};
use support::plc::CounterPlc;
use support::process::{self, path_str, Output};
use support::{pieces, FakeD365};

async fn health(api_port: u16) -> serde_json::Value {
    match reqwest::get(format!("http://127.0.0.1:{api_port}/health")).await {
        Ok(resp) => resp.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

fn source<'a>(health: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    health["sources"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == id))
        .unwrap_or(&serde_json::Value::Null)
}

/// Polls `/health` until `cond` holds for source `id` (what an operator's monitoring sees).
async fn wait_health(
    api_port: u16,
    id: &str,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) {
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if cond(source(&health(api_port).await, id)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "/health never showed {id} {what}: {}",
        health(api_port).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plc_and_serial_adapter_restarts_under_mqtt_load_lose_nothing() {
    restarts_under_load(false).await;
}

/// With a persistent mosquitto (2.0.11) restarted under load, the broker was seen sending
/// a publish the gateway had stored and acknowledged a second time (DUP 1, same packet
/// id, 270 ms after the ack was confirmed): 1 run in 4–8 reported an impulse twice until
/// the MQTT source kept confirmed identities a moment longer (source/mqtt.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_plc_and_serial_adapter_restarts_under_load_lose_nothing() {
    restarts_under_load(true).await;
}

async fn restarts_under_load(restart_broker: bool) {
    let mut broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let (plc, plc_addr, plc_server) = CounterPlc::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api_port = free_port();
    plant::write_plant_config(
        dir,
        &fake,
        &broker,
        plc_addr,
        &format!("api:\n  listen: 127.0.0.1:{api_port}\n"),
    );
    let device = dir.join(plant::DEVICE_END);
    let pty = PtyPair::start(dir, plant::DEVICE_END, plant::GATEWAY_END).await;

    let out = Output::new();
    let gw = process::start_logging(
        &["run", "-c", path_str(dir)],
        &out,
        &std::env::var("RECOVERY_LOG").unwrap_or_else(|_| "info".into()),
    );
    out.wait_for("Subscribed.").await;
    for id in ["broker", "plc", "sensor"] {
        wait_health(api_port, id, "connected", |s| s["connected"] == true).await;
    }
    // The first reading of the counter only sets its base (see the crash loop).
    plc.add(1);
    fake.wait_until("the PLC's first piece", |r| pieces(r, PLC_ORDER) >= 1)
        .await;

    // Load: MQTT bursts, the PLC counting, the sensor sending a frame every 5 ms while
    // its adapter is plugged in.
    let per_round = 10u32;
    let rounds = 30u32;
    let mqtt_rounds = move |port: u16, from: u32, to: u32| {
        tokio::spawn(async move {
            for round in from..to {
                let (first, last) = (round * per_round + 1, (round + 1) * per_round);
                publish_burst(port, &burst_orders(), first, last).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // The publishers (test clients, not under test) are not restarted with the broker:
    // the first half is published before the restart, the second after, while the
    // gateway is still working through the first.
    mqtt_rounds(broker.port, 0, rounds / 2).await.unwrap();
    let counting = Arc::new(AtomicBool::new(true));
    let plc_load = {
        let (plc, counting) = (plc.clone(), counting.clone());
        tokio::spawn(async move {
            while counting.load(Ordering::Relaxed) {
                plc.add(1);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let plugged = Arc::new(AtomicBool::new(true));
    let frames = Arc::new(AtomicU32::new(0));
    let serial_load = {
        let (plugged, frames, counting, device) = (
            plugged.clone(),
            frames.clone(),
            counting.clone(),
            device.clone(),
        );
        tokio::spawn(async move {
            while counting.load(Ordering::Relaxed) {
                if plugged.load(Ordering::Acquire) && send_frame(&device).await {
                    frames.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    if restart_broker {
        eprintln!("recovery test: restarting the broker");
        // The broker restarts (persistent session: it keeps what the gateway has not acked).
        let reconnects = source(&health(api_port).await, "broker")["reconnects"]
            .as_u64()
            .unwrap_or(0);
        broker.restart().await;
        wait_health(api_port, "broker", "reconnected", |s| {
            s["connected"] == true && s["reconnects"].as_u64().unwrap_or(0) > reconnects
        })
        .await;
    }

    eprintln!("recovery test: second half of the MQTT load");
    let mqtt_load = mqtt_rounds(broker.port, rounds / 2, rounds);

    eprintln!("recovery test: restarting the PLC's server");
    // The PLC's Modbus server goes away and comes back on the same address.
    plc_server.abort();
    wait_health(api_port, "plc", "down", |s| s["connected"] == false).await;
    let plc_server = plc.restart(plc_addr).await;
    wait_health(api_port, "plc", "back", |s| s["connected"] == true).await;

    eprintln!("recovery test: unplugging the serial adapter");
    // The serial adapter is pulled and plugged back in.
    plugged.store(false, Ordering::Release);
    // Frames already written are on their way; the pair going away loses none of them
    // only if the gateway has read them: wait until it has.
    let sent = frames.load(Ordering::Relaxed);
    fake.wait_until("the sensor's frames so far", |r| {
        pieces(r, SERIAL_ORDER) >= sent
    })
    .await;
    pty.stop().await;
    wait_health(api_port, "sensor", "closed", |s| s["connected"] == false).await;
    let pty = PtyPair::start(dir, plant::DEVICE_END, plant::GATEWAY_END).await;
    wait_health(api_port, "sensor", "reopened", |s| s["connected"] == true).await;
    plugged.store(true, Ordering::Release);

    eprintln!("recovery test: waiting for the load to end");
    mqtt_load.await.unwrap();
    counting.store(false, Ordering::Relaxed);
    plc_load.await.unwrap();
    serial_load.await.unwrap();
    let (plc_count, frame_count) = (plc.count(), frames.load(Ordering::Relaxed));
    fake.wait_until("every PLC piece and serial frame", |r| {
        pieces(r, PLC_ORDER) >= plc_count && pieces(r, SERIAL_ORDER) >= frame_count
    })
    .await;
    eprintln!("recovery test: waiting for every piece");
    let mqtt_total = burst_orders().len() * (rounds * per_round) as usize;
    let others = fake
        .accepted()
        .iter()
        .filter(|r| r.order == PLC_ORDER || r.order == SERIAL_ORDER)
        // Messages, not requests: a joined request carries several.
        .map(|r| r.ids().len())
        .sum::<usize>();
    eprintln!("recovery test: waiting for every MQTT impulse");
    let drained = tokio::time::timeout(
        Duration::from_secs(60),
        fake.wait_accepted_count(mqtt_total + others),
    )
    .await;
    if drained.is_err() {
        let got: std::collections::HashSet<u64> = fake
            .accepted()
            .iter()
            .filter(|r| r.order == "P000")
            .flat_map(|r| r.lines("ReportFinishedLines"))
            .filter_map(|line| line["ReportedGoodQuantity"].as_u64())
            .collect();
        let missing: Vec<u32> = (1..=rounds * per_round)
            .filter(|n| !got.contains(&u64::from(*n)))
            .collect();
        panic!(
            "not drained: {:?}; P000 missing {missing:?}; /health {}; log:\n{}",
            count_burst(&fake, u64::from(rounds * per_round)),
            health(api_port).await,
            out.text()
                .lines()
                .filter(|l| l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("source=broker"))
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let status = health(api_port).await["status"].clone();
    assert_eq!(gw.terminate().await, 0);

    let received = fake.received();
    let count = count_burst(&fake, u64::from(rounds * per_round));
    println!(
        "{} restarted under load: {mqtt_total} MQTT impulses (lost {}, duplicates {}), PLC pieces {} of {plc_count}, serial pieces {} of {frame_count}; health {status}",
        if restart_broker { "broker, Modbus server and serial adapter" } else { "Modbus server and serial adapter" },
        count.lost,
        count.duplicates,
        pieces(&received, PLC_ORDER),
        pieces(&received, SERIAL_ORDER),
    );
    assert_eq!((count.lost, count.duplicates), (0, 0), "{count:?}");
    if restart_broker {
        // mosquitto 2.0.11, after restoring its state, sends publishes queued while the
        // gateway was away before it resends the ones still unacknowledged (seen in a
        // TRACE log: packet 6683 with DUP 0, then 5342… with DUP 1). The gateway keeps
        // the order it receives; the broker's order is not the publishers' here.
        if !count.out_of_order.is_empty() {
            println!(
                "orders the broker handed over out of publish order: {:?}",
                count.out_of_order
            );
        }
    } else {
        assert_eq!(count, EXACT);
    }
    assert_eq!(pieces(&received, PLC_ORDER), plc_count);
    assert_eq!(pieces(&received, SERIAL_ORDER), frame_count);
    assert_eq!(status, "ok", "all sources up again");
    plc_server.abort();
    pty.stop().await;
}
