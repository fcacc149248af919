//! Every experiment shipped in `experiments/` loads and passes the checks a
//! run makes before its first stage (settings, stage references, names), so
//! a config edited by hand or a setting renamed in code fails here, not an
//! hour into a run.

use medzero::experiment::Config;
use std::path::Path;

#[test]
fn every_shipped_experiment_loads_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        if let Err(e) = Config::from_file(&path, &[]) {
            panic!("{e:#}");
        }
        checked += 1;
    }
    assert!(checked >= 7, "found only {checked} experiments");
}
