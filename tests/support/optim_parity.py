"""The PyTorch reference for policies/tests/optim.rs.

usage: optim_parity.py IN.safetensors OUT.safetensors

IN (written by the Rust test) holds `param/<name>` (initial values),
`grad/<step>/<name>` (the gradient of every parameter at every step) and, in
its metadata, `config`: JSON with lr, beta1, beta2, eps, weight_decay,
max_norm, names (parameter order), schedule (the run's: {kind, warmup_steps,
total_steps, steps}) and schedules (more of them, only to compare).

Each step runs what a transformers-style loop does: zero_grad, set the grads,
torch.nn.utils.clip_grad_norm_, optimizer.step, scheduler.step, with
torch.optim.AdamW (single-tensor path; weight decay for 2-D non-bias tensors,
0 for the rest) and transformers' get_*_schedule_with_warmup. OUT holds
`param/<step>/<name>` after each step, the final `exp_avg/<name>` and
`exp_avg_sq/<name>`, `norm` and `lr` per step (f64), and `schedule/<i>`: the
lr LambdaLR gives at each step for schedules[i], base lr `lr`.
"""

import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)


def make_schedule(optimizer, kind, warmup_steps, total_steps):
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    raise ValueError(f"unknown schedule kind {kind!r}")


def decays(name, param):
    return param.ndim >= 2 and not (name == "bias" or name.endswith(".bias"))


def train(cfg, tensors):
    names = cfg["names"]
    params = {n: tensors[f"param/{n}"].clone().requires_grad_() for n in names}
    groups = [
        {"params": [p for n, p in params.items() if decays(n, p)]},
        {"params": [p for n, p in params.items() if not decays(n, p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg["lr"],
        betas=(cfg["beta1"], cfg["beta2"]),
        eps=cfg["eps"],
        weight_decay=cfg["weight_decay"],
        foreach=False,
    )
    run = cfg["schedule"]
    scheduler = make_schedule(optimizer, run["kind"], run["warmup_steps"], run["total_steps"])
    out, norms, lrs = {}, [], []
    for step in range(run["steps"]):
        optimizer.zero_grad()
        for n, p in params.items():
            p.grad = tensors[f"grad/{step}/{n}"].clone()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg["max_norm"], foreach=False)
        norms.append(norm.item())
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        for n, p in params.items():
            out[f"param/{step}/{n}"] = p.detach().clone()
    for n, p in params.items():
        state = optimizer.state[p]
        out[f"exp_avg/{n}"] = state["exp_avg"]
        out[f"exp_avg_sq/{n}"] = state["exp_avg_sq"]
    out["norm"] = torch.tensor(norms, dtype=torch.float64)
    out["lr"] = torch.tensor(lrs, dtype=torch.float64)
    return out


def schedule_lrs(base_lr, spec):
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = make_schedule(optimizer, spec["kind"], spec["warmup_steps"], spec["total_steps"])
    lrs = []
    for _ in range(spec["steps"]):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return torch.tensor(lrs, dtype=torch.float64)


def main(src, dst):
    with safe_open(src, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = train(cfg, tensors)
    for i, spec in enumerate(cfg["schedules"]):
        out[f"schedule/{i}"] = schedule_lrs(cfg["lr"], spec)
    save_file(out, dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
