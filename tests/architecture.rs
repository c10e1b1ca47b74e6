//! The shape of the code: no two top-level modules under `src/` import each other, not
//! even through others. A circle means neither can be read, tested or changed alone
//! (issue: `config` and the components it validated imported each other).
//!
//! Imports are read from the source text (`crate::name` in code, not in comments); test
//! modules may use the whole crate. `cargo test --test architecture -- --nocapture`
//! prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module of a file under `src/`: `src/d365/token.rs` → `d365`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "bin")).then(|| name.to_string())
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

/// The file without comments and test code: a `tests.rs` file is all test code;
/// elsewhere the test module starts at `#[cfg(test)]` followed by `mod`.
fn non_test_code(file: &Path) -> String {
    if file.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        // Comments may name any module (a doc link is not an import).
        if !line.trim_start().starts_with("//") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `crate::a::…` and `crate::{a, b::…}` in `code`.
fn imported_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
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
        let entry = graph.entry(from.clone()).or_default();
        for to in imported_modules(&non_test_code(file)) {
            if to != from && modules.contains(&to) {
                entry.insert(to);
            }
        }
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

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let graph = import_graph();
    let mut circles = Vec::new();
    for module in graph.keys() {
        if let Some(path) = reachable(&graph, module).get(module) {
            circles.push(path.join(" → "));
        }
    }
    let edges: Vec<String> = graph
        .iter()
        .map(|(from, to)| {
            format!(
                "{from} → {}",
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    println!(
        "imports between top-level modules:\n  {}",
        edges.join("\n  ")
    );
    assert!(
        circles.is_empty(),
        "import circles between top-level modules:\n  {}",
        circles.join("\n  ")
    );
}

#[test]
fn the_checker_finds_a_circle_and_reads_grouped_imports() {
    assert_eq!(
        imported_modules("use crate::{config::X, outbox};\nlet a = crate::d365::f();"),
        ["config", "d365", "outbox"].map(String::from).into()
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(reachable(&graph, "a")["a"], ["a", "b", "c", "a"]);
    assert!(!reachable(&graph, "d").contains_key("d"));
}
