//! One configuration file, read with serde-saphyr: typed parts with their positions.
//!
//! serde-saphyr streams: a type error ends that deserialization. To report every mistake
//! of a file at once, the loader deserializes each section and each list element on its
//! own with [`Document::parse_all_at`]. A position index ([`Node`], built once with
//! serde-saphyr's `Spanned`) answers where a path is, for checks made after parsing (a bad
//! URL, a limit out of range), and what a node is (a list, a source's `type`).
//!
//! Reading one node costs what that node takes, not the file: an element of a block list
//! (a rule in a generated file of thousands) is read from its own lines alone, cut out
//! with the index, its columns kept. Only when that fails (a mistake, or an alias to an
//! anchor elsewhere) is the node read again from the whole text, which walks to it and
//! skips the rest, for the exact error and position. Reading every element from the
//! whole text made loading N rules cost N times the file: 15.9 s for 800 rules.
//!
//! Scalars are typed by the field that wants them: a string field gets the text as written
//! (an order number `000123` stays `"000123"`), a number field parses it.

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize as _, DeserializeOwned, DeserializeSeed, IgnoredAny, Visitor};
use serde_saphyr::{MessageFormatter, Spanned, UserMessageFormatter};

/// The most mistakes reported inside one section or list element.
pub const MAX_ERRORS_PER_NODE: usize = 20;

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

impl Mark {
    const START: Mark = Mark { line: 1, column: 1 };

    fn of(location: serde_saphyr::Location) -> Option<Mark> {
        (location.line() > 0).then(|| Mark {
            line: location.line() as usize,
            column: location.column().max(1) as usize,
        })
    }
}

/// A file that is not YAML at all, or not one document.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

/// A deserialization error placed at a field path and a position.
#[derive(Debug, Clone)]
pub struct PathError {
    pub path: String,
    pub message: String,
    pub mark: Mark,
}

/// A node of the position index: where it starts and what it is.
#[derive(Debug, Clone)]
pub struct Node {
    pub mark: Mark,
    /// Where its key starts, for a value in a mapping.
    pub key_mark: Option<Mark>,
    pub shape: Shape,
}

#[derive(Debug, Clone)]
pub enum Shape {
    Null,
    /// A scalar's value as text (`type: mqtt` → `mqtt`).
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    /// Entries of a mapping; a null node counts as an empty mapping.
    pub fn entries(&self) -> Option<&[(String, Node)]> {
        match &self.shape {
            Shape::Map(entries) => Some(entries),
            Shape::Null => Some(&[]),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.shape {
            Shape::Scalar(text) => Some(text),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.shape, Shape::Null)
    }
}

/// A parsed file: its text (what typed parts are read from) and its position index.
#[derive(Debug)]
pub struct Document {
    text: String,
    pub root: Node,
    /// Byte offset of the start of each line (line 1 at index 0).
    line_starts: Vec<usize>,
}

/// The lines of one block-list element, read on their own: the dash and what precedes it
/// on the first line are spaces, so every column is as in the file.
struct ElementText {
    text: String,
}

/// Byte offsets of the start of every line.
fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(at, _)| at + 1))
        .collect()
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        // Only `true`/`false`: YAML 1.1's `yes`/`no`/`on`/`off` are a classic trap
        // (`country: NO`).
        strict_booleans: true,
        // `000123` where any value fits (a field value in a rule) stays text.
        leading_zero_numbers_as_strings: true,
        with_snippet: false,
        // A repeated key reaches the struct that reads it, which reports "duplicate
        // field" in that section only, instead of the whole file being refused.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
    }
}

impl Document {
    /// Parses one YAML document. An empty file (or one with only comments) is an empty
    /// mapping.
    pub fn parse(text: String) -> Result<Document, SyntaxError> {
        if text
            .lines()
            .map(str::trim)
            .all(|l| l.is_empty() || l.starts_with('#') || l == "---" || l == "...")
        {
            return Ok(Document {
                line_starts: line_starts(&text),
                text,
                root: Node {
                    mark: Mark::START,
                    key_mark: None,
                    shape: Shape::Map(Vec::new()),
                },
            });
        }
        match serde_saphyr::from_str_with_options::<Spanned<Shape>>(&text, options()) {
            Ok(root) => Ok(Document {
                root: Node::from(root),
                line_starts: line_starts(&text),
                text,
            }),
            Err(e) => {
                let (message, mark) = describe(&e, &text);
                Err(SyntaxError {
                    mark: mark.unwrap_or(Mark::START),
                    message,
                })
            }
        }
    }

    /// The node at a field path such as `sources[2].interval`, if it exists.
    pub fn node(&self, path: &str) -> Option<&Node> {
        let mut node = &self.root;
        for segment in path_segments(path) {
            node = child(node, &segment)?;
        }
        Some(node)
    }

    /// Where a path is, as far as it exists: validation errors point at a line even when
    /// the field was left out (then at its parent).
    pub fn locate(&self, path: &str) -> Mark {
        let mut node = &self.root;
        for segment in path_segments(path) {
            match child(node, &segment) {
                Some(next) => node = next,
                None => break,
            }
        }
        node.mark
    }

    /// Deserializes the node at `path` into `T`; an error carries its full field path and
    /// position.
    pub fn parse_at<T: DeserializeOwned>(&self, path: &str) -> Result<T, PathError> {
        self.parse_text_at(&self.text, path)
    }

    /// Like [`Document::parse_at`], but reports every mistake inside the node, in the
    /// order found, not only the first (at most [`MAX_ERRORS_PER_NODE`]).
    ///
    /// serde stops at the first error, so after each one the offending entry (an unknown
    /// key, or a key with a bad value) is blanked out of a copy of the text and the node
    /// is read again. Blanking keeps every line and column, so positions stay true.
    /// An error that only follows from a blanked entry (the field is now missing) ends
    /// the search instead of being reported.
    pub fn parse_all_at<T: DeserializeOwned>(&self, path: &str) -> Result<T, Vec<PathError>> {
        if let Some(element) = self.element_text(path) {
            if let Ok(value) = serde_saphyr::from_str_with_options::<T>(&element.text, options()) {
                return Ok(value);
            }
        }
        let first = match self.parse_at::<T>(path) {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        let mut text = self.text.clone();
        let mut errors = vec![first];
        let mut masked: Vec<String> = Vec::new();
        while errors.len() < MAX_ERRORS_PER_NODE {
            let Some(last) = errors.last() else { break };
            let Some(entry) = entry_to_blank(path, last) else {
                break;
            };
            if masked.contains(&entry) || !self.blank_entry(&mut text, &entry) {
                break;
            }
            masked.push(entry);
            match self.parse_text_at::<T>(&text, path) {
                Ok(_) => break,
                Err(next) => {
                    let follows_from_blanking = masked.iter().any(|m| {
                        m.starts_with(&next.path)
                            || next
                                .message
                                .strip_prefix("missing field `")
                                .and_then(|r| r.strip_suffix('`'))
                                .is_some_and(|field| *m == join_path(&next.path, field))
                    });
                    if follows_from_blanking || errors.iter().any(|e| e.path == next.path) {
                        break;
                    }
                    errors.push(next);
                }
            }
        }
        Err(errors)
    }

    /// Line `n` (1-based) without its line break.
    fn line(&self, n: usize) -> Option<&str> {
        let start = *self.line_starts.get(n.checked_sub(1)?)?;
        let end = self
            .line_starts
            .get(n)
            .map_or(self.text.len(), |next| next - 1);
        self.text.get(start..end.max(start))
    }

    /// The text of the node at `path` alone, when it is a mapping that is an element of a
    /// block list (`- key: …` on its own lines); `None` otherwise (then it is read from
    /// the whole text).
    fn element_text(&self, path: &str) -> Option<ElementText> {
        if !path.ends_with(']') {
            return None;
        }
        let node = self.node(path)?;
        if !matches!(&node.shape, Shape::Map(entries) if !entries.is_empty()) {
            return None;
        }
        let (first_line, column) = (node.mark.line, node.mark.column);
        let first = self.line(first_line)?;
        // Columns count characters; what precedes the element must be blanks and a dash.
        let before: String = first.chars().take(column - 1).collect();
        let mut dash = before.trim_end().chars().rev();
        if dash.next() != Some('-') || !dash.all(|c| c == ' ') {
            return None;
        }
        let rest: String = first.chars().skip(column - 1).collect();
        let mut text = format!("{}{rest}\n", " ".repeat(column - 1));
        // The element's further lines are indented at least as far as its first key.
        for n in first_line + 1..=self.line_starts.len() {
            let line = self.line(n)?;
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if !trimmed.is_empty() && !trimmed.starts_with('#') && indent < column - 1 {
                break;
            }
            text.push_str(line);
            text.push('\n');
        }
        Some(ElementText { text })
    }

    /// Replaces the entry `key: value` at `path` with spaces in `text`. Only block-style
    /// entries, and flow-style ones followed by a sibling on the same line, are blanked;
    /// otherwise `false` and `text` is unchanged.
    fn blank_entry(&self, text: &mut String, path: &str) -> bool {
        let (parent, key) = match path.rsplit_once('.') {
            Some((parent, key)) => (parent, key),
            None => ("", path),
        };
        let Some(entries) = self.node(parent).and_then(Node::entries) else {
            return false;
        };
        let Some(at) = entries.iter().position(|(k, _)| k == key) else {
            return false;
        };
        let Some(start) = entries[at].1.key_mark else {
            return false;
        };
        let next_on_same_line = entries
            .get(at + 1)
            .and_then(|(_, n)| n.key_mark)
            .filter(|m| m.line == start.line);
        let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
        let Some(first) = lines.get(start.line - 1) else {
            return false;
        };
        let before: String = first.chars().take(start.column - 1).collect();
        let flow = before.contains(['{', ',']);
        match next_on_same_line {
            Some(next) => blank(
                &mut lines[start.line - 1],
                start.column - 1,
                next.column - 1,
            ),
            None if flow => return false,
            None => {
                blank(&mut lines[start.line - 1], start.column - 1, usize::MAX);
                // A value's further lines are indented deeper than its key.
                for line in lines.iter_mut().skip(start.line) {
                    let trimmed = line.trim_start();
                    let indent = line.len() - trimmed.len();
                    if !trimmed.is_empty() && !trimmed.starts_with('#') && indent < start.column {
                        break;
                    }
                    blank(line, 0, usize::MAX);
                }
            }
        }
        *text = lines.join("\n");
        true
    }

    fn parse_text_at<T: DeserializeOwned>(&self, text: &str, path: &str) -> Result<T, PathError> {
        let segments = path_segments(path);
        let inner_path = RefCell::new(String::new());
        let result = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
            At {
                segments: &segments,
                inner_path: &inner_path,
                target: PhantomData::<T>,
            }
            .deserialize(de)
        });
        result.map_err(|e| {
            let full = join_path(path, &inner_path.into_inner());
            let (message, mark) = describe(&e, &self.text);
            if let Some(repeated) = self.repeated_key(&full, &message) {
                return PathError {
                    mark: repeated.mark,
                    path: join_path(&full, &repeated.key),
                    message,
                };
            }
            PathError {
                mark: mark.unwrap_or_else(|| self.locate(&full)),
                path: full,
                message,
            }
        })
    }

    /// serde reports a repeated field at its mapping; the second occurrence is where the
    /// user looks.
    fn repeated_key(&self, map_path: &str, message: &str) -> Option<Repeated> {
        let key = message
            .strip_prefix("duplicate field `")?
            .strip_suffix('`')?;
        let (_, node) = self
            .node(map_path)?
            .entries()?
            .iter()
            .filter(|(k, _)| k == key)
            .nth(1)?;
        Some(Repeated {
            key: key.to_string(),
            mark: node.mark,
        })
    }
}

struct Repeated {
    key: String,
    mark: Mark,
}

/// The map entry to blank after `error` inside the node at `within`: the unknown key,
/// or the key whose value is wrong. `None` where blanking cannot help (a missing or
/// repeated field, an item of a list: blanking it would shift the indices after it).
fn entry_to_blank(within: &str, error: &PathError) -> Option<String> {
    let inside = error.path.len() > within.len() && error.path.starts_with(within);
    let last_is_key = !error.path.ends_with(']');
    let blankable = !error.message.starts_with("missing field")
        && !error.message.starts_with("duplicate field");
    (inside && last_is_key && blankable).then(|| error.path.clone())
}

/// Replaces the characters `from..to` of `line` with spaces.
fn blank(line: &mut String, from: usize, to: usize) {
    *line = line
        .chars()
        .enumerate()
        .map(|(i, c)| if i >= from && i < to { ' ' } else { c })
        .collect();
}

/// Joins a section path and a path inside it: `rules[0]` + `when.edge`.
pub fn join_path(prefix: &str, rest: &str) -> String {
    match (prefix.is_empty(), rest.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => rest.to_string(),
        (false, false) if rest.starts_with('[') => format!("{prefix}{rest}"),
        (false, false) => format!("{prefix}.{rest}"),
    }
}

fn child<'a>(node: &'a Node, segment: &Segment<'_>) -> Option<&'a Node> {
    match segment {
        Segment::Key(key) => node.get(key),
        Segment::Index(i) => match &node.shape {
            Shape::Seq(items) => items.get(*i),
            _ => None,
        },
    }
}

#[derive(Debug, Clone, PartialEq)]
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

/// The message a user reads, in serde's usual wording, and where the error is.
fn describe(error: &serde_saphyr::Error, text: &str) -> (String, Option<Mark>) {
    use serde_saphyr::Error as E;
    let error = error.without_snippet();
    let mark = error.location().and_then(Mark::of);
    let message = match error {
        E::SerdeUnknownField {
            field, expected, ..
        } => format!("unknown field `{field}`, {}", one_of(expected, "fields")),
        E::SerdeUnknownVariant {
            variant, expected, ..
        } => format!(
            "unknown variant `{variant}`, {}",
            one_of(expected, "variants")
        ),
        E::InvalidScalar { ty, .. } => {
            let written = mark.map(|m| scalar_at(text, m)).unwrap_or_default();
            format!("invalid value {written:?}: expected {}", scalar_wanted(ty))
        }
        E::InvalidBooleanStrict { .. } => {
            let written = mark.map(|m| scalar_at(text, m)).unwrap_or_default();
            format!("invalid value {written:?}: expected true or false")
        }
        E::Message { msg, .. } => msg.clone(),
        other => UserMessageFormatter.format_message(other).into_owned(),
    };
    (message, mark)
}

/// serde's own wording for the expected names, with backticks.
fn one_of(expected: &[&str], what: &str) -> String {
    match expected {
        [] => format!("there are no {what}"),
        [one] => format!("expected `{one}`"),
        [a, b] => format!("expected `{a}` or `{b}`"),
        many => format!(
            "expected one of {}",
            many.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn scalar_wanted(ty: &str) -> &'static str {
    match ty {
        "i8" => "an integer from -128 to 127",
        "i16" => "a 16-bit integer",
        "i32" => "a 32-bit integer",
        "i64" | "i128" | "isize" => "an integer",
        "u8" => "an integer from 0 to 255",
        "u16" => "an integer from 0 to 65535",
        "u32" => "a non-negative 32-bit integer",
        "u64" | "u128" | "usize" => "a non-negative integer",
        "f32" | "f64" | "floating point" => "a number",
        "bool" | "boolean" => "true or false",
        "char" => "a single character",
        _ => "a value of another type",
    }
}

/// The scalar written at `mark`: up to the end of its line, a comment, or a flow
/// separator; quotes removed.
fn scalar_at(text: &str, mark: Mark) -> String {
    let Some(line) = text.lines().nth(mark.line - 1) else {
        return String::new();
    };
    let rest: String = line.chars().skip(mark.column - 1).collect();
    let end = rest
        .find(" #")
        .into_iter()
        .chain(rest.find([',', '}', ']']))
        .min()
        .unwrap_or(rest.len());
    rest[..end].trim().trim_matches(['"', '\'']).to_string()
}

/// Walks the document to one node and deserializes it as `T`; every other node is
/// skipped. The field path inside `T` of an error is left in `inner_path`.
struct At<'a, 'p, T> {
    segments: &'a [Segment<'p>],
    inner_path: &'a RefCell<String>,
    target: PhantomData<T>,
}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for At<'_, '_, T> {
    type Value = T;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        match self.segments.first() {
            None => serde_path_to_error::deserialize(deserializer).map_err(|e| {
                let path = e.path().to_string();
                if path != "." && path != "?" {
                    *self.inner_path.borrow_mut() = path;
                }
                e.into_inner()
            }),
            Some(Segment::Key(_)) => deserializer.deserialize_map(self),
            Some(Segment::Index(_)) => deserializer.deserialize_seq(self),
        }
    }
}

impl<'de, T: DeserializeOwned> Visitor<'de> for At<'_, '_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a list")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let Some(Segment::Key(wanted)) = self.segments.first() else {
            return Err(de::Error::custom("expected a list here"));
        };
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            if found.is_none() && key == *wanted {
                found = Some(map.next_value_seed(At {
                    segments: &self.segments[1..],
                    inner_path: self.inner_path,
                    target: PhantomData::<T>,
                })?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        found.ok_or_else(|| de::Error::custom(format!("`{wanted}` not found")))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        let Some(Segment::Index(wanted)) = self.segments.first() else {
            return Err(de::Error::custom("expected a mapping here"));
        };
        let mut found = None;
        let mut index = 0;
        loop {
            if index == *wanted {
                let seed = At {
                    segments: &self.segments[1..],
                    inner_path: self.inner_path,
                    target: PhantomData::<T>,
                };
                match seq.next_element_seed(seed)? {
                    Some(value) => found = Some(value),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            index += 1;
        }
        found.ok_or_else(|| de::Error::custom(format!("item {wanted} not found")))
    }
}

impl From<Spanned<Shape>> for Node {
    fn from(spanned: Spanned<Shape>) -> Node {
        Node {
            mark: Mark::of(spanned.referenced).unwrap_or(Mark::START),
            key_mark: None,
            shape: spanned.value,
        }
    }
}

impl<'de> de::Deserialize<'de> for Shape {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Shape, D::Error> {
        deserializer.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Shape, E> {
        Ok(Shape::Scalar(v.to_string()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Shape, E> {
        Ok(Shape::Scalar(v.to_string()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Shape, E> {
        Ok(Shape::Scalar(v.to_string()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Shape, E> {
        Ok(Shape::Scalar(v.to_string()))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Shape, E> {
        Ok(Shape::Scalar(v.to_string()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Shape, E> {
        Ok(Shape::Scalar(v.to_string()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Shape, E> {
        Ok(Shape::Scalar(v.to_string()))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Shape, E> {
        Ok(Shape::Scalar(String::from_utf8_lossy(v).into_owned()))
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }
    fn visit_none<E>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        Shape::deserialize(d)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Shape>>()? {
            items.push(Node::from(item));
        }
        Ok(Shape::Seq(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value = map.next_value::<Spanned<Shape>>()?;
            let mut node = Node::from(value);
            node.key_mark = Mark::of(key.referenced);
            entries.push((key.value, node));
        }
        Ok(Shape::Map(entries))
    }
}

#[cfg(test)]
mod tests;
