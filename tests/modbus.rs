//! The Modbus source against a fake PLC built on tokio-modbus's server: TCP on
//! 127.0.0.1:0, and RTU over a pseudo-terminal pair made by socat.

use mes_gateway_testkit as support;

use tokio::io::AsyncReadExt as _;

use support::device::{PtyPair, Running};

use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mes_gateway::event::Value;
use mes_gateway::source::modbus::config::{
    ModbusConfig, ModbusPoint, ModbusTransport, PointKind, PointType, WordOrder,
};
use mes_gateway::source::modbus::ModbusSource;
use mes_gateway::source::serial::config::{Parity, SerialPort};
use mes_gateway::source::SourceHealth;
use mes_gateway::systemd::Heartbeats;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

/// A PLC's memory: 16 coils and 16 holding registers per unit; anything else is an
/// illegal address, as a real device would answer.
#[derive(Clone, Default)]
struct Plc {
    coils: Arc<Mutex<[[bool; 16]; 3]>>,
    registers: Arc<Mutex<[[u16; 16]; 3]>>,
}

impl Plc {
    fn set_coil(&self, unit: usize, address: usize, value: bool) {
        self.coils.lock().unwrap()[unit][address] = value;
    }

    fn answer(&self, unit: usize, request: Request<'_>) -> Result<Response, ExceptionCode> {
        let range = |a: u16, n: u16| {
            let (a, n) = (usize::from(a), usize::from(n));
            if a + n <= 16 {
                Ok(a..a + n)
            } else {
                Err(ExceptionCode::IllegalDataAddress)
            }
        };
        match request {
            Request::ReadCoils(a, n) => Ok(Response::ReadCoils(
                self.coils.lock().unwrap()[unit][range(a, n)?].to_vec(),
            )),
            Request::ReadHoldingRegisters(a, n) => Ok(Response::ReadHoldingRegisters(
                self.registers.lock().unwrap()[unit][range(a, n)?].to_vec(),
            )),
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

impl tokio_modbus::server::Service for Plc {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        ready(self.answer(usize::from(req.slave).min(2), req.request))
    }
}

/// Serves `plc` on `listener` until the returned task is aborted.
fn serve(listener: TcpListener, plc: Plc) -> tokio::task::JoinHandle<()> {
    serve_counting(listener, plc, Arc::default())
}

/// A fake PLC serving on 127.0.0.1:0: its address, its memory and the server task.
async fn tcp_plc() -> (SocketAddr, Plc, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let plc = Plc::default();
    let server = serve(listener, plc.clone());
    (addr, plc, server)
}

/// Like [`serve`], counting the connections it accepts.
fn serve_counting(
    listener: TcpListener,
    plc: Plc,
    connections: Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let on_connected = move |stream, _addr: SocketAddr| {
            let plc = plc.clone();
            connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move { Ok(Some((plc, stream))) }
        };
        let _ = server.serve(&on_connected, |_err| {}).await;
    })
}

fn point(name: &str, unit: u8, kind: PointKind, address: u16, ty: PointType) -> ModbusPoint {
    ModbusPoint {
        name: name.into(),
        unit,
        kind,
        address,
        ty,
        word_order: WordOrder::Big,
        poll: Duration::from_millis(20),
    }
}

fn start(transport: ModbusTransport, points: Vec<ModbusPoint>, timeout: Duration) -> Running {
    start_with(transport, points, timeout, false)
}

fn start_with(
    transport: ModbusTransport,
    points: Vec<ModbusPoint>,
    timeout: Duration,
    close_between_polls: bool,
) -> Running {
    let config = ModbusConfig {
        id: "plc".into(),
        transport,
        timeout,
        close_between_polls,
        points,
    };
    let (tx, rx) = mpsc::channel(64);
    let health = Arc::new(SourceHealth::default());
    let cancel = CancellationToken::new();
    let source = ModbusSource::new(
        config,
        Heartbeats::default().register("plc"),
        health.clone(),
    );
    tokio::spawn(source.run(tx, cancel.clone()));
    Running {
        events: rx,
        health,
        cancel,
    }
}

#[tokio::test]
async fn rising_edges_of_a_coil_are_seen_exactly_once_each() {
    let (addr, plc, server) = tcp_plc().await;
    let mut src = start(
        ModbusTransport::Tcp(addr),
        vec![point("running", 1, PointKind::Coil, 3, PointType::Bool)],
        Duration::from_secs(2),
    );
    assert_eq!(
        src.next().await,
        ("running".into(), Value::Bool(false)),
        "the value after connecting"
    );
    let mut rising = 0;
    for _ in 0..10 {
        plc.set_coil(1, 3, true);
        let (_, v) = src.next().await;
        rising += usize::from(v == Value::Bool(true));
        plc.set_coil(1, 3, false);
        assert_eq!(src.next().await.1, Value::Bool(false));
    }
    assert_eq!(rising, 10);
    assert!(src.events.try_recv().is_err(), "no event without a change");
    src.cancel.cancel();
    server.abort();
}

#[tokio::test]
async fn polling_resumes_by_itself_after_the_server_restarts() {
    let (addr, plc, server) = tcp_plc().await;
    let mut src = start(
        ModbusTransport::Tcp(addr),
        vec![point("running", 1, PointKind::Coil, 0, PointType::Bool)],
        Duration::from_millis(500),
    );
    src.next().await;
    src.wait_health("connected", SourceHealth::is_connected)
        .await;

    server.abort();
    src.wait_health("down", |h| !h.is_connected()).await;
    plc.set_coil(1, 0, true);
    let server = serve(TcpListener::bind(addr).await.unwrap(), plc.clone());
    src.wait_health("connected again", SourceHealth::is_connected)
        .await;
    assert_eq!(src.next().await, ("running".into(), Value::Bool(true)));
    src.cancel.cancel();
    server.abort();
}

#[tokio::test]
async fn a_device_exception_is_reported_and_does_not_reconnect() {
    let (addr, plc, server) = tcp_plc().await;
    plc.registers.lock().unwrap()[1][2] = 7;
    let points = vec![
        point("count", 1, PointKind::HoldingRegister, 2, PointType::U16),
        // Past the device's 16 registers: it answers "illegal data address".
        point(
            "missing",
            1,
            PointKind::HoldingRegister,
            100,
            PointType::U16,
        ),
    ];
    let mut src = start(ModbusTransport::Tcp(addr), points, Duration::from_secs(2));
    assert_eq!(src.next().await, ("count".into(), Value::Number(7.0)));
    src.wait_health("exceptions counted", |h| {
        h.decode_errors.load(std::sync::atomic::Ordering::Relaxed) >= 3
    })
    .await;
    plc.registers.lock().unwrap()[1][2] = 8;
    assert_eq!(
        src.next().await,
        ("count".into(), Value::Number(8.0)),
        "the good point keeps flowing"
    );
    assert!(src.health.is_connected());
    assert_eq!(
        src.health
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "connected once, never again"
    );
    src.cancel.cancel();
    server.abort();
}

#[tokio::test]
async fn a_server_that_never_answers_triggers_the_timeout_and_a_fresh_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = accepted.clone();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            held.push(stream);
        }
    });
    let src = start(
        ModbusTransport::Tcp(addr),
        vec![point("running", 1, PointKind::Coil, 0, PointType::Bool)],
        Duration::from_millis(200),
    );
    src.wait_health("down after a timeout", |h| {
        h.last_error()
            .is_some_and(|e| e.contains("no answer within"))
    })
    .await;
    src.wait_health("a second connection", |_| {
        accepted.load(std::sync::atomic::Ordering::Relaxed) >= 2
    })
    .await;
    src.cancel.cancel();
    silent.abort();
}

fn serve_rtu(path: &std::path::Path, plc: Plc) -> tokio::task::JoinHandle<()> {
    let server = tokio_modbus::server::rtu::Server::new_from_path(path, 19200)
        .expect("open the PLC end of the pty");
    tokio::spawn(async move {
        let _ = server.serve_forever(plc).await;
    })
}

#[tokio::test]
async fn rtu_over_a_pty_reads_two_units_and_reopens_a_recreated_port() {
    let dir = tempfile::tempdir().unwrap();
    let pty = PtyPair::start(dir.path(), "plc", "gateway").await;
    let plc = Plc::default();
    plc.set_coil(1, 0, true);
    plc.registers.lock().unwrap()[2][5] = 1234;
    let server = serve_rtu(&dir.path().join("plc"), plc.clone());
    let serial = SerialPort {
        device: dir.path().join("gateway"),
        baud: 19200,
        parity: Parity::None,
        data_bits: 8,
        stop_bits: 1,
    };
    let points = vec![
        point("unit1_coil", 1, PointKind::Coil, 0, PointType::Bool),
        point(
            "unit2_count",
            2,
            PointKind::HoldingRegister,
            5,
            PointType::U16,
        ),
    ];
    let mut src = start(
        ModbusTransport::Rtu(serial),
        points,
        Duration::from_millis(500),
    );
    let mut seen = vec![src.next().await, src.next().await];
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        vec![
            ("unit1_coil".into(), Value::Bool(true)),
            ("unit2_count".into(), Value::Number(1234.0))
        ]
    );

    // The adapter is unplugged: the port disappears, then comes back.
    server.abort();
    pty.stop().await;
    src.wait_health("down", |h| !h.is_connected()).await;
    let pty = PtyPair::start(dir.path(), "plc", "gateway").await;
    plc.registers.lock().unwrap()[2][5] = 1235;
    let server = serve_rtu(&dir.path().join("plc"), plc.clone());
    src.wait_health("reopened", SourceHealth::is_connected)
        .await;
    let mut after = Vec::new();
    while after.len() < 2 {
        after.push(src.next().await);
    }
    assert!(
        after.contains(&("unit2_count".into(), Value::Number(1235.0))),
        "{after:?}"
    );
    src.cancel.cancel();
    server.abort();
    pty.stop().await;
}

#[tokio::test]
async fn close_between_polls_opens_a_connection_per_round_and_still_sees_changes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let plc = Plc::default();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = serve_counting(listener, plc.clone(), connections.clone());
    let mut src = start_with(
        ModbusTransport::Tcp(addr),
        vec![point("running", 1, PointKind::Coil, 0, PointType::Bool)],
        Duration::from_secs(2),
        true,
    );
    assert_eq!(src.next().await.1, Value::Bool(false));
    plc.set_coil(1, 0, true);
    assert_eq!(src.next().await.1, Value::Bool(true));
    plc.set_coil(1, 0, false);
    assert_eq!(src.next().await.1, Value::Bool(false));
    assert!(
        connections.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "a new connection for every round"
    );
    src.cancel.cancel();
    server.abort();
}

/// A PLC that does not answer behind a live adapter (the pty opens fine): the source is
/// never called connected, says "port open, device silent since …", waits longer after
/// each silent attempt, and is healthy as soon as the device answers. A stop interrupts
/// a request in flight instead of waiting for its timeout.
#[tokio::test]
async fn a_silent_device_behind_an_open_port_is_down_with_growing_delays_until_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let pty = PtyPair::start(dir.path(), "plc", "gateway").await;
    let serial = SerialPort {
        device: dir.path().join("gateway"),
        baud: 19200,
        parity: Parity::None,
        data_bits: 8,
        stop_bits: 1,
    };
    let mut src = start(
        ModbusTransport::Rtu(serial.clone()),
        vec![point("running", 2, PointKind::Coil, 0, PointType::Bool)],
        Duration::from_millis(300),
    );
    // Three silent attempts, timed by the health changes they cause.
    let mut rx = src.health.subscribe();
    let mut failures = Vec::new();
    let watched = tokio::time::timeout(Duration::from_secs(20), async {
        while failures.len() < 4 {
            rx.changed().await.unwrap();
            assert!(
                !src.health.is_connected(),
                "called connected while the device never answered"
            );
            failures.push(std::time::Instant::now());
        }
    })
    .await;
    assert!(watched.is_ok(), "no repeated attempts");
    let gaps: Vec<Duration> = failures.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[2] > gaps[1] && gaps[1] > gaps[0],
        "the delay grows: {gaps:?}"
    );
    let error = src.health.last_error().unwrap_or_default();
    assert!(
        error.starts_with("port open, device silent since ") && error.contains("no answer within"),
        "{error}"
    );
    assert_eq!(
        src.health
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // The device starts answering: healthy, and its value comes.
    let plc = Plc::default();
    plc.set_coil(2, 0, true);
    let server = serve_rtu(&dir.path().join("plc"), plc.clone());
    src.wait_health(
        "connected once the device answers",
        SourceHealth::is_connected,
    )
    .await;
    assert_eq!(src.next().await, ("running".into(), Value::Bool(true)));
    src.cancel.cancel();
    server.abort();

    // A stop while a request waits for a silent device returns at once.
    let config = ModbusConfig {
        id: "slow".into(),
        transport: ModbusTransport::Rtu(serial),
        timeout: Duration::from_secs(30),
        close_between_polls: false,
        points: vec![point("running", 2, PointKind::Coil, 0, PointType::Bool)],
    };
    let (tx, _rx) = mpsc::channel(64);
    let health = Arc::new(SourceHealth::default());
    let cancel = CancellationToken::new();
    // The device's end of the line, to see the request arrive.
    let mut device = tokio::fs::File::open(dir.path().join("plc")).await.unwrap();
    let task = tokio::spawn(
        ModbusSource::new(
            config,
            Heartbeats::default().register("slow"),
            health.clone(),
        )
        .run(tx, cancel.clone()),
    );
    let mut request = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), device.read_exact(&mut request))
        .await
        .expect("the request reached the device")
        .unwrap();
    assert_eq!(request[0], 2, "addressed to unit 2");
    let stopped = std::time::Instant::now();
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops without waiting out the 30 s timeout")
        .unwrap()
        .unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(2));
    pty.stop().await;
}
