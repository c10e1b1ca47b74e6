//! The shape of the code: no module imports a module that imports it back, not even through
//! others, at any depth — between top-level modules (`config` ↔ `rules`, counting every file
//! of a folder as its top-level module) and between the files inside a folder alike
//! (`d365::config` ↔ `d365::retry`). A circle means neither side can be read, tested or
//! changed alone (issue: `config` and the components it validated imported each other).
//!
//! One kind of edge is not a dependency: a child's use of its own ancestors (`super::Error`
//! in `outbox/lanes.rs`). A folder's `mod.rs` is its ground (the shared types) and its face;
//! its children build on it. An import from a child to anything else — a sibling, a cousin,
//! another folder — is an edge, and so is a parent's use of a child.
//!
//! Imports are read from the source text, in code, not in comments: `crate::a::b`,
//! `super::x`, `self::x`, and a child module's name used as a path (`lanes::append`). A
//! parent's `pub use child::Item` is the folder's face to the rest of the crate, not a
//! dependency of the parent's own code, so re-exports are not edges. Test modules may use the
//! whole crate. `cargo test --test architecture -- --nocapture` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The module a file under `src/` defines: `src/d365/token.rs` → `d365::token`,
/// `src/outbox/mod.rs` → `outbox`; `None` for the crate roots.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && matches!(parts[0].as_str(), "lib" | "main") || parts.first()? == "bin" {
        return None;
    }
    Some(parts.join("::"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file without comments, test code and re-exports: a `tests.rs` file is all test
/// code; elsewhere the test module starts at `#[cfg(test)]` followed by `mod`.
fn non_test_code(text: &str, file_name: &str) -> String {
    if file_name == "tests.rs" {
        return String::new();
    }
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    let mut in_reexport = false;
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        if trimmed.starts_with("pub use ") || trimmed.starts_with("pub(crate) use ") {
            in_reexport = true;
        }
        if in_reexport {
            in_reexport = !line.contains(';');
            continue;
        }
        // Comments may name any module (a doc link is not an import).
        if !trimmed.starts_with("//") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The paths written at `rest` (after `crate::`, `super::` or a module name and its
/// `::`): `a::b::c` or a group `{a::b, c::{d, e}}`, each as its segments after `base`.
fn paths_at(rest: &str, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Some(group) = rest.strip_prefix('{') {
        // The group's items, split at top-level commas.
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    paths_at(group[start..i].trim(), base.clone(), out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    paths_at(group[start..i].trim(), base.clone(), out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let name = ident(rest);
    if name.is_empty() {
        out.push(base);
        return;
    }
    let mut longer = base;
    longer.push(name.to_string());
    match rest[name.len()..].strip_prefix("::") {
        Some(more) => paths_at(more, longer, out),
        None => out.push(longer),
    }
}

/// The modules `code`, the text of module `current`, refers to: each path resolved to the
/// longest module in `modules` it starts with. `children` are the modules declared in it.
fn imported_modules(
    code: &str,
    current: &str,
    children: &BTreeSet<String>,
    modules: &BTreeSet<String>,
) -> BTreeSet<String> {
    let here: Vec<String> = current.split("::").map(String::from).collect();
    let mut paths = Vec::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while at < code.len() {
        let word = ident(&code[at..]);
        let boundary = at == 0 || {
            let p = bytes[at - 1];
            !(p.is_ascii_alphanumeric() || p == b'_' || p == b':')
        };
        if word.is_empty() || !boundary {
            at += code[at..].chars().next().map_or(1, char::len_utf8);
            continue;
        }
        let after = &code[at + word.len()..];
        if let Some(rest) = after.strip_prefix("::") {
            let base = match word {
                "crate" => Some(Vec::new()),
                "self" => Some(here.clone()),
                "super" => {
                    // `super::super::x` climbs one level per `super`.
                    let mut base = here.clone();
                    base.pop();
                    let mut rest = rest;
                    while let Some(more) = rest.strip_prefix("super::") {
                        base.pop();
                        rest = more;
                    }
                    paths_at(rest, base, &mut paths);
                    None
                }
                w if children.contains(w) => {
                    let mut base = here.clone();
                    base.push(w.to_string());
                    Some(base)
                }
                _ => None,
            };
            if let Some(base) = base {
                paths_at(rest, base, &mut paths);
            }
        }
        at += word.len();
    }
    paths
        .into_iter()
        .filter_map(|path| {
            (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|m| modules.contains(m))
        })
        .filter(|m| m != current)
        .collect()
}

/// The modules a file declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn declared_children(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line
                .strip_prefix("pub(crate) ")
                .or_else(|| line.strip_prefix("pub(super) "))
                .or_else(|| line.strip_prefix("pub "))
                .unwrap_or(line);
            let name = ident(line.strip_prefix("mod ")?);
            (!name.is_empty() && name != "tests").then(|| name.to_string())
        })
        .collect()
}

fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy();
        let code = non_test_code(&text, &name);
        let imports = imported_modules(&code, &from, &declared_children(&text), &modules);
        let own_ancestor = |to: &String| from.starts_with(&format!("{to}::"));
        graph
            .entry(from.clone())
            .or_default()
            .extend(imports.into_iter().filter(|to| !own_ancestor(to)));
    }
    graph
}

/// The same graph with every file counted as its top-level module (`d365::token` → `d365`).
fn top_level_graph(
    files: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in files {
        let entry = graph.entry(top(from)).or_default();
        entry.extend(to.iter().map(|t| top(t)).filter(|t| *t != top(from)));
    }
    graph
}

/// Every module reachable from `start`, with the path that reaches it.
fn reachable(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
) -> BTreeMap<String, Vec<String>> {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut todo = vec![vec![start.to_string()]];
    while let Some(path) = todo.pop() {
        let last = path.last().unwrap().clone();
        for next in graph.get(&last).into_iter().flatten() {
            if !seen.contains_key(next) {
                let mut longer = path.clone();
                longer.push(next.clone());
                seen.insert(next.clone(), longer.clone());
                todo.push(longer);
            }
        }
    }
    seen
}

fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut circles = Vec::new();
    for module in graph.keys() {
        if let Some(path) = reachable(graph, module).get(module) {
            circles.push(path.join(" → "));
        }
    }
    circles
}

#[test]
fn no_top_level_module_imports_one_that_imports_it_back() {
    let graph = top_level_graph(&import_graph());
    let circles = circles(&graph);
    assert!(
        circles.is_empty(),
        "import circles between top-level modules:\n  {}",
        circles.join("\n  ")
    );
}

#[test]
fn no_module_imports_a_module_that_imports_it_back_at_any_depth() {
    let graph = import_graph();
    let circles = circles(&graph);
    let edges: Vec<String> = graph
        .iter()
        .map(|(from, to)| {
            format!(
                "{from} → {}",
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    println!("imports between modules:\n  {}", edges.join("\n  "));
    assert!(
        circles.is_empty(),
        "import circles:\n  {}",
        circles.join("\n  ")
    );
}

#[test]
fn the_checker_resolves_paths_at_every_depth_and_finds_a_circle() {
    let modules: BTreeSet<String> = ["config", "d365", "d365::retry", "outbox", "outbox::kv"]
        .map(String::from)
        .into();
    let children: BTreeSet<String> = ["kv".to_string()].into();
    let code = "use crate::{config::X, d365::{retry::Backoff, Y}};\n\
                use super::super::config::Z;\n\
                let a = kv::open(); let b = crate::outbox::Outbox::open();";
    assert_eq!(
        imported_modules(code, "outbox::lanes", &children, &modules),
        ["config", "d365", "d365::retry", "outbox"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        imported_modules(
            "use super::{kv::T, storage};",
            "outbox::lanes",
            &children,
            &modules
        ),
        ["outbox", "outbox::kv"].map(String::from).into()
    );
    assert_eq!(
        imported_modules("let t = kv::T::Messages;", "outbox", &children, &modules),
        ["outbox::kv"].map(String::from).into()
    );
    assert_eq!(
        non_test_code("pub use kv::{\n  T,\n};\nuse kv::Span;\n", "mod.rs"),
        "use kv::Span;\n"
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["a::b"]),
        ("a::b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(reachable(&graph, "a")["a"], ["a", "a::b", "c", "a"]);
    assert!(!reachable(&graph, "d").contains_key("d"));
}
