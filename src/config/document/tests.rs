use super::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Inner {
    name: String,
    count: Option<u32>,
    #[serde(default)]
    on: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Outer {
    items: Vec<Inner>,
    #[serde(default)]
    flag: bool,
}

fn doc(text: &str) -> Document {
    Document::parse(text.to_string()).unwrap()
}

/// A block-list element is read from its own lines, with what the whole text would
/// give; one that cannot be (an alias to an anchor elsewhere, a mistake) is read from
/// the whole text, with the error's true position.
#[test]
fn list_elements_are_read_alone_and_errors_keep_their_place() {
    let d = doc(concat!(
        "items:\n",
        "  - name: first # a comment\n",
        "    count: &n 7\n",
        "  -   name: \"second\"\n",
        "      on: true\n",
        "# a comment at the left margin inside the list\n",
        "      count: 2\n",
        "  - {name: flow, count: 3}\n",
        "  - name: alias\n",
        "    count: *n\n",
        "  - name: wrong\n",
        "    count: many\n",
        "flag: true\n",
    ));
    let first = d.element_text("items[0]").map(|e| e.text);
    assert_eq!(
        first.as_deref(),
        Some("    name: first # a comment\n    count: &n 7\n")
    );
    let second: Inner = d.parse_all_at("items[1]").unwrap();
    assert_eq!(
        (second.name.as_str(), second.count, second.on),
        ("second", Some(2), true)
    );
    let flow: Inner = d.parse_all_at("items[2]").unwrap();
    assert_eq!(flow.count, Some(3));
    let alias: Inner = d.parse_all_at("items[3]").unwrap();
    assert_eq!(
        alias.count,
        Some(7),
        "the anchor is outside the element: whole text"
    );
    let errors = d.parse_all_at::<Inner>("items[4]").unwrap_err();
    assert_eq!(errors[0].path, "items[4].count");
    assert_eq!(
        errors[0].mark,
        Mark {
            line: 12,
            column: 12
        }
    );
    assert!(d.element_text("flag").is_none());
}

#[test]
fn scalars_keep_their_text_for_string_fields() {
    let outer: Outer = doc("items:\n  - name: 000123\n    count: 7\n")
        .parse_at("")
        .unwrap();
    assert_eq!(outer.items[0].name, "000123");
    assert_eq!(outer.items[0].count, Some(7));
    assert!(!outer.flag);
}

#[test]
fn unknown_field_points_at_the_key_with_its_path() {
    let err = doc("items:\n  - name: a\n  - name: b\n    cuont: 3\n")
        .parse_at::<Outer>("")
        .unwrap_err();
    assert_eq!(err.path, "items[1].cuont");
    assert_eq!(err.mark, Mark { line: 4, column: 5 });
    assert_eq!(
        err.message,
        "unknown field `cuont`, expected one of `name`, `count`, `on`"
    );
}

#[test]
fn wrong_number_points_at_the_value_and_quotes_it() {
    let err = doc("items:\n  - name: a\n    count: many # oops\n")
        .parse_at::<Outer>("")
        .unwrap_err();
    assert_eq!(err.path, "items[0].count");
    assert_eq!(
        err.mark,
        Mark {
            line: 3,
            column: 12
        }
    );
    assert_eq!(
        err.message,
        "invalid value \"many\": expected a non-negative 32-bit integer"
    );
}

#[test]
fn only_true_and_false_are_booleans() {
    let on: Outer = doc("items:\n  - name: a\n    on: true\n")
        .parse_at("")
        .unwrap();
    assert!(on.items[0].on);
    let err = doc("items:\n  - name: a\n    on: yes\n")
        .parse_at::<Outer>("")
        .unwrap_err();
    assert_eq!(err.path, "items[0].on");
    assert_eq!(err.message, "invalid value \"yes\": expected true or false");
}

#[test]
fn one_element_is_read_on_its_own_so_a_bad_neighbour_does_not_hide_it() {
    let d = doc("items:\n  - name: a\n    count: x\n  - name: b\n    count: 2\n");
    let second: Inner = d.parse_at("items[1]").unwrap();
    assert_eq!((second.name.as_str(), second.count), ("b", Some(2)));
    let err = d.parse_at::<Inner>("items[0]").unwrap_err();
    assert_eq!(err.path, "items[0].count");
    assert_eq!(err.mark.line, 3);
}

#[test]
fn a_repeated_key_is_an_error_of_its_section_only() {
    let d = doc("first:\n  name: a\n  name: b\nsecond:\n  name: c\n");
    let err = d.parse_at::<Inner>("first").unwrap_err();
    assert_eq!(err.message, "duplicate field `name`");
    assert_eq!((err.path.as_str(), err.mark.line), ("first.name", 3));
    let second: Inner = d.parse_at("second").unwrap();
    assert_eq!(second.name, "c");
}

#[test]
fn every_mistake_in_a_node_is_reported_not_only_the_first() {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Rule {
        name: String,
        count: Option<u32>,
        on: Option<bool>,
        inner: Option<Inner>,
    }
    let d = doc("rules:\n  - name: a\n    count: many\n    cuont: 3\n    inner: { name: x, count: -1, on: true }\n    on: maybe\n");
    let errors = d.parse_all_at::<Rule>("rules[0]").unwrap_err();
    let found: Vec<(String, usize, String)> = errors
        .into_iter()
        .map(|e| (e.path, e.mark.line, e.message))
        .collect();
    assert_eq!(
        found,
        [
            (
                "rules[0].count".into(),
                3,
                "invalid value \"many\": expected a non-negative 32-bit integer".into()
            ),
            (
                "rules[0].cuont".into(),
                4,
                "unknown field `cuont`, expected one of `name`, `count`, `on`, `inner`".into()
            ),
            (
                "rules[0].inner.count".into(),
                5,
                "invalid value \"-1\": expected a non-negative 32-bit integer".into()
            ),
            (
                "rules[0].on".into(),
                6,
                "invalid value \"maybe\": expected true or false".into()
            ),
        ]
    );
}

#[test]
fn a_missing_field_caused_by_blanking_is_not_reported() {
    let d = doc("items:\n  - name: [1]\n    count: 3\n");
    let errors = d.parse_all_at::<Inner>("items[0]").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].path, "items[0].name");
}

#[test]
fn locate_finds_nested_nodes_and_falls_back_to_the_parent() {
    let d = doc("a:\n  b:\n    - x: 1\n      y: 2\n");
    assert_eq!(
        d.locate("a.b[0].y"),
        Mark {
            line: 4,
            column: 10
        }
    );
    assert_eq!(d.locate("a.b[0].missing"), Mark { line: 3, column: 7 });
    assert_eq!(d.node("a.b[0].x").and_then(Node::as_str), Some("1"));
}

#[test]
fn syntax_errors_have_a_position() {
    let err = Document::parse("a: [1, 2\nb: 3\n".into()).unwrap_err();
    assert!(err.mark.line >= 1);
    assert!(!err.message.is_empty());
    let err = Document::parse("a: 1\n---\nb: 2\n".into()).unwrap_err();
    assert_eq!(err.mark.line, 3, "{}", err.message);
}

#[test]
fn empty_files_are_empty_mappings() {
    for text in ["", "# only a comment\n", "---\n"] {
        assert!(doc(text).root.entries().is_some_and(|e| e.is_empty()));
    }
}

#[test]
fn anchors_and_aliases_are_resolved() {
    #[derive(Deserialize)]
    struct Doc {
        items: Vec<Inner>,
    }
    let d: Doc = doc("base: &b {name: x}\nitems: [*b]\n")
        .parse_at("")
        .map_err(|e| e.message)
        .unwrap_or_else(|m| panic!("{m}"));
    assert_eq!(d.items[0].name, "x");
}
