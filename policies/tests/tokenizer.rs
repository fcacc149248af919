//! The tokenizer: SynthClinic's word-level vocabulary round-trips every text
//! the environment produces, saves deterministically, and behaves exactly as
//! Python's `tokenizers` and `transformers` do on the same tokenizer.json; a
//! real byte-level BPE tokenizer trained in Python loads with its EOS and PAD
//! resolved and encodes identically; bad files give clear errors.
//!
//! The parity tests run `tests/support/tok_parity.py` with the project's venv
//! Python (`make setup`).

use medzero_envs::synthclinic::{OracleConfig, SynthClinic, SynthConfig};
use medzero_envs::{Problem, render_chain};
use medzero_policies::tokenizer::{PromptTemplate, Tokenizer, TokenizerError};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const TEMPLATES: [PromptTemplate; 2] = [PromptTemplate::Plain, PromptTemplate::ChatMl];

mod common;
const PARITY_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/support/tok_parity.py"
);

/// The texts of a default SynthClinic world, generated once per test binary.
struct Texts {
    problems: Vec<Problem>,
    prompts: Vec<String>,
    chains: Vec<String>,
    explanations: Vec<String>,
    textbook: Vec<String>,
}

impl Texts {
    /// Every text the environment produces, plus each prompt in both templates.
    fn all(&self) -> Vec<String> {
        let rendered = TEMPLATES
            .iter()
            .flat_map(|t| self.prompts.iter().map(|p| t.render(p)));
        self.prompts
            .iter()
            .chain(&self.chains)
            .chain(&self.explanations)
            .chain(&self.textbook)
            .cloned()
            .chain(rendered)
            .collect()
    }
}

fn texts() -> &'static Texts {
    static TEXTS: OnceLock<Texts> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let world = SynthClinic::generate(&SynthConfig::default()).expect("default world");
        let oracle = world.oracle(OracleConfig::default());
        let problems: Vec<Problem> = world.train.iter().chain(&world.test).cloned().collect();
        Texts {
            prompts: problems.iter().map(Problem::prompt_text).collect(),
            chains: problems
                .iter()
                .map(|p| render_chain(&oracle.truth().gold_chain(p).expect("synthclinic problem")))
                .collect(),
            explanations: problems
                .iter()
                .map(|p| oracle.explain(p).expect("synthclinic problem").render(p))
                .collect(),
            textbook: world.textbook.clone(),
            problems,
        }
    })
}

/// The word-level tokenizer over every SynthClinic text.
fn synth_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let all = texts().all();
        Tokenizer::word_level(all.iter().map(String::as_str), 1)
    })
}

fn saved_bytes(tok: &Tokenizer, dir: &Path, name: &str) -> Vec<u8> {
    let path = dir.join(name);
    tok.save(&path).expect("save");
    std::fs::read(&path).expect("read back")
}

/// Runs tok_parity.py with `args`, returning its JSON output.
fn parity_script(args: &[&Path]) -> Json {
    let python = common::python();
    let out = Command::new(&python)
        .arg(PARITY_SCRIPT)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (run `make setup`)", python.display()));
    assert!(
        out.status.success(),
        "tok_parity.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("tok_parity.py prints JSON")
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> PathBuf {
    std::fs::write(path, serde_json::to_vec(value).expect("serialise")).expect("write json");
    path.to_path_buf()
}

/// Encodes `texts` in Python (tokenizers and transformers) and asserts the ids
/// and decoded texts equal Rust's.
fn assert_python_parity(tok: &Tokenizer, tokenizer_json: &Path, texts: &[String]) {
    let dir = tokenizer_json
        .parent()
        .expect("tokenizer.json has a folder");
    let texts_json = write_json(&dir.join("parity_texts.json"), &texts);
    let py = parity_script(&[tokenizer_json, &texts_json]);
    for (lib, ids_key, decoded_key) in [
        ("tokenizers", "ids", "decoded"),
        ("transformers", "hf_ids", "hf_decoded"),
    ] {
        let py_ids: Vec<Vec<i64>> =
            serde_json::from_value(py[ids_key].clone()).expect("ids per text");
        let py_decoded: Vec<String> =
            serde_json::from_value(py[decoded_key].clone()).expect("decoded per text");
        assert_eq!(py_ids.len(), texts.len(), "{lib}: one id list per text");
        for ((text, ids), decoded) in texts.iter().zip(&py_ids).zip(&py_decoded) {
            let ours = tok.encode(text).expect("encode");
            assert_eq!(&ours, ids, "{lib} encodes {text:?} differently");
            let ours = tok.decode(&ours).expect("decode");
            assert_eq!(&ours, decoded, "{lib} decodes {text:?} differently");
        }
    }
}

/// Texts off SynthClinic's beaten path: odd whitespace, unknown words,
/// special tokens inside text, non-ASCII.
fn edge_texts() -> Vec<String> {
    [
        "",
        " ",
        "  double  spaces  ",
        "trailing space ",
        "\n\n\nthree newlines then\n\n\n\nfour",
        "tab\there, CRLF\r\nand form\x0Cfeed",
        "zyzzyva is not a SynthClinic word",
        "<|im_start|>user\nWhich test?<|im_end|>\n<|im_start|>assistant\n",
        "text<|im_end|>glued<|endoftext|>",
        "a literal <unk> and <pad>",
        "café µg/L — 10³ naïve 🙂 it's they'll",
        "non-breaking\u{a0}space and ideographic\u{3000}space",
        "Serum sodium 128 mmol/L, (B) 2.6 A. Step 1:",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn every_synthclinic_text_round_trips_with_one_token_per_word_digit_and_mark() {
    let t = texts();
    let tok = synth_tokenizer();
    let unk = tok.token_id("<unk>").expect("<unk> in the vocabulary");
    let all = t.all();
    for text in &all {
        let ids = tok.encode(text).expect("encode");
        assert!(!ids.contains(&unk), "{text:?} has an unknown word: {ids:?}");
        // Decoding skips special tokens, so ChatML prompts come back without them.
        let expected = ["<|im_start|>", "<|im_end|>"]
            .iter()
            .fold(text.clone(), |t, special| t.replace(special, ""));
        assert_eq!(tok.decode(&ids).expect("decode"), expected);
    }
    // A prompt has single spaces and line breaks only: each run of letters
    // (with the space before it), each digit and each punctuation mark is
    // one token, as is each line break.
    let mut prompt_tokens = 0;
    for p in &t.prompts {
        let n = tok.encode(p).expect("encode").len();
        let words = p
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .count();
        let others = p
            .chars()
            .filter(|c| !c.is_ascii_alphabetic() && *c != ' ' && *c != '\n')
            .count();
        assert_eq!(n, words + others + p.matches('\n').count(), "{p:?}");
        prompt_tokens += n;
    }
    let chain_tokens: usize = t
        .chains
        .iter()
        .map(|c| tok.encode(c).expect("encode").len())
        .sum();
    let mean_prompt = prompt_tokens as f64 / t.prompts.len() as f64;
    println!(
        "synthclinic word-level: vocab {}, {} texts, mean tokens per prompt {mean_prompt:.1}, \
         per gold chain {:.1}",
        tok.vocab_size(),
        all.len(),
        chain_tokens as f64 / t.chains.len() as f64
    );
    assert!(tok.vocab_size() < 4000, "vocab {}", tok.vocab_size());
    assert!(
        mean_prompt > 10.0,
        "prompts cannot be this short: {mean_prompt}"
    );
}

#[test]
fn a_vocabulary_from_training_texts_covers_most_test_prompts() {
    // What a run sees when it builds the vocabulary from training data only.
    let t = texts();
    let n_train = SynthConfig::default().train;
    let train = t.prompts[..n_train]
        .iter()
        .chain(&t.chains[..n_train])
        .chain(&t.explanations[..n_train])
        .chain(&t.textbook);
    let tok = Tokenizer::word_level(train.map(String::as_str), 1);
    let unk = tok.token_id("<unk>").expect("<unk>");
    let (mut unknown, mut total) = (0usize, 0usize);
    for p in &t.prompts[n_train..] {
        let ids = tok.encode(p).expect("encode");
        unknown += ids.iter().filter(|&&id| id == unk).count();
        total += ids.len();
    }
    let rate = unknown as f64 / total as f64;
    println!(
        "train-only vocab {}: {unknown} of {total} test-prompt tokens unknown ({:.2}%)",
        tok.vocab_size(),
        100.0 * rate
    );
    assert!(rate < 0.05, "{:.2}% of test tokens unknown", 100.0 * rate);
}

#[test]
fn prompt_tokens_are_a_prefix_of_prompt_and_completion_tokens() {
    // Generation encodes the prompt alone; training encodes prompt + completion.
    let t = texts();
    let tok = synth_tokenizer();
    for template in TEMPLATES {
        let end_text = template.end_of_turn().expect("a built-in template");
        let end = tok.token_id(end_text).expect("end of turn");
        for (p, chain) in t.prompts.iter().zip(&t.chains).take(100) {
            let prompt = tok.encode(&template.render(p)).expect("encode");
            let full = format!("{}{chain}{end_text}", template.render(p));
            let full = tok.encode(&full).expect("encode");
            assert_eq!(&full[..prompt.len()], &prompt[..], "{template:?} {p:?}");
            assert_eq!(
                full.last(),
                Some(&end),
                "{template:?} ends with its end of turn"
            );
            let completion = tok.decode(&full[prompt.len()..]).expect("decode");
            assert_eq!(&completion, chain, "end of turn is skipped in decoding");
        }
    }
}

#[test]
fn the_same_texts_give_a_byte_identical_tokenizer_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let all = texts().all();
    let build = |texts: &[String]| Tokenizer::word_level(texts.iter().map(String::as_str), 1);
    let a = saved_bytes(&build(&all), dir.path(), "a.json");
    let b = saved_bytes(&build(&all), dir.path(), "b.json");
    assert!(a == b, "two builds from the same texts differ");
    let reversed: Vec<String> = all.iter().rev().cloned().collect();
    let c = saved_bytes(&build(&reversed), dir.path(), "c.json");
    assert!(a == c, "text order changed the tokenizer");
    let fewer = saved_bytes(&build(&all[1..]), dir.path(), "d.json");
    assert!(a != fewer, "different texts gave the same tokenizer");
    // Loading and saving again changes nothing.
    let loaded = Tokenizer::from_file(&dir.path().join("a.json")).expect("load");
    assert!(a == saved_bytes(&loaded, dir.path(), "e.json"));
}

#[test]
fn vocabulary_is_ordered_by_count_then_bytes_after_the_specials() {
    let tok = Tokenizer::word_level(["x y y.", "z y\n"], 1);
    let order = [
        "<pad>",
        "<unk>",
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        " y", // 3
        "\n", // 1 (base tokens are counted like any word)
        ".",  // 1
        "x",  // 1
        "z",  // 1
        "\t", // 0: the rest are always-present base tokens, bytewise
        "\n\n",
        "\x0B",
        "\x0C",
        "\r",
        " ",
        " !",
    ];
    for (id, token) in order.iter().enumerate() {
        assert_eq!(tok.token_id(token), Some(id as i64), "{token:?}");
    }
    // Every digit and ASCII mark, bare and after a space, and the role names.
    for piece in ["0", " 9", "/", " (", "~", "assistant", "system", "user"] {
        assert!(tok.token_id(piece).is_some(), "{piece:?}");
    }
    // Specials, counted pieces, whitespace, role names, marks and digits
    // bare and spaced ("." is among the counted ones).
    assert_eq!(tok.vocab_size(), 5 + 5 + 6 + 3 + 2 * 42 - 1);
}

#[test]
fn rare_and_unknown_words_map_to_unk_which_is_special() {
    let tok = Tokenizer::word_level(["a b b c c c"], 2);
    let unk = tok.token_id("<unk>").expect("<unk>");
    assert_eq!(unk, 1);
    assert_eq!(tok.token_id("a"), None, "seen once, below min_count");
    let b = tok.token_id(" b").expect("seen twice");
    assert_eq!(
        tok.encode("a b zyzzyva 42.").expect("encode"),
        vec![
            unk,
            b,
            unk,
            tok.token_id(" 4").unwrap(),
            tok.token_id("2").unwrap(),
            tok.token_id(".").unwrap()
        ]
    );
    // A special token: decoding drops it, and sampling never draws it.
    assert_eq!(tok.decode(&[unk, b, unk]).expect("decode"), " b");
    let canonical = tok.canonical().expect("word-level sampling is constrained");
    assert!(!canonical.allows(b, unk));
    // Whitespace always round-trips, whatever the texts were.
    let ws = " \t\n\r\n\n\x0B\x0C   \n\n\n\n\n";
    assert_eq!(
        tok.decode(&tok.encode(ws).expect("encode"))
            .expect("decode"),
        ws
    );
}

/// Canonical sampling: every text of the world is a sequence the constraint
/// allows (so it never masks what training taught), and every sequence it
/// allows, drawn at random from the whole vocabulary, decodes to a text that
/// encodes back to the same ids. Without the constraint the random walk
/// breaks this within a few steps.
#[test]
fn canonically_sampled_ids_encode_back_to_themselves() {
    use rand::{RngExt, SeedableRng};
    let tok = synth_tokenizer();
    let canonical = tok.canonical().expect("word-level");
    // Specials (ids 0 to 4) frame turns in a prompt; a completion holds none
    // but the one that ends it.
    for text in texts().all() {
        let ids = tok.encode(&text).expect("encode");
        for pair in ids.windows(2).filter(|p| p[1] > 4) {
            assert!(
                canonical.allows(pair[0], pair[1]),
                "{text:?}: the constraint forbids {:?} after {:?}",
                tok.decode(&pair[1..]).unwrap(),
                tok.decode(&pair[..1]).unwrap()
            );
        }
    }
    let v = tok.vocab_size() as i64;
    let im_end = tok.token_id("<|im_end|>").unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut broken_free, mut broken_constrained) = (0, 0);
    for _ in 0..300 {
        let (mut free, mut constrained) = (vec![tok.eos_id()], vec![tok.eos_id()]);
        for _ in 0..40 {
            free.push(rng.random_range(5..v));
            let prev = *constrained.last().unwrap();
            // A turn ends at EOS or <|im_end|>: nothing is sampled after them.
            let allowed: Vec<i64> = (0..v)
                .filter(|&n| canonical.allows(prev, n) && ![tok.eos_id(), im_end].contains(&n))
                .collect();
            constrained.push(allowed[rng.random_range(0..allowed.len())]);
        }
        for (ids, broken) in [
            (&free, &mut broken_free),
            (&constrained, &mut broken_constrained),
        ] {
            let text = tok.decode(ids).expect("decode");
            let again = tok.encode(&text).expect("encode");
            *broken += (again != ids[1..]) as usize;
        }
    }
    assert_eq!(broken_constrained, 0);
    assert!(
        broken_free > 250,
        "the unconstrained walk should break: {broken_free}"
    );
}

#[test]
fn special_tokens_have_their_ids_and_are_skipped_in_decoding() {
    let tok = synth_tokenizer();
    assert_eq!(tok.pad_id(), 0);
    assert_eq!(tok.token_id("<pad>"), Some(0));
    assert_eq!(tok.eos_id(), 2);
    assert_eq!(tok.token_id("<|endoftext|>"), Some(2));
    assert_eq!(tok.encode("<|im_end|>").expect("encode"), vec![4]);
    assert_eq!(tok.encode("<|im_start|>").expect("encode"), vec![3]);
    let text = "Step 2: Which of the following is the most likely diagnosis?";
    let ids = tok.encode(text).expect("encode");
    let with_specials: Vec<i64> = [tok.pad_id(), 3]
        .into_iter()
        .chain(ids.iter().copied())
        .chain([4, tok.eos_id()])
        .collect();
    assert_eq!(tok.decode(&with_specials).expect("decode"), text);
    for bad in [-1, tok.vocab_size() as i64, i64::MAX] {
        let err = tok.decode(&[bad]).expect_err("out-of-vocabulary id");
        assert!(
            matches!(err, TokenizerError::BadId { id, .. } if id == bad),
            "{err}"
        );
        assert!(err.to_string().contains("mask logits"), "{err}");
    }
    // Saved and loaded without a tokenizer_config.json, the ids resolve the same.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).expect("save");
    let loaded = Tokenizer::from_file(&path).expect("load");
    assert_eq!((loaded.eos_id(), loaded.pad_id()), (2, 0));
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    // A config beside it wins over the built-in candidates.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "<|im_end|>"}, "pad_token": null}"#,
    )
    .expect("write config");
    let loaded = Tokenizer::from_file(&path).expect("load with config");
    assert_eq!((loaded.eos_id(), loaded.pad_id()), (4, 0));
}

#[test]
fn prompt_templates_render_as_documented_and_as_qwen2_does() {
    let q = "Which test?\nA. MRI";
    assert_eq!(PromptTemplate::Plain.render(q), "Which test?\nA. MRI\n\n");
    assert_eq!(
        PromptTemplate::ChatMl.render(q),
        "<|im_start|>user\nWhich test?\nA. MRI<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        PromptTemplate::Plain.render_with_system("Be brief.", q),
        "Be brief.\n\nWhich test?\nA. MRI\n\n"
    );
    assert_eq!(PromptTemplate::Plain.end_of_turn(), Some("<|endoftext|>"));
    assert_eq!(PromptTemplate::ChatMl.end_of_turn(), Some("<|im_end|>"));

    // transformers' apply_chat_template with Qwen2's template: it adds a
    // default system turn when there is none.
    let dir = tempfile::tempdir().expect("tempdir");
    let tokenizer_json = dir.path().join("tokenizer.json");
    synth_tokenizer().save(&tokenizer_json).expect("save");
    let system = "You are a helpful assistant.";
    let users = [q, texts().prompts[0].as_str()];
    let conversations: Vec<Json> = users
        .iter()
        .flat_map(|u| {
            [
                serde_json::json!([{"role": "user", "content": u}]),
                serde_json::json!([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": u}]),
            ]
        })
        .collect();
    let conversations_json = write_json(&dir.path().join("chats.json"), &conversations);
    let rendered: Vec<String> = serde_json::from_value(parity_script(&[
        Path::new("--chat"),
        &tokenizer_json,
        &conversations_json,
    ]))
    .expect("rendered prompts");
    let ours: Vec<String> = users
        .iter()
        .flat_map(|u| {
            [
                PromptTemplate::ChatMl.render_with_system(system, u),
                PromptTemplate::ChatMl.render_with_system("Be brief.", u),
            ]
        })
        .collect();
    assert_eq!(ours, rendered);
    let default_system = format!("<|im_start|>system\n{system}<|im_end|>\n");
    assert_eq!(
        format!("{default_system}{}", PromptTemplate::ChatMl.render(q)),
        rendered[0]
    );
}

#[test]
fn word_level_tokenizer_matches_python_tokenizers_and_transformers() {
    let t = texts();
    let tok = synth_tokenizer();
    let dir = tempfile::tempdir().expect("tempdir");
    let tokenizer_json = dir.path().join("tokenizer.json");
    tok.save(&tokenizer_json).expect("save");
    let mut sample: Vec<String> = Vec::new();
    for i in (0..t.problems.len()).step_by(100) {
        sample.push(t.prompts[i].clone());
        sample.push(t.chains[i].clone());
        sample.push(t.explanations[i].clone());
        sample.push(PromptTemplate::ChatMl.render(&t.prompts[i]));
    }
    sample.extend(t.textbook.iter().step_by(60).cloned());
    sample.extend(edge_texts());
    assert!(sample.len() >= 45, "{} texts", sample.len());
    assert_python_parity(tok, &tokenizer_json, &sample);
}

#[test]
fn bpe_tokenizer_trained_in_python_loads_and_matches_python() {
    let t = texts();
    let dir = tempfile::tempdir().expect("tempdir");
    let training: Vec<&String> = t.prompts[..200]
        .iter()
        .chain(&t.chains[..200])
        .chain(&t.textbook)
        .collect();
    let training_json = write_json(&dir.path().join("training.json"), &training);
    let model_dir = dir.path().join("model");
    let trained = parity_script(&[Path::new("--train-bpe"), &training_json, &model_dir]);
    let tokenizer_json = model_dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&tokenizer_json).expect("load BPE tokenizer");

    // tokenizer_config.json: eos as a string, pad as {"content": ...}.
    assert_eq!(Some(tok.eos_id()), tok.token_id("<|im_end|>"));
    assert_eq!(Some(tok.pad_id()), tok.token_id("<|endoftext|>"));
    assert_eq!(
        tok.vocab_size() as u64,
        trained["vocab_size"].as_u64().expect("size")
    );
    assert_eq!(
        tok.eos_id(),
        tok.vocab_size() as i64 - 1,
        "specials follow the vocab"
    );
    assert_eq!(
        tok.encode("<|im_end|>").expect("encode"),
        vec![tok.eos_id()]
    );

    let mut sample: Vec<String> = Vec::new();
    for i in (0..t.problems.len()).step_by(50) {
        sample.push(t.prompts[i].clone());
        sample.push(t.chains[i].clone());
        sample.push(t.explanations[i].clone());
    }
    sample.extend(TEMPLATES.map(|tpl| tpl.render(&t.prompts[799])));
    sample.extend(edge_texts());
    for text in &sample {
        // Byte-level BPE is lossless on any text without special tokens.
        if !text.contains("<|") {
            let ids = tok.encode(text).expect("encode");
            assert_eq!(&tok.decode(&ids).expect("decode"), text);
        }
    }
    assert_python_parity(&tok, &tokenizer_json, &sample);

    // Without the config, EOS falls back to the first candidate present and
    // PAD to EOS (there is no <pad>).
    std::fs::remove_file(model_dir.join("tokenizer_config.json")).expect("remove config");
    let tok = Tokenizer::from_file(&tokenizer_json).expect("load without config");
    assert_eq!(Some(tok.eos_id()), tok.token_id("<|endoftext|>"));
    assert_eq!(tok.pad_id(), tok.eos_id());
}

/// A valid tokenizer.json (WordLevel, whitespace split) with the given added tokens.
fn minimal_tokenizer_json(added: &[&str]) -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    vocab.insert("a".into(), 1.into());
    let added: Vec<Json> = added
        .iter()
        .enumerate()
        .map(|(i, content)| {
            vocab.insert(content.to_string(), (i + 2).into());
            serde_json::json!({"id": i + 2, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

fn assert_mentions(err: &TokenizerError, parts: &[&str]) {
    let msg = err.to_string();
    for part in parts {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
}

#[test]
fn bad_files_give_errors_that_name_the_file_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.json");
    let shown = path.display().to_string();

    let err = Tokenizer::from_file(&path).expect_err("missing file");
    assert!(matches!(err, TokenizerError::Read { .. }), "{err:?}");
    assert_mentions(&err, &[&shown, "check the path"]);

    std::fs::write(&path, "version: 1\n").expect("write");
    let err = Tokenizer::from_file(&path).expect_err("not JSON");
    assert!(matches!(err, TokenizerError::NotJson { .. }), "{err:?}");
    assert_mentions(&err, &[&shown, "not JSON", "tokenizer.json"]);

    std::fs::write(&path, r#"{"model": {"type": "Nope"}}"#).expect("write");
    let err = Tokenizer::from_file(&path).expect_err("not a tokenizer");
    assert!(matches!(err, TokenizerError::Invalid { .. }), "{err:?}");
    assert_mentions(&err, &[&shown, "not a tokenizer", "re-save"]);

    std::fs::write(&path, minimal_tokenizer_json(&["<s>"])).expect("write");
    let err = Tokenizer::from_file(&path).expect_err("no EOS candidate");
    assert!(matches!(err, TokenizerError::NoEos { .. }), "{err:?}");
    assert_mentions(
        &err,
        &[
            &shown,
            "<|endoftext|>",
            "eos_token",
            "tokenizer_config.json",
        ],
    );

    // The same file loads once a config names its EOS, or it has a candidate.
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, r#"{"eos_token": "<s>"}"#).expect("write");
    let tok = Tokenizer::from_file(&path).expect("EOS from config");
    assert_eq!((tok.eos_id(), tok.pad_id()), (2, 2));
    std::fs::remove_file(&config).expect("remove");
    std::fs::write(&path, minimal_tokenizer_json(&["<s>", "</s>"])).expect("write");
    assert_eq!(Tokenizer::from_file(&path).expect("</s>").eos_id(), 3);

    let config_shown = config.display().to_string();
    for (body, hint) in [
        ("{not json", "not valid JSON"),
        (r#"{"eos_token": 7}"#, "not a token"),
        (
            r#"{"eos_token": {"id": 7}}"#,
            "without a string \"content\"",
        ),
        (
            r#"{"eos_token": "<|im_end|>"}"#,
            "not in the tokenizer.json",
        ),
        (
            r#"{"eos_token": "</s>", "pad_token": "[PAD]"}"#,
            "pad_token",
        ),
    ] {
        std::fs::write(&config, body).expect("write");
        let err = Tokenizer::from_file(&path).expect_err(body);
        assert!(
            matches!(err, TokenizerError::Config { .. }),
            "{body}: {err:?}"
        );
        assert_mentions(&err, &[&config_shown, hint]);
    }

    // Saving where a file stands in for the folder.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").expect("write");
    let target = blocker.join("tokenizer.json");
    let err = synth_tokenizer()
        .save(&target)
        .expect_err("parent is a file");
    assert!(matches!(err, TokenizerError::Write { .. }), "{err:?}");
    assert_mentions(&err, &[&target.display().to_string(), "writable"]);
}

/// transformers generates from a folder whose EOS only `generation_config.json`
/// or `config.json` gives (`eos_token_id`, an id or a list), so medzero does
/// too: generation config first, then the model config; every listed id stops.
#[test]
fn eos_comes_from_the_generation_config_as_transformers_resolves_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.json");
    // Ids: <unk> 0, a 1, <s> 2, <x> 3, <y> 4; none is an EOS candidate.
    std::fs::write(&path, minimal_tokenizer_json(&["<s>", "<x>", "<y>"])).expect("write");
    assert!(Tokenizer::from_file(&path).is_err(), "nothing names an EOS");

    let model_config = dir.path().join("config.json");
    std::fs::write(&model_config, r#"{"eos_token_id": 3}"#).expect("write");
    let tok = Tokenizer::from_file(&path).expect("EOS from config.json");
    assert_eq!(tok.eos_id(), 3);
    assert_eq!(tok.stop_ids(), vec![3]);

    // generation_config.json wins, and every id of its list ends a sequence.
    let generation = dir.path().join("generation_config.json");
    std::fs::write(&generation, r#"{"eos_token_id": [4, 3]}"#).expect("write");
    let tok = Tokenizer::from_file(&path).expect("EOS from generation_config.json");
    assert_eq!(tok.eos_id(), 4);
    assert_eq!(tok.stop_ids(), vec![4, 3]);
    assert!(tok.is_stop(3) && tok.is_stop(4) && !tok.is_stop(2));

    // The tokenizer's own eos_token is what SFT appends; the list still stops.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<s>"}"#,
    )
    .expect("write");
    let tok = Tokenizer::from_file(&path).expect("EOS from tokenizer_config.json");
    assert_eq!(tok.eos_id(), 2);
    assert_eq!(tok.stop_ids(), vec![2, 4, 3]);

    // An id the vocabulary lacks, or not an id at all, names the file.
    for body in [r#"{"eos_token_id": 99}"#, r#"{"eos_token_id": "</s>"}"#] {
        std::fs::write(&generation, body).expect("write");
        let err = Tokenizer::from_file(&path).expect_err(body);
        assert!(matches!(err, TokenizerError::Config { .. }), "{err:?}");
        assert_mentions(&err, &[&generation.display().to_string(), "eos_token_id"]);
    }
}
