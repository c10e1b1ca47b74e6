//! Helpers for source tests: a socat pseudo-terminal pair, and a running source with
//! its event channel and health.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mes_gateway::event::Value;
use mes_gateway::source::{SourceEvent, SourceHealth};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A pseudo-terminal pair from socat, reachable as two stable symlinks in a folder.
pub struct PtyPair {
    child: tokio::process::Child,
}

impl PtyPair {
    /// Creates `dir/a` and `dir/b` and waits until socat moves data between them.
    pub async fn start(dir: &Path, a: &str, b: &str) -> PtyPair {
        let mut child = tokio::process::Command::new("socat")
            .args(["-d", "-d"])
            .arg(format!("pty,raw,echo=0,link={}", dir.join(a).display()))
            .arg(format!("pty,raw,echo=0,link={}", dir.join(b).display()))
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

    /// Writes bytes to one end, as the device would.
    pub async fn write(path: &Path, bytes: &[u8]) {
        let mut end = tokio::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await
            .unwrap();
        end.write_all(bytes).await.unwrap();
        end.flush().await.unwrap();
    }

    /// Tears the pair down, as when a USB adapter is unplugged.
    pub async fn stop(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// A source task under test.
pub struct Running {
    pub events: mpsc::Receiver<SourceEvent>,
    pub health: Arc<SourceHealth>,
    pub cancel: CancellationToken,
}

impl Running {
    pub fn new(
        events: mpsc::Receiver<SourceEvent>,
        health: Arc<SourceHealth>,
        cancel: CancellationToken,
    ) -> Running {
        Running {
            events,
            health,
            cancel,
        }
    }

    /// The next event's point and value.
    pub async fn next(&mut self) -> (String, Value) {
        let e = tokio::time::timeout(Duration::from_secs(20), self.events.recv())
            .await
            .expect("an event in time")
            .expect("source alive");
        (e.event.point.to_string(), e.event.value)
    }

    /// Waits (woken by each change of the source's health) until `cond` holds.
    pub async fn wait_health(&self, what: &str, cond: impl Fn(&SourceHealth) -> bool) {
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
