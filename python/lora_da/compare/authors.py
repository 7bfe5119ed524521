"""The LoRA-DA authors' research pipeline, re-implemented: the baseline of the benchmarks
and the numerics of ``lora-da compare``'s "LoRA-DA authors" arm.

This re-implements the recipe of the authors' public code (github.com/zqy0126/LoRA-DA)
as described in SPEC.md §2–§3 and the project's issue; it is written from that
description, no code is copied. It is the speed/memory BASELINE the GPU end-to-end
benchmark (``benches/bench_e2e.py``) compares `lora_da` against, so it keeps the authors'
choices even where they are slow or inexact: batch size 1, a separate gradient pass, Fisher
passes over 8 decoder layers at a time (ceil(L/8) passes over the data), one float32 `Z` per
module (no sharing between q/k/v), dense float32 solve with `torch.lobpcg` (10 iters).

Its solve alone, :func:`solve_float32`, is the "LoRA-DA authors" arm of
:mod:`lora_da.compare.arms` and the "float32 recipe" of ``benches/bench_conformance.py``;
:func:`authors_pipeline` is the whole pipeline ``benches/bench_e2e.py`` times. It lives in
the package so that every arm ``lora-da compare`` lists runs wherever lora-da is installed.
"""

from __future__ import annotations

import math
import re
import time

import torch

# SPEC §3's defaults are the authors' published configuration: the recipe reads them from their one source
from lora_da._core import SOLVE_DEFAULTS

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _batch(sample, device):
    ids, mask = sample["input_ids"].to(device), sample["attention_mask"].to(device)
    labels = ids.masked_fill(mask == 0, -100)  # padding never counts in the loss
    return ids, mask, labels


@torch.no_grad()
def solve_float32(Z, y, T, G, *, n_pop, rank, alpha, beta, gamma, damping, seed=0):
    """One module, dense float32 on the statistics' device; returns (A, B, fell_back)."""
    n = Z.shape[0]
    Z, y, G = Z / T, y / T, G.float()
    L = torch.linalg.cholesky(Z + damping * torch.eye(n, device=Z.device))
    z_inv = torch.cholesky_inverse(L)
    y_t = 1.0 / (y + damping)
    delta = -(z_inv @ G.T) * y_t[None, :]  # == -Zinv Ḡᵀ diag(ỹ), without an m×m diag
    sigma = torch.svd_lowrank(delta, q=1, niter=16)[1][0]
    d_hat = delta / sigma
    c = y_t.sum() / n_pop / sigma**2
    omega = -alpha * (d_hat @ d_hat.T) + beta * c * z_inv
    gen = torch.Generator(device=Z.device).manual_seed(seed)
    X = torch.randn(n, rank, generator=gen, device=Z.device)
    fell_back = False
    try:
        V = torch.lobpcg(omega, k=rank, X=X, largest=False, niter=10)[1]
        if not torch.isfinite(V).all():  # a silent NaN is as bad as an exception
            raise RuntimeError("lobpcg returned non-finite vectors")
    except Exception:
        V, fell_back = torch.linalg.eigh(omega)[1][:, :rank], True
    s = math.sqrt(gamma)
    return V.T / s, (d_hat.T @ V) / s, fell_back


def authors_pipeline(model, samples, target_suffixes, *, n_pop, rank=8, alpha=SOLVE_DEFAULTS["alpha"],
                     beta=SOLVE_DEFAULTS["beta"], gamma=SOLVE_DEFAULTS["gamma"], damping=SOLVE_DEFAULTS["damping"],
                     layers_per_pass=8, timer=None) -> dict:
    device = next(model.parameters()).device
    targets = {name: mod for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in target_suffixes}
    if not targets or any(_LAYER.search(n) is None for n in targets):
        raise ValueError(f"need Linear targets inside `layers.<i>.`; got {sorted(targets)}")
    layer_of = {name: int(_LAYER.search(name).group(1)) for name in targets}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    inits, fallbacks, handles, seconds = {}, 0, [], {}
    try:
        model.eval()
        # --- gradient pass: Ḡ accumulates in the parameters' own dtype (bf16 on GPU) ---
        t0 = _clock(device)
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for mod in targets.values():
            mod.weight.requires_grad_(True)
        with torch.enable_grad():
            for s in samples:
                ids, mask, labels = _batch(s, device)
                model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads = {}
        for name, mod in targets.items():
            grads[name] = mod.weight.grad.div_(len(samples))  # the mean, still bf16
            mod.weight.grad = None
            mod.weight.requires_grad_(False)
        seconds["gradient"] = _clock(device) - t0

        # --- Fisher passes: 8 layers at a time, each a full pass over the data ---
        t0 = _clock(device)
        cur = {}  # the current sample's valid-token mask, read by the hooks
        groups = sorted({li // layers_per_pass for li in layer_of.values()})
        for grp in groups:
            names = [n for n in targets if layer_of[n] // layers_per_pass == grp]
            stats = {}
            for n in names:
                w = targets[n].weight
                stats[n] = [torch.zeros(w.shape[1], w.shape[1], device=device),
                            torch.zeros(w.shape[0], device=device), 0]

                def fwd(mod, inp, out, st=stats[n]):
                    m = cur["mask"]
                    x = inp[0][0][m].detach().float()  # detach: Z must not grow an autograd graph
                    st[0].addmm_(x.T, x)
                    st[2] += x.shape[0]

                    def bwd(g):
                        st[1].add_(g[0][m].float().square().sum(0))
                    out.register_hook(bwd)
                handles.append(targets[n].register_forward_hook(fwd))
                # only this group's weights need grad: the graph (and backward) starts at the group
                w.requires_grad_(True)
            with torch.enable_grad():
                for s in samples:
                    ids, mask, labels = _batch(s, device)
                    cur["mask"] = mask[0].bool()
                    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            for h in handles:
                h.remove()
            handles.clear()
            for n in names:
                targets[n].weight.requires_grad_(False)
                targets[n].weight.grad = None
                Z, y, T = stats.pop(n)
                A, B, fb = solve_float32(Z, y, T, grads.pop(n), n_pop=n_pop, rank=rank, alpha=alpha, beta=beta,
                                  gamma=gamma, damping=damping)
                inits[n] = (A.cpu(), B.cpu())
                fallbacks += fb
                del Z, y, A, B
            del stats
        seconds["fisher_and_solve"] = _clock(device) - t0
    finally:
        for h in handles:
            h.remove()
        for p, rg, g in saved:
            p.requires_grad_(rg)
            p.grad = g
        model.train(was_training)
    return {"inits": inits, "seconds": seconds, "lobpcg_fallbacks": fallbacks}
