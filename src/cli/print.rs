//! Readable tables and screens for the operator commands (`--json` prints the data as
//! is instead).

use anyhow::Context as _;

use super::CliError;
use crate::operator::{LinesView, MessagePage, Status, UnmatchedView};
use crate::outbox::Record;

fn time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S").to_string()
}

fn age(seconds: i64) -> String {
    crate::config::format_duration(std::time::Duration::from_secs(seconds.max(0) as u64))
}

/// A span for a person: seconds, minutes, or hours and minutes.
fn span(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min", seconds.div_ceil(60)),
        _ => format!("{} h {} min", seconds / 3600, (seconds % 3600) / 60),
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

pub fn page(page: &MessagePage) {
    outln!(
        "{:>8}  {:<10} {:<34} {:<14} {:>8}  {:<20} LAST ERROR",
        "ID",
        "STATE",
        "TYPE",
        "ORDER",
        "ATTEMPTS",
        "CREATED"
    );
    for r in &page.messages {
        outln!(
            "{:>8}  {:<10} {:<34} {:<14} {:>8}  {:<20} {}",
            r.id,
            r.state,
            r.message_type,
            r.production_order,
            r.attempt_count,
            time(r.created_at),
            shorten(&list_note(r), 60)
        );
    }
    let summary: Vec<String> = page
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    outln!(
        "{} message(s) listed; outbox: {}",
        page.messages.len(),
        if summary.is_empty() {
            "empty".into()
        } else {
            summary.join(", ")
        }
    );
    if let Some(next) = page.next {
        outln!("more: add --after {next}");
    }
}

/// The last column of a listing: the last error, and a joined request's part (join.rs).
fn list_note(r: &Record) -> String {
    let group = r
        .group_tag()
        .map_or(String::new(), |tag| format!("[{tag}] "));
    format!("{group}{}", r.last_error.as_deref().unwrap_or(""))
}

pub fn record(r: &Record) -> Result<(), CliError> {
    let mut value = serde_json::to_value(r).context("cannot print a record")?;
    if let Ok(content) = serde_json::from_str::<serde_json::Value>(&r.content) {
        value["content"] = content;
    }
    // A joined request's content, readable like the message's own.
    if let Some(crate::outbox::Group::Lead { content, .. }) = &r.group {
        if let Ok(content) = serde_json::from_str::<serde_json::Value>(content) {
            value["group"]["lead"]["content"] = content;
        }
    }
    if let Some(summary) = r.group_summary() {
        value["joined"] = summary.into();
    }
    outln!(
        "{}",
        serde_json::to_string_pretty(&value).context("cannot print a record")?
    );
    Ok(())
}

pub fn lines(view: &LinesView) {
    if view.lines.is_empty() {
        outln!("no line has a production order");
    }
    for (line, c) in &view.lines {
        let since = c
            .since
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default();
        outln!(
            "{line}: order {} item {} operation {} resource {} since {since}",
            c.order,
            c.item.as_deref().unwrap_or("-"),
            c.operation.as_deref().unwrap_or("-"),
            c.resource.as_deref().unwrap_or("-")
        );
    }
    for (line, orders) in &view.released {
        outln!("{line}: released orders (oldest first):");
        for r in orders {
            outln!(
                "  {} item {} released {}{}",
                r.order,
                r.item.as_deref().unwrap_or("-"),
                time(r.at),
                if view.lines.get(line).is_some_and(|c| c.order == r.order) {
                    "  (running)"
                } else {
                    ""
                }
            );
        }
    }
    for acc in &view.open_aggregates {
        outln!(
            "  open aggregate: rule {} line {} order {} quantity {}",
            acc.rule,
            acc.line,
            acc.order.as_deref().unwrap_or("-"),
            acc.quantity
        );
    }
}

/// A delivery write this slow (recent mean) is worth a line in `status`: an SSD flushes in
/// about a millisecond, an SD card or a worn eMMC in tens.
const SLOW_DELIVERY_WRITE_MS: f64 = 10.0;

/// One kind of the outbox's durable writes, for `status`.
fn writes(kind: &str, w: &crate::outbox::WriteSummary) -> String {
    if w.writes == 0 {
        return format!("{kind} none yet");
    }
    let carried = if w.messages == 0 {
        // Writes of rules state, event receipts or D365 verdicts alone carry no message.
        "none carrying a message".to_string()
    } else {
        let average = format!("{:.1}", w.messages as f64 / w.writes as f64);
        format!(
            "{} messages each on average",
            average.strip_suffix(".0").unwrap_or(&average)
        )
    };
    format!(
        "{kind} {:.1} ms each lately ({} so far, {carried})",
        w.recent_ms, w.writes
    )
}

pub fn status(s: &Status) {
    match (s.running, s.uptime_seconds) {
        (true, Some(up)) => outln!("mes-gateway {} running for {}", s.version, age(up)),
        _ => outln!(
            "mes-gateway {}: not running (read from the data directory)",
            s.version
        ),
    }
    if s.running {
        outln!("\nSOURCES");
        if s.sources.is_empty() {
            outln!("  none configured");
        }
        for src in &s.sources {
            let state = if src.connected { "connected" } else { "DOWN" };
            let since = src.since.map(time).unwrap_or_default();
            let last = src.last_event.map_or("no event yet".to_string(), |t| {
                format!("last event {}", time(t))
            });
            let error = match (&src.last_error, src.connected) {
                (Some(e), false) => format!("  ({})", shorten(e, 60)),
                _ => String::new(),
            };
            outln!(
                "  {:<16} {:<10} since {since}  {last}  {} events{error}",
                src.id,
                state,
                src.events
            );
            if let Some(detail) = &src.detail {
                outln!("  {:<16} {detail}", "");
            }
        }
    }
    outln!("\nOUTBOX");
    let depth: Vec<String> = s.outbox.iter().map(|(k, n)| format!("{n} {k}")).collect();
    outln!("  {}", depth.join(", "));
    match &s.oldest_queued {
        Some(o) => outln!(
            "  oldest waiting: message {} ({}, order {}, {}) created {} ago",
            o.id,
            o.message_type,
            o.production_order,
            o.state,
            age(o.age_seconds)
        ),
        None => outln!("  nothing waiting for delivery"),
    }
    for e in &s.uncertain_evidence {
        outln!(
            "  message {} is uncertain: waiting for D365 to process messages sent after it: {} of {} seen",
            e.id,
            e.seen,
            e.needed
        );
    }
    if let Some(w) = &s.outbox_writes {
        outln!(
            "  durable writes (transaction and fsync): {}; {}",
            writes("delivery", &w.delivery),
            writes("ingest", &w.ingest)
        );
        if w.delivery.writes > 0 && w.delivery.recent_ms >= SLOW_DELIVERY_WRITE_MS {
            outln!(
                "  the disk is slow to flush: an order's backlog drains at most about {:.0} messages/s (one delivery write each); put the data directory on a faster disk (an SSD)",
                1000.0 / w.delivery.recent_ms
            );
        }
    }
    if s.running {
        outln!("\nD365");
        outln!(
            "  {}",
            s.last_d365_error
                .as_deref()
                .map_or("no problem reported".to_string(), |e| format!(
                    "last error: {e}"
                ))
        );
        if let Some(b) = &s.d365_budget {
            outln!(
                "  request budget: {} of {} per {} used; what waits needs at most {} at that rate (one message a request; joined ones need fewer)",
                b.used,
                b.limit,
                span(b.window_seconds),
                span(b.backlog_seconds)
            );
        }
        let v = &s.d365_verdicts;
        if v.failed_in_d365 > 0 {
            outln!(
                "  {} message(s) FAILED IN D365: D365 holds their orders' later messages (see the alerts, or: outbox list --state delivered)",
                v.failed_in_d365
            );
        }
        if v.twice_in_d365 > 0 {
            outln!(
                "  {} message(s) may be in D365 TWICE: sent again on the evidence of D365's events, then reported twice; reverse the second report in D365 (see the alerts)",
                v.twice_in_d365
            );
        }
        if v.unmatched > 0 {
            outln!(
                "  {} D365 verdict(s) matched no message: mes-gateway outbox unmatched",
                v.unmatched
            );
        }
        outln!("\nALERTS");
        if s.alerts.is_empty() {
            outln!("  none open");
        }
        for a in &s.alerts {
            outln!("  {}  {}  {}", time(a.since), a.key, a.text);
        }
    }
    outln!("\nLINES");
    if s.lines.is_empty() {
        outln!("  no line has a production order");
    }
    for (line, orders) in &s.released {
        let list: Vec<&str> = orders.iter().map(|o| o.order.as_str()).collect();
        outln!("  {line}: released {}", list.join(", "));
    }
    for (line, c) in &s.lines {
        outln!(
            "  {line}: order {}{}",
            c.order,
            c.item
                .as_deref()
                .map(|i| format!(" item {i}"))
                .unwrap_or_default()
        );
    }
}

pub fn unmatched(view: &UnmatchedView, json: bool) -> Result<(), CliError> {
    if json {
        for e in &view.events {
            outln!(
                "{}",
                serde_json::to_string(e).context("cannot print an event")?
            );
        }
        return Ok(());
    }
    if view.events.is_empty() {
        outln!("no D365 verdict is unmatched");
        return Ok(());
    }
    outln!(
        "{:<20}  {:<12}  {:<34}  {:<10}  EVENT",
        "RECEIVED",
        "SOURCE",
        "MESSAGE TYPE",
        "D365 STATE"
    );
    for e in &view.events {
        outln!(
            "{:<20}  {:<12}  {:<34}  {:<10}  {}  ({})",
            time(e.received_at),
            shorten(&e.source, 12),
            shorten(&e.message_type, 34),
            shorten(&e.state, 10),
            e.event_id,
            e.reason
        );
    }
    if view.total > view.events.len() {
        outln!(
            "{} more: add --limit {}",
            view.total - view.events.len(),
            view.total
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_figures_say_what_the_writes_carried() {
        let summary = |writes, messages| crate::outbox::WriteSummary {
            writes,
            messages,
            recent_ms: 2.5,
        };
        assert_eq!(
            writes("ingest", &summary(16, 0)),
            "ingest 2.5 ms each lately (16 so far, none carrying a message)"
        );
        assert_eq!(
            writes("delivery", &summary(4, 10)),
            "delivery 2.5 ms each lately (4 so far, 2.5 messages each on average)"
        );
        assert_eq!(
            writes("delivery", &summary(2, 2)),
            "delivery 2.5 ms each lately (2 so far, 1 messages each on average)"
        );
        assert_eq!(writes("ingest", &summary(0, 0)), "ingest none yet");
    }
}
