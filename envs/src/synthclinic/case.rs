//! Cases: a patient whose findings imply one disease through the KB's
//! mechanisms, asked as a MedQA-style question (diagnosis, next test or
//! treatment) with distractors that share findings with the answer.

use super::SynthConfig;
use super::kb::{FindingKind, Kb};
use crate::problem::{Choice, Gold, Problem};
use rand::seq::SliceRandom;
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Diagnosis,
    NextTest,
    Treatment,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Diagnosis, Task::NextTest, Task::Treatment];
    pub fn name(self) -> &'static str {
        match self {
            Task::Diagnosis => "diagnosis",
            Task::NextTest => "next_test",
            Task::Treatment => "treatment",
        }
    }
    fn ask(self) -> &'static str {
        match self {
            Task::Diagnosis => "Which of the following is the most likely diagnosis?",
            Task::NextTest => {
                "Which of the following is the most appropriate first test to confirm the diagnosis?"
            }
            Task::Treatment => {
                "Which of the following is the most appropriate first-line treatment?"
            }
        }
    }
}

/// The hidden truth of a question, kept in `Problem::metadata["case"]` so the
/// oracle can check any reasoning about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub disease: usize,
    pub task: Task,
    /// Every finding the patient has (required, typical and noise).
    pub findings: BTreeSet<usize>,
    /// Lab values shown: (lab, value), abnormal ones and normal noise.
    pub labs: Vec<(usize, f64)>,
    /// Disease behind each option, in option order.
    pub option_diseases: Vec<usize>,
}

impl Case {
    pub fn from_problem(p: &Problem) -> Option<Case> {
        serde_json::from_value(p.metadata.get("case")?.clone()).ok()
    }
}

/// A value the lab's range classifies as the requested state.
fn lab_value<R: Rng>(rng: &mut R, kb: &Kb, lab: usize, state: Option<bool>) -> f64 {
    let l = &kb.labs[lab];
    let span = l.high - l.low;
    let step = 10f64.powi(-(l.decimals as i32));
    let v = match state {
        Some(true) => l.high + step + rng.random::<f64>() * span.max(l.high) * 0.8,
        Some(false) => l.low - step - rng.random::<f64>() * l.low * 0.3,
        None => l.low + step + rng.random::<f64>() * (span - 2.0 * step).max(0.0),
    };
    let r = (v / step).round() * step;
    // Rounding must not move a value back across the boundary.
    match state {
        Some(true) => r.max(l.high + step),
        Some(false) => r.min(l.low - step).max(0.0),
        None => r.clamp(l.low, l.high),
    }
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [a] => a.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The values, as printed, of the labs the answer's disease requires.
pub fn required_lab_values(kb: &Kb, case: &Case) -> Vec<String> {
    let required = kb.required_findings(case.disease);
    case.labs
        .iter()
        .filter(|&&(lab, _)| {
            required.iter().any(
                |&f| matches!(kb.findings[f].kind, FindingKind::Lab { lab: l, .. } if l == lab),
            )
        })
        .map(|&(lab, v)| kb.labs[lab].fmt(v))
        .collect()
}

/// The answer's text for a disease under a task.
pub fn answer_text(kb: &Kb, task: Task, disease: usize) -> &str {
    let d = &kb.diseases[disease];
    match task {
        Task::Diagnosis => &d.name,
        Task::NextTest => &kb.tests[d.test],
        Task::Treatment => &kb.treatments[d.treatment],
    }
}

pub fn generate<R: Rng>(cfg: &SynthConfig, kb: &Kb, rng: &mut R, id: String) -> Problem {
    loop {
        if let Some(p) = try_generate(cfg, kb, rng, &id) {
            return p;
        }
    }
}

fn try_generate<R: Rng>(cfg: &SynthConfig, kb: &Kb, rng: &mut R, id: &str) -> Option<Problem> {
    let disease = rng.random_range(0..kb.diseases.len());
    let task = Task::ALL[rng.random_range(0..3)];
    let required = kb.required_findings(disease);
    let mut findings = required.clone();
    for &f in &kb.diseases[disease].typical {
        if rng.random_bool(cfg.typical_shown) {
            findings.insert(f);
        }
    }
    let labs_used = |fs: &BTreeSet<usize>| -> BTreeSet<usize> {
        fs.iter()
            .filter_map(|&f| match kb.findings[f].kind {
                FindingKind::Lab { lab, .. } => Some(lab),
                _ => None,
            })
            .collect()
    };
    let mut noise_pool: Vec<usize> = (0..kb.findings.len())
        .filter(|f| !findings.contains(f))
        .collect();
    noise_pool.shuffle(rng);
    let mut added = 0;
    for f in noise_pool {
        if added == cfg.noise_findings {
            break;
        }
        if let FindingKind::Lab { lab, .. } = kb.findings[f].kind
            && labs_used(&findings).contains(&lab)
        {
            continue;
        }
        findings.insert(f);
        added += 1;
    }

    // Options: the answer and distractors; the share of distractors drawn
    // from diseases overlapping the answer's findings is the similarity knob.
    let answer_text_of = |d: usize| answer_text(kb, task, d).to_string();
    let fully_supported = |d: usize| kb.required_findings(d).is_subset(&findings);
    let overlap = |d: usize| kb.required_findings(d).intersection(&required).count();
    let mut similar: Vec<usize> = (0..kb.diseases.len())
        .filter(|&d| d != disease && overlap(d) > 0)
        .collect();
    let mut other: Vec<usize> = (0..kb.diseases.len())
        .filter(|&d| d != disease && overlap(d) == 0)
        .collect();
    similar.shuffle(rng);
    other.shuffle(rng);
    let mut chosen = vec![disease];
    let mut texts = BTreeSet::from([answer_text_of(disease)]);
    while chosen.len() < cfg.options {
        let from_similar = rng.random_bool(cfg.distractor_similarity);
        let pool = if (from_similar && !similar.is_empty()) || other.is_empty() {
            &mut similar
        } else {
            &mut other
        };
        let d = pool.pop()?;
        if fully_supported(d) || !texts.insert(answer_text_of(d)) {
            continue;
        }
        chosen.push(d);
    }
    chosen.shuffle(rng);

    let mut labs: Vec<(usize, f64)> = Vec::new();
    let mut clinical: Vec<usize> = Vec::new();
    for &f in &findings {
        match kb.findings[f].kind {
            FindingKind::Lab { lab, high } => labs.push((lab, lab_value(rng, kb, lab, Some(high)))),
            _ => clinical.push(f),
        }
    }
    let used = labs_used(&findings);
    let mut normal: Vec<usize> = (0..kb.labs.len()).filter(|l| !used.contains(l)).collect();
    normal.shuffle(rng);
    for &l in normal.iter().take(cfg.normal_labs) {
        labs.push((l, lab_value(rng, kb, l, None)));
    }
    labs.shuffle(rng);
    clinical.shuffle(rng);

    let age = rng.random_range(18..86);
    let sex = if rng.random_bool(0.5) { "woman" } else { "man" };
    let (symptoms, signs): (Vec<usize>, Vec<usize>) = clinical
        .iter()
        .partition(|&&f| kb.findings[f].kind == FindingKind::Symptom);
    let names = |fs: &[usize]| {
        fs.iter()
            .map(|&f| kb.findings[f].name.clone())
            .collect::<Vec<_>>()
    };
    let mut q = format!("A {age}-year-old {sex} presents with ");
    q.push_str(&if symptoms.is_empty() {
        "malaise".to_string()
    } else {
        join_and(&names(&symptoms))
    });
    q.push('.');
    if !signs.is_empty() {
        q.push_str(&format!(" Examination shows {}.", join_and(&names(&signs))));
    }
    if !labs.is_empty() {
        let shown: Vec<String> = labs
            .iter()
            .map(|&(l, v)| {
                format!(
                    "{} {} {}",
                    kb.labs[l].name,
                    kb.labs[l].fmt(v),
                    kb.labs[l].unit
                )
            })
            .collect();
        q.push_str(&format!(" Laboratory studies show {}.", join_and(&shown)));
    }
    q.push(' ');
    q.push_str(task.ask());

    let letters = ["A", "B", "C", "D", "E", "F", "G", "H"];
    let options: Vec<Choice> = chosen
        .iter()
        .zip(letters)
        .map(|(&d, l)| Choice {
            letter: l.to_string(),
            text: answer_text_of(d),
        })
        .collect();
    let gold = letters[chosen
        .iter()
        .position(|&d| d == disease)
        .expect("answer is an option")];
    let case = Case {
        disease,
        task,
        findings,
        labs,
        option_diseases: chosen,
    };
    let mut metadata = BTreeMap::new();
    metadata.insert(
        "case".to_string(),
        serde_json::to_value(&case).expect("case serialises"),
    );
    Some(Problem {
        id: id.to_string(),
        question: q,
        options,
        gold: Gold::Option(gold.to_string()),
        task: task.name().to_string(),
        source: "synthclinic".to_string(),
        metadata,
    })
}
