//! The PRM head learns step labels through the same function it scores with,
//! and saves and loads with its backbone.

use medzero_policies::Policy;
use medzero_policies::generate::pad_right;
use medzero_policies::llama::DecoderConfig;
use medzero_policies::optim::{AdamW, AdamWConfig};
use medzero_policies::tokenizer::Tokenizer;
use tch::{Device, Kind, Tensor};

fn tiny() -> Policy {
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let tok = Tokenizer::word_level([text.as_str()], 1);
    let cfg = DecoderConfig::tiny_qwen2(tok.vocab_size() as i64, tok.eos_id());
    Policy::new_random(&cfg, tok, Device::Cpu, 3).unwrap()
}

#[test]
fn prm_head_learns_step_labels_and_round_trips() {
    let policy = tiny();
    let head = policy.add_value_head();
    let vocab = policy.tokenizer.vocab_size() as i64;
    // 16 sequences of 12 tokens, steps ending at positions 3, 7, 11; a step is
    // "correct" when its last token has an even id: learnable from the input.
    let seqs: Vec<Vec<i64>> = (0..16)
        .map(|s| {
            (0..12)
                .map(|t| 5 + (s * 7 + t * 3 + s * t) % (vocab - 5))
                .collect()
        })
        .collect();
    let (ids, mask) = pad_right(&seqs, 0);
    let positions = Tensor::from_slice(&[3i64, 7, 11])
        .view([1, 3])
        .repeat([16, 1]);
    let labels = ids
        .gather(1, &positions, false)
        .remainder(2)
        .eq(0)
        .to_kind(Kind::Float);
    let label_mask = Tensor::ones([16, 3], (Kind::Float, Device::Cpu));
    let mut opt = AdamW::new(
        policy.named_parameters(),
        AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
        AdamW::default_decay,
    )
    .unwrap();
    let first = head
        .loss(&policy, &ids, &mask, &positions, &labels, &label_mask)
        .double_value(&[]);
    assert!(
        (first - std::f64::consts::LN_2).abs() < 0.1,
        "untrained loss {first} should be near ln 2"
    );
    let mut last = first;
    for _ in 0..80 {
        let loss = head.loss(&policy, &ids, &mask, &positions, &labels, &label_mask);
        loss.backward();
        opt.step(1e-2);
        opt.zero_grad();
        last = loss.double_value(&[]);
    }
    assert!(last < 0.1, "loss went from {first} to {last}");
    let scores = tch::no_grad(|| head.scores(&policy, &ids, &mask, &positions));
    let acc = scores
        .ge(0.5)
        .to_kind(Kind::Float)
        .eq_tensor(&labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(acc > 0.95, "step accuracy {acc}");

    let tmp = tempfile::tempdir().unwrap();
    policy.save(tmp.path()).unwrap();
    let (again, head2) = Policy::load_with_head(tmp.path(), Device::Cpu, None).unwrap();
    let scores2 = tch::no_grad(|| head2.scores(&again, &ids, &mask, &positions));
    assert_eq!(
        Vec::<f32>::try_from(scores.view([-1])).unwrap(),
        Vec::<f32>::try_from(scores2.view([-1])).unwrap()
    );
    // A PRM folder is not a plain policy: the extra head is named.
    let err = Policy::load(tmp.path(), Device::Cpu, None)
        .err()
        .expect("loading a PRM as a policy must fail")
        .to_string();
    assert!(err.contains("unexpected score.bias, score.weight"), "{err}");
}
