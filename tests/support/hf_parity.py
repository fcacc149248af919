"""The peer side of medzero's parity tests: HF transformers on the same inputs.

  hf_parity.py make ARCH DIR          tiny random model (qwen2 | llama) saved in HF layout, with a tokenizer.json
  hf_parity.py run DIR REQUEST.json   logits of a right-padded batch and greedy tokens, as JSON on stdout

REQUEST: {"batch": [[ids...], ...], "prompt": [ids...], "new_tokens": 32}
"""
import json
import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

VOCAB = 97


def make(arch, out):
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )
    if arch == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=True, rope_theta=10000.0, **common)
    elif arch == "llama":
        # Untied head, biases everywhere and Llama-3 RoPE scaling: the paths Qwen2 does not take.
        cfg = LlamaConfig(
            tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64},
            **common,
        )
    else:
        raise SystemExit(f"unknown arch {arch}")
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    # Random init is N(0, 0.02): scale up so logits are not all near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    vocab = {"<pad>": 0, "<|endoftext|>": 1}
    vocab.update({f"w{i}": i for i in range(2, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<|endoftext|>"])
    tok.save(f"{out}/tokenizer.json")


def run(model_dir, request):
    req = json.load(open(request))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    batch = req["batch"]
    t = max(len(s) for s in batch)
    ids = torch.tensor([s + [0] * (t - len(s)) for s in batch])
    mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in batch])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        prompt = torch.tensor([req["prompt"]])
        gen = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
            max_new_tokens=req["new_tokens"], eos_token_id=None, pad_token_id=0,
        )
    out = {
        "logits": [[logits[b, i].tolist() for i in range(len(s))] for b, s in enumerate(batch)],
        "greedy": gen[0, prompt.shape[1]:].tolist(),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
