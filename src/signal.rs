//! Signals as control messages: SIGTERM and SIGINT ask for shutdown, SIGHUP for a reload.
//! `app::run` takes the receiving end, so tests drive it without signals.

use tokio::sync::{mpsc, oneshot};

#[derive(Debug)]
pub enum Control {
    Shutdown,
    /// Reload the configuration; the answer goes to `reply` when someone waits for it
    /// (the operator service), else to the log only (SIGHUP).
    Reload {
        by: String,
        reply: Option<oneshot::Sender<ReloadOutcome>>,
    },
}

/// What a reload did: a summary of the new configuration, or every error found in it
/// (`file:line:column: path: message`) while the running one stays.
pub type ReloadOutcome = Result<String, Vec<String>>;

/// Installs the handlers and returns the stream of control messages.
pub fn listen() -> mpsc::Receiver<Control> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = handlers else {
            // Without handlers the default actions still stop the process; the outbox is
            // crash-safe, so only the graceful part is lost.
            tracing::warn!("Cannot install signal handlers; shutdown will not be graceful.");
            return;
        };
        loop {
            let control = tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received: shutting down."); Control::Shutdown }
                _ = int.recv() => { tracing::info!("SIGINT received: shutting down."); Control::Shutdown }
                _ = hup.recv() => { tracing::info!("SIGHUP received: reloading the configuration."); Control::Reload { by: "SIGHUP".into(), reply: None } }
            };
            if tx.send(control).await.is_err() {
                return;
            }
        }
    });
    rx
}
