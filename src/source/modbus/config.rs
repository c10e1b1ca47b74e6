//! The Modbus source's configuration (`type: modbus`, TCP or RTU): points, poll
//! intervals, and the checks that keep a read plan inside the 16-bit address space.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Problems;
use crate::source::serial::config::{serial_port, RawSerialPort, SerialPort};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModbus {
    /// The source type, read by the loader to choose this struct.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    /// `host:port` of a Modbus TCP device.
    pub tcp: Option<String>,
    /// A serial line for Modbus RTU.
    pub rtu: Option<RawSerialPort>,
    pub timeout: Option<String>,
    pub poll: Option<String>,
    #[serde(default)]
    pub close_between_polls: bool,
    pub points: Vec<RawPoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoint {
    pub name: String,
    pub unit: Option<u8>,
    pub kind: PointKind,
    pub address: u16,
    #[serde(rename = "type")]
    pub ty: Option<PointType>,
    pub word_order: Option<WordOrder>,
    pub poll: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    Coil,
    DiscreteInput,
    HoldingRegister,
    InputRegister,
}

impl PointKind {
    pub fn is_bits(self) -> bool {
        matches!(self, PointKind::Coil | PointKind::DiscreteInput)
    }
}

impl fmt::Display for PointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PointKind::Coil => "coils",
            PointKind::DiscreteInput => "discrete inputs",
            PointKind::HoldingRegister => "holding registers",
            PointKind::InputRegister => "input registers",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    F32,
}

/// Which register holds the high word of a 32-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// High word first (the Modbus convention).
    #[default]
    Big,
    Little,
}

#[derive(Debug, Clone)]
pub enum ModbusTransport {
    Tcp(SocketAddr),
    Rtu(SerialPort),
}

impl fmt::Display for ModbusTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModbusTransport::Tcp(a) => write!(f, "tcp {a}"),
            ModbusTransport::Rtu(s) => write!(f, "rtu {} {} baud", s.device.display(), s.baud),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModbusPoint {
    pub name: String,
    pub unit: u8,
    pub kind: PointKind,
    pub address: u16,
    pub ty: PointType,
    pub word_order: WordOrder,
    pub poll: Duration,
}

impl ModbusPoint {
    /// Registers (or bits) the point occupies.
    pub fn width(&self) -> u16 {
        match self.ty {
            PointType::U32 | PointType::I32 | PointType::F32 => 2,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModbusConfig {
    pub id: String,
    pub transport: ModbusTransport,
    pub timeout: Duration,
    pub close_between_polls: bool,
    pub points: Vec<ModbusPoint>,
}

/// The shortest Modbus poll interval and timeout.
const MIN_POLL: Duration = Duration::from_millis(10);

pub fn modbus(raw: RawModbus, problems: &mut Problems) -> Option<ModbusConfig> {
    let duration =
        |key: &str, v: &Option<String>, default: Duration, problems: &mut Problems| match v {
            None => default,
            Some(t) => crate::config::parse_duration(t).unwrap_or_else(|e| {
                problems.push((key.to_string(), e));
                default
            }),
        };
    let transport = match (&raw.tcp, &raw.rtu) {
        (Some(addr), None) => match addr.parse::<SocketAddr>() {
            Ok(a) => Some(ModbusTransport::Tcp(a)),
            Err(_) => {
                problems.push((
                    "tcp".into(),
                    format!("{addr:?}: expected ip:port, e.g. 192.168.0.10:502"),
                ));
                None
            }
        },
        (None, Some(serial)) => Some(ModbusTransport::Rtu(serial_port(serial, "rtu", problems))),
        _ => {
            problems.push((
                String::new(),
                "set exactly one of `tcp` (host:port) or `rtu` (a serial port)".into(),
            ));
            None
        }
    };
    let positive = |key: &str, d: Duration, problems: &mut Problems| {
        if d < MIN_POLL {
            problems.push((
                key.to_string(),
                format!(
                    "must be at least {} (a device cannot be polled or answer faster)",
                    crate::config::format_duration(MIN_POLL)
                ),
            ));
            return MIN_POLL;
        }
        d
    };
    let timeout = duration("timeout", &raw.timeout, Duration::from_secs(1), problems);
    let timeout = positive("timeout", timeout, problems);
    let poll = duration("poll", &raw.poll, Duration::from_millis(500), problems);
    let poll = positive("poll", poll, problems);
    if raw.points.is_empty() {
        problems.push(("points".into(), "configure at least one point".into()));
    }
    let mut points = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, p) in raw.points.iter().enumerate() {
        let path = format!("points[{i}]");
        if !names.insert(p.name.clone()) {
            problems.push((
                format!("{path}.name"),
                format!("duplicate point name `{}`", p.name),
            ));
        }
        let ty = p.ty.unwrap_or(if p.kind.is_bits() {
            PointType::Bool
        } else {
            PointType::U16
        });
        if p.kind.is_bits() && ty != PointType::Bool {
            problems.push((
                format!("{path}.type"),
                format!("{} hold single bits: type must be bool", p.kind),
            ));
        }
        let unit = p.unit.unwrap_or(1);
        if raw.rtu.is_some() && !(1..=247).contains(&unit) {
            problems.push((
                format!("{path}.unit"),
                format!("{unit}: RTU unit ids are 1 to 247"),
            ));
        }
        let point = ModbusPoint {
            name: p.name.clone(),
            unit,
            kind: p.kind,
            address: p.address,
            ty,
            word_order: p.word_order.unwrap_or_default(),
            poll: {
                let d = duration(&format!("{path}.poll"), &p.poll, poll, problems);
                positive(&format!("{path}.poll"), d, problems)
            },
        };
        if u32::from(point.address) + u32::from(point.width()) > 65536 {
            problems.push((
                format!("{path}.address"),
                "the point runs past address 65535".into(),
            ));
        }
        points.push(point);
    }
    Some(ModbusConfig {
        id: raw.id,
        transport: transport?,
        timeout,
        close_between_polls: raw.close_between_polls,
        points,
    })
}
