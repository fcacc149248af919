"""The peer side of medzero's preference-loss parity tests: ONE optimizer step of the real TRL trainer.

  trl_parity.py --model MODEL_DIR --spec SPEC.json --out OUT_DIR

SPEC: {"trainer": "dpo" | "kto", "beta": 0.1, "lr": 1e-3, "max_grad_norm": 1.0, "examples": [...],
       "ref_model": null (the policy's checkpoint again) | another model folder with the same vocabulary,
       dpo: "loss_type": "sigmoid" (default) | "ipo" | "robust" | "hinge" | ..., "label_smoothing": 0.0,
            "rpo_alpha": null | float, examples [{"prompt": str, "chosen": str, "rejected": str}, ...]
       kto: "loss_type": "kto" (default), "desirable_weight": 1.0, "undesirable_weight": 1.0,
            examples [{"prompt": str, "completion": str, "label": bool}, ...]}
TRL joins prompt and completion as strings with no separator: start completions with a space.

Writes OUT_DIR/model (the policy after the step, safetensors) and OUT_DIR/result.json: versions, the token ids TRL
fed to the model in batch order, every metric TRL logged for the step, and notes with the exact formulas. NOTES was
read from the source of trl 1.16.0 / transformers 5.23 and checked by hand there; re-check it on an upgrade.
"""
import argparse
import json
import os
import sys
import tempfile

# Hide any GPU before torch loads: use_cpu covers the Trainer, this also covers TRL loading the policy and the
# reference by path (device_map "auto" unless the process looks CPU-only).
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMMON_KEYS = {"trainer", "loss_type", "beta", "lr", "max_grad_norm", "examples", "ref_model"}
KEYS = {
    "dpo": COMMON_KEYS | {"label_smoothing", "rpo_alpha"},
    "kto": COMMON_KEYS | {"desirable_weight", "undesirable_weight"},
}
EXAMPLE_KEYS = {
    "dpo": {"prompt": str, "chosen": str, "rejected": str},
    "kto": {"prompt": str, "completion": str, "label": bool},
}

NOTES = {
    "common": (
        "Tokenization: TRL tokenizes the prompt string alone and the string prompt+completion+eos_token (plain "
        "concatenation, no separator; the eos_token string is appended unless the completion already ends with it), "
        "with add_special_tokens=True (so a BOS only if tokenizer.json's post-processor adds one). The completion ids "
        "are what follows the longest common prefix of the two tokenizations. Each row = prompt_ids + completion_ids, "
        "right padded with pad_token_id, attention_mask 1 on real tokens, no truncation (max_length=None). "
        "logp(row) = SUM over completion tokens t of log_softmax(logits[t-1])[id_t], float32, not length normalised "
        "unless stated below; policy with grad, reference = the same checkpoint loaded again, frozen, no_grad. "
        "The logged 'loss' is the loss at the initial parameters (the forward of the step, before optimizer.step), "
        "unrounded. 'grad_norm' is the global L2 norm of all gradients BEFORE clipping (torch clip_grad_norm_ over "
        "model.parameters(), a tied embedding/lm_head weight counted once; grads scaled by "
        "min(1, max_grad_norm/(norm+1e-6))). Then one torch.optim.AdamW step (not fused, weight_decay 0, betas "
        "0.9/0.999, eps 1e-8, constant lr): with bias correction the first step is p -= lr*g/(|g|+eps) for the "
        "clipped gradient g, about lr*sign(g), so the weights check the gradient's signs and grad_norm its scale. "
        "'learning_rate' is the lr of the step. 'entropy' = mean over completion tokens of the policy's predictive "
        "entropy; 'logits/*' = mean over completion tokens of the mean logit over the vocabulary; 'num_tokens' = sum "
        "of attention_mask of the main rows; 'epoch' and 'step' are bookkeeping. "
        "The reference is the initial policy, so every log-ratio is exactly 0 at this step: rewards are 0, kl is 0 "
        "and the loss is a constant of the loss type (sigmoid/robust ln 2, hinge 1, ipo 1/(4 beta^2), kto 0.5 * the "
        "mean example weight, rpo adds rpo_alpha * the chosen NLL); only the gradient tells the formulas apart."
    ),
    "dpo": (
        "DPO: the model sees 2B rows, [prompt+chosen_1..B, prompt+rejected_1..B]. With pc = logp_policy(chosen) - "
        "logp_ref(chosen), pr the same for rejected, d = pc - pr, ls = label_smoothing, the per-pair loss is "
        "sigmoid: -logsigmoid(beta*d); hinge: relu(1 - beta*d); "
        "ipo: (pc/Nc - pr/Nr - 1/(2*beta))^2 with Nc, Nr = completion token counts (eos included, clamped >= 1): the "
        "log-ratios are averaged per token, beta is IPO's tau; "
        "robust: (-(1-ls)*logsigmoid(beta*d) + ls*logsigmoid(-beta*d)) / (1 - 2*ls). "
        "loss = mean over the B pairs. rpo_alpha: TRL 1.16 has no such option; it is run as loss_type [<loss>, 'sft'] "
        "with loss_weights [1, rpo_alpha], sft = -(sum of the policy log-probs of ALL chosen completion tokens of the "
        "batch) / (their count), a token mean over the batch, not a mean of per-sequence means; loss = mean_pairs + "
        "rpo_alpha * sft. Metrics: rewards/chosen = mean(beta*pc), rewards/rejected = mean(beta*pr), rewards/margins "
        "= mean(beta*(pc - pr)), rewards/accuracies = mean(beta*pc > beta*pr) (strict), logps/chosen|rejected = mean "
        "policy logp, mean_token_accuracy = share of chosen completion tokens that are the policy's argmax."
    ),
    "kto": (
        "KTO: B rows prompt_i + completion_i, and B 'KL' rows prompt_i + completion_(i-1) (completions rotated by one "
        "inside the batch, row 0 takes completion_(B-1)). With r_i = logp_policy(completion_i) - logp_ref(...): "
        "z = max(0, mean_i(logp_policy(KL row i) - logp_ref(KL row i))), the policy KL logps computed under no_grad, "
        "so z is a constant (no gradient), clamped at 0 after the batch mean. Desirable (label true): "
        "l_i = desirable_weight * (1 - sigmoid(beta*(r_i - z))); undesirable: l_i = undesirable_weight * "
        "(1 - sigmoid(beta*(z - r_i))); loss = mean of l_i over all B examples (divided by B, not by the weights). "
        "(loss_type 'apo_zero_unpaired': 1 - sigmoid(beta*r) / sigmoid(beta*r), no KL rows.) Metrics: kl = z; "
        "rewards/chosen|rejected = mean beta*r_i over desirable|undesirable, rewards/margins = their difference "
        "(only if both kinds are present); logps/chosen|rejected = mean policy logp; no rewards/accuracies."
    ),
}


def fail(msg):
    sys.exit(f"trl_parity.py: bad spec: {msg}")


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_spec(path):
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read {path}: {e}")
    if not isinstance(spec, dict):
        fail("top level must be an object")
    kind = spec.get("trainer")
    if kind not in KEYS:
        fail(f'"trainer" must be "dpo" or "kto", got {kind!r}')
    # Unknown keys are refused so that a typo cannot silently fall back to a TRL default.
    unknown = set(spec) - KEYS[kind]
    if unknown:
        fail(f"unknown keys for {kind}: {sorted(unknown)}")
    for key in ("lr", "max_grad_norm"):
        if key not in spec:
            fail(f'"{key}" is required')
    for key in ("beta", "lr", "max_grad_norm", "label_smoothing", "desirable_weight", "undesirable_weight"):
        if key in spec and not is_number(spec[key]):
            fail(f'"{key}" must be a number, got {spec[key]!r}')
    if spec.get("rpo_alpha") is not None and not is_number(spec["rpo_alpha"]):
        fail(f'"rpo_alpha" must be null or a number, got {spec["rpo_alpha"]!r}')
    if spec.get("ref_model") is not None and not os.path.isdir(spec["ref_model"]):
        fail(f'"ref_model" must be a model folder, got {spec["ref_model"]!r}')
    if "loss_type" in spec and not isinstance(spec["loss_type"], str):
        fail(f'"loss_type" must be a string, got {spec["loss_type"]!r}')
    examples = spec.get("examples")
    if not isinstance(examples, list) or not examples:
        fail('"examples" must be a non-empty list')
    want = EXAMPLE_KEYS[kind]
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or set(ex) != set(want):
            fail(f"examples[{i}] must have exactly the keys {sorted(want)}")
        for k, t in want.items():
            if not isinstance(ex[k], t):
                fail(f"examples[{i}].{k} must be a {t.__name__}")
    if kind == "kto" and spec.get("loss_type", "kto") == "kto" and len(examples) < 2:
        fail("kto needs at least 2 examples (its KL term pairs each prompt with another example's completion)")
    return kind, spec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    kind, spec = load_spec(a.spec)
    examples = spec["examples"]
    n = len(examples)

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # Not AutoTokenizer: in transformers 5 it picks the class of the MODEL's config (Qwen2Tokenizer, ...) and
    # rebuilds that tokenizer from the vocabulary, silently dropping a word-level tokenizer.json (every word then
    # encodes to nothing). PreTrainedTokenizerFast runs tokenizer.json as written, as medzero does; eos/pad still
    # come from tokenizer_config.json.
    tok = PreTrainedTokenizerFast.from_pretrained(a.model)
    if tok.eos_token is None or tok.pad_token is None:
        sys.exit("trl_parity.py: the tokenizer needs an eos and a pad token (tokenizer_config.json)")
    raw = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    texts = [ex["prompt"] for ex in examples]
    texts += [ex["prompt"] + ex[k] + tok.eos_token for ex in examples for k in ("chosen", "rejected", "completion")
              if k in ex]
    for t in texts:
        if tok(t)["input_ids"] != raw.encode(t).ids:
            sys.exit(f"trl_parity.py: transformers and tokenizer.json disagree on {t!r}")

    with tempfile.TemporaryDirectory() as scratch:
        common = dict(
            output_dir=scratch,  # TrainingArguments wants one; nothing is saved there (save_strategy "no")
            per_device_train_batch_size=n, gradient_accumulation_steps=1, max_steps=1,
            learning_rate=float(spec["lr"]), lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            max_grad_norm=float(spec["max_grad_norm"]), seed=0, data_seed=0,
            # transformers' default is "random": the one batch would hold every example, but shuffled.
            train_sampling_strategy="sequential",
            logging_strategy="steps", logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
            use_cpu=True, bf16=False, fp16=False,  # TRL defaults bf16 to True
            gradient_checkpointing=False,  # TRL defaults it to True
            dataloader_num_workers=0,  # the collator must run in this process for the batch to be recorded
            disable_dropout=True, max_length=None, pad_to_multiple_of=None, precompute_ref_log_probs=False,
            model_init_kwargs={"dtype": "float32"}, beta=float(spec.get("beta", 0.1)),
        )
        if kind == "dpo":
            loss_type, loss_weights = [spec.get("loss_type", "sigmoid")], [1.0]
            if spec.get("rpo_alpha") is not None:
                # TRL 1.16 dropped rpo_alpha: RPO is the DPO loss plus a weighted "sft" (chosen NLL) term.
                loss_type.append("sft")
                loss_weights.append(float(spec["rpo_alpha"]))
            cfg = trl.DPOConfig(**common, loss_type=loss_type, loss_weights=loss_weights,
                                label_smoothing=float(spec.get("label_smoothing", 0.0)), padding_free=False)
            trainer_cls = trl.DPOTrainer
        else:
            cfg = trl.KTOConfig(**common, loss_type=spec.get("loss_type", "kto"),
                                desirable_weight=float(spec.get("desirable_weight", 1.0)),
                                undesirable_weight=float(spec.get("undesirable_weight", 1.0)))
            trainer_cls = trl.KTOTrainer

        # Paths, not loaded models, so TRL loads them its own way; ref_model=None makes TRL load the same
        # checkpoint again as the frozen reference. A different reference makes the log-ratios non-zero, so
        # the step-1 loss itself tells the formulas apart.
        ref_model = None
        if spec.get("ref_model") is not None:
            # TRL takes a reference path for the policy only; a reference is handed over loaded.
            ref_model = transformers.AutoModelForCausalLM.from_pretrained(spec["ref_model"], dtype=torch.float32)
            ref_model.eval()
        trainer = trainer_cls(model=a.model, ref_model=ref_model, args=cfg, train_dataset=Dataset.from_list(examples),
                              processing_class=tok)

        # What the collator is handed are exactly the per-example ids of the batch, in batch order.
        batches = []
        collate = trainer.data_collator

        def recording_collator(features):
            batches.append([dict(f) for f in features])
            return collate(features)

        trainer.data_collator = recording_collator
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # keeps stdout empty
        trainer.train()

    if len(batches) != 1 or len(batches[0]) != n:
        sys.exit(f"trl_parity.py: expected one batch of {n} examples, the collator saw {[len(b) for b in batches]}")
    batch = batches[0]
    step_logs = [e for e in trainer.state.log_history if "loss" in e]
    if len(step_logs) != 1:
        sys.exit(f"trl_parity.py: expected one logged step, got {trainer.state.log_history}")

    if kind == "dpo":
        keys = ("prompt_ids", "chosen_ids", "rejected_ids")
        tokenized = [{k: b[k] for k in keys} for b in batch]
    else:
        keys = ("prompt_ids", "completion_ids", "label")
        tokenized = [{"prompt_ids": b["prompt_ids"], "completion_ids": b["completion_ids"], "label": bool(b["label"]),
                      # TRL's KL row reuses the example's own prompt with the rotated completion.
                      "kl_prompt_ids": b["prompt_ids"] if "KL_completion_ids" in b else None,
                      "kl_completion_ids": b.get("KL_completion_ids")} for b in batch]
    processed = trainer.train_dataset
    in_order = len(processed) == n and all(batch[i][k] == processed[i][k] for i in range(n) for k in keys)

    notes = [NOTES["common"], NOTES[kind]]
    notes.append("Batch order: the spec's order (checked against TRL's processed dataset)." if in_order else
                 "Batch order: NOT the spec's order; 'tokenized' lists the order actually used.")
    # A prompt whose last word merges with the completion's first is cut by TRL at the divergence.
    glued = [i for i, (ex, t) in enumerate(zip(examples, tokenized))
             if tok(ex["prompt"])["input_ids"] != t["prompt_ids"]]
    if glued:
        print(f"trl_parity.py: warning: examples {glued}: prompt and completion merge across the boundary",
              file=sys.stderr)
        notes.append(f"WARNING: for examples {glued} the tokenized prompt is not a prefix of prompt+completion; TRL "
                     "cut prompt_ids where they diverge.")
    if tok.bos_token_id is not None:
        notes.append(f"The tokenizer has bos_token_id {tok.bos_token_id}; prompt_ids show whether it was added.")
    notes.append("model/ is save_pretrained output: a tied lm_head.weight is not stored (it is the embedding).")

    os.makedirs(a.out, exist_ok=True)
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(os.path.join(a.out, "model"))
    result = {
        "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "trainer": kind,
        "trl_args": {
            "loss_type": cfg.loss_type, "loss_weights": getattr(cfg, "loss_weights", None), "beta": cfg.beta,
            "label_smoothing": getattr(cfg, "label_smoothing", None),
            "desirable_weight": getattr(cfg, "desirable_weight", None),
            "undesirable_weight": getattr(cfg, "undesirable_weight", None),
            "learning_rate": cfg.learning_rate, "max_grad_norm": cfg.max_grad_norm,
            "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
        },
        "tokenized": tokenized,
        "metrics": step_logs[0],
        "notes": " ".join(notes),
    }
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
