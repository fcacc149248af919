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
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
