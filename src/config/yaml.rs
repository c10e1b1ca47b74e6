//! A YAML document as a tree of nodes that remember where they stand in the file,
//! and a serde `Deserializer` over that tree.
//!
//! Why not `serde_yaml`: it is unmaintained, its `Value` forgets positions, and it stops
//! at the first error. Keeping the positions lets the loader (a) put `file:line:column`
//! on every serde error, (b) point validation errors found *after* parsing (a bad URL, a
//! limit out of range) at the right line, and (c) deserialize each section and list
//! element on its own, so one file reports all its mistakes at once.
//!
//! Scalars are typed on demand: a field that wants a string gets the text as written
//! (so an order number `000123` stays `"000123"`), a field that wants a number parses it.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::TScalarStyle;

/// Where a node starts: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    pub mark: Mark,
}

#[derive(Debug, Clone)]
pub enum NodeKind {
    /// `plain` is false for quoted and block scalars: those are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A syntax error: the file is not YAML at all.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

impl Node {
    /// Parses one YAML document. An empty file is an empty mapping.
    pub fn parse(text: &str) -> Result<Node, SyntaxError> {
        let mut parser = Parser::new_from_str(text);
        let mut stack: Vec<Building> = Vec::new();
        let mut anchors: HashMap<usize, Node> = HashMap::new();
        let mut root: Option<Node> = None;
        let mut documents = 0;
        loop {
            let (event, marker) = parser.next_token().map_err(|e| SyntaxError {
                mark: Mark {
                    line: e.marker().line(),
                    column: e.marker().col() + 1,
                },
                message: e.info().to_string(),
            })?;
            let mark = Mark {
                line: marker.line(),
                column: marker.col() + 1,
            };
            let finished = match event {
                Event::StreamEnd => break,
                Event::DocumentStart => {
                    documents += 1;
                    if documents > 1 {
                        return Err(SyntaxError {
                            mark,
                            message: "more than one YAML document in this file; use one file per document".into(),
                        });
                    }
                    None
                }
                Event::Nothing | Event::StreamStart | Event::DocumentEnd => None,
                Event::Alias(id) => Some(anchors.get(&id).cloned().ok_or_else(|| SyntaxError {
                    mark,
                    message: "alias to an unknown anchor".into(),
                })?),
                Event::Scalar(text, style, anchor, _tag) => {
                    let node = Node {
                        kind: NodeKind::Scalar {
                            text,
                            plain: style == TScalarStyle::Plain,
                        },
                        mark,
                    };
                    if anchor > 0 {
                        anchors.insert(anchor, node.clone());
                    }
                    Some(node)
                }
                Event::SequenceStart(anchor, _) => {
                    stack.push(Building::Seq(mark, anchor, Vec::new()));
                    None
                }
                Event::MappingStart(anchor, _) => {
                    stack.push(Building::Map(mark, anchor, Vec::new(), None));
                    None
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    // The parser only emits an end after the matching start.
                    let Some(building) = stack.pop() else {
                        return Err(SyntaxError {
                            mark,
                            message: "unbalanced collection end".into(),
                        });
                    };
                    let (node, anchor) = building.finish();
                    if anchor > 0 {
                        anchors.insert(anchor, node.clone());
                    }
                    Some(node)
                }
            };
            if let Some(node) = finished {
                match stack.last_mut() {
                    None => root = Some(node),
                    Some(Building::Seq(_, _, items)) => items.push(node),
                    Some(Building::Map(_, _, entries, pending)) => match pending.take() {
                        None => *pending = Some(node),
                        Some(key) => entries.push((key, node)),
                    },
                }
            }
        }
        Ok(root.unwrap_or(Node {
            kind: NodeKind::Map(Vec::new()),
            mark: Mark { line: 1, column: 1 },
        }))
    }

    /// A plain `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Entries of a mapping; a null node counts as an empty mapping.
    pub fn entries(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            NodeKind::Map(entries) => Some(entries),
            _ if self.is_null() => Some(&[]),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// Finds the node at a field path such as `sources[2].interval`, as far as it exists.
    /// Used to point validation errors at a line; falls back to the deepest node found.
    pub fn locate(&self, path: &str) -> Mark {
        let mut node = self;
        for segment in path_segments(path) {
            let next = match segment {
                Segment::Key(key) => node
                    .entries()
                    .and_then(|e| e.iter().find(|(k, _)| k.as_str() == Some(key)))
                    .map(|(_, v)| v),
                Segment::Index(i) => match &node.kind {
                    NodeKind::Seq(items) => items.get(i),
                    _ => None,
                },
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node.mark
    }

    fn kind_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar { .. } if self.is_null() => "null",
            NodeKind::Scalar { .. } => "scalar",
            NodeKind::Seq(_) => "sequence",
            NodeKind::Map(_) => "mapping",
        }
    }
}

enum Building {
    Seq(Mark, usize, Vec<Node>),
    Map(Mark, usize, Vec<(Node, Node)>, Option<Node>),
}

impl Building {
    fn finish(self) -> (Node, usize) {
        match self {
            Building::Seq(mark, anchor, items) => (
                Node {
                    kind: NodeKind::Seq(items),
                    mark,
                },
                anchor,
            ),
            Building::Map(mark, anchor, entries, _) => (
                Node {
                    // The parser's mark for a block mapping can sit past its first key;
                    // the first key is where a reader looks.
                    mark: entries.first().map_or(mark, |(k, _)| k.mark),
                    kind: NodeKind::Map(entries),
                },
                anchor,
            ),
        }
    }
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn path_segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        for index in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

/// A deserialization error, with the position of the node that caused it when known.
#[derive(Debug, Clone)]
pub struct Error {
    pub message: String,
    pub mark: Option<Mark>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error {
            message: msg.to_string(),
            mark: None,
        }
    }
}

/// Deserializes `T` from a node, returning the error with its field path and position.
pub fn from_node<'de, T: de::Deserialize<'de>>(node: &'de Node) -> Result<T, PathError> {
    serde_path_to_error::deserialize(node).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let mark = inner.mark.unwrap_or_else(|| node.locate(&path));
        PathError {
            path: if path == "." { String::new() } else { path },
            message: inner.message,
            mark,
        }
    })
}

/// A deserialization error placed at a field path and a position.
#[derive(Debug, Clone)]
pub struct PathError {
    pub path: String,
    pub message: String,
    pub mark: Mark,
}

fn with_mark<T>(result: Result<T, Error>, mark: Mark) -> Result<T, Error> {
    result.map_err(|mut e| {
        e.mark.get_or_insert(mark);
        e
    })
}

impl Node {
    fn invalid_type(&self, exp: &dyn de::Expected) -> Error {
        let unexpected = match &self.kind {
            NodeKind::Scalar { text, .. } if !self.is_null() => de::Unexpected::Str(text),
            NodeKind::Scalar { .. } => de::Unexpected::Unit,
            NodeKind::Seq(_) => de::Unexpected::Seq,
            NodeKind::Map(_) => de::Unexpected::Map,
        };
        let mut e: Error = de::Error::invalid_type(unexpected, exp);
        e.mark = Some(self.mark);
        e
    }

    fn scalar_text(&self, exp: &dyn de::Expected) -> Result<&str, Error> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Ok(text),
            _ => Err(self.invalid_type(exp)),
        }
    }

    fn parse_number<T: std::str::FromStr>(&self, what: &'static str) -> Result<T, Error> {
        let text = self.scalar_text(&what)?;
        let cleaned = text.replace('_', "");
        cleaned.parse::<T>().map_err(|_| Error {
            message: format!("invalid value {text:?}: expected {what}"),
            mark: Some(self.mark),
        })
    }
}

fn plain_scalar_type(text: &str) -> PlainType {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return PlainType::Null,
        "true" | "True" | "TRUE" => return PlainType::Bool(true),
        "false" | "False" | "FALSE" => return PlainType::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return PlainType::Int(i);
    }
    if let Ok(u) = text.parse::<u64>() {
        return PlainType::UInt(u);
    }
    let looks_numeric = text
        .trim_start_matches(['-', '+'])
        .starts_with(|c: char| c.is_ascii_digit() || c == '.');
    if looks_numeric {
        if let Ok(f) = text.parse::<f64>() {
            return PlainType::Float(f);
        }
    }
    PlainType::Str
}

enum PlainType {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str,
}

macro_rules! deserialize_number {
    ($method:ident, $visit:ident, $ty:ty, $what:literal) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            let value: $ty = self.parse_number($what)?;
            with_mark(visitor.$visit(value), self.mark)
        }
    };
}

impl<'de> de::Deserializer<'de> for &'de Node {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let result = match &self.kind {
            NodeKind::Scalar { text, plain: false } => visitor.visit_str(text),
            NodeKind::Scalar { text, plain: true } => match plain_scalar_type(text) {
                PlainType::Null => visitor.visit_unit(),
                PlainType::Bool(b) => visitor.visit_bool(b),
                PlainType::Int(i) => visitor.visit_i64(i),
                PlainType::UInt(u) => visitor.visit_u64(u),
                PlainType::Float(f) => visitor.visit_f64(f),
                PlainType::Str => visitor.visit_str(text),
            },
            NodeKind::Seq(items) => visitor.visit_seq(SeqAccess {
                items: items.iter(),
                index: 0,
            }),
            NodeKind::Map(entries) => visitor.visit_map(MapAccess {
                entries: entries.iter(),
                value: None,
            }),
        };
        with_mark(result, self.mark)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.kind {
            NodeKind::Scalar { text, plain: true } => match plain_scalar_type(text) {
                PlainType::Bool(b) => with_mark(visitor.visit_bool(b), self.mark),
                _ => Err(Error {
                    message: format!("invalid value {text:?}: expected true or false"),
                    mark: Some(self.mark),
                }),
            },
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    deserialize_number!(deserialize_i8, visit_i8, i8, "an integer from -128 to 127");
    deserialize_number!(deserialize_i16, visit_i16, i16, "a 16-bit integer");
    deserialize_number!(deserialize_i32, visit_i32, i32, "a 32-bit integer");
    deserialize_number!(deserialize_i64, visit_i64, i64, "an integer");
    deserialize_number!(deserialize_u8, visit_u8, u8, "an integer from 0 to 255");
    deserialize_number!(
        deserialize_u16,
        visit_u16,
        u16,
        "an integer from 0 to 65535"
    );
    deserialize_number!(
        deserialize_u32,
        visit_u32,
        u32,
        "a non-negative 32-bit integer"
    );
    deserialize_number!(deserialize_u64, visit_u64, u64, "a non-negative integer");
    deserialize_number!(deserialize_f32, visit_f32, f32, "a number");
    deserialize_number!(deserialize_f64, visit_f64, f64, "a number");

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let text = self.scalar_text(&visitor)?;
        with_mark(visitor.visit_borrowed_str(text), self.mark)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.is_null() {
            with_mark(visitor.visit_none(), self.mark)
        } else {
            with_mark(visitor.visit_some(self), self.mark)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.is_null() {
            with_mark(visitor.visit_unit(), self.mark)
        } else {
            Err(self.invalid_type(&visitor))
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        with_mark(visitor.visit_newtype_struct(self), self.mark)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.kind {
            NodeKind::Seq(items) => with_mark(
                visitor.visit_seq(SeqAccess {
                    items: items.iter(),
                    index: 0,
                }),
                self.mark,
            ),
            _ if self.is_null() => with_mark(
                visitor.visit_seq(SeqAccess {
                    items: [].iter(),
                    index: 0,
                }),
                self.mark,
            ),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.entries() {
            Some(entries) => with_mark(
                visitor.visit_map(MapAccess {
                    entries: entries.iter(),
                    value: None,
                }),
                self.mark,
            ),
            None => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => with_mark(
                visitor.visit_enum(text.as_str().into_deserializer()),
                self.mark,
            ),
            NodeKind::Map(entries) if entries.len() == 1 => {
                let (key, value) = &entries[0];
                with_mark(visitor.visit_enum(EnumAccess { key, value }), key.mark)
            }
            _ => Err(Error {
                message: format!(
                    "invalid type: {}, expected a variant name or a mapping with one key",
                    self.kind_name()
                ),
                mark: Some(self.mark),
            }),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

struct SeqAccess<'de> {
    items: std::slice::Iter<'de, Node>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.items.next() {
            None => Ok(None),
            Some(node) => {
                self.index += 1;
                with_mark(seed.deserialize(node), node.mark).map(Some)
            }
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'de> {
    entries: std::slice::Iter<'de, (Node, Node)>,
    value: Option<&'de Node>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            None => Ok(None),
            Some((key, value)) => {
                self.value = Some(value);
                with_mark(seed.deserialize(key), key.mark).map(Some)
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        // serde calls next_value only after next_key returned Some, which set `value`.
        let node = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("value requested before key"))?;
        with_mark(seed.deserialize(node), node.mark)
    }
}

struct EnumAccess<'de> {
    key: &'de Node,
    value: &'de Node,
}

impl<'de> de::EnumAccess<'de> for EnumAccess<'de> {
    type Error = Error;
    type Variant = VariantAccess<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Error> {
        let variant = with_mark(seed.deserialize(self.key), self.key.mark)?;
        Ok((variant, VariantAccess { value: self.value }))
    }
}

struct VariantAccess<'de> {
    value: &'de Node,
}

impl<'de> de::VariantAccess<'de> for VariantAccess<'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        if self.value.is_null() {
            Ok(())
        } else {
            Err(Error {
                message: "this variant takes no value".into(),
                mark: Some(self.value.mark),
            })
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self.value)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self.value, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_map(self.value, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        name: String,
        count: Option<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        items: Vec<Inner>,
        #[serde(default)]
        flag: bool,
    }

    #[test]
    fn scalars_keep_their_text_for_string_fields() {
        let node = Node::parse("items:\n  - name: 000123\n    count: 7\n").unwrap();
        let outer: Outer = from_node(&node).unwrap();
        assert_eq!(outer.items[0].name, "000123");
        assert_eq!(outer.items[0].count, Some(7));
        assert!(!outer.flag);
    }

    #[test]
    fn unknown_field_points_at_the_key_with_its_path() {
        let text = "items:\n  - name: a\n  - name: b\n    cuont: 3\n";
        let node = Node::parse(text).unwrap();
        let err = from_node::<Outer>(&node).unwrap_err();
        assert_eq!(err.path, "items[1].cuont");
        assert_eq!(err.mark, Mark { line: 4, column: 5 });
        assert!(
            err.message.contains("unknown field `cuont`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn wrong_number_points_at_the_value() {
        let node = Node::parse("items:\n  - name: a\n    count: many\n").unwrap();
        let err = from_node::<Outer>(&node).unwrap_err();
        assert_eq!(err.path, "items[0].count");
        assert_eq!(
            err.mark,
            Mark {
                line: 3,
                column: 12
            }
        );
        assert!(err.message.contains("\"many\""), "{}", err.message);
    }

    #[test]
    fn locate_finds_nested_nodes_and_falls_back_to_the_parent() {
        let node = Node::parse("a:\n  b:\n    - x: 1\n      y: 2\n").unwrap();
        assert_eq!(
            node.locate("a.b[0].y"),
            Mark {
                line: 4,
                column: 10
            }
        );
        assert_eq!(node.locate("a.b[0].missing"), Mark { line: 3, column: 7 });
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let err = Node::parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.mark.line >= 1);
        assert!(!err.message.is_empty());
    }

    #[test]
    fn anchors_and_aliases_are_resolved() {
        let node = Node::parse("base: &b {name: x}\nitems: [*b]\n").unwrap();
        #[derive(Deserialize)]
        struct Doc {
            items: Vec<Inner>,
        }
        let doc: Doc = from_node(&node).unwrap();
        assert_eq!(doc.items[0].name, "x");
    }
}
