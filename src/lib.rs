//! mes-gateway turns shop-floor signals into the production-order messages that
//! Dynamics 365 Finance & Operations accepts on its MES integration API (queue
//! `JmgMES3P`), keeps every message in a durable outbox, and delivers it with retries,
//! per production order in strict order.
//!
//! # Data flow
//!
//! ```text
//!  source::* ──SourceEvent──▶ pipeline ──Ingest (messages + rules state + delivery ids)──▶ outbox (redb)
//!  one task each,   bounded    │ rules::Engine                one write, one flush            │
//!  acks upstream    channel    │ (pure, no I/O)                                               │ change feed
//!  after the commit ◀──────────┘                                                              ▼
//!                                          D365 ◀──HTTPS── d365::Dispatcher (lanes per order, RetryPolicy)
//! ```
//!
//! # Who owns which state
//!
//! | state | owner | durable? |
//! |---|---|---|
//! | messages, their states and history; lanes per production order | [`outbox`] | yes (redb) |
//! | upstream delivery identities (an MQTT publish already stored) | [`outbox`] (written by [`pipeline`]) | yes, with the messages it produced |
//! | order context per line, released orders per line, counters, accumulators, pending edges | [`rules::Engine`] | yes, saved in the same write as the messages |
//! | D365's verdicts on messages, events matching none | [`outbox`] (written by [`pipeline`]) | yes, with the event's id |
//! | rules' MQTT publications until the broker acknowledges them | [`outbox`], sent by [`publish`] | yes, with the batch that built them |
//! | requests in flight, backoff deadlines, the 429/credentials pause | [`d365::Dispatcher`] | deadlines and pause yes, in-flight no (found `sending` → uncertain) |
//! | the access token | [`entra`] | no |
//! | a source's connection and unacknowledged receipts | each [`source`] | no: the broker keeps what was not acknowledged |
//! | the configuration | [`settings::Config`], replaced on reload by [`app`] | files |
//!
//! # Modules
//!
//! - [`config`]: what every section shares: reading the files (serde-saphyr), positions,
//!   every error at once as `file:line:column: path: message`, durations, secrets.
//!   Each component owns its own section next to its code (`d365::config`,
//!   `outbox::config`, `source::*::config`, `rules::config`); [`settings`] names the
//!   sections and assembles [`settings::Config`]. Imports run one way (checked by
//!   `tests/architecture.rs`).
//! - [`message`]: the five `JmgMES3P` message types, their envelope and mandatory-field checks.
//! - [`source`]: shop-floor inputs (MQTT, Modbus TCP/RTU, serial, simulator), one task each.
//! - [`rules`]: rule syntax, compile step, and the engine that turns events into messages.
//! - [`pipeline`]: events → rules → outbox, group commit; recognises redelivered upstream
//!   messages (MQTT DUP) whose result is already stored, and hands acks back after the commit.
//! - [`outbox`]: the durable per-order FIFO store and its state machine; the only hand-off
//!   that survives a restart. It also matches D365's verdicts to the messages they name.
//! - [`publish`]: rules' `publish` action, sent to MQTT at least once, in order.
//! - [`d365`]: the dispatcher, the HTTP client, the token cache and the retry decisions.
//! - [`operator`]: every operator action (list, show, retry, edit, cancel, resolve, send,
//!   lines, reload, status), checked against the state machine; [`api`]: its doors — a
//!   Unix socket for the CLI, HTTP (`/api/v1` with a bearer token, `/health`, `/ready`,
//!   `/metrics`) and the web console; [`alert`]: incidents fired and cleared once each
//!   (log, metrics, MQTT, webhook); [`live`]: what running components publish about
//!   themselves for those three; [`systemd`]: notify and watchdog.
//! - [`app`]: wiring, reload and ordered shutdown; [`cli`]: the commands; [`signal`]:
//!   SIGTERM/SIGINT (stop) and SIGHUP (reload).

#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, missing_debug_implementations)]

/// Makes ring the process's one TLS crypto provider (reqwest and rumqttc both use
/// rustls 0.23). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub mod alert;
pub mod api;
pub mod app;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod d365;
pub mod entra;
pub mod event;
pub mod live;
pub mod message;
pub mod mqtt;
pub mod operator;
pub mod outbox;
pub mod pipeline;
pub mod publish;
pub mod rules;
pub mod settings;
pub mod signal;
pub mod source;
pub mod store;
pub mod systemd;
pub mod text;
