//! `GET /metrics` in the OpenMetrics text format (prometheus-client). The values live in
//! the components (atomics they update on their hot paths, the outbox's counts, the
//! dispatcher's latency histogram, the outbox's write histograms); a registry is filled
//! from them at each scrape, so no component depends on the metrics library's types
//! except the histograms.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::ApiState;
use crate::outbox::{State as MessageState, WriteKind};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// A gauge with one label, one sample per value. (Help texts have no final period: the
/// encoder adds one.)
fn gauges(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    samples: impl IntoIterator<Item = (String, i64)>,
) {
    let family = Family::<Labels, Gauge>::default();
    for (value, v) in samples {
        family.get_or_create(&vec![(label, value)]).set(v);
    }
    registry.register(name, help, family);
}

/// A counter with one label; `name` without the `_total` the format adds.
fn counters(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    samples: impl IntoIterator<Item = (String, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (value, v) in samples {
        family.get_or_create(&vec![(label, value)]).inc_by(v);
    }
    registry.register(name, help, family);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: &AtomicU64) {
    let c = Counter::<u64>::default();
    c.inc_by(value.load(Ordering::Relaxed));
    registry.register(name, help, c);
}

pub fn render(state: &ApiState) -> String {
    let mut registry = Registry::default();
    let counts = state.outbox.counts();
    gauges(
        &mut registry,
        "mes_gateway_outbox_messages",
        "Messages in the outbox by state",
        "state",
        MessageState::ALL
            .iter()
            .map(|s| (s.to_string(), counts.get(s).copied().unwrap_or(0) as i64)),
    );
    let oldest = state.outbox.oldest_pending().map_or(0.0, |t| {
        jiff::Timestamp::now()
            .duration_since(t)
            .as_secs_f64()
            .max(0.0)
    });
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(oldest);
    registry.register(
        "mes_gateway_oldest_pending_age_seconds",
        "Age of the oldest message not yet delivered (0 when none)",
        g,
    );
    let writes = state.outbox.write_stats();
    registry.register(
        "mes_gateway_outbox_write_seconds",
        "Durable writes of the outbox (one transaction and one fsync each): new messages (ingest), the dispatcher's outcomes and marks (delivery)",
        writes.seconds(),
    );
    counters(
        &mut registry,
        "mes_gateway_outbox_written_messages",
        "Messages in the outbox's durable writes: new ones (ingest), settled plus marked (delivery)",
        "kind",
        WriteKind::ALL.map(|k| (k.as_str().to_string(), writes.summary(k).messages)),
    );
    let live = state.live.get();
    let sources = &live.sources;
    gauges(
        &mut registry,
        "mes_gateway_source_connected",
        "1 when the source is connected",
        "source",
        sources
            .iter()
            .map(|(id, h)| (id.clone(), i64::from(h.is_connected()))),
    );
    for (name, help, pick) in [
        (
            "mes_gateway_source_events",
            "Events received per source",
            (|h| &h.events) as fn(&crate::source::SourceHealth) -> &AtomicU64,
        ),
        (
            "mes_gateway_source_decode_errors",
            "Undecodable inputs, device exceptions and OPC UA values of bad or uncertain quality per source",
            |h| &h.decode_errors,
        ),
        (
            "mes_gateway_source_publishes",
            "OPC UA publish responses (keep-alives included) per source: the server is alive between values",
            |h| &h.publishes,
        ),
        (
            "mes_gateway_source_reconnects",
            "Connections made per source",
            |h| &h.reconnects,
        ),
    ] {
        counters(
            &mut registry,
            name,
            help,
            "source",
            sources
                .iter()
                .map(|(id, h)| (id.clone(), pick(h).load(Ordering::Relaxed))),
        );
    }
    if let Ok((_, duplicates)) = state.outbox.duplicates(0) {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(duplicates).unwrap_or(i64::MAX));
        registry.register(
            "mes_gateway_d365_duplicates",
            "Messages D365 may have twice: sent again on the evidence of its events, then reported received twice",
            g,
        );
    }
    if let Some(d) = &live.dispatch {
        counters(
            &mut registry,
            "mes_gateway_delivery_outcomes",
            "Outcomes of requests to D365",
            "outcome",
            [
                ("delivered", &d.delivered),
                ("retried", &d.retried),
                ("failed", &d.failed),
                ("uncertain", &d.uncertain),
                ("throttled", &d.throttled),
            ]
            .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed))),
        );
        let evidence: Vec<(u64, (usize, usize))> = d
            .evidence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, e)| (*id, *e))
            .collect();
        if !evidence.is_empty() {
            // Uncertain messages are few (at most one per order): one sample each.
            let family = Family::<Labels, Gauge>::default();
            for (id, (seen, needed)) in evidence {
                for (kind, n) in [("seen", seen), ("needed", needed)] {
                    family
                        .get_or_create(&vec![
                            ("message", id.to_string()),
                            ("witnesses", kind.to_string()),
                        ])
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            registry.register(
                "mes_gateway_uncertain_evidence",
                "Uncertain messages: D365's later messages of other orders reported processed (seen) and how many settle it (needed)",
                family,
            );
        }
        if let Some((used, limit, window)) = d.budget() {
            gauges(
                &mut registry,
                "mes_gateway_d365_budget_requests",
                "D365's request budget: requests spent in the current window (used) and the budget (limit)",
                "kind",
                [("used", used), ("limit", limit)]
                    .map(|(k, v)| (k.to_string(), i64::try_from(v).unwrap_or(i64::MAX))),
            );
            gauges(
                &mut registry,
                "mes_gateway_d365_backlog_seconds",
                "Seconds the messages waiting now need at the request budget's rate, one message a request (an upper bound: joined requests carry many)",
                "budget",
                [(
                    format!("{limit}/{window}s"),
                    i64::try_from(crate::d365::budget::backlog_seconds(
                        state.outbox.waiting(),
                        limit,
                        window,
                    ))
                    .unwrap_or(i64::MAX),
                )],
            );
        }
        registry.register(
            "mes_gateway_delivery_latency_seconds",
            "From a message's creation to D365's acceptance",
            d.delivery_latency.clone(),
        );
    }
    if let Some(p) = &live.pipeline {
        counter(
            &mut registry,
            "mes_gateway_messages_built",
            "Messages built by rules and stored",
            &p.messages,
        );
        counter(
            &mut registry,
            "mes_gateway_store_errors",
            "Failed attempts to store messages",
            &p.store_errors,
        );
        counter(
            &mut registry,
            "mes_gateway_redelivered_duplicates",
            "Upstream redeliveries (MQTT DUP) of messages already stored: acknowledged, nothing produced",
            &p.duplicates,
        );
        counters(
            &mut registry,
            "mes_gateway_d365_verdicts",
            "D365's \"message processed\" events: processed or failed in D365 (recorded on the message), resolved (an uncertain message D365 received), unmatched (kept for inspection)",
            "verdict",
            [
                ("processed", &p.verdicts_processed),
                ("failed", &p.verdicts_failed),
                ("resolved", &p.verdicts_resolved),
                ("unmatched", &p.verdicts_unmatched),
            ]
            .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed))),
        );
    }
    if !live.publishers.is_empty() {
        counters(
            &mut registry,
            "mes_gateway_mqtt_published",
            "Rules' publications acknowledged by the broker, per mqtt source",
            "via",
            live.publishers
                .iter()
                .map(|(via, p)| (via.clone(), p.published.load(Ordering::Relaxed))),
        );
        gauges(
            &mut registry,
            "mes_gateway_mqtt_publisher_connected",
            "1 while the publisher is connected to the broker",
            "via",
            live.publishers
                .iter()
                .map(|(via, p)| (via.clone(), i64::from(p.connected.load(Ordering::Relaxed)))),
        );
    }
    if let Some(r) = &live.rules {
        counter(
            &mut registry,
            "mes_gateway_unassigned_events",
            "Events that needed an order on a line without one",
            &r.unassigned,
        );
        counter(
            &mut registry,
            "mes_gateway_unmatched_events",
            "Events no rule takes",
            &r.unmatched,
        );
        counter(
            &mut registry,
            "mes_gateway_build_errors",
            "Messages rules could not build",
            &r.build_errors,
        );
    }
    drop(live);
    let open = state.alerts.open_alerts();
    gauges(
        &mut registry,
        "mes_gateway_alerts_open",
        "Open alerts by kind",
        "kind",
        crate::alert::KINDS.iter().map(|k| {
            (
                k.to_string(),
                open.iter().filter(|a| a.kind == *k).count() as i64,
            )
        }),
    );
    counter(
        &mut registry,
        "mes_gateway_alerts_fired",
        "Alerts fired (each incident once)",
        &state.alerts.fired,
    );
    counter(
        &mut registry,
        "mes_gateway_alert_notices_dropped",
        "Alert notices a notifier could not keep up with",
        &state.alerts.dropped_notices,
    );
    let doors = [
        ("http", &state.listeners.http),
        ("socket", &state.listeners.socket),
    ];
    let load = |f: fn(&crate::api::serve::ConnectionStats) -> &AtomicU64| {
        doors
            .iter()
            .map(move |(door, s)| (door.to_string(), f(s).load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
    };
    gauges(
        &mut registry,
        "mes_gateway_api_connections_open",
        "Open connections on the operator service's doors",
        "door",
        load(|s| &s.open).into_iter().map(|(d, v)| (d, v as i64)),
    );
    counters(
        &mut registry,
        "mes_gateway_api_connections_accepted",
        "Connections accepted by the operator service",
        "door",
        load(|s| &s.accepted),
    );
    counters(
        &mut registry,
        "mes_gateway_api_connections_refused",
        "Connections closed at once because api.max_connections were open",
        "door",
        load(|s| &s.refused),
    );
    counters(
        &mut registry,
        "mes_gateway_api_connections_timed_out",
        "Connections the server closed: headers, TLS handshake or idle deadline passed",
        "door",
        load(|s| &s.timed_out),
    );
    counter(
        &mut registry,
        "mes_gateway_api_tls_handshake_failures",
        "TLS handshakes on the operator listener that failed",
        &state.listeners.http.tls_failures,
    );
    counter(
        &mut registry,
        "mes_gateway_console_login_failures",
        "Console logins refused for a wrong token",
        &state.logins.failures,
    );
    counter(
        &mut registry,
        "mes_gateway_console_login_throttled",
        "Console login attempts refused while their address was paused after wrong tokens",
        &state.logins.throttled,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::live::{ComponentStats, Live};
    use crate::operator::{ContentChecks, Operator, Running};

    /// Where each uncertain message's evidence stands reaches the operator: `status`
    /// (its lines and JSON) and `/metrics`.
    #[tokio::test]
    async fn the_evidence_of_uncertain_messages_shows_in_status_and_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = crate::outbox::Outbox::open(dir.path()).unwrap();
        let stats = Arc::new(crate::d365::DispatchStats::default());
        stats.evidence.lock().unwrap().insert(17, (3, 5));
        let live = Live::default();
        live.replace(ComponentStats {
            dispatch: Some(stats),
            ..ComponentStats::default()
        });
        let alerts = Arc::new(crate::alert::Board::default());
        let (control, _keep) = tokio::sync::mpsc::channel(1);
        let operator = Operator::running(
            outbox,
            ContentChecks::default(),
            Running {
                started: jiff::Timestamp::now(),
                live: live.clone(),
                alerts: alerts.clone(),
                lines: Arc::default(),
                control,
            },
        );
        let status = operator.status().await.unwrap();
        assert_eq!(
            status.uncertain_evidence,
            [crate::operator::EvidenceLine {
                id: 17,
                seen: 3,
                needed: 5
            }]
        );
        let metrics = super::render(&crate::api::ApiState::new(operator, live, alerts));
        for expected in [
            "mes_gateway_uncertain_evidence{message=\"17\",witnesses=\"seen\"} 3\n",
            "mes_gateway_uncertain_evidence{message=\"17\",witnesses=\"needed\"} 5\n",
        ] {
            assert!(metrics.contains(expected), "{expected}: {metrics}");
        }
    }
}
