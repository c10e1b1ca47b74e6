//! End-to-end burst benchmark: a real mosquitto on a loopback port, 50 publishers (one per
//! production order) publishing QoS 1 impulses at once, the release gateway binary (one
//! ReportFinished per impulse) and a fast fake D365 on loopback, all on this machine.
//!
//! Run: `cargo bench --bench burst` (needs mosquitto: `bash .ci/run` installs it).
//!
//! Prints, per scenario: end-to-end msg/s (first publish → last arrival at D365), lost,
//! duplicates, the gateway's CPU seconds and peak RSS. Durability is what the product
//! promises: every append, `sending` mark and outcome flushed before it counts.

#[path = "measure.rs"]
mod measure;
use mes_gateway_testkit as support;

use std::path::Path;
use std::time::{Duration, Instant};

use measure::rss_mib;
use support::mqtt::{
    burst_orders, count_burst, publish_burst, write_burst_config, Mosquitto, EXACT,
};
use support::process::{self, path_str, Output};
use support::FakeD365;

const ORDERS: usize = 50;

fn orders() -> Vec<String> {
    burst_orders()
}

fn config(dir: &Path, fake: &FakeD365, broker: &Mosquitto, api_port: u16) {
    write_burst_config(
        dir,
        fake,
        &broker.url(),
        &format!("api:\n  listen: 127.0.0.1:{api_port}\n"),
    );
}

async fn queued(api_port: u16) -> u64 {
    let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{api_port}/health")).await else {
        return 0;
    };
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    v["outbox"]["queued"].as_u64().unwrap_or(0)
}

/// The gateway's durable writes of one kind (`ingest` or `delivery`) from its /metrics:
/// how many, how many messages each on average, and their mean duration (a transaction
/// and its fsync: the disk's flush latency bounds the delivery).
async fn writes(api_port: u16, kind: &str) -> String {
    let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{api_port}/metrics")).await else {
        return format!("{kind} writes: no /metrics");
    };
    let text = resp.text().await.unwrap_or_default();
    let value = |name: &str| -> f64 {
        let prefix = format!("{name}{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let count = value("mes_gateway_outbox_write_seconds_count");
    let seconds = value("mes_gateway_outbox_write_seconds_sum");
    let messages = value("mes_gateway_outbox_written_messages_total");
    if count == 0.0 {
        return format!("no {kind} writes");
    }
    format!(
        "{count:.0} {kind} writes of {:.0} msgs, {:.2} ms each",
        messages / count,
        seconds * 1e3 / count
    )
}

struct Run {
    per_order: u32,
    answer_delay: Duration,
    d365_down: bool,
    broker_inflight: Option<u32>,
    /// Every message in a request of its own (`dispatcher.join.max_lines: 1`).
    not_joined: bool,
}

/// A durable mosquitto that lets `n` QoS 1 messages be in flight per client.
async fn broker_window(n: u32) -> Mosquitto {
    Mosquitto::start_with_extra(&format!(
        "{}max_inflight_messages {n}\n",
        support::mqtt::DURABLE
    ))
    .await
}

async fn scenario(name: &str, run: Run) {
    let broker = match run.broker_inflight {
        Some(n) => broker_window(n).await,
        None => Mosquitto::start_durable().await,
    };
    let fake = FakeD365::start().await;
    fake.delay_responses(run.answer_delay);
    let tmp = tempfile::tempdir().unwrap();
    let api_port = support::mqtt::free_port();
    config(tmp.path(), &fake, &broker, api_port);
    if run.not_joined {
        support::mqtt::join_at_most(tmp.path(), 1);
    }
    if run.d365_down {
        // Nothing listens there: every request is refused before a byte is sent.
        let dead = support::mqtt::free_port();
        let yaml = std::fs::read_to_string(tmp.path().join("gateway.yaml"))
            .unwrap()
            .replace(&fake.base_url(), &format!("http://127.0.0.1:{dead}"));
        std::fs::write(tmp.path().join("gateway.yaml"), yaml).unwrap();
    }
    let out = Output::new();
    // As shipped: INFO logs (DEBUG writes a line per message).
    let gw = process::start_logging(&["run", "-c", path_str(tmp.path())], &out, "info");
    out.wait_for("Subscribed.").await;
    let pid = gw.pid();
    let total = ORDERS * run.per_order as usize;
    let cpu0 = measure::cpu_seconds(pid);
    let harness0 = measure::cpu_seconds(std::process::id() as i32);
    let broker0 = measure::cpu_seconds(broker.pid());
    let started = Instant::now();
    publish_burst(broker.port, &orders(), 1, run.per_order).await;
    let published = started.elapsed();
    let publishing_ended = tokio::time::Instant::now();
    if run.d365_down {
        while queued(api_port).await < total as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        fake.wait_accepted_count(total).await;
    }
    let elapsed = started.elapsed();
    let cpu = measure::cpu_seconds(pid) - cpu0;
    // The rest of the machine's work: the publishers and the fake D365 (this process), the broker.
    let harness = measure::cpu_seconds(std::process::id() as i32) - harness0;
    let broker_cpu = measure::cpu_seconds(broker.pid()) - broker0;
    let (rss, peak) = rss_mib(pid);
    let ingest_writes = writes(api_port, "ingest").await;
    let delivery_writes = writes(api_port, "delivery").await;
    let exit = gw.terminate().await;
    let rate = total as f64 / elapsed.as_secs_f64();
    if run.d365_down {
        println!(
            "{name:<44} {total:>7} msgs  ingest {rate:>8.0} msg/s into the outbox (D365 down)  cpu {cpu:>5.1} s ({:.0} µs/msg)  rss {rss:>5.1} MiB peak {peak:>5.1} MiB  {ingest_writes}  exit {exit}",
            cpu * 1e6 / total as f64
        );
        return;
    }
    let count = count_burst(&fake, u64::from(run.per_order));
    let (lost, dups, disorder) = (count.lost, count.duplicates, count.out_of_order.len());
    assert_eq!(
        count, EXACT,
        "{name}: lost, duplicated or reordered impulses"
    );
    // The two phases: while the publishers flush, the broker, the publishers and the
    // gateway's ingest share the cores with the delivery; afterwards only the delivery runs.
    let while_publishing = fake
        .accepted()
        .iter()
        .filter(|r| r.at <= publishing_ended)
        .count();
    let phases = format!(
        "  delivered {} while publishing, then {:.0} msg/s",
        while_publishing,
        (total - while_publishing) as f64 / (elapsed - published).as_secs_f64()
    );
    let bound = if run.answer_delay.is_zero() {
        phases
    } else {
        let bound = 50.0 / run.answer_delay.as_secs_f64();
        format!(
            "  {:.0} % of the 50-in-flight bound ({bound:.0} msg/s)",
            rate / bound * 100.0
        )
    };
    println!(
        "{name:<44} {total:>7} msgs  e2e {rate:>8.0} msg/s (published in {:.2} s)  lost {lost} dup {dups} disorder {disorder}  cpu {cpu:>5.1} s ({:.0} µs/msg; publishers + fake D365 {:.0}, broker {:.0})  rss {rss:>5.1} MiB peak {peak:>5.1} MiB  {} connections  {ingest_writes}; {delivery_writes}{bound}",
        published.as_secs_f64(),
        cpu * 1e6 / total as f64,
        harness * 1e6 / total as f64,
        broker_cpu * 1e6 / total as f64,
        fake.connections()
    );
}

fn dir_mib(dir: &Path) -> f64 {
    let out = std::process::Command::new("du")
        .arg("-sk")
        .arg(dir)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|k| k.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// A week's outage: `per_order` × 50 ReportFinished messages already queued in the outbox
/// when the gateway starts. Prints the time to open the store, the drain rate with D365
/// back, the gateway's peak RSS, and the store's disk use before and after the drained
/// backlog is pruned (retention 1 s here) and compacted.
async fn backlog(name: &str, per_order: u32) {
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    write_burst_config(tmp.path(), &fake, &broker.url(), "");
    let main = tmp.path().join("gateway.yaml");
    let yaml = std::fs::read_to_string(&main).unwrap().replace(
        "storage:\n  data_dir: data\n",
        "storage:\n  data_dir: data\n  retention: 1s\n  prune_interval: 1s\n",
    );
    std::fs::write(&main, yaml).unwrap();
    let data = tmp.path().join("data");
    let total = ORDERS * per_order as usize;
    let filled = Instant::now();
    fill(&data, per_order).await;
    let fill_rate = total as f64 / filled.elapsed().as_secs_f64();
    let disk_full_backlog = dir_mib(&data.join("outbox"));

    let out = Output::new();
    let started = Instant::now();
    let gw = process::start_logging(&["run", "-c", path_str(tmp.path())], &out, "info");
    out.wait_for("Outbox open.").await;
    let open = started.elapsed();
    let pid = gw.pid();
    let (rss_open, _) = rss_mib(pid);
    let cpu0 = measure::cpu_seconds(pid);
    fake.wait_accepted_count(total).await;
    let drain = started.elapsed() - open;
    let cpu = measure::cpu_seconds(pid) - cpu0;
    let (_, peak) = rss_mib(pid);
    let count = count_burst(&fake, u64::from(per_order));
    assert_eq!(
        count, EXACT,
        "{name}: lost, duplicated or reordered messages"
    );
    let compacted = if disk_full_backlog > 64.0 {
        out.wait_for("Compacted the outbox").await;
        "compacted"
    } else {
        "too small to compact"
    };
    let disk_after = dir_mib(&data.join("outbox"));
    let exit = gw.terminate().await;
    println!(
        "{name:<44} {total:>7} msgs  queued at {fill_rate:.0} msg/s, {disk_full_backlog:.0} MiB on disk  open {:.2} s (rss {rss_open:.1} MiB)  drained at {:.0} msg/s  lost {} dup {} disorder {}  cpu {cpu:.1} s ({:.0} µs/msg)  rss peak {peak:.1} MiB  disk after the drain {disk_after:.1} MiB ({compacted})  exit {exit}",
        open.as_secs_f64(),
        total as f64 / drain.as_secs_f64(),
        count.lost,
        count.duplicates,
        count.out_of_order.len(),
        cpu * 1e6 / total as f64,
    );
}

/// Queues `per_order` ReportFinished messages for each of the 50 orders straight into the
/// outbox in `data` (the gateway not running), quantities 1, 2, … per order.
async fn fill(data: &Path, per_order: u32) {
    let outbox = mes_gateway::outbox::Outbox::open(data).unwrap();
    let orders = orders();
    let mut first = 1;
    while first <= per_order {
        let last = (first + 19).min(per_order);
        let batch = (first..=last)
            .flat_map(|q| {
                orders.iter().map(move |o| mes_gateway::outbox::NewMessage {
                    production_order: o.clone(),
                    message_type: "ProdProductionOrderReportFinished".into(),
                    content: support::report(o, q).to_string(),
                    origin: "bench".into(),
                    line: None,
                })
            })
            .collect();
        outbox
            .commit(mes_gateway::outbox::Ingest::of(batch))
            .await
            .unwrap();
        first = last + 1;
    }
}

/// A backlog queued during an outage, drained with D365 back behind a request budget
/// scaled down for the bench (`budget`; the fake enforces the same sliding window and
/// answers 429 past it): the requests used and the time to drain, with joining
/// (`max_lines` lines per request; 1 joins nothing). Without joining the drain takes
/// hours at any budget D365 allows, so `limit` stops it and the rest is projected at the
/// rate reached. Every line must arrive once, in order.
async fn budgeted(
    name: &str,
    per_order: u32,
    max_lines: u32,
    budget: (usize, Duration),
    limit: Option<Duration>,
) {
    let broker = Mosquitto::start_durable().await;
    let fake = FakeD365::start().await;
    fake.limit(budget.0, budget.1);
    let tmp = tempfile::tempdir().unwrap();
    write_burst_config(tmp.path(), &fake, &broker.url(), "");
    support::mqtt::join_at_most(tmp.path(), max_lines);
    let main = tmp.path().join("gateway.yaml");
    let yaml = std::fs::read_to_string(&main).unwrap().replace(
        "  request_budget: off\n",
        &format!("  request_budget: {}/{}s\n", budget.0, budget.1.as_secs()),
    );
    std::fs::write(&main, yaml).unwrap();
    let data = tmp.path().join("data");
    let total = ORDERS * per_order as usize;
    fill(&data, per_order).await;
    let out = Output::new();
    let gw = process::start_logging(&["run", "-c", path_str(tmp.path())], &out, "info");
    out.wait_for("Outbox open.").await;
    let pid = gw.pid();
    let cpu0 = measure::cpu_seconds(pid);
    let started = Instant::now();
    let drained = match limit {
        None => {
            fake.wait_accepted_count(total).await;
            true
        }
        Some(limit) => tokio::time::timeout(limit, fake.wait_accepted_count(total))
            .await
            .is_ok(),
    };
    let took = started.elapsed().as_secs_f64();
    let cpu = measure::cpu_seconds(pid) - cpu0;
    let exit = gw.terminate().await;
    let requests = fake.accepted().len();
    let messages = fake.accepted_messages();
    let throttled = fake
        .received()
        .iter()
        .filter(|r| r.status == Some(429))
        .count();
    let outcome = if drained {
        let count = count_burst(&fake, u64::from(per_order));
        assert_eq!(count, EXACT, "{name}: lost, duplicated or reordered lines");
        format!(
            "drained in {took:.1} s; lost {} dup {} disorder {}",
            count.lost,
            count.duplicates,
            count.out_of_order.len()
        )
    } else {
        // One message a request from here on, at the budget's rate.
        let per_second = budget.0 as f64 / budget.1.as_secs_f64();
        format!(
            "{messages} delivered in {took:.0} s: the whole backlog takes {:.0} s at the budget's {per_second:.0} requests/s",
            took + (total - messages.min(total)) as f64 / per_second
        )
    };
    println!(
        "{name:<44} {total:>7} msgs  {requests} requests ({:.1} msgs each), {throttled} answered 429  {outcome}  cpu {cpu:.1} s  exit {exit}",
        messages as f64 / requests.max(1) as f64,
    );
}

/// Publishes `rate` impulses a second for `secs` seconds on one QoS 1 connection, spread
/// over the burst orders (each order's quantities 1, 2, …), and returns when each was
/// published: `[order][quantity - 1]`. `on_tick(elapsed)` runs before every 10 ms tick.
async fn publish_steadily(
    port: u16,
    rate: u32,
    secs: u32,
    mut on_tick: impl FnMut(Duration),
) -> Vec<Vec<Instant>> {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let orders = orders();
    let mut options = MqttOptions::new("steady-publisher", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(options, 4096);
    let per_tick = (rate / 100).max(1) as usize;
    let ticks = secs * 100;
    let expected = per_tick * ticks as usize;
    // Until the broker has acknowledged every impulse: a publish only queues it here.
    let polling = tokio::spawn(async move {
        let mut acked = 0;
        while acked < expected {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("steady publisher: {e}"),
            }
        }
    });
    let mut published: Vec<Vec<Instant>> = vec![Vec::new(); orders.len()];
    let mut next_order = 0;
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(10));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..ticks {
        every.tick().await;
        on_tick(started.elapsed());
        for _ in 0..per_tick {
            let o = next_order % orders.len();
            next_order += 1;
            let quantity = published[o].len() + 1;
            published[o].push(Instant::now());
            client
                .publish(
                    format!("plant/{}/count", orders[o]),
                    QoS::AtLeastOnce,
                    false,
                    quantity.to_string(),
                )
                .await
                .unwrap();
        }
    }
    polling.await.expect("every impulse acknowledged");
    drop(client);
    published
}

/// Steady load: `rate` impulses a second over 50 orders for `secs` seconds, as a plant
/// produces, not a burst. Prints the gateway's CPU per impulse and the latency from each
/// impulse's publish to its line's arrival at D365 (p50, p99, p99.9). With `outage`
/// (from, length), D365 answers 503 for that while, and the time from its return until
/// everything published before it has arrived is printed as well.
async fn steady(name: &str, rate: u32, secs: u32, outage: Option<(Duration, Duration)>) {
    let broker = broker_window(1000).await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let api_port = support::mqtt::free_port();
    config(tmp.path(), &fake, &broker, api_port);
    let out = Output::new();
    let gw = process::start_logging(&["run", "-c", path_str(tmp.path())], &out, "info");
    out.wait_for("Subscribed.").await;
    let pid = gw.pid();
    let cpu0 = measure::cpu_seconds(pid);
    let mut back_at: Option<Instant> = None;
    let mut down = false;
    let published = {
        let fake = fake.clone();
        let back_at = &mut back_at;
        publish_steadily(broker.port, rate, secs, |elapsed| {
            let Some((from, length)) = outage else {
                return;
            };
            if !down && back_at.is_none() && elapsed >= from {
                fake.unavailable(true);
                down = true;
            } else if down && elapsed >= from + length {
                fake.unavailable(false);
                down = false;
                *back_at = Some(Instant::now());
            }
        })
        .await
    };
    let per_order = published[0].len() as u64;
    let total: usize = published.iter().map(Vec::len).sum();
    fake.wait_accepted_count(total).await;
    let cpu = measure::cpu_seconds(pid) - cpu0;
    let commits = format!(
        "{}; {}",
        writes(api_port, "ingest").await,
        writes(api_port, "delivery").await
    );
    let exit = gw.terminate().await;
    let count = count_burst(&fake, per_order);
    assert_eq!(
        count, EXACT,
        "{name}: lost, duplicated or reordered impulses"
    );
    // Each line's latency, and when the last line published before D365's return arrived.
    let orders = orders();
    let mut latencies: Vec<Duration> = Vec::with_capacity(total);
    let mut caught_up: Option<Instant> = None;
    for r in fake.accepted() {
        let Some(o) = orders.iter().position(|o| *o == r.order) else {
            continue;
        };
        let at = r.at.into_std();
        for line in r.lines("ReportFinishedLines") {
            let q = line["ReportedGoodQuantity"].as_u64().expect("a quantity") as usize;
            let sent = published[o][q - 1];
            latencies.push(at.saturating_duration_since(sent));
            if back_at.is_some_and(|b| sent < b) {
                caught_up = Some(caught_up.map_or(at, |c| c.max(at)));
            }
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e3
    };
    let recovery = match (back_at, caught_up) {
        (Some(b), Some(c)) => format!(
            "  backlog delivered {:.2} s after D365's return",
            c.saturating_duration_since(b).as_secs_f64()
        ),
        _ => String::new(),
    };
    println!(
        "{name:<44} {total:>7} msgs  {} requests  cpu {cpu:.1} s ({:.0} µs/msg)  latency p50 {:.1} ms p99 {:.1} ms p99.9 {:.1} ms{recovery}  {commits}  lost {} dup {} disorder {}  exit {exit}",
        fake.accepted().len(),
        cpu * 1e6 / total as f64,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        count.lost,
        count.duplicates,
        count.out_of_order.len(),
    );
}

/// A long D365 outage during a burst: the fake answers 503 while the first half arrives,
/// then refuses connections while the second half arrives; then it comes back. Prints
/// the gateway's RSS at the end of the outage (everything queued) and its peak, and the
/// drain; every impulse must arrive once, in order.
async fn outage(name: &str, per_order: u32) {
    let broker = broker_window(1000).await;
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let api_port = support::mqtt::free_port();
    config(tmp.path(), &fake, &broker, api_port);
    support::mqtt::resend_when_ambiguous(tmp.path());
    let out = Output::new();
    let gw = process::start_logging(&["run", "-c", path_str(tmp.path())], &out, "info");
    out.wait_for("Subscribed.").await;
    let pid = gw.pid();
    let total = ORDERS * per_order as usize;
    let cpu0 = measure::cpu_seconds(pid);
    let started = Instant::now();
    fake.unavailable(true);
    publish_burst(broker.port, &orders(), 1, per_order / 2).await;
    fake.refuse_connections();
    fake.unavailable(false);
    publish_burst(broker.port, &orders(), per_order / 2 + 1, per_order).await;
    while queued(api_port).await < total as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outage = started.elapsed();
    let (rss_outage, _) = rss_mib(pid);
    let back = Instant::now();
    fake.accept_connections().await;
    fake.wait_accepted_count(total).await;
    let drain = back.elapsed();
    let cpu = measure::cpu_seconds(pid) - cpu0;
    let (_, peak) = rss_mib(pid);
    let exit = gw.terminate().await;
    let count = count_burst(&fake, u64::from(per_order));
    assert_eq!(
        count, EXACT,
        "{name}: lost, duplicated or reordered impulses"
    );
    println!(
        "{name:<44} {total:>7} msgs  all queued after {:.1} s of outage (rss {rss_outage:.1} MiB)  drained at {:.0} msg/s  lost {} dup {} disorder {}  cpu {cpu:.1} s ({:.0} µs/msg)  rss peak {peak:.1} MiB  exit {exit}",
        outage.as_secs_f64(),
        total as f64 / drain.as_secs_f64(),
        count.lost,
        count.duplicates,
        count.out_of_order.len(),
        cpu * 1e6 / total as f64,
    );
}

fn main() {
    // `cargo bench` passes --bench: the full figures. `cargo test --all-targets` runs the
    // same scenarios small, as a smoke test that still fails on a lost or doubled impulse.
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let size = |n: u32| if full { n } else { 4 };
    let run = |per_order: u32, delay_ms: u64, d365_down: bool, window: Option<u32>| Run {
        per_order: size(per_order),
        answer_delay: Duration::from_millis(delay_ms),
        d365_down,
        broker_inflight: window,
        not_joined: false,
    };
    let scenarios: Vec<(&str, Run)> = vec![
        (
            "20k, broker window 20 (mosquitto default)",
            run(400, 0, false, None),
        ),
        ("20k, broker window 1000", run(400, 0, false, Some(1000))),
        // One request per message, as before joining: the cost of a message sent alone.
        (
            "20k, broker window 1000, not joined",
            Run {
                not_joined: true,
                ..run(400, 0, false, Some(1000))
            },
        ),
        ("100k, broker window 1000", run(2000, 0, false, Some(1000))),
        // Twice and four times the 100k burst: RSS must stay where 100k left it (bounded,
        // not growing; 400k found the acks' list that grew with the burst).
        ("200k, broker window 1000", run(4000, 0, false, Some(1000))),
        ("400k, broker window 1000", run(8000, 0, false, Some(1000))),
        (
            "20k, D365 answers after 50 ms",
            run(400, 50, false, Some(1000)),
        ),
        ("20k, D365 down", run(400, 0, true, Some(1000))),
    ];
    println!(
        "mes-gateway burst benchmark{}: {} cores; 50 orders, QoS 1, one ReportFinished per impulse",
        if full {
            ""
        } else {
            " (smoke run: 4 impulses per order; `cargo bench --bench burst` for figures)"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (name, run) in scenarios {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        rt.block_on(scenario(name, run));
    }
    let name = "100k during a D365 outage (503, then refused)";
    if only.as_deref().is_none_or(|o| name.contains(o)) {
        rt.block_on(outage(name, size(2000)));
    }
    let seconds = if full { 20 } else { 1 };
    for (name, outage) in [
        ("steady 1,000/s", None),
        (
            "steady 1,000/s, D365 down 5 s",
            Some((Duration::from_secs(2), Duration::from_secs(5))),
        ),
        (
            "steady 1,000/s, D365 down 20 s",
            Some((Duration::from_secs(2), Duration::from_secs(20))),
        ),
    ] {
        if only.as_deref().is_none_or(|o| name.contains(o)) {
            // The outage must fit in the run: a smoke run keeps it short.
            let outage = outage.map(|(from, length)| {
                if full {
                    (from, length)
                } else {
                    (Duration::from_millis(200), Duration::from_millis(300))
                }
            });
            let secs = match outage {
                Some((from, length)) if full => seconds.max((from + length).as_secs() as u32 + 5),
                _ => seconds,
            };
            rt.block_on(steady(name, 1000, secs, outage));
        }
    }
    // D365's budget (6,000 requests per 5 minutes) scaled down: 600 per 30 s, 20 a second.
    let budget = (600, Duration::from_secs(30));
    let name = "100k backlog at 600 req/30 s, joining on";
    if only.as_deref().is_none_or(|o| name.contains(o)) {
        rt.block_on(budgeted(name, size(2000), 100, budget, None));
    }
    let name = "100k backlog at 600 req/30 s, joining off";
    if only.as_deref().is_none_or(|o| name.contains(o)) {
        let limit = full.then_some(Duration::from_secs(65));
        rt.block_on(budgeted(name, size(2000), 1, budget, limit));
    }
    let name = "1M backlog (a week's outage), D365 back";
    if only.as_deref().is_none_or(|o| name.contains(o)) {
        rt.block_on(backlog(name, size(20_000)));
    }
}
