//! The run's final table: `results.json` for scripts, `results.md` for people.

use super::claims::Claim;
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
