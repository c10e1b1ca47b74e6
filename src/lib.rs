//! mes-gateway turns shop-floor signals into the production-order messages that
//! Dynamics 365 Finance & Operations accepts on its MES integration API (queue
//! `JmgMES3P`), keeps every message in a durable outbox, and delivers it with retries,
//! per production order in strict order.
//!
//! # Layout
//!
//! ```text
//!  source::* ──Event──▶ pipeline (rules::Engine) ──append+flush──▶ outbox ◀──lanes── d365::Dispatcher ──HTTPS──▶ D365
//!  (one task each,      bounded channel                            (sled)             (token, retry decisions)
//!   bounded channel)                                                  ▲
//!                                                                     └── cli: outbox list/show/retry/cancel/resolve
//! ```
//!
//! - [`config`]: `gateway.yaml` + `rules.d/*.yaml`, parsed then validated; all errors at
//!   once with file:line:column.
//! - [`message`]: the five `JmgMES3P` message types, their envelope and mandatory-field checks.
//! - [`source`]: shop-floor inputs (MQTT, Modbus TCP/RTU, serial, simulator), one task each.
//! - [`api`]: `/health` and `/metrics` for operators; [`systemd`]: notify and watchdog.
//! - [`rules`]: turns events into messages and keeps each line's order context (state saved
//!   atomically with the messages).
//! - [`pipeline`]: events → rules → outbox, group commit; recognises redelivered upstream
//!   messages (MQTT DUP) whose result is already stored, and hands acks back after the commit.
//! - [`outbox`]: the durable per-order FIFO store and its state machine (lanes on disk,
//!   delivery identities, one flush per batch of transitions); the only hand-off that
//!   survives a restart.
//! - [`d365`]: the dispatcher, the HTTP client, the token cache and the retry decisions.
//! - [`app`]: wiring, reload and ordered shutdown; [`cli`]: the commands; [`signal`]:
//!   SIGTERM/SIGINT (stop) and SIGHUP (reload).

#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, missing_debug_implementations)]

/// Makes ring the process's one TLS crypto provider (reqwest and rumqttc both use
/// rustls 0.23). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod d365;
pub mod event;
pub mod message;
pub mod outbox;
pub mod pipeline;
pub mod rules;
pub mod settings;
pub mod signal;
pub mod source;
pub mod systemd;
