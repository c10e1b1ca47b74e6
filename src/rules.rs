//! The rules engine: turns events into messages. Pure and synchronous; the hot path does
//! no parsing (everything was checked when the configuration loaded).
//!
//! This is the minimal built-in mapping: a rule matches a source and point, detects an
//! edge on a boolean signal, counts, and every `every` events emits one message for a
//! fixed production order. Rules apply in configuration order (rule files by name, rules
//! by position), so the messages one event produces come out in that order.

use std::collections::HashMap;

use crate::config::{Edge, RuleConfig};
use crate::event::{Event, Value};
use crate::message::{
    EndMessage, Message, PickingListLine, PickingListMessage, Real, ReportFinishedLine,
    ReportFinishedMessage, RouteCardLine, RouteCardMessage, StartMessage, TYPE_END,
    TYPE_PICKING_LIST, TYPE_ROUTE_CARD, TYPE_START,
};

/// A message and the rule that built it.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub message: Message,
    pub rule: String,
}

#[derive(Debug)]
pub struct Engine {
    rules: Vec<RuleConfig>,
    counts: Vec<u32>,
    /// Last boolean level per (source, point), for edge detection.
    levels: HashMap<(String, String), bool>,
}

impl Engine {
    pub fn new(rules: Vec<RuleConfig>) -> Engine {
        Engine {
            counts: vec![0; rules.len()],
            rules,
            levels: HashMap::new(),
        }
    }

    pub fn apply(&mut self, event: &Event) -> Vec<Built> {
        let Value::Bool(level) = event.value else {
            return Vec::new();
        };
        let key = (event.source.to_string(), event.point.to_string());
        // An unknown previous level counts as low, so the first high is a rising edge.
        let previous = self.levels.insert(key, level).unwrap_or(false);
        let mut out = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if *rule.source != *event.source || *rule.point != *event.point {
                continue;
            }
            let edge = match rule.edge {
                Edge::Rising => !previous && level,
                Edge::Falling => previous && !level,
                Edge::Both => previous != level,
            };
            if !edge {
                continue;
            }
            self.counts[i] += 1;
            if self.counts[i] >= rule.every {
                let quantity = f64::from(self.counts[i]) * rule.quantity_per_event;
                self.counts[i] = 0;
                out.push(Built {
                    message: build(rule, quantity),
                    rule: rule.name.clone(),
                });
            }
        }
        out
    }
}

fn build(rule: &RuleConfig, quantity: f64) -> Message {
    let order = rule.production_order.clone();
    match rule.message_type.as_str() {
        TYPE_START => Message::Start(StartMessage {
            production_order_number: order,
            ..Default::default()
        }),
        TYPE_END => Message::End(EndMessage {
            production_order_number: order,
            ..Default::default()
        }),
        TYPE_PICKING_LIST => Message::PickingList(PickingListMessage {
            production_order_number: order,
            picking_list_lines: vec![PickingListLine {
                item_number: rule.item_number.clone(),
                consumption_bom_quantity: Some(Real(quantity)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        TYPE_ROUTE_CARD => Message::RouteCard(RouteCardMessage {
            production_order_number: order,
            route_card_lines: vec![RouteCardLine {
                operation_number: rule.operation_number,
                good_quantity: Some(Real(quantity)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        // TYPE_REPORT_FINISHED; config validation admits only the five known types.
        _ => Message::ReportFinished(ReportFinishedMessage {
            production_order_number: order,
            report_finished_lines: vec![ReportFinishedLine {
                item_number: rule.item_number.clone(),
                reported_good_quantity: Some(Real(quantity)),
                ..Default::default()
            }],
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::TYPE_REPORT_FINISHED;

    fn rule(edge: Edge, every: u32) -> RuleConfig {
        RuleConfig {
            name: "r".into(),
            origin: "test".into(),
            source: "sim".into(),
            point: "p".into(),
            edge,
            message_type: TYPE_REPORT_FINISHED.into(),
            production_order: "P1".into(),
            item_number: Some("A".into()),
            operation_number: None,
            quantity_per_event: 1.0,
            every,
        }
    }

    fn ev(level: bool) -> Event {
        Event {
            source: "sim".into(),
            point: "p".into(),
            value: Value::Bool(level),
            at: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    fn run(engine: &mut Engine, levels: &[bool]) -> Vec<f64> {
        levels
            .iter()
            .flat_map(|l| engine.apply(&ev(*l)))
            .map(|b| match b.message {
                Message::ReportFinished(m) => {
                    m.report_finished_lines[0].reported_good_quantity.unwrap().0
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn counts_rising_edges_in_batches() {
        let mut e = Engine::new(vec![rule(Edge::Rising, 2)]);
        // Repeated highs are one edge; five rising edges give two messages of 2.
        let levels = [
            true, true, false, true, false, true, false, false, true, false,
        ];
        assert_eq!(run(&mut e, &levels), vec![2.0, 2.0]);
    }

    #[test]
    fn falling_and_both_edges() {
        let mut falling = Engine::new(vec![rule(Edge::Falling, 1)]);
        assert_eq!(
            run(&mut falling, &[true, false, false, true, false]),
            vec![1.0, 1.0]
        );
        let mut both = Engine::new(vec![rule(Edge::Both, 1)]);
        assert_eq!(run(&mut both, &[true, false, true]).len(), 3);
    }

    #[test]
    fn other_sources_and_points_do_not_match() {
        let mut e = Engine::new(vec![rule(Edge::Rising, 1)]);
        let mut other = ev(true);
        other.point = "q".into();
        assert!(e.apply(&other).is_empty());
    }
}
