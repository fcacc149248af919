//! `medzero run`: an experiment (a TOML file, or the embedded quickstart),
//! resumed when its run folder exists.

use crate::experiment::{Config, QUICKSTART};
use anyhow::Result;
use std::path::Path;

pub(super) fn run(config: Option<&Path>, set: &[String], fresh: bool) -> Result<()> {
    let cfg = match config {
        Some(path) => Config::from_file(path, set)?,
        None => Config::load(QUICKSTART, "quickstart (embedded)", set)?,
    };
    let stop = crate::infra::signals::install()?;
    let out = crate::experiment::run(&cfg, fresh, &stop)?;
    println!("{}", out.results.to_markdown());
    println!("run folder: {}", out.dir.display());
    Ok(())
}
