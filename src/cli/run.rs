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
    let launch = medzero_dist::Launch::from_env()?;
    let world = launch.as_ref().map_or(1, |l| l.world);
    crate::stages::registry::check_distributed(&cfg.stages, world)?;
    if let Some(launch) = launch {
        let timeout = std::time::Duration::from_secs_f64(cfg.run.collective_timeout_s);
        medzero_dist::init(medzero_dist::Group::connect(&launch, timeout)?)?;
    }
    let stop = crate::infra::signals::install()?;
    let out = crate::experiment::run(&cfg, fresh, &stop)?;
    if medzero_dist::world().is_none_or(|g| g.rank() == 0) {
        println!("{}", out.results.to_markdown());
        println!("run folder: {}", out.dir.display());
    }
    Ok(())
}
