//! Generation on the quickstart's student shape (random weights, so every
//! step runs to its budget): prefill, cached decoding at batch 1 and 32,
//! forked samples of one prompt, MCTS expansions with and without
//! prefix reuse, and 8 trees searched one at a time against 8 in flight
//! through the inference service. One libtorch thread, so the figures do not depend on the
//! machine's core count.

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medzero::cli::bench::search::Trees;
use medzero::rollout::mcts::{self, MctsConfig};
use medzero::rollout::meds3::{PolicySteps, StepGeneration};
use medzero_envs::synthclinic::{SynthClinic, SynthConfig};
use medzero_policies::tokenizer::{PromptTemplate, Tokenizer};
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn setup() -> (Policy, SynthClinic) {
    tch::set_num_threads(1);
    let world = SynthClinic::generate(&SynthConfig {
        train: 50,
        test: 10,
        ..SynthConfig::default()
    })
    .unwrap();
    let texts: Vec<String> = world
        .train
        .iter()
        .map(|p| p.prompt_text())
        .chain(world.textbook.iter().cloned())
        .collect();
    let tok = Tokenizer::word_level(texts.iter().map(String::as_str), 1);
    let policy = common::student(tok);
    (policy, world)
}

fn generation(c: &mut Criterion) {
    let (policy, world) = setup();
    let prompt = policy
        .tokenizer
        .encode(&PromptTemplate::Plain.render(&world.test[0].prompt_text()))
        .unwrap();
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(32)
    };
    let mut g = c.benchmark_group("generation");
    g.sample_size(10);
    g.throughput(Throughput::Elements(prompt.len() as u64));
    g.bench_function("prefill", |b| {
        b.iter(|| policy.prefill(std::slice::from_ref(&prompt), 0).unwrap())
    });
    for batch in [1usize, 32] {
        let prompts = vec![prompt.clone(); batch];
        g.throughput(Throughput::Elements((batch * 32) as u64));
        g.bench_function(format!("decode/batch-{batch}"), |b| {
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            b.iter(|| policy.generate(&prompts, &params, &mut rng).unwrap())
        });
    }
    g.throughput(Throughput::Elements(16 * 32));
    g.bench_function("sample_n/16", |b| {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let sampled = SamplingParams {
            temperature: 1.0,
            ..params.clone()
        };
        b.iter(|| policy.sample_n(&prompt, 16, &sampled, &mut rng).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("mcts");
    g.sample_size(10);
    let cfg = MctsConfig {
        max_nodes: 20,
        ..MctsConfig::default()
    };
    for reuse in [true, false] {
        let generation = StepGeneration {
            step_max_tokens: 16,
            rollout_max_tokens: 32,
            prefix_reuse: reuse,
            ..StepGeneration::default()
        };
        let p = &world.test[0];
        g.bench_function(format!("search-20-nodes/reuse-{reuse}"), |b| {
            b.iter(|| {
                let mut rng = ChaCha8Rng::seed_from_u64(0);
                let mut steps =
                    PolicySteps::new(&policy, &generation, PromptTemplate::Plain, p, &mut rng);
                mcts::search(p, &cfg, &mut steps, 0).unwrap()
            })
        });
    }
    // The workload `medzero bench --only service` times, on one thread.
    let trees = Trees::new(&world, 8);
    g.bench_function("8-trees/one-at-a-time", |b| {
        b.iter(|| trees.one_at_a_time(&policy).unwrap())
    });
    g.bench_function("8-trees/in-flight-via-service", |b| {
        b.iter(|| trees.in_flight(&policy).unwrap())
    });
    g.finish();
}

criterion_group!(benches, generation);
criterion_main!(benches);
