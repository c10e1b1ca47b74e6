//! Serial source (tokio-serial): barcode readers, scales, presence sensors.
//!
//! Bytes are cut into frames (delimited lines, fixed length, or regex matches). In
//! `data` mode a frame's text is the event value; in `presence` mode each frame is one
//! impulse (`true` then `false`). A 0-byte read, a read error or a vanished device
//! closes the port; it is opened again with capped backoff until the device is back
//! (use stable `/dev/serial/by-id/…` paths so a re-plugged adapter keeps its name).
//! Frames that are not UTF-8 or longer than `max_frame` are counted and logged with a
//! printable excerpt; the source keeps running.

use crate::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SourceError, SourceEvent, SourceHealth};
pub mod config;

use crate::event::{Event, Value};
use crate::systemd::Heartbeat;
use config::{Framer, SerialConfig, SerialMode};

const REOPEN: Backoff = Backoff::doubling(Duration::from_millis(200), Duration::from_secs(30));

/// Takes complete frames out of `buf`, leaving an incomplete tail.
pub fn take_frames(framer: &Framer, buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    match framer {
        Framer::Lines(delimiter) => {
            while let Some(pos) = buf
                .windows(delimiter.len())
                .position(|w| w == delimiter.as_slice())
            {
                let mut frame: Vec<u8> = buf.drain(..pos + delimiter.len()).take(pos).collect();
                if frame.last() == Some(&b'\r') {
                    frame.pop();
                }
                if !frame.is_empty() {
                    frames.push(frame);
                }
            }
        }
        Framer::Fixed(n) => {
            while buf.len() >= *n {
                frames.push(buf.drain(..*n).collect());
            }
        }
        Framer::Regex(re) => {
            let mut consumed = 0;
            for m in re.find_iter(buf) {
                frames.push(m.as_bytes().to_vec());
                consumed = m.end();
            }
            buf.drain(..consumed);
        }
    }
    frames
}

#[derive(Debug)]
pub struct SerialSource {
    config: SerialConfig,
    heartbeat: Heartbeat,
    health: Arc<SourceHealth>,
}

impl SerialSource {
    pub fn new(
        config: SerialConfig,
        heartbeat: Heartbeat,
        health: Arc<SourceHealth>,
    ) -> SerialSource {
        SerialSource {
            config,
            heartbeat,
            health,
        }
    }

    pub async fn run(
        self,
        out: mpsc::Sender<SourceEvent>,
        cancel: CancellationToken,
    ) -> Result<(), SourceError> {
        let id: Arc<str> = self.config.id.as_str().into();
        let point: Arc<str> = self.config.point.as_str().into();
        let device = self.config.port.device.display().to_string();
        tracing::info!(source = %id, %device, baud = self.config.port.baud, "Serial source starting.");
        let mut backoff = REOPEN.start();
        let mut heartbeat_ticks = tokio::time::interval(self.heartbeat.period());
        loop {
            let mut port = match self.config.port.open() {
                Ok(p) => {
                    backoff.reset();
                    self.health.set_connected(&id, true, None);
                    p
                }
                Err(e) => {
                    self.health
                        .set_connected(&id, false, Some(&format!("open {device}: {e}")));
                    self.heartbeat.beat();
                    if !crate::backoff::pause(&cancel, backoff.fail()).await {
                        return Ok(());
                    }

                    continue;
                }
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            let reason = loop {
                self.heartbeat.beat();
                let n = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = heartbeat_ticks.tick() => continue,
                    r = port.read(&mut chunk) => r,
                };
                match n {
                    Ok(0) => break "the device closed (0-byte read)".to_string(),
                    Err(e) => break format!("read {device}: {e}"),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                for frame in take_frames(&self.config.framer, &mut buf) {
                    self.frame(&id, &point, &frame, &out).await?;
                }
                if buf.len() > self.config.max_frame {
                    self.health.decode_error();
                    tracing::warn!(source = %id, bytes = buf.len(), excerpt = %crate::text::excerpt(&buf, crate::text::PAYLOAD_EXCERPT), "No frame end within max_frame bytes; discarded.");
                    buf.clear();
                }
            };
            drop(port);
            self.health.set_connected(&id, false, Some(&reason));
            if !crate::backoff::pause(&cancel, backoff.fail()).await {
                return Ok(());
            }
        }
    }

    async fn frame(
        &self,
        id: &Arc<str>,
        point: &Arc<str>,
        frame: &[u8],
        out: &mpsc::Sender<SourceEvent>,
    ) -> Result<(), SourceError> {
        let values = match self.config.mode {
            SerialMode::Presence => vec![Value::Bool(true), Value::Bool(false)],
            SerialMode::Data => match std::str::from_utf8(frame) {
                Ok(text) => vec![Value::Text(text.trim().to_string())],
                Err(_) => {
                    self.health.decode_error();
                    tracing::warn!(source = %id, point = %point, excerpt = %crate::text::excerpt(frame, crate::text::PAYLOAD_EXCERPT), "Serial frame is not UTF-8 text; skipped.");
                    return Ok(());
                }
            },
        };
        self.health.event();
        for value in values {
            let event = Event {
                source: id.clone(),
                point: point.clone(),
                value,
                at: jiff::Timestamp::now(),
            };
            super::forward(out, event.into(), &self.heartbeat, id).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_by_delimiter_length_and_pattern() {
        let mut buf = b"P1\r\nP2\n\nP3".to_vec();
        assert_eq!(
            take_frames(&Framer::Lines(b"\n".to_vec()), &mut buf),
            vec![b"P1".to_vec(), b"P2".to_vec()]
        );
        assert_eq!(buf, b"P3");
        let mut buf = b"ABCDEFGH12".to_vec();
        assert_eq!(
            take_frames(&Framer::Fixed(4), &mut buf),
            vec![b"ABCD".to_vec(), b"EFGH".to_vec()]
        );
        assert_eq!(buf, b"12");
        let re = regex::bytes::Regex::new(r"ST,GS,\s*[0-9.]+kg").unwrap();
        let mut buf = b"xxST,GS,  12.5kgST,GS, 3".to_vec();
        assert_eq!(
            take_frames(&Framer::Regex(re), &mut buf),
            vec![b"ST,GS,  12.5kg".to_vec()]
        );
        assert_eq!(buf, b"ST,GS, 3");
    }
}
