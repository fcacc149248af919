//! The crate's layering, checked on its source: every `crate::` path in a
//! module of `src/` names a module of its own layer or a lower one, and the
//! modules' imports form no cycle. The layers, bottom to top:
//!
//! infra <- runtime <- {train, rollout, teacher, eval} <- stages <-
//! stages::registry <- experiment <- cli
//!
//! (`pub use` re-exports and `#[cfg(test)]` modules are not imports of the
//! module's own code.) Run alone with `cargo test --test layers`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The layer of a module path such as `stages::meds3`.
fn layer(module: &str) -> Option<usize> {
    let mut parts = module.split("::");
    let top = parts.next()?;
    Some(match (top, parts.next()) {
        ("infra", _) => 0,
        ("runtime", _) => 1,
        ("train" | "rollout" | "teacher" | "eval", _) => 2,
        ("stages", Some("registry")) => 4,
        ("stages", _) => 3,
        ("experiment", _) => 5,
        ("cli", _) => 6,
        _ => return None,
    })
}

/// Every `.rs` file under `dir`, with its module path.
fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut p = prefix.to_vec();
            p.push(name);
            modules(&path, &p, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut p = prefix.to_vec();
            if !matches!(name.as_str(), "mod" | "lib" | "main") {
                p.push(name);
            }
            out.insert(p.join("::"), path);
        }
    }
}

/// The modules a source file's code names through `crate::` or `super::`.
fn imports(module: &str, source: &str, known: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let code = match source.find("#[cfg(test)]\nmod tests") {
        Some(at) => &source[..at],
        None => source,
    };
    // `super` is the parent module, from a `mod.rs` as from a leaf file.
    let mut parent: Vec<&str> = module.split("::").collect();
    parent.pop();
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim();
        if line.starts_with("//") || line.starts_with("pub use") || line.starts_with("pub mod") {
            continue;
        }
        for (prefix, base) in [("crate::", Vec::new()), ("super::", parent.clone())] {
            let mut rest = line;
            while let Some(at) = rest.find(prefix) {
                let after = &rest[at + prefix.len()..];
                let path: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let mut parts: Vec<String> = base.iter().map(|s| s.to_string()).collect();
                parts.extend(path.split("::").filter(|s| !s.is_empty()).map(String::from));
                // The longest prefix of the path that is a module.
                while !parts.is_empty() && !known.contains_key(&parts.join("::")) {
                    parts.pop();
                }
                if !parts.is_empty() {
                    out.insert(parts.join("::"));
                }
                rest = &after[path.len()..];
            }
        }
    }
    out.remove(module);
    out
}

#[test]
fn no_module_imports_a_higher_layer_and_no_imports_cycle() {
    let mut known = BTreeMap::new();
    modules(Path::new(SRC), &[], &mut known);
    assert!(known.len() > 40, "found only {} modules", known.len());
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for (module, path) in &known {
        let source = std::fs::read_to_string(path).unwrap();
        let deps = imports(module, &source, &known);
        if let Some(own) = layer(module) {
            for d in &deps {
                if let Some(theirs) = layer(d)
                    && theirs > own
                {
                    upward.push(format!("{module} (layer {own}) -> {d} (layer {theirs})"));
                }
            }
        }
        edges.insert(module.clone(), deps);
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
    // A cycle shows as a module reached again while it is being visited.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(m) {
            Some(2) => return None,
            Some(1) => {
                let at = stack.iter().position(|s| s == m).unwrap();
                return Some(stack[at..].to_vec());
            }
            _ => {}
        }
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for d in edges.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(d, edges, state, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if let Some(cycle) = visit(m, &edges, &mut state, &mut Vec::new()) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}
