"""The GPU solve (``lora_da.torch_solve``) by stage, on real statistics of a few layers.

    python benches/bench_device_solve.py --shape llama7b --layers 0 16 31

Collects the statistics of the seven projections of the named layers (random
bf16 weights of the shape, 64 × 512 tokens), then times ``compute_init(device="cuda")``
per stage (factor, form, sigma, eigen) for several block widths, and the dense
eigensolver alone for comparison. Absolute GPU times; each stage is
synchronized, so the totals are a little above an unprofiled run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama7b")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 16, 31])
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 24, 40])
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()

    import lora_da
    import lora_da.torch_solve as ds
    from lora_da.reference import subspace_sin_theta
    from bench_e2e import SHAPES, TARGETS, batched, make_data, make_model

    print("command: python " + " ".join(sys.argv))
    shape = SHAPES[args.shape]
    model = make_model(shape)
    ids, mask = make_data(args.samples)
    names = [f"model.layers.{i}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}"
             for i in args.layers for t in TARGETS]
    stats = lora_da.collect_statistics(model, batched(ids, mask, 8), names, progress=False)
    del model
    torch.cuda.empty_cache()
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8)
    lora_da.compute_init(stats, cfg, progress=False, device="cuda", modules=names[:1])  # warm-up
    rows = []
    ref = None
    for extra in args.blocks:
        ds.BLOCK_EXTRA = extra
        ds.PROFILE = {}
        torch.cuda.synchronize()
        t = time.perf_counter()
        inits = lora_da.compute_init(stats, cfg, progress=False, device="cuda")
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        its = np.array([i.result.iterations for i in inits.values()])
        meth = {m: sum(i.result.method == m for i in inits.values()) for m in ("chebyshev", "dense")}
        worst = max(i.result.residual for i in inits.values())
        if ref is None:
            ref = inits
        drift = max(subspace_sin_theta(ref[n].result.V, inits[n].result.V) for n in inits)
        rows.append((extra, dt, dict(ds.PROFILE), its.mean(), its.max(), meth, worst, drift))
        per = sorted(((i.result.iterations, n) for n, i in inits.items()), reverse=True)[:4]
        print(f"block r+{extra}: slowest to converge {per}")
    ds.PROFILE = None
    dense = []
    for n in {stats.modules[x].in_features: x for x in names}.values():
        Z = torch.as_tensor(stats.input_factor(n), device="cuda")
        torch.linalg.eigh(Z[:64, :64])
        torch.cuda.synchronize()
        t = time.perf_counter()
        torch.linalg.eigh(Z)
        torch.cuda.synchronize()
        dense.append((Z.shape[0], time.perf_counter() - t))
    print(f"\n{len(names)} modules of layers {args.layers}, {args.shape} shape")
    print("| block | total (s) | factor | form | sigma | eigen | mean / max applications | methods | worst residual | sin θ vs first |")
    print("|---|---:|---:|---:|---:|---:|---|---|---:|---:|")
    for extra, dt, prof, mean, mx, meth, worst, drift in rows:
        st = " | ".join(f"{prof.get(k, 0):.2f}" for k in ("factor", "form", "sigma", "eigen"))
        print(f"| r+{extra} | {dt:.2f} | {st} | {mean:.0f} / {mx} | {meth} | {worst:.1e} | {drift:.1e} |")
    print("\n| n | torch.linalg.eigh float64 (s) |\n|---:|---:|")
    for n, t in dense:
        print(f"| {n} | {t:.3f} |")


if __name__ == "__main__":
    main()
