//! The run's final table: `results.json` for scripts, `results.md` for people,
//! and the claims an experiment checks against it.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The evaluation set of SynthClinic's held-out questions, as rows name it.
pub const EVAL_SET: &str = "synthclinic-test";

/// One method scored on one evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub method: String,
    pub eval_set: String,
    /// Accuracy of one greedy (or the method's single) answer.
    pub greedy_accuracy: f64,
    /// Accuracy after selecting among N samples, keyed by `rule@N`.
    #[serde(default)]
    pub selection_accuracy: BTreeMap<String, f64>,
    /// Share of greedy answers the teacher judged correct (`eval.judge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_accuracy: Option<f64>,
    /// The PRM's AUROC against the world's step labels on this method's
    /// samples, when the evaluation had a PRM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prm_auroc: Option<f64>,
    #[serde(default)]
    pub per_task: BTreeMap<String, f64>,
    /// Greedy accuracy on named subsets of the questions (SynthClinic:
    /// `lab_values_seen` / `lab_values_unseen`, whether every lab value the
    /// answer needs is printed in some training question).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, Group>,
    pub n: usize,
    /// Tokens the method trained on (0 for methods that do not train).
    #[serde(default)]
    pub training_tokens: u64,
    pub wall_s: f64,
}

/// Accuracy on a subset of the questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub n: usize,
    pub greedy_accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub run: String,
    pub seed: u64,
    pub stamp: String,
    pub rows: Vec<Row>,
    /// The experiment's `[[claims]]`, checked against `rows`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<Claim>,
}

impl Results {
    pub fn to_markdown(&self) -> String {
        let mut rules: Vec<&String> = self
            .rows
            .iter()
            .flat_map(|r| r.selection_accuracy.keys())
            .collect();
        rules.sort();
        rules.dedup();
        let mut tasks: Vec<&String> = self.rows.iter().flat_map(|r| r.per_task.keys()).collect();
        tasks.sort();
        tasks.dedup();
        let mut s = format!(
            "# Results: {}\n\nseed {} · {}\n\n",
            self.run, self.seed, self.stamp
        );
        let judged = self.rows.iter().any(|r| r.judge_accuracy.is_some());
        s.push_str("| method | eval set | n | greedy acc |");
        if judged {
            s.push_str(" judge acc |");
        }
        for r in &rules {
            s.push_str(&format!(" {r} |"));
        }
        for t in &tasks {
            s.push_str(&format!(" {t} |"));
        }
        s.push_str(" training tokens | wall s |\n|---|---|---|---|");
        s.push_str(&"---|".repeat(rules.len() + tasks.len() + 2 + judged as usize));
        s.push('\n');
        let pct = |v: Option<&f64>| {
            v.map(|v| format!("{:.1}%", 100.0 * v))
                .unwrap_or_else(|| "-".into())
        };
        for row in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} |",
                row.method,
                row.eval_set,
                row.n,
                pct(Some(&row.greedy_accuracy))
            ));
            if judged {
                s.push_str(&format!(" {} |", pct(row.judge_accuracy.as_ref())));
            }
            for r in &rules {
                s.push_str(&format!(" {} |", pct(row.selection_accuracy.get(*r))));
            }
            for t in &tasks {
                s.push_str(&format!(" {} |", pct(row.per_task.get(*t))));
            }
            s.push_str(&format!(" {} | {:.2} |\n", row.training_tokens, row.wall_s));
        }
        if !self.claims.is_empty() {
            s.push_str("\n| claim | holds | left | right | margin |\n|---|---|---|---|---|\n");
            for c in &self.claims {
                let holds = match c.holds {
                    Some(true) => "yes".to_string(),
                    Some(false) => "no".to_string(),
                    None => format!("- ({})", c.missing.as_deref().unwrap_or_default()),
                };
                let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
                s.push_str(&format!(
                    "| {} | {holds} | {} | {} | {} |\n",
                    c.name,
                    num(c.left),
                    num(c.right),
                    c.margin
                ));
            }
        }
        s
    }
}

// Claims about a run's table (`[[claims]]` in an experiment): each compares
// two figures of the rows, or a figure with a number, and is checked when
// the run ends, so a seed's orderings read as rows of `results.json`
// instead of by eye.
//
// A figure is `method:metric`, the method a row of SynthClinic's test set
// (an evaluated stage, `<stage>-round-<k>` of a preference stage), the
// metric `greedy`, a selection rule `rule@N` (`vote-sc@16`), `task/<name>`,
// `group/<name>` or `prm_auroc`.

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
