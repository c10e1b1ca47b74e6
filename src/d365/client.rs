//! One `SendMessage` POST: building the envelope, attaching the token, and turning what
//! happened into an [`Outcome`] that keeps "D365 said no" apart from "we could not talk
//! to D365" and from "we do not know whether D365 got it".

use std::sync::Arc;

use super::config::D365Config;
use crate::d365::retry::{self, Outcome};
use crate::entra::{error_chain, redirect_detail, Token, TokenSource};
use crate::message::Envelope;
use crate::outbox::Record;

/// Sent with every POST so proxies, API gateways and test fakes can correlate a request
/// with the outbox message. D365 ignores unknown headers.
pub const MESSAGE_ID_HEADER: &str = "x-mes-gateway-message-id";

/// Sent with a joined request (outbox join.rs): the other messages whose lines it carries,
/// comma-separated, in order.
pub const JOINED_IDS_HEADER: &str = "x-mes-gateway-joined-ids";

#[derive(Debug)]
pub struct D365Client {
    http: reqwest::Client,
    config: Arc<D365Config>,
    url: reqwest::Url,
    pub tokens: TokenSource,
}

impl D365Client {
    pub fn new(config: Arc<D365Config>) -> Result<D365Client, reqwest::Error> {
        let http = reqwest::Client::builder()
            // Never follow a redirect: a 301/302/303 turns the POST into a GET without a
            // body, and the final 200 (a login page, a moved environment) would be taken
            // for a delivery. A 3xx is reported as a failure with its Location.
            .redirect(reqwest::redirect::Policy::none())
            // Keep connections open between requests: a burst reuses them.
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .user_agent(concat!("mes-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(D365Client {
            tokens: TokenSource::new(http.clone(), &config.app(), &config.resource()),
            url: config.send_message_url(),
            http,
            config,
        })
    }

    /// Where the client secret came from (`file /run/…` or `environment variable X`),
    /// for log lines that tell an operator what to fix.
    pub fn secret_origin(&self) -> &str {
        &self.config.secret_origin
    }

    pub fn envelope(&self, record: &Record) -> Envelope {
        Envelope {
            company_id: self.config.company.clone(),
            message_queue: self.config.message_queue.clone(),
            message_type: record.message_type.clone(),
            message_content: record.request_content().to_string(),
        }
    }

    /// Posts the message once with `token`.
    pub async fn send(&self, record: &Record, token: &Token) -> Outcome {
        let mut request = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::AUTHORIZATION, token.bearer())
            .header(MESSAGE_ID_HEADER, record.id.to_string());
        if !record.members().is_empty() {
            let ids: Vec<String> = record.members().iter().map(ToString::to_string).collect();
            request = request.header(JOINED_IDS_HEADER, ids.join(","));
        }
        let result = request.json(&self.envelope(record)).send().await;
        let outcome = match result {
            Ok(response) if response.status().is_redirection() => Outcome::Http {
                status: response.status().as_u16(),
                retry_after: None,
                body: redirect_detail(&response),
            },
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(retry::parse_retry_after);
                // The status decides; a body that fails to arrive does not change it.
                let body = response.text().await.unwrap_or_default();
                Outcome::Http {
                    status,
                    retry_after,
                    body: crate::text::excerpt(body.as_bytes(), crate::text::BODY_EXCERPT),
                }
            }
            // A connect error (refused, DNS, TLS handshake, connect timeout) means no byte
            // of the request reached D365.
            Err(e) if e.is_connect() => Outcome::NotSent {
                detail: error_chain(&e),
            },
            // Anything else happened after the request may have been written.
            Err(e) => Outcome::Ambiguous {
                detail: error_chain(&e),
            },
        };
        outcome
    }
}
