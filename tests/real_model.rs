//! Parity on the real model `make setup` builds (SmolLM2-135M-Instruct):
//! against transformers on the same folder, its own chat template's token
//! ids (as `apply_chat_template` gives them, for several conversations and
//! template sources), 32 greedy tokens and their log-probs, and the option
//! log-likelihoods of `eval --mode mcq-loglik` on real benchmark questions.

mod support;
use medzero::eval::loglik::{Choices, context_and_continuations, option_logliks};
use medzero_envs::loaders;
use medzero_policies::chat_template::Message;
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value as Json, json};
use std::path::Path;
use std::process::Command;

fn peer(dir: &Path, request: &Json) -> Json {
    let tmp = tempfile::tempdir().unwrap();
    let req = tmp.path().join("request.json");
    std::fs::write(&req, request.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/real_model.py");
    let out = Command::new(support::python())
        .arg(script)
        .arg(dir)
        .arg(&req)
        .output()
        .expect("running the transformers peer (run `make setup`)");
    assert!(
        out.status.success(),
        "real_model.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("real_model.py prints JSON")
}

/// Template sources beside the model's own: ChatML with a default system
/// turn and a `raise_exception` on bad roles (Qwen2's shape), and one that
/// trims content and uses the BOS token and loop controls (Llama 3's shape).
const QWEN_LIKE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const LLAMA_LIKE: &str = "{{ bos_token }}{% for message in messages %}\n    {%- if message.role == 'ignored' %}{% continue %}{% endif %}\n    {{- '<|' + message.role + '|>\\n' + message.content | trim + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{% endif %}";

#[test]
fn smollm2_matches_transformers_on_templates_greedy_tokens_and_option_logliks() {
    let dir = medzero_policies::peer::smollm2();
    assert!(
        dir.join("config.json").exists(),
        "{}: the real model is missing; run `make setup`",
        dir.display()
    );
    let policy = Policy::load(&dir, tch::Device::Cpu, None).unwrap();
    let own = policy
        .tokenizer
        .chat_template()
        .expect("SmolLM2 ships a chat template")
        .clone();
    let template = PromptTemplate::Model(own.clone());

    // Conversations: user only, system + user, multi-turn, and without the
    // generation prompt; under the model's own template and two others.
    let conversations: Vec<(Vec<Message>, bool)> = vec![
        (
            vec![Message::new(
                "user",
                "Which test confirms it?\nA. MRI\nB. ECG",
            )],
            true,
        ),
        (
            vec![
                Message::new("system", "Answer briefly."),
                Message::new("user", "Is aspirin an NSAID?"),
            ],
            true,
        ),
        (
            vec![
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello! How can I help?"),
                Message::new("user", "  What lowers potassium?  "),
            ],
            true,
        ),
        (
            vec![
                Message::new("user", "Done."),
                Message::new("assistant", "Yes."),
            ],
            false,
        ),
    ];
    let mut chats = Vec::new();
    for source in [None, Some(QWEN_LIKE), Some(LLAMA_LIKE)] {
        for (messages, add_gen) in &conversations {
            chats.push(
                json!({"messages": messages, "add_generation_prompt": add_gen, "template": source}),
            );
        }
    }

    // Greedy: 32 tokens from the model's own rendering of a question.
    let question = "A 60-year-old man has a serum potassium of 6.8 mmol/L. What is the first step?";
    let prompt = policy.tokenizer.encode(&template.render(question)).unwrap();

    // Option log-likelihoods on real questions (each file's first).
    let mut items = Vec::new();
    for file in ["MedQA.json", "MedMCQA.json", "pubmedqa.json", "bioasq.json"] {
        let problems = loaders::load_problems(support::meds3_eval(file)).unwrap();
        for p in &problems[..1] {
            for choices in [Choices::Text, Choices::Letter] {
                items.push(context_and_continuations(p, &template, choices));
            }
        }
    }
    let request = json!({
        "chats": chats,
        "greedy": {"prompt": prompt, "new_tokens": 32},
        "loglik": items.iter().map(|(c, k)| json!({"context": c, "continuations": k})).collect::<Vec<_>>(),
    });
    let hf = peer(&dir, &request);

    for (k, chat) in chats.iter().enumerate() {
        let messages: Vec<Message> = serde_json::from_value::<Vec<Json>>(chat["messages"].clone())
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let add_gen = chat["add_generation_prompt"].as_bool().unwrap();
        let t = match chat["template"].as_str() {
            None => own.clone(),
            Some(src) => std::sync::Arc::new(
                medzero_policies::chat_template::ChatTemplate::new(
                    src,
                    "test",
                    own.specials().clone(),
                )
                .unwrap(),
            ),
        };
        let text = t.apply(&messages, add_gen).unwrap();
        assert_eq!(
            text,
            hf["chats"][k]["text"].as_str().unwrap(),
            "conversation {k}"
        );
        let ids = policy.tokenizer.encode(&text).unwrap();
        let want: Vec<i64> = serde_json::from_value(hf["chats"][k]["ids"].clone()).unwrap();
        assert_eq!(ids, want, "conversation {k}: token ids");
    }
    // The single-turn shapes every stage renders agree with the full render.
    let user = Message::new("user", "Which test confirms it?");
    assert_eq!(
        template.render(&user.content),
        own.apply(std::slice::from_ref(&user), true).unwrap()
    );
    assert_eq!(
        template.render_with_system("Answer briefly.", &user.content),
        own.apply(&[Message::new("system", "Answer briefly."), user], true)
            .unwrap()
    );

    let params = SamplingParams {
        max_new_tokens: 32,
        ignore_eos: true,
        ..SamplingParams::greedy(0)
    };
    let g = policy
        .generate(
            std::slice::from_ref(&prompt),
            &params,
            &mut ChaCha8Rng::seed_from_u64(0),
        )
        .unwrap()
        .remove(0);
    let want: Vec<i64> = serde_json::from_value(hf["greedy"]["tokens"].clone()).unwrap();
    assert_eq!(g.tokens, want, "greedy tokens");
    let want_lp: Vec<f64> = serde_json::from_value(hf["greedy"]["logprobs"].clone()).unwrap();
    for (i, (a, b)) in g.logprobs.iter().zip(&want_lp).enumerate() {
        assert!(
            (*a as f64 - b).abs() < 1e-4,
            "token {i}: log-prob {a} vs transformers {b}"
        );
    }

    for (k, (context, continuations)) in items.iter().enumerate() {
        let ours = option_logliks(&policy, context, continuations).unwrap();
        let want: Vec<f64> = serde_json::from_value(hf["loglik"][k].clone()).unwrap();
        for (j, ((a, _), b)) in ours.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() < 1e-3 * b.abs().max(1.0),
                "item {k} option {j}: {a} vs transformers {b}"
            );
        }
        // The same ranking as transformers', so acc agrees item by item.
        let argmax = |v: &[f64]| (0..v.len()).max_by(|&x, &y| v[x].total_cmp(&v[y])).unwrap();
        let ours_sums: Vec<f64> = ours.iter().map(|s| s.0).collect();
        assert_eq!(argmax(&ours_sums), argmax(&want), "item {k}: chosen option");
    }
}

/// `medzero eval` on the real model: `--mode mcq-loglik` and generation with
/// `--shots` write a predictions line per scored question that shows what
/// the model was asked and answered; bad combinations are refused.
#[test]
fn eval_cli_writes_predictions_in_both_modes() {
    let dir = medzero_policies::peer::smollm2();
    let model = dir.to_str().unwrap();
    let data = support::meds3_eval("bioasq.json");
    let data = data.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let lines = |p: &Path| -> Vec<Json> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };

    let out_ll = tmp.path().join("ll.jsonl");
    let o = support::medzero(&[
        "eval",
        model,
        "--data",
        data,
        "--mode",
        "mcq-loglik",
        "--limit",
        "3",
        "--json",
        "--predictions",
        out_ll.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", support::stderr(&o));
    let report: Json = serde_json::from_str(&support::stdout(&o)).unwrap();
    let preds = lines(&out_ll);
    assert_eq!(preds.len(), 3);
    let acc = preds.iter().filter(|p| p["correct"] == true).count() as f64 / 3.0;
    assert!(
        (report["report"]["acc"].as_f64().unwrap() - acc).abs() < 1e-9,
        "{report}"
    );
    for p in &preds {
        assert_eq!(p["logliks"].as_array().unwrap().len(), 2, "{p}");
        // The model's own template, with its default system message.
        assert!(
            p["prompt"]
                .as_str()
                .unwrap()
                .starts_with("<|im_start|>system\n"),
            "{p}"
        );
        assert!(
            p["prompt"]
                .as_str()
                .unwrap()
                .ends_with("Answer:<|im_end|>\n<|im_start|>assistant\n")
        );
    }

    // Two shots from the file itself: its first two questions are not scored.
    let out_gen = tmp.path().join("gen.jsonl");
    let o = support::medzero(&[
        "eval",
        model,
        "--data",
        data,
        "--shots",
        "2",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--predictions",
        out_gen.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", support::stderr(&o));
    let preds = lines(&out_gen);
    let problems = loaders::load_problems(support::meds3_eval("bioasq.json")).unwrap();
    let ids: Vec<&str> = preds.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [problems[2].id.as_str(), problems[3].id.as_str()]);
    for p in &preds {
        let prompt = p["prompt"].as_str().unwrap();
        assert_eq!(
            prompt
                .matches("<|im_start|>assistant\nThe answer is ")
                .count(),
            2,
            "{prompt}"
        );
        assert!(
            p.get("response").is_some() && p.get("correct").is_some(),
            "{p}"
        );
    }

    let o = support::medzero(&[
        "eval",
        model,
        "--data",
        data,
        "--mode",
        "mcq-loglik",
        "--shots",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(
        support::stderr(&o).contains("scores options only"),
        "{}",
        support::stderr(&o)
    );
}
