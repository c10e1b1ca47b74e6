//! MQTT topic filters with named captures: `plant/{line}/count` is `plant/+/count` to the
//! broker, and a match hands the rules engine `line`.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    /// `+` or `{name}`: one level, captured when named.
    One(Option<String>),
    /// `#`: the rest, possibly nothing.
    Rest,
}

/// An MQTT topic filter. `{name}` is `+` with a capture: `plant/{line}/count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    levels: Vec<Level>,
    text: String,
}

impl TopicFilter {
    pub fn parse(text: &str) -> Result<TopicFilter, String> {
        if text.is_empty() {
            return Err("empty topic filter".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => return Err(format!("{text:?}: `#` must be the last level")),
                "+" => Level::One(None),
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    let name = &p[1..p.len() - 1];
                    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        return Err(format!(
                            "{text:?}: capture name `{name}` may use letters, digits and _"
                        ));
                    }
                    Level::One(Some(name.to_string()))
                }
                p if p.contains(['+', '#', '{', '}']) => {
                    return Err(format!(
                        "{text:?}: wildcards and captures must fill a whole level"
                    ))
                }
                p => Level::Exact(p.to_string()),
            };
            levels.push(level);
        }
        Ok(TopicFilter {
            levels,
            text: text.to_string(),
        })
    }

    /// The filter as the broker sees it (captures become `+`).
    pub fn subscription(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Exact(s) => s.as_str(),
                Level::One(_) => "+",
                Level::Rest => "#",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    pub fn capture_names(&self) -> impl Iterator<Item = &str> {
        self.levels.iter().filter_map(|l| match l {
            Level::One(Some(n)) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Matches a topic; returns the captures.
    pub fn matches(&self, topic: &str) -> Option<BTreeMap<String, String>> {
        let mut captures = BTreeMap::new();
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return Some(captures),
                Level::Exact(s) => {
                    if parts.next()? != s {
                        return None;
                    }
                }
                Level::One(name) => {
                    let part = parts.next()?;
                    if let Some(n) = name {
                        captures.insert(n.clone(), part.to_string());
                    }
                }
            }
        }
        parts.next().is_none().then_some(captures)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Topic filters looked up by topic: a tree of their levels, so finding the filters that
/// match a topic costs the topic's levels (and the wildcards met on the way), not the
/// number of filters. Matches exactly what [`TopicFilter::matches`] matches.
#[derive(Debug, Clone)]
pub struct TopicIndex<T> {
    exact: HashMap<String, TopicIndex<T>>,
    /// `+` and `{name}` at this level.
    one: Option<Box<TopicIndex<T>>>,
    /// Filters ending in `#` here: they match the rest, however long (or nothing).
    rest: Vec<T>,
    /// Filters ending here.
    end: Vec<T>,
}

impl<T> Default for TopicIndex<T> {
    fn default() -> Self {
        TopicIndex {
            exact: HashMap::new(),
            one: None,
            rest: Vec::new(),
            end: Vec::new(),
        }
    }
}

impl<T: Clone> TopicIndex<T> {
    pub fn insert(&mut self, filter: &TopicFilter, value: T) {
        let mut node = self;
        for level in &filter.levels {
            node = match level {
                Level::Exact(s) => node.exact.entry(s.clone()).or_default(),
                Level::One(_) => node.one.get_or_insert_with(Box::default),
                Level::Rest => {
                    node.rest.push(value);
                    return;
                }
            };
        }
        node.end.push(value);
    }

    /// Every value whose filter matches `topic`, in no particular order.
    pub fn matching(&self, topic: &str, out: &mut Vec<T>) {
        // Walked lazily: no allocation per lookup (one per event on the ingest path).
        self.collect(topic.split('/'), out);
    }

    fn collect(&self, mut levels: std::str::Split<'_, char>, out: &mut Vec<T>) {
        out.extend(self.rest.iter().cloned());
        match levels.next() {
            None => out.extend(self.end.iter().cloned()),
            Some(first) => {
                if let Some(next) = self.exact.get(first) {
                    next.collect(levels.clone(), out);
                }
                if let Some(next) = &self.one {
                    next.collect(levels, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index finds exactly the filters that match, checked against `matches` for
    /// every filter and topic of a small universe.
    #[test]
    fn the_index_finds_exactly_the_matching_filters() {
        let filters = [
            "plant/#",
            "#",
            "plant/+/count",
            "plant/{line}/count",
            "plant/l1/count",
            "plant/l1/+",
            "plant/l1",
            "other/+",
            "+/+",
            "plant/l1/count/#",
            "+",
        ];
        let topics = [
            "plant",
            "plant/l1",
            "plant/l1/count",
            "plant/l2/count",
            "plant/l1/count/x",
            "other/a",
            "other",
            "a/b/c",
            "",
            "plant//count",
        ];
        let mut index = TopicIndex::default();
        let parsed: Vec<TopicFilter> = filters
            .iter()
            .map(|f| TopicFilter::parse(f).unwrap())
            .collect();
        for (i, f) in parsed.iter().enumerate() {
            index.insert(f, i);
        }
        for topic in topics {
            let mut found = Vec::new();
            index.matching(topic, &mut found);
            found.sort_unstable();
            let expected: Vec<usize> = (0..parsed.len())
                .filter(|&i| parsed[i].matches(topic).is_some())
                .collect();
            assert_eq!(found, expected, "topic {topic:?}");
        }
    }

    #[test]
    fn topic_filters_match_and_capture() {
        let f = TopicFilter::parse("plant/{line}/+/count").unwrap();
        assert_eq!(f.subscription(), "plant/+/+/count");
        assert_eq!(f.matches("plant/l1/m2/count").unwrap()["line"], "l1");
        assert!(f.matches("plant/l1/m2/count/x").is_none());
        assert!(f.matches("plant/l1/count").is_none());
        let rest = TopicFilter::parse("plant/#").unwrap();
        assert!(rest.matches("plant").is_some());
        assert!(rest.matches("plant/a/b").is_some());
        assert!(rest.matches("other/a").is_none());
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b+").is_err());
        assert!(TopicFilter::parse("a/{li-ne}").is_err());
    }
}
