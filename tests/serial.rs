//! The serial source over a pseudo-terminal pair made by socat: the test writes the
//! device side (a barcode reader, a presence sensor).

use mes_gateway_testkit as support;

use std::path::Path;
use std::sync::Arc;

use mes_gateway::event::Value;
use mes_gateway::source::serial::config::{Framer, Parity, SerialConfig, SerialMode, SerialPort};
use mes_gateway::source::serial::SerialSource;
use mes_gateway::source::SourceHealth;
use mes_gateway::systemd::Heartbeats;
use support::device::{PtyPair, Running};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn start(dir: &Path, framer: Framer, mode: SerialMode) -> Running {
    let config = SerialConfig {
        id: "reader".into(),
        port: SerialPort {
            device: dir.join("gateway"),
            baud: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
        },
        point: "line".into(),
        framer,
        mode,
        max_frame: 64,
    };
    let (tx, rx) = mpsc::channel(64);
    let health = Arc::new(SourceHealth::default());
    let cancel = CancellationToken::new();
    tokio::spawn(
        SerialSource::new(
            config,
            Heartbeats::default().register("reader"),
            health.clone(),
        )
        .run(tx, cancel.clone()),
    );
    Running::new(rx, health, cancel)
}

#[tokio::test]
async fn barcode_lines_become_events_and_bad_frames_do_not_stop_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("device");
    let pty = PtyPair::start(dir.path(), "device", "gateway").await;
    let mut src = start(dir.path(), Framer::Lines(b"\n".to_vec()), SerialMode::Data);
    src.wait_health("open", SourceHealth::is_connected).await;
    PtyPair::write(&device, b"P000123\r\n\xff\xfe\n").await;
    PtyPair::write(&device, b"P0001").await;
    PtyPair::write(&device, b"24\r\n").await;
    assert_eq!(src.next().await.1, Value::Text("P000123".into()));
    assert_eq!(
        src.next().await.1,
        Value::Text("P000124".into()),
        "a frame split across reads"
    );
    assert_eq!(
        src.health
            .decode_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    src.cancel.cancel();
    pty.stop().await;
}

#[tokio::test]
async fn a_presence_sensor_gives_one_impulse_per_frame_and_the_port_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("device");
    let pty = PtyPair::start(dir.path(), "device", "gateway").await;
    let mut src = start(dir.path(), Framer::Fixed(1), SerialMode::Presence);
    src.wait_health("open", SourceHealth::is_connected).await;
    PtyPair::write(&device, b"\x01").await;
    assert_eq!(
        (src.next().await.1, src.next().await.1),
        (Value::Bool(true), Value::Bool(false))
    );

    // The USB adapter is pulled and plugged back: the port vanishes and comes back.
    pty.stop().await;
    src.wait_health("closed", |h| !h.is_connected()).await;
    let pty = PtyPair::start(dir.path(), "device", "gateway").await;
    src.wait_health("reopened", SourceHealth::is_connected)
        .await;
    PtyPair::write(&device, b"\x01").await;
    assert_eq!(
        (src.next().await.1, src.next().await.1),
        (Value::Bool(true), Value::Bool(false))
    );
    src.cancel.cancel();
    pty.stop().await;
}
