//! `--set key.path=value` overrides, "did you mean" for unknown keys and
//! kinds, and the key-by-key difference of two configs (for resumes).

use anyhow::{Result, anyhow, bail};

/// `a.b.c=value`: the value is parsed as TOML (number, bool, array, quoted
/// string), else taken as a bare string. A numeric segment indexes an array.
pub fn apply_override(root: &mut toml::Value, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("expected key.path=value"))?;
    let new: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("empty key in {path:?}");
    }
    let mut cur = root;
    for (i, key) in keys.iter().enumerate() {
        let last = i + 1 == keys.len();
        cur = match cur {
            toml::Value::Table(t) => {
                if last {
                    t.insert(key.to_string(), new);
                    return Ok(());
                }
                t.entry(key.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let idx: usize = key
                    .parse()
                    .map_err(|_| anyhow!("`{key}` indexes an array; use a number"))?;
                let len = a.len();
                let slot = a
                    .get_mut(idx)
                    .ok_or_else(|| anyhow!("index {idx} out of range (array has {len})"))?;
                if last {
                    *slot = new;
                    return Ok(());
                }
                slot
            }
            _ => bail!("`{}` is not a table", keys[..i].join(".")),
        };
    }
    unreachable!("the loop returns at the last key")
}

/// Adds "did you mean" to serde's unknown-field and unknown-variant messages.
pub fn explain(msg: &str) -> String {
    let unknown = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| {
            msg.split_once(p)
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(name, _)| name)
        });
    let Some(unknown) = unknown else {
        return msg.to_string();
    };
    let Some((_, expected)) = msg.split_once("expected") else {
        return msg.to_string();
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(unknown, c), *c))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, c)) if score > 0.7 => format!("{msg}; did you mean `{c}`?"),
        _ => msg.to_string(),
    }
}

/// Dotted paths at which two TOML documents differ (arrays by index, so a
/// changed stage shows as `stages.<k>.<key>`).
pub fn config_diff(a: &str, b: &str) -> Vec<String> {
    fn walk(a: Option<&toml::Value>, b: Option<&toml::Value>, path: String, out: &mut Vec<String>) {
        match (a, b) {
            (Some(toml::Value::Array(x)), Some(toml::Value::Array(y))) => {
                for i in 0..x.len().max(y.len()) {
                    walk(x.get(i), y.get(i), format!("{path}.{i}"), out);
                }
            }
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(x.get(k), y.get(k), p, out);
                }
            }
            (x, y) if x != y => out.push(path),
            _ => {}
        }
    }
    let (Ok(a), Ok(b)) = (
        toml::from_str::<toml::Value>(a),
        toml::from_str::<toml::Value>(b),
    ) else {
        return vec!["(unreadable config.toml)".into()];
    };
    let mut out = Vec::new();
    walk(Some(&a), Some(&b), String::new(), &mut out);
    out
}
