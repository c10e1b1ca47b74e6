//! Big rule sets: the time `check` takes to load N generated station rules (each about ten
//! lines: an MQTT topic with a capture, one emit), and the ingest rate with them — events
//! through the rules engine into the outbox, 256 per commit as the pipeline does — when
//! none of the N rules concerns the events (one more rule does). Loading must grow
//! linearly with N, and ingest must not depend on N.
//!
//!     cargo bench --bench rules
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs small sizes only.

use std::time::Instant;

use mes_gateway::event::{Event, Value};
use mes_gateway::outbox::{Ingest, NewMessage, Outbox};
use mes_gateway::rules::state::EngineState;
use mes_gateway::rules::Engine;

fn write_config(dir: &std::path::Path, stations: usize) {
    std::fs::create_dir_all(dir.join("rules.d")).expect("rules.d");
    std::fs::write(
        dir.join("gateway.yaml"),
        "storage:\n  data_dir: data\nsources:\n  - type: mqtt\n    id: broker\n    url: mqtt://127.0.0.1:1883\n    subscriptions:\n      - topic: plant/#\n",
    )
    .expect("gateway.yaml");
    let mut rules = String::from("rules:\n");
    for i in 0..stations {
        rules.push_str(&format!(
            "  - name: station-{i}\n    line: station{i}\n    when:\n      source: broker\n      topic: plant/station{i}/{{kind}}\n    count: impulse\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields:\n        ReportedGoodQuantity: \"{{quantity}}\"\n"
        ));
    }
    // The rule the benchmark's events are for, written last: every other rule comes first.
    rules.push_str("  - name: line1\n    line: line1\n    when:\n      source: broker\n      topic: plant/line1/count\n    count: impulse\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields:\n        ReportedGoodQuantity: \"{quantity}\"\n");
    std::fs::write(dir.join("rules.d/generated.yaml"), rules).expect("rules");
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (sizes, events): (&[usize], u64) = if full {
        (&[0, 100, 1_000, 10_000], 100_000)
    } else {
        (&[0, 10], 300)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("rules  check (load)  ingest (engine + outbox, 256 per commit)");
    for &n in sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        write_config(dir.path(), n);
        let started = Instant::now();
        let config =
            mes_gateway::settings::load(dir.path()).expect("the generated rules are valid");
        let load = started.elapsed().as_secs_f64();
        assert_eq!(config.rules.len(), n + 1);
        let outbox = Outbox::open(&config.storage.data_dir).expect("outbox");
        let mut state = EngineState::default();
        state.contexts.insert(
            "line1".into(),
            mes_gateway::rules::state::OrderContext {
                order: "P000001".into(),
                item: Some("A0001".into()),
                ..Default::default()
            },
        );
        let mut engine = Engine::new(config.rules, config.time_zone.clone(), state);
        let field_names = mes_gateway::message::FieldNames::default();
        let started = Instant::now();
        let mut stored = 0usize;
        rt.block_on(async {
            let mut batch = Vec::new();
            for i in 0..events {
                let event = Event {
                    source: "broker".into(),
                    point: "plant/line1/count".into(),
                    value: Value::Number(1.0),
                    at: jiff::Timestamp::now(),
                };
                for built in engine.process(&event) {
                    batch.push(NewMessage {
                        production_order: built.message.production_order().to_string(),
                        message_type: built.message.message_type().to_string(),
                        content: built.message.to_content(&field_names).expect("content"),
                        origin: format!("rule {}", built.rule),
                        line: Some(built.line),
                    });
                }
                if (i + 1) % 256 == 0 || i + 1 == events {
                    stored += batch.len();
                    outbox
                        .commit(Ingest::of(std::mem::take(&mut batch)))
                        .await
                        .expect("commit");
                }
            }
        });
        let rate = events as f64 / started.elapsed().as_secs_f64();
        assert_eq!(stored as u64, events, "one message per impulse");
        println!("{n:>6}  {load:>10.3} s  {rate:>10.0} events/s");
    }
}
