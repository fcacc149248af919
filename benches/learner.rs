//! Learner steps on the quickstart student's shape (random weights): one
//! optimizer step of SFT (32 x 64 tokens), DPO (16 pairs, live reference)
//! and GRPO (32 completions in groups of 8), the workloads `medzero bench`
//! times beside TRL. One libtorch thread.

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medzero::cli::bench::learner::LearnerStep;
use medzero_policies::tokenizer::Tokenizer;

fn learner(c: &mut Criterion) {
    tch::set_num_threads(1);
    let words: Vec<String> = (0..800).map(|i| format!("w{i}")).collect();
    let tok = Tokenizer::word_level(words.iter().map(String::as_str), 1);
    let policy = common::student(tok);
    let mut g = c.benchmark_group("learner");
    g.sample_size(10);
    let steps = [
        ("sft", LearnerStep::sft(&policy, 32, 64).unwrap()),
        ("dpo", LearnerStep::dpo(&policy, 32, 64).unwrap()),
        ("grpo", LearnerStep::grpo(&policy, 32, 64).unwrap()),
    ];
    for (name, mut step) in steps {
        g.throughput(Throughput::Elements(step.tokens as u64));
        g.bench_function(name, |b| b.iter(|| step.step().unwrap()));
    }
    g.finish();
}

criterion_group!(benches, learner);
criterion_main!(benches);
