"""Baseline: the LoRA-DA authors' research pipeline, re-implemented for benchmarks.

This re-implements the recipe of the authors' public code (github.com/zqy0126/LoRA-DA)
as described in SPEC.md §2–§3 and the project's issue; it is written from that
description, no code is copied. It is the speed/memory BASELINE the GPU end-to-end
benchmark compares `lora_da` against, so it keeps the authors' choices even where
they are slow or inexact: batch size 1, a separate gradient pass, Fisher passes over
8 decoder layers at a time (ceil(L/8) passes over the data), one float32 `Z` per
module (no sharing between q/k/v), dense float32 solve with `torch.lobpcg` (10 iters).
"""

from __future__ import annotations

import math
import re
import time

import torch

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
def _solve(Z, y, T, G, *, n_pop, rank, alpha, beta, gamma, damping, seed=0):
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


def authors_pipeline(model, samples, target_suffixes, *, n_pop, rank=8, alpha=1.0, beta=0.03, gamma=1024.0,
                     damping=1e-6, layers_per_pass=8, timer=None) -> dict:
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
                A, B, fb = _solve(Z, y, T, grads.pop(n), n_pop=n_pop, rank=rank, alpha=alpha, beta=beta,
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


if __name__ == "__main__":
    # Smoke run on a tiny random Llama (CPU, float32), checked against the float64 SciPy oracle.
    #   python benches/baseline_authors.py [n_samples]   (default 6 samples of 12 tokens)
    import copy
    import importlib.util
    import pathlib
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        from lora_da import reference
    except ImportError:  # the Rust core not built: load the pure-SciPy oracle by path
        path = pathlib.Path(__file__).resolve().parents[1] / "python/lora_da/reference.py"
        spec = importlib.util.spec_from_file_location("reference", path)
        reference = sys.modules["reference"] = importlib.util.module_from_spec(spec)  # dataclasses need it
        spec.loader.exec_module(reference)

    n_samples = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).float().eval()
    samples = []
    for i in range(n_samples):
        ids, mask = torch.randint(0, 50, (1, 12)), torch.ones(1, 12, dtype=torch.long)
        mask[0, 12 - i % 6:] = 0  # right padding of 0..5 tokens
        samples.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    suffixes = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rank, n_pop, gamma = 4, 1000, 1024.0
    out = authors_pipeline(model, samples, suffixes, n_pop=n_pop, rank=rank, gamma=gamma, layers_per_pass=2)

    # Brute-force float64 statistics: per-sample autograd on a float64 copy, per-token x and g.
    m64 = copy.deepcopy(model).double()
    mods = dict(m64.named_modules())
    names = list(out["inits"])
    st = {n: {"Z": 0.0, "y": 0.0, "T": 0, "G": 0.0} for n in names}
    for s in samples:
        ids, mask, labels = _batch(s, torch.device("cpu"))
        valid, xs, outs = mask[0].bool(), {}, {}

        def keep(mod, i, o, n):  # returns None: the output is left untouched
            xs[n], outs[n] = i[0][0], o
        hs = [mods[n].register_forward_hook(lambda mod, i, o, n=n: keep(mod, i, o, n)) for n in names]
        loss = m64(input_ids=ids, attention_mask=mask, labels=labels).loss
        for h in hs:
            h.remove()
        gs = torch.autograd.grad(loss, [outs[n] for n in names] + [mods[n].weight for n in names])
        for k, n in enumerate(names):
            x, g = xs[n][valid].detach(), gs[k][0][valid]
            st[n]["Z"] = st[n]["Z"] + x.T @ x
            st[n]["y"] = st[n]["y"] + (g * g).sum(0)
            st[n]["T"] += int(valid.sum())
            st[n]["G"] = st[n]["G"] + gs[len(names) + k] / len(samples)
    print(f"{n_samples} samples, T = {st[names[0]]['T']} tokens; sin θ_max of V = A.T·sqrt(γ) vs the float64 reference")
    for n in names:
        A, B = out["inits"][n]
        T = st[n]["T"]
        ref = reference.reference_solve((st[n]["Z"] / T).numpy(), (st[n]["y"] / T).numpy(), st[n]["G"].numpy(),
                                        rank=rank, n_pop=n_pop, gamma=gamma)
        V = torch.linalg.qr(A.T.double() * math.sqrt(gamma))[0].numpy()  # lobpcg's V is orthonormal to ~1e-7
        print(f"{n:34s} A {tuple(A.shape)} B {tuple(B.shape)}  sin θ {reference.subspace_sin_theta(ref.V, V):.1e}"
              f"  gap/‖Ω‖ {ref.gap / ref.omega_norm:.1e}")
    print("seconds:", {k: round(v, 4) for k, v in out["seconds"].items()}, "lobpcg fallbacks:", out["lobpcg_fallbacks"])
