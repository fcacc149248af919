//! The one progress-bar style of the CLI: what runs, the bar, counts of
//! `unit`, a message, the elapsed time and the time left.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` items of `unit` (stages, steps, problems), labelled `prefix`.
/// Hidden on every rank but 0 of a distributed run.
pub fn bar(len: u64, prefix: &str, unit: &str) -> ProgressBar {
    if medzero_dist::world().is_some_and(|g| g.rank() > 0) {
        return ProgressBar::hidden();
    }
    let template = format!(
        "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} ({{elapsed}}, eta {{eta}})"
    );
    ProgressBar::new(len)
        .with_style(ProgressStyle::with_template(&template).expect("a valid template"))
        .with_prefix(prefix.to_string())
}
