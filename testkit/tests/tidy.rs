//! The workspace's shape, checked on its source text in the manner of rust-analyzer's `tidy`:
//! no import circle between the top-level modules of any crate, no Rust file over 500 lines
//! (tests and benches included), and the load tester and the test kit never import the worker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const CRATES: [&str; 6] = ["schemas", "kernels", "worker", "producer", "loadtest", "testkit"];
const MAX_LINES: usize = 500;

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.map_while(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The top-level modules a crate's module `from` names through `crate::<module>` paths, in
/// code and doc links alike, outside its unit tests.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let rel = file.strip_prefix(src).expect("below src");
        let top = rel
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        let is_test =
            rel.file_name().is_some_and(|f| f == "tests.rs") || rel.components().any(|c| c.as_os_str() == "tests");
        if matches!(top.as_str(), "lib" | "main") || is_test {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        let text = text.split("#[cfg(test)]\nmod tests {").next().unwrap_or_default();
        let deps = graph.entry(top.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
    }
    graph
}

/// A circle in `graph`, if there is one, as the modules along it.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        at: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|m| m == at) {
            return Some(path[i..].to_vec());
        }
        if !done.insert(at.to_string()) {
            return None;
        }
        path.push(at.to_string());
        for next in graph.get(at).into_iter().flatten() {
            if graph.contains_key(next) {
                if let Some(c) = visit(next, graph, path, done) {
                    return Some(c);
                }
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_circle_between_its_modules() {
    for krate in CRATES {
        let graph = module_graph(&root().join(krate).join("src"));
        assert!(graph.len() > 1 || krate == "kernels", "{krate}: no modules found");
        if let Some(c) = circle(&graph) {
            panic!("{krate}: the modules {} import each other in a circle", c.join(" -> "));
        }
    }
}

#[test]
fn the_circle_check_finds_a_planted_circle() {
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
            .collect();
    assert_eq!(circle(&graph).map(|c| c.len()), Some(3));
}

#[test]
fn no_rust_file_is_over_500_lines() {
    let mut long = Vec::new();
    for krate in CRATES {
        for file in rust_files(&root().join(krate)) {
            if file.components().any(|c| c.as_os_str() == "target") {
                continue;
            }
            let lines = std::fs::read_to_string(&file).expect("readable").lines().count();
            if lines > MAX_LINES {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(long.is_empty(), "split by what they do: {long:?}");
}

#[test]
fn the_load_tester_and_the_test_kit_never_import_the_worker() {
    for krate in ["loadtest", "testkit", "producer"] {
        let manifest = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).expect("manifest");
        assert!(
            !manifest.contains("ferry-worker"),
            "{krate}/Cargo.toml depends on the worker"
        );
        for file in rust_files(&root().join(krate)) {
            let text = std::fs::read_to_string(&file).expect("readable");
            assert!(
                !text.contains(&["ferry", "_worker::"].concat()),
                "{} uses the worker",
                file.display()
            );
        }
    }
}
