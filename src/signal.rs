//! One future for "please stop": SIGTERM (systemd) or SIGINT (Ctrl-C).

/// Completes at the first SIGTERM or SIGINT.
pub async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            // Without signal handlers the default action (terminate) still stops the
            // process; the outbox is crash-safe, so we only lose the graceful part.
            tracing::warn!("Cannot install signal handlers; shutdown will not be graceful.");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received: shutting down."),
        _ = int.recv() => tracing::info!("SIGINT received: shutting down."),
    }
}
