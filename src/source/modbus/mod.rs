//! Modbus source (tokio-modbus), TCP or RTU: polls coils, discrete inputs, holding and
//! input registers, decodes them, and emits a point's value when it changes (and once
//! after every (re)connect).
//!
//! - Points with the same unit, kind and poll interval are read together, in as few
//!   requests as their addresses allow.
//! - Every request has a timeout. After a timeout or a transport error the connection
//!   is dropped and opened again with capped backoff: a half-dead connection is never
//!   reused (a late answer would be taken for the next request's).
//! - A device exception (illegal address, busy…) is the device answering: it is logged
//!   and counted, and the connection stays.
//! - `close_between_polls` closes the TCP connection after each round, for devices that
//!   accept a single master connection.
//! - Healthy means the *device* answered (a value or an exception), not that the port
//!   or adapter opened: a silent PLC behind a live RS-485 adapter or gateway is "port
//!   open, device silent since …", and the reconnect delay keeps growing until the
//!   device answers. A stop interrupts a request in flight.

use crate::backoff::Backoff;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context, Reader};
use tokio_modbus::slave::{Slave, SlaveContext};
use tokio_util::sync::CancellationToken;

use super::{SourceError, SourceEvent, SourceHealth};
pub mod config;

use crate::event::{Event, Value};
use crate::systemd::Heartbeat;
use config::{ModbusConfig, ModbusTransport, PointKind, PointType, WordOrder};

const RECONNECT: Backoff = Backoff::doubling(Duration::from_millis(200), Duration::from_secs(30));
/// Largest read the protocol allows, in registers and in bits.
const MAX_REGISTERS: u16 = 125;
const MAX_BITS: u16 = 2000;
/// Addresses this far apart are still read in one request (reading a few unused
/// registers is cheaper than another round trip on a serial bus).
const MAX_GAP: u16 = 8;

/// One request and the points it serves.
#[derive(Debug, Clone)]
struct Read {
    unit: u8,
    kind: PointKind,
    start: u16,
    count: u16,
    poll: Duration,
    /// Indexes into the configuration's points.
    points: Vec<usize>,
}

impl Read {
    /// One past the last address read.
    fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }
}

/// A transport error in words: a connection the device closed surfaces from the socket
/// as errno 0, which the OS words as "Success (os error 0)".
fn transport_error(e: &tokio_modbus::Error) -> String {
    let text = e.to_string();
    if text.contains("os error 0") {
        "the device closed the connection".to_string()
    } else {
        text
    }
}

/// Groups points into as few reads as possible.
fn plan(config: &ModbusConfig) -> Vec<Read> {
    let mut groups: BTreeMap<(u8, u8, Duration), Vec<usize>> = BTreeMap::new();
    for (i, p) in config.points.iter().enumerate() {
        groups
            .entry((p.unit, p.kind as u8, p.poll))
            .or_default()
            .push(i);
    }
    let mut reads = Vec::new();
    for ((unit, _, poll), mut idx) in groups {
        idx.sort_by_key(|i| config.points[*i].address);
        let kind = config.points[idx[0]].kind;
        let limit = if kind.is_bits() {
            MAX_BITS
        } else {
            MAX_REGISTERS
        };
        let mut current: Option<Read> = None;
        for i in idx {
            let p = &config.points[i];
            // In u32: the last address (65535) plus its width is past u16.
            let end = u32::from(p.address) + u32::from(p.width());
            match &mut current {
                Some(r)
                    if u32::from(p.address) <= r.end() + u32::from(MAX_GAP)
                        && end - u32::from(r.start) <= u32::from(limit) =>
                {
                    // At most `limit`, so it fits.
                    r.count = r.count.max((end - u32::from(r.start)) as u16);
                    r.points.push(i);
                }
                _ => {
                    reads.extend(current.take());
                    current = Some(Read {
                        unit,
                        kind,
                        start: p.address,
                        count: p.width(),
                        poll,
                        points: vec![i],
                    });
                }
            }
        }
        reads.extend(current);
    }
    reads
}

/// Decodes a register point from the words of its read.
pub fn decode_registers(words: &[u16], ty: PointType, order: WordOrder) -> Option<f64> {
    let pair = || -> Option<u32> {
        let (a, b) = (u32::from(*words.first()?), u32::from(*words.get(1)?));
        Some(match order {
            WordOrder::Big => (a << 16) | b,
            WordOrder::Little => (b << 16) | a,
        })
    };
    Some(match ty {
        PointType::Bool => f64::from(u8::from(*words.first()? != 0)),
        PointType::U16 => f64::from(*words.first()?),
        PointType::I16 => f64::from(*words.first()? as i16),
        PointType::U32 => f64::from(pair()?),
        PointType::I32 => f64::from(pair()? as i32),
        PointType::F32 => f64::from(f32::from_bits(pair()?)),
    })
}

#[derive(Debug)]
pub struct ModbusSource {
    config: ModbusConfig,
    heartbeat: Heartbeat,
    health: Arc<SourceHealth>,
}

impl ModbusSource {
    pub fn new(
        config: ModbusConfig,
        heartbeat: Heartbeat,
        health: Arc<SourceHealth>,
    ) -> ModbusSource {
        ModbusSource {
            config,
            heartbeat,
            health,
        }
    }

    async fn connect(&self) -> Result<Context, String> {
        let first_unit = Slave(self.config.points.first().map_or(1, |p| p.unit));
        let attempt = async {
            match &self.config.transport {
                ModbusTransport::Tcp(addr) => {
                    tokio_modbus::client::tcp::connect_slave(*addr, first_unit)
                        .await
                        .map_err(|e| format!("connect {addr}: {e}"))
                }
                ModbusTransport::Rtu(serial) => {
                    let stream = serial
                        .open()
                        .map_err(|e| format!("open {}: {e}", serial.device.display()))?;
                    Ok(tokio_modbus::client::rtu::attach_slave(stream, first_unit))
                }
            }
        };
        tokio::time::timeout(self.config.timeout, attempt)
            .await
            .map_err(|_| "connect timed out".to_string())?
    }

    pub async fn run(
        self,
        out: mpsc::Sender<SourceEvent>,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let id: Arc<str> = self.config.id.as_str().into();
        let reads = plan(&self.config);
        tracing::info!(source = %id, endpoint = %self.config.transport, points = self.config.points.len(), reads = reads.len(), "Modbus source starting.");
        let mut backoff = RECONNECT.start();
        let tick = reads
            .iter()
            .map(|r| r.poll)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(self.heartbeat.period());
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Vec<Option<Value>> = vec![None; self.config.points.len()];
        let mut due: Vec<Instant> = vec![Instant::now(); reads.len()];
        let mut ctx: Option<Context> = None;
        // Since when the device has been silent behind an open port.
        let mut silent_since: Option<jiff::Timestamp> = None;
        loop {
            self.heartbeat.beat();
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            if ctx.is_none() {
                let connected = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    c = self.connect() => c,
                };
                match connected {
                    Ok(c) => {
                        ctx = Some(c);
                        // Not healthy yet, nor the backoff reset: the port opened, the
                        // device has not answered. Emit every value again once it does.
                        last.iter_mut().for_each(|v| *v = None);
                    }
                    Err(e) => {
                        self.health.set_connected(&id, false, Some(&e));
                        if !crate::backoff::pause(&cancel, backoff.fail()).await {
                            return Ok(());
                        }

                        continue;
                    }
                }
            }
            let Some(context) = ctx.as_mut() else {
                continue;
            };
            let now = Instant::now();
            let mut broken = None;
            for (r, read) in reads.iter().enumerate() {
                if due[r] > now {
                    continue;
                }
                due[r] = now + read.poll;
                let answer = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    a = self.read(context, read) => a,
                };
                if answer.is_ok() {
                    // The device answered: healthy (logged on change only), and the
                    // next failure starts from the shortest delay again.
                    self.health.set_connected(&id, true, None);
                    silent_since = None;
                    backoff.reset();
                }
                match answer {
                    Ok(Some(values)) => {
                        for (i, v) in values {
                            if last[i].as_ref() != Some(&v) {
                                last[i] = Some(v.clone());
                                self.health.event();
                                let event = Event {
                                    source: id.clone(),
                                    point: self.config.points[i].name.as_str().into(),
                                    value: v,
                                    at: jiff::Timestamp::now(),
                                };
                                super::forward(&out, event.into(), &self.heartbeat, &id).await?;
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = broken {
                // The port opened but the device did not answer: say so, with since when.
                let since = *silent_since.get_or_insert_with(jiff::Timestamp::now);
                let detail = format!(
                    "port open, device silent since {}: {e}",
                    since.strftime("%Y-%m-%d %H:%M:%S UTC")
                );
                self.health.set_connected(&id, false, Some(&detail));
                ctx = None;
                if !crate::backoff::pause(&cancel, backoff.fail()).await {
                    return Ok(());
                }
            } else if self.config.close_between_polls {
                if let Some(mut c) = ctx.take() {
                    let _ = c.disconnect().await;
                }
            }
        }
    }

    /// One request. `Ok(None)`: the device answered with an exception (logged).
    /// `Err`: a transport error or timeout; the connection must be dropped.
    async fn read(
        &self,
        ctx: &mut Context,
        read: &Read,
    ) -> Result<Option<Vec<(usize, Value)>>, String> {
        ctx.set_slave(Slave(read.unit));
        let timeout = self.config.timeout;
        let what = || {
            format!(
                "unit {} {} {}..{}",
                read.unit,
                read.kind,
                read.start,
                read.end()
            )
        };
        enum Raw {
            Bits(Vec<bool>),
            Words(Vec<u16>),
        }
        let result = match read.kind {
            PointKind::Coil => {
                tokio::time::timeout(timeout, ctx.read_coils(read.start, read.count))
                    .await
                    .map(|r| r.map(|r| r.map(Raw::Bits)))
            }
            PointKind::DiscreteInput => {
                tokio::time::timeout(timeout, ctx.read_discrete_inputs(read.start, read.count))
                    .await
                    .map(|r| r.map(|r| r.map(Raw::Bits)))
            }
            PointKind::HoldingRegister => {
                tokio::time::timeout(timeout, ctx.read_holding_registers(read.start, read.count))
                    .await
                    .map(|r| r.map(|r| r.map(Raw::Words)))
            }
            PointKind::InputRegister => {
                tokio::time::timeout(timeout, ctx.read_input_registers(read.start, read.count))
                    .await
                    .map(|r| r.map(|r| r.map(Raw::Words)))
            }
        };
        let raw = match result {
            Err(_) => return Err(format!("{}: no answer within {:?}", what(), timeout)),
            Ok(Err(e)) => return Err(format!("{}: {}", what(), transport_error(&e))),
            Ok(Ok(Err(exception))) => {
                self.health.decode_error();
                tracing::warn!(source = %self.config.id, read = %what(), exception = ?exception, "The device answered with an exception; the connection stays.");
                return Ok(None);
            }
            Ok(Ok(Ok(raw))) => raw,
        };
        let mut values = Vec::with_capacity(read.points.len());
        for &i in &read.points {
            let p = &self.config.points[i];
            let offset = usize::from(p.address - read.start);
            let value = match &raw {
                Raw::Bits(bits) => bits.get(offset).map(|b| Value::Bool(*b)),
                Raw::Words(words) => match p.ty {
                    PointType::Bool => words.get(offset).map(|w| Value::Bool(*w != 0)),
                    ty => words
                        .get(offset..)
                        .and_then(|w| decode_registers(w, ty, p.word_order))
                        .map(Value::Number),
                },
            };
            match value {
                // A float register holding NaN or infinity (a sensor fault, an unwritten
                // register): not a reading. Counted and skipped, so no counter or
                // aggregate is ever computed from it.
                Some(Value::Number(n)) if !n.is_finite() => {
                    self.health.decode_error();
                    tracing::warn!(source = %self.config.id, point = %p.name, value = %n, "The device sent a value that is not a finite number; skipped.");
                }
                Some(v) => values.push((i, v)),
                None => {
                    self.health.decode_error();
                    tracing::warn!(source = %self.config.id, point = %p.name, "The device answered with fewer values than asked for.");
                }
            }
        }
        Ok(Some(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(
        name: &str,
        unit: u8,
        kind: PointKind,
        address: u16,
        ty: PointType,
        poll_ms: u64,
    ) -> config::ModbusPoint {
        config::ModbusPoint {
            name: name.into(),
            unit,
            kind,
            address,
            ty,
            word_order: WordOrder::Big,
            poll: Duration::from_millis(poll_ms),
        }
    }

    #[test]
    fn points_are_grouped_into_few_reads() {
        use PointKind::*;
        use PointType::*;
        let config = ModbusConfig {
            id: "plc".into(),
            transport: ModbusTransport::Tcp("127.0.0.1:502".parse().unwrap()),
            timeout: Duration::from_secs(1),
            close_between_polls: false,
            points: vec![
                point("a", 1, HoldingRegister, 10, U16, 100),
                point("b", 1, HoldingRegister, 11, U32, 100), // 11..13
                point("c", 1, HoldingRegister, 18, U16, 100), // gap of 5: same read
                point("d", 1, HoldingRegister, 40, U16, 100), // far: new read
                point("e", 2, HoldingRegister, 10, U16, 100), // other unit
                point("f", 1, HoldingRegister, 12, U16, 1000), // other poll interval
                point("g", 1, Coil, 0, Bool, 100),
                point("h", 1, Coil, 1, Bool, 100),
            ],
        };
        let mut reads: Vec<(u8, PointKind, u16, u16, usize)> = plan(&config)
            .iter()
            .map(|r| (r.unit, r.kind, r.start, r.count, r.points.len()))
            .collect();
        reads.sort();
        assert_eq!(
            reads,
            vec![
                (1, Coil, 0, 2, 2),
                (1, HoldingRegister, 10, 9, 3),
                (1, HoldingRegister, 12, 1, 1),
                (1, HoldingRegister, 40, 1, 1),
                (2, HoldingRegister, 10, 1, 1),
            ]
        );
    }

    /// Found by the configuration property test (tests/fuzz.rs): the last address plus
    /// its width overflowed u16 and the source panicked.
    #[test]
    fn points_at_the_last_address_are_planned() {
        use PointKind::*;
        use PointType::*;
        let config = ModbusConfig {
            id: "plc".into(),
            transport: ModbusTransport::Tcp("127.0.0.1:502".parse().unwrap()),
            timeout: Duration::from_secs(1),
            close_between_polls: false,
            points: vec![
                point("last-coil", 1, Coil, 65534, Bool, 100),
                point("very-last-coil", 1, Coil, 65535, Bool, 100),
                point("last-register", 1, HoldingRegister, 65535, U16, 100),
            ],
        };
        let mut reads: Vec<(PointKind, u16, u16, u32, usize)> = plan(&config)
            .iter()
            .map(|r| (r.kind, r.start, r.count, r.end(), r.points.len()))
            .collect();
        reads.sort();
        assert_eq!(
            reads,
            vec![
                (Coil, 65534, 2, 65536, 2),
                (HoldingRegister, 65535, 1, 65536, 1)
            ]
        );
    }

    #[test]
    fn registers_decode_with_word_order() {
        assert_eq!(
            decode_registers(&[0xFFFF], PointType::I16, WordOrder::Big),
            Some(-1.0)
        );
        assert_eq!(
            decode_registers(&[0x0001, 0x0002], PointType::U32, WordOrder::Big),
            Some(65538.0)
        );
        assert_eq!(
            decode_registers(&[0x0002, 0x0001], PointType::U32, WordOrder::Little),
            Some(65538.0)
        );
        assert_eq!(
            decode_registers(&[0xFFFF, 0xFFFE], PointType::I32, WordOrder::Big),
            Some(-2.0)
        );
        let bits = 12.5f32.to_bits();
        assert_eq!(
            decode_registers(
                &[(bits >> 16) as u16, bits as u16],
                PointType::F32,
                WordOrder::Big
            ),
            Some(12.5)
        );
        assert_eq!(
            decode_registers(&[1], PointType::U32, WordOrder::Big),
            None,
            "too few words"
        );
    }
}
