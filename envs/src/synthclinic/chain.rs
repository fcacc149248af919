//! Reasoning steps about a case: the gold chain in MedS3's "Step k:" format,
//! and the inverse: reading any step back into a claim and checking it
//! against the KB and the case. Every step of a gold chain is checkable.

use super::case::{Case, Task, answer_text};
use super::kb::{Entity, FindingKind, Kb};
use crate::problem::{Problem, Step};
use crate::verify;
use std::collections::BTreeSet;

/// What a step asserts.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// `lab` shows `value` (as printed), which is above/below its range: `finding`.
    Lab {
        lab: usize,
        value: String,
        high: bool,
        range: String,
        finding: String,
    },
    /// Two premises imply a conclusion (a mechanism or a disease), by name.
    Derive {
        a: String,
        b: String,
        conclusion: String,
    },
    Test {
        disease: String,
        test: String,
    },
    Treatment {
        disease: String,
        treatment: String,
    },
    Finish,
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

pub fn lab_step(kb: &Kb, lab: usize, value: f64) -> String {
    let l = &kb.labs[lab];
    let high = value > l.high;
    format!(
        "{} of {} {} is {} the reference range of {}, indicating {} {}.",
        capitalize(&l.name),
        l.fmt(value),
        l.unit,
        if high { "above" } else { "below" },
        l.range(),
        if high { "high" } else { "low" },
        l.name
    )
}

pub fn derive_step(a: &str, b: &str, conclusion: &str) -> String {
    format!(
        "{} together with {b} indicates {conclusion}.",
        capitalize(a)
    )
}

pub fn test_step(disease: &str, test: &str) -> String {
    format!("The first-line test for {disease} is {test}.")
}

pub fn treatment_step(disease: &str, treatment: &str) -> String {
    format!("The first-line treatment for {disease} is {treatment}.")
}

/// The answer by the option's text, not its letter: a small student copies
/// the conclusion it just reached, while binding it to a letter is a second
/// skill the answer-only baseline showed it does not pick up.
pub fn finish_step(text: &str) -> String {
    format!("The answer is {text}.")
}

/// The gold chain: interpret the abnormal labs the diagnosis needs, derive
/// mechanisms bottom-up, the disease, then the test or treatment, then answer.
pub fn gold_chain(kb: &Kb, case: &Case) -> Vec<Step> {
    let mut steps = Vec::new();
    let required = kb.required_findings(case.disease);
    for &(lab, value) in &case.labs {
        let is_required = required
            .iter()
            .any(|&f| matches!(kb.findings[f].kind, FindingKind::Lab { lab: l, .. } if l == lab));
        if is_required {
            steps.push(Step::new(lab_step(kb, lab, value)));
        }
    }
    let mut done = BTreeSet::new();
    let d = &kb.diseases[case.disease];
    for m in d.inputs {
        push_derivations(kb, m, &mut done, &mut steps);
    }
    steps.push(Step::new(derive_step(
        &kb.mechanisms[d.inputs[0]].name,
        &kb.mechanisms[d.inputs[1]].name,
        &d.name,
    )));
    match case.task {
        Task::Diagnosis => {}
        Task::NextTest => steps.push(Step::new(test_step(&d.name, &kb.tests[d.test]))),
        Task::Treatment => steps.push(Step::new(treatment_step(
            &d.name,
            &kb.treatments[d.treatment],
        ))),
    }
    steps.push(Step::new(finish_step(answer_text(
        kb,
        case.task,
        case.disease,
    ))));
    steps
}

fn push_derivations(kb: &Kb, m: usize, done: &mut BTreeSet<usize>, steps: &mut Vec<Step>) {
    if done.contains(&m) {
        return;
    }
    let [a, b] = kb.mechanisms[m].inputs;
    for e in [a, b] {
        if let Entity::Mechanism(sub) = e {
            push_derivations(kb, sub, done, steps);
        }
    }
    done.insert(m);
    steps.push(Step::new(derive_step(
        kb.entity_name(a),
        kb.entity_name(b),
        &kb.mechanisms[m].name,
    )));
}

/// Reads a step back into a claim; `None` when it follows no known template.
pub fn parse_claim(kb: &Kb, text: &str) -> Option<Claim> {
    let text = text.trim();
    let text = text.strip_prefix("But wait, ").unwrap_or(text);
    if verify::extract_answer(text).is_some() {
        return Some(Claim::Finish);
    }
    let body = text.strip_suffix('.')?;
    if let Some(rest) = body.strip_prefix("The first-line test for ") {
        let (disease, test) = rest.split_once(" is ")?;
        return Some(Claim::Test {
            disease: disease.into(),
            test: test.into(),
        });
    }
    if let Some(rest) = body.strip_prefix("The first-line treatment for ") {
        let (disease, treatment) = rest.split_once(" is ")?;
        return Some(Claim::Treatment {
            disease: disease.into(),
            treatment: treatment.into(),
        });
    }
    if let Some((premises, conclusion)) = body.split_once(" indicates ") {
        let (a, b) = premises.split_once(" together with ")?;
        return Some(Claim::Derive {
            a: a.into(),
            b: b.into(),
            conclusion: conclusion.into(),
        });
    }
    let (left, finding) = body.split_once(", indicating ")?;
    let (subject, high, range) =
        if let Some((s, r)) = left.split_once(" is above the reference range of ") {
            (s, true, r)
        } else {
            let (s, r) = left.split_once(" is below the reference range of ")?;
            (s, false, r)
        };
    let (lab_name, value_unit) = subject.split_once(" of ")?;
    let lab = kb
        .labs
        .iter()
        .position(|l| l.name.eq_ignore_ascii_case(lab_name))?;
    let value = value_unit
        .strip_suffix(&kb.labs[lab].unit)?
        .trim_end()
        .to_string();
    Some(Claim::Lab {
        lab,
        value,
        high,
        range: range.into(),
        finding: finding.into(),
    })
}

/// Ground-truth labels for any chain about a SynthClinic case: a step is
/// correct when its claim is true in the KB and its premises are established
/// (findings the patient has, or conclusions of earlier correct steps). A step
/// built on a wrong earlier conclusion is therefore wrong too.
pub fn label_steps(kb: &Kb, case: &Case, problem: &Problem, steps: &[Step]) -> Vec<bool> {
    let mut established: BTreeSet<String> = case
        .findings
        .iter()
        .map(|&f| kb.findings[f].name.to_lowercase())
        .collect();
    steps
        .iter()
        .map(|s| {
            let Some(claim) = parse_claim(kb, &s.text) else {
                return false;
            };
            match claim {
                Claim::Finish => verify::verify(problem, &s.text).correct,
                Claim::Lab {
                    lab,
                    value,
                    high,
                    range,
                    finding,
                } => {
                    let l = &kb.labs[lab];
                    case.labs.iter().any(|&(cl, v)| {
                        cl == lab
                            && l.fmt(v) == value
                            && (if high { v > l.high } else { v < l.low })
                    }) && range == l.range()
                        && finding.eq_ignore_ascii_case(&format!(
                            "{} {}",
                            if high { "high" } else { "low" },
                            l.name
                        ))
                }
                Claim::Derive { a, b, conclusion } => {
                    let (a, b) = (a.to_lowercase(), b.to_lowercase());
                    let ok = established.contains(&a)
                        && established.contains(&b)
                        && derivation_holds(kb, &a, &b, &conclusion);
                    if ok {
                        established.insert(conclusion.to_lowercase());
                    }
                    ok
                }
                Claim::Test { disease, test } => {
                    established.contains(&disease.to_lowercase())
                        && kb.diseases.iter().any(|d| {
                            d.name.eq_ignore_ascii_case(&disease) && kb.tests[d.test] == test
                        })
                }
                Claim::Treatment { disease, treatment } => {
                    established.contains(&disease.to_lowercase())
                        && kb.diseases.iter().any(|d| {
                            d.name.eq_ignore_ascii_case(&disease)
                                && kb.treatments[d.treatment] == treatment
                        })
                }
            }
        })
        .collect()
}

fn entity_by_name(kb: &Kb, name: &str) -> Option<Entity> {
    kb.findings
        .iter()
        .position(|f| f.name.eq_ignore_ascii_case(name))
        .map(Entity::Finding)
        .or_else(|| {
            kb.mechanisms
                .iter()
                .position(|m| m.name.eq_ignore_ascii_case(name))
                .map(Entity::Mechanism)
        })
}

fn derivation_holds(kb: &Kb, a: &str, b: &str, conclusion: &str) -> bool {
    let (Some(ea), Some(eb)) = (entity_by_name(kb, a), entity_by_name(kb, b)) else {
        return false;
    };
    if let Some(m) = kb.mechanism_from(ea, eb) {
        return kb.mechanisms[m].name.eq_ignore_ascii_case(conclusion);
    }
    match (ea, eb) {
        (Entity::Mechanism(x), Entity::Mechanism(y)) => kb
            .disease_from(x, y)
            .is_some_and(|d| kb.diseases[d].name.eq_ignore_ascii_case(conclusion)),
        _ => false,
    }
}
