//! Engine tests: matchers, edges, counting, aggregation, context, templates, compile
//! errors, and property tests for debounce and counting.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;

use super::config::RawRule;
use super::*;
use crate::config::document::Document;
use crate::source::simulator::config::{SimulatorConfig, SimulatorMode};
use crate::source::SourceConfig;

fn sim(id: &str, point: &str) -> SourceConfig {
    SourceConfig::Simulator(SimulatorConfig {
        id: id.into(),
        interval: Duration::from_secs(1),
        point: point.into(),
        limit: None,
        mode: SimulatorMode::Impulse,
    })
}

fn sources() -> Vec<SourceConfig> {
    vec![
        sim("hmi", "order"),
        sim("barrier", "impulse"),
        sim("plc", "counter"),
        sim("scale", "weight"),
    ]
}

fn compile(yaml: &str) -> Result<Vec<Rule>, Vec<RuleError>> {
    compile_for(yaml, &sources())
}

fn compile_for(yaml: &str, sources: &[SourceConfig]) -> Result<Vec<Rule>, Vec<RuleError>> {
    let raws: Vec<RawRule> = Document::parse(yaml.to_string())
        .unwrap()
        .parse_at("")
        .unwrap_or_else(|e| panic!("{}: {}", e.path, e.message));
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for raw in raws {
        match Rule::compile(raw, "test".into(), sources, &[]) {
            Ok(r) => out.push(r),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn engine(yaml: &str) -> Engine {
    Engine::new(
        compile(yaml).unwrap(),
        jiff::tz::TimeZone::UTC,
        EngineState::default(),
    )
}

fn t(ms: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_millisecond(1_700_000_000_000 + ms).unwrap()
}

fn ev(source: &str, point: &str, value: Value, ms: i64) -> Event {
    Event {
        source: source.into(),
        point: point.into(),
        value,
        at: t(ms),
    }
}

fn content(b: &BuiltMessage) -> serde_json::Value {
    serde_json::from_str(&b.message.to_content(&Default::default()).unwrap()).unwrap()
}

const ORDER_RULE: &str = "
- name: order
  line: l1
  when: { source: hmi, point: order, pattern: '^(?P<order>P\\d+);(?P<item>\\w+)$' }
  set_context: { order: '{capture.order}', item: '{capture.item}' }
";

fn counting(aggregate: &str) -> String {
    format!(
        "{ORDER_RULE}
- name: parts
  line: l1
  when: {{ source: barrier, point: impulse, edge: rising }}
  count: impulse
  {aggregate}
  emit:
    type: ProdProductionOrderReportFinished
    fields: {{ ItemNumber: '{{context.item}}', ReportedGoodQuantity: '{{quantity}}' }}
"
    )
}

fn pulses(e: &mut Engine, n: usize, start_ms: i64) -> Vec<BuiltMessage> {
    let mut out = Vec::new();
    for i in 0..n as i64 {
        out.extend(e.process(&ev(
            "barrier",
            "impulse",
            Value::Bool(true),
            start_ms + i * 10,
        )));
        out.extend(e.process(&ev(
            "barrier",
            "impulse",
            Value::Bool(false),
            start_ms + i * 10 + 5,
        )));
    }
    out
}

fn quantities(built: &[BuiltMessage]) -> Vec<f64> {
    built
        .iter()
        .map(|b| {
            content(b)["ReportFinishedLines"][0]["ReportedGoodQuantity"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn no_order_no_message_events_are_unassigned() {
    let mut e = engine(&counting(""));
    assert!(pulses(&mut e, 3, 0).is_empty());
    assert_eq!(e.stats.unassigned.load(Ordering::Relaxed), 3);
    e.process(&ev("hmi", "order", Value::Text("P7;A1".into()), 100));
    let built = pulses(&mut e, 2, 200);
    assert_eq!(quantities(&built), vec![1.0, 1.0]);
    assert_eq!(content(&built[0])["ProductionOrderNumber"], "P7");
    assert_eq!(
        content(&built[0])["ReportFinishedLines"][0]["ItemNumber"],
        "A1"
    );
}

#[test]
fn aggregates_flush_on_count_interval_order_change_and_shutdown() {
    let mut e = engine(&counting("aggregate: { every: 50, interval: 60s }"));
    e.process(&ev("hmi", "order", Value::Text("P1;A".into()), 0));
    assert_eq!(quantities(&pulses(&mut e, 120, 1000)), vec![50.0, 50.0]);
    // 20 pieces are open since 1000 + 100 * 10 ms.
    let opened = t(1000 + 100 * 10);
    assert_eq!(e.next_deadline(), Some(opened + Duration::from_secs(60)));
    assert!(e.tick(opened + Duration::from_secs(59)).is_empty());
    assert_eq!(
        quantities(&e.tick(opened + Duration::from_secs(60))),
        vec![20.0]
    );

    pulses(&mut e, 7, 200_000);
    let changed = e.process(&ev("hmi", "order", Value::Text("P2;A".into()), 300_000));
    assert_eq!(quantities(&changed), vec![7.0]);
    assert_eq!(
        content(&changed[0])["ProductionOrderNumber"],
        "P1",
        "the old order gets its pieces"
    );
    pulses(&mut e, 3, 400_000);
    let rest = e.flush_all(t(500_000));
    assert_eq!(quantities(&rest), vec![3.0]);
    assert_eq!(content(&rest[0])["ProductionOrderNumber"], "P2");
    assert!(e.flush_all(t(500_001)).is_empty());
}

#[test]
fn accumulators_survive_a_restart_through_the_saved_state() {
    let yaml = counting("aggregate: { every: 10 }");
    let mut e = engine(&yaml);
    e.process(&ev("hmi", "order", Value::Text("P1;A".into()), 0));
    pulses(&mut e, 7, 1000);
    let saved = serde_json::to_vec(e.take_dirty_state().unwrap()).unwrap();
    let mut restarted = Engine::new(
        compile(&yaml).unwrap(),
        jiff::tz::TimeZone::UTC,
        serde_json::from_slice(&saved).unwrap(),
    );
    assert_eq!(quantities(&pulses(&mut restarted, 3, 5000)), vec![10.0]);
}

#[test]
fn counter_registers_count_deltas_across_wrap_and_reset() {
    let mut e = engine(&format!(
        "{ORDER_RULE}
- name: count
  line: l1
  when: {{ source: plc, point: counter }}
  count: delta
  counter_max: 65535
  emit:
    type: ProdProductionOrderReportFinished
    fields: {{ ReportedGoodQuantity: '{{quantity}}' }}
"
    ));
    e.process(&ev("hmi", "order", Value::Text("P1;A".into()), 0));
    let mut q = Vec::new();
    for (i, v) in [65530.0, 65535.0, 65535.0, 4.0, 2.0].iter().enumerate() {
        q.extend(quantities(&e.process(&ev(
            "plc",
            "counter",
            Value::Number(*v),
            100 + i as i64,
        ))));
    }
    // Base, +5, nothing, +5 across the wrap, then a reset to 2 (2 counted since).
    assert_eq!(q, vec![5.0, 5.0, 2.0]);
}

#[test]
fn nan_and_infinity_as_text_are_not_counted_and_do_not_poison_the_counter() {
    let mut e = engine(&format!(
        "{ORDER_RULE}
- name: count
  line: l1
  when: {{ source: plc, point: counter }}
  count: delta
  emit:
    type: ProdProductionOrderReportFinished
    fields: {{ ReportedGoodQuantity: '{{quantity}}' }}
"
    ));
    e.process(&ev("hmi", "order", Value::Text("P1;A".into()), 0));
    let mut q = Vec::new();
    let readings = ["100", "nan", "inf", "103", "-infinity", "104"];
    for (i, v) in readings.iter().enumerate() {
        q.extend(quantities(&e.process(&ev(
            "plc",
            "counter",
            Value::Text((*v).into()),
            100 + i as i64,
        ))));
    }
    assert_eq!(q, vec![3.0, 1.0], "only the finite readings count");
    let state = e.take_dirty_state().expect("state changed");
    let saved = serde_json::to_string(state).unwrap();
    assert!(
        !saved.contains("null"),
        "the saved state stays readable: {saved}"
    );
}

#[test]
fn json_fields_conditions_and_value_counting() {
    let mut e = engine(&format!(
        "{ORDER_RULE}
- name: weigh
  line: l1
  when: {{ source: scale, point: weight, field: w.net, above: 1 }}
  count: value
  emit:
    type: ProdProductionOrderPickingList
    fields: {{ ItemNumber: '{{payload.material}}', ConsumptionBOMQuantity: '{{quantity}}' }}
"
    ));
    e.process(&ev("hmi", "order", Value::Text("P1;A".into()), 0));
    let light = e.process(&ev(
        "scale",
        "weight",
        Value::Json(json!({"w": {"net": 0.5}, "material": "M1"})),
        1,
    ));
    assert!(light.is_empty(), "below the threshold");
    let not_json = e.process(&ev("scale", "weight", Value::Text("12.5 kg".into()), 2));
    assert!(not_json.is_empty());
    let b = e.process(&ev(
        "scale",
        "weight",
        Value::Json(json!({"w": {"net": 12.5}, "material": "M1"})),
        3,
    ));
    assert_eq!(
        content(&b[0])["PickingListLines"][0],
        json!({"ItemNumber": "M1", "ConsumptionBOMQuantity": 12.5})
    );
}

#[test]
fn equals_and_changed_conditions() {
    let mut e = engine(
        "
- name: start
  line: l1
  when: { source: hmi, point: order, changed: true }
  emit: { type: ProdProductionOrderStart, fields: { ProductionOrderNumber: '{value}' } }
- name: stop
  line: l1
  when: { source: barrier, point: impulse, equals: 3 }
  emit: { type: ProdProductionOrderEnd, fields: { ProductionOrderNumber: P9 } }
",
    );
    let orders: Vec<usize> = ["P1", "P1", "P2", "P2", "P1"]
        .iter()
        .enumerate()
        .map(|(i, o)| {
            e.process(&ev("hmi", "order", Value::Text((*o).into()), i as i64))
                .len()
        })
        .collect();
    assert_eq!(
        orders,
        vec![0, 0, 1, 0, 1],
        "first value is the baseline; then only changes"
    );
    assert!(e
        .process(&ev("barrier", "impulse", Value::Number(2.0), 10))
        .is_empty());
    assert_eq!(
        e.process(&ev("barrier", "impulse", Value::Text("3".into()), 11))
            .len(),
        1
    );
}

#[test]
fn one_event_several_rules_in_configuration_order() {
    let mut e = engine(
        "
- name: set
  line: l1
  when: { source: hmi, point: order }
  set_context: { order: '{value}' }
  emit: { type: ProdProductionOrderStart }
- name: also
  line: l1
  when: { source: hmi, point: order }
  emit: { type: ProdProductionOrderEnd }
",
    );
    let built = e.process(&ev("hmi", "order", Value::Text("P5".into()), 0));
    let types: Vec<&str> = built.iter().map(|b| b.message.message_type()).collect();
    assert_eq!(
        types,
        vec!["ProdProductionOrderStart", "ProdProductionOrderEnd"]
    );
    assert!(
        built.iter().all(|b| b.message.production_order() == "P5"),
        "context set before the emits"
    );
}

#[test]
fn clear_context_flushes_and_then_events_are_unassigned() {
    let mut e = engine(&format!(
        "{}
- name: end
  line: l1
  when: {{ source: hmi, point: order, equals: END }}
  clear_context: true
",
        counting("aggregate: { every: 100 }")
    ));
    e.process(&ev("hmi", "order", Value::Text("P1;A".into()), 0));
    pulses(&mut e, 4, 100);
    assert_eq!(
        quantities(&e.process(&ev("hmi", "order", Value::Text("END".into()), 1000))),
        vec![4.0]
    );
    assert!(pulses(&mut e, 1, 2000).is_empty());
    assert_eq!(e.stats.unassigned.load(Ordering::Relaxed), 1);
}

#[test]
fn compile_errors_name_the_field() {
    let errs = compile(
        "
- name: bad
  line: '{capture.nope}'
  when: { source: ghost, pattern: '(unclosed' }
  quantity: 2
  emit:
    type: ProdProductionOrderReportFinished
    fields: { ReportedGoodQty: 1, ItemNumber: '{context.itm}' }
- name: bad2
  line: l1
  when: { source: barrier, point: nope }
  count: impulse
  emit: { type: ProdProductionOrderStart }
",
    )
    .unwrap_err();
    let text: Vec<String> = errs.iter().map(|(p, m)| format!("{p}: {m}")).collect();
    let has = |needle: &str| {
        assert!(
            text.iter().any(|t| t.contains(needle)),
            "no {needle:?} in {text:#?}"
        )
    };
    has("when.source: unknown source `ghost`");
    has("when.pattern: invalid regular expression");
    has("quantity: quantity needs `count`");
    has("emit.fields.ReportedGoodQty: `ReportedGoodQty` is not a field of ProdProductionOrderReportFinished");
    has("emit.fields.ItemNumber: unknown context field `itm`");
    has("line: `{capture.nope}`: no such capture");
    has("when.point: source `barrier` has no point `nope`");
    has("emit.fields: the rule counts, but no field uses `{quantity}`");
}

proptest! {
    /// Any number of pulses, each longer than the debounce, with any bounce (toggles
    /// shorter than the debounce) on either edge, and timer ticks at any moments:
    /// exactly one count per pulse.
    #[test]
    fn debounce_counts_each_real_pulse_once(
        pulses in prop::collection::vec((0u8..4, 0u8..4, 25i64..200, 25i64..200), 1..30),
        tick_every in prop::option::of(1i64..100),
    ) {
        let debounce = 20;
        let mut e = engine(&format!(
            "- name: p\n  line: l1\n  when: {{ source: barrier, point: impulse, edge: rising, debounce: {debounce}ms }}\n  emit: {{ type: ProdProductionOrderStart, fields: {{ ProductionOrderNumber: P1 }} }}\n"
        ));
        let real_pulses = pulses.len();
        let mut events: Vec<(i64, bool)> = Vec::new();
        let mut now = 0i64;
        for (bounce_up, bounce_down, high, low) in pulses {
            // Rising edge with `bounce_up` extra toggles, 1 ms apart (all within 20 ms).
            for k in 0..bounce_up { events.push((now + i64::from(k) * 2, true)); events.push((now + i64::from(k) * 2 + 1, false)); }
            now += i64::from(bounce_up) * 2;
            events.push((now, true));
            now += high;
            for k in 0..bounce_down { events.push((now + i64::from(k) * 2, false)); events.push((now + i64::from(k) * 2 + 1, true)); }
            now += i64::from(bounce_down) * 2;
            events.push((now, false));
            now += low;
        }
        let mut count = 0;
        let mut next_tick = tick_every;
        for (at, level) in &events {
            if let (Some(every), Some(tk)) = (tick_every, next_tick) {
                let mut tk = tk;
                while tk < *at { count += e.tick(t(tk)).len(); tk += every; }
                next_tick = Some(tk);
            }
            count += e.process(&ev("barrier", "impulse", Value::Bool(*level), *at)).len();
        }
        count += e.tick(t(now + 1000)).len();
        prop_assert_eq!(expected_pulses(&events, debounce), real_pulses, "the generator makes bounces shorter than the debounce");
        prop_assert_eq!(count, real_pulses);
    }

    /// Impulses counted in aggregates that flush on count, with restarts (state saved and
    /// reloaded) at any points: the reported total equals the number of impulses.
    #[test]
    fn counting_loses_and_doubles_nothing_across_restarts(
        n in 1usize..300,
        every in 1u32..60,
        restarts in prop::collection::vec(0usize..300, 0..5),
    ) {
        let yaml = counting(&format!("aggregate: {{ every: {every} }}"));
        let mut e = engine(&yaml);
        let mut total = 0.0;
        total += quantities(&e.process(&ev("hmi", "order", Value::Text("P1;A".into()), 0))).iter().sum::<f64>();
        for i in 0..n {
            if restarts.contains(&i) {
                let saved = serde_json::to_vec(e.state()).unwrap();
                e = Engine::new(compile(&yaml).unwrap(), jiff::tz::TimeZone::UTC, serde_json::from_slice(&saved).unwrap());
            }
            total += quantities(&pulses(&mut e, 1, 1000 + i as i64 * 10)).iter().sum::<f64>();
        }
        total += quantities(&e.flush_all(t(1_000_000))).iter().sum::<f64>();
        prop_assert_eq!(total, n as f64);
    }
}

/// The number of rising edges of the signal once every level shorter than `debounce`
/// is removed: the count a perfect debouncer gives.
fn expected_pulses(events: &[(i64, bool)], debounce: i64) -> usize {
    let mut stable = false;
    let mut count = 0;
    for (i, (at, level)) in events.iter().enumerate() {
        let until = events.get(i + 1).map_or(i64::MAX, |(next, _)| *next);
        if until - at >= debounce && *level != stable {
            if *level {
                count += 1;
            }
            stable = *level;
        }
    }
    count
}

#[test]
fn events_no_rule_takes_are_counted() {
    let mut e = engine(&counting(""));
    e.process(&ev("scale", "weight", Value::Number(1.0), 0));
    e.process(&ev("scale", "weight", Value::Number(2.0), 1));
    e.process(&ev("hmi", "order", Value::Text("P1;A".into()), 2));
    assert_eq!(e.stats.unmatched.load(Ordering::Relaxed), 2);
}

fn with_broker(mut sources: Vec<SourceConfig>) -> Vec<SourceConfig> {
    sources.push(SourceConfig::Mqtt(
        crate::source::mqtt::config::MqttConfig {
            id: "broker".into(),
            broker: crate::mqtt::Broker {
                host: "127.0.0.1".into(),
                port: 1883,
                tls: false,
                username: None,
                password: None,
                tls_files: Default::default(),
                keep_alive: Duration::from_secs(30),
            },
            client_id: "gw".into(),
            payload: Default::default(),
            subscriptions: Vec::new(),
        },
    ));
    sources
}

fn compile_with_broker(yaml: &str) -> Result<Vec<Rule>, Vec<RuleError>> {
    compile_for(yaml, &with_broker(sources()))
}

const RELEASE_RULES: &str = r#"
- name: released
  line: "{payload.line}"
  when: { source: hmi, point: order }
  release: { order: "{payload.order}", item: "{payload.item}" }
  set_context: { order: "{payload.order}", item: "{payload.item}" }
  publish:
    via: broker
    topic: "hmi/{line}/order"
    payload: { order: "{context.order}", item: "{context.item}", qty: 5, event: "{payload}" }
    retain: true
- name: ended
  line: "{payload.line}"
  when: { source: scale, point: weight }
  withdraw: "{payload.order}"
  publish: { via: broker, topic: "hmi/{line}/ended", payload: "order {payload.order} ended" }
"#;

#[test]
fn released_orders_are_listed_per_line_and_withdrawn_and_publications_are_built_in_order() {
    let mut e = Engine::new(
        compile_with_broker(RELEASE_RULES).unwrap(),
        jiff::tz::TimeZone::UTC,
        EngineState::default(),
    );
    let release = |order: &str, line: &str| {
        Value::Json(json!({ "order": order, "item": "A7", "line": line }))
    };
    e.process(&ev("hmi", "order", release("P1", "line1"), 0));
    e.process(&ev("hmi", "order", release("P2", "line1"), 1));
    e.process(&ev("hmi", "order", release("P3", "line2"), 2));
    // A second release of the same order moves it to the end, never twice.
    e.process(&ev("hmi", "order", release("P1", "line1"), 3));
    let listed = |e: &Engine, line: &str| -> Vec<String> {
        e.state()
            .released
            .get(line)
            .map_or(Vec::new(), |l| l.iter().map(|o| o.order.clone()).collect())
    };
    assert_eq!(listed(&e, "line1"), ["P2", "P1"]);
    assert_eq!(listed(&e, "line2"), ["P3"]);
    assert_eq!(e.state().released["line1"][0].item.as_deref(), Some("A7"));
    e.process(&ev("scale", "weight", release("P2", "line1"), 4));
    assert_eq!(listed(&e, "line1"), ["P1"]);
    e.process(&ev("scale", "weight", release("P3", "line2"), 5));
    assert!(
        !e.state().released.contains_key("line2"),
        "an empty list goes"
    );

    let published = e.take_publications();
    assert!(e.take_publications().is_empty(), "taken once");
    let topics: Vec<&str> = published.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "hmi/line1/order",
            "hmi/line1/order",
            "hmi/line2/order",
            "hmi/line1/order",
            "hmi/line1/ended",
            "hmi/line2/ended"
        ]
    );
    let first: serde_json::Value = serde_json::from_str(&published[0].payload).unwrap();
    assert_eq!(
        first,
        json!({ "order": "P1", "item": "A7", "qty": 5, "event": { "order": "P1", "item": "A7", "line": "line1" } }),
        "the context the same rule just set, constants keep their type"
    );
    assert!(published[0].retain);
    assert_eq!(published[4].payload, "order P2 ended");
    assert!(!published[4].retain);
    assert_eq!(published[4].via, "broker");
}

#[test]
fn publish_and_release_mistakes_are_config_errors() {
    let errors = compile_with_broker(
        r#"
- name: a
  when: { source: hmi, point: order }
  publish: { via: barrier, topic: "x/+/y", payload: "p" }
- name: b
  when: { source: hmi, point: order }
  publish: { via: nowhere, topic: "x", payload: { a: "{nope}" } }
- name: c
  when: { source: hmi, point: order }
  release: { order: "{payload.order}" }
"#,
    )
    .unwrap_err();
    let text: Vec<String> = errors.iter().map(|(p, m)| format!("{p}: {m}")).collect();
    let has = |needle: &str| text.iter().any(|t| t.contains(needle));
    assert!(
        has("publish.via: source `barrier` is not an MQTT source"),
        "{text:#?}"
    );
    assert!(
        has("publish.topic: a topic to publish to has no wildcards"),
        "{text:#?}"
    );
    assert!(has("publish.via: unknown source `nowhere`"), "{text:#?}");
    assert!(has("publish.payload.a"), "{text:#?}");
    assert!(
        has("line: this rule uses a line's order context"),
        "{text:#?}"
    );
}

#[test]
fn a_publication_whose_template_has_nothing_is_a_build_error_not_a_message() {
    let mut e = Engine::new(
        compile_with_broker(
            r#"
- name: p
  when: { source: hmi, point: order }
  publish: { via: broker, topic: "hmi/{payload.line}", payload: "x" }
"#,
        )
        .unwrap(),
        jiff::tz::TimeZone::UTC,
        EngineState::default(),
    );
    e.process(&ev(
        "hmi",
        "order",
        Value::Json(json!({ "order": "P1" })),
        0,
    ));
    assert!(e.take_publications().is_empty());
    assert_eq!(e.stats.build_errors.load(Ordering::Relaxed), 1);
}

/// A rule with every action (context, release, publication, count, emit): when any one
/// part cannot be built, none of them runs — no context change, no release, no
/// publication, no count, no message — and the failure is counted.
const ALL_ACTIONS: &str = r#"
- name: all
  line: line1
  when: { source: hmi, point: order }
  set_context: { order: "{payload.order}", item: "{payload.item}" }
  release: { order: "{payload.order}", item: "{payload.release_item}" }
  publish: { via: broker, topic: "hmi/line1/{payload.topic}", payload: "x" }
  count: impulse
  emit:
    type: ProdProductionOrderReportFinished
    fields: { ItemNumber: "{payload.emit_item}", ReportedGoodQuantity: "{quantity}" }
"#;

fn all_actions() -> Engine {
    Engine::new(
        compile_with_broker(ALL_ACTIONS).unwrap(),
        jiff::tz::TimeZone::UTC,
        EngineState::default(),
    )
}

fn everything_but(missing: &str) -> Value {
    let mut fields = serde_json::Map::new();
    for (k, v) in [
        ("order", "P9"),
        ("item", "A9"),
        ("release_item", "A9"),
        ("topic", "order"),
        ("emit_item", "A9"),
    ] {
        if k != missing {
            fields.insert(k.into(), json!(v));
        }
    }
    Value::Json(serde_json::Value::Object(fields))
}

#[test]
fn a_rule_applies_all_its_actions_or_none() {
    // Everything there: every action runs.
    let mut e = all_actions();
    let built = e.process(&ev("hmi", "order", everything_but(""), 0));
    assert_eq!(built.len(), 1);
    assert_eq!(e.state().contexts["line1"].order, "P9");
    assert_eq!(e.state().released["line1"][0].order, "P9");
    assert_eq!(e.take_publications().len(), 1);
    assert_eq!(e.stats.build_errors.load(Ordering::Relaxed), 0);

    // One part missing at a time: set_context (item), release (its item), publish (its
    // topic), emit (its item). The others could be built; none runs.
    for missing in ["item", "release_item", "topic", "emit_item"] {
        let mut e = all_actions();
        let built = e.process(&ev("hmi", "order", everything_but(missing), 0));
        assert!(built.is_empty(), "{missing}: a message went out");
        assert!(
            e.state().contexts.is_empty(),
            "{missing}: the context changed"
        );
        assert!(
            e.state().released.is_empty(),
            "{missing}: the order was released"
        );
        assert!(
            e.take_publications().is_empty(),
            "{missing}: a publication went out"
        );
        assert_eq!(
            e.stats.build_errors.load(Ordering::Relaxed),
            1,
            "{missing}: counted"
        );
    }
}

#[test]
fn a_delta_rule_that_cannot_be_applied_keeps_its_counter_so_nothing_is_lost() {
    let mut e = engine(
        r#"
- name: order-with-item
  line: line1
  when: { source: hmi, point: order }
  set_context: { order: "{value}", item: A1 }
- name: order-without-item
  line: line1
  when: { source: scale, point: weight }
  set_context: { order: P1 }
- name: counted
  line: line1
  when: { source: plc, point: counter }
  count: delta
  emit:
    type: ProdProductionOrderReportFinished
    fields: { ItemNumber: "{context.item}", ReportedGoodQuantity: "{quantity}" }
"#,
    );
    e.process(&ev("hmi", "order", Value::Text("P1".into()), 0));
    // The base.
    assert!(e
        .process(&ev("plc", "counter", Value::Number(100.0), 1))
        .is_empty());
    // The context loses its item: +5 cannot be reported, and is not forgotten either.
    e.process(&ev("scale", "weight", Value::Number(1.0), 2));
    assert!(e
        .process(&ev("plc", "counter", Value::Number(105.0), 3))
        .is_empty());
    assert_eq!(e.stats.build_errors.load(Ordering::Relaxed), 1);
    // The item is back: the next reading reports all 8 since the base.
    e.process(&ev("hmi", "order", Value::Text("P1".into()), 4));
    let built = e.process(&ev("plc", "counter", Value::Number(108.0), 5));
    assert_eq!(built.len(), 1);
    assert_eq!(
        content(&built[0])["ReportFinishedLines"][0]["ReportedGoodQuantity"],
        8.0
    );
}

#[test]
fn an_event_used_elsewhere_is_not_counted_as_dropped_when_no_rule_takes_it() {
    let mut e = engine(
        r#"
- name: counted
  line: line1
  when: { source: barrier, point: impulse }
  count: impulse
  emit:
    type: ProdProductionOrderReportFinished
    fields: { ProductionOrderNumber: P1, ItemNumber: A1, ReportedGoodQuantity: "{quantity}" }
"#,
    );
    let verdict = ev("hmi", "order", Value::Text("processed".into()), 0);
    e.process_event(&verdict, true);
    assert_eq!(e.stats.unmatched.load(Ordering::Relaxed), 0);
    e.process(&verdict);
    assert_eq!(e.stats.unmatched.load(Ordering::Relaxed), 1);
}

/// With a thousand station rules looked up by topic, an event is taken by exactly the
/// rules that match it — by point, by topic filter (with its captures) and by neither —
/// in the order written; an event no rule matches is counted once as unmatched.
#[test]
fn rules_are_looked_up_by_source_point_and_topic_in_written_order() {
    let mut yaml = String::new();
    for i in 0..1000 {
        yaml.push_str(&format!(
            "- name: station-{i}\n  line: line{i}\n  when: {{ source: broker, topic: \"plant/station{i}/{{kind}}\" }}\n  emit: {{ type: ProdProductionOrderEnd }}\n"
        ));
    }
    yaml.push_str(concat!(
        "- name: any-station\n  line: all\n  when: { source: broker, topic: \"plant/+/good\" }\n  emit: { type: ProdProductionOrderEnd }\n",
        "- name: barrier\n  line: line7\n  when: { source: barrier, point: impulse }\n  emit: { type: ProdProductionOrderEnd }\n",
        "- name: everything-on-the-scale\n  line: scale\n  when: { source: scale }\n  emit: { type: ProdProductionOrderEnd }\n",
    ));
    let rules = compile_with_broker(&yaml).unwrap();
    let mut e = Engine::new(rules, jiff::tz::TimeZone::UTC, EngineState::default());
    for line in ["line7", "line999", "all", "scale"] {
        e.state.contexts.insert(
            line.into(),
            OrderContext {
                order: "P1".into(),
                ..OrderContext::default()
            },
        );
    }
    let fired = |e: &mut Engine, source: &str, point: &str| -> Vec<String> {
        e.process(&ev(source, point, Value::Number(1.0), 0))
            .into_iter()
            .map(|b| b.rule)
            .collect()
    };
    assert_eq!(
        fired(&mut e, "broker", "plant/station7/good"),
        ["station-7", "any-station"]
    );
    assert_eq!(
        fired(&mut e, "broker", "plant/station999/bad"),
        ["station-999"]
    );
    assert_eq!(fired(&mut e, "barrier", "impulse"), ["barrier"]);
    assert_eq!(
        fired(&mut e, "scale", "weight"),
        ["everything-on-the-scale"]
    );
    assert!(fired(&mut e, "broker", "plant/station1000/good/x").is_empty());
    assert!(fired(&mut e, "barrier", "other").is_empty());
    assert_eq!(e.stats.unmatched.load(Ordering::Relaxed), 2);
}
