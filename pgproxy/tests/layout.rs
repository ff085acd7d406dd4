//! The shape `pgproxy/src` must keep (issue 11): no file longer than 700 lines before its
//! `#[cfg(test)]` module, every module opening with its `//!` paragraph, and no two
//! modules importing each other (each `use crate::…`/`super::…`/`self::…` path is
//! resolved to the module file it names; comments and test modules are not imports).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src is readable") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `engine::statements` for `src/engine/statements.rs`, `engine` for `src/engine/mod.rs`.
fn module_of(path: &Path) -> String {
    let rel = path
        .strip_prefix(src())
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    if parts == ["lib"] {
        return String::new();
    }
    parts.join("::")
}

/// The code of a file without its test module and comments.
fn code(text: &str) -> String {
    let before_tests = text.split("#[cfg(test)]").next().unwrap_or("");
    before_tests
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_module(m: &str) -> bool {
    let rel = m.replace("::", "/");
    src().join(format!("{rel}.rs")).exists() || src().join(rel).join("mod.rs").exists()
}

/// The longest prefix of `path` (a `::` path relative to the crate) that is a module.
fn resolve(path: &[&str]) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|k| path[..k].join("::"))
        .find(|m| is_module(m))
}

fn imports(module: &str, text: &str) -> BTreeSet<String> {
    let code = code(text);
    let mut out = BTreeSet::new();
    let parent: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    let parent = &parent[..parent.len().saturating_sub(1)];
    for (i, _) in code.match_indices("::") {
        let start = code[..i]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .map_or(0, |s| s + 1);
        let end = code[i..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .map_or(code.len(), |e| i + e);
        let path: Vec<&str> = code[start..end]
            .split("::")
            .filter(|s| !s.is_empty())
            .collect();
        let full: Vec<&str> = match path.first() {
            Some(&"crate") => path[1..].to_vec(),
            Some(&"super") => parent
                .iter()
                .copied()
                .chain(path[1..].iter().copied())
                .collect(),
            Some(&"self") => module
                .split("::")
                .filter(|s| !s.is_empty())
                .chain(path[1..].iter().copied())
                .collect(),
            _ => continue,
        };
        if let Some(m) = resolve(&full) {
            if m != module {
                out.insert(m);
            }
        }
    }
    out
}

#[test]
fn modules_are_small_documented_and_never_import_each_other() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("readable");
        let before_tests = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or("")
            .lines()
            .count();
        let test_only = f.components().any(|c| c.as_os_str() == "tests")
            || f.file_name()
                .is_some_and(|n| n == "tests.rs" || n == "testing.rs");
        if before_tests > 700 && !test_only {
            problems.push(format!(
                "{}: {before_tests} lines before its tests",
                f.display()
            ));
        }
        if !text.starts_with("//!") {
            problems.push(format!("{}: no //! paragraph at the top", f.display()));
        }
        if !test_only {
            graph.insert(module_of(f), imports(&module_of(f), &text));
        }
    }
    for (a, deps) in &graph {
        for b in deps {
            if a < b && graph.get(b).is_some_and(|d| d.contains(a)) {
                problems.push(format!("{a} and {b} import each other"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
