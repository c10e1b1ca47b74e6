//! Talking to systemd: `READY=1`, `STOPPING=1`, `STATUS=…` and the watchdog.
//!
//! Notifications go to the datagram socket in `$NOTIFY_SOCKET` (a path, or an abstract
//! name starting with `@`); without it (not started by systemd, or `Type=simple`) every
//! call is a no-op.
//!
//! The watchdog only pings while the gateway makes progress: every long-running loop
//! owns a [`Heartbeat`] and beats it on each turn (and on a periodic tick when idle), and
//! [`Watchdog::run`] sends `WATCHDOG=1` only while every heartbeat is fresh. A stuck loop
//! therefore stops the pings, and systemd restarts the service.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often an idle loop beats its heartbeat when no watchdog asks for more.
pub const DEFAULT_HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// A connection to systemd's notification socket, if there is one.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Arc<(UnixDatagram, std::os::unix::net::SocketAddr)>>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. A malformed value is logged and ignored.
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::default();
        };
        let path = path.to_string_lossy().into_owned();
        match Self::for_socket(&path) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(notify_socket = %path, error = %e, "Cannot use NOTIFY_SOCKET; systemd will not hear from the gateway.");
                Notifier::default()
            }
        }
    }

    /// A notifier for the socket at `path` (`@name` for an abstract socket).
    pub fn for_socket(path: &str) -> std::io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => std::os::unix::net::SocketAddr::from_pathname(path)?,
        };
        let socket = UnixDatagram::unbound()?;
        Ok(Notifier {
            target: Some(Arc::new((socket, addr))),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification, e.g. `READY=1`. Failures are logged, never fatal.
    pub fn notify(&self, state: &str) {
        if let Some(target) = &self.target {
            let (socket, addr) = &**target;
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                tracing::debug!(error = %e, state, "sd_notify failed.");
            }
        }
    }
}

/// The watchdog interval systemd asked for (`WatchdogSec=` → `$WATCHDOG_USEC`), if any
/// and if it is meant for this process (`$WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Proof of life of one loop.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    name: Arc<str>,
    period: Duration,
    /// Milliseconds since `origin` at the last beat; `u64::MAX` once the loop ended on
    /// purpose (a simulator that reached its limit), which counts as healthy.
    last: Arc<AtomicU64>,
    origin: Instant,
}

const FINISHED: u64 = u64::MAX;

impl Heartbeat {
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// The loop ended as designed; stop watching it.
    pub fn finish(&self) {
        self.last.store(FINISHED, Ordering::Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How often the owning loop must beat when idle.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Waits `wait`, beating every period meanwhile: for a loop that waits on purpose (for
    /// the disk to take writes again, for a backoff) and is not hung.
    pub async fn sleep_beating(&self, wait: Duration) {
        let pause = tokio::time::sleep(wait);
        tokio::pin!(pause);
        let mut ticks = tokio::time::interval(self.period);
        loop {
            tokio::select! {
                _ = &mut pause => return,
                _ = ticks.tick() => self.beat(),
            }
        }
    }

    fn age(&self) -> Option<Duration> {
        match self.last.load(Ordering::Relaxed) {
            FINISHED => None,
            ms => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }
}

/// The heartbeats the watchdog checks.
#[derive(Debug, Clone)]
pub struct Heartbeats {
    all: Arc<Mutex<Vec<Heartbeat>>>,
    origin: Instant,
    period: Duration,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats::new(DEFAULT_HEARTBEAT_PERIOD)
    }
}

impl Heartbeats {
    /// Loops beat every `period` when idle.
    pub fn new(period: Duration) -> Heartbeats {
        Heartbeats {
            all: Arc::default(),
            origin: Instant::now(),
            period,
        }
    }

    /// Heartbeats for a watchdog of `interval`: loops beat four times per interval, and
    /// the watchdog (pinging twice per interval) finds every live loop fresh.
    pub fn for_watchdog(interval: Option<Duration>) -> Heartbeats {
        Heartbeats::new(interval.map_or(DEFAULT_HEARTBEAT_PERIOD, |i| {
            (i / 4).min(DEFAULT_HEARTBEAT_PERIOD)
        }))
    }

    /// Registers a new loop, counted as alive from now.
    pub fn register(&self, name: &str) -> Heartbeat {
        let hb = Heartbeat {
            name: name.into(),
            period: self.period,
            last: Arc::new(AtomicU64::new(0)),
            origin: self.origin,
        };
        hb.beat();
        let mut all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        // Loops of a configuration replaced by a reload have finished: forget them.
        all.retain(|h| h.age().is_some());
        all.push(hb.clone());
        hb
    }

    /// Loops whose last beat is older than `limit`.
    pub fn stale(&self, limit: Duration) -> Vec<String> {
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|hb| hb.age().is_some_and(|age| age > limit))
            .map(|hb| hb.name.to_string())
            .collect()
    }
}

/// Pings the systemd watchdog at half its interval while every heartbeat is fresh.
#[derive(Debug)]
pub struct Watchdog {
    pub notifier: Notifier,
    pub interval: Duration,
    pub heartbeats: Heartbeats,
}

impl Watchdog {
    pub async fn run(self, cancel: CancellationToken) {
        let period = self.interval / 2;
        let mut ticks = tokio::time::interval(period);
        let mut stalled_before = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let stale = self.heartbeats.stale(period);
            if stale.is_empty() {
                if stalled_before {
                    tracing::info!("All loops make progress again; watchdog pings resume.");
                    stalled_before = false;
                }
                self.notifier.notify("WATCHDOG=1");
            } else if !stalled_before {
                tracing::error!(stalled = ?stale, "No progress: withholding watchdog pings, systemd will restart the service if this lasts.");
                stalled_before = true;
            }
        }
    }
}
