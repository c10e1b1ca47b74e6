//! Where alert notices go besides the log: an MQTT topic and an HTTP webhook. Each
//! notifier has its own bounded queue and task, so a slow webhook never delays the MQTT
//! publish nor the evaluation.

use crate::backoff::Backoff;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::config::{AlertConfig, AlertMqtt, AlertWebhook};
use super::{Board, Notice};

/// Notices waiting per notifier; beyond it the oldest is dropped.
const QUEUE_CAPACITY: usize = 256;
const RETRY: Backoff = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(300));

/// A bounded FIFO of notices that drops its oldest when full.
#[derive(Debug, Default)]
pub struct Queue {
    items: Mutex<VecDeque<Notice>>,
    ready: tokio::sync::Notify,
}

impl Queue {
    /// Adds a notice; returns true when the oldest one had to go to make room.
    pub fn push(&self, notice: Notice) -> bool {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = items.len() >= QUEUE_CAPACITY && items.pop_front().is_some();
        items.push_back(notice);
        drop(items);
        self.ready.notify_one();
        dropped
    }

    async fn next(&self) -> Notice {
        loop {
            if let Some(n) = self
                .items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                return n;
            }
            self.ready.notified().await;
        }
    }

    /// Puts a notice that could not be sent back at the front.
    fn put_back(&self, notice: Notice) {
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_front(notice);
    }
}

/// Starts the configured notifiers; returns their queues.
pub fn start(
    config: &AlertConfig,
    _board: &Arc<Board>,
    cancel: CancellationToken,
) -> Vec<Arc<Queue>> {
    let mut queues = Vec::new();
    if let Some(mqtt) = &config.mqtt {
        let queue = Arc::new(Queue::default());
        tokio::spawn(mqtt_notifier(mqtt.clone(), queue.clone(), cancel.clone()));
        queues.push(queue);
    }
    if let Some(webhook) = &config.webhook {
        let queue = Arc::new(Queue::default());
        tokio::spawn(webhook_notifier(
            webhook.clone(),
            queue.clone(),
            cancel.clone(),
        ));
        queues.push(queue);
    }
    queues
}

async fn mqtt_notifier(config: AlertMqtt, queue: Arc<Queue>, cancel: CancellationToken) {
    let options = match config.broker.options(&config.client_id) {
        Ok(options) => options,
        Err(e) => {
            // Checked at load (the files existed); gone or unreadable since.
            tracing::error!(error = %e, "Alert publisher cannot set up TLS; alerts are not published over MQTT until the configuration is reloaded.");
            return;
        }
    };
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    // The event loop is what talks to the broker (and reconnects): it runs on its own so
    // a publish waiting for room in its queue never stops it.
    let loop_cancel = cancel.clone();
    let broker = config.broker.address();
    tokio::spawn(async move {
        let mut down_logged = false;
        loop {
            tokio::select! {
                _ = loop_cancel.cancelled() => return,
                event = eventloop.poll() => match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        down_logged = false;
                        tracing::info!(%broker, "Alert publisher connected to the MQTT broker.");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !std::mem::replace(&mut down_logged, true) {
                            tracing::warn!(%broker, error = %e, "Alert publisher cannot reach the MQTT broker; alerts wait.");
                        }
                        if !crate::backoff::pause(&loop_cancel, RETRY.initial()).await {
                            return;
                        }
                    }
                },
            }
        }
    });
    loop {
        let notice = tokio::select! {
            _ = cancel.cancelled() => return,
            n = queue.next() => n,
        };
        let topic = format!("{}/{}", config.topic, notice.alert);
        let payload = match serde_json::to_vec(&notice) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot encode an alert notice.");
                continue;
            }
        };
        let publish = client.publish(topic, rumqttc::QoS::AtLeastOnce, true, payload);
        tokio::select! {
            _ = cancel.cancelled() => return,
            sent = publish => if let Err(e) = sent {
                tracing::warn!(error = %e, "Cannot hand an alert to the MQTT client.");
            },
        }
    }
}

async fn webhook_notifier(config: AlertWebhook, queue: Arc<Queue>, cancel: CancellationToken) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Cannot build the alert webhook's HTTP client; alerts go to the log only.");
            return;
        }
    };
    let mut wait = RETRY.start();
    loop {
        let notice = tokio::select! {
            _ = cancel.cancelled() => return,
            n = queue.next() => n,
        };
        let mut request = client.post(config.url.clone()).json(&notice);
        if let Some(t) = &config.token {
            request = request.bearer_auth(t.expose());
        }
        let failure = match request.send().await {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("HTTP {}", r.status())),
            // reqwest names the URL in its errors; for Teams or Slack the URL is the
            // credential, so it never reaches the log.
            Err(e) => Some(crate::entra::error_chain(&e.without_url())),
        };
        match failure {
            None => wait.reset(),
            Some(why) => {
                tracing::warn!(url = %crate::text::url_origin(config.url.as_str()), error = %why, retry_in_s = wait.next_wait().as_secs(), alert = %notice.alert,
                    "Alert webhook did not take the notice; retrying.");
                queue.put_back(notice);
                if !crate::backoff::pause(&cancel, wait.fail()).await {
                    return;
                }
            }
        }
    }
}
