//! The eight worked examples in config/examples, driven through the gateway: events
//! injected into the pipeline → rules → outbox → dispatcher → fake D365. The messages
//! D365 receives are compared exactly.

use mes_gateway_testkit as support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mes_gateway::d365::client::D365Client;
use mes_gateway::d365::Dispatcher;
use mes_gateway::event::{Event, Value};
use mes_gateway::outbox::{Outbox, State};
use mes_gateway::pipeline::Pipeline;
use mes_gateway::rules::state::EngineState;
use mes_gateway::rules::Engine;
use mes_gateway::settings;
use mes_gateway::source::SourceEvent;
use mes_gateway::systemd::Heartbeats;
use serde_json::{json, Value as Json};
use support::{d365_yaml, FakeD365};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Scenario {
    events: Option<mpsc::Sender<SourceEvent>>,
    pipeline: tokio::task::JoinHandle<()>,
    outbox: Outbox,
    fake: FakeD365,
    cancel: CancellationToken,
    /// Event times are offsets from here (now, so `{today}` is today's date).
    base: jiff::Timestamp,
    tz: jiff::tz::TimeZone,
    _dir: tempfile::TempDir,
}

impl Scenario {
    async fn start(example: &str) -> Scenario {
        let fake = FakeD365::start().await;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(example);
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config/examples")
            .join(example);
        std::fs::create_dir_all(dir.join("rules.d")).unwrap();
        // The examples have no d365 section (they run with --dry-run); add the fake's.
        // Their credentials (systemd's directory) come from the test's directory.
        std::fs::write(tmp.path().join("servicebus-key"), "c2VjcmV0LWtleQ==").unwrap();
        let yaml = std::fs::read_to_string(src.join("gateway.yaml"))
            .unwrap()
            .replace(
                "${CREDENTIALS_DIRECTORY:-/etc/mes-gateway}",
                &tmp.path().display().to_string(),
            )
            + &d365_yaml(&fake);
        support::write_config(&dir, &yaml);
        for f in std::fs::read_dir(src.join("rules.d")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.join("rules.d").join(f.file_name())).unwrap();
        }
        let config = settings::load(&dir).unwrap_or_else(|e| panic!("{e}"));
        let outbox = Outbox::open(&config.storage.data_dir).unwrap();
        let (tx, rx) = mpsc::channel(64);
        let pipeline = Pipeline {
            engine: Engine::new(
                config.rules.clone(),
                config.time_zone.clone(),
                EngineState::default(),
            ),
            outbox: outbox.clone(),
            field_names: Default::default(),
            print_messages: false,
            stats: Default::default(),
            heartbeat: Heartbeats::default().register("pipeline"),
        };
        // No operator here: the command channel is closed from the start.
        let pipeline = tokio::spawn(pipeline.run(rx, mpsc::channel(1).1));
        let client = Arc::new(D365Client::new(Arc::new(config.d365.clone().unwrap())).unwrap());
        // One request per message: these tests read what the rules built, message by
        // message (joining is tested in the outbox's and the delivery tests).
        let dispatcher = Dispatcher::new(
            outbox.clone(),
            client,
            mes_gateway::d365::config::DispatcherConfig {
                join: mes_gateway::outbox::JoinPolicy::off(),
                ..config.dispatcher.clone()
            },
            Duration::from_secs(1),
        );
        let cancel = CancellationToken::new();
        tokio::spawn(dispatcher.run(cancel.clone()));
        Scenario {
            events: Some(tx),
            pipeline,
            outbox,
            fake,
            cancel,
            base: jiff::Timestamp::now(),
            tz: config.time_zone.clone(),
            _dir: tmp,
        }
    }

    fn at(&self, ms: i64) -> jiff::Timestamp {
        self.base + jiff::SignedDuration::from_millis(ms)
    }

    fn today(&self, ms: i64) -> String {
        self.at(ms).to_zoned(self.tz.clone()).date().to_string()
    }

    async fn send(&self, source: &str, point: &str, value: Value, ms: i64) {
        let event = Event {
            source: source.into(),
            point: point.into(),
            value,
            at: self.at(ms),
        };
        self.events
            .as_ref()
            .unwrap()
            .send(event.into())
            .await
            .unwrap();
    }

    async fn pulse(&self, source: &str, point: &str, ms: i64, bounce: bool) {
        if bounce {
            for (level, dt) in [(true, 0), (false, 2), (true, 4), (false, 6)] {
                self.send(source, point, Value::Bool(level), ms + dt).await;
            }
            self.send(source, point, Value::Bool(true), ms + 8).await;
        } else {
            self.send(source, point, Value::Bool(true), ms).await;
        }
        self.send(source, point, Value::Bool(false), ms + 300).await;
    }

    /// Stops the sources (as at shutdown), waits until D365 has every message, and
    /// returns them as (type, content) in arrival order.
    async fn finish(mut self) -> Vec<(String, Json)> {
        drop(self.events.take());
        self.pipeline.await.unwrap();
        let total = self.outbox.list(None, None).unwrap().len();
        self.fake
            .wait_until("every message", |r| r.len() == total)
            .await;
        let mut rx = self.outbox.subscribe();
        while self
            .outbox
            .counts()
            .get(&State::Delivered)
            .copied()
            .unwrap_or(0)
            < total
        {
            rx.changed().await.unwrap();
        }
        self.cancel.cancel();
        self.fake
            .accepted()
            .into_iter()
            .map(|r| {
                (
                    r.envelope["_messageType"].as_str().unwrap().to_string(),
                    r.content,
                )
            })
            .collect()
    }
}

#[tokio::test]
async fn a_light_barrier_reports_every_50_parts_and_the_rest_at_shutdown() {
    let s = Scenario::start("a-light-barrier").await;
    s.send("hmi", "order", Value::Text("P000214;L0100".into()), 0)
        .await;
    for i in 0..120 {
        // Every seventh part bounces on the way in: still one part.
        s.pulse("barrier", "impulse", 1000 + i * 1000, i % 7 == 0)
            .await;
    }
    let today = s.today(0);
    let got = s.finish().await;
    let expected: Vec<(String, Json)> = [50, 50, 20]
        .iter()
        .map(|q| {
            (
                "ProdProductionOrderReportFinished".to_string(),
                json!({"ProductionOrderNumber":"P000214","ReportFinishedLines":[{"ItemNumber":"L0100","ReportedGoodQuantity":q,"ReportAsFinishedDate":today}]}),
            )
        })
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn b_order_running_coil_starts_and_ends_the_order() {
    let s = Scenario::start("b-order-running-coil").await;
    s.send("hmi", "order", Value::Text("P000215".into()), 0)
        .await;
    s.send("plc", "order_running", Value::Bool(true), 1000)
        .await;
    s.send("plc", "order_running", Value::Bool(true), 2000)
        .await;
    s.send("plc", "order_running", Value::Bool(false), 3_600_000)
        .await;
    let (today, end) = (
        s.today(1000),
        s.at(3_600_000).strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    );
    assert_eq!(
        s.finish().await,
        vec![
            (
                "ProdProductionOrderStart".into(),
                json!({"ProductionOrderNumber":"P000215","StartedDate":today,"AutomaticBOMConsumptionRule":"FlushingPrincip"})
            ),
            (
                "ProdProductionOrderEnd".into(),
                json!({"ProductionOrderNumber":"P000215","ExecutedDateTime":end,"AutoReportAsFinished":"No"})
            ),
        ]
    );
}

#[tokio::test]
async fn c_scrap_button_reports_each_press_with_its_cause() {
    let s = Scenario::start("c-scrap-button").await;
    s.send("hmi", "order", Value::Text("P000216;L0100".into()), 0)
        .await;
    for i in 0..3 {
        s.pulse("panel", "scrap_button", 1000 + i * 5000, true)
            .await;
    }
    let today = s.today(0);
    let one = json!({"ProductionOrderNumber":"P000216","ReportFinishedLines":[{"ItemNumber":"L0100","ReportedErrorQuantity":1,"ErrorCause":"Machine","ReportAsFinishedDate":today}]});
    assert_eq!(
        s.finish().await,
        vec![("ProdProductionOrderReportFinished".to_string(), one); 3]
    );
}

#[tokio::test]
async fn d_machine_hours_register_reports_the_hours_it_grew_across_a_wrap() {
    let s = Scenario::start("d-machine-hours").await;
    s.send("hmi", "operation", Value::Text("P000217;10".into()), 0)
        .await;
    // The first reading sets the base; then +5, +4 across the 16-bit wrap, +7.
    for (i, v) in [65530.0, 65535.0, 3.0, 10.0].into_iter().enumerate() {
        s.send(
            "plc",
            "machine_hours",
            Value::Number(v),
            1000 + i as i64 * 36_000,
        )
        .await;
    }
    let today = s.today(0);
    assert_eq!(
        s.finish().await,
        vec![(
            "ProdProductionOrderRouteCard".into(),
            json!({"ProductionOrderNumber":"P000217","RouteCardLines":[{"OperationNumber":10,"Hours":0.16,"ConsumptionDate":today}]})
        )]
    );
}

#[tokio::test]
async fn e_barcode_scan_sets_the_order_and_starts_it() {
    let s = Scenario::start("e-barcode-order").await;
    s.send("scanner", "line", Value::Text("garbage".into()), 0)
        .await;
    s.send("scanner", "line", Value::Text("P000218".into()), 1000)
        .await;
    let today = s.today(1000);
    assert_eq!(
        s.finish().await,
        vec![(
            "ProdProductionOrderStart".into(),
            json!({"ProductionOrderNumber":"P000218","StartedDate":today})
        )]
    );
}

#[tokio::test]
async fn f_scale_weighings_become_material_consumption() {
    let s = Scenario::start("f-scale-consumption").await;
    s.send("hmi", "order", Value::Text("P000219".into()), 0)
        .await;
    s.send(
        "scale",
        "weighing",
        Value::Json(json!({"net": 12.5, "unit": "kg", "material": "M0001"})),
        1000,
    )
    .await;
    s.send(
        "scale",
        "weighing",
        Value::Json(json!({"net": 0, "unit": "kg", "material": "M0001"})),
        2000,
    )
    .await;
    s.send(
        "scale",
        "weighing",
        Value::Json(json!({"net": 0.8, "unit": "kg", "material": "M0002"})),
        3000,
    )
    .await;
    let today = s.today(0);
    let line = |item: &str, q: f64| {
        (
            "ProdProductionOrderPickingList".to_string(),
            json!({"ProductionOrderNumber":"P000219","PickingListLines":[{"ItemNumber":item,"ConsumptionBOMQuantity":q,"BOMUnitSymbol":"kg","ConsumptionDate":today}]}),
        )
    };
    assert_eq!(
        s.finish().await,
        vec![line("M0001", 12.5), line("M0002", 0.8)]
    );
}

#[tokio::test]
async fn g_a_release_from_d365_runs_on_line1_goes_to_the_hmi_and_impulses_report_against_it() {
    let s = Scenario::start("g-d365-order-events").await;
    let released = json!({
        "BusinessEventId": "ProductionOrderReleasedBusinessEvent",
        "EventId": "E-1",
        "EventTime": "/Date(1764240678000)/",
        "ProductionOrderNumber": "P000555",
        "ItemNumber": "A0007"
    });
    s.send("d365", "released", Value::Json(released), 0).await;
    for n in 0..10 {
        s.send("plant", "plant/line1/count", Value::Number(1.0), 1000 + n)
            .await;
    }
    // Ended: off the list, the line is free (nothing counted is left to report).
    let ended = json!({
        "BusinessEventId": "ProductionOrderStatusChangedBusinessEvent",
        "EventId": "E-2",
        "ProductionOrderNumber": "P000555",
        "ProductionOrderStatus": "Ended"
    });
    s.send("d365", "status_changed", Value::Json(ended), 2000)
        .await;
    let outbox = s.outbox.clone();
    let today = s.today(0);
    let received = s.finish().await;
    assert_eq!(
        received,
        vec![
            (
                "ProdProductionOrderStart".into(),
                json!({"ProductionOrderNumber":"P000555","StartedDate":today})
            ),
            (
                "ProdProductionOrderReportFinished".into(),
                json!({"ProductionOrderNumber":"P000555","ReportFinishedLines":[{"ItemNumber":"A0007","ReportedGoodQuantity":10,"ReportAsFinishedDate":today}]})
            ),
        ]
    );
    // The HMI's message waits for the broker in the outbox (no publisher runs here).
    let published = outbox
        .store()
        .publications()
        .pending("plant", None, 10)
        .await
        .unwrap();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].1.topic, "hmi/line1/order");
    assert!(published[0].1.retain);
    let hmi: Json = serde_json::from_str(&published[0].1.payload).unwrap();
    assert_eq!(hmi["order"], "P000555");
    assert_eq!(hmi["item"], "A0007");
    let state = mes_gateway::pipeline::load_engine_state(&outbox);
    assert!(state.released.is_empty(), "withdrawn when it ended");
    assert!(state.contexts.is_empty(), "line1 is free");
}

#[tokio::test]
async fn h_an_s7_line_over_opcua_starts_counts_by_delta_and_ends_the_order() {
    let s = Scenario::start("h-opcua-s7-line").await;
    s.send("plc", "order", Value::Text("P000801".into()), 0)
        .await;
    s.send("plc", "order_running", Value::Bool(true), 1000)
        .await;
    // The first reading is the base; then +30, +30 (a reconnect reading the same value
    // again adds nothing).
    for (i, v) in [1000.0, 1030.0, 1030.0, 1060.0].into_iter().enumerate() {
        s.send(
            "plc",
            "good_count",
            Value::Number(v),
            2000 + i as i64 * 1000,
        )
        .await;
    }
    s.send("plc", "order_running", Value::Bool(false), 3_600_000)
        .await;
    let (today, end) = (
        s.today(1000),
        s.at(3_600_000).strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    );
    let sent = s.finish().await;
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(
        sent[0],
        (
            "ProdProductionOrderStart".into(),
            json!({"ProductionOrderNumber":"P000801","StartedDate":today})
        )
    );
    assert_eq!(sent[1].0, "ProdProductionOrderReportFinished");
    assert_eq!(
        sent[1].1["ReportFinishedLines"][0]["ReportedGoodQuantity"], 60,
        "{sent:?}"
    );
    assert_eq!(
        sent[2],
        (
            "ProdProductionOrderEnd".into(),
            json!({"ProductionOrderNumber":"P000801","ExecutedDateTime":end})
        )
    );
}

/// The finding that made rules all-or-nothing: a "released" event without `ItemNumber`
/// cannot set line1's context (its item is missing), so nothing of the rule happens — no
/// Start for an order the line does not run, no stale order on the HMI's topic, nothing
/// listed.
#[tokio::test]
async fn g_a_release_without_an_item_does_nothing_at_all() {
    let s = Scenario::start("g-d365-order-events").await;
    let released = json!({
        "BusinessEventId": "ProductionOrderReleasedBusinessEvent",
        "EventId": "E-1",
        "ProductionOrderNumber": "P000556"
    });
    s.send("d365", "released", Value::Json(released), 0).await;
    let outbox = s.outbox.clone();
    let received = s.finish().await;
    assert!(received.is_empty(), "no message: {received:?}");
    assert!(outbox
        .store()
        .publications()
        .pending("plant", None, 10)
        .await
        .unwrap()
        .is_empty());
    let state = mes_gateway::pipeline::load_engine_state(&outbox);
    assert!(state.released.is_empty(), "{:?}", state.released);
    assert!(state.contexts.is_empty(), "{:?}", state.contexts);
}
