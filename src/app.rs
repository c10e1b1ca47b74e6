//! Wiring: opens the outbox, starts sources, the pipeline, the dispatcher and the
//! pruner, and shuts them down in order when asked.
//!
//! Shutdown order: stop the sources; let the pipeline store what they already emitted;
//! stop the dispatcher (requests in flight get the rest of the grace period); wait for
//! everything under one deadline.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::d365::client::D365Client;
use crate::d365::Dispatcher;
use crate::outbox::Outbox;
use crate::pipeline::{Pipeline, PipelineStats};
use crate::rules::Engine;
use crate::source;

#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Build, store and print messages; send nothing.
    pub dry_run: bool,
}

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

pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = match (&config.d365, options.dry_run) {
        (_, true) => None,
        (Some(d365), false) => Some(Arc::new(
            D365Client::new(Arc::new(d365.clone())).context("cannot build the HTTP client")?,
        )),
        (None, false) => anyhow::bail!(
            "{}: no `d365` section: add one to deliver messages, or use `run --dry-run`",
            config.dir.join(crate::config::MAIN_FILE).display()
        ),
    };
    let outbox = open_outbox(&config).await?;
    let counts = outbox.counts();
    tracing::info!(path = %outbox.path().display(), queued = counts.get(&crate::outbox::State::Queued).copied().unwrap_or(0),
        failed = counts.get(&crate::outbox::State::Failed).copied().unwrap_or(0),
        uncertain = counts.get(&crate::outbox::State::Uncertain).copied().unwrap_or(0), "Outbox open.");

    let tracker = TaskTracker::new();
    let sources_cancel = CancellationToken::new();
    let core_cancel = CancellationToken::new();
    let wake = Arc::new(Notify::new());

    let (events_tx, events_rx) = mpsc::channel(source::EVENT_CHANNEL_CAPACITY);
    for s in &config.sources {
        tracing::info!(source = %s.id(), "Starting source.");
        source::spawn(
            s.clone(),
            events_tx.clone(),
            sources_cancel.clone(),
            &tracker,
        );
    }
    // The pipeline ends when the last sender is gone: drop ours now.
    drop(events_tx);
    let pipeline = Pipeline {
        engine: Engine::new(config.rules.clone()),
        outbox: outbox.clone(),
        field_names: config
            .d365
            .as_ref()
            .map(|d| d.field_names.clone())
            .unwrap_or_default(),
        wake: wake.clone(),
        print_messages: options.dry_run,
        stats: Arc::new(PipelineStats::default()),
    };
    let pipeline_done = tracker.spawn(pipeline.run(events_rx));

    let fatal = CancellationToken::new();
    if let Some(client) = client {
        let d365 = config
            .d365
            .as_ref()
            .context("d365 config present when a client exists")?;
        tracing::info!(endpoint = %d365.send_message_url(), company = %d365.company, queue = %d365.message_queue,
            token_endpoint = %d365.token_url, secret = %d365.secret_origin, max_in_flight = config.dispatcher.max_in_flight, "Delivering to D365.");
        let dispatcher = Dispatcher::new(
            outbox.clone(),
            client,
            config.dispatcher.clone(),
            wake.clone(),
            config.shutdown_grace,
        )?;
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
    tracker.spawn(prune_loop(
        outbox.clone(),
        config.storage.clone(),
        core_cancel.clone(),
    ));
    tracing::info!(
        rules = config.rules.len(),
        sources = config.sources.len(),
        "Gateway running."
    );

    tokio::select! {
        _ = shutdown => {}
        _ = fatal.cancelled() => {}
    }
    let grace = config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    sources_cancel.cancel();
    if tokio::time::timeout_at(deadline, pipeline_done)
        .await
        .is_err()
    {
        tracing::warn!("Pipeline did not finish storing events within the shutdown grace period.");
    }
    core_cancel.cancel();
    tracker.close();
    if tokio::time::timeout_at(deadline + grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = grace.as_secs_f64(),
            "Tasks still running after the grace period; exiting anyway."
        );
    }
    tracing::info!("Gateway stopped.");
    if fatal.is_cancelled() {
        anyhow::bail!("stopped because the outbox could not be written");
    }
    Ok(())
}

async fn prune_loop(
    outbox: Outbox,
    storage: crate::config::StorageConfig,
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
    }
}
