"""Statistics collection on a small Llama-architecture model on the CPU.

    python benches/bench_collect.py [--samples 32] [--length 64] [--repeats 3]

lora-da's one pass (batch 1, 4, 16) against a per-pass baseline that follows
the authors' recipe: batch size 1, one gradient pass, then one Fisher pass per
group of 8 target modules (float32 hooks). Each configuration runs in its own
subprocess so that its peak host memory (ru_maxrss) is its own. Times are the
median of the repeats, per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(samples, length):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 2000, (samples, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for i in range(samples):
        mask[i, length - (i * 7) % (length // 2):] = 0
    return model, ids, mask


def run_lora_da(model, ids, mask, bs):
    import lora_da

    batches = [{"input_ids": ids[i:i + bs], "attention_mask": mask[i:i + bs]} for i in range(0, len(ids), bs)]
    return lora_da.collect_statistics(model, batches, TARGETS, progress=False)


def run_baseline(model, ids, mask):
    """Authors' recipe: bs=1; gradient pass; Fisher passes over groups of 8 modules."""
    import torch

    from lora_da.collect import causal_lm_per_sample_loss, resolve_targets

    names = resolve_targets(model, TARGETS)
    mods = dict(model.named_modules())
    for p in model.parameters():
        p.grad = None
    for s in range(len(ids)):  # gradient pass
        L = int(mask[s].sum())
        loss = causal_lm_per_sample_loss(model(input_ids=ids[s:s + 1, :L]).logits, ids[s:s + 1, :L])[0]
        loss.backward()
    grads = {n: mods[n].weight.grad.clone() / len(ids) for n in names}
    Z, y = {}, {}
    for g0 in range(0, len(names), 8):  # one Fisher pass per 8 modules
        group = names[g0:g0 + 8]
        for n in group:
            Z[n] = torch.zeros(mods[n].in_features, mods[n].in_features)
            y[n] = torch.zeros(mods[n].out_features)
        handles = []

        def hook(name):
            def fwd(mod, args, out):
                x = args[0][0]
                Z[name] += x.T @ x
                def grad_hook(g):
                    y[name].add_((g[0] ** 2).sum(0))

                out.register_hook(grad_hook)
            return fwd

        for n in group:
            handles.append(mods[n].register_forward_hook(hook(n)))
        for s in range(len(ids)):
            L = int(mask[s].sum())
            model.zero_grad(set_to_none=True)
            loss = causal_lm_per_sample_loss(model(input_ids=ids[s:s + 1, :L]).logits, ids[s:s + 1, :L])[0]
            loss.backward()
        for h in handles:
            h.remove()
    return grads, Z, y


def child(args):
    import torch

    torch.set_num_threads(2)
    model, ids, mask = build(args.samples, args.length)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        if args.config == "baseline":
            run_baseline(model, ids, mask)
        else:
            run_lora_da(model, ids, mask, int(args.config.split("=")[1]))
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"config": args.config, "per_sample_ms": 1e3 * statistics.median(times) / args.samples, "peak_mib": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config")
    args = ap.parse_args()
    if args.config:
        return child(args)
    print("command: python " + " ".join(sys.argv))
    print(f"machine: {os.cpu_count()} cores; model: Llama 4 layers, hidden 256, intermediate 688 (28 target modules); "
          f"{args.samples} samples × {args.length} tokens (right padding)")
    rows = []
    for cfg in ["baseline", "lora-da bs=1", "lora-da bs=4", "lora-da bs=16"]:
        arg = "baseline" if cfg == "baseline" else "bs=" + cfg.split("=")[1]
        out = subprocess.run([sys.executable, __file__, "--config", arg, "--samples", str(args.samples),
                              "--length", str(args.length), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((cfg, r["per_sample_ms"], r["peak_mib"]))
    base = rows[0][1]
    print()
    print("| configuration | passes over the data | time per sample (ms) | speed-up vs baseline | peak host memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for cfg, ms, mib in rows:
        passes = "1 + ⌈28/8⌉ = 5" if cfg == "baseline" else "1"
        print(f"| {cfg} | {passes} | {ms:.1f} | {base / ms:.2f}× | {mib:.0f} |")


if __name__ == "__main__":
    main()
