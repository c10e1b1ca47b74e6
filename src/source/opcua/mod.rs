//! OPC UA source (async-opcua, pure-Rust cryptography): one session per source, one
//! subscription with a monitored item per configured node; every data change becomes an
//! event with the server's source timestamp.
//!
//! - **Security:** the endpoint is chosen by exact URL, policy and mode (never a weaker
//!   one the server also offers). The client's application certificate is made on first
//!   start in `pki_dir/own` (its URI and validity logged). A server certificate is trusted
//!   only from `pki_dir/trusted/`; an unknown one is written to `pki_dir/rejected/` and the
//!   error names the file to move.
//! - **No count missed, none doubled:** the rules count counters by `delta` and booleans
//!   by `edge`, so the source must deliver each node's values in order and the current
//!   value after any gap. Values are forwarded in the server's order; one older than the
//!   last forwarded for its node (a republished notification after a fresh read) is
//!   dropped, so a counter never seems to run backwards (which `delta` would take for a
//!   wrap-around). After a new session the current value of every node is read first; a
//!   session the server still held keeps its subscription (the library transfers it and
//!   republishes what was queued). Bad and Uncertain values are never forwarded; each
//!   node's change of quality is logged once. A queue overflow (the server dropped values
//!   between two publishes) is logged and counted: size `queue_size` for the fastest signal.
//! - **Healthy** means a session is active (the server answered ActivateSession), not
//!   that TCP connected. The library reconnects with a delay that grows up to 30 s.
//! - **Back-pressure:** notifications are taken from the session only while fewer than
//!   [`PENDING_MAX`] wait for the pipeline; beyond it the session is not polled, publish
//!   requests stop, and the server keeps the values in its queues.

pub mod browse;
pub mod config;
mod inbox;
mod values;

use inbox::{data_changes, Collector, Inbox, Seen};
use values::newest_rejected;
pub use values::{convert, translate};

use crate::backoff::Backoff;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use opcua::client::{
    Client, ClientBuilder, IdentityToken, Session, SessionConnectMode, SessionPollResult,
};
use opcua::types::{
    AttributeId, DataChangeFilter, DataChangeTrigger, DataValue, DeadbandType, ExtensionObject,
    MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, NodeId, ReadValueId,
    StatusCode, TimestampsToReturn,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SourceError, SourceEvent, SourceHealth};
use crate::event::{Event, Value};
use crate::systemd::Heartbeat;
use config::{Identity, NodeRef, OpcuaConfig};

/// Notifications taken from the session but not yet handed to the pipeline; beyond this
/// the session is not polled (the server queues).
pub const PENDING_MAX: usize = 4096;
/// How long the server keeps the subscription (and its queued values) without publish
/// requests: a network cut shorter than this loses nothing in flight. (The server may
/// revise it down.)
const SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(600);
/// Values in one publish response: bounds a response's size; the rest follow in the next.
const MAX_NOTIFICATIONS_PER_PUBLISH: u32 = 10_000;
/// The delay between attempts to reach the server before any session existed.
const CONNECT: Backoff = Backoff::doubling(Duration::from_millis(500), Duration::from_secs(30));
/// Integers beyond this are not exact as the rules' numbers (f64).
const EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// What the session's event loop reports to the source's task.
#[derive(Debug)]
enum SessionNews {
    Connected { new_session: Option<String> },
    Lost(StatusCode),
    Publish,
    Ended(StatusCode),
}

#[derive(Debug)]
pub struct OpcuaSource {
    config: OpcuaConfig,
    heartbeat: Heartbeat,
    health: Arc<SourceHealth>,
}

/// Per node: the last value forwarded and its quality, to order and to log changes once.
#[derive(Debug, Default, Clone)]
struct NodeState {
    last_at: Option<opcua::types::DateTime>,
    last_value: Option<Value>,
    quality: Option<&'static str>,
}

impl OpcuaSource {
    pub fn new(config: OpcuaConfig, heartbeat: Heartbeat, health: Arc<SourceHealth>) -> Self {
        OpcuaSource {
            config,
            heartbeat,
            health,
        }
    }

    /// The client, with its certificate store; makes the application certificate on
    /// first use and says where it is.
    pub fn client(config: &OpcuaConfig) -> Result<Client, String> {
        let pki = config.pki();
        let client = ClientBuilder::new()
            .application_name(format!("mes-gateway {}", config.id))
            .application_uri(config.application_uri.clone())
            .product_uri("urn:mes-gateway")
            .pki_dir(pki.clone())
            .create_sample_keypair(true)
            .trust_server_certs(config.trust_any_server)
            .verify_server_certs(true)
            .session_retry_limit(-1)
            .session_retry_initial(Duration::from_millis(500))
            .session_retry_max(CONNECT.max())
            .request_timeout(config.request_timeout)
            // A publish after a burst carries thousands of values (the default limit of
            // 1,000 array elements dropped the connection on the 1,001st).
            .max_array_length(MAX_NOTIFICATIONS_PER_PUBLISH as usize * 2)
            .max_message_size(64 * 1024 * 1024)
            .max_chunk_count(1024)
            .session_name(format!("mes-gateway {}", config.id))
            // The source makes the subscription again itself on a new session, and on a
            // session the server kept it republishes what was lost in flight; the
            // library's own transfer, done on every reconnect, left a reactivated session
            // without its queued values (seen with 0.19).
            .recreate_subscriptions(false)
            .client()
            .map_err(|e| format!("cannot set up the OPC UA client: {}", e.join("; ")))?;
        Ok(client)
    }

    /// The application certificate's URI and validity, for the log and `status`.
    pub fn describe_certificate(pki: &Path) -> String {
        let file = pki.join("own/cert.der");
        match std::fs::read(&file)
            .ok()
            .and_then(|der| opcua::crypto::X509::from_der(&der).ok())
        {
            Some(cert) => format!(
                "{} ({}, valid until {})",
                file.display(),
                cert.subject_name(),
                cert.not_after()
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|_| "?".into())
            ),
            None => format!("{} (not made yet)", file.display()),
        }
    }

    fn identity(&self) -> Result<IdentityToken, String> {
        Ok(match &self.config.identity {
            Identity::Anonymous => IdentityToken::Anonymous,
            Identity::UserName { user, password } => {
                IdentityToken::UserName(user.clone(), password.expose().to_string().into())
            }
            Identity::X509 { cert, key } => IdentityToken::new_x509_path(cert, key)
                .map_err(|e| format!("user certificate {}: {e}", cert.display()))?,
        })
    }

    pub async fn run(
        self,
        out: mpsc::Sender<SourceEvent>,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let id: Arc<str> = self.config.id.as_str().into();
        let setup = |detail: String| SourceError::Setup {
            id: id.to_string(),
            detail,
        };
        let mut client = Self::client(&self.config).map_err(setup)?;
        tracing::info!(source = %id, endpoint = %self.config.endpoint, policy = ?self.config.policy, mode = ?self.config.mode,
            nodes = self.config.nodes.len(), certificate = %Self::describe_certificate(&self.config.pki()),
            application_uri = %self.config.application_uri, "OPC UA source starting.");
        let identity = self.identity().map_err(setup)?;
        let mut backoff = CONNECT.start();
        let points: Vec<Arc<str>> = self
            .config
            .nodes
            .iter()
            .map(|n| Arc::from(n.name.as_str()))
            .collect();
        let mut nodes = vec![NodeState::default(); self.config.nodes.len()];
        loop {
            self.heartbeat.beat();
            let connected = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                c = self.open_session(&mut client, &identity) => c,
            };
            let (session, event_loop) = match connected {
                Ok(s) => s,
                Err(detail) => {
                    self.health.set_connected(&id, false, Some(&detail));
                    if !crate::backoff::pause(&cancel, backoff.fail()).await {
                        return Ok(());
                    }

                    continue;
                }
            };
            match self
                .serve(&id, &points, &mut nodes, session, event_loop, &out, &cancel)
                .await?
            {
                Served::Cancelled => return Ok(()),
                Served::Ended(why) => {
                    self.health.set_connected(&id, false, Some(&why));
                    if !crate::backoff::pause(&cancel, backoff.fail()).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Asks the server for its endpoints, takes the one with exactly the configured
    /// policy and mode (never a weaker one), and opens a session to it at the configured
    /// address: a PLC behind NAT or a port forward advertises an address the gateway
    /// cannot reach, so the advertised one is only used for its security settings.
    pub(crate) async fn open_session(
        &self,
        client: &mut Client,
        identity: &IdentityToken,
    ) -> Result<
        (
            Arc<Session>,
            opcua::client::SessionEventLoop<opcua::client::transport::TcpConnector>,
        ),
        String,
    > {
        let endpoints = client
            .get_server_endpoints_from_url(self.config.endpoint.as_str())
            .await
            .map_err(|e| self.explain(e.status(), &e.to_string()))?;
        let policy = self.config.policy.as_ua();
        let mode = self.config.mode.as_ua();
        let Some(mut chosen) = endpoints
            .iter()
            .find(|e| {
                e.security_mode == mode
                    && opcua::crypto::SecurityPolicy::from_uri(e.security_policy_uri.as_ref())
                        == policy
            })
            .cloned()
        else {
            let offered: Vec<String> = endpoints
                .iter()
                .map(|e| {
                    format!(
                        "{}/{:?}",
                        opcua::crypto::SecurityPolicy::from_uri(e.security_policy_uri.as_ref())
                            .to_str(),
                        e.security_mode
                    )
                })
                .collect();
            return Err(format!(
                "the server offers no endpoint with {:?}/{:?} (it offers {}); it is never downgraded",
                self.config.policy,
                self.config.mode,
                offered.join(", ")
            ));
        };
        chosen.endpoint_url = self.config.endpoint.as_str().into();
        client
            .connect_to_endpoint_directly(chosen, identity.clone())
            .map_err(|e| self.explain(e.status(), &e.to_string()))
    }

    /// A status code in words, with what to do where the operator can act.
    pub(crate) fn explain(&self, status: StatusCode, text: &str) -> String {
        let pki = self.config.pki();
        if status == StatusCode::BadCertificateUntrusted
            || status == StatusCode::BadSecurityChecksFailed && newest_rejected(&pki).is_some()
        {
            return match newest_rejected(&pki) {
                Some(file) => format!(
                    "the server's certificate is not trusted ({status}): if it is this PLC's, move {} to {}/",
                    file.display(),
                    pki.join("trusted").display()
                ),
                None => format!(
                    "the server's certificate is not trusted ({status}): put it in {}/",
                    pki.join("trusted").display()
                ),
            };
        }
        if status == StatusCode::BadUserAccessDenied
            || status == StatusCode::BadIdentityTokenRejected
            || status == StatusCode::BadIdentityTokenInvalid
        {
            return format!("the server refused the user name or password ({status}): check user and password_file");
        }
        if status == StatusCode::BadSecurityPolicyRejected
            || status == StatusCode::BadSecurityModeRejected
            || text.contains("No matching endpoint")
        {
            return format!(
                "the server offers no endpoint {} with {:?}/{:?} ({status}); it is never downgraded",
                self.config.endpoint, self.config.policy, self.config.mode
            );
        }
        if text.is_empty() {
            format!("{status}")
        } else {
            crate::text::bounded(&format!("{status}: {text}"), 300)
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &self,
        id: &Arc<str>,
        points: &[Arc<str>],
        nodes: &mut [NodeState],
        session: Arc<Session>,
        event_loop: opcua::client::SessionEventLoop<opcua::client::transport::TcpConnector>,
        out: &mpsc::Sender<SourceEvent>,
        cancel: &CancellationToken,
    ) -> Result<Served, SourceError> {
        let inbox = Arc::new(Inbox::default());
        let (news_tx, mut news) = mpsc::channel::<SessionNews>(64);
        // The event loop, polled only while the inbox has room (back-pressure).
        let poller = {
            let inbox = inbox.clone();
            tokio::spawn(async move {
                let stream = event_loop.enter();
                tokio::pin!(stream);
                loop {
                    inbox.room(PENDING_MAX).await;
                    let polled = stream.next().await;
                    tracing::trace!(result = ?polled, "OPC UA session event.");
                    let said = match polled {
                        None => SessionNews::Ended(StatusCode::BadConnectionClosed),
                        Some(Err(status)) => SessionNews::Ended(status),
                        Some(Ok(SessionPollResult::Reconnected(mode))) => SessionNews::Connected {
                            new_session: match mode {
                                SessionConnectMode::NewSession(id) => Some(id.to_string()),
                                SessionConnectMode::ReactivatedSession(_) => None,
                            },
                        },
                        Some(Ok(SessionPollResult::ConnectionLost(status)))
                        | Some(Ok(SessionPollResult::ReconnectFailed(status))) => {
                            SessionNews::Lost(status)
                        }
                        Some(Ok(SessionPollResult::Subscription(
                            opcua::client::SubscriptionActivity::Publish,
                        ))) => SessionNews::Publish,
                        Some(Ok(_)) => continue,
                    };
                    let end = matches!(said, SessionNews::Ended(_));
                    if news_tx.send(said).await.is_err() || end {
                        return;
                    }
                }
            })
        };
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _poller = AbortOnDrop(poller);
        let mut by_node_ref: Arc<HashMap<NodeId, usize>> = Arc::default();
        let mut subscribed: Option<(u32, Arc<Seen>)> = None;
        let mut ticks = tokio::time::interval(self.heartbeat.period());
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    // Tell the server the session is over (bounded: a dead server must
                    // not hold the stop).
                    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
                    return Ok(Served::Cancelled);
                }
                _ = ticks.tick() => self.heartbeat.beat(),
                n = news.recv() => {
                    let Some(n) = n else {
                        return Ok(Served::Ended("the session's event loop stopped".into()));
                    };
                    match n {
                        SessionNews::Connected { new_session } => {
                            self.health.set_connected(id, true, None);
                            if let Some(session_id) = &new_session {
                                tracing::info!(source = %id, session = %session_id, "OPC UA session created.");
                                self.health.set_detail(format!(
                                    "session {session_id} since {}; certificate {}",
                                    jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%S UTC"),
                                    Self::describe_certificate(&self.config.pki())
                                ));
                            }
                            match &subscribed {
                                Some((subscription, seen)) if new_session.is_none() => {
                                    // The server kept the session and its subscription:
                                    // what it published while the line was down waits in
                                    // its retransmission queue. Fetch it, in order, before
                                    // anything newer.
                                    self.republish(id, &session, *subscription, seen, &inbox).await;
                                    // A server that did not keep what it sent (some do
                                    // not) still has the current values: read them, so
                                    // a counter's gap is counted by delta all the same.
                                    self.read_current(id, &session, &by_node_ref, &inbox).await;
                                }
                                _ => match self.subscribe(id, &session, &inbox).await {
                                    Ok((map, subscription, seen)) => {
                                        by_node_ref = map;
                                        subscribed = Some((subscription, seen));
                                        // A new session: what happened during the gap is
                                        // only in the current values. Read them first.
                                        self.read_current(id, &session, &by_node_ref, &inbox).await;
                                    }
                                    Err(e) => return Ok(Served::Ended(e)),
                                },
                            }
                            // Ask for the next publish at once rather than at the next tick.
                            session.trigger_publish_now();
                        }
                        SessionNews::Lost(status) => {
                            let detail = self.explain(status, "");
                            self.health.set_connected(id, false, Some(&detail));
                        }
                        SessionNews::Publish => {
                            self.health.publishes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        SessionNews::Ended(status) => {
                            return Ok(Served::Ended(self.explain(status, "")));
                        }
                    }
                }
                _ = inbox.arrived.notified() => {
                    loop {
                        let batch = inbox.take(256);
                        if batch.is_empty() {
                            break;
                        }
                        for (index, value) in batch {
                            if let Some(event) = self.to_event(id, points, nodes, index, value) {
                                self.health.event();
                                super::forward(out, event.into(), &self.heartbeat, id).await?;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Creates the subscription and one monitored item per node; the map from NodeId to
    /// the node's index. A node the server refuses is logged and left out.
    async fn subscribe(
        &self,
        id: &Arc<str>,
        session: &Arc<Session>,
        inbox: &Arc<Inbox>,
    ) -> Result<(Arc<HashMap<NodeId, usize>>, u32, Arc<Seen>), String> {
        let resolved = self.resolve(session).await?;
        let mut map = HashMap::new();
        for (i, node) in resolved.iter().enumerate() {
            if let Some(node) = node {
                map.insert(node.clone(), i);
            }
        }
        let map = Arc::new(map);
        let publishing = self.config.publishing_interval;
        // A keep-alive about every 5 s (proof of life when nothing changes); a lifetime of
        // SUBSCRIPTION_LIFETIME, so a network cut shorter than that finds the
        // subscription and its queued values still on the server.
        let interval_ms = publishing.as_millis().max(1) as u64;
        let keep_alive = (5_000 / interval_ms).clamp(1, 30_000) as u32;
        let lifetime =
            ((SUBSCRIPTION_LIFETIME.as_millis() as u64 / interval_ms) as u32).max(keep_alive * 3);
        let seen = Arc::new(Seen::default());
        let collector = Collector {
            inbox: inbox.clone(),
            by_node: map.clone(),
            seen: seen.clone(),
        };
        let subscription = session
            .create_subscription(
                publishing,
                lifetime,
                keep_alive,
                MAX_NOTIFICATIONS_PER_PUBLISH,
                0,
                true,
                collector,
            )
            .await
            .map_err(|e| format!("cannot create the subscription: {e}"))?;
        let requests: Vec<MonitoredItemCreateRequest> = self
            .config
            .nodes
            .iter()
            .zip(&resolved)
            .enumerate()
            .filter_map(|(i, (n, node))| {
                let node = node.clone()?;
                let filter = n.deadband.map(|d| {
                    ExtensionObject::from_message(DataChangeFilter {
                        trigger: DataChangeTrigger::StatusValue,
                        deadband_type: DeadbandType::Absolute as u32,
                        deadband_value: d,
                    })
                });
                Some(MonitoredItemCreateRequest {
                    item_to_monitor: ReadValueId {
                        node_id: node,
                        attribute_id: AttributeId::Value as u32,
                        ..Default::default()
                    },
                    monitoring_mode: MonitoringMode::Reporting,
                    requested_parameters: MonitoringParameters {
                        client_handle: i as u32 + 1,
                        sampling_interval: n.sampling_interval.as_secs_f64() * 1000.0,
                        filter: filter.unwrap_or_default(),
                        queue_size: n.queue_size,
                        // Keep the oldest: a dropped value is reported (overflow), and
                        // what arrives is still in order.
                        discard_oldest: false,
                    },
                })
            })
            .collect();
        let names: Vec<&str> = self
            .config
            .nodes
            .iter()
            .zip(&resolved)
            .filter(|(_, r)| r.is_some())
            .map(|(n, _)| n.name.as_str())
            .collect();
        let created = session
            .create_monitored_items(subscription, TimestampsToReturn::Both, requests)
            .await
            .map_err(|e| format!("cannot create the monitored items: {e}"))?;
        for (name, result) in names.iter().zip(&created) {
            let status = result.result.status_code;
            if status.is_bad() {
                self.health.decode_error();
                tracing::error!(source = %id, node = %name, %status, "The server refused to monitor this node; its values will not come.");
            } else {
                tracing::debug!(source = %id, node = %name, sampling_ms = result.result.revised_sampling_interval,
                    queue = result.result.revised_queue_size, "Monitoring node.");
            }
        }
        tracing::info!(source = %id, subscription, publishing_ms = publishing.as_millis() as u64,
            items = created.iter().filter(|c| c.result.status_code.is_good()).count(), "OPC UA subscription created.");
        Ok((map, subscription, seen))
    }

    /// Each node's NodeId: as configured, or its browse path translated by the server.
    async fn resolve(&self, session: &Arc<Session>) -> Result<Vec<Option<NodeId>>, String> {
        let mut out = Vec::with_capacity(self.config.nodes.len());
        for n in &self.config.nodes {
            out.push(match &n.node {
                NodeRef::Id(id) => Some(id.clone()),
                NodeRef::BrowsePath(steps) => match translate(session, steps).await {
                    Ok(id) => Some(id),
                    Err(e) => {
                        self.health.decode_error();
                        tracing::error!(source = %self.config.id, node = %n.name, path = %n.node, error = %e, "Browse path not found on the server; this node is not monitored.");
                        None
                    }
                },
            });
        }
        Ok(out)
    }

    /// Asks the server again for the notifications after the last one received, until it
    /// has no more; queues their values in order.
    async fn republish(
        &self,
        id: &Arc<str>,
        session: &Arc<Session>,
        subscription: u32,
        seen: &Arc<Seen>,
        inbox: &Arc<Inbox>,
    ) {
        let mut next = seen
            .last_sequence
            .load(std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut fetched = 0usize;
        loop {
            match session.republish(subscription, next).await {
                Ok(message) => {
                    let values: Vec<(usize, DataValue)> = {
                        let by_handle = seen.by_handle.lock().unwrap_or_else(|p| p.into_inner());
                        data_changes(&message)
                            .into_iter()
                            .filter_map(|(h, v)| Some((*by_handle.get(&h)?, v)))
                            .collect()
                    };
                    fetched += values.len();
                    seen.last_sequence
                        .fetch_max(next, std::sync::atomic::Ordering::Relaxed);
                    inbox.put(values);
                    next += 1;
                }
                Err(e) => {
                    if fetched > 0 {
                        tracing::info!(source = %id, values = fetched, "Values published while the connection was down fetched again (Republish).");
                    }
                    tracing::debug!(source = %id, sequence = next, status = %e, "Nothing more to republish.");
                    return;
                }
            }
        }
    }

    /// Reads every node's current value and queues it like a notification.
    async fn read_current(
        &self,
        id: &Arc<str>,
        session: &Arc<Session>,
        by_node: &HashMap<NodeId, usize>,
        inbox: &Arc<Inbox>,
    ) {
        let mut order: Vec<(&NodeId, usize)> = by_node.iter().map(|(n, i)| (n, *i)).collect();
        order.sort_by_key(|(_, i)| *i);
        let reads: Vec<ReadValueId> = order
            .iter()
            .map(|(n, _)| ReadValueId {
                node_id: (*n).clone(),
                attribute_id: AttributeId::Value as u32,
                ..Default::default()
            })
            .collect();
        tracing::debug!(source = %id, nodes = reads.len(), "Reading the current values.");
        match session.read(&reads, TimestampsToReturn::Both, 0.0).await {
            Ok(values) => {
                tracing::debug!(source = %id, values = ?values, "Current values read.");
                inbox.put(order.iter().map(|(_, i)| *i).zip(values));
            }
            Err(e) => {
                tracing::warn!(source = %id, error = %e, "Cannot read the current values after a new session; the subscription's first values will do.");
            }
        }
    }

    /// A data value as an event, or `None` (bad quality, out of order, unusable type).
    fn to_event(
        &self,
        id: &Arc<str>,
        points: &[Arc<str>],
        nodes: &mut [NodeState],
        index: usize,
        value: DataValue,
    ) -> Option<Event> {
        let name = points.get(index)?;
        let state = nodes.get_mut(index)?;
        let status = value.status.unwrap_or(StatusCode::Good);
        let quality = if status.is_bad() {
            "bad"
        } else if status.is_uncertain() {
            "uncertain"
        } else {
            "good"
        };
        if state.quality != Some(quality) {
            if quality != "good" {
                tracing::warn!(source = %id, node = %name, %status, "OPC UA node reports {quality} quality; its values are not counted until it is good again.");
            } else if state.quality.is_some() {
                tracing::info!(source = %id, node = %name, "OPC UA node reports good quality again.");
            }
            state.quality = Some(quality);
        }
        if status.overflow() {
            self.health.decode_error();
            tracing::warn!(source = %id, node = %name, "The server's queue for this node overflowed: values were lost between two publishes (raise queue_size or lower sampling_interval).");
        }
        if quality != "good" {
            self.health.decode_error();
            return None;
        }
        let at = value.source_timestamp.or(value.server_timestamp);
        if let (Some(at), Some(last)) = (at, state.last_at) {
            if at < last {
                tracing::debug!(source = %id, node = %name, "An older value after a newer one (republished after a read); skipped.");
                return None;
            }
        }
        let converted = match value.value.as_ref().map(convert) {
            Some(Ok(v)) => v,
            Some(Err(why)) => {
                self.health.decode_error();
                tracing::warn!(source = %id, node = %name, reason = %why, "OPC UA value cannot be used; skipped.");
                return None;
            }
            None => return None,
        };
        if at.is_some() && at == state.last_at && state.last_value.as_ref() == Some(&converted) {
            // The same observation twice (the read after a new session, then the
            // subscription's first value): once is enough.
            return None;
        }
        if at.is_some() {
            state.last_at = at;
        }
        state.last_value = Some(converted.clone());
        let at = at
            .and_then(|t| {
                jiff::Timestamp::from_nanosecond(i128::from(t.as_chrono().timestamp_nanos_opt()?))
                    .ok()
            })
            .unwrap_or_else(jiff::Timestamp::now);
        Some(Event {
            source: id.clone(),
            point: name.clone(),
            value: converted,
            at,
        })
    }
}

enum Served {
    Cancelled,
    Ended(String),
}
