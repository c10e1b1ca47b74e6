//! D365's business events pulled from an Azure Service Bus queue or topic subscription
//! over Service Bus's HTTPS REST API (the usual case: a plant PC behind NAT cannot be
//! reached from the cloud, but it can reach out).
//!
//! # Invariants
//!
//! - Peek-lock: a received event stays in Service Bus, locked, until the gateway
//!   *completes* it, and it completes it only once what the event produced is durable
//!   (the source answers after the pipeline's commit; same rule as the MQTT PUBACK).
//! - Anything else gives the event back: a transient failure *abandons* it (unlock), a
//!   crash or a stop lets its lock expire. Service Bus then delivers it again; the
//!   event's id was stored with what it produced, so a second delivery of a stored event
//!   produces nothing and is completed.
//! - An event the gateway cannot read is abandoned, so it comes again (a later version
//!   may read it); after `max_deliveries` it is given up: logged with its message id and
//!   left to Service Bus, which dead-letters it at the entity's MaxDeliveryCount (set it
//!   to the same number). The REST API has no dead-letter operation of its own.
//! - An unreachable namespace or refused credentials: the source is down (health,
//!   alerts), and receiving resumes with backoff, by itself.
//!
//! The REST calls: receive `POST <entity>/messages/head?timeout=<s>` (201 with the event,
//! its `BrokerProperties` and its `Location`; 204 when none came within the wait),
//! complete `DELETE <Location>`, abandon `PUT <Location>`. Authentication: a shared
//! access signature (`SharedAccessSignature sr=…&sig=…&se=…&skn=…`) or an Entra token for
//! `https://servicebus.azure.net/.default`.

use crate::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::config::{ServiceBusAuth, ServiceBusConfig};
use super::{Delivery, Outcome};
use crate::config::Secret;
use crate::entra::TokenSource;
use crate::source::SourceHealth;

const RETRY: Backoff = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(60));
/// A shared access signature is made for this long, and remade well before.
const SAS_LIFETIME: Duration = Duration::from_secs(3600);
/// Attempts to complete an event before leaving it to its lock's expiry.
const COMPLETE_ATTEMPTS: u32 = 3;
/// The Entra resource whose tokens Service Bus takes.
pub const SERVICE_BUS_RESOURCE: &str = "https://servicebus.azure.net";

/// What Service Bus says about a received message (the `BrokerProperties` header).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BrokerProperties {
    #[serde(default)]
    delivery_count: u32,
    #[serde(default)]
    lock_token: String,
    #[serde(default)]
    message_id: String,
}

/// A received, locked event.
struct Locked {
    body: Vec<u8>,
    properties: BrokerProperties,
    /// Where it is completed (DELETE) or abandoned (PUT).
    location: reqwest::Url,
}

enum Auth {
    Sas { key_name: String, key: Secret },
    Entra(Box<TokenSource>),
}

pub struct Receiver {
    config: ServiceBusConfig,
    source: Arc<str>,
    http: reqwest::Client,
    auth: Arc<Auth>,
    deliveries: mpsc::Sender<Delivery>,
    health: Arc<SourceHealth>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("entity", &self.config.entity)
            .finish_non_exhaustive()
    }
}

/// A shared access signature for `resource` valid until `expiry` (seconds since 1970):
/// HMAC-SHA256 of the URL-encoded resource and the expiry, with the policy's key.
pub fn sas_token(resource: &str, key_name: &str, key: &str, expiry: u64) -> String {
    let encoded: String = serde_urlencoded::to_string([("", resource)])
        .unwrap_or_default()
        .trim_start_matches('=')
        .to_string();
    let signed = format!("{encoded}\n{expiry}");
    let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let signature =
        base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&mac, signed.as_bytes()));
    let query = serde_urlencoded::to_string([
        ("sr", resource),
        ("sig", signature.as_str()),
        ("se", expiry.to_string().as_str()),
        ("skn", key_name),
    ])
    .unwrap_or_default();
    format!("SharedAccessSignature {query}")
}

impl Receiver {
    pub fn new(
        config: ServiceBusConfig,
        source: Arc<str>,
        deliveries: mpsc::Sender<Delivery>,
        health: Arc<SourceHealth>,
    ) -> Result<Receiver, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            // A receive waits up to `wait` on the server; the rest is the network's.
            .timeout(config.wait + Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let auth = match &config.auth {
            ServiceBusAuth::Sas { key_name, key } => Auth::Sas {
                key_name: key_name.clone(),
                key: key.clone(),
            },
            ServiceBusAuth::Entra(Some(d365)) => Auth::Entra(Box::new(TokenSource::new(
                http.clone(),
                &d365.app(),
                SERVICE_BUS_RESOURCE,
            ))),
            ServiceBusAuth::Entra(None) => {
                return Err("no credentials for Service Bus (the d365 section is missing)".into())
            }
        };
        Ok(Receiver {
            config,
            source,
            http,
            auth: Arc::new(auth),
            deliveries,
            health,
        })
    }

    fn entity_url(&self) -> String {
        format!(
            "{}/{}",
            self.config.namespace.as_str().trim_end_matches('/'),
            self.config.entity
        )
    }

    async fn authorization(&self) -> Result<String, String> {
        match &*self.auth {
            Auth::Sas { key_name, key } => {
                let expiry =
                    jiff::Timestamp::now().as_second().max(0) as u64 + SAS_LIFETIME.as_secs();
                Ok(sas_token(
                    &self.entity_url(),
                    key_name,
                    key.expose(),
                    expiry,
                ))
            }
            Auth::Entra(tokens) => tokens
                .get()
                .await
                .map(|t| t.bearer())
                .map_err(|e| format!("no Entra token for Service Bus: {e}")),
        }
    }

    /// Receives until cancelled, `receivers` at a time.
    pub async fn run(self, cancel: CancellationToken) {
        let this = Arc::new(self);
        tracing::info!(source = %this.source, entity = %this.entity_url(), receivers = this.config.receivers,
            "Receiving D365 business events from Service Bus (peek-lock).");
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..this.config.receivers {
            tasks.spawn(this.clone().receive_loop(cancel.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn receive_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut wait = RETRY.start();
        loop {
            let received = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.receive() => r,
            };
            match received {
                Ok(locked) => {
                    wait.reset();
                    if self.health.set_connected(&self.source, true, None) {
                        tracing::info!(source = %self.source, "Service Bus reachable; receiving events.");
                    }
                    if let Some(locked) = locked {
                        if !self.handle(locked, &cancel).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if self.health.set_connected(&self.source, false, Some(&e)) {
                        tracing::warn!(source = %self.source, error = %e, retry_in_s = wait.next_wait().as_secs(),
                            "Cannot receive D365 events from Service Bus; retrying with backoff. Events wait in Service Bus.");
                    }
                    if !crate::backoff::pause(&cancel, wait.fail()).await {
                        return;
                    }
                }
            }
        }
    }

    /// One long-polling receive with peek-lock; `None` when nothing came in `wait`.
    async fn receive(&self) -> Result<Option<Locked>, String> {
        let url = format!(
            "{}/messages/head?timeout={}",
            self.entity_url(),
            self.config.wait.as_secs()
        );
        let response = self
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, self.authorization().await?)
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .map_err(|e| format!("{url}: {}", crate::entra::error_chain(&e)))?;
        let status = response.status().as_u16();
        match status {
            201 | 200 => {}
            204 => return Ok(None),
            401 | 403 => {
                let body = response.text().await.unwrap_or_default();
                if let Auth::Entra(tokens) = &*self.auth {
                    // The next receive fetches a fresh one.
                    if let Ok(t) = tokens.get().await {
                        tokens.invalidate(&t).await;
                    }
                }
                return Err(format!(
                    "Service Bus refuses the credentials (HTTP {status}): {}",
                    crate::text::excerpt(body.as_bytes(), crate::text::BODY_EXCERPT)
                ));
            }
            404 => {
                return Err(format!(
                    "Service Bus has no entity {} (HTTP 404): check namespace, queue/topic and subscription",
                    self.config.entity
                ))
            }
            _ => {
                let body = response.text().await.unwrap_or_default();
                return Err(format!(
                    "Service Bus answered HTTP {status}: {}",
                    crate::text::excerpt(body.as_bytes(), crate::text::BODY_EXCERPT)
                ));
            }
        }
        let properties: BrokerProperties = response
            .headers()
            .get("BrokerProperties")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| reqwest::Url::parse(v).ok());
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("{url}: the event's body: {e}"))?
            .to_vec();
        let location = match location {
            Some(l) => l,
            None => reqwest::Url::parse(&format!(
                "{}/messages/{}/{}",
                self.entity_url(),
                properties.message_id,
                properties.lock_token
            ))
            .map_err(|e| format!("Service Bus gave no Location for the event: {e}"))?,
        };
        Ok(Some(Locked {
            body,
            properties,
            location,
        }))
    }

    /// Hands one event to the source and completes or abandons it by the answer.
    /// Returns `false` when the source is gone (stopping).
    async fn handle(&self, locked: Locked, cancel: &CancellationToken) -> bool {
        let message_id = locked.properties.message_id.clone();
        let deliveries = locked.properties.delivery_count;
        let (answer, answered) = oneshot::channel();
        let delivery = Delivery {
            body: locked.body,
            answer,
        };
        let handed = tokio::select! {
            sent = self.deliveries.send(delivery) => sent.is_ok(),
            _ = cancel.cancelled() => false,
        };
        // Stopping: the lock expires (or is given back) and Service Bus delivers it again.
        let outcome = if handed { answered.await.ok() } else { None };
        match outcome {
            Some(Outcome::Stored) => {
                self.complete(&locked.location, &message_id).await;
                true
            }
            Some(Outcome::Refused(reason)) => {
                if deliveries >= self.config.max_deliveries {
                    tracing::error!(source = %self.source, message_id = %crate::text::for_log(&message_id), deliveries, reason = %crate::text::for_log(&reason),
                        "Poison D365 event given up: it cannot be read after max_deliveries deliveries. Service Bus dead-letters it at the entity's MaxDeliveryCount; inspect it in the dead-letter queue.");
                } else {
                    tracing::warn!(source = %self.source, message_id = %crate::text::for_log(&message_id), deliveries, reason = %crate::text::for_log(&reason),
                        "D365 event cannot be read; given back to Service Bus (it comes again).");
                }
                self.abandon(&locked.location, &message_id).await;
                true
            }
            None => {
                self.abandon(&locked.location, &message_id).await;
                false
            }
        }
    }

    async fn complete(&self, location: &reqwest::Url, message_id: &str) {
        for attempt in 1..=COMPLETE_ATTEMPTS {
            let result = self.settle(reqwest::Method::DELETE, location).await;
            match result {
                Ok(200..=299) => return,
                // The lock is gone (expired while the disk was slow): Service Bus
                // delivers it again, and the stored event id makes that produce nothing.
                Ok(404 | 410) => {
                    tracing::info!(source = %self.source, message_id = %crate::text::for_log(message_id),
                        "Service Bus lock lost before completion; the event comes again and is recognised.");
                    return;
                }
                Ok(status) => {
                    tracing::warn!(source = %self.source, message_id = %crate::text::for_log(message_id), status, attempt, "Service Bus refused to complete an event.")
                }
                Err(e) => {
                    tracing::warn!(source = %self.source, message_id = %crate::text::for_log(message_id), error = %e, attempt, "Cannot complete an event in Service Bus.")
                }
            }
            tokio::time::sleep(RETRY.initial() * attempt).await;
        }
        tracing::warn!(source = %self.source, message_id = %crate::text::for_log(message_id),
            "Event stored but not completed in Service Bus; it comes again when its lock expires and is recognised.");
    }

    async fn abandon(&self, location: &reqwest::Url, message_id: &str) {
        match self.settle(reqwest::Method::PUT, location).await {
            Ok(200..=299 | 404 | 410) => {}
            Ok(status) => {
                tracing::debug!(source = %self.source, message_id = %crate::text::for_log(message_id), status, "Service Bus refused to unlock an event; its lock expires.")
            }
            Err(e) => {
                tracing::debug!(source = %self.source, message_id = %crate::text::for_log(message_id), error = %e, "Cannot unlock an event; its lock expires.")
            }
        }
    }

    async fn settle(
        &self,
        method: reqwest::Method,
        location: &reqwest::Url,
    ) -> Result<u16, String> {
        let response = self
            .http
            .request(method, location.clone())
            .header(reqwest::header::AUTHORIZATION, self.authorization().await?)
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .map_err(|e| crate::entra::error_chain(&e))?;
        Ok(response.status().as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_token_matches_the_documented_algorithm() {
        // Computed independently (Python: quote_plus, hmac sha256, b64encode).
        let token = sas_token(
            "https://contoso.servicebus.windows.net/mes-events",
            "listen",
            "c2VjcmV0LWtleQ==",
            1_800_000_000,
        );
        assert_eq!(
            token,
            "SharedAccessSignature sr=https%3A%2F%2Fcontoso.servicebus.windows.net%2Fmes-events&sig=3MYTeu5CKFzQhi9753%2F1fN%2B8cI4zwDb2gRjl0LejvCM%3D&se=1800000000&skn=listen"
        );
    }
}
