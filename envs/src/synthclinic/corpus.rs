//! The textbook: every KB fact in varied phrasing, minus a withheld share, so
//! a student pretrained on it lacks some knowledge a teacher can inject.

use super::SynthConfig;
use super::case::Task;
use super::chain::{derive_step, test_step, treatment_step};
use super::kb::Kb;
use rand::seq::SliceRandom;
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    /// Stable id, e.g. `lab:3`, `mechanism:12`, `disease:4`, `test:4`.
    pub id: String,
    /// The canonical sentence (the one reasoning steps use).
    pub canonical: String,
    /// Other phrasings of the same fact.
    pub variants: Vec<String>,
}

/// All facts of the KB, in a fixed order.
pub fn facts(kb: &Kb) -> Vec<Fact> {
    let mut out = Vec::new();
    for (i, l) in kb.labs.iter().enumerate() {
        out.push(Fact {
            id: format!("lab:{i}"),
            canonical: format!("The reference range of {} is {}.", l.name, l.range()),
            variants: vec![
                format!(
                    "Normal {} lies between {} and {} {}.",
                    l.name,
                    l.fmt(l.low),
                    l.fmt(l.high),
                    l.unit
                ),
                format!(
                    "A {} above {} {} is high and below {} {} is low.",
                    l.name,
                    l.fmt(l.high),
                    l.unit,
                    l.fmt(l.low),
                    l.unit
                ),
            ],
        });
    }
    for (i, m) in kb.mechanisms.iter().enumerate() {
        let (a, b) = (kb.entity_name(m.inputs[0]), kb.entity_name(m.inputs[1]));
        out.push(Fact {
            id: format!("mechanism:{i}"),
            canonical: derive_step(a, b, &m.name),
            variants: vec![
                format!("When {a} and {b} occur together, suspect {}.", m.name),
                format!("{} presents as {a} with {b}.", capitalize(&m.name)),
            ],
        });
    }
    for (i, d) in kb.diseases.iter().enumerate() {
        let (a, b) = (
            &kb.mechanisms[d.inputs[0]].name,
            &kb.mechanisms[d.inputs[1]].name,
        );
        out.push(Fact {
            id: format!("disease:{i}"),
            canonical: derive_step(a, b, &d.name),
            variants: vec![
                format!("{} results from {a} combined with {b}.", d.name),
                format!(
                    "The combination of {a} and {b} is characteristic of {}.",
                    d.name
                ),
            ],
        });
        if !d.typical.is_empty() {
            let typical: Vec<&str> = d
                .typical
                .iter()
                .map(|&f| kb.findings[f].name.as_str())
                .collect();
            out.push(Fact {
                id: format!("typical:{i}"),
                canonical: format!(
                    "{} commonly presents with {}.",
                    d.name,
                    typical.join(" and ")
                ),
                variants: vec![format!(
                    "Patients with {} often have {}.",
                    d.name,
                    typical.join(" and ")
                )],
            });
        }
        let test = &kb.tests[d.test];
        out.push(Fact {
            id: format!("test:{i}"),
            canonical: test_step(&d.name, test),
            variants: vec![
                format!("{} is confirmed with {test}.", d.name),
                format!("To confirm {}, order {test} first.", d.name),
            ],
        });
        let rx = &kb.treatments[d.treatment];
        out.push(Fact {
            id: format!("treatment:{i}"),
            canonical: treatment_step(&d.name, rx),
            variants: vec![
                format!("{} is treated first with {rx}.", d.name),
                format!("Start {rx} for {}.", d.name),
            ],
        });
    }
    out
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Ids of the facts the textbook leaves out.
pub fn withheld<R: Rng>(cfg: &SynthConfig, facts: &[Fact], rng: &mut R) -> Vec<String> {
    let mut ids: Vec<String> = facts
        .iter()
        .filter(|_| rng.random_bool(cfg.withheld_fraction))
        .map(|f| f.id.clone())
        .collect();
    ids.sort();
    ids
}

/// The textbook lines: each fact not withheld, in `corpus_phrasings` phrasings,
/// shuffled.
pub fn textbook<R: Rng>(
    cfg: &SynthConfig,
    facts: &[Fact],
    withheld: &[String],
    rng: &mut R,
) -> Vec<String> {
    let mut lines = Vec::new();
    for f in facts
        .iter()
        .filter(|f| withheld.binary_search(&f.id).is_err())
    {
        lines.push(f.canonical.clone());
        lines.extend(
            f.variants
                .iter()
                .take(cfg.corpus_phrasings.saturating_sub(1))
                .cloned(),
        );
    }
    lines.shuffle(rng);
    lines
}

/// The facts a question's reasoning rests on, as knowledge points.
pub fn facts_for(kb: &Kb, disease: usize, task: Task) -> Vec<String> {
    let all = facts(kb);
    let mut ids: Vec<String> = Vec::new();
    let required = kb.required_findings(disease);
    for &f in &required {
        if let super::kb::FindingKind::Lab { lab, .. } = kb.findings[f].kind {
            ids.push(format!("lab:{lab}"));
        }
    }
    ids.dedup();
    let mut stack: Vec<usize> = kb.diseases[disease].inputs.to_vec();
    let mut mechs = Vec::new();
    while let Some(m) = stack.pop() {
        mechs.push(m);
        for e in kb.mechanisms[m].inputs {
            if let super::kb::Entity::Mechanism(s) = e {
                stack.push(s);
            }
        }
    }
    mechs.sort_unstable();
    mechs.dedup();
    ids.extend(mechs.iter().map(|m| format!("mechanism:{m}")));
    ids.push(format!("disease:{disease}"));
    match task {
        Task::Diagnosis => {}
        Task::NextTest => ids.push(format!("test:{disease}")),
        Task::Treatment => ids.push(format!("treatment:{disease}")),
    }
    ids.iter()
        .filter_map(|id| {
            all.iter()
                .find(|f| &f.id == id)
                .map(|f| f.canonical.clone())
        })
        .collect()
}
