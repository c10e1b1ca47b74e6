//! Wiring: opens the outbox, starts sources, the pipeline, the dispatcher and the
//! pruner, reloads them on request, and shuts them down in order.
//!
//! Stop order (shutdown and reload alike): stop the sources; let the pipeline store what
//! they already emitted; stop the dispatcher (requests in flight get the grace period);
//! wait for everything under one deadline. A reload validates the new configuration
//! first and keeps the running one if it has errors. The outbox stays open throughout.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alert::{AlertWatch, Board};
use crate::api::ApiState;
use crate::config;
use crate::d365::client::D365Client;
use crate::d365::Dispatcher;
use crate::live::{ComponentStats, Live};
use crate::operator::{ContentChecks, Operator, Running};
use crate::outbox::{Outbox, State};
use crate::pipeline::{LineCommand, Pipeline, PipelineStats};
use crate::rules::Engine;
use crate::settings::{self, Config};
use crate::signal::Control;
use crate::source;
use crate::systemd::{self, Heartbeat, Heartbeats, Notifier, Watchdog};

#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Build, store and print messages; send nothing.
    pub dry_run: bool,
}

/// File descriptors kept for everything but the operator service's connections:
/// sources, D365 connections, the store, logs.
const OPEN_FILES_RESERVE: u64 = 128;

/// Opens the outbox off the async threads.
pub async fn open_outbox(config: &Config) -> anyhow::Result<Outbox> {
    let dir = config.storage.data_dir.clone();
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(&dir)).await??;
    let corrupt = outbox.corrupt_records();
    if !corrupt.is_empty() {
        tracing::error!(count = corrupt.len(), ids = ?corrupt, "Outbox holds records that cannot be decoded; they are skipped.");
    }
    Ok(outbox)
}

fn status_line(outbox: &Outbox) -> String {
    let counts = outbox.counts();
    let n = |s: State| counts.get(&s).copied().unwrap_or(0);
    format!(
        "STATUS={} queued, {} failed, {} uncertain, {} delivered",
        n(State::Queued) + n(State::Sending),
        n(State::Failed),
        n(State::Uncertain),
        n(State::Delivered)
    )
}

/// Runs the gateway until `control` says shutdown (or closes).
pub async fn run(
    config: Config,
    options: RunOptions,
    mut control: mpsc::Receiver<Control>,
) -> anyhow::Result<()> {
    crate::install_crypto_provider();
    let notifier = Notifier::from_env();
    let outbox = open_outbox(&config).await?;
    let counts = outbox.counts();
    tracing::info!(path = %outbox.path().display(), queued = counts.get(&State::Queued).copied().unwrap_or(0),
        failed = counts.get(&State::Failed).copied().unwrap_or(0),
        uncertain = counts.get(&State::Uncertain).copied().unwrap_or(0), "Outbox open.");

    let watchdog_interval = systemd::watchdog_interval();
    let heartbeats = Heartbeats::for_watchdog(watchdog_interval);
    let watchdog_cancel = CancellationToken::new();
    if let Some(interval) = watchdog_interval {
        tracing::info!(
            interval_s = interval.as_secs_f64(),
            "systemd watchdog enabled."
        );
        let watchdog = Watchdog {
            notifier: notifier.clone(),
            interval,
            heartbeats: heartbeats.clone(),
        };
        tokio::spawn(watchdog.run(watchdog_cancel.clone()));
    }

    let live = Live::default();
    let alerts = Arc::new(Board::default());
    alerts.restore(Board::saved(&outbox));
    let lines = Arc::new(std::sync::Mutex::new(None));
    // The operator service's requests (reload) join the signals' on their own channel.
    let (operator_tx, mut operator_rx) = mpsc::channel(4);
    let operator = Operator::running(
        outbox.clone(),
        content_checks(&config),
        Running {
            started: jiff::Timestamp::now(),
            live: live.clone(),
            alerts: alerts.clone(),
            lines: lines.clone(),
            control: operator_tx,
        },
    );
    for w in &config.warnings {
        tracing::warn!("Configuration: {w}");
    }
    let tls = crate::api::tls::TlsSlot::new(match &config.api.tls {
        Some(files) => Some(crate::api::tls::server_config(files).with_context(|| "api.tls")?),
        None => None,
    });
    // Both doors' caps must fit in the process's file descriptors with room for the
    // sources, D365 and the store (the unit sets LimitNOFILE=4096).
    let mut api_config = config.api.clone();
    if let Some(open_files) = crate::api::config::open_files_limit() {
        let fitted = api_config
            .limits
            .within_open_files(open_files, OPEN_FILES_RESERVE);
        if fitted.max_connections < api_config.limits.max_connections {
            tracing::warn!(open_files, configured = api_config.limits.max_connections, used = fitted.max_connections,
                "api.max_connections lowered to fit the open-file limit (raise LimitNOFILE to serve more).");
        }
        api_config.limits = fitted;
    }
    let api = ApiState::new(operator.clone(), live.clone(), alerts.clone())
        .configured(&api_config, tls.clone());
    if let Some(addr) = config.api.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("api.listen {addr}: cannot listen (another process on that port?)")
        })?;
        let scheme = if tls.is_on() { "https" } else { "http" };
        tracing::info!(%addr, scheme, token = config.api.token.is_some(), max_connections = api.limits.max_connections,
            "Operator API listening: /health, /ready, /metrics, /api/v1, /console.");
        tokio::spawn(crate::api::serve::serve_tcp(
            listener,
            crate::api::http_router(api.clone()),
            tls.clone(),
            api.limits,
            api.listeners.clone(),
            watchdog_cancel.clone(),
        ));
    }
    // Production data does not depend on the socket: without it the gateway runs on and
    // says why the CLI cannot reach it.
    let socket = config.api.socket_path(&config.storage.data_dir);
    match crate::api::serve_socket(
        &socket,
        crate::api::socket_router(api.clone()),
        api.limits,
        api.listeners.clone(),
        watchdog_cancel.clone(),
    )
    .await
    {
        Ok(()) => tracing::info!(path = %socket.display(), "Operator socket listening."),
        Err(e) => tracing::warn!(path = %socket.display(), error = %e,
            "Cannot open the operator socket; the CLI cannot reach the running gateway (set api.socket to a writable place)."),
    }

    let mut config = config;
    let result = loop {
        let running = Components::start(
            &config,
            options,
            &outbox,
            &heartbeats,
            &live,
            &alerts,
            &lines,
        )?;
        notifier.notify("READY=1");
        notifier.notify(&status_line(&outbox));
        let reload = loop {
            let request = tokio::select! {
                c = control.recv() => c,
                c = operator_rx.recv() => c,
                _ = running.fatal.cancelled() => None,
            };
            match request {
                Some(Control::Reload { by, reply }) => match settings::load(&config.dir) {
                    Ok(new) => break Some((new, by, reply)),
                    Err(errors) => {
                        tracing::error!(%by, "Reload refused, the running configuration stays: {errors}");
                        if let Some(reply) = reply {
                            let _ =
                                reply.send(Err(errors.0.iter().map(|e| e.to_string()).collect()));
                        }
                    }
                },
                Some(Control::Shutdown) | None => break None,
            }
        };
        match reload {
            Some((new, by, reply)) => {
                notifier.notify("RELOADING=1");
                if new.storage.data_dir != config.storage.data_dir {
                    tracing::warn!(running = %config.storage.data_dir.display(), configured = %new.storage.data_dir.display(),
                        "storage.data_dir changed: it takes effect at the next restart.");
                }
                if new.api.listen != config.api.listen
                    || new.api.socket != config.api.socket
                    || new.api.tls.is_some() != config.api.tls.is_some()
                    || new.api.limits != config.api.limits
                    || new.api.sessions != config.api.sessions
                {
                    tracing::warn!(
                        "api.listen, api.socket, turning api.tls on or off, the listener's limits and session times take effect at the next restart."
                    );
                }
                for w in &new.warnings {
                    tracing::warn!("Configuration: {w}");
                }
                let mut reread = api.rotate(&new.api);
                reread.extend(secrets_reread(&new));
                tracing::info!(%by, secrets = %reread.join("; "), "Secrets re-read on reload.");
                let fatal = running.stop(config.shutdown_grace).await;
                if fatal {
                    break Err(anyhow::anyhow!(
                        "stopped because the outbox could not be written"
                    ));
                }
                config = new;
                operator.set_checks(content_checks(&config));
                let summary = format!(
                    "{} source(s), {} rule(s)",
                    config.sources.len(),
                    config.rules.len()
                );
                tracing::info!(%by, rules = config.rules.len(), sources = config.sources.len(), "Configuration reloaded.");
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(summary));
                }
            }
            None => {
                notifier.notify("STOPPING=1");
                let fatal = running.stop(config.shutdown_grace).await;
                break if fatal {
                    Err(anyhow::anyhow!(
                        "stopped because the outbox could not be written"
                    ))
                } else {
                    Ok(())
                };
            }
        }
    };
    watchdog_cancel.cancel();
    tracing::info!("Gateway stopped.");
    result
}

/// The secrets other than the API's that a reload reads again (the components that use
/// them start anew with the new configuration), named for the log: never their values.
fn secrets_reread(config: &Config) -> Vec<String> {
    let mut said = Vec::new();
    if let Some(d) = &config.d365 {
        said.push(format!("D365 client secret from {}", d.secret_origin));
    }
    for source in &config.sources {
        if let source::config::SourceConfig::D365Events(events) = source {
            if events.webhook_secret.is_some() {
                said.push(format!("webhook secret of d365_events `{}`", events.id));
            }
            if let Some(sb) = &events.service_bus {
                if matches!(
                    sb.auth,
                    crate::source::d365_events::config::ServiceBusAuth::Sas { .. }
                ) {
                    said.push(format!("Service Bus key of d365_events `{}`", events.id));
                }
            }
        }
    }
    said
}

/// What operators' edits are checked against in `config`.
fn content_checks(config: &Config) -> ContentChecks {
    ContentChecks {
        field_names: config
            .d365
            .as_ref()
            .map(|d| d.field_names.clone())
            .unwrap_or_default(),
        message_types: config
            .d365
            .as_ref()
            .map(|d| d.message_types.clone())
            .unwrap_or_default(),
        lines: ContentChecks::lines_of(&config.rules),
    }
}

/// The tasks that run with one configuration.
struct Components {
    tracker: TaskTracker,
    sources_cancel: CancellationToken,
    core_cancel: CancellationToken,
    pipeline_done: tokio::task::JoinHandle<()>,
    /// Cancelled when the dispatcher stops on an outbox error.
    fatal: CancellationToken,
    heartbeats: Vec<Heartbeat>,
    /// The operator's way to the pipeline; emptied first when stopping.
    lines: Arc<std::sync::Mutex<Option<mpsc::Sender<LineCommand>>>>,
}

impl Components {
    fn start(
        config: &Config,
        options: RunOptions,
        outbox: &Outbox,
        heartbeats: &Heartbeats,
        published: &Live,
        alerts: &Arc<Board>,
        lines: &Arc<std::sync::Mutex<Option<mpsc::Sender<LineCommand>>>>,
    ) -> anyhow::Result<Components> {
        let mut live = ComponentStats::default();
        // D365's verdicts arrive only through a d365_events source: without one, messages
        // are stored without their content index entry (it costs on every message).
        outbox.index_contents(
            config
                .sources
                .iter()
                .any(|s| matches!(s, source::config::SourceConfig::D365Events(_))),
        );
        let client = match (&config.d365, options.dry_run) {
            (_, true) => None,
            (Some(d365), false) => Some(Arc::new(
                D365Client::new(Arc::new(d365.clone())).context("cannot build the HTTP client")?,
            )),
            (None, false) => anyhow::bail!(
                "{}: no `d365` section: add one to deliver messages, or use `run --dry-run`",
                config.dir.join(config::MAIN_FILE).display()
            ),
        };
        let tracker = TaskTracker::new();
        let sources_cancel = CancellationToken::new();
        let core_cancel = CancellationToken::new();
        let fatal = CancellationToken::new();
        let mut beats = Vec::new();

        let (events_tx, events_rx) = mpsc::channel(source::EVENT_CHANNEL_CAPACITY);
        for s in &config.sources {
            tracing::info!(source = %s.id(), "Starting source.");
            let hb = heartbeats.register(&format!("source {}", s.id()));
            beats.push(hb.clone());
            let (health, intake) = source::spawn(
                s.clone(),
                events_tx.clone(),
                sources_cancel.clone(),
                &tracker,
                hb,
                outbox,
            );
            if let Some(intake) = intake {
                live.webhooks.insert(s.id().to_string(), intake);
            }
            live.sources.push((s.id().to_string(), health));
        }
        // The pipeline ends when the last sender is gone: drop ours now.
        drop(events_tx);
        let pipeline_hb = heartbeats.register("pipeline");
        beats.push(pipeline_hb.clone());
        let pipeline = Pipeline {
            engine: Engine::new(
                config.rules.clone(),
                config.time_zone.clone(),
                crate::pipeline::load_engine_state(outbox),
            ),
            outbox: outbox.clone(),
            field_names: config
                .d365
                .as_ref()
                .map(|d| d.field_names.clone())
                .unwrap_or_default(),
            print_messages: options.dry_run,
            stats: Arc::new(PipelineStats::default()),
            heartbeat: pipeline_hb,
        };
        live.pipeline = Some(pipeline.stats.clone());
        live.rules = Some(pipeline.engine.stats.clone());
        let (commands_tx, commands_rx) = mpsc::channel(crate::pipeline::COMMAND_CHANNEL_CAPACITY);
        *lines.lock().unwrap_or_else(|p| p.into_inner()) = Some(commands_tx);
        let pipeline_done = tracker.spawn(pipeline.run(events_rx, commands_rx));

        if let Some(client) = client {
            let d365 = config
                .d365
                .as_ref()
                .context("d365 config present when a client exists")?;
            tracing::info!(endpoint = %d365.send_message_url(), company = %d365.company, queue = %d365.message_queue,
                token_endpoint = %d365.token_url, secret = %d365.secret_origin, max_in_flight = config.dispatcher.max_in_flight, "Delivering to D365.");
            let hb = heartbeats.register("dispatcher");
            beats.push(hb.clone());
            let dispatcher = Dispatcher::new(
                outbox.clone(),
                client,
                config.dispatcher.clone(),
                config.shutdown_grace,
            )
            .with_heartbeat(hb);
            let stats = dispatcher.stats();
            live.dispatch = Some(stats.clone());
            // Uncertain messages settled by D365's own events: only where they arrive.
            let events_arrive = config
                .sources
                .iter()
                .any(|s| matches!(s, source::config::SourceConfig::D365Events(_)));
            if let (Some(policy), true) = (config.dispatcher.evidence, events_arrive) {
                tracker.spawn(
                    crate::d365::evidence::EvidenceWatch {
                        outbox: outbox.clone(),
                        policy,
                        request_timeout: d365.request_timeout,
                        board: stats.evidence.clone(),
                    }
                    .run(core_cancel.clone()),
                );
            }
            let cancel = core_cancel.clone();
            let fatal = fatal.clone();
            tracker.spawn(async move {
                if let Err(e) = dispatcher.run(cancel).await {
                    tracing::error!(error = %e, "Dispatcher stopped: the outbox cannot be written. Shutting down.");
                    fatal.cancel();
                }
            });
        } else {
            tracing::info!("Dry run: messages are built, stored and printed; nothing is sent.");
        }
        // One publisher per broker that rules publish to (what a reload removed stops;
        // its stored publications wait for a configuration that names it again).
        let vias: std::collections::BTreeSet<&str> = config
            .rules
            .iter()
            .filter_map(|r| r.publish.as_ref().map(|p| p.via.as_str()))
            .collect();
        for s in &config.sources {
            if let source::config::SourceConfig::Mqtt(mqtt) = s {
                if vias.contains(mqtt.id.as_str()) {
                    let stats = Arc::new(crate::publish::PublishStats::default());
                    live.publishers.push((mqtt.id.clone(), stats.clone()));
                    tracker.spawn(
                        crate::publish::Publisher {
                            config: mqtt.clone(),
                            outbox: outbox.clone(),
                            stats,
                        }
                        .run(core_cancel.clone()),
                    );
                }
            }
        }
        // Event ids are remembered as long as the longest window of a d365_events source.
        let remember_events = config
            .sources
            .iter()
            .filter_map(|s| match s {
                source::config::SourceConfig::D365Events(c) => Some(c.remember),
                _ => None,
            })
            .max();
        tracker.spawn(prune_loop(
            outbox.clone(),
            config.storage.clone(),
            remember_events,
            core_cancel.clone(),
        ));
        published.replace(live);
        tracker.spawn(
            AlertWatch {
                config: config.alerts.clone(),
                board: alerts.clone(),
                outbox: outbox.clone(),
                live: published.clone(),
                data_dir: config.storage.data_dir.clone(),
                delivering: !options.dry_run,
            }
            .run(core_cancel.clone()),
        );
        tracing::info!(
            rules = config.rules.len(),
            sources = config.sources.len(),
            "Gateway running."
        );
        Ok(Components {
            tracker,
            sources_cancel,
            core_cancel,
            pipeline_done,
            fatal,
            heartbeats: beats,
            lines: lines.clone(),
        })
    }

    /// Stops everything in order within `grace` (twice `grace` at most in all); returns
    /// whether the dispatcher had stopped on an outbox error.
    async fn stop(self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        // No new operator commands: the pipeline ends once it has handled the queued
        // ones and what the sources emitted.
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.sources_cancel.cancel();
        if tokio::time::timeout_at(deadline, self.pipeline_done)
            .await
            .is_err()
        {
            tracing::warn!(
                "Pipeline did not finish storing events within the shutdown grace period."
            );
        }
        self.core_cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(deadline + grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_s = grace.as_secs_f64(),
                "Tasks still running after the grace period; going on without them."
            );
        }
        for hb in &self.heartbeats {
            hb.finish();
        }
        self.fatal.is_cancelled()
    }
}

async fn prune_loop(
    outbox: Outbox,
    storage: crate::outbox::config::StorageConfig,
    remember_events: Option<Duration>,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(storage.prune_interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let retention =
            jiff::SignedDuration::try_from(storage.retention).unwrap_or(jiff::SignedDuration::MAX);
        let before = jiff::Timestamp::now()
            .checked_sub(retention)
            .unwrap_or(jiff::Timestamp::MIN);
        match outbox.prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                "Pruned delivered and cancelled messages past retention."
            ),
            Err(e) => tracing::warn!(error = %e, "Pruning the outbox failed; will try again."),
        }
        if let Some(window) = remember_events {
            let window =
                jiff::SignedDuration::try_from(window).unwrap_or(jiff::SignedDuration::MAX);
            let before = jiff::Timestamp::now()
                .checked_sub(window)
                .unwrap_or(jiff::Timestamp::MIN);
            if let Err(e) = outbox.store().receipts().forget_events(before).await {
                tracing::warn!(error = %e, "Forgetting old D365 event ids failed; will try again.");
            }
            // Unmatched verdicts are kept as long as their ids are remembered.
            if let Err(e) = outbox.forget_unmatched(before).await {
                tracing::warn!(error = %e, "Forgetting old unmatched D365 verdicts failed; will try again.");
            }
        }
        match outbox.compact_if_worthwhile().await {
            Ok(None) => {}
            Ok(Some((before, after))) => tracing::info!(
                before_mib = before / (1024 * 1024),
                after_mib = after / (1024 * 1024),
                "Compacted the outbox: gave back the disk a drained backlog used."
            ),
            Err(e) => {
                tracing::warn!(error = %e, "Compacting the outbox failed; will try again after the next pruning.")
            }
        }
    }
}
