//! The SynthClinic knowledge base: labs with reference ranges, findings,
//! layered mechanisms (the multi-hop part), diseases, tests and treatments.
//! Everything is drawn from fixed word lists by a seeded ChaCha8 stream, so a
//! seed and the knobs fix the whole world.

use super::SynthConfig;
use rand::seq::SliceRandom;
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub unit: String,
    pub low: f64,
    pub high: f64,
    /// Decimals shown in values and ranges.
    pub decimals: usize,
    /// Some analytes (CRP, troponin) are only ever abnormal when high.
    pub can_be_low: bool,
}

impl Lab {
    pub fn fmt(&self, v: f64) -> String {
        format!("{:.*}", self.decimals, v)
    }
    pub fn range(&self) -> String {
        format!(
            "{}-{} {}",
            self.fmt(self.low),
            self.fmt(self.high),
            self.unit
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    Symptom,
    Sign,
    /// An abnormal lab value: needs the reference range to be recognised.
    Lab {
        lab: usize,
        high: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub name: String,
    pub kind: FindingKind,
}

/// A premise of a derivation: a finding, or a mechanism derived earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    Finding(usize),
    Mechanism(usize),
}

/// An intermediate state, implied by two premises of the level below
/// (level 1: two findings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mechanism {
    pub name: String,
    pub level: usize,
    pub inputs: [Entity; 2],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disease {
    pub name: String,
    /// Two mechanisms of the top level that together imply the disease.
    pub inputs: [usize; 2],
    /// Typical but not required findings ("commonly presents with").
    pub typical: Vec<usize>,
    pub test: usize,
    pub treatment: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kb {
    pub labs: Vec<Lab>,
    pub findings: Vec<Finding>,
    pub mechanisms: Vec<Mechanism>,
    pub diseases: Vec<Disease>,
    pub tests: Vec<String>,
    pub treatments: Vec<String>,
    pub hops: usize,
}

/// The findings an entity rests on, through every mechanism level.
fn closure(mechanisms: &[Mechanism], e: Entity) -> BTreeSet<usize> {
    let mut out = BTreeSet::new();
    let mut stack = vec![e];
    while let Some(e) = stack.pop() {
        match e {
            Entity::Finding(f) => {
                out.insert(f);
            }
            Entity::Mechanism(m) => stack.extend(mechanisms[m].inputs),
        }
    }
    out
}

impl Kb {
    pub fn entity_name(&self, e: Entity) -> &str {
        match e {
            Entity::Finding(i) => &self.findings[i].name,
            Entity::Mechanism(i) => &self.mechanisms[i].name,
        }
    }

    /// The findings a disease requires, through every mechanism level.
    pub fn required_findings(&self, disease: usize) -> BTreeSet<usize> {
        let [a, b] = self.diseases[disease].inputs;
        let mut out = closure(&self.mechanisms, Entity::Mechanism(a));
        out.extend(closure(&self.mechanisms, Entity::Mechanism(b)));
        out
    }

    /// The mechanism implied by two premises, if the KB has that rule.
    pub fn mechanism_from(&self, a: Entity, b: Entity) -> Option<usize> {
        self.mechanisms
            .iter()
            .position(|m| m.inputs == [a, b] || m.inputs == [b, a])
    }

    pub fn disease_from(&self, a: usize, b: usize) -> Option<usize> {
        self.diseases
            .iter()
            .position(|d| d.inputs == [a, b] || d.inputs == [b, a])
    }

    pub fn lab_finding(&self, lab: usize, high: bool) -> Option<usize> {
        self.findings
            .iter()
            .position(|f| f.kind == FindingKind::Lab { lab, high })
    }
}

const SYMPTOMS: &[&str] = &[
    "fever",
    "fatigue",
    "weight loss",
    "night sweats",
    "joint pain",
    "headache",
    "dizziness",
    "nausea",
    "vomiting",
    "abdominal pain",
    "cough",
    "dyspnea",
    "chest pain",
    "palpitations",
    "pruritus",
    "polyuria",
    "excessive thirst",
    "tremor",
    "muscle weakness",
    "back pain",
    "confusion",
    "syncope",
    "hematuria",
    "diarrhea",
    "constipation",
    "hoarseness",
    "blurred vision",
    "cold intolerance",
    "heat intolerance",
    "bone pain",
    "easy bruising",
    "anorexia",
];
const SIGNS: &[&str] = &[
    "hepatomegaly",
    "splenomegaly",
    "lymphadenopathy",
    "tachycardia",
    "bradycardia",
    "hypotension",
    "hypertension",
    "pallor",
    "cyanosis",
    "goiter",
    "ascites",
    "clubbing",
    "petechiae",
    "crackles",
    "a systolic murmur",
    "jaundice",
    "peripheral edema",
    "a malar rash",
    "proximal weakness",
    "hyperreflexia",
    "exophthalmos",
    "a palpable purpura",
];
/// (name, unit, low, high, decimals, can_be_low)
const LABS: &[(&str, &str, f64, f64, usize, bool)] = &[
    ("serum sodium", "mmol/L", 135.0, 145.0, 0, true),
    ("serum potassium", "mmol/L", 3.5, 5.0, 1, true),
    ("serum calcium", "mg/dL", 8.5, 10.5, 1, true),
    ("hemoglobin", "g/dL", 12.0, 16.0, 1, true),
    ("platelet count", "x10^9/L", 150.0, 400.0, 0, true),
    ("white cell count", "x10^9/L", 4.0, 11.0, 1, true),
    ("serum creatinine", "mg/dL", 0.6, 1.2, 1, false),
    ("serum ALT", "U/L", 7.0, 56.0, 0, false),
    ("serum ferritin", "ng/mL", 30.0, 300.0, 0, true),
    ("serum TSH", "mIU/L", 0.4, 4.0, 1, true),
    ("fasting glucose", "mg/dL", 70.0, 100.0, 0, true),
    ("serum CRP", "mg/L", 0.0, 10.0, 0, false),
    ("serum albumin", "g/dL", 3.5, 5.0, 1, true),
    ("total bilirubin", "mg/dL", 0.1, 1.2, 1, false),
    ("serum magnesium", "mg/dL", 1.7, 2.2, 1, true),
    ("serum cortisol", "ug/dL", 5.0, 25.0, 0, true),
];
const ORGANS: &[&str] = &[
    "hepatic",
    "renal",
    "adrenal",
    "thyroid",
    "cardiac",
    "pulmonary",
    "marrow",
    "pancreatic",
    "splenic",
    "vascular",
    "neural",
    "intestinal",
    "pituitary",
    "muscular",
    "cutaneous",
    "biliary",
];
const PROCESSES: &[&str] = &[
    "iron overload",
    "sodium wasting",
    "inflammation",
    "fibrosis",
    "hormone deficiency",
    "hormone excess",
    "autoimmune injury",
    "infiltration",
    "ischemia",
    "hypoperfusion",
    "obstruction",
    "hemolysis",
    "protein loss",
    "congestion",
];
const GREEK: &[&str] = &[
    "alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta", "lambda", "zeta",
    "epsilon", "omicron",
];
const COMPLEXES: &[&str] = &["cascade", "complex", "axis", "state", "spiral", "overload"];
const SYL_A: &[&str] = &[
    "Kor", "Val", "Mer", "Tas", "Lin", "Dor", "Ven", "Bra", "Sel", "Quen", "Hal", "Mon", "Ruv",
    "Fen", "Gis", "Pell", "Zan", "Oth",
];
const SYL_B: &[&str] = &[
    "van", "dell", "ric", "sett", "mor", "bai", "ton", "ley", "quist", "nard",
];
const DISEASE_SUFFIX: &[&str] = &["disease", "syndrome", "fever", "disorder"];
const TEST_KINDS: &[&str] = &[
    "biopsy",
    "ultrasound",
    "CT scan",
    "MRI",
    "scintigraphy",
    "angiography",
    "endoscopy",
];
const ASSAYS: &[&str] = &["antibody panel", "enzyme assay", "genetic panel", "culture"];
const DRUG_STEM: &[&str] = &[
    "dor", "sel", "pra", "vel", "tor", "quin", "mab", "lan", "ris", "zet", "nal", "cef", "lor",
];
const DRUG_SUFFIX: &[&str] = &[
    "vamab", "pristat", "olol", "azole", "cillin", "tinib", "pril", "sartan",
];

fn take_distinct<R: Rng>(
    rng: &mut R,
    pool: Vec<String>,
    n: usize,
    what: &str,
) -> Result<Vec<String>, String> {
    if pool.len() < n {
        return Err(format!(
            "asked for {n} {what} names but SynthClinic has {}",
            pool.len()
        ));
    }
    let mut pool = pool;
    pool.shuffle(rng);
    pool.truncate(n);
    Ok(pool)
}

fn product(a: &[&str], b: &[&str], sep: &str) -> Vec<String> {
    a.iter()
        .flat_map(|x| b.iter().map(move |y| format!("{x}{sep}{y}")))
        .collect()
}

/// Picks `n` distinct unordered pairs from `pool`, rejecting pairs `bad` marks
/// contradictory (e.g. low and high of one lab); `None` if too few exist.
fn distinct_pairs<R: Rng, T: Copy + Ord>(
    rng: &mut R,
    pool: &[T],
    n: usize,
    bad: impl Fn(T, T) -> bool,
) -> Option<Vec<[T; 2]>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(n);
    let mut tries = 0usize;
    while out.len() < n {
        tries += 1;
        if tries > 1000 * n + 10_000 {
            return None;
        }
        let a = pool[rng.random_range(0..pool.len())];
        let b = pool[rng.random_range(0..pool.len())];
        if a == b || bad(a, b) {
            continue;
        }
        let key = if a < b { (a, b) } else { (b, a) };
        if seen.insert(key) {
            out.push([a, b]);
        }
    }
    Some(out)
}

pub fn generate<R: Rng>(cfg: &SynthConfig, rng: &mut R) -> Result<Kb, String> {
    let mut lab_idx: Vec<usize> = (0..LABS.len()).collect();
    lab_idx.shuffle(rng);
    lab_idx.truncate(cfg.labs);
    lab_idx.sort_unstable();
    let labs: Vec<Lab> = lab_idx
        .iter()
        .map(|&i| {
            let (name, unit, low, high, decimals, can_be_low) = LABS[i];
            Lab {
                name: name.into(),
                unit: unit.into(),
                low,
                high,
                decimals,
                can_be_low,
            }
        })
        .collect();

    let mut findings: Vec<Finding> = Vec::new();
    let mut clinical: Vec<Finding> = SYMPTOMS
        .iter()
        .map(|s| Finding {
            name: s.to_string(),
            kind: FindingKind::Symptom,
        })
        .chain(SIGNS.iter().map(|s| Finding {
            name: s.to_string(),
            kind: FindingKind::Sign,
        }))
        .collect();
    clinical.shuffle(rng);
    clinical.truncate(cfg.clinical_findings);
    findings.extend(clinical);
    for (li, lab) in labs.iter().enumerate() {
        if lab.can_be_low {
            findings.push(Finding {
                name: format!("low {}", lab.name),
                kind: FindingKind::Lab {
                    lab: li,
                    high: false,
                },
            });
        }
        findings.push(Finding {
            name: format!("high {}", lab.name),
            kind: FindingKind::Lab {
                lab: li,
                high: true,
            },
        });
    }

    // Mechanism layers: level 1 pairs findings, level l pairs level l-1.
    let n_levels = cfg.hops;
    let mut mech_names = take_distinct(
        rng,
        product(ORGANS, PROCESSES, " ")
            .into_iter()
            .chain(product(GREEK, COMPLEXES, " "))
            .collect(),
        cfg.mechanisms * n_levels,
        "mechanism",
    )?
    .into_iter();
    let mut mechanisms: Vec<Mechanism> = Vec::new();
    let finding_ids: Vec<Entity> = (0..findings.len()).map(Entity::Finding).collect();
    // A pair is contradictory when its findings include both states of one
    // lab (a patient cannot have low and high sodium at once).
    let lab_states = |mechs: &[Mechanism], e: Entity| -> BTreeSet<(usize, bool)> {
        closure(mechs, e)
            .into_iter()
            .filter_map(|f| match findings[f].kind {
                FindingKind::Lab { lab, high } => Some((lab, high)),
                _ => None,
            })
            .collect()
    };
    let clash = |x: &BTreeSet<(usize, bool)>, y: &BTreeSet<(usize, bool)>| {
        let all: BTreeSet<_> = x.union(y).collect();
        all.iter().any(|&&(lab, high)| all.contains(&(lab, !high)))
    };
    let mut below = finding_ids;
    for level in 1..=n_levels {
        let start = mechanisms.len();
        let pairs = distinct_pairs(rng, &below, cfg.mechanisms, |a, b| {
            clash(&lab_states(&mechanisms, a), &lab_states(&mechanisms, b))
        })
        .ok_or_else(|| format!("cannot draw {} distinct level-{level} mechanisms; lower mechanisms or raise labs/clinical_findings", cfg.mechanisms))?;
        for inputs in pairs {
            let name = mech_names.next().expect("counted above");
            mechanisms.push(Mechanism {
                name,
                level,
                inputs,
            });
        }
        below = (start..mechanisms.len()).map(Entity::Mechanism).collect();
    }
    let top: Vec<usize> = below
        .iter()
        .map(|e| match e {
            Entity::Mechanism(m) => *m,
            Entity::Finding(_) => unreachable!("hops >= 1"),
        })
        .collect();

    let disease_names = take_distinct(
        rng,
        product(SYL_A, SYL_B, "")
            .into_iter()
            .flat_map(|stem| DISEASE_SUFFIX.iter().map(move |s| format!("{stem} {s}")))
            .collect(),
        cfg.diseases,
        "disease",
    )?;
    // Fewer tests and treatments than diseases, so some are shared.
    let n_tests = (cfg.diseases.div_ceil(4) * 3).min(100);
    let tests = take_distinct(
        rng,
        product(ORGANS, TEST_KINDS, " ")
            .into_iter()
            .chain(
                labs.iter()
                    .flat_map(|l| ASSAYS.iter().map(move |a| format!("{} {a}", l.name))),
            )
            .collect(),
        n_tests,
        "test",
    )?;
    let treatments = take_distinct(
        rng,
        product(DRUG_STEM, DRUG_SUFFIX, ""),
        n_tests,
        "treatment",
    )?;

    let mut disease_pairs = distinct_pairs(rng, &top, cfg.diseases, |a, b| {
        let states = |m| lab_states(&mechanisms, Entity::Mechanism(m));
        clash(&states(a), &states(b))
    })
    .ok_or_else(|| {
        format!(
            "cannot draw {} distinct diseases from {} mechanisms; raise mechanisms",
            cfg.diseases, cfg.mechanisms
        )
    })?
    .into_iter();
    let mut diseases = Vec::with_capacity(cfg.diseases);
    for name in disease_names {
        let inputs = disease_pairs.next().expect("counted above");
        let mut d = Disease {
            name,
            inputs,
            typical: Vec::new(),
            test: 0,
            treatment: 0,
        };
        d.test = rng.random_range(0..tests.len());
        d.treatment = rng.random_range(0..treatments.len());
        diseases.push(d);
    }
    let mut kb = Kb {
        labs,
        findings,
        mechanisms,
        diseases,
        tests,
        treatments,
        hops: cfg.hops,
    };
    // Typical findings are clinical ones the disease does not require, so they
    // hint without deciding.
    for d in 0..kb.diseases.len() {
        let required = kb.required_findings(d);
        let mut candidates: Vec<usize> = (0..kb.findings.len())
            .filter(|f| {
                !required.contains(f) && !matches!(kb.findings[*f].kind, FindingKind::Lab { .. })
            })
            .collect();
        candidates.shuffle(rng);
        candidates.truncate(cfg.typical_findings);
        candidates.sort_unstable();
        kb.diseases[d].typical = candidates;
    }
    Ok(kb)
}
