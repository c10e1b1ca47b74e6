//! Which rules an event may concern, looked up instead of scanned: by source, then by
//! point (exact name), topic filter (a tree of levels) or neither (every event of the
//! source). The cost per event follows what matches, not the size of the rule set: a
//! plant that generates thousands of station rules pays for the few that concern each
//! event. The engine still checks each candidate in full; the index only never misses one.

use std::collections::HashMap;

use super::Rule;
use crate::mqtt::topic::TopicIndex;

/// The rules of one source.
#[derive(Debug, Default)]
struct SourceRules {
    by_point: HashMap<String, Vec<usize>>,
    by_topic: TopicIndex<usize>,
    /// Rules that name neither a point nor a topic.
    any: Vec<usize>,
}

/// The rules by what they match first, as indices into the engine's rule list.
#[derive(Debug, Default)]
pub(super) struct RuleIndex {
    by_source: HashMap<String, SourceRules>,
}

impl RuleIndex {
    pub(super) fn new<'r>(rules: impl IntoIterator<Item = &'r Rule>) -> RuleIndex {
        let mut index = RuleIndex::default();
        for (i, rule) in rules.into_iter().enumerate() {
            let of_source = index.by_source.entry(rule.source.clone()).or_default();
            match (&rule.point, &rule.topic) {
                (Some(point), _) => of_source.by_point.entry(point.clone()).or_default().push(i),
                (None, Some(topic)) => of_source.by_topic.insert(topic, i),
                (None, None) => of_source.any.push(i),
            }
        }
        index
    }

    /// The rules an event of `source` at `point` may concern, in rule order (rules apply in
    /// the order written).
    pub(super) fn candidates(&self, source: &str, point: &str, out: &mut Vec<usize>) {
        out.clear();
        let Some(of_source) = self.by_source.get(source) else {
            return;
        };
        if let Some(rules) = of_source.by_point.get(point) {
            out.extend_from_slice(rules);
        }
        of_source.by_topic.matching(point, out);
        out.extend_from_slice(&of_source.any);
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}
