//! The crate's layering, read from its sources: which top-level module uses which. The
//! dependencies point one way (cli → train / serve / … → run → engine → model, engine →
//! kernels, both on layout), so the graph of top-level modules has no circle, the low layers
//! import nothing above them, the model and the kernels know nothing of each other, and
//! docs/architecture.md names every module and every arrow.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
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

/// The top-level modules of `src/` and, for each, the other top-level modules its code names as
/// `crate::NAME` (comments and doc comments left out).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let module_of = |p: &Path| -> Option<String> {
        let rel = p.strip_prefix(&src).unwrap();
        let first = rel.components().next()?.as_os_str().to_str()?.to_string();
        match first.strip_suffix(".rs") {
            Some("lib" | "main") => None,
            Some(m) => Some(m.to_string()),
            None => Some(first),
        }
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(f) else { continue };
        let deps = graph.entry(m.clone()).or_default();
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != m {
                    deps.insert(name);
                }
            }
        }
    }
    // `crate::Error` and the like name re-exports at the root, not modules.
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// A circle in `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_graph_reader_sees_a_circle_when_there_is_one() {
    let g: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a")]
        .into_iter()
        .map(|(a, b)| (a.to_string(), BTreeSet::from([b.to_string()])))
        .collect();
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn top_level_modules_form_no_circle() {
    let graph = module_graph();
    assert!(graph.contains_key("model") && graph.contains_key("kernels"));
    assert!(
        graph["cli"].contains("train"),
        "the reader found cli's imports"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "modules import each other in a circle: {}",
            cycle.join(" → ")
        );
    }
}

#[test]
fn low_layers_know_nothing_of_the_layers_above() {
    let graph = module_graph();
    let above = |m: &str, forbidden: &[&str]| {
        let bad: Vec<&String> = graph[m]
            .iter()
            .filter(|d| forbidden.contains(&d.as_str()))
            .collect();
        assert!(bad.is_empty(), "{m} imports {bad:?}");
    };
    let upper = [
        "cli", "train", "sample", "viz", "interop", "serve", "circuits", "run", "data", "engine",
    ];
    above("kernels", &[&upper[..], &["model"]].concat());
    above("model", &[&upper[..], &["kernels"]].concat());
    above("engine", &upper[..9]);
    above(
        "data",
        &[&upper[..9], &["engine", "model", "kernels"]].concat(),
    );
    // The parameter layout is the leaf both the model and the kernels stand on.
    assert!(graph["model"].contains("layout") && graph["kernels"].contains("layout"));
    assert!(
        graph.get("layout").is_none_or(|d| d.is_empty()),
        "layout imports {:?}",
        graph["layout"]
    );
}

/// The lines of the fenced block that follows `marker` in `text`.
fn block_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    let start = text.find(marker).unwrap_or_else(|| panic!("no `{marker}`"));
    let rest = &text[start..];
    let open = rest.find("```").unwrap() + 3;
    let body = &rest[open..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].lines().collect()
}

#[test]
fn architecture_md_names_every_module_and_every_dependency() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    // Every module of the crate, top-level or one folder down, by its path under src/.
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut missing = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root.join("src")).unwrap();
        let parts: Vec<&str> = rel.iter().map(|p| p.to_str().unwrap()).collect();
        let name = match parts.as_slice() {
            ["lib.rs" | "main.rs"] => continue,
            [file] => file.to_string(),
            [dir, "mod.rs"] => format!("{dir}/"),
            [dir, file] => format!("{dir}/{file}"),
            [dir, sub, ..] => format!("{dir}/{sub}/"),
            [] => continue,
        };
        if !doc.contains(&format!("`{name}`")) && !missing.contains(&name) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/architecture.md does not name {missing:?}"
    );
    // The dependency table is the graph the sources have, arrow for arrow.
    let written: BTreeMap<String, BTreeSet<String>> = block_after(&doc, "<!-- dependencies -->")
        .into_iter()
        .filter_map(|l| l.split_once('→'))
        .map(|(m, deps)| {
            let deps = deps.split_whitespace().filter(|d| *d != "—");
            (m.trim().to_string(), deps.map(str::to_string).collect())
        })
        .collect();
    let actual = module_graph();
    assert_eq!(
        written, actual,
        "docs/architecture.md's dependency table is not the sources' graph"
    );
    // And lib.rs declares exactly the modules the table names.
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    assert_eq!(declared, written.keys().cloned().collect());
}

#[test]
fn the_model_and_the_kernels_know_nothing_of_each_other() {
    // The engine translates between them: engine → model, engine → kernels.
    let graph = module_graph();
    assert!(graph["engine"].contains("model") && graph["engine"].contains("kernels"));
    assert!(!graph["model"].contains("kernels"), "model imports kernels");
    assert!(!graph["kernels"].contains("model"), "kernels import model");
    // Not even in comments or doc links: `grep -rn "crate::kernels" src/model` prints nothing.
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model"),
        &mut files,
    );
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains("crate::kernels"),
            "{} names crate::kernels",
            f.display()
        );
    }
}
