//! A counting PLC for whole-gateway tests: a tokio-modbus TCP server on 127.0.0.1:0 whose
//! holding registers 0–1 hold a u32 piece counter (big-endian word order), as a machine's
//! good-parts counter would be read.

use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

#[derive(Clone, Default)]
pub struct CounterPlc {
    counter: Arc<AtomicU32>,
    reads: Arc<AtomicUsize>,
}

impl CounterPlc {
    /// Serves on 127.0.0.1:0 until the returned task is aborted.
    pub async fn start() -> (CounterPlc, SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plc = CounterPlc::default();
        let server = plc.serve(listener);
        (plc, addr, server)
    }

    /// Serves this PLC (same counter) again on `addr`, as after a power cycle of its
    /// Modbus gateway.
    pub async fn restart(&self, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
        self.serve(TcpListener::bind(addr).await.unwrap())
    }

    fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let service = self.clone();
        tokio::spawn(async move {
            let server = tokio_modbus::server::tcp::Server::new(listener);
            let on_connected = move |stream, _addr: SocketAddr| {
                let service = service.clone();
                async move { Ok(Some((service, stream))) }
            };
            let _ = server.serve(&on_connected, |_err| {}).await;
        })
    }

    pub fn add(&self, pieces: u32) {
        self.counter.fetch_add(pieces, Ordering::Relaxed);
    }

    pub fn count(&self) -> u32 {
        self.counter.load(Ordering::Relaxed)
    }

    /// Read requests answered so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }

    /// The gateway's configuration for this PLC: a Modbus source `plc` polling the
    /// counter every 20 ms, and a rule reporting its increase as pieces of `order`.
    pub fn gateway_yaml(addr: SocketAddr) -> String {
        format!("  - type: modbus\n    id: plc\n    tcp: {addr}\n    poll: 20ms\n    timeout: 500ms\n    points:\n      - {{ name: good, unit: 1, kind: holding_register, address: 0, type: u32, word_order: big }}\n")
    }

    pub fn rules_yaml(order: &str) -> String {
        format!("rules:\n  - name: plc-good\n    line: plc-line\n    when: {{ source: plc, point: good }}\n    count: delta\n    counter_max: 4294967295\n    emit:\n      type: ProdProductionOrderReportFinished\n      fields: {{ ProductionOrderNumber: {order}, ItemNumber: A0001, ReportedGoodQuantity: \"{{quantity}}\" }}\n")
    }
}

impl tokio_modbus::server::Service for CounterPlc {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        ready(match req.request {
            Request::ReadHoldingRegisters(0, 2) => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                let v = self.count();
                Ok(Response::ReadHoldingRegisters(vec![
                    (v >> 16) as u16,
                    (v & 0xFFFF) as u16,
                ]))
            }
            _ => Err(ExceptionCode::IllegalDataAddress),
        })
    }
}
