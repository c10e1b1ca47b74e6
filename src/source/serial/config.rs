//! The serial source's configuration (`type: serial`) and the serial line settings it
//! shares with Modbus RTU.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::Problems;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSerialPort {
    /// Prefer stable names: /dev/serial/by-id/...
    pub device: String,
    pub baud: Option<u32>,
    pub parity: Option<Parity>,
    pub data_bits: Option<u8>,
    pub stop_bits: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone)]
pub struct SerialPort {
    pub device: PathBuf,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

impl SerialPort {
    pub fn open(&self) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
        use tokio_serial::SerialPortBuilderExt;
        tokio_serial::new(self.device.to_string_lossy(), self.baud)
            .parity(match self.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            })
            .data_bits(match self.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .stop_bits(if self.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            })
            .open_native_async()
    }
}

pub fn serial_port(raw: &RawSerialPort, prefix: &str, problems: &mut Problems) -> SerialPort {
    let data_bits = raw.data_bits.unwrap_or(8);
    if !(5..=8).contains(&data_bits) {
        problems.push((
            format!("{prefix}.data_bits"),
            format!("{data_bits}: expected 5 to 8"),
        ));
    }
    let stop_bits = raw.stop_bits.unwrap_or(1);
    if !(1..=2).contains(&stop_bits) {
        problems.push((
            format!("{prefix}.stop_bits"),
            format!("{stop_bits}: expected 1 or 2"),
        ));
    }
    if raw.device.trim().is_empty() {
        problems.push((
            crate::config::join_path(prefix, "device"),
            "must not be empty".into(),
        ));
    }
    SerialPort {
        device: PathBuf::from(&raw.device),
        baud: raw.baud.unwrap_or(9600),
        parity: raw.parity.unwrap_or(Parity::None),
        data_bits,
        stop_bits,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSerial {
    /// The source type, read by the loader to choose this struct.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    /// Prefer stable names: /dev/serial/by-id/...
    pub device: String,
    pub baud: Option<u32>,
    pub parity: Option<Parity>,
    pub data_bits: Option<u8>,
    pub stop_bits: Option<u8>,
    pub point: Option<String>,
    pub framing: Option<Framing>,
    pub delimiter: Option<String>,
    pub length: Option<usize>,
    pub pattern: Option<String>,
    pub mode: Option<SerialMode>,
    pub max_frame: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// Frames end with `delimiter` (default `\n`; a trailing `\r` is removed).
    Lines,
    /// Frames are `length` bytes.
    Fixed,
    /// Each match of `pattern` in the byte stream is a frame.
    Regex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    /// The frame's text is the value (a barcode, a weight).
    Data,
    /// Each frame is one impulse (`true` then `false`): a presence sensor.
    Presence,
}

#[derive(Debug, Clone)]
pub enum Framer {
    Lines(Vec<u8>),
    Fixed(usize),
    Regex(regex::bytes::Regex),
}

#[derive(Debug, Clone)]
pub struct SerialConfig {
    pub id: String,
    pub port: SerialPort,
    pub point: String,
    pub framer: Framer,
    pub mode: SerialMode,
    pub max_frame: usize,
}

pub fn serial(raw: RawSerial, problems: &mut Problems) -> Option<SerialConfig> {
    let port = serial_port(
        &RawSerialPort {
            device: raw.device.clone(),
            baud: raw.baud,
            parity: raw.parity,
            data_bits: raw.data_bits,
            stop_bits: raw.stop_bits,
        },
        "",
        problems,
    );
    let framer = match raw.framing.unwrap_or(Framing::Lines) {
        Framing::Lines => {
            let d = raw.delimiter.clone().unwrap_or_else(|| "\n".into());
            if d.is_empty() {
                problems.push(("delimiter".into(), "must not be empty".into()));
            }
            Framer::Lines(d.into_bytes())
        }
        Framing::Fixed => match raw.length {
            Some(n) if n > 0 => Framer::Fixed(n),
            _ => {
                problems.push((
                    "length".into(),
                    "framing `fixed` needs a `length` greater than zero".into(),
                ));
                return None;
            }
        },
        Framing::Regex => match raw.pattern.as_deref().map(regex::bytes::Regex::new) {
            Some(Ok(r)) => Framer::Regex(r),
            Some(Err(e)) => {
                problems.push(("pattern".into(), format!("invalid regular expression: {e}")));
                return None;
            }
            None => {
                problems.push(("pattern".into(), "framing `regex` needs a `pattern`".into()));
                return None;
            }
        },
    };
    Some(SerialConfig {
        id: raw.id,
        port,
        point: raw.point.unwrap_or_else(|| "line".into()),
        framer,
        mode: raw.mode.unwrap_or(SerialMode::Data),
        max_frame: raw.max_frame.unwrap_or(4096),
    })
}
