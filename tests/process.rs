//! The real binary: crash safety under SIGKILL, the CLI, configuration errors, the demo,
//! and that the D365 secret never appears in anything the gateway prints.

use mes_gateway_testkit as support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use mes_gateway::outbox::{Outbox, State};
use support::process::{self, path_str, Output};
use support::{d365_yaml, write_config, FakeD365, TEST_SECRET};

/// Ten orders, so that lanes held by uncertain messages after a kill leave others flowing.
const ORDERS: usize = 10;

fn write_flow_config(dir: &Path, fake: &FakeD365, with_source: bool) {
    let mut yaml = d365_yaml(fake);
    yaml.push_str("dispatcher:\n  backoff_initial: 100ms\n  backoff_max: 1s\nstorage:\n  data_dir: data\nshutdown_grace: 5s\n");
    if with_source {
        yaml.push_str("sources:\n  - type: simulator\n    id: sim\n    interval: 20ms\n");
        let mut rules = String::from("rules:\n");
        for i in 0..ORDERS {
            rules.push_str(&format!(
                "  - name: count-{i}\n    line: line{i}\n    when: {{ source: sim, point: impulse, edge: rising }}\n    count: impulse\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: {{ ProductionOrderNumber: P{i:03}, ItemNumber: A0001, ReportedGoodQuantity: \"{{quantity}}\" }}\n"
            ));
        }
        std::fs::create_dir_all(dir.join("rules.d")).unwrap();
        std::fs::write(dir.join("rules.d/count.yaml"), rules).unwrap();
    } else {
        let _ = std::fs::remove_dir_all(dir.join("rules.d"));
    }
    write_config(dir, &yaml);
}

/// The messages D365 accepted, in order (a joined request's one by one).
fn accepted_ids(fake: &FakeD365) -> Vec<u64> {
    fake.accepted()
        .iter()
        .inspect(|r| assert!(r.message_id.is_some(), "message id header"))
        .flat_map(|r| r.ids())
        .collect()
}

/// Waits until D365 has accepted every one of `ids`.
async fn wait_accepted(fake: &FakeD365, what: &str, ids: &[u64]) {
    fake.wait_until(what, |_| {
        let accepted: HashSet<u64> = accepted_ids(fake).into_iter().collect();
        ids.iter().all(|id| accepted.contains(id))
    })
    .await;
}

/// What an operator does with messages a crash left in doubt (`states`): those D365 has
/// (here: the fake) are resolved as delivered, the others are sent again. Uses the CLI.
async fn settle(fake: &FakeD365, data: &Path, cfg: &str, states: &[State]) {
    let accepted: HashSet<u64> = accepted_ids(fake).into_iter().collect();
    let records = snapshot(data);
    let doubtful = records.iter().filter(|r| states.contains(&r.state));
    process::settle_doubtful(&accepted, cfg, doubtful).await;
}

/// Records of the outbox, read while the gateway is stopped.
fn snapshot(data: &Path) -> Vec<mes_gateway::outbox::Record> {
    Outbox::open(data).unwrap().list(None, None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_messages_flow_loses_nothing_and_sends_nothing_twice() {
    let fake = FakeD365::start().await;
    // Slow answers keep requests on the wire, so kills land mid-request.
    fake.delay_responses(Duration::from_millis(20));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("etc");
    let data = dir.join("data");
    let out = Output::new();
    let cfg = path_str(&dir).to_string();

    write_flow_config(&dir, &fake, true);
    for round in 0..2 {
        let before = fake.accepted_messages();
        let gw = process::start(&["run", "-c", &cfg], &out);
        fake.wait_until("40 more accepted", |r| {
            r.iter()
                .filter(|r| r.status == Some(200))
                .map(|r| r.ids().len())
                .sum::<usize>()
                >= before + 40
        })
        .await;
        gw.kill9().await;
        let records = snapshot(&data);
        assert!(!records.is_empty(), "round {round}: outbox empty");
    }

    // Restart without sources. Messages caught `sending` by the kill must become uncertain
    // (never resent blindly); lanes before them drain.
    let before_restart = snapshot(&data);
    let interrupted: HashSet<u64> = before_restart
        .iter()
        .filter(|r| r.state == State::Sending)
        .map(|r| r.id)
        .collect();
    let mut deliverable = Vec::new();
    let mut lanes: BTreeMap<&str, Vec<&mes_gateway::outbox::Record>> = BTreeMap::new();
    for r in before_restart.iter().filter(|r| !r.state.is_terminal()) {
        lanes
            .entry(r.production_order.as_str())
            .or_default()
            .push(r);
    }
    for lane in lanes.values() {
        deliverable.extend(
            lane.iter()
                .take_while(|r| r.state == State::Queued)
                .map(|r| r.id),
        );
    }
    write_flow_config(&dir, &fake, false);
    let gw = process::start(&["run", "-c", &cfg], &out);
    wait_accepted(&fake, "every unblocked lane drained", &deliverable).await;
    assert_eq!(gw.terminate().await, 0);

    // The operator resolves each uncertain message: on the MES page (here: the fake) or not.
    let after = snapshot(&data);
    for r in after.iter().filter(|r| interrupted.contains(&r.id)) {
        assert_eq!(
            r.state,
            State::Uncertain,
            "message {} was sending at the kill",
            r.id
        );
    }
    settle(&fake, &data, &cfg, &[State::Uncertain]).await;

    let all: Vec<u64> = snapshot(&data).iter().map(|r| r.id).collect();
    let gw = process::start(&["run", "-c", &cfg], &out);
    wait_accepted(&fake, "everything delivered", &all).await;
    assert_eq!(gw.terminate().await, 0);

    // Exactly once, and per order in id (= creation) order.
    let accepted = accepted_ids(&fake);
    let unique: HashSet<u64> = accepted.iter().copied().collect();
    assert_eq!(unique.len(), accepted.len(), "a message reached D365 twice");
    assert_eq!(unique, all.iter().copied().collect::<HashSet<_>>());
    let mut per_order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in fake.accepted() {
        per_order
            .entry(r.order.clone())
            .or_default()
            .extend(r.ids());
    }
    for (order, ids) in &per_order {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "order {order} out of order: {ids:?}"
        );
    }
    assert!(snapshot(&data).iter().all(|r| r.state == State::Delivered));
    eprintln!(
        "kill test: {} messages, {} caught sending by a kill, {} requests seen by the fake",
        all.len(),
        interrupted.len(),
        fake.received().len()
    );
    let text = out.text();
    assert!(
        !text.contains(TEST_SECRET),
        "the secret appeared in the gateway output"
    );
    assert!(text.contains("Marked uncertain") || interrupted.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credentials_are_reported_without_the_secret() {
    let fake = FakeD365::start().await;
    fake.reject_credentials();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_config(
        dir,
        &format!("{}storage:\n  data_dir: data\n", d365_yaml(&fake)),
    );
    let cfg = path_str(dir);
    let (code, stdout, stderr) = process::run(&[
        "send",
        "-c",
        cfg,
        "--type",
        "ProdProductionOrderStart",
        "/dev/stdin",
    ])
    .await;
    // stdin is /dev/null here: not JSON, a usage error.
    assert_eq!(code, 64, "{stdout}{stderr}");
    let msg = dir.join("start.json");
    std::fs::write(&msg, r#"{"_messageType":"ProdProductionOrderStart","_messageContent":"{\"ProductionOrderNumber\":\"P9\"}"}"#).unwrap();
    let (code, stdout, stderr) = process::run(&["send", "-c", cfg, path_str(&msg)]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("queued message"), "{stdout}");

    let out = Output::new();
    let gw = process::start(&["run", "-c", cfg], &out);
    out.wait_for("AADSTS7000215").await;
    assert_eq!(gw.terminate().await, 0);
    let (code, check_out, check_err) = process::run(&["check", "-c", cfg]).await;
    assert_eq!(code, 0, "{check_out}{check_err}");
    for text in [out.text(), check_out, check_err] {
        assert!(!text.contains(TEST_SECRET), "secret leaked in: {text}");
    }
    assert!(
        fake.token_requests()
            .iter()
            .all(|f| f["client_secret"] == TEST_SECRET),
        "the secret did reach the token endpoint"
    );
}

#[tokio::test]
async fn three_mistakes_in_two_files_are_all_reported_with_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_config(
        dir,
        "storage:\n  dta_dir: data\ndispatcher:\n  max_in_flight: 99\nsources:\n  - type: simulator\n    id: sim\n    interval: 1s\n",
    );
    std::fs::create_dir_all(dir.join("rules.d")).unwrap();
    std::fs::write(
        dir.join("rules.d/line1.yaml"),
        "rules:\n  - name: good\n    when:\n      source: sim\n      edge: rissing\n    emit:\n      type: ProdProductionOrderStart\n",
    )
    .unwrap();
    let (code, stdout, stderr) = process::run(&["check", "-c", path_str(dir)]).await;
    assert_eq!(code, 78, "{stdout}{stderr}");
    let gateway = dir.join("gateway.yaml");
    let rules = dir.join("rules.d/line1.yaml");
    let expected = [
        format!("{}:2:3: storage.dta_dir: unknown field `dta_dir`, expected one of `data_dir`, `retention`, `prune_interval`", gateway.display()),
        format!("{}:4:18: dispatcher.max_in_flight: 99 is out of range: 1 to 52", gateway.display()),
        format!("{}:5:13: rules[0].when.edge: unknown variant `rissing`, expected one of `rising`, `falling`, `both`", rules.display()),
    ];
    for line in &expected {
        assert!(
            stderr.contains(line.as_str()),
            "missing {line:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("3 configuration errors"), "{stderr}");
}

#[tokio::test]
async fn the_demo_runs_without_hardware_or_d365() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo");
    let dir = tmp.path().join("demo");
    copy_dir(&demo, &dir);
    let _ = std::fs::remove_dir_all(dir.join("data"));
    let cfg = path_str(&dir);
    let (code, stdout, stderr) = process::run(&["check", "-c", cfg]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");

    let out = Output::new();
    let gw = process::start(&["run", "-c", cfg, "--dry-run"], &out);
    out.wait_for("stored message").await;
    assert_eq!(gw.terminate().await, 0);
    assert!(
        out.text().contains("ProdProductionOrderReportFinished"),
        "{}",
        out.text()
    );

    let (code, stdout, stderr) = process::run(&["lines", "-c", cfg]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("line1: order P000123 item A0001"),
        "the scanned order is saved: {stdout}"
    );

    let (code, stdout, stderr) = process::run(&["outbox", "-c", cfg, "list", "--json"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let first: serde_json::Value =
        serde_json::from_str(stdout.lines().next().expect("a stored message")).unwrap();
    assert_eq!(first["state"], "queued");
    assert_eq!(first["production_order"], "P000123");
}

#[tokio::test]
async fn every_shipped_config_directory_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.extend(
        std::fs::read_dir(root.join("examples"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    let mut checked = 0;
    for src in dirs {
        if !src.join("gateway.yaml").is_file() {
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        copy_dir(&src, &dir);
        // Example configs read their secrets from files next to them; provide them.
        std::fs::write(dir.join("d365-client-secret"), TEST_SECRET).unwrap();
        std::fs::write(dir.join("d365-webhook-secret"), TEST_SECRET).unwrap();
        std::fs::write(dir.join("servicebus-key"), TEST_SECRET).unwrap();
        // The example reads ${CREDENTIALS_DIRECTORY:-/etc/mes-gateway}/d365-client-secret.
        let out = tokio::process::Command::new(&*process::BIN)
            .args(["check", "-c", path_str(&dir)])
            .env("CREDENTIALS_DIRECTORY", &dir)
            .output()
            .await
            .unwrap();
        let (code, stdout, stderr) = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(code, 0, "{}: {stdout}{stderr}", src.display());
        assert!(!stdout.contains(TEST_SECRET) && !stderr.contains(TEST_SECRET));
        checked += 1;
    }
    assert!(
        checked >= 2,
        "expected the demo and the example config, checked {checked}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A PLC counter register read as deltas into aggregates of 50 while the gateway is
/// killed mid-window: the pieces counted before the kill are in the saved accumulator,
/// the ones counted by the PLC while the gateway was down are in the register.
fn write_counter_config(dir: &Path, fake: &FakeD365, start_at: jiff::Timestamp) {
    let mut yaml = d365_yaml(fake);
    yaml.push_str(&format!(
        "storage:\n  data_dir: data\nsources:\n  - type: simulator\n    id: plc\n    point: counter\n    mode: counter\n    start_at: {start_at}\n    interval: 10ms\n    stop_at: 300\n"
    ));
    write_config(dir, &yaml);
    std::fs::create_dir_all(dir.join("rules.d")).unwrap();
    std::fs::write(
        dir.join("rules.d/count.yaml"),
        "rules:\n  - name: parts\n    line: line1\n    when: { source: plc, point: counter }\n    count: delta\n    aggregate: { every: 50, interval: 1h }\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: { ProductionOrderNumber: P000300, ItemNumber: A0001, ReportedGoodQuantity: \"{quantity}\" }\n",
    )
    .unwrap();
}

/// Every quantity D365 accepted, line by line (joined requests included).
fn reported(fake: &FakeD365) -> Vec<f64> {
    fake.accepted()
        .iter()
        .flat_map(|r| r.lines("ReportFinishedLines"))
        .map(|line| line["ReportedGoodQuantity"].as_f64().unwrap())
        .collect()
}

async fn count_to_300(kill_after: Option<usize>) -> Vec<f64> {
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("etc");
    // The counter starts counting 1 s from now, so the first reading is 0.
    write_counter_config(
        &dir,
        &fake,
        jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1),
    );
    let cfg = path_str(&dir).to_string();
    let out = Output::new();
    if let Some(n) = kill_after {
        let gw = process::start(&["run", "-c", &cfg], &out);
        fake.wait_until("first reports", |r| support::accepted_lines(r) >= n)
            .await;
        gw.kill9().await;
        // Resolve what the kill left on the wire, as an operator would.
        settle(
            &fake,
            &dir.join("data"),
            &cfg,
            &[State::Sending, State::Uncertain],
        )
        .await;
    }
    let last_run = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &last_run);
    // The plant's batch is done when the counter stops; the rest of the last window is
    // reported at shutdown.
    last_run
        .wait_for("Simulated counter reached its stop value")
        .await;
    assert_eq!(gw.terminate().await, 0);
    // What the shutdown reported is in the outbox; the next start delivers it (the
    // counter stays at 300, so nothing new is counted).
    let final_run = Output::new();
    let gw = process::start(&["run", "-c", &cfg], &final_run);
    final_run.wait_for("Gateway running").await;
    fake.wait_until("300 parts reported", |_| {
        reported(&fake).iter().sum::<f64>() >= 300.0
    })
    .await;
    assert_eq!(gw.terminate().await, 0);
    reported(&fake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_aggregation_reports_the_same_total_as_an_uninterrupted_run() {
    let uninterrupted = count_to_300(None).await;
    let crashed = count_to_300(Some(2)).await;
    let total = |q: &[f64]| q.iter().sum::<f64>();
    assert_eq!(total(&uninterrupted), 300.0, "{uninterrupted:?}");
    assert_eq!(
        total(&crashed),
        300.0,
        "same total after a SIGKILL mid-window: {crashed:?}"
    );
    // Windows close at 50 or just above (a reading can add 2 when a poll is late).
    assert!(
        crashed.iter().rev().skip(1).all(|q| *q >= 50.0),
        "{crashed:?}"
    );
}

/// A fake D365 and a configuration directory for it: the `d365` section, then `extra`
/// (more of it, or other sections), then `storage`.
async fn configured(extra: &str) -> (FakeD365, tempfile::TempDir) {
    let fake = FakeD365::start().await;
    let tmp = tempfile::tempdir().unwrap();
    write_config(
        tmp.path(),
        &format!("{}{extra}storage:\n  data_dir: data\n", d365_yaml(&fake)),
    );
    (fake, tmp)
}

/// A typo in `_messageType` would be refused by D365 and then hold every later message of
/// its order: `send` refuses it before the outbox, naming the nearest type. A type the
/// plant declared passes, checked against its schema.
#[tokio::test]
async fn send_refuses_an_unknown_type_before_the_outbox_and_takes_declared_ones() {
    let (_fake, tmp) = configured(
        "  custom_message_types:\n    - name: ZScrapReason\n      schema:\n        type: object\n        required: [Reason]\n        properties:\n          Reason: { type: string }\n        additionalProperties: false\n",
    )
    .await;
    let dir = tmp.path();
    let cfg = path_str(dir);
    let send = |message_type: &'static str, content: &'static str| {
        let file = dir.join(format!("{message_type}.json"));
        std::fs::write(&file, content).unwrap();
        async move { process::run(&["send", "-c", cfg, "--type", message_type, path_str(&file)]).await }
    };

    let (code, stdout, stderr) = send(
        "ProdProductionOrderStrat",
        r#"{"ProductionOrderNumber":"P1"}"#,
    )
    .await;
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(
        stderr.contains("unknown message type `ProdProductionOrderStrat` (did you mean ProdProductionOrderStart?); known types: ProdProductionOrderStart, ProdProductionOrderReportFinished, ProdProductionOrderPickingList, ProdProductionOrderRouteCard, ProdProductionOrderEnd, ZScrapReason"),
        "{stderr}"
    );
    let (code, stdout, stderr) = send(
        "ZScrapReason",
        r#"{"ProductionOrderNumber":"P1","Reason":"Dust","Colour":"red"}"#,
    )
    .await;
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(
        stderr.contains("ZScrapReason: content does not fit the message type: unknown field `Colour` (the schema allows: Reason)"),
        "{stderr}"
    );
    let (code, stdout, stderr) = send(
        "ZScrapReason",
        r#"{"ProductionOrderNumber":"P1","Reason":"Dust"}"#,
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");

    let outbox = mes_gateway::outbox::Outbox::open(&dir.join("data")).unwrap();
    let types: Vec<String> = outbox
        .list(None, None)
        .unwrap()
        .into_iter()
        .map(|r| r.message_type)
        .collect();
    assert_eq!(types, ["ZScrapReason"], "only the valid one was queued");
}

/// A map keyed by message type with a typo would silently fall back to the default.
#[tokio::test]
async fn a_message_type_key_with_a_typo_is_a_located_config_error() {
    let (_fake, tmp) = configured(
        "dispatcher:\n  on_ambiguous:\n    default: hold\n    per_type:\n      ProdProductionOrderReportFinshed: resend\n",
    )
    .await;
    let dir = tmp.path();
    let (code, stdout, stderr) = process::run(&["check", "-c", path_str(dir)]).await;
    assert_eq!(code, 78, "{stdout}{stderr}");
    let expected = format!(
        "{}:12:41: dispatcher.on_ambiguous.per_type.ProdProductionOrderReportFinshed: unknown message type `ProdProductionOrderReportFinshed` (did you mean ProdProductionOrderReportFinished?)",
        dir.join("gateway.yaml").display()
    );
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );
}

/// A wrong client secret: the log says until when nothing is sent, what to fix and how
/// to retry at once; fixing the file and reloading (SIGHUP) delivers at once, with no
/// restart and nothing lost (the pause here is an hour).
#[tokio::test]
async fn a_wrong_secret_fixed_and_reloaded_delivers_at_once() {
    let (fake, tmp) = configured("dispatcher:\n  auth_pause: 1h\n").await;
    fake.require_secret(TEST_SECRET);
    let dir = tmp.path();
    let secret_file = dir.join("d365-client-secret");
    std::fs::write(&secret_file, "a-wrong-secret\n").unwrap();
    let cfg = path_str(dir);
    let msg = dir.join("start.json");
    std::fs::write(&msg, r#"{"ProductionOrderNumber":"P7"}"#).unwrap();
    let (code, stdout, stderr) = process::run(&[
        "send",
        "-c",
        cfg,
        "--type",
        "ProdProductionOrderStart",
        path_str(&msg),
    ])
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");

    let out = Output::new();
    let gw = process::start(&["run", "-c", cfg], &out);
    out.wait_for("D365 refused the credentials").await;
    let log = out.text();
    for expected in [
        "no message is sent until 20",
        &format!(
            "Fix the client secret (file {}) or the app registration in Microsoft Entra ID, then run `systemctl reload mes-gateway` (SIGHUP) to try again at once.",
            secret_file.display()
        ),
        "AADSTS7000215",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
    assert!(
        !log.contains("a-wrong-secret"),
        "the secret never reaches the log"
    );
    assert!(fake.received().is_empty());

    std::fs::write(&secret_file, format!("{TEST_SECRET}\n")).unwrap();
    // SAFETY: kill(2) on our own child with a valid signal.
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    fake.wait_accepted_count(1).await;
    out.wait_for("trying the configured ones now").await;
    assert_eq!(gw.terminate().await, 0);
    let received = fake.received();
    assert_eq!(received.len(), 1, "sent once: nothing lost, nothing twice");
    assert_eq!(received[0].order, "P7");
}

/// `mes-gateway … | head` closes the pipe early: the command ends quietly (exit 0, no
/// panic, no backtrace), as Unix tools do.
#[tokio::test]
async fn a_closed_output_pipe_ends_a_command_quietly() {
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo");
    let mut child = tokio::process::Command::new(&*process::BIN)
        .args(["check", "-c", path_str(&demo)])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the command writes a byte.
    drop(child.stdout.take());
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
