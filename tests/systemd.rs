//! systemd integration: sd_notify (READY, WATCHDOG, STOPPING) seen on a socket the test
//! owns, the watchdog withholding pings when the dispatcher stalls, and SIGHUP reloads.

use mes_gateway_testkit as support;

use std::sync::Arc;
use std::time::Duration;

use mes_gateway::d365::client::D365Client;
use mes_gateway::d365::Dispatcher;
use mes_gateway::outbox::Outbox;
use mes_gateway::settings;
use mes_gateway::systemd::{Heartbeats, Notifier, Watchdog};
use support::process::{self, path_str, Output};
use support::{d365_yaml, write_config, FakeD365};
use tokio::net::UnixDatagram;
use tokio_util::sync::CancellationToken;

async fn next_notification(socket: &UnixDatagram, within: Duration) -> Option<String> {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(within, socket.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

fn flow_config(dir: &std::path::Path, fake: &FakeD365, order: &str) {
    write_config(
        dir,
        &format!("{}storage:\n  data_dir: data\nsources:\n  - type: simulator\n    id: sim\n    interval: 50ms\n", d365_yaml(fake)),
    );
    std::fs::create_dir_all(dir.join("rules.d")).unwrap();
    std::fs::write(
        dir.join("rules.d/r.yaml"),
        format!("rules:\n  - name: count\n    line: l1\n    when: {{ source: sim, edge: rising }}\n    emit: {{ type: ProdProductionOrderStart, fields: {{ ProductionOrderNumber: {order} }} }}\n"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_then_watchdog_pings_then_stopping() {
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("etc");
    flow_config(&dir, &fake, "P1");
    let socket_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();

    let out = Output::new();
    let mut cmd = tokio::process::Command::new(&*process::BIN);
    cmd.args(["run", "-c", path_str(&dir)])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();

    let mut seen = Vec::new();
    while !seen.iter().any(|s: &String| s.contains("READY=1")) {
        seen.push(
            next_notification(&socket, Duration::from_secs(30))
                .await
                .expect("READY=1"),
        );
    }
    let mut pings = 0;
    while pings < 5 {
        let n = next_notification(&socket, Duration::from_secs(30))
            .await
            .expect("watchdog pings");
        if n == "WATCHDOG=1" {
            pings += 1;
        }
    }
    // SAFETY: kill(2) on our own child with a valid signal.
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
    }
    loop {
        let n = next_notification(&socket, Duration::from_secs(30))
            .await
            .expect("STOPPING=1");
        if n == "STOPPING=1" {
            break;
        }
    }
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{status:?}; {}", out.text());
}

#[test]
fn watchdog_pings_stop_while_the_dispatcher_is_stalled() {
    let test_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The dispatcher runs alone on its own single-threaded runtime, which the test can freeze.
    let dispatcher_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (freeze_tx, freeze_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();

    test_rt.block_on(async {
        let fake = FakeD365::start().await;
        let tmp = tempfile::tempdir().unwrap();
        write_config(
            tmp.path(),
            &format!("{}storage:\n  data_dir: data\n", d365_yaml(&fake)),
        );
        let config = settings::load(tmp.path()).unwrap();
        let outbox = Outbox::open(&config.storage.data_dir).unwrap();
        let client = Arc::new(D365Client::new(Arc::new(config.d365.clone().unwrap())).unwrap());

        let interval = Duration::from_millis(400);
        let heartbeats = Heartbeats::for_watchdog(Some(interval));
        let dispatcher = Dispatcher::new(
            outbox,
            client,
            config.dispatcher.clone(),
            Duration::from_secs(1),
        )
        .with_heartbeat(heartbeats.register("dispatcher"));
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let dispatcher_thread = std::thread::spawn(move || {
            dispatcher_rt.block_on(async move {
                let run = tokio::spawn(dispatcher.run(c));
                // When told, block this runtime's only thread: the dispatcher cannot turn.
                tokio::spawn(async move {
                    tokio::task::spawn_blocking(move || freeze_rx.recv())
                        .await
                        .ok();
                    release_rx.recv().ok();
                });
                run.await.unwrap().unwrap();
            })
        });

        let socket_path = tmp.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        let notifier = Notifier::for_socket(path_str(&socket_path)).unwrap();
        let watchdog_cancel = CancellationToken::new();
        tokio::spawn(
            Watchdog {
                notifier,
                interval,
                heartbeats,
            }
            .run(watchdog_cancel.clone()),
        );

        for _ in 0..3 {
            assert_eq!(
                next_notification(&socket, Duration::from_secs(10))
                    .await
                    .as_deref(),
                Some("WATCHDOG=1")
            );
        }
        freeze_tx.send(()).unwrap();
        // At most one ping can already be on its way; then none for several intervals.
        let mut late = 0;
        while next_notification(&socket, interval * 4).await.is_some() {
            late += 1;
            assert!(
                late <= 1,
                "watchdog kept pinging while the dispatcher was stalled"
            );
        }
        release_tx.send(()).unwrap();
        assert_eq!(
            next_notification(&socket, Duration::from_secs(10))
                .await
                .as_deref(),
            Some("WATCHDOG=1"),
            "pings resume"
        );

        cancel.cancel();
        watchdog_cancel.cancel();
        tokio::task::spawn_blocking(move || dispatcher_thread.join().unwrap())
            .await
            .unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_configuration_and_keeps_the_running_one_otherwise() {
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("etc");
    flow_config(&dir, &fake, "P1");
    let out = Output::new();
    let gw = process::start(&["run", "-c", path_str(&dir)], &out);
    fake.wait_until("P1 messages", |r| r.iter().any(|r| r.order == "P1"))
        .await;

    flow_config(&dir, &fake, "P2");
    // SAFETY: kill(2) on our own child with a valid signal.
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    fake.wait_until("P2 messages after reload", |r| {
        r.iter().any(|r| r.order == "P2")
    })
    .await;
    out.wait_for("Configuration reloaded").await;

    std::fs::write(dir.join("rules.d/r.yaml"), "rules:\n  - name: broken\n    line: l1\n    when: { source: nowhere }\n    emit: { type: ProdProductionOrderStart }\n").unwrap();
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    out.wait_for("Reload refused").await;
    let before = fake.received().len();
    fake.wait_until("still delivering P2", |r| {
        r.len() > before + 2 && r.last().is_some_and(|r| r.order == "P2")
    })
    .await;
    assert_eq!(gw.terminate().await, 0);
    assert!(
        out.text().contains("unknown source `nowhere`"),
        "{}",
        out.text()
    );
}
