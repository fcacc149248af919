//! Strict verification on real benchmark questions (MedS3 release files).

use medzero_envs::loaders::load_problems;
use medzero_envs::verify::{Verdict, extract_answer, normalize, resolve_option, verify};
use medzero_envs::{Gold, Problem, Step, StepKind};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/meds3-eval");

fn problems(file: &str) -> Vec<Problem> {
    load_problems(format!("{DATA}/{file}")).unwrap_or_else(|e| panic!("{e}"))
}

fn by_id<'a>(ps: &'a [Problem], id: &str) -> &'a Problem {
    ps.iter()
        .find(|p| p.id == id)
        .unwrap_or_else(|| panic!("no problem with id {id}"))
}

fn text_of<'a>(p: &'a Problem, letter: &str) -> &'a str {
    &p.option(letter).expect("option exists").text
}

/// MedS3's public rule (`ground_truth.lower() in final_answer.lower()` in
/// Evol_Instruct/utils/eval_method.py): the gold letter anywhere in the answer.
fn meds3_lenient(p: &Problem, response: &str) -> bool {
    let Gold::Option(gold) = &p.gold else {
        unreachable!()
    };
    extract_answer(response).is_some_and(|a| a.to_lowercase().contains(&gold.to_lowercase()))
}

#[test]
fn medqa_0_letter_and_text_forms() {
    let qs = problems("MedQA.json");
    let p = by_id(&qs, "0");
    assert_eq!(p.gold, Gold::Option("C".into()));
    let c = text_of(p, "C");
    let b = text_of(p, "B");
    assert_eq!(
        c,
        "Tell the attending that he cannot fail to disclose this mistake"
    );

    assert_eq!(
        verify(p, "The answer is C."),
        Verdict {
            extracted: Some("C".into()),
            chosen: Some("C".into()),
            correct: true
        }
    );
    let v = verify(p, &format!("The answer is B. {b}"));
    assert_eq!(v.chosen.as_deref(), Some("B"));
    assert!(!v.correct);
    // A letter with another option's text names nothing.
    let v = verify(p, &format!("The answer is A. {b}"));
    assert_eq!(v.extracted.as_deref(), Some(format!("A. {b}").as_str()));
    assert_eq!(v.chosen, None);
    assert!(!v.correct);
    let v = verify(p, &format!("The answer is C. {b}"));
    assert_eq!((v.chosen, v.correct), (None, false));

    assert!(verify(p, &format!("The answer is C. {c}.")).correct);
    assert!(verify(p, &format!("The answer is C) {c}")).correct);
    assert!(verify(p, &format!("The answer is (C) {c}")).correct);
    assert!(verify(p, &format!("The answer is {c}")).correct);
    assert!(verify(p, &format!("The answer is {}.", c.to_uppercase())).correct);
    assert!(!verify(p, &format!("The answer is {b}")).correct);
}

#[test]
fn two_letters_or_prose_name_nothing() {
    let qs = problems("MedQA.json");
    let p = by_id(&qs, "0");
    for r in [
        "The answer is C or D.",
        "The answer is C and D",
        "The answer is C, D",
        "The answer is CD",
        "The answer is to tell the attending.",
        "The answer is C because honesty matters",
        "The answer is F.",
        "The answer isn't C",
        "I think C.",
        "",
    ] {
        let v = verify(p, r);
        assert_eq!((v.chosen.as_deref(), v.correct), (None, false), "{r:?}");
    }
}

#[test]
fn case_and_marker_variants() {
    let qs = problems("MedQA.json");
    let p = by_id(&qs, "0");
    for r in [
        "the answer is c",
        "THE ANSWER IS (C).",
        "The answer is: C",
        "The answer is **C**.",
        "**The answer is (C)**",
        "The final answer is C.",
        "So the correct answer is: C",
        "Answer: C",
        "Reasoning first.\n**Answer:** option C",
        "The answer is option (C).",
    ] {
        let v = verify(p, r);
        assert_eq!(v.chosen.as_deref(), Some("C"), "{r:?}");
        assert!(v.correct, "{r:?}");
    }
}

#[test]
fn last_answer_wins() {
    let qs = problems("MedQA.json");
    let p = by_id(&qs, "0");
    let chain = "Step 1: The answer is A.\n\nStep 2: But wait, disclosure is required.\n\nStep 3: The answer is C.";
    assert!(verify(p, chain).correct);
    let flipped = "Step 1: The answer is C.\n\nStep 2: The answer is A.";
    let v = verify(p, flipped);
    assert_eq!((v.chosen.as_deref(), v.correct), (Some("A"), false));
    // On one line too.
    assert_eq!(
        extract_answer("The answer is A, no, the answer is D.").as_deref(),
        Some("D")
    );
}

#[test]
fn strict_where_meds3_is_lenient() {
    let qs = problems("MedQA.json");
    // MedQA 842: gold C (Bacillus cereus); option B is "C. difficile colitis".
    let p = by_id(&qs, "842");
    assert_eq!(p.gold, Gold::Option("C".into()));
    assert_eq!(text_of(p, "B"), "C. difficile colitis");
    let r = "The answer is C. difficile colitis.";
    assert!(meds3_lenient(p, r), "MedS3 counts this as correct");
    let v = verify(p, r);
    assert_eq!((v.chosen.as_deref(), v.correct), (Some("B"), false));
    assert!(
        verify(p, "The answer is B. C. difficile colitis")
            .chosen
            .as_deref()
            == Some("B")
    );
    assert!(verify(p, &format!("The answer is C. {}", text_of(p, "C"))).correct);

    // MedQA 9: gold A; naming B with its text still contains an "a".
    let p = by_id(&qs, "9");
    assert_eq!(p.gold, Gold::Option("A".into()));
    let r = format!("The answer is B. {}.", text_of(p, "B"));
    assert!(meds3_lenient(p, &r));
    assert_eq!(verify(p, &r).chosen.as_deref(), Some("B"));
    assert!(!verify(p, &r).correct);
}

#[test]
fn ambiguous_options_in_real_medmcqa() {
    let qs = problems("MedMCQA.json");
    // Options A. a  B. c  C. bc  D. ad, gold C.
    let p = by_id(&qs, "1460");
    assert_eq!(p.gold, Gold::Option("C".into()));
    assert_eq!(text_of(p, "B"), "c");
    assert!(
        verify(p, "The answer is C.").correct,
        "uppercase is a letter"
    );
    assert_eq!(
        verify(p, "The answer is c.").chosen,
        None,
        "lowercase is ambiguous"
    );
    assert!(verify(p, "The answer is bc").correct);
    assert!(verify(p, "The answer is C. bc").correct);

    // Options A and B are both "Oxidases", gold C.
    let p = by_id(&qs, "881");
    assert_eq!(text_of(p, "A"), text_of(p, "B"));
    assert_eq!(verify(p, "The answer is Oxidases").chosen, None);
    assert_eq!(
        verify(p, "The answer is B. Oxidases").chosen.as_deref(),
        Some("B")
    );
    assert!(verify(p, "The answer is Transferases.").correct);

    // Option texts that repeat their letter: "A. Dermatitits herpetiformis".
    let p = by_id(&qs, "1641");
    assert_eq!(text_of(p, "A"), "A. Dermatitits herpetiformis");
    assert!(verify(p, "The answer is A. Dermatitits herpetiformis.").correct);
    assert!(verify(p, "The answer is A. A. Dermatitits herpetiformis").correct);
    assert!(!verify(p, "The answer is B. Dermatitits herpetiformis").correct);
}

#[test]
fn bioasq_reference_turns() {
    let qs = problems("bioasq.json");
    assert_eq!(qs.len(), 618);
    let p = by_id(&qs, "bioasq_0");
    let response = p.metadata["response"].as_str().expect("gpt turn kept");
    assert_eq!(response, "The answer is B.");
    assert_eq!(extract_answer(response).as_deref(), Some("B"));
    for p in &qs {
        let response = p.metadata["response"].as_str().expect("gpt turn kept");
        let Gold::Option(gold) = &p.gold else {
            panic!("{}", p.id)
        };
        assert_eq!(
            extract_answer(response).as_deref(),
            Some(gold.as_str()),
            "{}",
            p.id
        );
        assert!(verify(p, response).correct, "{}", p.id);
    }
    let p = by_id(&qs, "bioasq_0");
    assert!(!verify(p, "The answer is A.").correct);
    assert!(verify(p, "The answer is no").correct);
}

#[test]
fn pubmedqa_yes_no_maybe_by_text() {
    let qs = problems("pubmedqa.json");
    let yes = by_id(&qs, "pubmedqa_0");
    assert_eq!(yes.gold, Gold::Option("A".into()));
    let v = verify(yes, "The answer is yes");
    assert_eq!((v.chosen.as_deref(), v.correct), (Some("A"), true));
    assert!(verify(yes, "the answer is Yes.").correct);
    assert!(!verify(yes, "The answer is maybe.").correct);
    assert!(!verify(yes, "The answer is yes or maybe").correct);

    let no = qs
        .iter()
        .find(|p| p.gold == Gold::Option("B".into()))
        .expect("a 'no' item");
    assert!(verify(no, "The answer is no.").correct);
    assert!(verify(no, "The answer is B").correct);
    assert!(!verify(no, "The answer is yes").correct);
}

#[test]
fn free_text_gold() {
    let p = Problem {
        id: "t".into(),
        question: "First-line drug for type 2 diabetes?".into(),
        options: vec![],
        gold: Gold::Text("Metformin".into()),
        task: String::new(),
        source: "inline".into(),
        metadata: Default::default(),
    };
    assert!(verify(&p, "The answer is metformin.").correct);
    assert!(verify(&p, "The answer is **Metformin**").correct);
    assert!(!verify(&p, "The answer is metformin and insulin").correct);
    assert!(!verify(&p, "Metformin").correct, "no answer statement");
    assert_eq!(verify(&p, "The answer is metformin").chosen, None);
}

#[test]
fn extraction_details() {
    assert_eq!(
        extract_answer("The answer is B. Ceftriaxone").as_deref(),
        Some("B. Ceftriaxone")
    );
    assert_eq!(
        extract_answer("The answer is B. Ceftriaxone.\nIt covers N. gonorrhoeae.").as_deref(),
        Some("B. Ceftriaxone")
    );
    assert_eq!(
        extract_answer("The answer is **(B)**.").as_deref(),
        Some("B")
    );
    assert_eq!(extract_answer("The answer is: (B)").as_deref(), Some("B"));
    assert_eq!(extract_answer("The answer is 4.6.").as_deref(), Some("4.6"));
    assert_eq!(
        extract_answer("The answer is (A) or (B)").as_deref(),
        Some("(A) or (B)")
    );
    assert_eq!(extract_answer("No conclusion here."), None);
    assert_eq!(extract_answer("The answer is"), None);
    assert_eq!(extract_answer("The answer is.\n"), None);
    // "answer:" counts only at the start of a line.
    assert_eq!(
        extract_answer("To reach an answer: first, look at the ECG."),
        None
    );
    assert_eq!(extract_answer("Final answer: D").as_deref(), Some("D"));
}

#[test]
fn steps_finish_on_answer() {
    assert_eq!(Step::new("The answer is B.").kind, StepKind::Finish);
    assert_eq!(
        Step::new("To reach an answer: check the ECG.").kind,
        StepKind::Reason
    );
    assert_eq!(
        Step::new("But wait, the answer is A.").kind,
        StepKind::Reflect
    );
}

#[test]
fn normalize_and_resolve() {
    assert_eq!(
        normalize("  Tell   the\nAttending.  "),
        "tell the attending"
    );
    assert_eq!(normalize("yes?!"), "yes");
    assert_eq!(normalize("4.6"), "4.6");
    let qs = problems("MedQA.json");
    let p = by_id(&qs, "0");
    assert_eq!(resolve_option(&p.options, "c").as_deref(), Some("C"));
    assert_eq!(resolve_option(&p.options, "B)").as_deref(), Some("B"));
    assert_eq!(resolve_option(&p.options, "Option E").as_deref(), Some("E"));
    assert_eq!(resolve_option(&p.options, "B.5"), None);
    assert_eq!(resolve_option(&[], "A"), None);
}
