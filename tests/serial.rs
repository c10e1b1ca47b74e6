//! The serial source over a pseudo-terminal pair made by socat: the test writes the
//! device side (a barcode reader, a presence sensor).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mes_gateway::config::devices::Parity;
use mes_gateway::config::{Framer, SerialConfig, SerialMode, SerialPort};
use mes_gateway::event::Value;
use mes_gateway::source::serial::SerialSource;
use mes_gateway::source::{SourceEvent, SourceHealth};
use mes_gateway::systemd::Heartbeats;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct PtyPair {
    child: tokio::process::Child,
}

impl PtyPair {
    async fn start(dir: &Path) -> PtyPair {
        let mut child = tokio::process::Command::new("socat")
            .args(["-d", "-d"])
            .arg(format!(
                "pty,raw,echo=0,link={}",
                dir.join("device").display()
            ))
            .arg(format!(
                "pty,raw,echo=0,link={}",
                dir.join("gateway").display()
            ))
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("socat is not installed: `bash .ci/run` installs it (apt-get install socat)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("starting data transfer loop") {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(ready, Ok(true)),
            "socat did not create the pty pair"
        );
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        PtyPair { child }
    }

    async fn write(dir: &Path, bytes: &[u8]) {
        let mut device = tokio::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("device"))
            .await
            .unwrap();
        device.write_all(bytes).await.unwrap();
        device.flush().await.unwrap();
    }

    async fn stop(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

struct Running {
    events: mpsc::Receiver<SourceEvent>,
    health: Arc<SourceHealth>,
    cancel: CancellationToken,
}

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
    Running {
        events: rx,
        health,
        cancel,
    }
}

impl Running {
    async fn next(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(20), self.events.recv())
            .await
            .expect("an event in time")
            .expect("source alive")
            .event
            .value
    }

    async fn wait_health(&self, what: &str, cond: impl Fn(&SourceHealth) -> bool) {
        let mut rx = self.health.subscribe();
        let ok = tokio::time::timeout(Duration::from_secs(20), async {
            while !cond(&self.health) {
                rx.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            ok.is_ok(),
            "source health never showed: {what} (last error {:?})",
            self.health.last_error()
        );
    }
}

#[tokio::test]
async fn barcode_lines_become_events_and_bad_frames_do_not_stop_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let pty = PtyPair::start(dir.path()).await;
    let mut src = start(dir.path(), Framer::Lines(b"\n".to_vec()), SerialMode::Data);
    src.wait_health("open", SourceHealth::is_connected).await;
    PtyPair::write(dir.path(), b"P000123\r\n\xff\xfe\n").await;
    PtyPair::write(dir.path(), b"P0001").await;
    PtyPair::write(dir.path(), b"24\r\n").await;
    assert_eq!(src.next().await, Value::Text("P000123".into()));
    assert_eq!(
        src.next().await,
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
    let pty = PtyPair::start(dir.path()).await;
    let mut src = start(dir.path(), Framer::Fixed(1), SerialMode::Presence);
    src.wait_health("open", SourceHealth::is_connected).await;
    PtyPair::write(dir.path(), b"\x01").await;
    assert_eq!(
        (src.next().await, src.next().await),
        (Value::Bool(true), Value::Bool(false))
    );

    // The USB adapter is pulled and plugged back: the port vanishes and comes back.
    pty.stop().await;
    src.wait_health("closed", |h| !h.is_connected()).await;
    let pty = PtyPair::start(dir.path()).await;
    src.wait_health("reopened", SourceHealth::is_connected)
        .await;
    PtyPair::write(dir.path(), b"\x01").await;
    assert_eq!(
        (src.next().await, src.next().await),
        (Value::Bool(true), Value::Bool(false))
    );
    src.cancel.cancel();
    pty.stop().await;
}
