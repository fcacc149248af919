//! Reasoning steps about a case: the gold chain in MedS3's "Step k:" format,
//! and the inverse: reading any step back into a claim and checking its
//! meaning against the KB and the case. Every step of a gold chain is
//! checkable, and every step can change the outcome: an abnormal lab is a
//! premise only once a step has read it against its range.

use super::case::{Case, Task, answer_text};
use super::kb::{Entity, FindingKind, Kb};
use crate::problem::{Problem, Step};
use crate::verify;
use std::collections::{BTreeMap, BTreeSet};

/// Where a lab value lies against its reference range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    High,
    Low,
    Normal,
}

impl Reading {
    pub fn of(lab: &super::kb::Lab, value: f64) -> Reading {
        if value > lab.high {
            Reading::High
        } else if value < lab.low {
            Reading::Low
        } else {
            Reading::Normal
        }
    }

    fn relation(self) -> &'static str {
        match self {
            Reading::High => "above",
            Reading::Low => "below",
            Reading::Normal => "within",
        }
    }
}

/// What a step asserts.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// `lab` shows `value` (as printed), which lies `reading` its range; an
    /// abnormal reading names the `finding` it establishes.
    Lab {
        lab: usize,
        value: String,
        reading: Reading,
        range: String,
        finding: Option<String>,
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

/// A lab read against its range: `"Serum TSH of 4.4 mIU/L is above the
/// reference range of 0.4-4.0 mIU/L, indicating high serum TSH."`, or
/// `"... is within the reference range of ..."` for a normal value.
pub fn lab_step(kb: &Kb, lab: usize, value: f64) -> String {
    let l = &kb.labs[lab];
    let reading = Reading::of(l, value);
    let head = format!(
        "{} of {} {} is {} the reference range of {}",
        capitalize(&l.name),
        l.fmt(value),
        l.unit,
        reading.relation(),
        l.range(),
    );
    match lab_finding_name(l, reading) {
        Some(finding) => format!("{head}, indicating {finding}."),
        None => format!("{head}."),
    }
}

/// The finding an abnormal reading establishes (`"high serum TSH"`).
fn lab_finding_name(l: &super::kb::Lab, reading: Reading) -> Option<String> {
    match reading {
        Reading::High => Some(format!("high {}", l.name)),
        Reading::Low => Some(format!("low {}", l.name)),
        Reading::Normal => None,
    }
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

/// The gold chain, as forward inference from the case: read every lab
/// against its range in the order the question lists them, derive every
/// mechanism the established findings support that bears on an option
/// (earliest premises first, so the order follows the case, not the KB),
/// conclude the one option disease those mechanisms imply, then its test or
/// treatment, then answer. Distractors' mechanisms are derived too when the
/// case supports them, so no early step gives the answer away.
pub fn gold_chain(kb: &Kb, case: &Case, question: &str) -> Vec<Step> {
    chain_to(kb, case, question, case.disease)
}

/// The chain a reasoner who concludes `believed` writes: the gold chain's
/// readings and derivations, then `believed` drawn from the two mechanisms
/// that imply the true disease. For a distractor that one step is false in
/// the KB (an error of content a checker can find), and everything after it
/// follows from it, so the chain answers what it derived.
pub fn chain_to(kb: &Kb, case: &Case, question: &str, believed: usize) -> Vec<Step> {
    let mut steps: Vec<Step> = case
        .labs
        .iter()
        .map(|&(lab, value)| Step::new(lab_step(kb, lab, value)))
        .collect();
    // Rank of each established premise: where the question mentions it, and
    // derived mechanisms after every finding, in derivation order.
    let mention = |name: &str| question.find(name).unwrap_or(question.len());
    let mut rank: BTreeMap<Entity, usize> = BTreeMap::new();
    for &f in &case.findings {
        let shown = match kb.findings[f].kind {
            FindingKind::Lab { lab, high } => {
                let value = case.labs.iter().find(|&&(l, _)| l == lab).map(|&(_, v)| v);
                value.is_some_and(|v| {
                    Reading::of(&kb.labs[lab], v) == if high { Reading::High } else { Reading::Low }
                })
            }
            _ => true,
        };
        if shown {
            let name = match kb.findings[f].kind {
                FindingKind::Lab { lab, .. } => kb.labs[lab].name.as_str(),
                _ => kb.findings[f].name.as_str(),
            };
            rank.insert(Entity::Finding(f), mention(name));
        }
    }
    let relevant = relevant_mechanisms(kb, &case.option_diseases);
    let mut next_rank = question.len() + 1;
    loop {
        let ready = relevant
            .iter()
            .filter(|m| !rank.contains_key(&Entity::Mechanism(**m)))
            .filter_map(|&m| {
                let [a, b] = kb.mechanisms[m].inputs;
                let (ra, rb) = (*rank.get(&a)?, *rank.get(&b)?);
                Some((
                    (ra.max(rb), ra.min(rb), m),
                    if ra <= rb { [a, b] } else { [b, a] },
                ))
            })
            .min();
        let Some(((_, _, m), [a, b])) = ready else {
            break;
        };
        steps.push(Step::new(derive_step(
            kb.entity_name(a),
            kb.entity_name(b),
            &kb.mechanisms[m].name,
        )));
        rank.insert(Entity::Mechanism(m), next_rank);
        next_rank += 1;
    }
    let d = &kb.diseases[case.disease];
    let [a, b] = d.inputs.map(Entity::Mechanism);
    let [a, b] = match (rank.get(&a), rank.get(&b)) {
        (Some(ra), Some(rb)) if rb < ra => [b, a],
        _ => [a, b],
    };
    let believed_d = &kb.diseases[believed];
    steps.push(Step::new(derive_step(
        kb.entity_name(a),
        kb.entity_name(b),
        &believed_d.name,
    )));
    match case.task {
        Task::Diagnosis => {}
        Task::NextTest => steps.push(Step::new(test_step(
            &believed_d.name,
            &kb.tests[believed_d.test],
        ))),
        Task::Treatment => steps.push(Step::new(treatment_step(
            &believed_d.name,
            &kb.treatments[believed_d.treatment],
        ))),
    }
    steps.push(Step::new(finish_step(answer_text(kb, case.task, believed))));
    steps
}

/// Every mechanism some option's disease rests on, through every level.
fn relevant_mechanisms(kb: &Kb, diseases: &[usize]) -> BTreeSet<usize> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<usize> = diseases
        .iter()
        .flat_map(|&d| kb.diseases[d].inputs)
        .collect();
    while let Some(m) = stack.pop() {
        if out.insert(m) {
            for e in kb.mechanisms[m].inputs {
                if let Entity::Mechanism(sub) = e {
                    stack.push(sub);
                }
            }
        }
    }
    out
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
    let (left, finding) = match body.split_once(", indicating ") {
        Some((left, finding)) => (left, Some(finding.to_string())),
        None => (body, None),
    };
    let (subject, reading, range) = [Reading::High, Reading::Low, Reading::Normal]
        .into_iter()
        .find_map(|r| {
            let sep = format!(" is {} the reference range of ", r.relation());
            left.split_once(sep.as_str())
                .map(|(s, range)| (s, r, range))
        })?;
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
        reading,
        range: range.into(),
        finding,
    })
}

/// Ground-truth labels for any chain about a SynthClinic case, by meaning:
/// - a lab step is correct when it reads a lab the question shows on the
///   side of its range the shown value lies (and an abnormal one names the
///   finding that side means); only then is that finding established. The
///   value it writes is not checked: the step's content is its reading, and
///   a miscopied digit that keeps the reading changes no later inference;
/// - a derivation when the KB implies its conclusion from its two premises
///   and both are established (a symptom or sign of the case, a finding read
///   by an earlier correct lab step, or an earlier correct conclusion);
/// - a test or treatment when it is the KB's for an established disease;
/// - a Finish step when its answer is an option and the answer an
///   established disease calls for, so a lucky guess is wrong.
///
/// A step built on a wrong earlier conclusion is therefore wrong too.
pub fn label_steps(kb: &Kb, case: &Case, problem: &Problem, steps: &[Step]) -> Vec<bool> {
    let mut established: BTreeSet<String> = case
        .findings
        .iter()
        .filter(|&&f| !matches!(kb.findings[f].kind, FindingKind::Lab { .. }))
        .map(|&f| kb.findings[f].name.to_lowercase())
        .collect();
    let mut diseases: BTreeSet<usize> = BTreeSet::new();
    steps
        .iter()
        .map(|s| {
            let Some(claim) = parse_claim(kb, &s.text) else {
                return false;
            };
            match claim {
                Claim::Finish => {
                    let v = verify::verify(problem, &s.text);
                    let chosen = v
                        .chosen
                        .as_deref()
                        .and_then(|letter| problem.option(letter))
                        .map(|c| c.text.as_str());
                    chosen.is_some_and(|text| {
                        diseases
                            .iter()
                            .any(|&d| answer_text(kb, case.task, d) == text)
                    })
                }
                Claim::Lab {
                    lab,
                    value: _,
                    reading,
                    range,
                    finding,
                } => {
                    let l = &kb.labs[lab];
                    let ok = case
                        .labs
                        .iter()
                        .any(|&(cl, v)| cl == lab && Reading::of(l, v) == reading)
                        && range == l.range()
                        && finding.map(|f| f.to_lowercase())
                            == lab_finding_name(l, reading).map(|f| f.to_lowercase());
                    if ok && let Some(f) = lab_finding_name(l, reading) {
                        established.insert(f.to_lowercase());
                    }
                    ok
                }
                Claim::Derive { a, b, conclusion } => {
                    let (a, b) = (a.to_lowercase(), b.to_lowercase());
                    let implied = (established.contains(&a) && established.contains(&b))
                        .then(|| derivation(kb, &a, &b, &conclusion))
                        .flatten();
                    match implied {
                        Some(d) => {
                            established.insert(conclusion.to_lowercase());
                            diseases.extend(d);
                            true
                        }
                        None => false,
                    }
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

/// Whether the KB implies `conclusion` from premises `a` and `b`: `None`
/// when it does not, `Some(Some(d))` when the conclusion is disease `d`,
/// `Some(None)` when it is a mechanism.
fn derivation(kb: &Kb, a: &str, b: &str, conclusion: &str) -> Option<Option<usize>> {
    let (ea, eb) = (entity_by_name(kb, a)?, entity_by_name(kb, b)?);
    if let Some(m) = kb.mechanism_from(ea, eb) {
        return kb.mechanisms[m]
            .name
            .eq_ignore_ascii_case(conclusion)
            .then_some(None);
    }
    match (ea, eb) {
        (Entity::Mechanism(x), Entity::Mechanism(y)) => kb
            .disease_from(x, y)
            .filter(|&d| kb.diseases[d].name.eq_ignore_ascii_case(conclusion))
            .map(Some),
        _ => None,
    }
}
