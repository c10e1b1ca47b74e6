//! What to do after one POST: the outcome table (README, "How it works") as data plus one pure
//! function, and the backoff between attempts.
//!
//! | outcome                                         | decision                               |
//! |-------------------------------------------------|----------------------------------------|
//! | 2xx                                             | delivered                              |
//! | nothing sent (connect, DNS, TLS error)          | D365 unavailable: one probe at a time  |
//! | 429                                             | pause all lanes for Retry-After (or fallback) |
//! | 408, 502, 503, 504                              | D365 unavailable: one probe at a time  |
//! | 401, first time                                 | new token, retry at once               |
//! | 401 again                                       | pause all lanes, alert (credentials)   |
//! | 500                                             | retry up to `max_attempts`, then failed |
//! | other 4xx (and other statuses)                  | failed at once                          |
//! | timeout / reset after the request was written   | per type: uncertain (hold) or resend   |
//! | token endpoint unreachable                      | retry with backoff (nothing sent)      |
//!
//! "D365 unavailable" is D365's state, not the message's: while it lasts the dispatcher
//! sends one request at a time (a probe, with backoff between probes) instead of every
//! lane sitting out a backoff of its own, and the first answer releases every lane at
//! once (`heads.rs`).
//! | token endpoint refuses the credentials          | pause all lanes, alert                 |

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backoff::Backoff;

/// What to do when a request may or may not have reached D365 (timeout or reset after
/// the request was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AmbiguousPolicy {
    /// Mark the message `uncertain`, hold its order, alert: an operator decides.
    Hold,
    /// Send it again (accepting a possible duplicate in D365).
    Resend,
}

/// How the dispatcher answers outcomes: the `dispatcher` settings, read once and shared
/// by the loop and every send task. The only copy of these values.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The wait before trying a message again (retries, unreachable token endpoint).
    pub backoff: Backoff,
    /// HTTP 500 answers a message may get before it is `failed`.
    pub max_attempts: u32,
    /// Pause after a 429 without a usable `Retry-After`.
    pub throttle_fallback: Duration,
    /// Pause after a second 401 in a row (credentials or app registration wrong).
    pub auth_pause: Duration,
    pub ambiguous_default: AmbiguousPolicy,
    pub ambiguous_per_type: BTreeMap<String, AmbiguousPolicy>,
}

impl RetryPolicy {
    /// What to do with a message of this type whose request may have reached D365.
    pub fn ambiguous_for(&self, message_type: &str) -> AmbiguousPolicy {
        self.ambiguous_per_type
            .get(message_type)
            .copied()
            .unwrap_or(self.ambiguous_default)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            backoff: Backoff::doubling(Duration::from_secs(1), Duration::from_secs(300)),
            max_attempts: 3,
            throttle_fallback: Duration::from_secs(30),
            auth_pause: Duration::from_secs(300),
            ambiguous_default: AmbiguousPolicy::Hold,
            ambiguous_per_type: BTreeMap::new(),
        }
    }
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// D365 answered.
    Http {
        status: u16,
        retry_after: Option<Duration>,
        /// A printable excerpt of the body, for the message's history.
        body: String,
    },
    /// Nothing reached D365: connection refused, DNS or TLS handshake failure.
    NotSent { detail: String },
    /// The request was written but no complete answer came back: D365 may have queued it.
    Ambiguous { detail: String },
    /// No access token could be had, so nothing was sent.
    Token { rejected: bool, detail: String },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Http { status, body, .. } if body.is_empty() => write!(f, "HTTP {status}"),
            Outcome::Http { status, body, .. } => write!(f, "HTTP {status}: {body}"),
            Outcome::NotSent { detail } => write!(f, "not sent: {detail}"),
            Outcome::Ambiguous { detail } => {
                write!(f, "no answer after the request was written: {detail}")
            }
            Outcome::Token { detail, .. } => write!(f, "no access token: {detail}"),
        }
    }
}

/// What the message went through before this outcome: the facts a decision depends on
/// besides the policy.
#[derive(Debug, Clone, Copy)]
pub struct SendHistory<'a> {
    pub message_type: &'a str,
    /// HTTP 500 answers this message got before this one.
    pub server_errors_before: u32,
    /// This attempt already used a freshly fetched token after a 401.
    pub token_refreshed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Delivered,
    /// Keep the message queued and try it again after a backoff delay.
    Retry {
        reason: String,
    },
    /// D365 (or the way to it) is down, not this message: keep it queued; every lane waits
    /// for D365 to answer a probe.
    Unavailable {
        reason: String,
    },
    /// Keep the message queued; no request on any lane for `pause` (D365 limits are per user).
    Throttle {
        pause: Duration,
    },
    /// Drop the cached token, fetch a new one and send again at once.
    RefreshToken,
    /// Credentials or app registration are wrong: keep the message, pause every lane, alert.
    AuthPause {
        pause: Duration,
        reason: String,
    },
    /// D365 refused the message: hold its order until an operator acts.
    Failed {
        reason: String,
    },
    /// D365 may or may not have it: hold its order until an operator decides.
    Uncertain {
        reason: String,
    },
}

/// The longest pause after a 429, as a multiple of the fallback pause.
pub const MAX_THROTTLE_FACTOR: u32 = 10;

/// Decides what follows an outcome. Pure: table-tested below.
pub fn decide(outcome: &Outcome, history: &SendHistory<'_>, policy: &RetryPolicy) -> Decision {
    match outcome {
        Outcome::Http { status, .. } if (200..300).contains(status) => Decision::Delivered,
        // Capped: a Retry-After of years (a broken proxy) must not stop every lane for
        // good; ten times the fallback is still far beyond D365's 5-minute window.
        Outcome::Http { status: 429, retry_after, .. } => Decision::Throttle {
            pause: retry_after
                .unwrap_or(policy.throttle_fallback)
                .min(policy.throttle_fallback.saturating_mul(MAX_THROTTLE_FACTOR)),
        },
        Outcome::Http { status: 408 | 502 | 503 | 504, .. } | Outcome::NotSent { .. } => Decision::Unavailable {
            reason: outcome.to_string(),
        },
        Outcome::Token { rejected: false, .. } => Decision::Retry {
            reason: outcome.to_string(),
        },
        Outcome::Token { rejected: true, .. } => Decision::AuthPause {
            pause: policy.auth_pause,
            reason: outcome.to_string(),
        },
        Outcome::Http { status: 401, .. } if !history.token_refreshed => Decision::RefreshToken,
        Outcome::Http { status: 401, .. } => Decision::AuthPause {
            pause: policy.auth_pause,
            reason: "D365 answered 401 with a freshly fetched token: check the app registration in \
                     D365 (System administration > Setup > Microsoft Entra ID applications) and the \
                     client id and secret"
                .into(),
        },
        Outcome::Http { status: 500, .. } if history.server_errors_before + 1 < policy.max_attempts => Decision::Retry {
            reason: outcome.to_string(),
        },
        Outcome::Http { status: 500, .. } => Decision::Failed {
            reason: format!("{outcome} (attempt {} of {})", history.server_errors_before + 1, policy.max_attempts),
        },
        Outcome::Http { .. } => Decision::Failed {
            reason: outcome.to_string(),
        },
        Outcome::Ambiguous { .. } => match policy.ambiguous_for(history.message_type) {
            AmbiguousPolicy::Hold => Decision::Uncertain {
                reason: outcome.to_string(),
            },
            AmbiguousPolicy::Resend => Decision::Retry {
                reason: outcome.to_string(),
            },
        },
    }
}

/// Parses `Retry-After` as D365 sends it: a number of seconds. An HTTP-date or garbage
/// gives `None`, and the caller uses its fallback.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "ProdProductionOrderStart";

    fn first() -> SendHistory<'static> {
        SendHistory {
            message_type: TYPE,
            server_errors_before: 0,
            token_refreshed: false,
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    fn http(status: u16) -> Outcome {
        Outcome::Http {
            status,
            retry_after: None,
            body: String::new(),
        }
    }

    fn kind(d: &Decision) -> &'static str {
        match d {
            Decision::Delivered => "delivered",
            Decision::Retry { .. } => "retry",
            Decision::Unavailable { .. } => "unavailable",
            Decision::Throttle { .. } => "throttle",
            Decision::RefreshToken => "refresh",
            Decision::AuthPause { .. } => "auth-pause",
            Decision::Failed { .. } => "failed",
            Decision::Uncertain { .. } => "uncertain",
        }
    }

    #[test]
    fn outcome_table() {
        let resend_this_type = RetryPolicy {
            ambiguous_per_type: [(TYPE.to_string(), AmbiguousPolicy::Resend)].into(),
            ..policy()
        };
        let table: &[(Outcome, SendHistory<'_>, RetryPolicy, &str)] = &[
            (http(200), first(), policy(), "delivered"),
            (http(204), first(), policy(), "delivered"),
            (
                Outcome::NotSent {
                    detail: "refused".into(),
                },
                first(),
                policy(),
                "unavailable",
            ),
            (http(429), first(), policy(), "throttle"),
            (http(408), first(), policy(), "unavailable"),
            (http(502), first(), policy(), "unavailable"),
            (http(503), first(), policy(), "unavailable"),
            (http(504), first(), policy(), "unavailable"),
            (http(401), first(), policy(), "refresh"),
            (
                http(401),
                SendHistory {
                    token_refreshed: true,
                    ..first()
                },
                policy(),
                "auth-pause",
            ),
            (http(500), first(), policy(), "retry"),
            (
                http(500),
                SendHistory {
                    server_errors_before: 1,
                    ..first()
                },
                policy(),
                "retry",
            ),
            (
                http(500),
                SendHistory {
                    server_errors_before: 2,
                    ..first()
                },
                policy(),
                "failed",
            ),
            (
                http(500),
                first(),
                RetryPolicy {
                    max_attempts: 1,
                    ..policy()
                },
                "failed",
            ),
            (http(400), first(), policy(), "failed"),
            (http(404), first(), policy(), "failed"),
            (http(403), first(), policy(), "failed"),
            (http(301), first(), policy(), "failed"),
            (
                Outcome::Ambiguous {
                    detail: "timeout".into(),
                },
                first(),
                policy(),
                "uncertain",
            ),
            (
                Outcome::Ambiguous {
                    detail: "reset".into(),
                },
                first(),
                resend_this_type.clone(),
                "retry",
            ),
            (
                Outcome::Ambiguous {
                    detail: "reset".into(),
                },
                SendHistory {
                    message_type: "ProdProductionOrderEnd",
                    ..first()
                },
                resend_this_type,
                "uncertain",
            ),
            (
                Outcome::Token {
                    rejected: false,
                    detail: "refused".into(),
                },
                first(),
                policy(),
                "retry",
            ),
            (
                Outcome::Token {
                    rejected: true,
                    detail: "AADSTS7000215".into(),
                },
                first(),
                policy(),
                "auth-pause",
            ),
        ];
        for (outcome, history, policy, expected) in table {
            assert_eq!(
                kind(&decide(outcome, history, policy)),
                *expected,
                "{outcome} after {history:?} with {policy:?}"
            );
        }
    }

    #[test]
    fn throttle_uses_retry_after_then_the_fallback() {
        let with = Outcome::Http {
            status: 429,
            retry_after: Some(Duration::from_secs(2)),
            body: String::new(),
        };
        assert_eq!(
            decide(&with, &first(), &policy()),
            Decision::Throttle {
                pause: Duration::from_secs(2)
            }
        );
        assert_eq!(
            decide(&http(429), &first(), &policy()),
            Decision::Throttle {
                pause: Duration::from_secs(30)
            }
        );
    }

    #[test]
    fn a_huge_retry_after_is_capped_at_ten_times_the_fallback() {
        let huge = Outcome::Http {
            status: 429,
            retry_after: parse_retry_after("18446744073709551615"),
            body: String::new(),
        };
        assert_eq!(
            decide(&huge, &first(), &policy()),
            Decision::Throttle {
                pause: Duration::from_secs(300)
            }
        );
    }

    #[test]
    fn retry_after_is_seconds() {
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
