use std::time::Duration;

use super::*;
use crate::live::ComponentStats;
use crate::outbox::Ingest;
use crate::outbox::{NewMessage, Settle, Settlement};
use crate::rules::RuleStats;
use crate::source::SourceHealth;

fn open(key: &str, kind: &str) -> (String, String, String) {
    (key.to_string(), kind.to_string(), format!("{key} is open"))
}

#[test]
fn an_incident_fires_once_and_clears_once_however_often_it_is_evaluated() {
    let board = Board::default();
    let kinds = ["source_down"];
    let first = board.reconcile(&kinds, vec![open("source_down/plc", "source_down")]);
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].alert.as_str(), first[0].state.as_str()),
        ("source_down/plc", "firing")
    );
    for _ in 0..100 {
        assert!(board
            .reconcile(&kinds, vec![open("source_down/plc", "source_down")])
            .is_empty());
    }
    let cleared = board.reconcile(&kinds, Vec::new());
    assert_eq!(cleared.len(), 1);
    assert_eq!(cleared[0].state, "cleared");
    assert_eq!(cleared[0].text, "cleared: source_down/plc is open");
    assert!(board.reconcile(&kinds, Vec::new()).is_empty());
    assert_eq!(board.fired.load(Ordering::Relaxed), 1);
    assert_eq!(board.cleared.load(Ordering::Relaxed), 1);
    // A new incident of the same kind is a new alert.
    assert_eq!(
        board
            .reconcile(&kinds, vec![open("source_down/plc", "source_down")])
            .len(),
        1
    );
}

#[test]
fn kinds_not_evaluated_stay_as_they_are() {
    let board = Board::default();
    board.reconcile(&["d365_token"], vec![open("d365_token", "d365_token")]);
    assert!(board.reconcile(&["source_down"], Vec::new()).is_empty());
    assert_eq!(board.open_alerts().len(), 1);
}

/// An incident open when the gateway stopped is not announced again after the restart
/// while it lasts; one that ended meanwhile clears once its grace is over.
#[tokio::test(start_paused = true)]
async fn alerts_open_before_a_restart_are_not_announced_again() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let before = watch(outbox.clone(), Live::default(), AlertConfig::default());
    let kinds = ["message_uncertain", "source_down"];
    let fired = before.board.reconcile(
        &kinds,
        vec![
            open("message/7", "message_uncertain"),
            open("source_down/plc", "source_down"),
        ],
    );
    assert_eq!(fired.len(), 2);
    before.save().await;

    // The restart: a new board from what the store kept.
    let saved = Board::saved(&outbox);
    assert_eq!(saved.len(), 2);
    let board = Board::default();
    board.restore(saved);
    // Message 7 is still uncertain, the PLC not yet judged: nothing is said.
    assert!(board
        .reconcile(&kinds, vec![open("message/7", "message_uncertain")])
        .is_empty());
    assert_eq!(board.open_alerts().len(), 2);
    assert_eq!(board.fired.load(Ordering::Relaxed), 0);
    // After the grace, the PLC's alert (its condition gone) clears, once.
    tokio::time::advance(RESTORE_GRACE + Duration::from_secs(1)).await;
    let cleared = board.reconcile(&kinds, vec![open("message/7", "message_uncertain")]);
    assert_eq!(cleared.len(), 1);
    assert_eq!(
        (cleared[0].alert.as_str(), cleared[0].state.as_str()),
        ("source_down/plc", "cleared")
    );
    // A new incident after the restart is announced as usual.
    let new = board.reconcile(
        &kinds,
        vec![
            open("message/7", "message_uncertain"),
            open("message/8", "message_uncertain"),
        ],
    );
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].alert, "message/8");
}

fn watch(outbox: Outbox, live: Live, config: AlertConfig) -> AlertWatch {
    AlertWatch {
        config,
        board: Arc::default(),
        data_dir: outbox.path().to_path_buf(),
        outbox,
        live,
        delivering: true,
    }
}

#[tokio::test]
async fn failed_messages_down_sources_and_an_old_queue_are_alerts_with_what_to_know() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    outbox.index_contents(true);
    let records = outbox
        .commit(Ingest::of(
            ["P1", "P2"]
                .iter()
                .map(|order| NewMessage {
                    production_order: order.to_string(),
                    message_type: "ProdProductionOrderStart".into(),
                    content: format!("{{\"ProductionOrderNumber\":\"{order}\"}}"),
                    origin: "test".into(),
                    line: None,
                })
                .collect(),
        ))
        .await
        .unwrap()
        .records;
    outbox.mark_sending(&[records[0].id]).await.unwrap();
    outbox
        .settle(vec![Settlement {
            id: records[0].id,
            attempt: Some("HTTP 400".into()),
            server_error: false,
            next: Settle::Failed {
                reason: "HTTP 400: order not found".into(),
            },
            as_sent: None,
        }])
        .await
        .unwrap();
    // D365 reports the same message failed too (it received it after all): a second
    // alert with its own key, not one hiding the other.
    let verdict = crate::outbox::ProcessedEvent {
        source: "d365".into(),
        queue: "JmgMES3P".into(),
        message_type: records[0].message_type.clone(),
        content: records[0].content.clone(),
        verdict: crate::outbox::D365Verdict {
            at: jiff::Timestamp::now(),
            state: "Failed".into(),
            failed: true,
            result: None,
            infolog: Some("Production order P1 is not released.".into()),
            event_id: "E-1".into(),
            page_url: None,
        },
        payload: "{}".into(),
    };
    outbox
        .commit(Arc::new(
            crate::outbox::Ingest::default().with_processed(vec![verdict]),
        ))
        .await
        .unwrap();
    let live = Live::default();
    let plc = Arc::new(SourceHealth::default());
    plc.set_connected("plc", false, Some("connection refused"));
    live.replace(ComponentStats {
        sources: vec![("plc".into(), plc.clone())],
        ..ComponentStats::default()
    });
    let w = watch(
        outbox,
        live,
        AlertConfig {
            source_down_after: Duration::ZERO,
            oldest_queued_after: Duration::ZERO,
            disk_free_below_mib: 0,
            ..AlertConfig::default()
        },
    );
    let notices = w.evaluate(&mut Memory::default()).await;
    let texts: BTreeMap<&str, &str> = notices
        .iter()
        .map(|n| (n.alert.as_str(), n.text.as_str()))
        .collect();
    assert_eq!(
        texts.get(format!("message/{}", records[0].id).as_str()).copied(),
        Some(format!("message {} (ProdProductionOrderStart, order P1) is failed: HTTP 400: order not found; the order's later messages wait", records[0].id).as_str())
    );
    assert!(
        texts["source_down/plc"].contains("source plc has been down")
            && texts["source_down/plc"].ends_with("connection refused")
    );
    assert_eq!(
        texts.get(format!("message/{}/d365", records[0].id).as_str()).copied(),
        Some(format!("message {} (ProdProductionOrderStart, order P1) failed in D365: Production order P1 is not released.; D365 holds the order's later messages until it is fixed or cancelled there", records[0].id).as_str())
    );
    assert!(texts["oldest_queued"].starts_with("the oldest message waiting for D365 was created"));
    assert_eq!(notices.len(), 4, "{texts:#?}");

    plc.set_connected("plc", true, None);
    let notices = w.evaluate(&mut Memory::default()).await;
    assert_eq!(notices.len(), 1);
    assert_eq!(
        (notices[0].alert.as_str(), notices[0].state.as_str()),
        ("source_down/plc", "cleared")
    );
}

#[tokio::test(start_paused = true)]
async fn events_on_a_line_without_an_order_alert_once_and_clear_after_a_quiet_period() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path()).unwrap();
    let live = Live::default();
    let rules = Arc::new(RuleStats::default());
    live.replace(ComponentStats {
        rules: Some(rules.clone()),
        ..ComponentStats::default()
    });
    let w = watch(
        outbox,
        live,
        AlertConfig {
            unassigned_quiet: Duration::from_secs(60),
            disk_free_below_mib: 0,
            ..AlertConfig::default()
        },
    );
    let mut memory = Memory::default();
    assert!(
        w.evaluate(&mut memory).await.is_empty(),
        "the first look only reads the counter"
    );
    rules.unassigned.fetch_add(500, Ordering::Relaxed);
    let fired = w.evaluate(&mut memory).await;
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].alert, "unassigned");
    assert!(fired[0].text.contains("(500 so far)"), "{}", fired[0].text);
    for _ in 0..10 {
        rules.unassigned.fetch_add(1, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(
            w.evaluate(&mut memory).await.is_empty(),
            "one incident, not one per event"
        );
    }
    tokio::time::advance(Duration::from_secs(61)).await;
    let cleared = w.evaluate(&mut memory).await;
    assert_eq!(cleared.len(), 1);
    assert_eq!(cleared[0].state, "cleared");
}
