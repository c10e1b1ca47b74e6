//! Alerts: conditions an operator must hear about without watching a screen — a message
//! `failed` or `uncertain`, D365 refusing the gateway a token, a source down too long,
//! the oldest queued message too old, events on a line with no order, the data
//! directory's disk nearly full.
//!
//! # Invariants
//!
//! - An alert is an *incident* with a key (`message/17`, `source_down/plc1`, …): it fires
//!   once when its condition starts and clears once when it ends — never once per impulse
//!   or per evaluation. The [`Board`] holds the open ones; it outlives reloads, so a
//!   reload does not fire everything again, and it is saved in the store whenever it
//!   changes (owner `alerts`), so an incident still open after a restart is not announced
//!   again: a restored alert whose condition holds stays open silently; one whose
//!   condition no longer holds clears (announced), though not before `RESTORE_GRACE`,
//!   during which conditions that need time to judge (a source down for
//!   `source_down_after`) are given it.
//! - Conditions are evaluated every `alerts.check_interval` from what the components
//!   publish ([`crate::live`]) and the outbox's counts; the outbox is read only where its
//!   counts say there is something (failed, uncertain).
//! - Every firing and clearing is logged (WARN / INFO), counted in the metrics, and handed
//!   to the notifiers: an MQTT topic (retained, QoS 1, one topic per alert key) and an
//!   HTTP webhook (retried with backoff until the endpoint takes it, in order). A
//!   notifier that cannot keep up loses the oldest notifications, with a count, never
//!   blocks the evaluation.

pub mod config;
mod notify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::live::Live;
use crate::outbox::{ListFilter, Outbox, State};
use config::AlertConfig;

/// The owner name of the open alerts in the store.
pub const ALERTS_STATE: &str = "alerts";

/// How long after a restart an alert restored from the store that its condition does not
/// (yet) show is kept open without a word: long enough for a restarted source to connect
/// and for the slowest thresholds to be judged again.
const RESTORE_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// Most failed or uncertain messages each raised as its own alert; beyond it they are
/// summed up in one (a plant with thousands held has one problem, not thousands).
const MAX_MESSAGE_ALERTS: usize = 100;

/// An open incident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Identifies the incident: `<kind>/<subject>`.
    pub key: String,
    pub kind: String,
    /// One line for a person.
    pub text: String,
    pub since: jiff::Timestamp,
}

/// A firing or a clearing, as the notifiers send it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub alert: String,
    pub kind: String,
    /// `firing` or `cleared`.
    pub state: String,
    /// The line Teams and Slack incoming webhooks show.
    pub text: String,
    pub since: jiff::Timestamp,
    pub at: jiff::Timestamp,
}

/// The open alerts and the counts of firings, shared by the evaluation, the operator
/// service and the metrics.
#[derive(Debug, Default)]
pub struct Board {
    open: Mutex<BTreeMap<String, Alert>>,
    /// Keys restored from the store at start, and until when their silence lasts.
    restored: Mutex<(Vec<String>, Option<tokio::time::Instant>)>,
    pub fired: AtomicU64,
    pub cleared: AtomicU64,
    /// Notifications lost because a notifier could not keep up.
    pub dropped_notices: AtomicU64,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Board {
    /// Takes back the alerts open when the gateway stopped (see the module doc); none
    /// fires again for this.
    pub fn restore(&self, alerts: Vec<Alert>) {
        let mut open = self.lock();
        let keys: Vec<String> = alerts.iter().map(|a| a.key.clone()).collect();
        if !keys.is_empty() {
            tracing::info!(open = keys.len(), alerts = %keys.join(", "), "Alerts still open from before the restart; not announced again.");
        }
        for a in alerts {
            open.insert(a.key.clone(), a);
        }
        drop(open);
        *self.restored.lock().unwrap_or_else(|p| p.into_inner()) =
            (keys, Some(tokio::time::Instant::now() + RESTORE_GRACE));
    }

    /// The alerts saved in the store by an earlier run (none when it cannot be read).
    pub fn saved(outbox: &Outbox) -> Vec<Alert> {
        match outbox.store().owners().load(ALERTS_STATE) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "The saved open alerts cannot be read; open incidents are announced again.");
                Vec::new()
            }),
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the saved open alerts; open incidents are announced again.");
                Vec::new()
            }
        }
    }

    /// Whether `key` was restored and its grace has not ended.
    fn in_grace(&self, key: &str) -> bool {
        let restored = self.restored.lock().unwrap_or_else(|p| p.into_inner());
        restored
            .1
            .is_some_and(|until| tokio::time::Instant::now() < until)
            && restored.0.iter().any(|k| k == key)
    }

    pub fn open_alerts(&self) -> Vec<Alert> {
        self.lock().values().cloned().collect()
    }

    /// A receiver that sees a new value whenever an alert fires or clears.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Alert>> {
        // Plain map updates without await: poisoning cannot leave it half-changed.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the open alerts of the kinds in `evaluated` exactly `now_open`: fires the new
    /// ones, clears the gone ones, keeps the rest (with their first `since`). Returns the
    /// notices.
    fn reconcile(
        &self,
        evaluated: &[&str],
        now_open: Vec<(String, String, String)>,
    ) -> Vec<Notice> {
        let now = jiff::Timestamp::now();
        let mut open = self.lock();
        let mut notices = Vec::new();
        let wanted: BTreeMap<String, (String, String)> = now_open
            .into_iter()
            .map(|(key, kind, text)| (key, (kind, text)))
            .collect();
        let gone: Vec<String> = open
            .iter()
            .filter(|(k, a)| evaluated.contains(&a.kind.as_str()) && !wanted.contains_key(*k))
            .map(|(k, _)| k.clone())
            .filter(|k| !self.in_grace(k))
            .collect();
        for key in gone {
            if let Some(a) = open.remove(&key) {
                tracing::info!(alert = %a.key, "Alert cleared: {}", a.text);
                self.cleared.fetch_add(1, Ordering::Relaxed);
                notices.push(Notice {
                    alert: a.key,
                    kind: a.kind,
                    state: "cleared".into(),
                    text: format!("cleared: {}", a.text),
                    since: a.since,
                    at: now,
                });
            }
        }
        for (key, (kind, text)) in wanted {
            if open.contains_key(&key) {
                continue;
            }
            tracing::warn!(alert = %key, "Alert: {text}");
            self.fired.fetch_add(1, Ordering::Relaxed);
            notices.push(Notice {
                alert: key.clone(),
                kind: kind.clone(),
                state: "firing".into(),
                text: text.clone(),
                since: now,
                at: now,
            });
            open.insert(
                key.clone(),
                Alert {
                    key,
                    kind,
                    text,
                    since: now,
                },
            );
        }
        drop(open);
        if !notices.is_empty() {
            self.changes.send_modify(|n| *n += 1);
        }
        notices
    }
}

/// The kinds of alert, as they appear in keys, metrics and notices.
pub const KINDS: [&str; 8] = [
    "message_failed",
    "message_uncertain",
    "message_duplicate",
    "d365_token",
    "source_down",
    "oldest_queued",
    "unassigned",
    "disk_free",
];

/// Evaluates the conditions and sends what fires and clears to the notifiers.
#[derive(Debug)]
pub struct AlertWatch {
    pub config: AlertConfig,
    pub board: Arc<Board>,
    pub outbox: Outbox,
    pub live: Live,
    pub data_dir: PathBuf,
    /// Whether D365 is being delivered to (not a dry run): the token alert needs it.
    pub delivering: bool,
}

/// What the watch remembers between evaluations.
#[derive(Default)]
struct Memory {
    unassigned_seen: Option<u64>,
    unassigned_last_rise: Option<tokio::time::Instant>,
}

impl AlertWatch {
    pub async fn run(self, cancel: CancellationToken) {
        let notifiers = notify::start(&self.config, &self.board, cancel.clone());
        let mut ticks = tokio::time::interval(self.config.check_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut memory = Memory::default();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let notices = self.evaluate(&mut memory).await;
            if !notices.is_empty() {
                self.save().await;
            }
            for n in notices {
                for tx in &notifiers {
                    send_dropping_oldest(tx, n.clone(), &self.board);
                }
            }
        }
    }

    /// Saves the open alerts, so a restart does not announce them again. Not needed for
    /// correctness: a failed save only means they are announced again after a restart.
    async fn save(&self) {
        let bytes = match serde_json::to_vec(&self.board.open_alerts()) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot encode the open alerts to save them.");
                return;
            }
        };
        if let Err(e) = self.outbox.store().owners().save(ALERTS_STATE, bytes).await {
            tracing::warn!(error = %e, "Cannot save the open alerts; after a restart they are announced again.");
        }
    }

    async fn evaluate(&self, memory: &mut Memory) -> Vec<Notice> {
        let mut open = Vec::new();
        self.held_messages(&mut open).await;
        let now = jiff::Timestamp::now();
        {
            let live = self.live.get();
            if self.delivering {
                if let Some(e) = live.dispatch.as_ref().and_then(|d| d.last_error()) {
                    open.push((
                        "d365_token".to_string(),
                        "d365_token".to_string(),
                        format!("D365 gives the gateway no token, nothing is delivered: {e}"),
                    ));
                }
            }
            for (id, health) in &live.sources {
                let down_for = health
                    .since()
                    .filter(|_| !health.is_connected())
                    .map(|since| now.duration_since(since));
                if down_for
                    .is_some_and(|d| d.as_secs_f64() >= self.config.source_down_after.as_secs_f64())
                {
                    open.push((
                        format!("source_down/{id}"),
                        "source_down".into(),
                        format!(
                            "source {id} has been down for more than {}: {}",
                            crate::config::format_duration(self.config.source_down_after),
                            health.last_error().unwrap_or_else(|| "no detail".into())
                        ),
                    ));
                }
            }
            if let Some(rules) = &live.rules {
                let seen = rules.unassigned.load(Ordering::Relaxed);
                let rose = memory.unassigned_seen.is_some_and(|before| seen > before);
                memory.unassigned_seen = Some(seen);
                let clock = tokio::time::Instant::now();
                if rose {
                    memory.unassigned_last_rise = Some(clock);
                }
                if memory
                    .unassigned_last_rise
                    .is_some_and(|t| clock.duration_since(t) < self.config.unassigned_quiet)
                {
                    open.push((
                        "unassigned".into(),
                        "unassigned".into(),
                        format!("events arrive on a line with no production order ({seen} so far): set the line's order"),
                    ));
                }
            }
        }
        if let Some(oldest) = self.outbox.oldest_pending() {
            let age = now.duration_since(oldest);
            if age.as_secs_f64() >= self.config.oldest_queued_after.as_secs_f64() {
                open.push((
                    "oldest_queued".into(),
                    "oldest_queued".into(),
                    format!(
                        "the oldest message waiting for D365 was created {} ago (threshold {})",
                        crate::config::format_duration(std::time::Duration::from_secs(
                            age.as_secs().max(0) as u64
                        )),
                        crate::config::format_duration(self.config.oldest_queued_after)
                    ),
                ));
            }
        }
        if let Some(free) = free_mib(&self.data_dir) {
            if free < self.config.disk_free_below_mib {
                open.push((
                    "disk_free".into(),
                    "disk_free".into(),
                    format!(
                        "{} MiB free under {} (threshold {} MiB)",
                        free,
                        self.data_dir.display(),
                        self.config.disk_free_below_mib
                    ),
                ));
            }
        }
        let mut evaluated: Vec<&str> = KINDS.to_vec();
        if !self.delivering {
            evaluated.retain(|k| *k != "d365_token");
        }
        self.board.reconcile(&evaluated, open)
    }

    /// Reads the outbox off the async threads; `None` (logged) when it cannot be read now.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Outbox) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Option<T> {
        let outbox = self.outbox.clone();
        match tokio::task::spawn_blocking(move || read(&outbox)).await {
            Ok(Ok(read)) => Some(read),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Cannot read the outbox for alerts; trying again.");
                None
            }
            Err(_) => None,
        }
    }

    /// Failed and uncertain messages, one alert each (up to `MAX_MESSAGE_ALERTS`).
    async fn held_messages(&self, open: &mut Vec<(String, String, String)>) {
        let counts = self.outbox.counts();
        for (state, kind) in [
            (State::Failed, "message_failed"),
            (State::Uncertain, "message_uncertain"),
        ] {
            let n = counts.get(&state).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let filter = ListFilter {
                state: Some(state),
                ..ListFilter::default()
            };
            let Some((records, next)) = self
                .read(move |o| o.page(&filter, None, MAX_MESSAGE_ALERTS, false))
                .await
            else {
                continue;
            };
            let more = next.is_some();
            for r in &records {
                open.push((
                    format!("message/{}", r.id),
                    kind.to_string(),
                    format!(
                        "message {} ({}, order {}) is {}: {}; the order's later messages wait",
                        r.id,
                        r.message_type,
                        r.production_order,
                        r.state,
                        r.last_error.as_deref().unwrap_or("no detail")
                    ),
                ));
            }
            // Only when the page was full: the counts are read before the page, and a
            // message retried in between would otherwise make a phantom "1 more".
            if more && n > records.len() {
                open.push((
                    format!("{kind}/more"),
                    kind.to_string(),
                    format!("{} more messages are {state}", n - records.len()),
                ));
            }
        }
        // Sent again on the evidence of D365's events, then reported twice: D365 may have
        // it twice (d365/evidence.rs).
        if let Some((records, _)) = self.read(|o| o.duplicates(MAX_MESSAGE_ALERTS)).await {
            for r in &records {
                open.push((
                    format!("message/{}/duplicate", r.id),
                    "message_duplicate".to_string(),
                    format!(
                        "message {} ({}, order {}) may be in D365 twice: the gateway sent it again because D365's events showed it never arrived, and D365 then reported the first copy; reverse the second report in D365",
                        r.id, r.message_type, r.production_order
                    ),
                ));
            }
        }
        // Delivered, then failed in D365's processing (its "message processed" event).
        if let Some((records, n)) = self.read(|o| o.rejected_in_d365(MAX_MESSAGE_ALERTS)).await {
            for r in &records {
                let infolog = r
                    .d365
                    .as_ref()
                    .and_then(|v| v.infolog.as_deref().or(v.result.as_deref()))
                    .unwrap_or("no infolog");
                open.push((
                    // Its own key: a message the gateway holds as failed may also
                    // carry a Failed verdict, and one key would show only one alert.
                    format!("message/{}/d365", r.id),
                    "message_failed".to_string(),
                    format!(
                        "message {} ({}, order {}) failed in D365: {infolog}; D365 holds the order's later messages until it is fixed or cancelled there",
                        r.id, r.message_type, r.production_order
                    ),
                ));
            }
            if n > records.len() {
                open.push((
                    "message_failed/d365-more".into(),
                    "message_failed".into(),
                    format!("{} more messages failed in D365", n - records.len()),
                ));
            }
        }
    }
}

/// Queues a notice for one notifier; when its queue is full the oldest waiting notice is
/// lost (counted), so the newest state of every alert gets out.
fn send_dropping_oldest(tx: &Arc<notify::Queue>, notice: Notice, board: &Board) {
    if tx.push(notice) {
        board.dropped_notices.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("An alert notifier cannot keep up; the oldest notice waiting was dropped.");
    }
}

/// Free space of the file system holding `dir` for an unprivileged writer, in MiB.
fn free_mib(dir: &std::path::Path) -> Option<u64> {
    fs2::available_space(dir).ok().map(|b| b / (1024 * 1024))
}

#[cfg(test)]
mod tests;
