//! Claims about a run's table (`[[claims]]` in an experiment): each compares
//! two figures of the rows, or a figure with a number, and is checked when
//! the run ends, so a seed's orderings read as rows of `results.json`
//! instead of by eye.
//!
//! A figure is `method:metric`, the method a row of SynthClinic's test set
//! (an evaluated stage, `<stage>-round-<k>` of a preference stage), the
//! metric `greedy`, a selection rule `rule@N` (`vote-sc@16`), `task/<name>`,
//! `group/<name>` or `prm_auroc`.

use super::results::{EVAL_SET, Row};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = ">")]
    Above,
    #[serde(rename = ">=")]
    AtLeast,
}

/// One side of a claim: a figure of the table, or a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Operand {
    Number(f64),
    Figure(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimSpec {
    pub name: String,
    pub left: Operand,
    pub op: Op,
    pub right: Operand,
    /// The claim is left op right + margin (accuracies are fractions: 0.05
    /// is 5 points).
    #[serde(default)]
    pub margin: f64,
}

/// A claim as checked: `holds` is absent when a figure was missing, and
/// `missing` says which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub name: String,
    pub holds: Option<bool>,
    pub left: Option<f64>,
    pub right: Option<f64>,
    pub margin: f64,
    pub op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
}

fn split(figure: &str) -> Result<(&str, &str)> {
    let Some((method, metric)) = figure.split_once(':') else {
        bail!("{figure:?} is no figure: write method:metric, e.g. \"chains:greedy\"");
    };
    let known = metric == "greedy"
        || metric == "prm_auroc"
        || metric.strip_prefix("task/").is_some_and(|t| !t.is_empty())
        || metric.strip_prefix("group/").is_some_and(|g| !g.is_empty())
        || metric
            .split_once('@')
            .is_some_and(|(rule, n)| !rule.is_empty() && n.parse::<usize>().is_ok());
    if method.is_empty() || !known {
        bail!(
            "{figure:?}: the metric must be greedy, rule@N (vote-sc@16), task/<name>, \
             group/<name> or prm_auroc"
        );
    }
    Ok((method, metric))
}

impl ClaimSpec {
    /// Checks the figures' syntax and that each names a method the run can
    /// produce: one of `stages`, or `<stage>-round-<k>`.
    pub fn validate(&self, stages: &[&str]) -> Result<()> {
        if self.name.trim().is_empty() {
            bail!("a claim needs a name");
        }
        if !self.margin.is_finite() {
            bail!("claim {:?}: margin must be a finite number", self.name);
        }
        for side in [&self.left, &self.right] {
            let Operand::Figure(figure) = side else {
                continue;
            };
            let (method, _) =
                split(figure).map_err(|e| anyhow::anyhow!("claim {:?}: {e}", self.name))?;
            let base = method
                .rsplit_once("-round-")
                .filter(|(_, k)| k.parse::<usize>().is_ok())
                .map_or(method, |(stage, _)| stage);
            if !stages.contains(&base) {
                bail!(
                    "claim {:?}: no stage named {base:?} (stages: {})",
                    self.name,
                    stages.join(", ")
                );
            }
        }
        Ok(())
    }

    pub fn check(&self, rows: &[Row]) -> Claim {
        let (left, right) = (figure(&self.left, rows), figure(&self.right, rows));
        let missing: Vec<String> = [&left, &right]
            .into_iter()
            .filter_map(|f| f.as_ref().err().cloned())
            .collect();
        let (left, right) = (left.ok(), right.ok());
        let holds = left.zip(right).map(|(l, r)| match self.op {
            Op::Above => l > r + self.margin,
            Op::AtLeast => l >= r + self.margin,
        });
        Claim {
            name: self.name.clone(),
            holds,
            left,
            right,
            margin: self.margin,
            op: self.op,
            missing: (!missing.is_empty()).then(|| missing.join("; ")),
        }
    }
}

/// The operand's value in `rows`, or what is missing.
fn figure(side: &Operand, rows: &[Row]) -> std::result::Result<f64, String> {
    let figure = match side {
        Operand::Number(v) => return Ok(*v),
        Operand::Figure(f) => f,
    };
    let (method, metric) = split(figure).map_err(|e| e.to_string())?;
    let Some(row) = rows
        .iter()
        .find(|r| r.method == method && r.eval_set == EVAL_SET)
    else {
        return Err(format!("no row for {method}"));
    };
    let value = match metric {
        "greedy" => Some(row.greedy_accuracy),
        "prm_auroc" => row.prm_auroc,
        m => m
            .strip_prefix("task/")
            .and_then(|t| row.per_task.get(t).copied())
            .or_else(|| {
                m.strip_prefix("group/")
                    .and_then(|g| row.groups.get(g).map(|g| g.greedy_accuracy))
            })
            .or_else(|| row.selection_accuracy.get(m).copied()),
    };
    value
        .filter(|v| v.is_finite())
        .ok_or_else(|| format!("{method} has no {metric}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, greedy: f64, vote: f64) -> Row {
        Row {
            method: method.into(),
            eval_set: EVAL_SET.into(),
            greedy_accuracy: greedy,
            selection_accuracy: [("vote-sc@16".to_string(), vote)].into_iter().collect(),
            judge_accuracy: None,
            prm_auroc: Some(0.6),
            per_task: Default::default(),
            groups: Default::default(),
            n: 400,
            training_tokens: 0,
            wall_s: 0.0,
        }
    }

    fn claim(left: &str, op: Op, right: Operand, margin: f64) -> ClaimSpec {
        ClaimSpec {
            name: "c".into(),
            left: Operand::Figure(left.into()),
            op,
            right,
            margin,
        }
    }

    #[test]
    fn claims_compare_figures_with_a_margin_and_say_what_is_missing() {
        let rows = [row("chains", 0.772, 0.918), row("round-1", 0.790, 0.910)];
        let fig = |f: &str| Operand::Figure(f.into());
        let c = claim("chains:vote-sc@16", Op::AtLeast, fig("chains:greedy"), 0.05).check(&rows);
        assert_eq!(
            (c.holds, c.left, c.right),
            (Some(true), Some(0.918), Some(0.772))
        );
        let c = claim("round-1:greedy", Op::Above, fig("chains:greedy"), 0.02).check(&rows);
        assert_eq!(c.holds, Some(false));
        let c = claim("chains:prm_auroc", Op::AtLeast, Operand::Number(0.85), 0.0).check(&rows);
        assert_eq!(c.holds, Some(false));
        let c = claim("chains:p-vs@16", Op::Above, fig("round-2:greedy"), 0.0).check(&rows);
        assert_eq!(c.holds, None);
        assert_eq!(
            c.missing.as_deref(),
            Some("chains has no p-vs@16; no row for round-2")
        );
    }

    #[test]
    fn claims_are_checked_at_load() {
        let stages = ["chains", "dpo"];
        let ok = |f: &str| claim(f, Op::Above, Operand::Number(0.5), 0.0).validate(&stages);
        assert!(ok("chains:greedy").is_ok());
        assert!(ok("dpo-round-2:vote-sc@4").is_ok());
        assert!(ok("chains:task/diagnosis").is_ok());
        let err = |f: &str| format!("{:#}", ok(f).unwrap_err());
        assert!(err("chain:greedy").contains("no stage named \"chain\""));
        assert!(err("chains-greedy").contains("write method:metric"));
        assert!(err("chains:vote-sc").contains("rule@N"));
    }
}
