use super::outcomes::send_one;
use super::retry::Decision;
use super::state::{DispatchState, SendBatches, SendResult};
use super::*;
use crate::outbox::{Ingest, NewMessage};
use tokio::task::JoinSet;

#[tokio::test]
async fn an_outcome_waits_only_for_the_requests_sent_with_it() {
    let mut set: JoinSet<()> = JoinSet::new();
    let (a, b, c) = (
        set.spawn(async {}).id(),
        set.spawn(async {}).id(),
        set.spawn(async {}).id(),
    );
    let mut batches = SendBatches::default();
    batches.started(vec![a, b]);
    batches.started(vec![c]);
    batches.started(Vec::new());
    let first = batches.finished(a);
    assert_eq!(first, Some(0));
    let seen: HashSet<u64> = first.into_iter().collect();
    assert!(
        batches.waiting(&seen),
        "b went out with a and is still in flight"
    );
    assert_eq!(batches.finished(b), Some(0));
    assert!(
        !batches.waiting(&seen),
        "c went out later: a's write does not wait for it"
    );
    assert!(batches.waiting(&HashSet::from([1])));
    assert_eq!(batches.finished(c), Some(1));
    assert_eq!(batches.finished(c), None, "each request is filed once");
    assert!(batches.batch_of.is_empty() && batches.in_flight.is_empty());
    set.shutdown().await;
}

/// A D365 stand-in over real HTTP: every odd SendMessage (the 1st, 3rd, …) gets a
/// 429 without Retry-After, every even one a 200; it notes when it answered each.
async fn throttling_d365() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Instant>>>) {
    use axum::routing::post;
    let answered: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let seen = answered.clone();
    let app = axum::Router::new()
        .route(
            "/token",
            post(|| async { r#"{"access_token":"t","expires_in":3600}"# }),
        )
        .route(
            "/api/services/SysMessageServices/SysMessageService/SendMessage",
            post(move || {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().unwrap();
                    seen.push(Instant::now());
                    if seen.len() % 2 == 1 {
                        axum::http::StatusCode::TOO_MANY_REQUESTS
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, answered)
}

/// A request prepared in the same turn as one that gets a 429 (its task runs only
/// after the 429 was read: a busy CPU) must not go out inside the pause: D365 counts
/// it against the same throttle. The task that reads the 429 closes the gate before it
/// reports back, so this holds whatever the dispatcher loop is doing meanwhile.
/// 50 rounds with two threads spinning on this 2-core machine's cores; the bound is
/// measured from when the stand-in answered 429, which is before the gateway read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_prepared_before_a_429_is_read_waits_for_the_pause() {
    const PAUSE: Duration = Duration::from_millis(100);
    let (addr, answered) = throttling_d365().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!("d365:\n  base_url: http://{addr}\n  company: USMF\n  client_id: x\n  token_url: http://{addr}/token\n  client_secret_file: secret\ndispatcher:\n  throttle_fallback: 100ms\nstorage:\n  data_dir: data\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("secret"), "s\n").unwrap();
    let config = crate::settings::load(dir.path()).unwrap();
    let client = Arc::new(D365Client::new(Arc::new(config.d365.clone().unwrap())).unwrap());
    let token = client.tokens.get().await.unwrap();
    let policy = Arc::new(config.dispatcher.retry.clone());
    let record = |id: u64, order: &str| {
        let new = crate::outbox::NewMessage {
            production_order: order.into(),
            message_type: "ProdProductionOrderStart".into(),
            content: format!(r#"{{"ProductionOrderNumber":"{order}"}}"#),
            origin: "test".into(),
            line: None,
        };
        Record::new(id, &new, jiff::Timestamp::now())
    };
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let busy = busy.clone();
            std::thread::spawn(move || {
                while busy.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();

    for round in 0..50u64 {
        let gate = Arc::new(PauseGate::default());
        let first = send_one(
            client.clone(),
            record(2 * round + 1, "P1"),
            token.clone(),
            policy.clone(),
            gate.clone(),
        )
        .await;
        assert_eq!(first.decision, Decision::Throttle { pause: PAUSE });
        // Another lane's task, spawned in the same turn, runs only now.
        let second = send_one(
            client.clone(),
            record(2 * round + 2, "P2"),
            token.clone(),
            policy.clone(),
            gate,
        )
        .await;
        assert_eq!(second.decision, Decision::Delivered);
        let answered = answered.lock().unwrap().clone();
        let (throttled, next) = (
            answered[2 * round as usize],
            answered[2 * round as usize + 1],
        );
        assert!(
            next >= throttled + PAUSE,
            "round {round}: a request went out {:?} after the 429, inside the pause",
            next - throttled
        );
    }
    busy.store(false, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
}

/// A dispatcher on a fresh outbox whose D365 is never reached (nothing is sent in these
/// tests); the directory lives as long as the first element.
fn dispatcher_without_d365() -> (tempfile::TempDir, Outbox, Dispatcher) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        "d365:\n  base_url: http://127.0.0.1:9\n  company: USMF\n  client_id: x\n  token_url: http://127.0.0.1:9/token\n  client_secret_file: secret\nstorage:\n  data_dir: data\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("secret"), "s\n").unwrap();
    let config = crate::settings::load(dir.path()).unwrap();
    let outbox = Outbox::open(&config.storage.data_dir).unwrap();
    let client = Arc::new(D365Client::new(Arc::new(config.d365.clone().unwrap())).unwrap());
    let dispatcher = Dispatcher::new(
        outbox.clone(),
        client,
        config.dispatcher.clone(),
        Duration::from_secs(1),
    );
    (dir, outbox, dispatcher)
}

/// An order held before a restart (its head uncertain) is known to the dispatcher from
/// its first turn: said once at start, not announced again as if it were new.
#[tokio::test]
async fn an_order_held_before_a_restart_is_known_from_the_start() {
    let (_dir, outbox, dispatcher) = dispatcher_without_d365();
    let new = |order: &str| NewMessage {
        production_order: order.into(),
        message_type: "ProdProductionOrderStart".into(),
        content: format!(r#"{{"ProductionOrderNumber":"{order}"}}"#),
        origin: "test".into(),
        line: None,
    };
    let records = outbox
        .commit(Ingest::of(vec![new("P1"), new("P2")]))
        .await
        .unwrap()
        .records;
    // P1's head was on the wire when the previous run was killed.
    outbox.mark_sending(&[records[0].id]).await.unwrap();
    dispatcher.recover_interrupted().await.unwrap();
    assert_eq!(outbox.get(records[0].id).unwrap().state, State::Uncertain);

    let mut state = DispatchState::default();
    dispatcher.restore_deadlines(&mut state).unwrap();
    assert_eq!(state.held, HashSet::from([records[0].id]));
    // The first turn meets it as known: `unmarked` announces only what it inserts.
    let picked = vec![("P1".to_string(), records[0].id)];
    dispatcher.unmarked(&mut state, &picked, &[]);
    assert!(
        !state.held.insert(records[0].id),
        "held from the start, not newly"
    );
}

#[tokio::test]
async fn a_send_task_that_panics_frees_its_lane_and_leaves_the_message_uncertain() {
    let (_dir, outbox, dispatcher) = dispatcher_without_d365();
    let r = outbox
        .commit(Ingest::of(vec![NewMessage {
            production_order: "P1".into(),
            message_type: "ProdProductionOrderStart".into(),
            content: r#"{"ProductionOrderNumber":"P1"}"#.into(),
            origin: "test".into(),
            line: None,
        }]))
        .await
        .unwrap()
        .records
        .remove(0);
    outbox.mark_sending(&[r.id]).await.unwrap();

    let mut state = DispatchState::default();
    let mut tasks: JoinSet<SendResult> = JoinSet::new();
    let handle = tasks.spawn(async { panic!("a send task panicked (test)") });
    state.busy_orders.insert("P1".into());
    state.in_flight.insert(handle.id(), (r.id, "P1".into()));
    let joined = tasks.join_next_with_id().await.unwrap();
    let judged = dispatcher.judge(&mut state, vec![joined]);
    assert!(
        state.in_flight.is_empty() && state.busy_orders.is_empty(),
        "the order's lane is free again"
    );
    outbox.settle(judged.settlements).await.unwrap();
    let after = outbox.get(r.id).unwrap();
    assert_eq!(after.state, State::Uncertain);
    assert!(after
        .last_error
        .unwrap()
        .contains("the request may have been written"));
}
