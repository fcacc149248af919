//! Loaders on the real MedS3 release files, on broken copies of them, and on
//! small samples of the other formats.

use medzero_envs::loaders::{
    Format, LoadError, LoadOptions, RecordAt, detect_format, load_problems, load_problems_as,
    load_problems_with, stats,
};
use medzero_envs::{Choice, Gold, Problem};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/meds3-eval");

const FILES: [(&str, usize); 4] = [
    ("MedQA.json", 1273),
    ("MedMCQA.json", 4183),
    ("pubmedqa.json", 500),
    ("bioasq.json", 618),
];

fn data(file: &str) -> PathBuf {
    Path::new(DATA).join(file)
}

fn raw(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(data(file)).expect("data file readable");
    serde_json::from_str(&text).expect("data file is a JSON array")
}

fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, content).expect("write temp file");
    path
}

fn err_of(result: Result<Vec<Problem>, LoadError>) -> String {
    match result {
        Ok(ps) => panic!("expected an error, loaded {} problems", ps.len()),
        Err(e) => e.to_string(),
    }
}

fn choices(texts: &[&str]) -> Vec<Choice> {
    texts
        .iter()
        .zip('A'..)
        .map(|(t, l)| Choice {
            letter: l.to_string(),
            text: t.to_string(),
        })
        .collect()
}

#[test]
fn every_release_file_loads_with_its_exact_count() {
    for (file, count) in FILES {
        assert_eq!(
            detect_format(data(file)).expect(file),
            Format::Meds3,
            "{file}"
        );
        let ps = load_problems(data(file)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ps.len(), count, "{file}");
        assert!(ps.iter().all(|p| p.source == file));
    }
}

#[test]
fn medqa_record_0_matches_the_raw_json() {
    let ps = load_problems(data("MedQA.json")).expect("loads");
    let p = &ps[0];
    assert_eq!(p.id, "0");
    assert_eq!(p.gold, Gold::Option("C".into()));
    assert_eq!(p.options.len(), 5);
    assert_eq!(
        p.option("C").map(|c| c.text.as_str()),
        Some("Tell the attending that he cannot fail to disclose this mistake")
    );
    assert_eq!(p.task, "step1");
    assert!(
        p.question
            .starts_with("A junior orthopaedic surgery resident")
    );
    assert!(
        p.question.ends_with(
            "Which of the following is the correct next action for the resident to take?"
        )
    );
    assert!(p.metadata.is_empty(), "{:?}", p.metadata);
    // The stray `\n"` after the options of 52 records is not part of option E.
    let p7 = ps.iter().find(|p| p.id == "7").expect("id 7");
    assert_eq!(p7.options[4].text, "Propranolol");
}

/// Every record, checked against an independent reading of the raw JSON.
#[test]
fn all_records_agree_with_the_raw_json() {
    for (file, _) in FILES {
        let ps = load_problems(data(file)).expect("loads");
        let records = raw(file);
        assert_eq!(ps.len(), records.len());
        for (p, r) in ps.iter().zip(&records) {
            let id = match &r["id"] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            assert_eq!(p.id, id, "{file}");
            assert_eq!(
                Some(p.gold.clone()),
                r["eval"]["answer"].as_str().map(|a| Gold::Option(a.into()))
            );
            assert_eq!(
                p.task,
                r["eval"]["type"].as_str().unwrap_or(""),
                "{file} {id}"
            );
            // The prompt a model sees is the human turn, up to whitespace
            // and the stray quote line.
            let human = r["conversations"][0]["value"].as_str().expect("human turn");
            let lines = |s: &str| -> Vec<String> {
                s.lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    .filter(|l| !l.is_empty() && l != "\"")
                    .collect()
            };
            assert_eq!(lines(&p.prompt_text()), lines(human), "{file} {id}");
        }
    }
}

#[test]
fn stats_match_an_independent_count() {
    for (file, count) in FILES {
        let ps = load_problems(data(file)).expect("loads");
        let s = stats(&ps);
        let mut answers = BTreeMap::new();
        let mut tasks = BTreeMap::new();
        let mut option_counts = BTreeMap::new();
        for r in raw(file) {
            *answers
                .entry(r["eval"]["answer"].as_str().expect("answer").to_string())
                .or_insert(0) += 1;
            *tasks
                .entry(r["eval"]["type"].as_str().unwrap_or("").to_string())
                .or_insert(0) += 1;
            let human = r["conversations"][0]["value"].as_str().expect("human turn");
            let n = human
                .lines()
                .filter(|l| {
                    l.as_bytes().first().is_some_and(u8::is_ascii_uppercase)
                        && l.get(1..3) == Some(". ")
                })
                .count();
            *option_counts.entry(n).or_insert(0) += 1;
        }
        assert_eq!(s.records, count);
        assert_eq!(s.answer_distribution, answers, "{file}");
        assert_eq!(s.tasks, tasks, "{file}");
        assert_eq!(s.option_counts, option_counts, "{file}");
    }
    let s = stats(&load_problems(data("MedQA.json")).expect("loads"));
    let expected: BTreeMap<String, usize> =
        [("A", 273), ("B", 277), ("C", 252), ("D", 269), ("E", 202)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
    assert_eq!(s.answer_distribution, expected);
    assert_eq!(
        serde_json::to_value(&s).expect("serialises")["option_counts"],
        json!({"5": 1273})
    );
}

#[test]
fn pubmedqa_and_bioasq_keep_their_extra_fields() {
    let ps = load_problems(data("pubmedqa.json")).expect("loads");
    let p = &ps[0];
    assert_eq!(p.id, "pubmedqa_0");
    assert_eq!(
        p.question,
        "Question: Is anorectal endosonography valuable in dyschesia?"
    );
    assert_eq!(p.options, choices(&["yes", "no", "maybe"]));
    assert_eq!(p.metadata["answer_text"], json!("yes"));
    assert!(
        p.metadata["long_answer"]
            .as_str()
            .is_some_and(|s| s.starts_with("Linear anorectal"))
    );
    let ps = load_problems(data("bioasq.json")).expect("loads");
    assert_eq!(ps[0].options, choices(&["yes", "no"]));
    assert_eq!(ps[0].metadata["response"], json!("The answer is B."));
}

// ------------------------------------------------------------ broken copies

#[test]
fn truncated_json_names_file_line_column_and_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = std::fs::read_to_string(data("MedQA.json")).expect("readable");
    let start_17 = full.find("\"id\": 17,").expect("record 17");
    let half = full.len() / 2;
    assert!(
        full[..half].ends_with(|c: char| c.is_alphanumeric()),
        "cut inside a string"
    );
    let end_17 = start_17 + full[start_17..].find("\n    },").expect("end of record 17");
    let cases = [
        (
            start_17 + 40,
            "record 17: file ends in the middle of a record (truncated?)".to_string(),
        ),
        (
            half,
            format!(
                "record {}: file ends in the middle of a record (truncated?)",
                full[..half].matches("\n    },").count()
            ),
        ),
        (
            end_17 + 6,
            "file ends after 18 records, without the closing `]` (truncated?)".to_string(),
        ),
        (
            end_17 + 7,
            "file ends after 18 records, without the closing `]` (truncated?)".to_string(),
        ),
        (
            full.trim_end().len() - 1,
            "file ends after 1273 records, without the closing `]` (truncated?)".to_string(),
        ),
        (
            1,
            "file ends after 0 records, without the closing `]` (truncated?)".to_string(),
        ),
    ];
    for (cut, message) in cases {
        let text = &full[..cut];
        let path = write(&dir, "MedQA.json", text);
        let line = text.matches('\n').count() + 1;
        let column = text.len() - text.rfind('\n').map_or(0, |i| i + 1);
        assert_eq!(
            err_of(load_problems(&path)),
            format!("{}:{line}:{column}: {message}", path.display())
        );
    }
    let path = write(&dir, "MedQA.json", &full[..start_17 + 40]);
    assert!(err_of(load_problems(&path)).contains(": record 17: "));
    // Skipping does not make a broken array loadable.
    assert!(
        load_problems_with(
            &path,
            None,
            &LoadOptions {
                skip_malformed: true
            }
        )
        .is_err()
    );
}

/// A change that breaks one record.
type Edit = fn(&mut Value);

/// Writes the MedQA release with record `index` changed by `edit`.
fn edited_medqa(dir: &tempfile::TempDir, index: usize, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut records = raw("MedQA.json");
    edit(&mut records[index]);
    write(
        dir,
        "MedQA.json",
        &serde_json::to_string_pretty(&records).expect("serialises"),
    )
}

#[test]
fn malformed_records_name_file_record_and_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(usize, Edit, &str); 7] = [
        (
            17,
            |r| drop(r["eval"].as_object_mut().map(|e| e.remove("answer"))),
            "missing eval.answer",
        ),
        (
            17,
            |r| drop(r.as_object_mut().map(|o| o.remove("eval"))),
            "missing eval",
        ),
        (
            5,
            |r| r["eval"]["answer"] = json!("F"),
            "eval.answer \"F\" is not one of the option letters (A, B, C, D, E)",
        ),
        (
            3,
            |r| {
                let human = r["conversations"][0]["value"].as_str().unwrap_or_default();
                let stem = human.split("\nA. ").next().unwrap_or_default().to_string();
                r["conversations"][0]["value"] = json!(stem);
            },
            "eval.answer is the option letter \"D\" but the question has no option lines `X. text`",
        ),
        (
            8,
            |r| {
                let human = r["conversations"][0]["value"].as_str().unwrap_or_default();
                r["conversations"][0]["value"] = json!(human.replace("\nC. ", "\nF. "));
            },
            "options must be lettered A, B, C, ... in order, but option 3 is F",
        ),
        (
            9,
            |r| r["conversations"] = json!([{"from": "gpt", "value": "The answer is A."}]),
            "conversations must be [system,] human[, gpt], not [assistant]",
        ),
        (
            12,
            |r| r["id"] = json!(11),
            "duplicate id \"11\", first used by record 11",
        ),
    ];
    for (index, edit, message) in cases {
        let path = edited_medqa(&dir, index, edit);
        let id = match index {
            12 => 11,
            i => i,
        };
        assert_eq!(
            err_of(load_problems(&path)),
            format!("{}: record {index} (id {id}): {message}", path.display())
        );
        let loaded = load_problems_with(
            &path,
            None,
            &LoadOptions {
                skip_malformed: true,
            },
        )
        .expect("skipping loads the rest");
        assert_eq!(loaded.problems.len(), 1272);
        assert_eq!(loaded.format, Format::Meds3);
        let [skipped] = &loaded.skipped[..] else {
            panic!("{:?}", loaded.skipped)
        };
        assert!(matches!(
            skipped,
            LoadError::Record { at: RecordAt::Index { index: i, .. }, .. } if *i == index
        ));
    }
}

#[test]
fn options_are_the_trailing_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let release = load_problems(data("MedQA.json")).expect("loads");
    // A stem line that looks like an option stays in the stem.
    let path = edited_medqa(&dir, 20, |r| {
        let human = r["conversations"][0]["value"].as_str().unwrap_or_default();
        r["conversations"][0]["value"] =
            json!(format!("A. baumannii was isolated.\nB. Then: {human}"));
    });
    let ps = load_problems(&path).expect("loads");
    assert_eq!(ps[20].options, release[20].options);
    assert_eq!(
        ps[20].question,
        format!(
            "A. baumannii was isolated.\nB. Then: {}",
            release[20].question
        )
    );
    // Text after the options is an error, not a longer option E.
    let path = edited_medqa(&dir, 21, |r| {
        let human = r["conversations"][0]["value"].as_str().unwrap_or_default();
        r["conversations"][0]["value"] = json!(format!("{human}\nAnswer with one letter."));
    });
    assert_eq!(
        err_of(load_problems(&path)),
        format!(
            "{}: record 21 (id 21): line \"Answer with one letter.\" comes after the options but is not an option line `X. text`",
            path.display()
        )
    );
    let path = edited_medqa(&dir, 22, |r| {
        let human = r["conversations"][0]["value"].as_str().unwrap_or_default();
        r["conversations"][0]["value"] = json!(human.replace("\nA. ", "\nZ. "));
    });
    let e = err_of(load_problems(&path));
    assert!(
        e.contains(
            ": record 22 (id 22): the option lines do not start with `A. `; the first is \"Z. "
        ),
        "{e}"
    );
}

#[test]
fn file_level_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.json");
    let e = err_of(load_problems(&missing));
    assert!(e.starts_with(&format!("{}: ", missing.display())), "{e}");

    let empty = write(&dir, "empty.json", "  \n");
    assert_eq!(
        err_of(load_problems(&empty)),
        format!("{}: file is empty", empty.display())
    );

    let garbage = write(&dir, "garbage.json", "\n  question,answer\n");
    assert_eq!(
        err_of(load_problems(&garbage)),
        format!(
            "{}:2:3: not JSON: expected a JSON array `[`, JSON lines, or a JSON object `{{`",
            garbage.display()
        )
    );

    let latin1 = dir.path().join("latin1.jsonl");
    std::fs::write(&latin1, b"{\"a\": 1}\n{\"b\": \"caf\xe9\"}\n").expect("write");
    assert_eq!(
        err_of(load_problems(&latin1)),
        format!("{}:2:11: not UTF-8 text", latin1.display())
    );

    let unknown = write(
        &dir,
        "unknown.jsonl",
        "{\"prompt\": \"x\", \"completion\": \"y\"}\n",
    );
    let e = err_of(load_problems(&unknown));
    assert!(
        e.contains("cannot tell the format from the first record's keys (completion, prompt)"),
        "{e}"
    );
    assert!(e.contains("medzero-jsonl"), "{e}");

    let no_records = write(&dir, "none.json", "[]");
    assert!(err_of(load_problems(&no_records)).contains("no records"));
    assert_eq!(
        load_problems_as(&no_records, Format::Meds3)
            .expect("empty is fine")
            .len(),
        0
    );

    let array = write(
        &dir,
        "array.json",
        "[{\"QUESTION\": \"q\", \"final_decision\": \"yes\"}]",
    );
    assert!(
        err_of(load_problems_as(&array, Format::Pubmedqa))
            .contains("pubmedqa expects one JSON object")
    );
}

// --------------------------------------------------------- other formats

/// MedQA's original JSONL for the first three records of the release.
fn medqa_jsonl_of(ps: &[Problem]) -> String {
    ps.iter()
        .map(|p| {
            let options: serde_json::Map<String, Value> = p
                .options
                .iter()
                .map(|c| (c.letter.clone(), json!(c.text)))
                .collect();
            let Gold::Option(gold) = &p.gold else {
                panic!("letter gold")
            };
            json!({
                "question": p.question,
                "answer": p.gold_text(),
                "options": options,
                "meta_info": p.task,
                "answer_idx": gold,
                "metamap_phrases": ["phrase"],
            })
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn medqa_jsonl_matches_the_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let release = load_problems(data("MedQA.json")).expect("loads");
    let path = write(&dir, "test.jsonl", &medqa_jsonl_of(&release[..3]));
    assert_eq!(detect_format(&path).expect("detects"), Format::MedqaJsonl);
    let ps = load_problems(&path).expect("loads");
    assert_eq!(ps.len(), 3);
    for (p, r) in ps.iter().zip(&release) {
        assert_eq!(
            (&p.id, &p.question, &p.options, &p.gold, &p.task),
            (&r.id, &r.question, &r.options, &r.gold, &r.task)
        );
        assert_eq!(p.metadata["metamap_phrases"], json!(["phrase"]));
        assert_eq!(p.source, "test.jsonl");
    }
}

#[test]
fn jsonl_errors_name_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let release = load_problems(data("MedQA.json")).expect("loads");
    let good: Vec<String> = medqa_jsonl_of(&release[..4])
        .lines()
        .map(String::from)
        .collect();

    // Line 3 is broken JSON; blank lines still count.
    let text = format!("{}\n\n{{\"question\": \"x\",, }}\n{}\n", good[0], good[1]);
    let path = write(&dir, "syntax.jsonl", &text);
    assert_eq!(
        err_of(load_problems(&path)),
        format!("{}:3:18: key must be a string", path.display())
    );
    let loaded = load_problems_with(
        &path,
        None,
        &LoadOptions {
            skip_malformed: true,
        },
    )
    .expect("skips");
    assert_eq!(loaded.problems.len(), 2);
    assert_eq!(loaded.problems[1].id, "2", "ids count skipped lines");
    assert_eq!(loaded.skipped.len(), 1);

    // Line 4: a record without answer_idx.
    let mut bad: Value = serde_json::from_str(&good[3]).expect("json");
    bad.as_object_mut().map(|o| o.remove("answer_idx"));
    let text = format!("{}\n{}\n{}\n{bad}\n", good[0], good[1], good[2]);
    let path = write(&dir, "record.jsonl", &text);
    assert_eq!(
        err_of(load_problems_as(&path, Format::MedqaJsonl)),
        format!("{}:4: missing answer_idx", path.display())
    );

    // Line 2: answer text contradicting answer_idx.
    let mut bad: Value = serde_json::from_str(&good[1]).expect("json");
    bad["answer"] = json!("Something else");
    let path = write(&dir, "contra.jsonl", &format!("{}\n{bad}\n", good[0]));
    let e = err_of(load_problems(&path));
    assert!(
        e.starts_with(&format!(
            "{}:2: answer \"Something else\" is not the text of option E",
            path.display()
        )),
        "{e}"
    );

    // The last line cut short.
    let text = format!("{}\n{}", good[0], &good[1][..50]);
    let path = write(&dir, "cut.jsonl", &text);
    assert_eq!(
        err_of(load_problems(&path)),
        format!(
            "{}:2:50: line ends in the middle of a record (truncated?)",
            path.display()
        )
    );
}

#[test]
fn medmcqa_original_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let line = |id: &str, cop: Value| {
        json!({
            "question": "Which of the following is not true for myelinated nerve fibers:",
            "exp": "Impulse through myelinated fibers is faster.",
            "cop": cop,
            "opa": "Impulse through myelinated fibers is slower than non-myelinated fibers",
            "opb": "Membrane currents are generated at nodes of Ranvier",
            "opc": "Saltatory conduction of impulses is seen",
            "opd": "Local anesthesia is effective only when the nerve is not covered by myelin sheath",
            "subject_name": "Physiology",
            "topic_name": null,
            "id": id,
            "choice_type": "multi",
        })
        .to_string()
    };
    let path = write(
        &dir,
        "dev.json",
        &format!(
            "{}\n{}\n",
            line("45258d3d", json!(1)),
            line("b8d4", json!(4))
        ),
    );
    assert_eq!(detect_format(&path).expect("detects"), Format::Medmcqa);
    let ps = load_problems(&path).expect("loads");
    let release = load_problems(data("MedMCQA.json")).expect("loads");
    assert_eq!(
        (&ps[0].question, &ps[0].options, &ps[0].task),
        (&release[0].question, &release[0].options, &release[0].task)
    );
    assert_eq!(ps[0].gold, release[0].gold);
    assert_eq!(ps[1].gold, Gold::Option("D".into()));
    assert_eq!(ps[0].id, "45258d3d");
    assert_eq!(
        ps[0].metadata["exp"],
        json!("Impulse through myelinated fibers is faster.")
    );
    assert_eq!(ps[0].metadata["choice_type"], json!("multi"));

    let path = write(
        &dir,
        "zero.json",
        &format!("{}\n{}\n", line("a", json!(1)), line("b", json!(0))),
    );
    let e = err_of(load_problems(&path));
    assert!(
        e.starts_with(&format!("{}:2: id b: cop must be 1-4", path.display())),
        "{e}"
    );
    assert!(e.contains("0-based"), "{e}");
    let mut test_split: Value = serde_json::from_str(&line("c", json!(1))).expect("json");
    test_split.as_object_mut().map(|o| o.remove("cop"));
    let path = write(&dir, "test.json", &test_split.to_string());
    assert!(
        err_of(load_problems(&path))
            .ends_with(":1: id c: missing cop (MedMCQA's test split has no answers)")
    );
}

#[test]
fn pubmedqa_original_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = json!({
        "21645374": {
            "QUESTION": "Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?",
            "CONTEXTS": ["Programmed cell death (PCD) is ..."],
            "LABELS": ["BACKGROUND"],
            "YEAR": "2011",
            "final_decision": "yes",
            "LONG_ANSWER": "Results depicted mitochondrial dynamics in vivo ...",
        },
        "16418930": {
            "QUESTION": "Landolt C and snellen e acuity: differences in strabismus amblyopia?",
            "CONTEXTS": ["Assessment of visual acuity ..."],
            "final_decision": "no",
            "LONG_ANSWER": "Using the charts described ...",
        },
        "9488747": {
            "QUESTION": "Syncope during bathing in infants, a pediatric form of water-induced urticaria?",
            "CONTEXTS": ["Apparent life-threatening events ..."],
            "final_decision": "maybe",
            "LONG_ANSWER": "...",
        },
    });
    for (name, text) in [
        (
            "ori_pqal.json",
            serde_json::to_string_pretty(&entries).expect("json"),
        ),
        ("one_line.json", entries.to_string()),
    ] {
        let path = write(&dir, name, &text);
        assert_eq!(
            detect_format(&path).expect("detects"),
            Format::Pubmedqa,
            "{name}"
        );
        let ps = load_problems(&path).expect("loads");
        // Entries keep the file's order (json! sorts its keys).
        let golds: Vec<(&str, &Gold)> = ps.iter().map(|p| (p.id.as_str(), &p.gold)).collect();
        let (a, b, c) = (
            Gold::Option("A".into()),
            Gold::Option("B".into()),
            Gold::Option("C".into()),
        );
        assert_eq!(golds, [("16418930", &b), ("21645374", &a), ("9488747", &c)]);
        assert!(
            ps.iter()
                .all(|p| p.options == choices(&["yes", "no", "maybe"]))
        );
        let p = ps.iter().find(|p| p.id == "21645374").expect("entry");
        assert!(p.question.starts_with("Do mitochondria"));
        assert_eq!(p.metadata["YEAR"], json!("2011"));
    }
    let text = r#"{"1": {"QUESTION": "q?", "final_decision": "perhaps"}}"#;
    let path = write(&dir, "bad.json", text);
    assert_eq!(
        err_of(load_problems(&path)),
        format!(
            "{}: entry \"1\": final_decision must be yes, no or maybe, not \"perhaps\"",
            path.display()
        )
    );
    let text = "{\n  \"1\": {\"QUESTION\": \"q?\", \"final_decision\": \"yes\"},\n  \"1\": {\"QUESTION\": \"r?\", \"final_decision\": \"no\"}\n}";
    let path = write(&dir, "dup.json", text);
    assert!(
        err_of(load_problems(&path))
            .ends_with(": entry \"1\": duplicate id \"1\", first used by entry 0")
    );
    let path = write(&dir, "cut.json", &text[..40]);
    assert_eq!(
        err_of(load_problems(&path)),
        format!(
            "{}:2:38: entry \"1\": file ends in the middle of a record (truncated?)",
            path.display()
        )
    );
    let between = text.find("},\n").expect("entry end") + 3;
    let path = write(&dir, "cut.json", &text[..between]);
    assert_eq!(
        err_of(load_problems(&path)),
        format!(
            "{}:3:0: file ends after 1 entries, without the closing `}}` (truncated?)",
            path.display()
        )
    );
}

#[test]
fn sharegpt_medthink_style() {
    let dir = tempfile::tempdir().expect("tempdir");
    let release = load_problems(data("MedQA.json")).expect("loads");
    let q = &release[0];
    let records = json!([
        {"id": "mt-1", "conversations": [
            {"from": "user", "value": q.prompt_text()},
            {"from": "assistant", "value": "Answer: C\nExplanation: the resident must not hide the error; the answer is not A."},
        ]},
        {"id": "mt-2", "conversations": [
            {"from": "system", "value": "You are a doctor."},
            {"from": "human", "value": "What is the first-line drug for type 2 diabetes?"},
            {"from": "gpt", "value": "Answer: Metformin.\nExplanation: ..."},
        ]},
        {"id": "mt-3", "conversations": [
            {"from": "human", "value": q.prompt_text()},
            {"from": "gpt", "value": "Disclosure is mandatory. The answer is C. Tell the attending that he cannot fail to disclose this mistake."},
        ]},
    ]);
    let array = write(&dir, "medthink.json", &records.to_string());
    let lines = records
        .as_array()
        .expect("array")
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let jsonl = write(&dir, "medthink.jsonl", &lines);
    for path in [&array, &jsonl] {
        assert_eq!(detect_format(path).expect("detects"), Format::Sharegpt);
        let ps = load_problems(path).expect("loads");
        assert_eq!(ps[0].question, q.question);
        assert_eq!(ps[0].options, q.options);
        assert_eq!(ps[0].gold, Gold::Option("C".into()));
        assert!(
            ps[0].metadata["response"]
                .as_str()
                .is_some_and(|r| r.starts_with("Answer: C\n"))
        );
        assert_eq!(ps[1].gold, Gold::Text("Metformin".into()));
        assert!(ps[1].options.is_empty());
        assert_eq!(ps[1].metadata["system"], json!("You are a doctor."));
        assert_eq!(ps[2].gold, Gold::Option("C".into()));
    }
    // An answer naming no option is an error, not a guess.
    let bad = json!([{"conversations": [
        {"from": "human", "value": q.prompt_text()},
        {"from": "gpt", "value": "Answer: C or D"},
    ]}]);
    let path = write(&dir, "bad.json", &bad.to_string());
    assert_eq!(
        err_of(load_problems(&path)),
        format!(
            "{}: record 0: the stated answer \"C or D\" does not name exactly one of the options (A, B, C, D, E)",
            path.display()
        )
    );
    let none = json!([{"id": 7, "conversations": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Because."}]}]);
    let path = write(&dir, "none.json", &none.to_string());
    assert!(
        err_of(load_problems(&path))
            .contains(": record 0 (id 7): the assistant turn states no answer")
    );
}

#[test]
fn alpaca_instruction_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let release = load_problems(data("MedMCQA.json")).expect("loads");
    let q = &release[0];
    let records = json!([
        {"instruction": "Answer the multiple-choice question.", "input": q.prompt_text(), "output": "Answer: A. Impulse through myelinated fibers is slower than non-myelinated fibers"},
        {"instruction": "Which vitamin deficiency causes scurvy?", "input": "", "output": "Scurvy is due to lack of ascorbic acid. The answer is vitamin C."},
        {"instruction": "Name the nerve injured in wrist drop.", "output": "**Answer:** Radial nerve"},
    ]);
    let path = write(&dir, "alpaca.json", &records.to_string());
    assert_eq!(detect_format(&path).expect("detects"), Format::Alpaca);
    let ps = load_problems(&path).expect("loads");
    assert_eq!(
        ps[0].question,
        format!("Answer the multiple-choice question.\n{}", q.question)
    );
    assert_eq!(
        (&ps[0].options, &ps[0].gold),
        (&q.options, &Gold::Option("A".into()))
    );
    assert_eq!(ps[0].id, "0");
    assert_eq!(ps[1].gold, Gold::Text("vitamin C".into()));
    assert_eq!(ps[1].question, "Which vitamin deficiency causes scurvy?");
    assert_eq!(ps[2].gold, Gold::Text("Radial nerve".into()));
    assert_eq!(ps[2].id, "2");

    let bad = json!({"instruction": "Explain the Krebs cycle.", "input": "", "output": "It is a series of reactions."});
    let path = write(&dir, "bad.jsonl", &format!("{}\n{bad}\n", records[1]));
    assert_eq!(
        err_of(load_problems(&path)),
        format!(
            "{}:2: output states no answer (expected a first line `Answer: ...` or `The answer is ...`)",
            path.display()
        )
    );
}

#[test]
fn medzero_jsonl_round_trips_the_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (file, _) in FILES {
        let ps = load_problems(data(file)).expect("loads");
        let text: String = ps
            .iter()
            .map(|p| serde_json::to_string(p).expect("serialises") + "\n")
            .collect();
        let path = write(&dir, "problems.jsonl", &text);
        assert_eq!(detect_format(&path).expect("detects"), Format::MedzeroJsonl);
        assert_eq!(load_problems(&path).expect("loads"), ps, "{file}");
    }
    let mut bad =
        serde_json::to_value(&load_problems(data("bioasq.json")).expect("loads")[0]).expect("json");
    bad["gold"] = json!({"option": "C"});
    let path = write(&dir, "bad.jsonl", &format!("\n{bad}\n"));
    assert_eq!(
        err_of(load_problems(&path)),
        format!(
            "{}:2: id bioasq_0: gold \"C\" is not one of the option letters (A, B)",
            path.display()
        )
    );
    bad.as_object_mut().map(|o| o.remove("gold"));
    let path = write(&dir, "bad.jsonl", &bad.to_string());
    assert!(
        err_of(load_problems_as(&path, Format::MedzeroJsonl))
            .ends_with(":1: id bioasq_0: missing field `gold`")
    );
}

#[test]
fn format_names_are_stable() {
    let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
    assert_eq!(
        names,
        [
            "meds3",
            "medqa-jsonl",
            "medmcqa",
            "pubmedqa",
            "sharegpt",
            "alpaca",
            "medzero-jsonl"
        ]
    );
    for f in Format::ALL {
        assert_eq!(f.name().parse::<Format>(), Ok(f));
    }
    assert!(
        "csv"
            .parse::<Format>()
            .is_err_and(|e| e.contains("known formats: meds3"))
    );
}
