"""Do the plans of small cards change the subspaces? (issue 20: sin θ ≤ 1e-9 against the
whole-GPU run.) One run on a GPU, a float64 model so that the plan's effect is not hidden
by the bf16 backward's own run-to-run noise:

    python benches/bench_plan_subspaces.py --gib all,all,6,4.5

The TinyLlama widths (hidden 2048, FFN 5632, 32 heads, 4 KV heads) with 4 layers, in
float64, 32 samples × 256 tokens, batch 8, every projection. Each card (the device filled
so that ``mem_get_info`` reports it, the model on it) runs ``collect_and_solve`` with
default settings; its plan (passes, cuts, micro-batch) and the largest sin θ over all
modules against the first card's subspaces are printed; then ``collect_statistics`` at the
same card, whose ``Z`` and ``Ḡ`` are compared with the first card's (the largest entry-wise
difference over the largest entry, per kind, over all modules). The first card twice: the
same plan's run-to-run difference. A Markdown table last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_e2e import TARGETS, Filler, batched, make_data  # noqa: E402


def make_float64_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).double()
    model.eval()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", default="all,all,6,4.5", help="card sizes, the first the reference")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--merge", type=int, default=None,
                    help="join small batches into steps of at most this many samples (lora_da.plan.MERGE_SAMPLES): "
                         "with the batch, every plan's micro-batch the same")
    args = ap.parse_args()
    if args.merge is not None:
        import lora_da.plan

        lora_da.plan.MERGE_SAMPLES = args.merge

    import lora_da
    from lora_da.pipeline import collect_and_solve
    from lora_da.reference import subspace_sin_theta
    from peft import LoraConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    print("command: python " + " ".join(sys.argv))
    print(f"machine: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    model = make_float64_model(args.layers)
    model_bytes = torch.cuda.memory_allocated()
    ids, mask = make_data(args.samples, args.length)
    data = batched(ids.cuda(), mask.cuda(), args.batch)
    names = lora_da.adapters._peft_targets(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8, beta=0.03, gamma=1024.0)
    filler = Filler()
    rows, ref = [], None
    for gib in args.gib.split(","):
        filler.set(gib, model_bytes)
        t = time.perf_counter()
        try:
            inits = collect_and_solve(model, data, names, cfg, progress=False)
        except lora_da.LoraDAError as e:  # a refusal before the first batch is a row of the table
            print(f"card {gib} GiB: {type(e).__name__}: {e}", flush=True)
            rows.append((gib, time.perf_counter() - t, f"{type(e).__name__}: {str(e)[:120]}", None, None, None))
            continue
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        plan = inits.report.plan
        desc = (f"{len(plan.passes)} pass(es){' with cuts' if plan.cuts else ''}, micro-batch {plan.micro_batch}"
                + (f", {len(plan.host_solves)} host solve(s)" if plan.host_solves else "")
                + (f"; {'; '.join(plan.notes)}" if plan.notes else ""))
        V = {n: inits[n].result.V for n in names}
        del inits
        stats = lora_da.collect_statistics(model, data, names, progress=False)
        Z = {g: stats.input_factors[g].mean() for g in stats.groups()}
        G = {n: stats.mean_grad(n) for n in names}
        del stats
        if ref is None:
            ref, worst, dz, dg = (V, Z, G), None, None, None
        else:
            worst = max(subspace_sin_theta(ref[0][n], V[n]) for n in names)
            dz = max(float(np.abs(Z[g] - ref[1][g]).max() / np.abs(ref[1][g]).max()) for g in Z)
            dg = max(float(np.abs(G[n] - ref[2][n]).max() / np.abs(ref[2][n]).max()) for n in G)
        print(f"card {gib} GiB: {dt:.1f} s; {desc}" + ("" if worst is None else
              f"; max sin θ {worst:.1e}; statistics: Z {dz:.1e}, Ḡ {dg:.1e}"), flush=True)
        print(plan.describe(), flush=True)
        rows.append((gib, dt, desc, worst, dz, dg))
    filler.set("all", model_bytes)
    print(f"\nfloat64 Llama, hidden 2048, FFN 5632, {args.layers} layers; {args.samples} samples × {args.length} tokens, "
          f"batch {args.batch}; {len(names)} modules")
    print("| card (GiB) | wall (s) | plan | max sin θ vs the first card | Z: max diff / max | Ḡ: max diff / max |")
    print("|---|---:|---|---:|---:|---:|")
    for gib, dt, desc, worst, dz, dg in rows:
        f = lambda v: "reference" if v is None else f"{v:.1e}"  # noqa: E731
        print(f"| {gib} | {dt:.1f} | {desc} | {f(worst)} | {f(dz)} | {f(dg)} |")


if __name__ == "__main__":
    main()
