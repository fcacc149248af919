//! Choosing one answer among N sampled solutions (REFERENCE 1,
//! "Inference-time selection").
//!
//! Each sample is a [`Candidate`]: its final answer and the PRM's
//! probability of "correct" at the end of each of its steps. Voting rules sum
//! a per-sample weight over the samples that share an answer; best-of-N rules
//! take the single sample with the highest score.
//!
//! Rules every selector follows:
//! - a candidate without an answer never wins (and does not vote);
//! - a candidate with an answer but no step scores scores 0;
//! - a NaN score ranks below every number;
//! - ties go to the answer (vote rules) or the candidate (best-of-N rules)
//!   that appears first in the candidate list, as medzero's evaluation always has
//!   ("ties go to the answer seen first"). Totals are compared exactly.

use anyhow::{Error, bail};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A selection rule, named as in MedS3's evaluation scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rule {
    /// Plain majority vote (self-consistency).
    #[serde(rename = "vote-sc")]
    VoteSc,
    /// Best-of-N by the last step's score.
    #[serde(rename = "prm-max")]
    PrmMax,
    /// Best-of-N by the lowest step score.
    #[serde(rename = "prm-minmax")]
    PrmMinMax,
    /// Vote weighted by each sample's last step score.
    #[serde(rename = "prm-vote-sum")]
    PrmVoteSum,
    /// P-VS (prm-min-vote-sum): vote weighted by each sample's lowest step score.
    #[serde(rename = "p-vs", alias = "prm-min-vote-sum")]
    PVs,
    /// Best-of-N by the mean step score.
    #[serde(rename = "bon-mean")]
    BonMean,
    /// Best-of-N by the product of step scores.
    #[serde(rename = "bon-prod")]
    BonProduct,
}

impl Rule {
    pub const ALL: [Rule; 7] = [
        Rule::VoteSc,
        Rule::PrmMax,
        Rule::PrmMinMax,
        Rule::PrmVoteSum,
        Rule::PVs,
        Rule::BonMean,
        Rule::BonProduct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rule::VoteSc => "vote-sc",
            Rule::PrmMax => "prm-max",
            Rule::PrmMinMax => "prm-minmax",
            Rule::PrmVoteSum => "prm-vote-sum",
            Rule::PVs => "p-vs",
            Rule::BonMean => "bon-mean",
            Rule::BonProduct => "bon-prod",
        }
    }

    /// Whether the rule reads step scores, i.e. needs a PRM pass.
    pub fn needs_prm(self) -> bool {
        self != Rule::VoteSc
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Rule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "prm-min-vote-sum" {
            return Ok(Rule::PVs);
        }
        match Rule::ALL.into_iter().find(|r| r.name() == s) {
            Some(r) => Ok(r),
            None => {
                let names: Vec<&str> = Rule::ALL.iter().map(|r| r.name()).collect();
                bail!(
                    "unknown selection rule {s:?}; expected one of {} (or prm-min-vote-sum)",
                    names.join(", ")
                )
            }
        }
    }
}

/// One sampled solution.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Candidate {
    /// The resolved option letter or normalised free-text answer; `None`
    /// when the sample states no usable answer.
    pub answer: Option<String>,
    /// PRM P(correct) at the end of each step k >= 1, in step order.
    pub step_scores: Vec<f64>,
}

/// The answer `rule` picks among `candidates`, or `None` if no candidate
/// has an answer.
pub fn select(rule: Rule, candidates: &[Candidate]) -> Option<String> {
    let answered = candidates.iter().filter_map(|c| {
        c.answer
            .as_deref()
            .map(|a| (a, sample_score(rule, &c.step_scores)))
    });
    match rule {
        Rule::VoteSc | Rule::PrmVoteSum | Rule::PVs => {
            // Totals per answer, in order of first appearance.
            let mut totals: Vec<(&str, f64)> = Vec::new();
            for (answer, w) in answered {
                match totals.iter_mut().find(|(a, _)| *a == answer) {
                    Some(t) => t.1 += w,
                    None => totals.push((answer, w)),
                }
            }
            first_max(totals)
        }
        Rule::PrmMax | Rule::PrmMinMax | Rule::BonMean | Rule::BonProduct => first_max(answered),
    }
    .map(str::to_string)
}

/// The weight (vote rules) or score (best-of-N rules) of one sample.
fn sample_score(rule: Rule, scores: &[f64]) -> f64 {
    match rule {
        Rule::VoteSc => 1.0,
        _ if scores.is_empty() => 0.0,
        Rule::PrmMax | Rule::PrmVoteSum => scores[scores.len() - 1],
        Rule::PrmMinMax | Rule::PVs => scores.iter().copied().fold(f64::INFINITY, f64::min),
        Rule::BonMean => scores.iter().sum::<f64>() / scores.len() as f64,
        Rule::BonProduct => scores.iter().product(),
    }
}

/// The key of the first item with the highest score; a later item must beat
/// the best so far strictly, so ties keep the earlier one.
fn first_max<'a>(items: impl IntoIterator<Item = (&'a str, f64)>) -> Option<&'a str> {
    let rank = |s: f64| if s.is_nan() { f64::NEG_INFINITY } else { s };
    let mut best: Option<(&str, f64)> = None;
    for (key, score) in items {
        let score = rank(score);
        if best.is_none_or(|(_, b)| score > b) {
            best = Some((key, score));
        }
    }
    best.map(|(key, _)| key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(answer: &str, scores: &[f64]) -> Candidate {
        Candidate {
            answer: Some(answer.to_string()),
            step_scores: scores.to_vec(),
        }
    }

    fn none(scores: &[f64]) -> Candidate {
        Candidate {
            answer: None,
            step_scores: scores.to_vec(),
        }
    }

    /// The picked answer, "" for none.
    fn pick(rule: Rule, cs: &[Candidate]) -> String {
        select(rule, cs).unwrap_or_default()
    }

    #[test]
    fn names_round_trip_through_fromstr_display_and_serde() {
        for rule in Rule::ALL {
            assert_eq!(rule.to_string().parse::<Rule>().unwrap(), rule);
            let json = serde_json::to_string(&rule).unwrap();
            assert_eq!(json, format!("\"{rule}\""));
            assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), rule);
        }
        assert_eq!("prm-min-vote-sum".parse::<Rule>().unwrap(), Rule::PVs);
        assert_eq!(
            serde_json::from_str::<Rule>("\"prm-min-vote-sum\"").unwrap(),
            Rule::PVs
        );
        let err = "majority".parse::<Rule>().unwrap_err().to_string();
        assert!(err.contains("vote-sc") && err.contains("bon-prod"), "{err}");
        assert!(!Rule::VoteSc.needs_prm());
        assert!(Rule::ALL[1..].iter().all(|r| r.needs_prm()));
    }

    /// Three samples say A with weak weakest steps, two say B with solid
    /// chains: the majority is A, P-VS is B.
    fn disagreeing() -> Vec<Candidate> {
        vec![
            cand("A", &[0.9, 0.2, 0.8]), // min 0.2, last 0.8, mean 0.633.., prod 0.144
            cand("B", &[0.7, 0.6, 0.7]), // min 0.6, last 0.7, mean 0.666.., prod 0.294
            cand("A", &[0.9, 0.1, 0.9]), // min 0.1, last 0.9, mean 0.633.., prod 0.081
            cand("B", &[0.8, 0.5]),      // min 0.5, last 0.5, mean 0.65,    prod 0.4
            cand("A", &[0.3, 0.95]),     // min 0.3, last 0.95, mean 0.625,  prod 0.285
        ]
    }

    #[test]
    fn vote_sc_is_plain_majority() {
        assert_eq!(pick(Rule::VoteSc, &disagreeing()), "A");
    }

    #[test]
    fn p_vs_sums_min_step_scores_and_disagrees_with_the_majority() {
        // A: 0.2 + 0.1 + 0.3 = 0.6; B: 0.6 + 0.5 = 1.1.
        assert_eq!(pick(Rule::PVs, &disagreeing()), "B");
    }

    #[test]
    fn prm_vote_sum_sums_last_step_scores() {
        // A: 0.8 + 0.9 + 0.95 = 2.65; B: 0.7 + 0.5 = 1.2.
        assert_eq!(pick(Rule::PrmVoteSum, &disagreeing()), "A");
        // One confident B outweighs two doubtful A's: A 0.3 + 0.3 < B 0.7.
        let cs = [
            cand("A", &[0.3]),
            cand("A", &[0.9, 0.3]),
            cand("B", &[0.1, 0.7]),
        ];
        assert_eq!(pick(Rule::PrmVoteSum, &cs), "B");
    }

    #[test]
    fn best_of_n_rules_rank_single_samples() {
        let cs = disagreeing();
        // Last scores: 0.8, 0.7, 0.9, 0.5, 0.95 -> the fifth (A).
        assert_eq!(pick(Rule::PrmMax, &cs), "A");
        // Min scores: 0.2, 0.6, 0.1, 0.5, 0.3 -> the second (B).
        assert_eq!(pick(Rule::PrmMinMax, &cs), "B");
        // Means: 0.633, 0.667, 0.633, 0.65, 0.625 -> the second (B).
        assert_eq!(pick(Rule::BonMean, &cs), "B");
        // Products: 0.144, 0.294, 0.081, 0.4, 0.285 -> the fourth (B).
        assert_eq!(pick(Rule::BonProduct, &cs), "B");
        // Mean and product disagree when one chain is short.
        let cs = [cand("C", &[0.9, 0.9, 0.9]), cand("D", &[0.8])];
        assert_eq!(pick(Rule::BonMean, &cs), "C"); // 0.9 > 0.8
        assert_eq!(pick(Rule::BonProduct, &cs), "D"); // 0.729 < 0.8
    }

    #[test]
    fn unanswered_candidates_never_win_and_empty_scores_count_zero() {
        let cs = [none(&[1.0, 1.0]), cand("A", &[]), cand("B", &[0.1])];
        for rule in [Rule::PrmMax, Rule::PrmMinMax, Rule::PVs, Rule::BonMean] {
            assert_eq!(pick(rule, &cs), "B", "{rule}");
        }
        // With no step scores, a vote still counts for vote-sc.
        let cs = [none(&[]), cand("A", &[]), cand("B", &[0.1]), cand("A", &[])];
        assert_eq!(pick(Rule::VoteSc, &cs), "A");
        for rule in Rule::ALL {
            assert_eq!(select(rule, &[none(&[0.9]), none(&[])]), None, "{rule}");
            assert_eq!(select(rule, &[]), None, "{rule}");
        }
    }

    #[test]
    fn ties_go_to_the_first_answer_or_candidate() {
        // Vote ties: B appears before A.
        let cs = [
            cand("B", &[0.5]),
            cand("A", &[0.5]),
            cand("A", &[0.5]),
            cand("B", &[0.5]),
        ];
        for rule in [Rule::VoteSc, Rule::PrmVoteSum, Rule::PVs] {
            assert_eq!(pick(rule, &cs), "B", "{rule}");
        }
        // Best-of-N ties: the first candidate with the top score.
        let cs = [none(&[0.9]), cand("C", &[0.4, 0.9]), cand("A", &[0.4, 0.9])];
        for rule in [
            Rule::PrmMax,
            Rule::PrmMinMax,
            Rule::BonMean,
            Rule::BonProduct,
        ] {
            assert_eq!(pick(rule, &cs), "C", "{rule}");
        }
        // A NaN score ranks lowest, even when it comes first.
        let cs = [cand("A", &[f64::NAN]), cand("B", &[0.0])];
        assert_eq!(pick(Rule::PrmMax, &cs), "B");
    }
}
