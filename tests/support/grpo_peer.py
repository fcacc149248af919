#!/usr/bin/env python3
"""TRL 1.16 GRPOTrainer / RLOOTrainer test peer: run real optimizer step(s) of the real TRL trainer on FIXED
prompts, completions and rewards (generation bypassed) and print the results as JSON on stdout.

    python tests/support/grpo_peer.py INPUT.json [--out OUT.json]

INPUT.json
    {
      "model_dir": "/path/to/hf/folder",           # config.json + model.safetensors (+ tokenizer files; without
                                                   # them a word-level stand-in is used, only for decoding)
      "trainer": "grpo" | "rloo",
      "config": {...},                             # any GRPOConfig / RLOOConfig field (loss_type, beta, epsilon,
                                                   # epsilon_high, scale_rewards, num_iterations,
                                                   # importance_sampling_level, learning_rate, max_grad_norm,
                                                   # max_completion_length, temperature, lr_scheduler_type, ...)
                                                   # unknown fields are an error.
      "prompts": [[ids...], ...],                  # P prompts (un-padded token ids)
      "completions": [[ids...], ...],              # P*G completions, G per prompt, grouped consecutively
      "rewards": [float, ...],                     # P*G rewards (one reward function, weight 1)
      "eos_token_id": int,
      # optional:
      "pad_token_id": int,                         # default: tokenizer pad, else eos (TRL does pad := eos)
      "num_steps": 1,                              # optimizer steps (same fixed batch re-fed each generation)
      "ref_model_dir": "/path",                    # load these weights into TRL's reference model (beta != 0)
      "cut_after_eos": true,                       # apply TRL's "drop everything after the first EOS" (what
                                                   # _generate_single_turn does to generated ids); false = use as-is
      "shuffle_batch": true,                       # TRL shuffles the generation batch before splitting it into
                                                   # micro-batches; false replaces that shuffle by the identity
      "output_safetensors": "/path/out.safetensors",   # write updated params there instead of into the JSON
      "include_params": true,                      # put updated params (name -> flat list) into the JSON
      "dump_grads": false,                         # include post-clip gradients (name -> flat list) per step
      "dump_token_level": true                     # include per-token logps / entropies / masks per step
    }

Peer-imposed settings (overridable through "config" except where noted): bf16=False (TRL's default is True, i.e.
CPU/GPU autocast to bf16!), use_cpu=True, gradient_checkpointing=False (numerically identical, only slower when on),
report_to="none", logging_steps=1, save_strategy="no", shuffle_dataset=False, dataloader_num_workers=0,
per_device_train_batch_size = P*G / gradient_accumulation_steps (not overridable), num_generations=G (not
overridable), a single reward function returning "rewards".

Everything else (padding, masks, old/ref log-probs, advantages, loss, backward, grad clipping, AdamW, LR schedule,
metrics) is TRL's / transformers' own code.  Runs offline on CPU with 1 torch thread (PEER_THREADS to change).
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile

_REAL_STDOUT = sys.stdout
sys.stdout = sys.stderr  # HF/TRL print log dicts and warnings: keep the real stdout for the one JSON result

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("PEER_THREADS", "1"))
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("PEER_THREADS", "1")))

import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402
from trl.trainer import grpo_trainer as _grpo_mod  # noqa: E402
from trl.trainer import rloo_trainer as _rloo_mod  # noqa: E402
from trl.trainer.utils import create_model_from_path  # noqa: E402

hf_logging.set_verbosity_error()


def _fail(msg):
    print(json.dumps({"error": msg}), file=_REAL_STDOUT, flush=True)
    sys.exit(2)


def _tolist(t):
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype.is_floating_point:
            t = t.double()
        return t.tolist()
    return t


def _clean(x):
    """JSON-safe: NaN/inf -> strings."""
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def cut_after_first_eos(ids, eos_ids):
    """Exactly what TRL's _generate_single_turn does to generated ids: keep tokens up to and including the first EOS."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


def build_trainer_class(base, kind, state):
    """Subclass `base` so that generation returns the fixed token ids; record what TRL computes."""

    class PeerTrainer(base):
        # ---- generation bypass: the two lowest-level hooks, so TRL's own _generate still decodes, measures lengths,
        # clipped_ratio, etc.
        def _tokenize_prompts(self, prompts):
            if len(prompts) != len(state["prompt_ids"]):
                raise RuntimeError(f"peer: got {len(prompts)} prompt rows, expected {len(state['prompt_ids'])}")
            return [list(p) for p in state["prompt_ids"]], None, {}

        if kind == "grpo":

            def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
                return [list(c) for c in state["completion_ids"]], None  # (completion_ids, sampling logprobs=None)

        else:

            def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
                return [list(c) for c in state["completion_ids"]]

        # ---- recording
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            B = out["completion_ids"].size(0)
            out["_peer_row"] = torch.arange(B)  # follows TRL's shuffle/split so we can restore the original order
            rec = {"advantages": _tolist(out["advantages"])}
            if state["dump_token_level"]:
                rec["completion_mask"] = _tolist(out["completion_mask"])
                rec["prompt_mask"] = _tolist(out["prompt_mask"])
                rec["prompt_ids_padded"] = _tolist(out["prompt_ids"])
                rec["completion_ids_padded"] = _tolist(out["completion_ids"])
                for k in ("old_per_token_logps", "ref_per_token_logps", "old_logps"):
                    if k in out:
                        rec[k] = _tolist(out[k])
            if "num_items_in_batch" in out:
                rec["num_items_in_batch"] = _tolist(out["num_items_in_batch"])
            state["generations"].append({"at_step": self.state.global_step + 1, **rec})
            return out

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
            res = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *a, **kw)
            if kw.get("compute_entropy"):  # the with-grad call made by _compute_loss
                state["_last_logps"] = (res[0].detach().clone(), res[1].detach().clone())
            return res

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            rows = inputs["_peer_row"].tolist()
            raw = float(loss.detach().item())
            # GRPO scales for gradient accumulation itself (loss_is_scaled_for_ga = True); for RLOO HF's
            # training_step divides by GA before backward. Record what is actually backpropagated.
            scaled = raw if self.loss_is_scaled_for_ga else raw / self.current_gradient_accumulation_steps
            mb = {"rows": rows, "loss": scaled, "loss_from_compute_loss": raw}
            if state["dump_token_level"] and state.get("_last_logps") is not None:
                order = sorted(range(len(rows)), key=lambda i: rows[i])
                logps, ent = state["_last_logps"]
                mb["per_token_logps"] = _tolist(logps[order])
                mb["entropies"] = _tolist(ent[order])
                mb["rows_sorted"] = [rows[i] for i in order]
            state["_step_microbatches"].append(mb)
            return loss

        def log(self, logs, start_time=None):
            before = dict(logs)
            super().log(logs, start_time)  # TRL merges its averaged metrics into `logs` in place
            merged = dict(logs)
            merged.update({k: v for k, v in before.items() if k not in merged})
            state["_logs"].append(merged)

    return PeerTrainer


class _StepRecorder(TrainerCallback):
    def __init__(self, state):
        self.s = state

    def on_pre_optimizer_step(self, args, st, control, model=None, optimizer=None, **kw):
        rec = {"lr_used": float(optimizer.param_groups[0]["lr"])}
        if self.s["dump_grads"] and model is not None:
            rec["grads_post_clip"] = {
                n: _tolist(p.grad.reshape(-1)) for n, p in model.named_parameters() if p.grad is not None
            }
        self.s["_pre_opt"].append(rec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("--out", help="also write the JSON result to this file")
    a = ap.parse_args()
    with open(a.input) as f:
        spec = json.load(f)

    kind = spec.get("trainer", "grpo").lower()
    if kind not in ("grpo", "rloo"):
        _fail(f"trainer must be 'grpo' or 'rloo', got {kind!r}")
    model_dir = spec["model_dir"]
    prompts = [list(map(int, p)) for p in spec["prompts"]]
    completions_in = [list(map(int, c)) for c in spec["completions"]]
    rewards = [float(r) for r in spec["rewards"]]
    eos = int(spec["eos_token_id"])
    P = len(prompts)
    if P == 0 or len(completions_in) % P != 0:
        _fail(f"{len(completions_in)} completions is not a multiple of {P} prompts")
    G = len(completions_in) // P
    B = P * G
    if len(rewards) != B:
        _fail(f"{len(rewards)} rewards for {B} completions")
    if any(len(p) == 0 for p in prompts) or any(len(c) == 0 for c in completions_in):
        _fail("empty prompt or completion (TRL cannot produce/handle an empty completion)")
    user_cfg = dict(spec.get("config", {}))
    num_steps = int(spec.get("num_steps", 1))

    # ---- tokenizer (TRL would call AutoProcessor.from_pretrained(model_dir, padding_side="left", truncation_side="left"))
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left", truncation_side="left")
    except Exception as e:  # no tokenizer files: a word-level stand-in ("t<id>"); only used to decode for logging
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import AutoConfig, PreTrainedTokenizerFast

        V = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
        print(f"peer: no tokenizer in {model_dir} ({type(e).__name__}); using a word-level stand-in", file=sys.stderr)
        wl = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(V)}, unk_token="t0"))
        wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="t0", padding_side="left")
        tok.eos_token = f"t{eos}"
    if tok.eos_token_id != eos:
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    if spec.get("pad_token_id") is not None:
        tok.pad_token = tok.convert_ids_to_tokens(int(spec["pad_token_id"]))

    # ---- model: the same loader TRL uses for a string model id (fp32, device_map None on CPU)
    model = create_model_from_path(model_dir)
    model.generation_config.eos_token_id = eos  # TRL: eos_token_ids = generation_config eos (+ tokenizer eos)

    eos_ids = {eos, tok.eos_token_id}
    completions = [cut_after_first_eos(c, eos_ids) for c in completions_in] if spec.get("cut_after_eos", True) else completions_in

    # ---- config
    Cfg = GRPOConfig if kind == "grpo" else RLOOConfig
    fields = {f.name for f in dataclasses.fields(Cfg)}
    unknown = sorted(k for k in user_cfg if k not in fields)
    if unknown:
        _fail(f"unknown {Cfg.__name__} fields: {unknown}")
    for k in ("per_device_train_batch_size", "num_generations", "generation_batch_size", "steps_per_generation"):
        if k in user_cfg:
            _fail(f"config field {k!r} is set by the peer")
    ga = int(user_cfg.get("gradient_accumulation_steps", 1))
    if B % ga != 0:
        _fail(f"batch {B} not divisible by gradient_accumulation_steps {ga}")
    if "max_completion_length" in user_cfg and max(len(c) for c in completions) > user_cfg["max_completion_length"]:
        _fail("a completion is longer than max_completion_length")
    outdir = tempfile.mkdtemp(prefix="trl-peer-")
    kwargs = dict(
        output_dir=outdir,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        seed=42,
    )
    kwargs.update(user_cfg)
    kwargs.update(
        per_device_train_batch_size=B // ga,
        gradient_accumulation_steps=ga,
        num_generations=G,
        max_steps=num_steps,
    )
    args = Cfg(**kwargs)

    state = {
        "prompt_ids": [prompts[i // G] for i in range(B)],
        "completion_ids": completions,
        "dump_token_level": bool(spec.get("dump_token_level", True)),
        "dump_grads": bool(spec.get("dump_grads", False)),
        "generations": [],
        "_step_microbatches": [],
        "_logs": [],
        "_pre_opt": [],
    }

    def fixed_reward(prompts=None, completions=None, completion_ids=None, **kw):
        got = [list(c) for c in completion_ids]
        if got != [list(c) for c in state["completion_ids"]]:
            raise RuntimeError("peer: reward function saw completions in an unexpected order")
        return list(rewards)

    fixed_reward.__name__ = "fixed_reward"

    # dataset: P text prompts; the RepeatSampler (shuffle_dataset=False) repeats each G times consecutively
    ds = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(P)]})

    if not spec.get("shuffle_batch", True):
        ident = lambda d: d  # noqa: E731
        _grpo_mod.shuffle_sequence_dict = ident
        _rloo_mod.shuffle_sequence_dict = ident

    Trainer = build_trainer_class(GRPOTrainer if kind == "grpo" else RLOOTrainer, kind, state)
    trainer = Trainer(
        model=model,
        reward_funcs=fixed_reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[_StepRecorder(state)],
    )
    if spec.get("ref_model_dir"):
        if trainer.ref_model is None:
            _fail("ref_model_dir given but the trainer has no reference model (beta == 0?)")
        ref = create_model_from_path(spec["ref_model_dir"])
        missing, unexpected = trainer.ref_model.load_state_dict(ref.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            _fail(f"ref_model_dir mismatch: missing={missing} unexpected={unexpected}")
        del ref

    # ---- run the REAL training loop: max_steps optimizer steps (HF prints its log dicts: keep stdout pure JSON)
    steps = []
    trainer.train()

    # group micro-batches: GA micro-batches per optimizer step
    mbs = state["_step_microbatches"]
    logs = [l for l in state["_logs"] if "loss" in l]  # per-step training logs
    for s in range(num_steps):
        step_mbs = mbs[s * ga : (s + 1) * ga]
        rec = {"step": s + 1}
        rec["loss_microbatches"] = [m["loss"] for m in step_mbs]
        rec["loss_from_compute_loss"] = [m["loss_from_compute_loss"] for m in step_mbs]
        rec["loss"] = sum(m["loss"] for m in step_mbs)  # what is backpropagated (GA-scaled pieces summed)
        if s < len(logs):
            rec["logged"] = logs[s]
        if s < len(state["_pre_opt"]):
            rec.update(state["_pre_opt"][s])
        if state["dump_token_level"]:
            rec["microbatches"] = [
                {k: m[k] for k in ("rows_sorted", "per_token_logps", "entropies") if k in m} for m in step_mbs
            ]
        steps.append(rec)

    gens = state["generations"]
    first_log = steps[0].get("logged", {}) if steps else {}
    result = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "trainer": kind,
        "num_prompts": P,
        "num_generations": G,
        "completion_lengths": [len(c) for c in completions],
        "effective_config": {
            k: getattr(args, k)
            for k in (
                "loss_type", "beta", "epsilon", "epsilon_high", "delta", "scale_rewards", "num_iterations",
                "importance_sampling_level", "learning_rate", "max_grad_norm", "max_completion_length", "temperature",
                "mask_truncated_completions", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1",
                "adam_beta2", "adam_epsilon", "optim", "gradient_accumulation_steps", "steps_per_generation",
                "use_bias_correction_kl", "normalize_advantages", "reward_clip_range", "top_entropy_quantile",
                "entropy_coef", "off_policy_mask_threshold", "bf16", "disable_dropout", "seed",
            )
            if hasattr(args, k)
        },
        "eos_token_ids": list(trainer.eos_token_ids),
        "pad_token_id": tok.pad_token_id,
        # convenience: first optimizer step
        "loss": steps[0]["loss"] if steps else None,
        "advantages": gens[0]["advantages"] if gens else None,
        "grad_norm": first_log.get("grad_norm"),
        "learning_rate": first_log.get("learning_rate"),
        "kl": first_log.get("kl"),
        "entropy": first_log.get("entropy"),
        "clip_ratio/low_mean": first_log.get("clip_ratio/low_mean"),
        "clip_ratio/high_mean": first_log.get("clip_ratio/high_mean"),
        "clip_ratio/region_mean": first_log.get("clip_ratio/region_mean"),
        "steps": steps,
        "generations": gens,
    }
    for k in list(result["effective_config"]):
        v = result["effective_config"][k]
        if not isinstance(v, (int, float, str, bool, type(None), list, tuple)):
            result["effective_config"][k] = str(v)
    named = [(n, p) for n, p in trainer.model.named_parameters()]
    if spec.get("output_safetensors"):
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous() for n, p in named}, spec["output_safetensors"])
        result["params_path"] = spec["output_safetensors"]
    if spec.get("include_params", not spec.get("output_safetensors")):
        result["params"] = {n: _tolist(p.reshape(-1)) for n, p in named}
    shutil.rmtree(outdir, ignore_errors=True)

    text = json.dumps(_clean(result))
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text, file=_REAL_STDOUT, flush=True)


if __name__ == "__main__":
    main()
