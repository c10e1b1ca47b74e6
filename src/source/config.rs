//! The `sources` list: each entry's `type` chooses the source whose configuration reads
//! it; ids must be unique.

use std::collections::HashSet;

use crate::config::{FileCheck, Node, Problems, Shape};

use super::d365_events::config::D365EventsConfig;
use super::modbus::config::ModbusConfig;
use super::mqtt::config::MqttConfig;
use super::opcua::config::OpcuaConfig;
use super::serial::config::SerialConfig;
use super::simulator::config::SimulatorConfig;

#[derive(Debug, Clone)]
pub enum SourceConfig {
    Simulator(SimulatorConfig),
    Mqtt(MqttConfig),
    Modbus(ModbusConfig),
    Serial(SerialConfig),
    Opcua(OpcuaConfig),
    D365Events(D365EventsConfig),
}

impl SourceConfig {
    pub fn id(&self) -> &str {
        match self {
            SourceConfig::Simulator(s) => &s.id,
            SourceConfig::Mqtt(s) => &s.id,
            SourceConfig::Modbus(s) => &s.id,
            SourceConfig::Serial(s) => &s.id,
            SourceConfig::Opcua(s) => &s.id,
            SourceConfig::D365Events(s) => &s.id,
        }
    }

    /// The point names this source emits, when it has a fixed set (rules are checked
    /// against it); `None` when any point may come (MQTT topics).
    pub fn points(&self) -> Option<Vec<String>> {
        match self {
            SourceConfig::Simulator(s) => Some(vec![s.point.clone()]),
            SourceConfig::Mqtt(_) => None,
            SourceConfig::Modbus(m) => Some(m.points.iter().map(|p| p.name.clone()).collect()),
            SourceConfig::Serial(s) => Some(vec![s.point.clone()]),
            SourceConfig::Opcua(o) => Some(o.nodes.iter().map(|n| n.name.clone()).collect()),
            // Any business event id may come; the configured names are the usual ones.
            SourceConfig::D365Events(_) => None,
        }
    }

    /// Whether points are MQTT topics (rules may match them with `topic` filters).
    pub fn has_topics(&self) -> bool {
        matches!(self, SourceConfig::Mqtt(_))
    }
}

const SOURCE_TYPES: [&str; 6] = [
    "simulator",
    "mqtt",
    "modbus",
    "serial",
    "opcua",
    "d365_events",
];

/// A source whose own section has errors: its id and where it is written. A rule that
/// names it reports that its error follows from those, instead of "unknown source".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenSource {
    pub id: String,
    pub at: String,
}

/// Checks the `sources` list; the sources that failed their own check go to `broken`.
pub fn read_sources(
    cx: &mut FileCheck<'_>,
    path: &str,
    broken: &mut Vec<BrokenSource>,
) -> Vec<SourceConfig> {
    let Some(node) = cx.node(path) else {
        return Vec::new();
    };
    let Shape::Seq(items) = &node.shape else {
        if !node.is_null() {
            cx.error(path, "must be a list of sources");
        }
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("{path}[{i}]");
        if item.entries().is_none() {
            cx.error(&path, "each source must be a mapping with a `type`");
            continue;
        }
        let Some(kind) = item.get("type").and_then(Node::as_str) else {
            cx.error(
                &path,
                format!(
                    "missing `type`, expected one of {}",
                    SOURCE_TYPES.join(", ")
                ),
            );
            continue;
        };
        let source = match kind {
            "simulator" => super::simulator::config::read(cx, &path).map(SourceConfig::Simulator),
            "mqtt" => super::mqtt::config::read(cx, &path).map(SourceConfig::Mqtt),
            "modbus" => cx
                .parse(&path)
                .and_then(|raw| checked(cx, &path, |p| super::modbus::config::modbus(raw, p)))
                .map(SourceConfig::Modbus),
            "serial" => cx
                .parse(&path)
                .and_then(|raw| checked(cx, &path, |p| super::serial::config::serial(raw, p)))
                .map(SourceConfig::Serial),
            "opcua" => super::opcua::config::read(cx, &path).map(SourceConfig::Opcua),
            "d365_events" => {
                super::d365_events::config::read(cx, &path).map(SourceConfig::D365Events)
            }
            other => {
                cx.error(
                    &format!("{path}.type"),
                    format!(
                        "unknown source type `{other}`, expected one of {}",
                        SOURCE_TYPES.join(", ")
                    ),
                );
                None
            }
        };
        if source.is_none() {
            if let Some(id) = item.get("id").and_then(Node::as_str) {
                broken.push(BrokenSource {
                    id: id.to_string(),
                    at: path.clone(),
                });
            }
        }
        if let Some(source) = source {
            if source.id().trim().is_empty() {
                cx.error(&format!("{path}.id"), "must not be empty");
            } else if !ids.insert(source.id().to_string()) {
                cx.error(
                    &format!("{path}.id"),
                    format!("duplicate source id `{}`", source.id()),
                );
            }
            out.push(source);
        }
    }
    out
}

/// Runs a check that reports problems relative to the source and files them at `path`.
/// `None` if there was any problem.
fn checked<T>(
    cx: &mut FileCheck<'_>,
    path: &str,
    check: impl FnOnce(&mut Problems) -> Option<T>,
) -> Option<T> {
    let mut problems = Vec::new();
    let config = check(&mut problems);
    let clean = cx.errors_under(path, problems);
    config.filter(|_| clean)
}
