//! MQTT source (rumqttc): subscribes, turns each publish into an event, and acknowledges
//! a QoS 1 publish to the broker only after what it produced is durable in the outbox.
//!
//! The session is persistent (`clean_session = false`, a stable client id) and acks are
//! manual, so a publish the gateway received but had not stored when it died is
//! delivered again by the broker after the restart. When the broker reports no session
//! (first connect, or it lost its state), the subscriptions are made again.
//! Connection errors are retried forever with capped exponential backoff; the state is
//! logged when it changes, not at every attempt.
//!
//! # Acknowledgements (exactly once with the outbox)
//!
//! - Every QoS 1/2 publish gets a receipt number and a delivery identity
//!   ([`crate::outbox::DeliveryId`]); the pipeline commits the identity with what the
//!   publish produced and recognises a redelivery (DUP = 1) of something already stored.
//! - Acks come back from the pipeline after the commit. They are written to the broker in
//!   the order the publishes arrived, and only on the connection the publish came on: an
//!   ack for a publish from an earlier connection is dropped, since the broker sends that
//!   publish again (with DUP = 1) and its identity makes it an ack-only duplicate. So an
//!   old packet id never acknowledges an unrelated delivery of a fresh session.
//! - An ack is never dropped and never waits behind reads: this task writes the acks the
//!   pipeline handed back straight onto the connection (through rumqttc's state, so its
//!   bookkeeping stays right) and flushes them before it reads anything more. Going
//!   through rumqttc's request channel instead, acks fell behind: each poll either reads
//!   a bulk of publishes or takes one request, and 90,000 acks piled up in a 100,000
//!   burst. When this task has too many events the pipeline has not taken yet, it stops
//!   reading from the broker (back-pressure through TCP and the broker's in-flight
//!   window).
//! - After acks are written, a *barrier* (an UNSUBSCRIBE of a topic never subscribed)
//!   goes out; the broker handles packets in order, so its UNSUBACK proves it has those
//!   acks, and their identities are forgotten `CONFIRMED_KEEP` later: the broker should
//!   not redeliver them, but mosquitto 2.0.11, restarted with persistence under load, was
//!   seen sending a publish again (DUP 1, same packet id) 270 ms after its ack had been
//!   confirmed (tests/recovery.rs). Keeping the identity a moment longer makes that an
//!   ack-only duplicate. A false match would need the broker to reuse the packet id for
//!   the same topic and payload within that moment *and* to resend it as DUP 1 without
//!   the gateway ever having received its first delivery.
//! - At shutdown the task stops taking new publishes, waits for the pipeline to hand back
//!   every ack, writes them, and sends DISCONNECT, so the broker neither redelivers what
//!   was stored nor publishes the will message.

use crate::backoff::Backoff;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Outgoing, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Ack, AckTicket, SourceError, SourceEvent, SourceHealth};
pub mod config;

use crate::event::{Event, Value};
use crate::outbox::{Outbox, Receipt, ReceiptId};
use crate::systemd::Heartbeat;
use config::{MqttConfig, PayloadFormat};

/// Requests this task puts in rumqttc's request channel besides the subscriptions: one
/// barrier at a time, and room to spare.
const OTHER_REQUESTS: usize = 4;
/// Longest wait for the acks of one turn to reach the socket; past it the connection is
/// taken as broken.
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Events read from the broker but not yet taken by the pipeline; at this many the task
/// stops reading from the broker until the pipeline catches up.
const LOCAL_EVENTS: usize = 64;
/// Acks handed back by the pipeline and not yet taken by this task. The pipeline waits
/// when it is full (it never is for long: this task drains it first on every turn).
const ACK_QUEUE: usize = super::EVENT_CHANNEL_CAPACITY + 512;
/// Least time between two barriers (each is one UNSUBSCRIBE/UNSUBACK round trip).
const BARRIER_INTERVAL: Duration = Duration::from_millis(100);
/// How long a confirmed ack's identity is kept before it is forgotten (see the module
/// doc). At 15,000 acks a second that is about 30,000 small entries in memory.
const CONFIRMED_KEEP: Duration = Duration::from_secs(2);
/// Longest wait at shutdown for the pipeline's last acks and the DISCONNECT.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
const RECONNECT: Backoff = Backoff::doubling(Duration::from_millis(200), Duration::from_secs(30));

#[derive(Debug)]
pub struct MqttSource {
    config: MqttConfig,
    heartbeat: Heartbeat,
    health: Arc<SourceHealth>,
    /// Where delivery identities are forgotten once the broker confirmed their acks.
    outbox: Option<Outbox>,
}

/// Decodes a payload as configured. `Err` holds a printable reason.
pub fn decode(format: PayloadFormat, payload: &[u8]) -> Result<Value, String> {
    let text = || std::str::from_utf8(payload).map_err(|e| format!("not UTF-8 ({e})"));
    match format {
        PayloadFormat::Text => Ok(Value::Text(text()?.to_string())),
        PayloadFormat::Number => {
            let t = text()?;
            match t.trim().parse::<f64>() {
                Ok(n) if n.is_finite() => Ok(Value::Number(n)),
                // "nan" and "inf" parse as floats but count nothing: a counter based on
                // them would report garbage and could not be saved.
                Ok(_) => Err(format!(
                    "not a finite number: {:?}",
                    crate::text::excerpt(payload, crate::text::PAYLOAD_EXCERPT)
                )),
                Err(_) => Err(format!(
                    "not a number: {:?}",
                    crate::text::excerpt(payload, crate::text::PAYLOAD_EXCERPT)
                )),
            }
        }
        PayloadFormat::Json => serde_json::from_slice(payload)
            .map(Value::Json)
            .map_err(|e| format!("not JSON ({e})")),
        PayloadFormat::Auto => {
            let t = text()?;
            let trimmed = t.trim();
            match trimmed.parse::<f64>() {
                Ok(n) if n.is_finite() => return Ok(Value::Number(n)),
                Ok(_) => {
                    return Err(format!(
                        "not a finite number: {:?}",
                        crate::text::excerpt(payload, crate::text::PAYLOAD_EXCERPT)
                    ))
                }
                Err(_) => {}
            }
            match trimmed {
                "true" => return Ok(Value::Bool(true)),
                "false" => return Ok(Value::Bool(false)),
                _ => {}
            }
            if trimmed.starts_with('{') || trimmed.starts_with('[') {
                if let Ok(j) = serde_json::from_str(trimmed) {
                    return Ok(Value::Json(j));
                }
            }
            Ok(Value::Text(t.to_string()))
        }
    }
}

impl MqttSource {
    pub fn new(config: MqttConfig, heartbeat: Heartbeat, health: Arc<SourceHealth>) -> MqttSource {
        MqttSource {
            config,
            heartbeat,
            health,
            outbox: None,
        }
    }

    /// The outbox where the identities of acknowledged deliveries are forgotten.
    pub fn with_outbox(mut self, outbox: Outbox) -> MqttSource {
        self.outbox = Some(outbox);
        self
    }

    fn options(&self) -> Result<MqttOptions, SourceError> {
        let mut options = self
            .config
            .broker
            .options(&self.config.client_id)
            .map_err(|detail| SourceError::Setup {
                id: self.config.id.clone(),
                detail,
            })?;
        // A persistent session and manual acks: unacknowledged publishes come back.
        options.set_clean_session(false);
        options.set_manual_acks(true);
        Ok(options)
    }

    pub async fn run(
        self,
        out: mpsc::Sender<SourceEvent>,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let capacity = self.config.subscriptions.len() + OTHER_REQUESTS;
        let (client, mut eventloop) = AsyncClient::new(self.options()?, capacity);
        let id: Arc<str> = self.config.id.as_str().into();
        let barrier_topic = format!("mes-gateway/barrier/{}", self.config.client_id);
        let (acks_tx, mut acks_rx) = mpsc::channel::<AckTicket>(ACK_QUEUE);
        let mut acks = AckBook::new(id.clone());
        let mut events: VecDeque<SourceEvent> = VecDeque::new();
        let mut out = Some(out);
        let mut acks_tx = Some(acks_tx);
        let mut backoff = RECONNECT.start();
        let mut reconnect_at: Option<Instant> = None;
        let mut subscribed_once = false;
        let mut stop_by: Option<Instant> = None;
        let mut disconnecting = false;
        let mut acks_closed = false;
        let mut heartbeat_ticks = tokio::time::interval(self.heartbeat.period());
        tracing::info!(source = %id, broker = %self.config.broker.address(), client_id = %self.config.client_id,
            subscriptions = self.config.subscriptions.len(), "MQTT source starting.");
        loop {
            self.heartbeat.beat();
            if let Err(e) = acks.write(&mut eventloop).await {
                // The connection is broken: rumqttc reconnects on the next poll; what was
                // not acked comes again and is recognised.
                eventloop.clean();
                acks.disconnected();
                if stop_by.is_some() {
                    return Ok(());
                }
                if self.health.set_connected(&id, false, Some(&e)) {
                    tracing::warn!(source = %id, error = %e, "MQTT connection lost while writing acks; reconnecting with backoff.");
                }
                reconnect_at = Some(Instant::now() + backoff.fail());
            }
            if stop_by.is_some() && !disconnecting && acks_closed && acks.all_written() {
                // Every ack the pipeline will ever hand back is written.
                if acks.connected {
                    let _ = client.try_disconnect();
                    disconnecting = true;
                } else {
                    return Ok(());
                }
            }
            let barrier_due = acks.barrier_due(&client, &barrier_topic);
            let reading = stop_by.is_some() || events.len() < LOCAL_EVENTS;
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if stop_by.is_none() => {
                    // Stop taking publishes: those not yet with the pipeline are not acked
                    // and come back after the restart.
                    stop_by = Some(Instant::now() + STOP_DEADLINE);
                }
                _ = crate::backoff::sleep_until(stop_by), if stop_by.is_some() => {
                    tracing::warn!(source = %id, unwritten = acks.unwritten(), "MQTT source stopped before every ack was written; the broker will redeliver those messages (recognised as duplicates).");
                    return Ok(());
                }
                ticket = acks_rx.recv(), if !acks_closed => match ticket {
                    Some(t) => acks.ready(t),
                    // Only at shutdown: every ack is back.
                    None => acks_closed = true,
                },
                permit = reserve(out.as_ref()), if !events.is_empty() => match permit {
                    Some(p) => {
                        if let Some(e) = events.pop_front() {
                            p.send(e);
                        }
                    }
                    None => return Err(SourceError::Closed { id: id.to_string() }),
                },
                _ = crate::backoff::sleep_until(reconnect_at), if reconnect_at.is_some() => reconnect_at = None,
                _ = crate::backoff::sleep_until(barrier_due), if barrier_due.is_some() => {}
                _ = heartbeat_ticks.tick() => {}
                polled = eventloop.poll(), if reading && reconnect_at.is_none() => match polled {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                        backoff.reset();
                        self.health.set_connected(&id, true, None);
                        acks.connected(ack.session_present, self.outbox.as_ref()).await;
                        // Subscribe when the broker has no session for us, and always on the
                        // first connection of this process: a previous run may have died
                        // between CONNACK and SUBACK, leaving a session without subscriptions.
                        if stop_by.is_none() && (!ack.session_present || !subscribed_once) {
                            for s in &self.config.subscriptions {
                                if let Err(e) = client.try_subscribe(s.topic.clone(), s.qos) {
                                    tracing::error!(source = %id, topic = %s.topic, error = %e, "Cannot subscribe.");
                                }
                            }
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                        subscribed_once = true;
                        let refused = ack
                            .return_codes
                            .iter()
                            .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                            .count();
                        if refused > 0 {
                            tracing::error!(source = %id, refused, "The broker refused subscriptions (check its ACL).");
                        } else {
                            tracing::info!(source = %id, topics = ack.return_codes.len(), "Subscribed.");
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                        if stop_by.is_some() {
                            // Not taken: not acked, the broker sends it again after the restart.
                            continue;
                        }
                        tracing::trace!(source = %id, topic = %crate::text::for_log(&publish.topic), pkid = publish.pkid, dup = publish.dup,
                            payload = %crate::text::excerpt(&publish.payload, 32), "Publish received.");
                        if let Some(tx) = &acks_tx {
                            events.extend(self.accept(&id, publish, &mut acks, tx));
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::UnsubAck(ack))) => acks.barrier_answered(ack.pkid, self.outbox.as_ref()).await,
                    Ok(MqttEvent::Outgoing(Outgoing::Unsubscribe(pkid))) => acks.barrier_written(pkid),
                    Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => {
                        // Wait (briefly) for the broker to close the connection, so closing
                        // our end cannot reset it before the DISCONNECT and acks arrive.
                        tracing::info!(source = %id, "Disconnected from the MQTT broker.");
                        stop_by = stop_by.min(Some(Instant::now() + Duration::from_secs(1)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        acks.disconnected();
                        if stop_by.is_some() {
                            return Ok(());
                        }
                        let first = self.health.set_connected(&id, false, Some(&e.to_string()));
                        if first {
                            tracing::warn!(source = %id, error = %e, "MQTT connection lost; reconnecting with backoff.");
                        }
                        reconnect_at = Some(Instant::now() + backoff.fail());

                    }
                },
            }
            if stop_by.is_some() && out.is_some() {
                acks.forget_unforwarded(events.len());
                events.clear();
                // The pipeline ends when every sender is gone, after handing back its acks.
                out = None;
                acks_tx = None;
            }
        }
    }

    /// Turns a publish into an event for the pipeline, with its ack (handed back on
    /// `acks_to`) and delivery identity; or counts it as undecodable and releases its ack.
    fn accept(
        &self,
        id: &Arc<str>,
        publish: Publish,
        acks: &mut AckBook,
        acks_to: &mpsc::Sender<AckTicket>,
    ) -> Option<SourceEvent> {
        let acknowledged = publish.qos != QoS::AtMostOnce;
        match decode(self.config.payload, &publish.payload) {
            Ok(value) => {
                self.health.event();
                let (ticket, delivery) = if acknowledged {
                    let delivery = Receipt {
                        id: ReceiptId::of_publish(
                            id.clone(),
                            publish.pkid,
                            &publish.topic,
                            &publish.payload,
                        ),
                        redelivered: publish.dup,
                        receipt: 0,
                    };
                    let (ticket, delivery) = acks.received(&publish, Some(delivery));
                    (Some(ticket), delivery)
                } else {
                    (None, None)
                };
                let event = Event {
                    source: id.clone(),
                    point: publish.topic.as_str().into(),
                    value,
                    at: jiff::Timestamp::now(),
                };
                Some(SourceEvent {
                    event,
                    ack: ticket.map(|t| Ack::new(acks_to.clone(), t)),
                    delivery,
                    seen: None,
                    processed: None,
                })
            }
            Err(reason) => {
                self.health.decode_error();
                tracing::warn!(source = %id, topic = %crate::text::for_log(&publish.topic), reason = %crate::text::for_log(&reason.to_string()), payload = %crate::text::excerpt(&publish.payload, crate::text::PAYLOAD_EXCERPT),
                    "Undecodable MQTT payload; skipped (and acknowledged, so it does not come back forever).");
                if acknowledged {
                    let (ticket, _) = acks.received(&publish, None);
                    acks.ready(ticket);
                }
                None
            }
        }
    }
}

/// A publish received with QoS 1 or 2 whose ack is not yet written.
#[derive(Debug)]
struct Pending {
    /// The connection it came on.
    epoch: u64,
    pkid: u16,
    qos: QoS,
    delivery: Option<Receipt>,
    /// The pipeline handed its ack back (what it produced is durable).
    ready: bool,
}

/// Owns every ack from the publish's arrival until the broker confirmed it.
#[derive(Debug)]
struct AckBook {
    source: Arc<str>,
    /// Receipt numbers: unique within this source across restarts (random high bits).
    next_receipt: u64,
    /// Counts connections; an ack is written only on the connection of its publish.
    epoch: u64,
    connected: bool,
    /// In arrival order.
    pending: BTreeMap<u64, Pending>,
    /// Released in order, waiting for room in rumqttc's request channel.
    to_write: VecDeque<(u16, QoS, Option<Receipt>)>,
    /// Written on this connection, not yet covered by a barrier: the latest delivery of
    /// each packet id, so at most 65,535. A barrier's answer waits behind every publish the
    /// broker has queued for us (4 s of a 200k burst, measured), and a list of every ack
    /// grew with the burst (194,560 entries then); only the latest recording of a packet id
    /// can be forgotten anyway (an earlier one was replaced in the store when the id came
    /// again, see `outbox::ingress`).
    written: HashMap<u16, Receipt>,
    /// The barrier in flight: its packet id once written, and the acks it covers.
    barrier: Option<(Option<u16>, Vec<Receipt>)>,
    last_barrier: Option<Instant>,
    /// Acks the broker confirmed, and when: forgotten once older than `CONFIRMED_KEEP`.
    confirmed: VecDeque<(Instant, Vec<Receipt>)>,
}

impl AckBook {
    fn new(source: Arc<str>) -> AckBook {
        AckBook {
            source,
            next_receipt: fastrand::u64(..) << 24,
            epoch: 0,
            connected: false,
            pending: BTreeMap::new(),
            to_write: VecDeque::new(),
            written: HashMap::new(),
            barrier: None,
            last_barrier: None,
            confirmed: VecDeque::new(),
        }
    }

    fn received(
        &mut self,
        publish: &Publish,
        delivery: Option<Receipt>,
    ) -> (AckTicket, Option<Receipt>) {
        self.next_receipt = self.next_receipt.wrapping_add(1);
        let receipt = self.next_receipt;
        let delivery = delivery.map(|d| Receipt { receipt, ..d });
        self.pending.insert(
            receipt,
            Pending {
                epoch: self.epoch,
                pkid: publish.pkid,
                qos: publish.qos,
                delivery: delivery.clone(),
                ready: false,
            },
        );
        (AckTicket(receipt), delivery)
    }

    /// The pipeline handed back `ticket`: release every ack that is now first in line.
    fn ready(&mut self, ticket: AckTicket) {
        if let Some(p) = self.pending.get_mut(&ticket.0) {
            p.ready = true;
        }
        while let Some(entry) = self.pending.first_entry() {
            if !entry.get().ready {
                break;
            }
            let p = entry.remove();
            // From an earlier connection: the broker redelivers it; the redelivery is
            // recognised and acked on the connection it comes on.
            if p.epoch == self.epoch && self.connected {
                self.to_write.push_back((p.pkid, p.qos, p.delivery));
            }
        }
    }

    /// Writes every released ack onto the connection, in order, and flushes. Without a
    /// connection they wait (they are dropped with it when it is gone for good).
    async fn write(&mut self, eventloop: &mut rumqttc::EventLoop) -> Result<(), String> {
        if self.to_write.is_empty() {
            return Ok(());
        }
        let Some(network) = eventloop.network.as_mut() else {
            return Ok(());
        };
        let io = async {
            while let Some((pkid, qos, delivery)) = self.to_write.pop_front() {
                // What rumqttc itself writes for a manual ack (its state keeps nothing
                // for an ack; it would only queue an "outgoing" event we do not need).
                let packet = match qos {
                    QoS::ExactlyOnce => Packet::PubRec(rumqttc::PubRec::new(pkid)),
                    _ => Packet::PubAck(rumqttc::PubAck::new(pkid)),
                };
                network.write(packet).await.map_err(|e| e.to_string())?;
                self.wrote(pkid, delivery);
            }
            network.flush().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(ACK_WRITE_TIMEOUT, io).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "acks not written within {}s",
                ACK_WRITE_TIMEOUT.as_secs()
            )),
        }
    }

    /// The ack of packet id `pkid` is written; its delivery waits for a barrier.
    fn wrote(&mut self, pkid: u16, delivery: Option<Receipt>) {
        if let Some(d) = delivery {
            self.written.insert(pkid, d);
        }
    }

    /// When a barrier should go out (now, or at the returned instant); sends it when due.
    fn barrier_due(&mut self, client: &AsyncClient, topic: &str) -> Option<Instant> {
        if self.written.is_empty() || self.barrier.is_some() || !self.connected {
            return None;
        }
        let due = self
            .last_barrier
            .map_or_else(Instant::now, |t| t + BARRIER_INTERVAL);
        if due > Instant::now() {
            return Some(due);
        }
        if client.try_unsubscribe(topic).is_ok() {
            self.barrier = Some((None, Vec::new()));
            self.last_barrier = Some(Instant::now());
        }
        None
    }

    /// The barrier was written: it covers every ack written before it.
    fn barrier_written(&mut self, pkid: u16) {
        if let Some((written_as @ None, covers)) = &mut self.barrier {
            *written_as = Some(pkid);
            *covers = std::mem::take(&mut self.written).into_values().collect();
        }
    }

    /// The broker answered the barrier: it has every ack the barrier covers.
    async fn barrier_answered(&mut self, pkid: u16, outbox: Option<&Outbox>) {
        if !matches!(&self.barrier, Some((Some(p), _)) if *p == pkid) {
            return;
        }
        if let Some((_, covers)) = self.barrier.take() {
            let now = Instant::now();
            self.confirmed.push_back((now, covers));
            let mut old = Vec::new();
            while let Some((at, _)) = self.confirmed.front() {
                if now.duration_since(*at) < CONFIRMED_KEEP {
                    break;
                }
                if let Some((_, covers)) = self.confirmed.pop_front() {
                    old.extend(covers);
                }
            }
            if let (Some(outbox), false) = (outbox, old.is_empty()) {
                if let Err(e) = outbox.store().receipts().forget(old).await {
                    tracing::warn!(source = %self.source, error = %e, "Cannot forget acknowledged deliveries; they are kept a little longer.");
                }
            }
        }
    }

    async fn connected(&mut self, session_present: bool, outbox: Option<&Outbox>) {
        self.epoch += 1;
        self.connected = true;
        if !session_present {
            // The broker has no session: nothing of the old one will come back.
            self.confirmed.clear();
            if let Some(outbox) = outbox {
                if let Err(e) = outbox.store().receipts().forget_source(&self.source).await {
                    tracing::warn!(source = %self.source, error = %e, "Cannot forget the deliveries of a lost MQTT session.");
                }
            }
        }
    }

    /// The connection dropped: rumqttc discards the acks still in its channel (the broker
    /// redelivers those publishes), and nothing written on it can be confirmed any more.
    fn disconnected(&mut self) {
        self.connected = false;
        self.to_write.clear();
        self.written.clear();
        self.barrier = None;
    }

    /// The last `n` publishes received will never reach the pipeline (shutdown).
    fn forget_unforwarded(&mut self, n: usize) {
        for _ in 0..n {
            if let Some(entry) = self.pending.last_entry() {
                entry.remove();
            }
        }
    }

    fn unwritten(&self) -> usize {
        self.pending.len() + self.to_write.len()
    }

    fn all_written(&self) -> bool {
        self.unwritten() == 0
    }
}

async fn reserve(out: Option<&mpsc::Sender<SourceEvent>>) -> Option<mpsc::Permit<'_, SourceEvent>> {
    out?.reserve().await.ok()
}

#[cfg(test)]
mod tests {
    use crate::store::receipts::ReceiptId;

    #[test]
    fn acks_awaiting_a_barrier_keep_the_latest_delivery_of_each_packet_id() {
        let source: Arc<str> = "broker".into();
        let mut book = AckBook::new(source.clone());
        let delivery = |pkid: u16, receipt: u64| Receipt {
            id: ReceiptId {
                source: source.clone(),
                packet_id: pkid,
                digest: receipt,
            },
            redelivered: false,
            receipt,
        };
        // A burst whose barrier is answered only after it (the broker queues the answer
        // behind the publishes it holds for us): packet ids come round three times.
        let ids = u64::from(u16::MAX);
        for receipt in 0..3 * ids + 10 {
            let pkid = (receipt % ids) as u16 + 1;
            book.wrote(pkid, Some(delivery(pkid, receipt)));
        }
        book.wrote(9, None);
        assert_eq!(book.written.len(), u16::MAX as usize, "one per packet id");
        assert_eq!(book.written[&1].receipt, 3 * ids, "the latest recording");
        assert_eq!(book.written[&11].receipt, 2 * ids + 10);
        // The barrier covers them all and starts an empty list.
        book.connected = true;
        book.barrier = Some((None, Vec::new()));
        book.barrier_written(7);
        let Some((Some(7), covers)) = &book.barrier else {
            panic!("barrier not written: {:?}", book.barrier);
        };
        assert_eq!(covers.len(), u16::MAX as usize);
        assert!(book.written.is_empty());
    }
    use super::*;

    #[test]
    fn payloads_decode_as_configured() {
        assert_eq!(
            decode(PayloadFormat::Auto, b" 42.5 ").unwrap(),
            Value::Number(42.5)
        );
        assert_eq!(
            decode(PayloadFormat::Auto, b"true").unwrap(),
            Value::Bool(true)
        );
        assert_eq!(
            decode(PayloadFormat::Auto, br#"{"a":1}"#).unwrap(),
            Value::Json(serde_json::json!({"a":1}))
        );
        assert_eq!(
            decode(PayloadFormat::Auto, b"P000123").unwrap(),
            Value::Text("P000123".into())
        );
        assert_eq!(
            decode(PayloadFormat::Text, b"12").unwrap(),
            Value::Text("12".into())
        );
        assert!(decode(PayloadFormat::Number, b"twelve").is_err());
        for poison in [&b"nan"[..], b"NaN", b"inf", b"-infinity"] {
            for format in [PayloadFormat::Number, PayloadFormat::Auto] {
                assert_eq!(
                    decode(format, poison).unwrap_err(),
                    format!("not a finite number: {:?}", String::from_utf8_lossy(poison))
                );
            }
        }
        assert!(decode(PayloadFormat::Json, b"{oops").is_err());
        assert!(decode(PayloadFormat::Auto, &[0xff, 0xfe])
            .unwrap_err()
            .contains("not UTF-8"));
        assert_eq!(
            crate::text::excerpt(b"a\nb", crate::text::PAYLOAD_EXCERPT),
            "a\\nb"
        );
    }
}
