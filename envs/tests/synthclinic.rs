//! SynthClinic: deterministic, needs reasoning, and its oracle labels steps
//! as the ground truth a PRM is judged against.

use medzero_envs::synthclinic::chain::{derive_step, finish_step, lab_step};
use medzero_envs::synthclinic::{Case, OracleConfig, SynthClinic, SynthConfig};
use medzero_envs::{Step, StepKind, parse_chain, render_chain, verify};

fn world(seed: u64) -> SynthClinic {
    SynthClinic::generate(&SynthConfig {
        seed,
        train: 300,
        test: 100,
        ..Default::default()
    })
    .unwrap()
}

fn read_dir(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn same_seed_same_bytes_other_seed_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    world(7).write_dir(&a).unwrap();
    world(7).write_dir(&b).unwrap();
    world(8).write_dir(&c).unwrap();
    let (fa, fb, fc) = (read_dir(&a), read_dir(&b), read_dir(&c));
    let names: Vec<&str> = fa.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "gold_chains.jsonl",
            "kb.json",
            "test.jsonl",
            "textbook.txt",
            "train.jsonl"
        ]
    );
    assert_eq!(fa, fb);
    for ((name, x), (_, y)) in fa.iter().zip(&fc) {
        assert_ne!(x, y, "{name} is the same for seeds 7 and 8");
    }
}

#[test]
fn gold_chains_verify_and_every_step_is_labelled_correct() {
    let w = world(1);
    let o = w.oracle(OracleConfig::default());
    for p in w.train.iter().chain(&w.test) {
        let chain = o.truth().gold_chain(p).unwrap();
        assert!(
            chain.len() >= 4,
            "{}: chain too short for multi-hop: {chain:?}",
            p.id
        );
        assert!(verify::verify(p, &render_chain(&chain)).correct, "{}", p.id);
        assert_eq!(parse_chain(&render_chain(&chain)), chain, "{}", p.id);
        assert_eq!(chain.last().unwrap().kind, StepKind::Finish);
        assert!(
            chain[..chain.len() - 1]
                .iter()
                .all(|s| s.kind == StepKind::Reason)
        );
        let labels = o.truth().label_steps(p, &chain).unwrap();
        assert!(
            labels.iter().all(|&l| l),
            "{}: {labels:?}\n{}",
            p.id,
            render_chain(&chain)
        );
    }
}

/// Replaces the conclusion of the first derivation the disease rests on with
/// another mechanism: that step and the ones built on it must be labelled
/// wrong (the chain also derives distractors' mechanisms, which nothing
/// after them needs).
#[test]
fn corrupted_steps_are_labelled_wrong_from_the_first_corruption() {
    let w = world(2);
    let o = w.oracle(OracleConfig::default());
    let kb = o.kb();
    let mut checked = 0;
    for p in &w.test {
        let case = Case::from_problem(p).unwrap();
        let chain = o.truth().gold_chain(p).unwrap();
        let inputs = kb.diseases[case.disease]
            .inputs
            .map(|m| format!(" indicates {}.", kb.mechanisms[m].name));
        let k = chain
            .iter()
            .position(|s| inputs.iter().any(|i| s.text.ends_with(i.as_str())))
            .unwrap();
        let (premises, conclusion) = chain[k]
            .text
            .trim_end_matches('.')
            .split_once(" indicates ")
            .unwrap();
        let wrong = kb
            .mechanisms
            .iter()
            .find(|m| m.name != conclusion && m.level == 1)
            .unwrap();
        let mut bad = chain.clone();
        bad[k] = Step::new(format!("{premises} indicates {}.", wrong.name));
        let labels = o.truth().label_steps(p, &bad).unwrap();
        assert!(
            labels[..k].iter().all(|&l| l),
            "{}: steps before the corruption stay correct",
            p.id
        );
        assert!(!labels[k], "{}: corrupted step {k} must be wrong", p.id);
        assert_eq!(o.truth().first_wrong_step(p, &bad).unwrap(), Some(k));
        // The disease step rests on the lost conclusion.
        let disease_step = bad
            .iter()
            .position(|s| s.text.contains(&kb.diseases[case.disease].name))
            .unwrap();
        assert!(
            !labels[disease_step],
            "{}: a step on a wrong premise is wrong",
            p.id
        );

        // The teacher's correction keeps the good prefix and reaches the gold answer.
        let fixed = o.correct(p, &bad).unwrap();
        assert_eq!(&fixed[..k], &bad[..k]);
        assert!(
            o.truth().label_steps(p, &fixed).unwrap().iter().all(|&l| l),
            "{}\n{}",
            p.id,
            render_chain(&fixed)
        );
        checked += 1;
    }
    assert_eq!(checked, w.test.len());
}

#[test]
fn wrong_lab_reading_and_wrong_answer_are_wrong() {
    let w = world(3);
    let o = w.oracle(OracleConfig::default());
    let kb = o.kb();
    for p in w.test.iter().take(50) {
        let case = Case::from_problem(p).unwrap();
        let (lab, value) = case.labs[0];
        let l = &kb.labs[lab];
        // A normal value read as abnormal, or an abnormal one read the wrong way.
        let flipped = if value > l.high {
            l.low - 1.0
        } else {
            l.high + 1.0
        };
        let text = lab_step(kb, lab, flipped).replace(&l.fmt(flipped), &l.fmt(value));
        assert_eq!(
            o.truth()
                .label_steps(p, &[Step::new(text.clone())])
                .unwrap(),
            [false],
            "{text}"
        );
        let gold = p.gold_text().unwrap();
        let other = p.options.iter().find(|c| c.text != gold).unwrap();
        let finish = Step::new(finish_step(&other.text));
        assert_eq!(o.truth().label_steps(p, &[finish]).unwrap(), [false]);
        let nonsense = Step::new(derive_step("fever", "cough", "something unknown"));
        assert_eq!(o.truth().label_steps(p, &[nonsense]).unwrap(), [false]);
        assert_eq!(
            o.truth()
                .label_steps(p, &[Step::new("I think it is a liver problem.")])
                .unwrap(),
            [false]
        );
    }
}

#[test]
fn teacher_noise_makes_it_wrong_on_that_share_and_screening_catches_most() {
    let w = SynthClinic::generate(&SynthConfig {
        seed: 4,
        train: 2000,
        test: 10,
        ..Default::default()
    })
    .unwrap();
    let o = w.oracle(OracleConfig {
        noise: 0.2,
        seed: 9,
        ..Default::default()
    });
    let (mut wrong, mut flagged_wrong, mut flagged_right) = (0usize, 0usize, 0usize);
    for p in &w.train {
        let e = o.explain(p).unwrap();
        let ok = verify::verify(p, &format!("The answer is {}.", e.letter)).correct;
        assert_eq!(ok, !o.is_noisy(p));
        let text = &p.option(&e.letter).unwrap().text;
        assert!(e.render(p).starts_with(&format!("Answer: {text}\n")));
        assert_eq!(verify::verify(p, &e.render(p)).correct, ok);
        assert!(e.render(p).contains("\n1. "));
        let keep = o.screen(p).unwrap();
        match (ok, keep) {
            (false, false) => flagged_wrong += 1,
            (true, false) => flagged_right += 1,
            _ => {}
        }
        wrong += !ok as usize;
    }
    let rate = wrong as f64 / w.train.len() as f64;
    assert!(
        (0.17..0.23).contains(&rate),
        "noise 0.2 gave a wrong rate of {rate}"
    );
    let recall = flagged_wrong as f64 / wrong as f64;
    assert!((0.7..0.9).contains(&recall), "screen recall {recall}");
    assert!((flagged_right as f64 / (w.train.len() - wrong) as f64) < 0.1);
}

/// The gold chain is forward inference: it reads every lab the question
/// shows, in the question's order, before any derivation; each derivation's
/// premises are mentioned no later than the next one's; and on a share of
/// questions it derives a distractor's mechanism too, so its early steps do
/// not give the answer away.
#[test]
fn gold_chains_read_the_case_forward() {
    let w = world(5);
    let o = w.oracle(OracleConfig::default());
    let kb = o.kb();
    let mut with_distractor = 0;
    for p in w.train.iter().chain(&w.test) {
        let case = Case::from_problem(p).unwrap();
        let chain = o.truth().gold_chain(p).unwrap();
        let labs: Vec<String> = case.labs.iter().map(|&(l, v)| lab_step(kb, l, v)).collect();
        let texts: Vec<&str> = chain.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            &texts[..labs.len()],
            &labs.iter().map(String::as_str).collect::<Vec<_>>()[..],
            "{}",
            p.id
        );
        let answer_inputs = kb.diseases[case.disease]
            .inputs
            .map(|m| kb.mechanisms[m].name.clone());
        let derived: Vec<&str> = texts[labs.len()..]
            .iter()
            .filter_map(|t| {
                t.strip_suffix('.')?
                    .split_once(" indicates ")
                    .map(|(_, c)| c)
            })
            .collect();
        let mechanisms = derived.len() - 1;
        assert!(mechanisms >= 2, "{}: {texts:?}", p.id);
        with_distractor += derived[..mechanisms]
            .iter()
            .any(|c| !answer_inputs.iter().any(|a| a == c)) as usize;
    }
    let share = with_distractor as f64 / (w.train.len() + w.test.len()) as f64;
    println!(
        "gold chains deriving a distractor's mechanism: {:.1}%",
        100.0 * share
    );
    assert!(share > 0.05, "only {share} of chains weigh a distractor");
}

/// Labels check meaning: an abnormal lab is a premise only once read; a lab
/// step is judged by its reading, not the digits it copied, and a
/// correction keeps such a step; the right answer with nothing
/// derived is a lucky guess, labelled wrong; a noisy teacher's chain goes
/// wrong exactly at the disease it misattributes and answers what it derived.
#[test]
fn labels_follow_meaning_not_strings() {
    let w = world(6);
    let o = w.oracle(OracleConfig {
        noise: 0.5,
        seed: 3,
        ..Default::default()
    });
    let kb = o.kb();
    let truth = o.truth();
    let (mut lab_premises, mut noisy) = (0, 0);
    for p in &w.test {
        let case = Case::from_problem(p).unwrap();
        let gold = truth.gold_chain(p).unwrap();
        let n_labs = case.labs.len();
        // Skipping the lab readings breaks every derivation that needs one.
        let needs_lab = gold[n_labs..].iter().position(|s| {
            s.text.contains(" together with ")
                && (s.text.contains("High ")
                    || s.text.contains("Low ")
                    || s.text.contains(" high ")
                    || s.text.contains(" low "))
        });
        if let Some(k) = needs_lab {
            let labels = truth.label_steps(p, &gold[n_labs..]).unwrap();
            assert!(
                !labels[k],
                "{}: an unread lab is no premise: {}",
                p.id,
                gold[n_labs + k].text
            );
            lab_premises += 1;
        }
        // A lab step is judged by its reading: a miscopied value with the
        // right reading is right, the right value on the wrong side is not.
        let (lab, value) = case.labs[0];
        let l = &kb.labs[lab];
        let step = lab_step(kb, lab, value);
        let shifted = step.replacen(&l.fmt(value), &format!("{}9", l.fmt(value)), 1);
        assert_eq!(
            truth.label_steps(p, &[Step::new(shifted.clone())]).unwrap(),
            [true],
            "{shifted}"
        );
        let flipped = [
            (" above ", " below "),
            (" below ", " above "),
            (" within ", " above "),
        ]
        .into_iter()
        .find(|(from, _)| step.contains(from))
        .map(|(from, to)| step.replacen(from, to, 1))
        .unwrap();
        assert_eq!(
            truth.label_steps(p, &[Step::new(flipped.clone())]).unwrap(),
            [false],
            "{flipped}"
        );
        if !o.is_noisy(p) {
            let fixed = o.correct(p, &[Step::new(shifted.clone())]).unwrap();
            assert_eq!(fixed[0].text, shifted);
            assert!(
                !fixed.iter().any(|s| s.text == step),
                "{}: the corrected chain reads the lab twice",
                p.id
            );
            assert!(truth.label_steps(p, &fixed).unwrap().iter().all(|&l| l));
        }
        // The gold answer alone is a guess.
        let guess = Step::new(finish_step(p.gold_text().unwrap()));
        assert_eq!(truth.label_steps(p, &[guess]).unwrap(), [false]);
        // The teacher's chain.
        let chain = o.chain(p).unwrap();
        let labels = truth.label_steps(p, &chain).unwrap();
        if o.is_noisy(p) {
            noisy += 1;
            let first = labels
                .iter()
                .position(|&l| !l)
                .expect("a noisy chain has a wrong step");
            assert!(
                chain[first].text.contains(" together with "),
                "{}",
                chain[first].text
            );
            assert!(
                chain[first + 1..]
                    .iter()
                    .zip(&labels[first + 1..])
                    .all(|(_, &l)| !l)
            );
            assert!(!verify::verify(p, &render_chain(&chain)).correct);
            assert_eq!(o.truth().first_wrong_step(p, &chain).unwrap(), Some(first));
        } else {
            assert!(labels.iter().all(|&l| l));
            assert_eq!(chain, gold);
        }
    }
    assert!(
        lab_premises > 10 && noisy > 10,
        "{lab_premises} lab premises, {noisy} noisy"
    );
}

#[test]
fn textbook_withholds_the_configured_share() {
    let w = SynthClinic::generate(&SynthConfig {
        withheld_fraction: 0.3,
        ..Default::default()
    })
    .unwrap();
    let facts = medzero_envs::synthclinic::corpus::facts(&w.kb);
    let share = w.withheld.len() as f64 / facts.len() as f64;
    assert!((0.2..0.4).contains(&share), "{share}");
    for f in &facts {
        let present = w.textbook.contains(&f.canonical);
        assert_eq!(present, !w.withheld.contains(&f.id), "{}", f.id);
    }
    let none = SynthClinic::generate(&SynthConfig {
        withheld_fraction: 0.0,
        corpus_phrasings: 3,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        none.textbook.len(),
        facts
            .iter()
            .map(|f| 1 + f.variants.len().min(2))
            .sum::<usize>()
    );
}

#[test]
fn knobs_change_the_questions() {
    let base = SynthConfig {
        train: 200,
        test: 0,
        ..Default::default()
    };
    let two_hops = SynthClinic::generate(&SynthConfig {
        hops: 2,
        ..base.clone()
    })
    .unwrap();
    let one_hop = SynthClinic::generate(&base).unwrap();
    let mean_len = |w: &SynthClinic| {
        let o = w.oracle(OracleConfig::default());
        w.train
            .iter()
            .map(|p| o.truth().gold_chain(p).unwrap().len())
            .sum::<usize>() as f64
            / w.train.len() as f64
    };
    assert!(
        mean_len(&two_hops) > mean_len(&one_hop) + 1.5,
        "{} vs {}",
        mean_len(&two_hops),
        mean_len(&one_hop)
    );
    let five = SynthClinic::generate(&SynthConfig {
        options: 5,
        ..base.clone()
    })
    .unwrap();
    assert!(five.train.iter().all(|p| p.options.len() == 5));
    let noisy = SynthClinic::generate(&SynthConfig {
        noise_findings: 5,
        ..base.clone()
    })
    .unwrap();
    let findings = |w: &SynthClinic| {
        w.train
            .iter()
            .map(|p| Case::from_problem(p).unwrap().findings.len())
            .sum::<usize>()
    };
    assert!(findings(&noisy) > findings(&one_hop) + 2 * 200);
}

#[test]
fn invalid_knobs_are_clear_errors() {
    for (cfg, needle) in [
        (
            SynthConfig {
                hops: 0,
                ..Default::default()
            },
            "hops must be 1, 2 or 3",
        ),
        (
            SynthConfig {
                options: 9,
                ..Default::default()
            },
            "options must be between 2 and 8",
        ),
        (
            SynthConfig {
                typical_shown: 1.5,
                ..Default::default()
            },
            "typical_shown must be in [0, 1]",
        ),
        (
            SynthConfig {
                diseases: 5,
                ..Default::default()
            },
            "at least twice options",
        ),
        (
            SynthConfig {
                diseases: 400,
                mechanisms: 20,
                ..Default::default()
            },
            "top-level mechanisms can pair",
        ),
    ] {
        let err = SynthClinic::generate(&cfg).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
}
