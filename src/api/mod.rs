//! The local operator surface over HTTP: `GET /health` (JSON) and `GET /metrics`
//! (Prometheus text). Read-only; it listens on loopback by default (`api.listen`).
//!
//! The state is shared with the running components and replaced on reload, so the
//! endpoints always describe the configuration that runs.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::d365::DispatchStats;
use crate::outbox::{Outbox, State as MessageState};
use crate::pipeline::PipelineStats;
use crate::rules::RuleStats;
use crate::source::SourceHealth;

/// What the running components publish for the API.
#[derive(Debug, Default)]
pub struct ComponentStats {
    pub sources: Vec<(String, Arc<SourceHealth>)>,
    pub dispatch: Option<Arc<DispatchStats>>,
    pub pipeline: Option<Arc<PipelineStats>>,
    pub rules: Option<Arc<RuleStats>>,
}

#[derive(Debug, Clone)]
pub struct ApiState {
    pub outbox: Outbox,
    pub live: Arc<Mutex<ComponentStats>>,
}

impl ApiState {
    pub fn new(outbox: Outbox) -> ApiState {
        ApiState {
            outbox,
            live: Arc::default(),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, ComponentStats> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn health(State(state): State<ApiState>) -> impl IntoResponse {
    let counts = state.outbox.counts();
    let live = state.live();
    let sources: Vec<serde_json::Value> = live
        .sources
        .iter()
        .map(|(id, h)| {
            serde_json::json!({
                "id": id,
                "connected": h.is_connected(),
                "events": h.events.load(Ordering::Relaxed),
                "decode_errors": h.decode_errors.load(Ordering::Relaxed),
                "reconnects": h.reconnects.load(Ordering::Relaxed),
                "last_error": h.last_error(),
            })
        })
        .collect();
    let held = counts.get(&MessageState::Failed).copied().unwrap_or(0)
        + counts.get(&MessageState::Uncertain).copied().unwrap_or(0);
    let all_up = live.sources.iter().all(|(_, h)| h.is_connected());
    let status = if held > 0 || !all_up {
        "degraded"
    } else {
        "ok"
    };
    let outbox: serde_json::Map<String, serde_json::Value> = MessageState::ALL
        .iter()
        .map(|s| (s.to_string(), counts.get(s).copied().unwrap_or(0).into()))
        .collect();
    // The order contexts as the pipeline last committed them.
    let lines = live
        .pipeline
        .as_ref()
        .map(|p| p.lines.read().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or_default();
    Json(
        serde_json::json!({ "status": status, "sources": sources, "outbox": outbox, "lines": lines }),
    )
}

/// Renders the metrics in the Prometheus text format.
pub fn render_metrics(state: &ApiState) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let counts = state.outbox.counts();
    metric(
        "mes_gateway_outbox_messages",
        "Messages in the outbox by state.",
        "gauge",
        MessageState::ALL
            .iter()
            .map(|s| {
                (
                    format!("{{state=\"{s}\"}}"),
                    counts.get(s).copied().unwrap_or(0) as f64,
                )
            })
            .collect(),
    );
    let oldest = state.outbox.oldest_pending().map_or(0.0, |t| {
        jiff::Timestamp::now()
            .duration_since(t)
            .as_secs_f64()
            .max(0.0)
    });
    metric(
        "mes_gateway_oldest_pending_age_seconds",
        "Age of the oldest message not yet delivered (0 when none).",
        "gauge",
        vec![(String::new(), oldest)],
    );
    let live = state.live();
    let per_source = |f: &dyn Fn(&SourceHealth) -> f64| -> Vec<(String, f64)> {
        live.sources
            .iter()
            .map(|(id, h)| (format!("{{source=\"{id}\"}}"), f(h)))
            .collect()
    };
    metric(
        "mes_gateway_source_connected",
        "1 when the source is connected.",
        "gauge",
        per_source(&|h| f64::from(u8::from(h.is_connected()))),
    );
    metric(
        "mes_gateway_source_events_total",
        "Events received per source.",
        "counter",
        per_source(&|h| h.events.load(Ordering::Relaxed) as f64),
    );
    metric(
        "mes_gateway_source_decode_errors_total",
        "Undecodable inputs and device exceptions per source.",
        "counter",
        per_source(&|h| h.decode_errors.load(Ordering::Relaxed) as f64),
    );
    metric(
        "mes_gateway_source_reconnects_total",
        "Connections made per source.",
        "counter",
        per_source(&|h| h.reconnects.load(Ordering::Relaxed) as f64),
    );
    if let Some(d) = &live.dispatch {
        let outcomes = [
            ("delivered", &d.delivered),
            ("retried", &d.retried),
            ("failed", &d.failed),
            ("uncertain", &d.uncertain),
            ("throttled", &d.throttled),
        ];
        metric(
            "mes_gateway_delivery_outcomes_total",
            "Outcomes of requests to D365.",
            "counter",
            outcomes
                .iter()
                .map(|(k, v)| {
                    (
                        format!("{{outcome=\"{k}\"}}"),
                        v.load(Ordering::Relaxed) as f64,
                    )
                })
                .collect(),
        );
    }
    if let Some(p) = &live.pipeline {
        metric(
            "mes_gateway_messages_built_total",
            "Messages built by rules and stored.",
            "counter",
            vec![(String::new(), p.messages.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "mes_gateway_store_errors_total",
            "Failed attempts to store messages.",
            "counter",
            vec![(String::new(), p.store_errors.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "mes_gateway_redelivered_duplicates_total",
            "Upstream redeliveries (MQTT DUP) of messages already stored: acknowledged, nothing produced.",
            "counter",
            vec![(String::new(), p.duplicates.load(Ordering::Relaxed) as f64)],
        );
    }
    if let Some(r) = &live.rules {
        metric(
            "mes_gateway_unassigned_events_total",
            "Events that needed an order on a line without one.",
            "counter",
            vec![(String::new(), r.unassigned.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "mes_gateway_unmatched_events_total",
            "Events no rule takes.",
            "counter",
            vec![(String::new(), r.unmatched.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "mes_gateway_build_errors_total",
            "Messages rules could not build.",
            "counter",
            vec![(String::new(), r.build_errors.load(Ordering::Relaxed) as f64)],
        );
    }
    out
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&state),
    )
}
