//! Entra ID (Azure AD) for every client of Microsoft's cloud in the gateway: access tokens
//! by the client-credentials flow of one app registration, cached until shortly before
//! they expire, for any resource (D365 for the dispatcher, Service Bus for the business
//! events source), and the error chains of reqwest's errors as log lines say them.
//!
//! However many requests need a token at once, only one fetch runs: the cache sits behind
//! an async mutex that is held during the fetch, so the others wait and then find the new
//! token. After a 401, [`TokenSource::invalidate`] drops the token only if it is still the
//! one that failed, so a burst of 401s from one stale token causes one refresh, not many.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::Secret;

/// Refresh this long before the token expires (tokens live 60–90 minutes).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Longest a token is cached, whatever lifetime the endpoint announces.
const MAX_CACHE: Duration = Duration::from_secs(24 * 3600);

/// An access token. `Debug` hides its value.
#[derive(Clone)]
pub struct Token {
    value: Arc<str>,
    generation: u64,
}

impl Token {
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.value)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(generation {})", self.generation)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("token endpoint {url} unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("token endpoint {url} refused the credentials: HTTP {status}: {error}")]
    Rejected {
        url: String,
        status: u16,
        error: String,
    },
    #[error("token endpoint {url} answered HTTP {status}: {detail}")]
    Unavailable {
        url: String,
        status: u16,
        detail: String,
    },
}

impl TokenError {
    /// True when retrying cannot help until someone fixes the configuration.
    pub fn is_rejection(&self) -> bool {
        matches!(self, TokenError::Rejected { .. })
    }
}

struct Cached {
    token: Token,
    refresh_at: Instant,
}

/// Which token endpoint protocol the tenant's URL speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenApi {
    /// Microsoft identity platform v2: `scope=<resource>/.default`.
    V2,
    /// Legacy v1 (ADAL-style): `resource=<resource>`.
    V1,
}

/// One app registration's client credentials at its token endpoint.
#[derive(Debug, Clone)]
pub struct AppCredentials {
    pub token_url: reqwest::Url,
    pub client_id: String,
    pub client_secret: Secret,
    pub api: TokenApi,
}

pub struct TokenSource {
    http: reqwest::Client,
    url: reqwest::Url,
    client_id: String,
    secret: Secret,
    api: TokenApi,
    resource: String,
    cache: Mutex<Option<Cached>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    /// v2 sends a number, v1 a string.
    expires_in: NumberOrString,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(u64),
    Text(String),
}

#[derive(Deserialize, Default)]
struct TokenErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenSource {
    /// Tokens of the app `app` for `resource` (a D365 environment's URL, or Azure Service
    /// Bus: `https://servicebus.azure.net`).
    pub fn new(http: reqwest::Client, app: &AppCredentials, resource: &str) -> TokenSource {
        TokenSource {
            http,
            url: app.token_url.clone(),
            client_id: app.client_id.clone(),
            secret: app.client_secret.clone(),
            api: app.api,
            resource: resource.trim_end_matches('/').to_string(),
            cache: Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }

    /// Number of tokens fetched so far.
    pub fn fetches(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The cached token while it is valid, without waiting or fetching: whether
    /// [`TokenSource::get`] would answer at once.
    pub fn cached(&self) -> Option<Token> {
        let cache = self.cache.try_lock().ok()?;
        cache
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.token.clone())
    }

    /// A valid token, from the cache or freshly fetched.
    pub async fn get(&self) -> Result<Token, TokenError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let (value, lifetime) = self.fetch().await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let margin = if lifetime > REFRESH_MARGIN * 2 {
            REFRESH_MARGIN
        } else {
            lifetime / 2
        };
        let token = Token {
            value: value.into(),
            generation,
        };
        *cache = Some(Cached {
            token: token.clone(),
            // checked: a token endpoint that announces a lifetime of centuries must not
            // overflow the clock; such a token is simply refreshed a day from now.
            refresh_at: Instant::now()
                .checked_add(lifetime - margin)
                .unwrap_or_else(|| Instant::now() + MAX_CACHE),
        });
        tracing::info!(token_endpoint = %self.url, lifetime_s = lifetime.as_secs(), "Fetched a D365 access token.");
        Ok(token)
    }

    /// Forgets `failed` if it is still the cached token (D365 answered 401 to it).
    pub async fn invalidate(&self, failed: &Token) {
        let mut cache = self.cache.lock().await;
        if cache
            .as_ref()
            .is_some_and(|c| c.token.generation == failed.generation)
        {
            *cache = None;
        }
    }

    async fn fetch(&self) -> Result<(String, Duration), TokenError> {
        let url = self.url.to_string();
        let mut form = vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", self.client_id.clone()),
            ("client_secret", self.secret.expose().to_string()),
        ];
        match self.api {
            TokenApi::V2 => form.push(("scope", format!("{}/.default", self.resource))),
            TokenApi::V1 => form.push(("resource", self.resource.clone())),
        }
        let response = self
            .http
            .post(self.url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| TokenError::Unreachable {
                url: url.clone(),
                detail: error_chain(&e),
            })?;
        let status = response.status().as_u16();
        if response.status().is_redirection() {
            // Redirects are never followed (a POST would turn into a GET without the
            // secret, or the secret would go to another host): the URL is wrong.
            return Err(TokenError::Rejected {
                url,
                status,
                error: redirect_detail(&response),
            });
        }
        let body = response.text().await.unwrap_or_default();
        if status == 200 {
            let parsed: TokenResponse =
                serde_json::from_str(&body).map_err(|e| TokenError::Unavailable {
                    url: url.clone(),
                    status,
                    detail: format!("unexpected token response: {e}"),
                })?;
            let secs = match parsed.expires_in {
                NumberOrString::Number(n) => n,
                NumberOrString::Text(t) => t.trim().parse().unwrap_or(0),
            };
            // A missing or nonsensical lifetime: assume the documented minimum of an hour.
            let lifetime = Duration::from_secs(if secs == 0 { 3600 } else { secs }).min(MAX_CACHE);
            return Ok((parsed.access_token, lifetime));
        }
        let parsed: TokenErrorBody = serde_json::from_str(&body).unwrap_or_default();
        // Entra's descriptions name the problem (AADSTS7000215: invalid client secret) and
        // never echo the secret; keep the first line, it carries the code.
        let description = parsed
            .error_description
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let error = match (parsed.error.is_empty(), description.is_empty()) {
            (true, _) => crate::text::excerpt(body.as_bytes(), crate::text::BODY_EXCERPT),
            (false, true) => parsed.error,
            (false, false) => format!("{}: {description}", parsed.error),
        };
        if matches!(status, 400 | 401 | 403) {
            Err(TokenError::Rejected { url, status, error })
        } else {
            Err(TokenError::Unavailable {
                url,
                status,
                detail: error,
            })
        }
    }
}

/// Why a 3xx answer is refused, with where it pointed.
pub fn redirect_detail(response: &reqwest::Response) -> String {
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(no Location header)");
    format!("redirected to {location}; redirects are not followed: check the configured URL")
}

/// The error and its causes on one line (reqwest hides the useful part in `source()`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
