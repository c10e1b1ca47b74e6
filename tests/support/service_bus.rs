//! A fake Azure Service Bus namespace over real HTTP on 127.0.0.1:0, speaking the REST
//! API the gateway uses: receive with peek-lock (`POST <entity>/messages/head`), complete
//! (`DELETE <entity>/messages/<id>/<lock>`), abandon (`PUT …`). Locks expire after
//! `lock_duration`; a message delivered `max_delivery_count` times and given back goes to
//! the dead-letter list. Requests must carry a shared access signature made with `KEY`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use tokio::sync::watch;

pub const KEY_NAME: &str = "gateway-listen";
pub const KEY: &str = "c2VydmljZS1idXMta2V5LWZvci10ZXN0cw==";

#[derive(Debug, Clone)]
struct Message {
    id: String,
    body: Vec<u8>,
    deliveries: u32,
    lock: Option<(String, Instant)>,
}

#[derive(Default)]
struct Bus {
    queue: VecDeque<Message>,
    dead_letter: Vec<Message>,
    /// Completed messages and how often each had been delivered.
    completed: Vec<(String, u32)>,
    /// DELETEs seen (before they are answered).
    complete_requests: Vec<String>,
    /// The next this many completes find their lock expired (410, released).
    lose_locks: usize,
    /// Never answer completes (the gateway is killed meanwhile).
    hang_completes: bool,
    refused: u64,
    locks_issued: u64,
}

#[derive(Clone)]
pub struct FakeServiceBus {
    pub addr: std::net::SocketAddr,
    pub entity: String,
    bus: Arc<Mutex<Bus>>,
    changes: Arc<watch::Sender<u64>>,
    lock_duration: Duration,
    max_delivery_count: u32,
}

/// What the fake verifies: `SharedAccessSignature sr=…&sig=…&se=…&skn=…` signed with KEY,
/// or (Entra) a bearer token the fake D365's token endpoint issued.
fn signed(headers: &HeaderMap) -> bool {
    if headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer token-"))
    {
        return true;
    }
    let Some(value) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("SharedAccessSignature "))
    else {
        return false;
    };
    let fields: std::collections::HashMap<String, String> =
        serde_urlencoded::from_str(value).unwrap_or_default();
    let (Some(sr), Some(sig), Some(se), Some(skn)) = (
        fields.get("sr"),
        fields.get("sig"),
        fields.get("se"),
        fields.get("skn"),
    ) else {
        return false;
    };
    let encoded = serde_urlencoded::to_string([("", sr.as_str())]).unwrap();
    let encoded = encoded.trim_start_matches('=');
    let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY.as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(
        &mac,
        format!("{encoded}\n{se}").as_bytes(),
    ));
    skn == KEY_NAME
        && *sig == expected
        && se.parse::<u64>().is_ok_and(|se| {
            se > std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        })
}

impl FakeServiceBus {
    pub async fn start(lock_duration: Duration, max_delivery_count: u32) -> FakeServiceBus {
        FakeServiceBus::start_entity(lock_duration, max_delivery_count, "mes-events").await
    }

    /// A fake serving `entity`: a queue name, or `<topic>/subscriptions/<subscription>`.
    pub async fn start_entity(
        lock_duration: Duration,
        max_delivery_count: u32,
        entity: &str,
    ) -> FakeServiceBus {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeServiceBus {
            addr: listener.local_addr().unwrap(),
            entity: entity.into(),
            bus: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
            lock_duration,
            max_delivery_count,
        };
        let app = axum::Router::new()
            .route(
                &format!("/{entity}/messages/head"),
                axum::routing::post(receive),
            )
            .route(
                &format!("/{entity}/messages/{{id}}/{{lock}}"),
                axum::routing::delete(complete).put(abandon),
            )
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    pub fn namespace(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The gateway's source section for this fake (SAS key in `dir/servicebus-key`).
    pub fn source_yaml(&self, dir: &std::path::Path, id: &str, max_deliveries: u32) -> String {
        std::fs::write(dir.join("servicebus-key"), KEY).unwrap();
        format!(
            "  - type: d365_events\n    id: {id}\n    service_bus:\n      namespace: {}\n{}      sas_key_name: {KEY_NAME}\n      sas_key_file: servicebus-key\n      wait: 2s\n      max_deliveries: {max_deliveries}\n",
            self.namespace(),
            self.entity_yaml()
        )
    }

    /// `queue: …`, or `topic: …` and `subscription: …`.
    fn entity_yaml(&self) -> String {
        match self.entity.split_once("/subscriptions/") {
            Some((topic, subscription)) => {
                format!("      topic: {topic}\n      subscription: {subscription}\n")
            }
            None => format!("      queue: {}\n", self.entity),
        }
    }

    /// The source section with an Entra token (the d365 section's app registration).
    pub fn entra_source_yaml(&self, id: &str) -> String {
        format!(
            "  - type: d365_events\n    id: {id}\n    service_bus:\n      namespace: {}\n{}      wait: 2s\n",
            self.namespace(),
            self.entity_yaml()
        )
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Sends a message to the queue.
    pub fn send(&self, id: &str, body: &[u8]) {
        self.bus.lock().unwrap().queue.push_back(Message {
            id: id.into(),
            body: body.to_vec(),
            deliveries: 0,
            lock: None,
        });
        self.changed();
    }

    /// The next `n` completions come too late: the lock has expired (410 Gone) and the
    /// message is free to be delivered again.
    pub fn lose_locks(&self, n: usize) {
        self.bus.lock().unwrap().lose_locks = n;
    }

    pub fn hang_completes(&self, on: bool) {
        self.bus.lock().unwrap().hang_completes = on;
    }

    pub fn completed(&self) -> Vec<(String, u32)> {
        self.bus.lock().unwrap().completed.clone()
    }

    pub fn dead_letter(&self) -> Vec<(String, u32)> {
        self.bus
            .lock()
            .unwrap()
            .dead_letter
            .iter()
            .map(|m| (m.id.clone(), m.deliveries))
            .collect()
    }

    /// Messages still in the queue (locked or not) and how often each was delivered.
    pub fn in_queue(&self) -> Vec<(String, u32)> {
        self.bus
            .lock()
            .unwrap()
            .queue
            .iter()
            .map(|m| (m.id.clone(), m.deliveries))
            .collect()
    }

    pub fn refused(&self) -> u64 {
        self.bus.lock().unwrap().refused
    }

    pub fn complete_requests(&self) -> Vec<String> {
        self.bus.lock().unwrap().complete_requests.clone()
    }

    /// Waits (60 s at most) until `cond` holds for the fake.
    pub async fn wait_until(&self, what: &str, cond: impl Fn(&FakeServiceBus) -> bool) {
        let mut rx = self.changes.subscribe();
        let done = tokio::time::timeout(Duration::from_secs(60), async {
            while !cond(self) {
                let _ = rx.changed().await;
            }
        })
        .await;
        assert!(
            done.is_ok(),
            "service bus: {what}: queue {:?}, completed {:?}, dead-letter {:?}",
            self.in_queue(),
            self.completed(),
            self.dead_letter()
        );
    }

    /// Expired locks are released; a message given back too often is dead-lettered.
    fn expire(&self, bus: &mut Bus) {
        let now = Instant::now();
        for m in bus.queue.iter_mut() {
            if m.lock.as_ref().is_some_and(|(_, until)| *until <= now) {
                m.lock = None;
            }
        }
        self.dead_letter_exhausted(bus);
    }

    fn dead_letter_exhausted(&self, bus: &mut Bus) {
        let max = self.max_delivery_count;
        let (dead, live): (Vec<_>, Vec<_>) = bus
            .queue
            .drain(..)
            .partition(|m| m.lock.is_none() && m.deliveries >= max);
        bus.queue = live.into();
        bus.dead_letter.extend(dead);
    }
}

/// Where the message `id` is that `lock` still holds.
fn holding(bus: &Bus, id: &str, lock: &str) -> Option<usize> {
    bus.queue
        .iter()
        .position(|m| m.id == id && m.lock.as_ref().is_some_and(|(t, _)| t == lock))
}

#[derive(serde::Deserialize)]
struct ReceiveQuery {
    timeout: Option<u64>,
}

async fn receive(
    State(fake): State<FakeServiceBus>,
    Query(q): Query<ReceiveQuery>,
    headers: HeaderMap,
) -> Response {
    if !signed(&headers) {
        fake.bus.lock().unwrap().refused += 1;
        fake.changed();
        return (
            StatusCode::UNAUTHORIZED,
            "40103: Invalid authorization token signature",
        )
            .into_response();
    }
    let deadline = Instant::now() + Duration::from_secs(q.timeout.unwrap_or(60));
    let mut rx = fake.changes.subscribe();
    loop {
        {
            let mut bus = fake.bus.lock().unwrap();
            fake.expire(&mut bus);
            bus.locks_issued += 1;
            let token = format!("lock-{}", bus.locks_issued);
            let lock_duration = fake.lock_duration;
            if let Some(m) = bus.queue.iter_mut().find(|m| m.lock.is_none()) {
                m.deliveries += 1;
                m.lock = Some((token.clone(), Instant::now() + lock_duration));
                let props = serde_json::json!({
                    "DeliveryCount": m.deliveries,
                    "LockToken": token,
                    "MessageId": m.id,
                    "SequenceNumber": 1,
                    "LockedUntilUtc": "Wed, 02 Dec 2026 05:00:00 GMT"
                });
                let location = format!(
                    "http://{}/{}/messages/{}/{}",
                    fake.addr, fake.entity, m.id, token
                );
                let body = m.body.clone();
                drop(bus);
                fake.changed();
                return (
                    StatusCode::CREATED,
                    [
                        ("BrokerProperties", props.to_string()),
                        ("Location", location),
                    ],
                    body,
                )
                    .into_response();
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return StatusCode::NO_CONTENT.into_response();
        }
        // Wakes on a new or released message; a lock's expiry is found at the next
        // wake-up, at the latest at the end of a short slice.
        let slice = (deadline - now).min(Duration::from_millis(100));
        let _ = tokio::time::timeout(slice, rx.changed()).await;
    }
}

async fn complete(
    State(fake): State<FakeServiceBus>,
    Path((id, lock)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !signed(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let hang = {
        let mut bus = fake.bus.lock().unwrap();
        bus.complete_requests.push(id.clone());
        bus.hang_completes
    };
    fake.changed();
    if hang {
        std::future::pending::<()>().await;
    }
    let mut bus = fake.bus.lock().unwrap();
    if bus.lose_locks > 0 {
        bus.lose_locks -= 1;
        if let Some(m) = bus.queue.iter_mut().find(|m| m.id == id) {
            m.lock = None;
        }
        drop(bus);
        fake.changed();
        return (StatusCode::GONE, "lock lost").into_response();
    }
    fake.expire(&mut bus);
    let Some(at) = holding(&bus, &id, &lock) else {
        return (StatusCode::GONE, "lock lost").into_response();
    };
    let m = bus.queue.remove(at).expect("found above");
    bus.completed.push((id, m.deliveries));
    drop(bus);
    fake.changed();
    StatusCode::OK.into_response()
}

async fn abandon(
    State(fake): State<FakeServiceBus>,
    Path((id, lock)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !signed(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut bus = fake.bus.lock().unwrap();
    if let Some(at) = holding(&bus, &id, &lock) {
        bus.queue[at].lock = None;
    }
    fake.dead_letter_exhausted(&mut bus);
    drop(bus);
    fake.changed();
    StatusCode::OK.into_response()
}
