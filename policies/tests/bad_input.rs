//! Bad model folders and bad requests are clear errors, never panics.

use medzero_policies::llama::{Arch, DType, DecoderConfig};
use medzero_policies::manifest::MANIFEST;
use medzero_policies::tokenizer::Tokenizer;
use medzero_policies::{Policy, SamplingParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::Device;

fn config(vocab: usize, eos: i64) -> DecoderConfig {
    DecoderConfig {
        arch: Arch::Llama,
        vocab_size: vocab as i64,
        hidden_size: 16,
        intermediate_size: 32,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 2,
        head_dim: 8,
        max_position_embeddings: 24,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_llama3: None,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![eos],
        dtype: DType::F32,
    }
}

fn saved_with_manifest(dir: &Path) -> Policy {
    let tok = Tokenizer::word_level(["alpha beta gamma delta epsilon"], 1);
    let cfg = config(tok.vocab_size(), tok.eos_id());
    let p = Policy::new_random(&cfg, tok, Device::Cpu, 1).unwrap();
    p.save(dir).unwrap();
    p
}

/// A saved folder without its checksum manifest, as a download from the Hub
/// arrives: the tests below edit it and check the structural errors, which a
/// manifest would otherwise pre-empt with a checksum mismatch.
fn saved(dir: &Path) -> Policy {
    let p = saved_with_manifest(dir);
    std::fs::remove_file(dir.join(MANIFEST)).unwrap();
    p
}

fn load_err(dir: &Path) -> String {
    match Policy::load(dir, Device::Cpu, None) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn a_changed_or_missing_file_fails_its_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    saved_with_manifest(tmp.path());
    edit_config(tmp.path(), |v| v["rms_norm_eps"] = 1e-5.into());
    let err = load_err(tmp.path());
    assert!(
        err.contains("config.json: its checksum does not match") && err.contains(MANIFEST),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    saved_with_manifest(tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors: missing") && err.contains("the folder is incomplete"),
        "{err}"
    );
}

#[test]
fn missing_weights_names_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("no model.safetensors") && err.contains(&tmp.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn mismatched_names_and_shapes_are_listed() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    edit_config(tmp.path(), |v| v["intermediate_size"] = 48.into());
    let err = load_err(tmp.path());
    assert!(
        err.contains("wrong shape")
            && err.contains("mlp.down_proj.weight: file [16, 32], model [16, 48]"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    edit_config(tmp.path(), |v| v["num_hidden_layers"] = 2.into());
    let err = load_err(tmp.path());
    assert!(err.contains("missing model.layers.1."), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    edit_config(tmp.path(), |v| v["attention_bias"] = true.into());
    let err = load_err(tmp.path());
    assert!(
        err.contains("missing") && err.contains("self_attn.k_proj.bias"),
        "{err}"
    );
}

#[test]
fn garbage_weights_and_config_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    std::fs::write(
        tmp.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors: not a safetensors file"),
        "{err}"
    );
    std::fs::write(tmp.path().join("config.json"), b"{").unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("config.json: not a valid HF config"), "{err}");
}

#[test]
fn unsupported_architecture_says_what_is_supported() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    edit_config(tmp.path(), |v| v["model_type"] = "gpt2".into());
    let err = load_err(tmp.path());
    assert!(
        err.contains("unsupported model") && err.contains("\"gpt2\"") && err.contains("llama"),
        "{err}"
    );
    edit_config(tmp.path(), |v| {
        v["model_type"] = "llama".into();
        v["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    });
    let err = load_err(tmp.path());
    assert!(err.contains("rope type \"yarn\""), "{err}");
}

#[test]
fn a_tokenizer_that_does_not_fit_the_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    saved(tmp.path());
    let big = Tokenizer::word_level(
        ["one two three four five six seven eight nine ten eleven twelve"],
        1,
    );
    big.save(&tmp.path().join("tokenizer.json")).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("do not belong together"), "{err}");
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let err = load_err(tmp.path());
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn a_prompt_longer_than_the_context_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = saved(tmp.path());
    let prompt = vec![3i64; 20];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let err = p
        .generate(&[prompt], &SamplingParams::greedy(8), &mut rng)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("prompt of 20 tokens plus 8 new tokens exceeds the model's context of 24"),
        "{err}"
    );
}

/// Sharded checkpoints (`model.safetensors.index.json`) load like single
/// files, and a bf16 load stays close to f32.
#[test]
fn sharded_weights_and_bf16_load() {
    let tmp = tempfile::tempdir().unwrap();
    let p = saved(tmp.path());
    let ids = tch::Tensor::from_slice(&[3i64, 4, 5, 6]).view([1, 4]);
    let mask = ids.ones_like();
    let want = tch::no_grad(|| p.logits(&ids, &mask));

    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(tmp.path().join(f), sharded.join(f)).unwrap();
    }
    let params = p.named_parameters();
    let (a, b) = params.split_at(params.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        std::fs::write(
            sharded.join(&file),
            medzero_policies::weights::to_bytes(part, None).unwrap(),
        )
        .unwrap();
        for (name, _) in part.iter() {
            map.insert(name.clone(), file.clone().into());
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let q = Policy::load(&sharded, Device::Cpu, None).unwrap();
    let got = tch::no_grad(|| q.logits(&ids, &mask));
    assert_eq!(
        Vec::<f32>::try_from(want.view([-1])).unwrap(),
        Vec::<f32>::try_from(got.view([-1])).unwrap()
    );

    let half = Policy::load(tmp.path(), Device::Cpu, Some(DType::Bf16)).unwrap();
    assert_eq!(half.named_parameters()[0].1.kind(), tch::Kind::BFloat16);
    let got = tch::no_grad(|| half.logits(&ids, &mask)).to_kind(tch::Kind::Float);
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff < 0.05, "bf16 logits differ from f32 by {diff}");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let g = half
        .generate(
            &[vec![3, 4, 5]],
            &SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(5)
            },
            &mut rng,
        )
        .unwrap();
    assert_eq!(g[0].tokens.len(), 5);
}
