//! Rollouts are the model's own: every path that reuses a KV cache generates
//! from exactly the state a fresh prefill of the same text gives.
//!
//! - After a search, every node's cached row holds the ids of
//!   `prompt + render_prefix(node)` and gives the same next-token logits as a
//!   fresh prefill of them.
//! - `prefix_reuse` on and off build the same tree, greedy or sampled.
//! - Every sampled token's log-prob, on every sampling path (batched
//!   generation, forked samples, MedCritical's retries from a sound prefix),
//!   equals what a fresh forward pass over the whole sequence gives.
//!
//! The student is a tiny model that has half-learned the gold chains of a
//! small SynthClinic world, so it writes "Step k:" chains with some variety.

mod support;

use medzero::rollout::mcts::{self, MctsConfig, Tree};
use medzero::rollout::medcritical::{Correction, Corrector, SelfCorrection};
use medzero::rollout::meds3::{PolicySteps, StepGeneration};
use medzero::rollout::sampling::SamplingConfig;
use medzero::runtime::actor::Rollout;
use medzero::stages::meds3::chain_text;
use medzero::train::dpo::{EncodedPair, Pair};
use medzero_envs::synthclinic::SynthClinic;
use medzero_policies::tokenizer::PromptTemplate;
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::sync::OnceLock;
use tch::Tensor;

const WORLD: &str = support::TINY_WORLD;

/// The chains model, trained once per test binary.
fn chains_model() -> &'static PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        support::memorised_chains(&dir, "chains").join("stages/0-chains/model")
    })
}

fn world() -> SynthClinic {
    let cfg = medzero::experiment::config::Config::parse(WORLD, "test", &[]).unwrap();
    SynthClinic::generate(&cfg.data.synthclinic).unwrap()
}

fn policy() -> Policy {
    // Tiny ops: one thread (OpenMP workers spinning between them cost more).
    tch::set_num_threads(1);
    Policy::load(chains_model(), tch::Device::Cpu, None).unwrap()
}

/// Steps at `temperature` (0: greedy); rollouts always sampled, and hot, so
/// that values stay low and the search goes deep instead of finishing early.
fn generation(reuse: bool, temperature: f64) -> StepGeneration {
    StepGeneration {
        step_max_tokens: 24,
        rollout_max_tokens: 96,
        temperature,
        first_round_temperature: 1.5,
        rollout_top_p: 1.0,
        prefix_reuse: reuse,
        ..StepGeneration::default()
    }
}

/// A search deep enough to reuse caches several levels down: few children,
/// few rollouts, and no early stop on correct leaves.
fn mcts_cfg() -> MctsConfig {
    MctsConfig {
        max_children: 2,
        max_nodes: 16,
        rollout_budget: 4,
        min_rollouts: 2,
        stop_correct_leaves: 100,
        ..MctsConfig::default()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn every_cached_row_of_a_search_equals_a_fresh_prefill() {
    let (world, policy) = (world(), policy());
    let mut deepest = 0;
    let mut checked = 0;
    for (k, p) in world.train.iter().take(3).enumerate() {
        let generation = generation(true, 1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(k as u64);
        let mut steps = PolicySteps::new(&policy, &generation, PromptTemplate::Plain, p, &mut rng);
        let tree = mcts::search(p, &mcts_cfg(), &mut steps, 0).unwrap();
        let prompt = PromptTemplate::Plain.render(&p.prompt_text());
        for node in continued_nodes(&tree) {
            deepest = deepest.max(tree.nodes[node].depth);
            let cached = steps.cached_row(&tree, node).unwrap();
            let text = format!("{prompt}{}", tree.render_prefix(node));
            let ids = policy.tokenizer.encode(&text).unwrap();
            let fresh = policy
                .prefill(std::slice::from_ref(&ids), 0)
                .unwrap()
                .logits(0);
            assert_eq!(
                cached.position,
                ids.len() as i64,
                "problem {k}, node {node} (depth {}): the cached row continues at position {} \
                 but its text is {} tokens",
                tree.nodes[node].depth,
                cached.position,
                ids.len()
            );
            assert_eq!(
                cached.ids, ids,
                "problem {k}, node {node}: cached ids differ from its text's"
            );
            let diff = max_abs_diff(&cached.logits, &fresh);
            assert!(
                diff < 1e-4,
                "problem {k}, node {node} (depth {}): cached logits differ from a fresh prefill by {diff}",
                tree.nodes[node].depth
            );
            checked += 1;
        }
        // Policy SFT and the PRM train on `prompt` and the chain encoded
        // apart: those ids are the ones the search wrote the chain under.
        let record = mcts::Meds3Record::from_tree(p, &tree);
        for (leaf, pos) in tree
            .leaves()
            .filter(|&l| tree.nodes[l].correct)
            .zip(&record.pos)
        {
            let mut trained = policy.tokenizer.encode(&prompt).unwrap();
            trained.extend(policy.tokenizer.encode(&chain_text(&pos.chain)).unwrap());
            let searched = policy
                .tokenizer
                .encode(&format!("{prompt}{}", tree.render_path(leaf)))
                .unwrap();
            assert_eq!(trained, searched, "problem {k}, leaf {leaf}");
            let parent = tree.nodes[leaf].parent.unwrap();
            let cached = steps.cached_row(&tree, parent).unwrap();
            assert!(
                searched.starts_with(&cached.ids),
                "problem {k}, leaf {leaf}"
            );
        }
    }
    assert!(deepest >= 4, "the searches reached depth {deepest} only");
    assert!(checked >= 10, "only {checked} rows checked");
}

/// Nodes the search continued from: expanded or rolled out.
fn continued_nodes(tree: &Tree) -> Vec<usize> {
    (0..tree.nodes.len())
        .filter(|&id| !tree.nodes[id].children.is_empty() || !tree.nodes[id].finished)
        .collect()
}

fn search(world: &SynthClinic, policy: &Policy, reuse: bool, temperature: f64, seed: u64) -> Tree {
    let p = &world.train[seed as usize % world.train.len()];
    let generation = generation(reuse, temperature);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut steps = PolicySteps::new(policy, &generation, PromptTemplate::Plain, p, &mut rng);
    mcts::search(p, &mcts_cfg(), &mut steps, 0).unwrap()
}

fn texts(tree: &Tree) -> Vec<(Option<usize>, String, f64)> {
    tree.nodes
        .iter()
        .map(|n| (n.parent, n.text.clone(), n.value))
        .collect()
}

/// Prefix reuse is a speed switch: with greedy steps and with sampled ones,
/// the same seed builds the same tree with it on and off.
#[test]
fn prefix_reuse_on_and_off_build_the_same_tree() {
    let (world, policy) = (world(), policy());
    for temperature in [0.0, 1.0] {
        for seed in 0..3 {
            let on = search(&world, &policy, true, temperature, seed);
            let off = search(&world, &policy, false, temperature, seed);
            assert!(on.nodes.iter().map(|n| n.depth).max() >= Some(3));
            assert_eq!(
                texts(&on),
                texts(&off),
                "temperature {temperature}, seed {seed}: the trees differ"
            );
        }
    }
}

/// Each generated token's log-prob equals the one a fresh forward pass over
/// prompt + generated tokens gives it at the sampling `temperature`.
fn assert_teacher_forced(
    policy: &Policy,
    prompt: &[i64],
    g: &medzero_policies::Generation,
    temperature: f64,
) {
    if g.tokens.is_empty() {
        return;
    }
    let whole: Vec<i64> = prompt.iter().chain(&g.tokens).copied().collect();
    let t = whole.len() as i64;
    let ids = Tensor::from_slice(&whole).view([1, t]);
    let mask = Tensor::ones([1, t], (tch::Kind::Int64, tch::Device::Cpu));
    let logits = tch::no_grad(|| policy.logits(&ids, &mask)) / temperature;
    let logp = logits.log_softmax(-1, tch::Kind::Float);
    for (j, (&tok, &lp)) in g.tokens.iter().zip(&g.logprobs).enumerate() {
        let at = prompt.len() as i64 - 1 + j as i64;
        let fresh = logp.double_value(&[0, at, tok]);
        assert!(
            (fresh - lp as f64).abs() < 1e-4,
            "token {j} ({tok}): sampled with log-prob {lp}, a fresh forward gives {fresh}"
        );
    }
}

#[test]
fn sampled_tokens_have_the_log_probs_of_a_fresh_forward() {
    let (world, policy) = (world(), policy());
    let prompts: Vec<Vec<i64>> = world
        .train
        .iter()
        .take(3)
        .map(|p| {
            policy
                .tokenizer
                .encode(&PromptTemplate::Plain.render(&p.prompt_text()))
                .unwrap()
        })
        .collect();
    let params = SamplingParams {
        max_new_tokens: 64,
        temperature: 1.0,
        ..SamplingParams::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Batched generation of prompts of different lengths (left padding).
    for (prompt, g) in prompts
        .iter()
        .zip(policy.generate(&prompts, &params, &mut rng).unwrap())
    {
        assert_teacher_forced(&policy, prompt, &g, 1.0);
    }
    // Forked samples of one prompt, at 1 and at 0.7 (whose distribution
    // the log-probs are then of).
    for temperature in [1.0, 0.7] {
        let params = SamplingParams {
            temperature,
            ..params.clone()
        };
        for g in policy.sample_n(&prompts[1], 4, &params, &mut rng).unwrap() {
            assert_teacher_forced(&policy, &prompts[1], &g, temperature);
        }
    }
}

/// MedCritical's attempts and retries, and the pairs DPO and KTO train on:
/// each attempt's tokens are the model's own, and a pair's sides are the
/// sampled ids, not a re-tokenisation of their text.
#[test]
fn self_corrections_and_their_pairs_carry_the_sampled_ids() {
    let (world, policy) = (world(), policy());
    let rollout = SelfCorrection {
        sampling: SamplingConfig {
            samples: 4,
            temperature: 0.7,
            // A whole chain with its lab readings is about 175 tokens.
            max_new_tokens: 320,
            ..SamplingConfig::default()
        },
        template: PromptTemplate::Plain,
        labeller: &world.truth(),
        corrector: Corrector::Student,
        teacher: None,
        retries: 8,
    };
    let end = policy.tokenizer.end_of_turn_id(&PromptTemplate::Plain);
    let mut corrected = 0;
    for (k, p) in world.train.iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(k as u64);
        let prompt_text = PromptTemplate::Plain.render(&p.prompt_text());
        let prompt = policy.tokenizer.encode(&prompt_text).unwrap();
        for t in rollout.rollout(&policy, p, &mut rng).unwrap().trajectories {
            let g = medzero_policies::Generation {
                tokens: t.tokens.clone(),
                logprobs: t.logprobs.clone(),
                text: String::new(),
                finish: medzero_policies::Finish::Eos,
            };
            assert_teacher_forced(&policy, &prompt, &g, 0.7);
            let record = Correction::of(&t).unwrap();
            let (Some(text), Some(ids)) = (record.correction, record.correction_ids) else {
                continue;
            };
            corrected += 1;
            assert_eq!(policy.tokenizer.decode(&ids).unwrap(), text);
            let pair = Pair {
                prompt: prompt_text.clone(),
                chosen: text.clone(),
                rejected: record.text.clone(),
                chosen_ids: Some(ids.clone()),
                rejected_ids: None,
                meta: serde_json::Value::Null,
            };
            let encoded = EncodedPair::encode(&policy, &pair, end, 4096).unwrap();
            assert_eq!(encoded.chosen[..ids.len()], ids[..]);
            // Ids that do not say what the text says are refused.
            let edited = Pair {
                chosen: format!("{text} (edited)"),
                ..pair
            };
            assert!(EncodedPair::encode(&policy, &edited, end, 4096).is_err());
        }
    }
    assert!(
        corrected > 0,
        "no attempt was corrected: nothing was checked"
    );
}

/// Drawing N samples in batches of at most k rows (bounded memory) gives
/// the samples of one batch of N: each row's stream is drawn in order, and a
/// row's tokens do not depend on how many rows share its batch.
#[test]
fn samples_drawn_in_batches_equal_one_batch() {
    let (world, policy) = (world(), policy());
    let prompt = policy
        .tokenizer
        .encode(&PromptTemplate::Plain.render(&world.train[0].prompt_text()))
        .unwrap();
    let params = SamplingParams {
        max_new_tokens: 48,
        temperature: 1.0,
        ..SamplingParams::default()
    };
    let draw = |rows: usize| {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        policy
            .sample_n_batched(&prompt, 7, rows, &params, &mut rng)
            .unwrap()
            .into_iter()
            .map(|g| g.tokens)
            .collect::<Vec<_>>()
    };
    let whole = draw(7);
    assert!(whole.iter().any(|t| t != &whole[0]), "samples all equal");
    for rows in [1, 3] {
        assert_eq!(draw(rows), whole, "batches of {rows}");
    }
}

/// A decode request: rows to continue (built fresh for each path), sampling
/// parameters and a seed for its streams.
struct Request {
    prompts: Vec<Vec<i64>>,
    /// Each prompt's row is forked this many times (MCTS children, N samples).
    fork: usize,
    params: SamplingParams,
    seed: u64,
}

impl Request {
    fn rows(&self, policy: &Policy) -> medzero_policies::Rows {
        let one = policy.prefill(&self.prompts, 0).unwrap();
        let picked: Vec<usize> = (0..self.prompts.len())
            .flat_map(|r| std::iter::repeat_n(r, self.fork))
            .collect();
        one.select(&picked, self.params.max_new_tokens)
    }
    fn streams(&self, n: usize) -> Vec<ChaCha8Rng> {
        medzero_policies::generate::streams(&mut ChaCha8Rng::seed_from_u64(self.seed), n)
    }
}

/// Continuous batching is a speed switch: requests with different prompts,
/// lengths and sampling parameters, joining at different steps, each get
/// from the engine what `Policy::decode` gives them alone (tokens, log-probs,
/// texts, finish reasons), and their rows are left in the same state: the
/// same ids, the same logits, and a cache that continues the same way.
#[test]
fn continuous_batching_gives_each_request_what_decode_gives_it_alone() {
    let (world, policy) = (world(), policy());
    // Prompts of different lengths: questions, some cut short.
    let prompt = |i: usize, cut: usize| {
        let p = &world.train[i % world.train.len()];
        let mut ids = policy
            .tokenizer
            .encode(&PromptTemplate::Plain.render(&p.prompt_text()))
            .unwrap();
        ids.truncate(ids.len() - 7 * cut);
        ids
    };
    let step = |temperature: f64, top_p: f64, max: usize| SamplingParams {
        max_new_tokens: max,
        temperature,
        top_p,
        stop: vec!["\n\nStep".into()],
        ..SamplingParams::default()
    };
    let requests: Vec<Request> = (0..10)
        .map(|k| Request {
            prompts: (0..1 + k % 3).map(|j| prompt(k + j, (k + j) % 4)).collect(),
            fork: 1 + k % 4,
            params: match k % 4 {
                0 => SamplingParams::greedy(30),
                1 => step(1.0, 0.9, 24),
                2 => SamplingParams {
                    top_k: 5,
                    ..step(0.6, 1.0, 96)
                },
                _ => SamplingParams {
                    max_new_tokens: 120,
                    temperature: 1.2,
                    ..SamplingParams::default()
                },
            },
            seed: 100 + k as u64,
        })
        .collect();
    // Some requests join while others are half way.
    let mut engine = medzero_policies::engine::Engine::new(&policy, 3);
    let mut served = Vec::new();
    for (k, r) in requests.iter().enumerate() {
        let rows = r.rows(&policy);
        let n = rows.len();
        engine.submit(rows, r.params.clone(), r.streams(n));
        for _ in 0..k % 3 * 5 {
            served.extend(engine.step());
        }
    }
    served.extend(engine.run_to_end());
    served.sort_by_key(|d| d.id);
    assert_eq!(served.len(), requests.len());
    assert!(
        engine.steps > 0 && engine.sampled_rows / engine.steps > 4,
        "nothing was batched"
    );
    for (k, (r, mut done)) in requests.iter().zip(served).enumerate() {
        let mut alone = r.rows(&policy);
        let n = alone.len();
        let plain = policy.decode(&mut alone, &r.params, &mut r.streams(n));
        assert_eq!(done.generations.len(), plain.len());
        for (i, (a, b)) in done.generations.iter().zip(&plain).enumerate() {
            assert_eq!(a.tokens, b.tokens, "request {k}, row {i}: tokens differ");
            assert_eq!(a.text, b.text, "request {k}, row {i}");
            assert_eq!(a.finish, b.finish, "request {k}, row {i}");
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!(
                    (x - y).abs() < 1e-5,
                    "request {k}, row {i}: log-probs {x} vs {y}"
                );
            }
        }
        for i in 0..n {
            assert_eq!(done.rows.ids(i), alone.ids(i), "request {k}, row {i}: ids");
            let d = max_abs_diff(&done.rows.logits(i), &alone.logits(i));
            assert!(d < 1e-4, "request {k}, row {i}: logits differ by {d}");
        }
        // The caches continue alike.
        let more: Vec<Vec<i64>> = (0..n).map(|i| vec![3 + i as i64, 7]).collect();
        policy.extend(&mut done.rows, &more).unwrap();
        policy.extend(&mut alone, &more).unwrap();
        for i in 0..n {
            let d = max_abs_diff(&done.rows.logits(i), &alone.logits(i));
            assert!(
                d < 1e-4,
                "request {k}, row {i}: continued logits differ by {d}"
            );
        }
    }
}

/// Trees in flight through the inference service are a speed switch: each
/// problem's tree, searched concurrently with others and batched with them,
/// is the one a search of that problem alone builds with the same stream.
#[test]
fn trees_searched_together_through_the_service_equal_trees_searched_alone() {
    use medzero::rollout::meds3::MctsRollout;
    use medzero::runtime::service::ServiceConfig;
    let (world, policy) = (world(), policy());
    let rollout = MctsRollout {
        mcts: mcts_cfg(),
        generation: generation(true, 1.0),
        template: PromptTemplate::Plain,
        iteration: 0,
    };
    let problems: Vec<_> = world.train.iter().take(5).collect();
    let rng = |i: usize| medzero::runtime::actor::problem_rng(7, i);
    let alone: Vec<Tree> = problems
        .iter()
        .enumerate()
        .map(|(i, p)| rollout.search(&policy, p, &mut rng(i)).unwrap().0)
        .collect();
    let (together, stats) = rollout
        .search_many(
            &policy,
            &problems,
            (0..problems.len()).map(rng).collect(),
            4,
            ServiceConfig { merge_every: 2 },
        )
        .unwrap();
    assert!(
        stats.mean_batch > 4.0,
        "the trees were not batched: {stats:?}"
    );
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert!(
            a.nodes.len() > 5,
            "problem {i}: a tree of {} nodes",
            a.nodes.len()
        );
        assert_eq!(texts(a), texts(&b.tree), "problem {i}: the trees differ");
        assert_eq!(a, &b.tree, "problem {i}: the trees differ");
    }
}
