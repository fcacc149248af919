"""The peer side of `medzero bench`: HF transformers / PyTorch on the same
checkpoint, the same threads and the same shapes. Prints one JSON object.

  bench_peer.py MODEL_DIR SPEC.json
SPEC: {"threads": 2, "prompt_len": 64, "new_tokens": 64, "batches": [1, 32],
       "train_batch": 32, "train_len": 64, "train_steps": 5, "repeats": 3}
"""
import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def best(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(model_dir, spec_path):
    spec = json.load(open(spec_path))
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "decode": {}}
    new = spec["new_tokens"]
    for b in spec["batches"]:
        ids = torch.randint(3, vocab, (b, spec["prompt_len"]))
        for cache in (True, False):
            def run():
                with torch.no_grad():
                    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=new, min_new_tokens=new, use_cache=cache,
                                   pad_token_id=0, eos_token_id=None)
            secs = best(run, spec["repeats"] if cache else 1)
            out["decode"][f"b{b}-{'cache' if cache else 'nocache'}"] = b * new / secs
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, vocab, (spec["train_batch"], spec["train_len"]))

    def step():
        for _ in range(spec["train_steps"]):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()

    secs = best(step, spec["repeats"])
    out["train_tokens_per_s"] = spec["train_steps"] * ids.numel() / secs
    out["trl"], out["dpo_tokens_per_s"] = dpo_tokens_per_s(model_dir, spec)
    # GRPO is benchmarked on the quickstart student only (as on medzero's side).
    out["grpo_tokens_per_s"] = None if spec.get("model") else grpo_tokens_per_s(model_dir, spec, vocab)
    json.dump(out, sys.stdout)


def dpo_tokens_per_s(model_dir, spec):
    """TRL's DPOTrainer steps (frozen reference model, sigmoid loss) on
    train_batch/2 pairs of train_len/2-token prompts and completions: tokens
    through the policy per second of the fastest step after the first."""
    import random
    import tempfile

    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    specials = set(tok.all_special_ids)
    words = [w for w, i in sorted(tok.get_vocab().items(), key=lambda x: x[1]) if i not in specials and w.isalpha()]
    g = random.Random(0)
    half, pairs, steps = spec["train_len"] // 2, spec["train_batch"] // 2, spec["train_steps"] + 1

    def text(n):
        return " ".join(g.choice(words) for _ in range(n))

    # Completions of half-1 words: TRL appends the EOS.
    rows = [{"prompt": text(half), "chosen": " " + text(half - 1), "rejected": " " + text(half - 1)}
            for _ in range(pairs * steps)]
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as d:
        cfg = trl.DPOConfig(output_dir=d, per_device_train_batch_size=pairs, max_steps=steps, learning_rate=1e-4,
                            lr_scheduler_type="constant", report_to="none", save_strategy="no", disable_tqdm=True,
                            logging_strategy="no", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                            dataloader_num_workers=0, max_length=None, model_init_kwargs={"dtype": "float32"})
        trainer = trl.DPOTrainer(model=model_dir, args=cfg, train_dataset=Dataset.from_list(rows),
                                 processing_class=tok, callbacks=[Clock()])
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # stdout carries the JSON
        trainer.train()
        data = trainer.train_dataset
        per_pair = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in data) / len(data)
    return trl.__version__, pairs * per_pair / min(times[1:])


def grpo_tokens_per_s(model_dir, spec, vocab):
    """TRL's GRPOTrainer steps with generation bypassed (fixed completions,
    fixed rewards): train_batch completions in groups of 8, train_len/2-token
    prompts and completions, TRL's defaults (dapo, beta 0): prompt+completion
    tokens per second of the fastest step after the first."""
    import tempfile

    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    G, half, steps = 8, spec["train_len"] // 2, spec["train_steps"] + 1
    B = max(spec["train_batch"], G)
    P = B // G
    gen = torch.Generator().manual_seed(3)
    avoid = set(tok.all_special_ids)
    def draw(n):
        ids = torch.randint(5, vocab, (n, half), generator=gen).tolist()
        return [[t if t not in avoid else 5 for t in row] for row in ids]
    prompts, completions = draw(P), draw(B)
    rewards = [float(i % 2) for i in range(B)]
    times = []

    class Bypass(trl.GRPOTrainer):
        def _tokenize_prompts(self, prompts_text):
            return [prompts[i // G] for i in range(B)], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            return [list(c) for c in completions], None

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    def fixed_reward(completions=None, **kw):
        return list(rewards)

    with tempfile.TemporaryDirectory() as d:
        cfg = trl.GRPOConfig(output_dir=d, per_device_train_batch_size=B, num_generations=G, max_steps=steps,
                             learning_rate=1e-4, lr_scheduler_type="constant", max_completion_length=half,
                             report_to="none", save_strategy="no", disable_tqdm=True, logging_strategy="no",
                             use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                             dataloader_num_workers=0, shuffle_dataset=False, model_init_kwargs={"dtype": "float32"})
        trainer = Bypass(model=model_dir, reward_funcs=fixed_reward, args=cfg,
                         train_dataset=Dataset.from_dict({"prompt": [f"p{i}" for i in range(P)]}),
                         processing_class=tok, callbacks=[Clock()])
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        trainer.train()
    return B * 2 * half / min(times[1:])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
