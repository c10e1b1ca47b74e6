//! Rules' `publish` action: MQTT messages to the plant (an HMI or a PLC bridge learns
//! the order D365 released), sent through the broker of an `mqtt` source.
//!
//! # Invariants
//!
//! - A publication is stored in the outbox in the same transaction as the event that
//!   built it (and that event's id or upstream delivery): a crash loses none and a
//!   redelivered event builds none twice.
//! - It leaves the outbox only when the broker has acknowledged it (QoS 1 PUBACK). So
//!   delivery is at least once: after a lost connection or a crash, what was not
//!   acknowledged is published again. Publish state, not commands (a retained "current
//!   order" topic), and a second copy changes nothing.
//! - Per broker, publications go out in the order they were built.
//! - Each connection starts from a fresh client (clean session, its own client id
//!   `<source client id>-publish`): nothing rumqttc kept from a broken connection is sent
//!   behind the gateway's back, so every PUBACK is matched to the publication it answers.
//! - At most `WINDOW` publications are in flight per broker; the rest wait on disk.

use crate::backoff::Backoff;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::outbox::Outbox;
pub use crate::outbox::Publication;
use crate::source::mqtt::config::MqttConfig;

/// Publications handed to the broker and not yet acknowledged, per broker.
const WINDOW: usize = 32;
const RETRY: Backoff = Backoff::doubling(Duration::from_millis(500), Duration::from_secs(30));
/// How long a clean stop waits for the broker to take the DISCONNECT.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

/// What a publisher reports.
#[derive(Debug, Default)]
pub struct PublishStats {
    pub published: AtomicU64,
    pub connected: AtomicBool,
}

/// Sends the stored publications of one broker.
#[derive(Debug)]
pub struct Publisher {
    pub config: MqttConfig,
    pub outbox: Outbox,
    pub stats: Arc<PublishStats>,
}

/// What went wrong with one connection.
enum Ended {
    Cancelled,
    Lost(String),
}

impl Publisher {
    pub async fn run(self, cancel: CancellationToken) {
        let broker = self.config.broker.address();
        let mut wait = RETRY.start();
        let mut down_logged = false;
        loop {
            match self.connection(&cancel, &mut wait).await {
                Ended::Cancelled => return,
                Ended::Lost(e) => {
                    self.stats.connected.store(false, Ordering::Relaxed);
                    if !std::mem::replace(&mut down_logged, true) {
                        tracing::warn!(via = %self.config.id, %broker, error = %e, "Cannot publish to the MQTT broker; publications wait in the outbox.");
                    }
                }
            }
            if !crate::backoff::pause(&cancel, wait.fail()).await {
                return;
            }
        }
    }

    /// One connection: from a fresh client until it breaks or the gateway stops.
    async fn connection(
        &self,
        cancel: &CancellationToken,
        wait: &mut crate::backoff::Retries,
    ) -> Ended {
        let via = self.config.id.as_str();
        let client_id = format!("{}-publish", self.config.client_id);
        let options = match self.config.broker.options(&client_id) {
            Ok(mut o) => {
                o.set_clean_session(true);
                o
            }
            Err(e) => return Ended::Lost(e),
        };
        let (client, mut eventloop) = AsyncClient::new(options, WINDOW * 2);
        let mut changes = self.outbox.subscribe();
        let mut connected = false;
        // Handed to the client, waiting for their packet id (rumqttc numbers them in the
        // order they were handed over).
        let mut handed: VecDeque<u64> = VecDeque::new();
        let mut in_flight: HashMap<u16, u64> = HashMap::new();
        let mut last_loaded: Option<u64> = None;
        loop {
            let busy = handed.len() + in_flight.len();
            if connected && busy < WINDOW {
                let room = WINDOW - busy;
                let pending = self
                    .outbox
                    .store()
                    .publications()
                    .pending(via, last_loaded, room)
                    .await;
                match pending {
                    Ok(list) => {
                        for (seq, p) in list {
                            // Room for WINDOW * 2 requests and at most WINDOW handed: the
                            // channel cannot be full here.
                            if let Err(e) =
                                client.try_publish(p.topic, QoS::AtLeastOnce, p.retain, p.payload)
                            {
                                return Ended::Lost(e.to_string());
                            }
                            handed.push_back(seq);
                            last_loaded = Some(seq);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(via, error = %e, "Cannot read publications from the outbox; trying again.")
                    }
                }
            }
            let room = connected && handed.len() + in_flight.len() < WINDOW;
            tokio::select! {
                _ = cancel.cancelled() => {
                    if connected {
                        let _ = client.try_disconnect();
                        let _ = tokio::time::timeout(DISCONNECT_WAIT, async {
                            while let Ok(event) = eventloop.poll().await {
                                if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                                    return;
                                }
                            }
                        })
                        .await;
                    }
                    return Ended::Cancelled;
                }
                changed = changes.changed(), if room => {
                    if changed.is_err() {
                        return Ended::Cancelled;
                    }
                }
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        wait.reset();
                        self.stats.connected.store(true, Ordering::Relaxed);
                        tracing::info!(via, broker = %self.config.broker.address(), "Publisher connected to the MQTT broker.");
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(seq) = handed.pop_front() {
                            in_flight.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = in_flight.remove(&ack.pkid) {
                            if let Err(e) = self.outbox.store().publications().forget(via, seq).await {
                                // Kept: published again later (at least once).
                                tracing::warn!(via, error = %e, "Cannot remove a published message from the outbox; it will be published again.");
                            }
                            self.stats.published.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Ended::Lost(e.to_string()),
                },
            }
        }
    }
}
