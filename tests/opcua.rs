//! The OPC UA source against a real OPC UA server on a loopback port (async-opcua's
//! server as the PLC): values in order, rising edges, a burst inside 100 ms seen in full,
//! the counter through a server restart and a network cut, Basic256Sha256
//! SignAndEncrypt with the trust-folder flow, a wrong password, a server that goes away
//! and comes back; and through the whole gateway to a fake D365 with a kill -9.

use mes_gateway_testkit as support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mes_gateway::event::Value;
use mes_gateway::source::opcua::config::{
    Identity, NodeRef, OpcuaConfig, OpcuaNode, SecurityMode, SecurityPolicy,
};
use mes_gateway::source::opcua::OpcuaSource;
use mes_gateway::source::{SourceEvent, SourceHealth};
use mes_gateway::systemd::Heartbeats;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use support::device::Running;
use support::opcua::{UaPlc, PASSWORD, USER};

fn node(plc: &UaPlc, name: &str) -> OpcuaNode {
    OpcuaNode {
        name: name.to_string(),
        node: NodeRef::Id(plc.node_id(name).parse().unwrap()),
        sampling_interval: Duration::ZERO,
        queue_size: 2_000,
        deadband: None,
    }
}

fn config(plc: &UaPlc, pki: &Path, nodes: Vec<OpcuaNode>) -> OpcuaConfig {
    OpcuaConfig {
        id: "plc".into(),
        endpoint: plc.endpoint(),
        policy: SecurityPolicy::None,
        mode: SecurityMode::None,
        identity: Identity::Anonymous,
        pki_dir: Some(pki.to_path_buf()),
        trust_any_server: false,
        application_uri: "urn:mes-gateway:test".into(),
        publishing_interval: Duration::from_millis(20),
        request_timeout: Duration::from_secs(5),
        nodes,
    }
}

fn start(config: OpcuaConfig) -> Running {
    let (tx, rx) = mpsc::channel::<SourceEvent>(4096);
    let health = Arc::new(SourceHealth::default());
    let cancel = CancellationToken::new();
    let source = OpcuaSource::new(
        config,
        Heartbeats::default().register("plc"),
        health.clone(),
    );
    tokio::spawn(source.run(tx, cancel.clone()));
    Running::new(rx, health, cancel)
}

/// Events until `point` shows `value`; every event on the way.
async fn until(src: &mut Running, point: &str, value: Value) -> Vec<(String, Value)> {
    let mut seen = Vec::new();
    loop {
        let e = src.next().await;
        let done = e.0 == point && e.1 == value;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

/// Events until `done` holds for all of them so far (values of different nodes may come
/// in any order between each other; each node's own are in order).
async fn collect(
    src: &mut Running,
    done: impl Fn(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let mut seen = Vec::new();
    while !done(&seen) {
        seen.push(src.next().await);
    }
    seen
}

fn has(seen: &[(String, Value)], point: &str, value: &Value) -> usize {
    seen.iter()
        .filter(|(p, v)| p == point && v == value)
        .count()
}

fn numbers(seen: &[(String, Value)], point: &str) -> Vec<f64> {
    seen.iter()
        .filter(|(p, _)| p == point)
        .filter_map(|(_, v)| match v {
            Value::Number(n) => Some(*n),
            _ => None,
        })
        .collect()
}

/// What `count: delta` makes of a sequence: the sum of its increases.
fn delta_sum(values: &[f64]) -> f64 {
    values.windows(2).map(|w| (w[1] - w[0]).max(0.0)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_come_in_order_with_rising_edges_and_text_and_bad_quality_is_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let mut src = start(config(
        &plc,
        &dir.path().join("client"),
        vec![
            node(&plc, "GoodCount"),
            node(&plc, "Running"),
            node(&plc, "Order"),
        ],
    ));
    src.wait_health("connected", SourceHealth::is_connected)
        .await;
    // First the current values, each once.
    let first = collect(&mut src, |s| s.len() == 3).await;
    for expected in [
        ("GoodCount", Value::Number(0.0)),
        ("Running", Value::Bool(false)),
        ("Order", Value::Text(String::new())),
    ] {
        assert_eq!(has(&first, expected.0, &expected.1), 1, "{first:?}");
    }
    for n in 1..=5u32 {
        plc.set("GoodCount", n);
    }
    plc.set("Running", true);
    plc.set("Running", false);
    plc.set("Running", true);
    plc.set("Order", "P000321");
    let seen = collect(&mut src, |s| {
        has(s, "GoodCount", &Value::Number(5.0)) == 1
            && has(s, "Running", &Value::Bool(true)) == 2
            && has(s, "Order", &Value::Text("P000321".into())) == 1
    })
    .await;
    assert_eq!(
        numbers(&seen, "GoodCount"),
        [1.0, 2.0, 3.0, 4.0, 5.0],
        "{seen:?}"
    );
    let running: Vec<&Value> = seen
        .iter()
        .filter(|(p, _)| p == "Running")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        running,
        [&Value::Bool(true), &Value::Bool(false), &Value::Bool(true)]
    );
    // A Bad value is not an event; the good one after it is.
    plc.set_with_status(
        "GoodCount",
        999u32,
        opcua::types::StatusCode::BadSensorFailure,
    );
    plc.set("GoodCount", 6u32);
    let seen = until(&mut src, "GoodCount", Value::Number(6.0)).await;
    assert_eq!(numbers(&seen, "GoodCount"), [6.0], "{seen:?}");
    assert!(
        src.health
            .decode_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    src.cancel.cancel();
    plc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_changes_inside_100_ms_is_seen_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let mut src = start(config(
        &plc,
        &dir.path().join("client"),
        vec![node(&plc, "GoodCount")],
    ));
    src.wait_health("connected", SourceHealth::is_connected)
        .await;
    until(&mut src, "GoodCount", Value::Number(0.0)).await;
    let started = std::time::Instant::now();
    for n in 1..=1000u32 {
        plc.set("GoodCount", n);
    }
    let took = started.elapsed();
    let seen = until(&mut src, "GoodCount", Value::Number(1000.0)).await;
    let values = numbers(&seen, "GoodCount");
    assert_eq!(
        values,
        (1..=1000).map(f64::from).collect::<Vec<_>>(),
        "every value, in order"
    );
    assert!(took < Duration::from_millis(100), "the burst took {took:?}");
    src.cancel.cancel();
    plc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_away_is_down_and_the_counter_is_whole_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let port = plc.port;
    let mut src = start(config(
        &plc,
        &dir.path().join("client"),
        vec![node(&plc, "GoodCount")],
    ));
    src.wait_health("connected", SourceHealth::is_connected)
        .await;
    let mut all = until(&mut src, "GoodCount", Value::Number(0.0)).await;
    for n in 1..=10u32 {
        plc.set("GoodCount", n);
    }
    all.extend(until(&mut src, "GoodCount", Value::Number(10.0)).await);
    plc.stop().await;
    src.wait_health("down", |h| !h.is_connected()).await;
    // The PLC restarts: its counter went on to 25 meanwhile (retentive memory).
    let plc = UaPlc::start(&dir.path().join("server"), port).await;
    plc.set("GoodCount", 25u32);
    src.wait_health("back by itself", SourceHealth::is_connected)
        .await;
    all.extend(until(&mut src, "GoodCount", Value::Number(25.0)).await);
    for n in 26..=30u32 {
        plc.set("GoodCount", n);
    }
    all.extend(until(&mut src, "GoodCount", Value::Number(30.0)).await);
    assert_eq!(delta_sum(&numbers(&all, "GoodCount")), 30.0, "{all:?}");
    src.cancel.cancel();
    plc.stop().await;
}

/// A TCP relay between the source and the server that can be cut (every connection
/// dropped, new ones refused) and restored: a network cut the server outlives.
struct Relay {
    port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c, o) = (cut.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped at once: the cable is out
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                o.lock().unwrap().push(task.abort_handle());
            }
        });
        Relay { port, cut, open }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
        if cut {
            for task in self.open.lock().unwrap().drain(..) {
                task.abort();
            }
        }
    }
}

/// A network cut shorter than the session's timeout: the server keeps the session; after
/// the cut the source fetches what was lost in flight (Republish) and reads the current
/// value, so the counter is counted exactly by delta, never backwards, never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_loses_and_doubles_no_value_of_the_counter() {
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let relay = Relay::start(plc.port).await;
    let mut through = config(
        &plc,
        &dir.path().join("client"),
        vec![node(&plc, "GoodCount")],
    );
    through.endpoint = format!("opc.tcp://127.0.0.1:{}/", relay.port);
    let mut src = start(through);
    src.wait_health("connected", SourceHealth::is_connected)
        .await;
    let mut all = until(&mut src, "GoodCount", Value::Number(0.0)).await;
    for n in 1..=10u32 {
        plc.set("GoodCount", n);
    }
    all.extend(until(&mut src, "GoodCount", Value::Number(10.0)).await);
    relay.set_cut(true);
    src.wait_health("down while cut", |h| !h.is_connected())
        .await;
    for n in 11..=20u32 {
        plc.set("GoodCount", n);
    }
    relay.set_cut(false);
    src.wait_health("back", SourceHealth::is_connected).await;
    all.extend(until(&mut src, "GoodCount", Value::Number(20.0)).await);
    let values = numbers(&all, "GoodCount");
    assert!(
        values.windows(2).all(|w| w[1] > w[0]),
        "in order, each value once: {values:?}"
    );
    assert_eq!(
        &values[..11],
        (0..=10).map(f64::from).collect::<Vec<_>>().as_slice()
    );
    assert_eq!(delta_sum(&values), 20.0, "{values:?}");
    src.cancel.cancel();
    plc.stop().await;
}

/// A node named by its browse path is found by the server's translation and monitored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_named_by_its_browse_path_is_monitored() {
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let mut by_path = node(&plc, "GoodCount");
    by_path.node = NodeRef::BrowsePath(vec![(0, "Line1".into()), (0, "GoodCount".into())]);
    let mut missing = node(&plc, "Nothing");
    missing.node = NodeRef::BrowsePath(vec![(0, "Line1".into()), (0, "Nothing".into())]);
    let mut src = start(config(
        &plc,
        &dir.path().join("client"),
        vec![by_path, missing],
    ));
    src.wait_health("connected", SourceHealth::is_connected)
        .await;
    until(&mut src, "GoodCount", Value::Number(0.0)).await;
    plc.set("GoodCount", 3u32);
    until(&mut src, "GoodCount", Value::Number(3.0)).await;
    // The path that leads nowhere is reported (counted), the rest works.
    assert!(
        src.health
            .decode_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    src.cancel.cancel();
    plc.stop().await;
}

/// A policy the server does not offer is refused with what it does offer: never a
/// weaker endpoint instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_the_server_does_not_offer_is_never_downgraded() {
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let mut strict = config(
        &plc,
        &dir.path().join("client"),
        vec![node(&plc, "GoodCount")],
    );
    strict.policy = SecurityPolicy::Aes256Sha256RsaPss;
    strict.mode = SecurityMode::SignAndEncrypt;
    let src = start(strict);
    src.wait_health("refused", |h| {
        h.last_error().is_some_and(|e| {
            e.contains("offers no endpoint with Aes256Sha256RsaPss/SignAndEncrypt")
        })
    })
    .await;
    let error = src.health.last_error().unwrap();
    assert!(
        error.contains("Basic256Sha256/SignAndEncrypt") && error.contains("never downgraded"),
        "{error}"
    );
    assert!(!src.health.is_connected());
    src.cancel.cancel();
    plc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_clearly_and_the_right_one_connects() {
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let mut wrong = config(
        &plc,
        &dir.path().join("client"),
        vec![node(&plc, "GoodCount")],
    );
    wrong.identity = Identity::UserName {
        user: USER.into(),
        password: mes_gateway::config::Secret::new("not-the-password"),
    };
    let src = start(wrong.clone());
    src.wait_health("refused", |h| {
        h.last_error()
            .is_some_and(|e| e.contains("refused the user name or password"))
    })
    .await;
    assert!(!src.health.is_connected());
    src.cancel.cancel();
    let mut right = wrong;
    right.identity = Identity::UserName {
        user: USER.into(),
        password: mes_gateway::config::Secret::new(PASSWORD),
    };
    let mut src = start(right);
    src.wait_health("connected", SourceHealth::is_connected)
        .await;
    until(&mut src, "GoodCount", Value::Number(0.0)).await;
    src.cancel.cancel();
    plc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_and_encrypt_connects_only_once_the_servers_certificate_is_moved_to_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let pki = dir.path().join("client");
    let mut secure = config(&plc, &pki, vec![node(&plc, "GoodCount")]);
    secure.policy = SecurityPolicy::Basic256Sha256;
    secure.mode = SecurityMode::SignAndEncrypt;
    secure.identity = Identity::UserName {
        user: USER.into(),
        password: mes_gateway::config::Secret::new(PASSWORD),
    };
    let mut src = start(secure);
    src.wait_health("refused as untrusted", |h| {
        h.last_error().is_some_and(|e| e.contains("not trusted"))
    })
    .await;
    assert!(!src.health.is_connected());
    let error = src.health.last_error().unwrap();
    // The error names the file to move and where.
    let rejected = std::fs::read_dir(pki.join("rejected"))
        .unwrap()
        .next()
        .expect("the server's certificate in rejected/")
        .unwrap()
        .path();
    assert!(
        error.contains(&rejected.display().to_string())
            && error.contains(&pki.join("trusted").display().to_string()),
        "{error}"
    );
    std::fs::rename(
        &rejected,
        pki.join("trusted").join(rejected.file_name().unwrap()),
    )
    .unwrap();
    src.wait_health("connected once trusted", SourceHealth::is_connected)
        .await;
    until(&mut src, "GoodCount", Value::Number(0.0)).await;
    plc.set("GoodCount", 7u32);
    until(&mut src, "GoodCount", Value::Number(7.0)).await;
    // The client's own certificate was made on first start.
    assert!(pki.join("own/cert.der").is_file());
    src.cancel.cancel();
    plc.stop().await;
}

/// Waits until the running gateway's OPC UA source has had a value.
async fn seen_by_gateway(cfg: &str) {
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (_, status, _) = support::process::run(&["status", "-c", cfg, "--json"]).await;
            let v: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
            if v["sources"][0]["events"].as_u64().unwrap_or(0) >= 1 {
                // `status` says which session and which certificate.
                let detail = v["sources"][0]["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    detail.starts_with("session ns=")
                        && detail.contains("opcua-pki/own/cert.der")
                        && detail.contains("valid until"),
                    "{detail}"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(seen.is_ok(), "the gateway never had a value from the PLC");
}

/// The whole path, OPC UA → rules (`count: delta`) → outbox → a fake D365, with the
/// gateway killed (SIGKILL) while the PLC's counter runs: every piece the PLC counted is
/// reported once — lost 0, doubled 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_through_the_gateway_with_a_kill_9_in_the_middle_is_reported_exactly() {
    use support::process::{self, Output};
    const PIECES: u32 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    let fake = support::FakeD365::start().await;
    let etc = dir.path().join("etc");
    support::write_config(
        &etc,
        &format!(
            "{}storage:\n  data_dir: data\nsources:\n  - type: opcua\n    id: plc\n    endpoint: {}\n    trust_any_server: true\n    publishing_interval: 20ms\n    nodes:\n      - name: good\n        node_id: \"{}\"\n        queue_size: 5000\n",
            support::d365_yaml(&fake),
            plc.endpoint(),
            plc.node_id("GoodCount"),
        ),
    );
    std::fs::create_dir_all(etc.join("rules.d")).unwrap();
    std::fs::write(
        etc.join("rules.d/count.yaml"),
        "rules:\n  - name: parts\n    line: line1\n    when: { source: plc, point: good }\n    count: delta\n    aggregate: { every: 25, interval: 1h }\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: { ProductionOrderNumber: P000500, ItemNumber: A0001, ReportedGoodQuantity: \"{quantity}\" }\n",
    )
    .unwrap();
    let cfg = process::path_str(&etc).to_string();
    let out = Output::new();
    let gw = process::start_logging(&["run", "-c", &cfg], &out, "info");
    out.wait_for("OPC UA subscription created.").await;
    // The first reading is the counter's base (`count: delta`): count only once the
    // gateway has it.
    seen_by_gateway(&cfg).await;
    // The PLC counts in bursts while the gateway runs; the gateway dies in the middle.
    let mut count = 0u32;
    while count < PIECES / 2 {
        count += 1;
        plc.set("GoodCount", count);
        if count.is_multiple_of(100) {
            tokio::task::yield_now().await;
        }
    }
    fake.wait_until("some reports", |r| support::accepted_lines(r) >= 10)
        .await;
    gw.kill9().await;
    support::settle_interrupted(&fake, &etc).await;
    // The line goes on counting while the gateway is down.
    while count < PIECES * 3 / 4 {
        count += 1;
        plc.set("GoodCount", count);
    }
    let again = Output::new();
    let gw = process::start_logging(&["run", "-c", &cfg], &again, "info");
    again.wait_for("OPC UA subscription created.").await;
    seen_by_gateway(&cfg).await;
    while count < PIECES {
        count += 1;
        plc.set("GoodCount", count);
        if count.is_multiple_of(100) {
            tokio::task::yield_now().await;
        }
    }
    fake.wait_until("every piece", |r| support::pieces(r, "P000500") >= PIECES)
        .await;
    assert_eq!(gw.terminate().await, 0);
    assert_eq!(
        support::pieces(&fake.received(), "P000500"),
        PIECES,
        "lost 0, doubled 0"
    );
    plc.stop().await;
}

/// `mes-gateway opcua browse` lists what the `nodes` list needs, with the source's own
/// connection; `check` names every mistake in an opcua source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browse_lists_node_ids_types_and_values_and_check_names_each_mistake() {
    use support::process;
    let dir = tempfile::tempdir().unwrap();
    let plc = UaPlc::start(&dir.path().join("server"), 0).await;
    plc.set("GoodCount", 42u32);
    let fake = support::FakeD365::start().await;
    let etc = dir.path().join("etc");
    support::write_config(
        &etc,
        &format!(
            "{}storage:\n  data_dir: data\nsources:\n  - type: opcua\n    id: plc\n    endpoint: {}\n    trust_any_server: true\n    nodes:\n      - name: good\n        browse_path: \"Line1/GoodCount\"\n",
            support::d365_yaml(&fake),
            plc.endpoint(),
        ),
    );
    let cfg = process::path_str(&etc);
    let (code, stdout, stderr) =
        process::run(&["opcua", "browse", "plc", "-c", cfg, "--depth", "2"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.contains(&plc.node_id("GoodCount")))
        .unwrap_or_else(|| panic!("no GoodCount row in:\n{stdout}"));
    assert!(
        row.contains("UInt32") && row.contains("42") && row.contains("Variable"),
        "{row}"
    );
    assert!(stdout.contains(":Line1"), "{stdout}");
    let (code, stdout, _) = process::run(&["opcua", "browse", "nope", "-c", cfg]).await;
    assert_eq!(code, 64);
    let _ = stdout;

    // Every mistake, each at its place.
    support::write_config(
        &etc,
        &format!(
            "{}storage:\n  data_dir: data\nsources:\n  - type: opcua\n    id: plc\n    endpoint: http://plc:4840\n    security_policy: Basic128Rsa15\n    user: line\n    password_file: missing-password\n    nodes:\n      - name: good\n        node_id: \"ns=3;x=Oops\"\n      - name: good\n        browse_path: \"3:Line1//x\"\n        queue_size: 0\n",
            support::d365_yaml(&fake),
        ),
    );
    let (code, stdout, stderr) = process::run(&["check", "-c", cfg]).await;
    assert_eq!(code, 78, "{stdout}{stderr}");
    let errors = format!("{stdout}{stderr}");
    for expected in [
        "sources[0].endpoint: \"http://plc:4840\": expected opc.tcp://host:port[/path]",
        "sources[0].security_policy: unknown security policy \"Basic128Rsa15\", expected one of None, Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss",
        "sources[0].password_file: cannot read",
        "sources[0].nodes[0].node_id: \"ns=3;x=Oops\" is not a NodeId",
        "sources[0].nodes[1].name: duplicate node name `good`",
        "sources[0].nodes[1].browse_path: \"3:Line1//x\": an empty step",
        "sources[0].nodes[1].queue_size: must be 1..=100000",
    ] {
        assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
    }
    plc.stop().await;
}
