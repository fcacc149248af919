"""The peer side of the real-model parity tests: transformers on SmolLM2-135M-Instruct.

  real_model.py DIR REQUEST.json   -> JSON on stdout

REQUEST: {"chats": [{"messages": [...], "add_generation_prompt": bool, "template": str|null}],
          "greedy": {"prompt": [ids], "new_tokens": 32},
          "loglik": [{"context": str, "continuations": [str]}]}
Answer:  {"chats": [{"text": str, "ids": [int]}],
          "greedy": {"tokens": [int], "logprobs": [float]},
          "loglik": [[sum of log p per continuation]]}
Log-likelihoods split tokens as lm-evaluation-harness does: the context
encoded alone, the continuation as what encode(context + continuation)
holds past it.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.manual_seed(0)
torch.set_num_threads(2)
model_dir, request = sys.argv[1], json.load(open(sys.argv[2]))
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def ids_of(out):
    # transformers 5 returns a BatchEncoding from tokenize=True; 4.x a list.
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


answer = {"chats": []}
for chat in request["chats"]:
    kwargs = dict(add_generation_prompt=chat["add_generation_prompt"])
    if chat.get("template"):
        kwargs["chat_template"] = chat["template"]
    text = tok.apply_chat_template(chat["messages"], tokenize=False, **kwargs)
    ids = ids_of(tok.apply_chat_template(chat["messages"], tokenize=True, **kwargs))
    answer["chats"].append({"text": text, "ids": ids})

with torch.no_grad():
    g = request["greedy"]
    prompt = torch.tensor([g["prompt"]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=g["new_tokens"],
                         do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    tokens = out[0, prompt.shape[1]:]
    logp = model(out).logits[0, prompt.shape[1] - 1:-1].log_softmax(-1)
    answer["greedy"] = {
        "tokens": tokens.tolist(),
        "logprobs": logp.gather(-1, tokens[:, None])[:, 0].tolist(),
    }

    answer["loglik"] = []
    for item in request["loglik"]:
        ctx = tok(item["context"], add_special_tokens=False)["input_ids"]
        sums = []
        for c in item["continuations"]:
            whole = tok(item["context"] + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            x = torch.tensor([whole])
            lp = model(x).logits[0, len(ctx) - 1:-1].log_softmax(-1)
            sums.append(float(lp.gather(-1, torch.tensor(cont)[:, None]).sum()))
        answer["loglik"].append(sums)

json.dump(answer, sys.stdout)
