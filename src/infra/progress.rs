//! The one progress-bar style of the CLI: what runs, the bar, counts of
//! `unit`, a message, the elapsed time and the time left.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` items of `unit` (stages, steps, problems), labelled `prefix`.
pub fn bar(len: u64, prefix: &str, unit: &str) -> ProgressBar {
    let template = format!(
        "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} ({{elapsed}}, eta {{eta}})"
    );
    ProgressBar::new(len)
        .with_style(ProgressStyle::with_template(&template).expect("a valid template"))
        .with_prefix(prefix.to_string())
}
