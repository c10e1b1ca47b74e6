//! Where the gateway's alerts go in tests: a webhook fake over real HTTP on 127.0.0.1:0,
//! and an MQTT subscriber on the test's mosquitto.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::watch;

/// Notices received, in order, and a feed that says when one arrives.
#[derive(Clone)]
pub struct Received {
    notices: Arc<Mutex<Vec<Value>>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Received {
    fn new() -> Received {
        Received {
            notices: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    fn push(&self, v: Value) {
        self.notices.lock().unwrap().push(v);
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn all(&self) -> Vec<Value> {
        self.notices.lock().unwrap().clone()
    }

    /// Waits (60 s at most) until a message arrives on `topic`; returns it.
    pub async fn wait_for_topic(&self, topic: &str) -> Value {
        let mut rx = self.changes.subscribe();
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Some(n) = self.all().into_iter().find(|n| n["topic"] == topic) {
                    return n;
                }
                let _ = rx.changed().await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("nothing on {topic}; got {:#?}", self.all()))
    }

    /// Waits (60 s at most) until a notice matches `alert` (a key prefix) in `state`;
    /// returns it.
    pub async fn wait_for(&self, alert_prefix: &str, state: &str) -> Value {
        let mut rx = self.changes.subscribe();
        let find = || {
            self.all().into_iter().find(|n| {
                n["alert"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(alert_prefix))
                    && n["state"] == state
            })
        };
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Some(n) = find() {
                    return n;
                }
                let _ = rx.changed().await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no {state} notice for {alert_prefix}; got {:#?}",
                self.all()
            )
        })
    }
}

/// An HTTP endpoint that takes alert notices (JSON POSTs); answers 500 to the first
/// `fail_first` to exercise the gateway's retries.
pub struct Webhook {
    pub url: String,
    pub received: Received,
}

impl Webhook {
    pub async fn start(fail_first: usize) -> Webhook {
        let received = Received::new();
        let failures = Arc::new(Mutex::new(fail_first));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let sink = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
                let (sink, failures) = (sink.clone(), failures.clone());
                async move {
                    let mut left = failures.lock().unwrap();
                    if *left > 0 {
                        *left -= 1;
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    sink.push(v);
                    axum::http::StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Webhook { url, received }
    }
}

/// Subscribes to `topic` (QoS 1) on the broker at `port`; each publish's JSON payload
/// is recorded, with `"retained"` set from the retain flag.
pub async fn subscribe(port: u16, topic: &str) -> Received {
    subscribe_with(watcher_options(port), topic).await
}

/// The same over TLS, trusting the CA in `ca_file`.
pub async fn subscribe_tls(port: u16, topic: &str, ca_file: &std::path::Path) -> Received {
    let mut options = watcher_options(port);
    options.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
        ca: std::fs::read(ca_file).unwrap(),
        alpn: None,
        client_auth: None,
    }));
    subscribe_with(options, topic).await
}

fn watcher_options(port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(format!("alert-watcher-{port}"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

async fn subscribe_with(options: MqttOptions, topic: &str) -> Received {
    let received = Received::new();
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    let sink = received.clone();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client;
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let mut v: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    v["retained"] = p.retain.into();
                    v["topic"] = p.topic.clone().into();
                    sink.push(v);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("the broker did not confirm the alert subscription")
        .unwrap();
    received
}
