//! medzero's AdamW, clipping and schedules against torch/transformers, state
//! round trips, and the errors a bad checkpoint gets.

mod common;

use medzero_policies::optim::{
    AdamW, AdamWConfig, OptimError, Schedule, ScheduleKind, clip_grad_norm,
};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Matrices with decay, plus a bias and a norm weight without; sizes that are
/// not multiples of the SIMD width, so kernels' vector and tail paths both run.
const SHAPES: [(&str, &[i64]); 4] = [
    ("embed.weight", &[37, 16]),
    ("layer.weight", &[17, 9]),
    ("layer.bias", &[17]),
    ("norm.weight", &[9]),
];
/// Gradient scale per step (cycling): with MAX_NORM, steps 1 and 3 of every
/// five clip, the others not.
const GRAD_SCALES: [f64; 5] = [0.1, 1.0, 0.2, 2.0, 0.15];
const MAX_NORM: f64 = 5.0;
const COSINE: Schedule = Schedule {
    kind: ScheduleKind::Cosine,
    warmup_steps: 2,
    total_steps: 5,
};

fn cfg() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    }
}

/// Deterministic values in [-1, 1], different for each `seed`.
fn wave(shape: &[i64], seed: f64, kind: Kind) -> Tensor {
    let n: i64 = shape.iter().product();
    Tensor::arange(n, (kind, Device::Cpu))
        .g_mul_scalar(seed)
        .g_add_scalar(7.0 * seed)
        .sin()
        .reshape(shape)
}

fn initial_params(kind: Kind) -> Vec<(String, Tensor)> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let t = wave(shape, 0.31 + 0.17 * i as f64, kind).set_requires_grad(true);
            (name.to_string(), t)
        })
        .collect()
}

/// `grads[step][param]`.
fn grads(kind: Kind, steps: usize) -> Vec<Vec<Tensor>> {
    (0..steps)
        .map(|step| {
            let scale = GRAD_SCALES[step % GRAD_SCALES.len()];
            SHAPES
                .iter()
                .enumerate()
                .map(|(i, (_, shape))| {
                    let seed = 1.3 + 0.7 * step as f64 + 0.11 * i as f64;
                    wave(shape, seed, kind).g_mul_scalar(scale)
                })
                .collect()
        })
        .collect()
}

/// What a training loop does per step: fresh grads via backward (d/dp of
/// sum(p * g) is exactly g), clip, step at the schedule's lr. Returns (norm, lr).
fn train_step(opt: &mut AdamW, grads: &[Tensor], schedule: Schedule, step: usize) -> (f64, f64) {
    opt.zero_grad();
    let loss = opt
        .params()
        .zip(grads)
        .map(|(p, g)| (p * g).sum(p.kind()))
        .reduce(|a, b| a + b)
        .expect("parameters");
    loss.backward();
    let norm = opt.clip_grad_norm(MAX_NORM);
    let lr = schedule.lr(opt.config().lr, step);
    opt.step(lr);
    (norm, lr)
}

fn snapshot(opt: &AdamW) -> Vec<Tensor> {
    opt.params().map(|p| p.detach().copy()).collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn assert_bits_eq(what: &str, ours: &Tensor, theirs: &Tensor) {
    assert_eq!(ours.size(), theirs.size(), "{what}: shape");
    assert_eq!(ours.kind(), theirs.kind(), "{what}: dtype");
    assert!(
        ours.equal(theirs),
        "{what}: not bit-identical to torch, max abs diff {:e}",
        max_abs_diff(ours, theirs)
    );
}

fn assert_close(what: &str, ours: f64, theirs: f64) {
    let rel = (ours - theirs).abs() / theirs.abs().max(f64::MIN_POSITIVE);
    assert!(rel <= 1e-12, "{what}: ours {ours:e}, torch {theirs:e}");
}

fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], config: &serde_json::Value) {
    struct Host(safetensors::Dtype, Vec<usize>, Vec<u8>);
    impl safetensors::View for &Host {
        fn dtype(&self) -> safetensors::Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }
    let host: Vec<(&str, Host)> = tensors
        .iter()
        .map(|(name, t)| {
            let dtype = match t.kind() {
                Kind::Float => safetensors::Dtype::F32,
                Kind::Double => safetensors::Dtype::F64,
                k => panic!("{name}: unexpected dtype {k:?}"),
            };
            let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut bytes, t.numel());
            let shape = t.size().iter().map(|&d| d as usize).collect();
            (name.as_str(), Host(dtype, shape, bytes))
        })
        .collect();
    let meta = HashMap::from([("config".to_string(), config.to_string())]);
    let bytes = safetensors::serialize(host.iter().map(|(n, h)| (*n, h)), Some(meta)).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn read_safetensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.iter()
        .map(|(name, view)| {
            let kind = match view.dtype() {
                safetensors::Dtype::F32 => Kind::Float,
                safetensors::Dtype::F64 => Kind::Double,
                d => panic!("{name}: unexpected dtype {d:?}"),
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::from_data_size(view.data(), &shape, kind);
            (name.to_string(), t)
        })
        .collect()
}

fn schedule_json(schedule: Schedule, steps: usize) -> serde_json::Value {
    let mut v = serde_json::to_value(schedule).unwrap();
    v["steps"] = steps.into();
    v
}

/// Trains `steps` steps here and in torch (tests/support/optim_parity.py)
/// from the same params and grads: norms, lrs, params after every step and
/// the final moments must match bit for bit. Also compares `schedules`, each
/// for its number of steps, with transformers'.
fn assert_matches_torch(
    kind: Kind,
    cfg: AdamWConfig,
    schedule: Schedule,
    steps: usize,
    schedules: &[(Schedule, usize)],
) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    let params = initial_params(kind);
    let grads = grads(kind, steps);
    let mut tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, p)| (format!("param/{n}"), p.detach().copy()))
        .collect();
    for (step, step_grads) in grads.iter().enumerate() {
        for ((name, _), g) in SHAPES.iter().zip(step_grads) {
            tensors.push((format!("grad/{step}/{name}"), g.shallow_clone()));
        }
    }
    let config = serde_json::json!({
        "lr": cfg.lr, "beta1": cfg.beta1, "beta2": cfg.beta2, "eps": cfg.eps,
        "weight_decay": cfg.weight_decay, "max_norm": MAX_NORM,
        "schedule": schedule_json(schedule, steps),
        "names": SHAPES.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "schedules": schedules.iter().map(|&(s, n)| schedule_json(s, n)).collect::<Vec<_>>(),
    });
    write_safetensors(&input, &tensors, &config);
    let path = |p: &Path| p.to_str().expect("UTF-8 temp path").to_string();
    common::run_py("optim_parity.py", &[&path(&input), &path(&output)]);
    let torch = read_safetensors(&output);

    let mut opt = AdamW::new(params, cfg, AdamW::default_decay).unwrap();
    let (mut clipped, mut unclipped) = (0, 0);
    for (step, step_grads) in grads.iter().enumerate() {
        let (norm, lr) = train_step(&mut opt, step_grads, schedule, step);
        let at = |what: &str| torch[what].double_value(&[step as i64]);
        assert_close(&format!("norm at step {step}"), norm, at("norm"));
        assert_close(&format!("lr at step {step}"), lr, at("lr"));
        if norm > MAX_NORM {
            clipped += 1
        } else {
            unclipped += 1
        }
        for ((name, _), p) in SHAPES.iter().zip(opt.params()) {
            let theirs = &torch[&format!("param/{step}/{name}")];
            assert_bits_eq(&format!("{name} after step {step}"), p, theirs);
        }
    }
    assert!(
        clipped > 0 && unclipped > 0,
        "clipping should trigger on some steps only"
    );
    assert_eq!(opt.steps_taken(), steps as i64);
    let state = opt.state();
    assert_eq!(state.len(), 2 * SHAPES.len());
    for (name, t) in &state {
        assert_bits_eq(name, t, &torch[name]);
    }

    for (i, (schedule, steps)) in schedules.iter().enumerate() {
        let theirs = &torch[&format!("schedule/{i}")];
        for step in 0..*steps {
            let ours = schedule.lr(cfg.lr, step);
            let what = format!("{schedule:?} at step {step}");
            assert_close(&what, ours, theirs.double_value(&[step as i64]));
        }
    }
}

/// f32 (what training holds its master weights in) through warmup and cosine
/// decay, clipping on some steps; plus the three schedules past their end,
/// with warmup 0, and with warmup longer than the run.
#[test]
fn matches_torch_in_f32_and_transformers_schedules() {
    let s = |kind, warmup_steps, total_steps| Schedule {
        kind,
        warmup_steps,
        total_steps,
    };
    let schedules = [
        (COSINE, 10),
        (s(ScheduleKind::Cosine, 0, 7), 10),
        (s(ScheduleKind::Cosine, 3, 100), 100),
        (s(ScheduleKind::Linear, 3, 8), 12),
        (s(ScheduleKind::Linear, 0, 10), 10),
        (s(ScheduleKind::Linear, 5, 3), 8),
        (s(ScheduleKind::Constant, 4, 0), 10),
        (s(ScheduleKind::Constant, 0, 0), 3),
    ];
    assert_matches_torch(Kind::Float, cfg(), COSINE, 5, &schedules);
}

/// f64 shows every rounding difference. With beta2 = 0.995, step 69 is one
/// where glibc's `pow(bc2, 0.5)` (torch's `bc2 ** 0.5`) and `sqrt(bc2)` differ
/// in the last bit, which optimised builds would otherwise use.
#[test]
fn matches_torch_in_f64_over_70_steps() {
    let cfg = AdamWConfig {
        beta2: 0.995,
        ..cfg()
    };
    let constant = Schedule {
        kind: ScheduleKind::Constant,
        warmup_steps: 0,
        total_steps: 0,
    };
    assert_matches_torch(Kind::Double, cfg, constant, 70, &[]);
}

/// Saving after 3 steps and loading into a fresh optimizer over copies of the
/// params: 2 more steps on both give the same bits (moments, masters, params).
fn assert_resumes_bit_identically(params: Vec<(String, Tensor)>, grads: &[Vec<Tensor>]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let mut a = AdamW::new(params, cfg(), AdamW::default_decay).unwrap();
    for (step, g) in grads.iter().enumerate().take(3) {
        train_step(&mut a, g, COSINE, step);
    }
    a.save(&path).unwrap();

    let copies = SHAPES
        .iter()
        .zip(a.params())
        .map(|((name, _), p)| (name.to_string(), p.detach().copy().set_requires_grad(true)))
        .collect();
    let mut b = AdamW::new(copies, cfg(), AdamW::default_decay).unwrap();
    b.load(&path).unwrap();
    assert_eq!(b.steps_taken(), 3);
    for ((name, x), (_, y)) in a.state().iter().zip(&b.state()) {
        assert_bits_eq(name, y, x);
    }
    for (step, g) in grads.iter().enumerate().skip(3) {
        train_step(&mut a, g, COSINE, step);
        train_step(&mut b, g, COSINE, step);
    }
    for ((name, x), (_, y)) in a.state().iter().zip(&b.state()) {
        assert_bits_eq(name, y, x);
    }
    for (((name, _), x), y) in SHAPES.iter().zip(snapshot(&a)).zip(snapshot(&b)) {
        assert_bits_eq(name, &y, &x);
    }
    assert_eq!(b.steps_taken(), grads.len() as i64);
}

#[test]
fn save_and_load_resume_bit_identically() {
    assert_resumes_bit_identically(initial_params(Kind::Float), &grads(Kind::Float, 5));
}

/// A copy of the state after one step (so moments are not all zero).
fn stepped_state() -> Vec<(String, Tensor)> {
    let mut opt = AdamW::new(initial_params(Kind::Float), cfg(), AdamW::default_decay).unwrap();
    train_step(&mut opt, &grads(Kind::Float, 1)[0], COSINE, 0);
    opt.state()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect()
}

fn load_error(state: Vec<(String, Tensor)>) -> String {
    let mut opt = AdamW::new(initial_params(Kind::Float), cfg(), AdamW::default_decay).unwrap();
    let before = opt
        .state()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect::<Vec<_>>();
    let err = opt.load_state(&state, 1).unwrap_err();
    assert!(matches!(err, OptimError::Mismatch { .. }), "{err:?}");
    assert_eq!(opt.steps_taken(), 0, "a failed load changes nothing");
    for ((name, x), (_, y)) in before.iter().zip(opt.state()) {
        assert_bits_eq(name, &y, x);
    }
    err.to_string()
}

#[test]
fn load_state_names_what_does_not_match() {
    let state = stepped_state();
    let without = |name: &str| {
        state
            .iter()
            .filter(|(n, _)| n != name)
            .map(|(n, t)| (n.clone(), t.copy()))
            .collect::<Vec<_>>()
    };

    let msg = load_error(without("exp_avg/layer.bias"));
    assert!(msg.contains("missing exp_avg/layer.bias"), "{msg}");

    let mut extra = without("");
    extra.push((
        "exp_avg/ghost.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let msg = load_error(extra);
    assert!(msg.contains("unexpected exp_avg/ghost.weight"), "{msg}");

    let mut reshaped = without("exp_avg_sq/layer.weight");
    reshaped.push((
        "exp_avg_sq/layer.weight".into(),
        Tensor::zeros([9, 17], (Kind::Float, Device::Cpu)),
    ));
    let msg = load_error(reshaped);
    assert!(
        msg.contains("exp_avg_sq/layer.weight has shape [9, 17], expected [17, 9]"),
        "{msg}"
    );

    let mut retyped = without("exp_avg/norm.weight");
    retyped.push((
        "exp_avg/norm.weight".into(),
        Tensor::zeros([9], (Kind::Double, Device::Cpu)),
    ));
    let msg = load_error(retyped);
    assert!(
        msg.contains("exp_avg/norm.weight has dtype Double, expected Float"),
        "{msg}"
    );

    // Another model's state lists the first few names only.
    let many = (0..10)
        .map(|i| {
            (
                format!("w{i}"),
                Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            )
        })
        .collect();
    let mut opt = AdamW::new(many, cfg(), AdamW::default_decay).unwrap();
    let msg = opt.load_state(&state, 1).unwrap_err().to_string();
    assert!(
        msg.contains("missing exp_avg/w0, exp_avg_sq/w0,") && msg.contains("and 12 more;"),
        "{msg}"
    );
    assert!(msg.contains("unexpected exp_avg/embed.weight,"), "{msg}");

    let mut opt = AdamW::new(initial_params(Kind::Float), cfg(), AdamW::default_decay).unwrap();
    let err = opt.load_state(&state, -1).unwrap_err();
    assert!(
        matches!(err, OptimError::Steps { steps: -1, .. }),
        "{err:?}"
    );
    opt.load_state(&state, 1).unwrap();
    for ((name, x), (_, y)) in state.iter().zip(opt.state()) {
        assert_bits_eq(name, &y, x);
    }
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut opt = AdamW::new(initial_params(Kind::Float), cfg(), AdamW::default_decay).unwrap();

    let missing = dir.path().join("no-such-optim.safetensors");
    let err = opt.load(&missing).unwrap_err();
    assert!(matches!(err, OptimError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not safetensors").unwrap();
    let err = opt.load(&garbage).unwrap_err();
    assert!(matches!(err, OptimError::Format { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&garbage.display().to_string()),
        "{err}"
    );

    // A valid safetensors file that is not an optimizer state (no format tag).
    let weights = dir.path().join("weights.safetensors");
    write_safetensors(
        &weights,
        &initial_params(Kind::Float),
        &serde_json::json!({}),
    );
    let err = opt.load(&weights).unwrap_err();
    assert!(matches!(err, OptimError::Format { .. }), "{err:?}");

    // A state file of another model: the mismatch names the file and tensor.
    let other = dir.path().join("other.safetensors");
    let small = vec![(
        "w".to_string(),
        Tensor::zeros([3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true),
    )];
    AdamW::new(small, cfg(), AdamW::default_decay)
        .unwrap()
        .save(&other)
        .unwrap();
    let msg = opt.load(&other).unwrap_err().to_string();
    assert!(
        msg.contains(&other.display().to_string()) && msg.contains("unexpected exp_avg/w"),
        "{msg}"
    );
}

#[test]
fn new_rejects_bad_params_and_configs() {
    let p = || Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let twice = vec![("w".to_string(), p()), ("w".to_string(), p())];
    let err = AdamW::new(twice, cfg(), AdamW::default_decay)
        .err()
        .unwrap();
    assert_eq!(err.to_string(), "parameter \"w\" is listed twice");

    let frozen = vec![(
        "w".to_string(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    )];
    let err = AdamW::new(frozen, cfg(), AdamW::default_decay)
        .err()
        .unwrap();
    assert_eq!(err.to_string(), "parameter \"w\" does not require grad");

    for bad in [
        AdamWConfig {
            beta2: 1.0,
            ..cfg()
        },
        AdamWConfig { lr: -1.0, ..cfg() },
        AdamWConfig {
            eps: f64::NAN,
            ..cfg()
        },
    ] {
        let err = AdamW::new(vec![("w".into(), p())], bad, AdamW::default_decay)
            .err()
            .unwrap();
        assert!(matches!(err, OptimError::Config(_)), "{bad:?}: {err:?}");
    }
}

/// Like torch with `zero_grad()`'s default: grads become undefined, and a
/// parameter the backward did not reach keeps its value and moments.
#[test]
fn zero_grad_sets_none_and_step_skips_params_without_grads() {
    let mut opt = AdamW::new(initial_params(Kind::Float), cfg(), AdamW::default_decay).unwrap();
    opt.step(1e-2);
    assert_eq!(
        opt.steps_taken(),
        0,
        "a step with no grads at all does not count"
    );

    let before = snapshot(&opt);
    let first = opt.params().next().unwrap().shallow_clone();
    (&first * &first).sum(Kind::Float).backward();
    opt.step(1e-2);
    assert_eq!(opt.steps_taken(), 1);
    let after = snapshot(&opt);
    assert!(
        !after[0].equal(&before[0]),
        "the parameter with a grad moves"
    );
    for (x, y) in before.iter().zip(&after).skip(1) {
        assert_bits_eq("parameter without grad", y, x);
    }
    assert!(
        opt.state()
            .iter()
            .skip(2)
            .all(|(_, t)| t.abs().max().double_value(&[]) == 0.0)
    );

    assert!(opt.params().next().unwrap().grad().defined());
    opt.zero_grad();
    assert!(opt.params().all(|p| !p.grad().defined()));
}

#[test]
fn clip_grad_norm_without_grads_is_zero() {
    let params: Vec<Tensor> = initial_params(Kind::Float)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(clip_grad_norm(&params, 1.0), 0.0);
}

#[test]
fn default_decay_spares_biases_and_vectors() {
    let m = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
    let v = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    assert!(AdamW::default_decay(
        "model.layers.0.mlp.up_proj.weight",
        &m
    ));
    assert!(AdamW::default_decay("model.embed_tokens.weight", &m));
    assert!(!AdamW::default_decay(
        "model.layers.0.self_attn.q_proj.bias",
        &v
    ));
    assert!(!AdamW::default_decay("odd.bias", &m), "a bias even if 2-D");
    assert!(!AdamW::default_decay("model.norm.weight", &v));
}

#[test]
fn schedule_serializes_in_snake_case() {
    let json = r#"{"kind":"cosine","warmup_steps":2,"total_steps":5}"#;
    let s: Schedule = serde_json::from_str(json).unwrap();
    assert_eq!(s, COSINE);
    assert_eq!(serde_json::to_string(&s).unwrap(), json);
}

/// `initial_params` rounded to bf16, as `kind`: values both runs can hold.
fn bf16_representable(kind: Kind) -> Vec<(String, Tensor)> {
    initial_params(Kind::Float)
        .into_iter()
        .map(|(n, p)| {
            let p = p.detach().to_kind(Kind::BFloat16).to_kind(kind);
            (n, p.set_requires_grad(true))
        })
        .collect()
}

/// A bf16 parameter trains through an f32 master that follows an f32 run on
/// the same gradients bit for bit, clipping included (steps 1 and 3 clip);
/// the parameter is the master rounded to bf16, and the moments are f32.
#[test]
fn bf16_params_follow_their_f32_masters_exactly() {
    let grads32: Vec<Vec<Tensor>> = grads(Kind::Float, 5)
        .into_iter()
        .map(|step| {
            let rounded = step.iter().map(|g| g.to_kind(Kind::BFloat16));
            rounded.map(|g| g.to_kind(Kind::Float)).collect()
        })
        .collect();
    let grads16: Vec<Vec<Tensor>> = grads32
        .iter()
        .map(|step| step.iter().map(|g| g.to_kind(Kind::BFloat16)).collect())
        .collect();
    let mut full =
        AdamW::new(bf16_representable(Kind::Float), cfg(), AdamW::default_decay).unwrap();
    let mut half = AdamW::new(
        bf16_representable(Kind::BFloat16),
        cfg(),
        AdamW::default_decay,
    )
    .unwrap();
    for step in 0..5 {
        let (n32, _) = train_step(&mut full, &grads32[step], COSINE, step);
        let (n16, _) = train_step(&mut half, &grads16[step], COSINE, step);
        assert_eq!(n16, n32, "step {step}: grad norm");
    }
    let state16: HashMap<String, Tensor> = half.state().into_iter().collect();
    for ((name, _), (p32, p16)) in SHAPES.iter().zip(full.params().zip(half.params())) {
        assert_bits_eq(name, &state16[&format!("master/{name}")], p32);
        assert_bits_eq(name, p16, &p32.to_kind(Kind::BFloat16));
    }
    for (name, m32) in full.state() {
        assert_bits_eq(&name, &state16[&name], &m32);
    }
    assert_eq!(state16.len(), 3 * SHAPES.len());
}

/// The masters checkpoint with the moments: a fresh optimizer over the
/// saved bf16 weights resumes bit-identically; a state without masters (an
/// f32 run's) is refused by name.
#[test]
fn bf16_masters_save_and_resume_bit_identically() {
    let half = || bf16_representable(Kind::BFloat16);
    assert_resumes_bit_identically(half(), &grads(Kind::BFloat16, 5));
    let mut c = AdamW::new(half(), cfg(), AdamW::default_decay).unwrap();
    let err = c.load_state(&stepped_state(), 1).unwrap_err().to_string();
    assert!(err.contains("missing master/embed.weight"), "{err}");
}
