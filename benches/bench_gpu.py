"""Statistics collection and init on a GPU (absolute times; run on the H200).

    python benches/bench_gpu.py [--hidden 768] [--layers 12] [--samples 256] [--length 512]

A randomly initialized Llama-architecture model (about 110M parameters at the
defaults) in bfloat16 on the GPU; one pass over `samples` random sequences at
batch sizes 8 and 32 with every linear layer targeted; then `compute_init` on
the host. Prints time per sample, peak GPU memory (model + activations +
per-batch Gram buffers), peak host memory, and the solve time.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    args = ap.parse_args()

    import lora_da
    from transformers import LlamaConfig, LlamaForCausalLM

    print("command: python " + " ".join(sys.argv))
    print(f"machine: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; host threads {lora_da.num_threads()}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.length)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).cuda().eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    ids = torch.randint(0, 32000, (args.samples, args.length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    rows = []
    stats = None
    for bs in args.batch_sizes:
        batches = [{"input_ids": ids[i:i + bs], "attention_mask": mask[i:i + bs]} for i in range(0, args.samples, bs)]
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t = time.perf_counter()
        stats = lora_da.collect_statistics(model, batches, "all-linear", progress=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rows.append((bs, 1e3 * dt / args.samples, torch.cuda.max_memory_allocated() / 2**30,
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
    t = time.perf_counter()
    inits = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=10000, rank=8), progress=False)
    t_solve = time.perf_counter() - t
    worst_name = max(inits, key=lambda n: inits[n].result.residual)
    worst = inits[worst_name].result.residual
    methods = {m: sum(i.result.method == m for i in inits.values()) for m in ("krylov", "dense")}
    w = inits[worst_name].result
    print(f"worst module {worst_name}: method {w.method}, residual {w.residual:.1e}, gap {w.gap:.2e}, "
          f"‖Ω‖ {w.omega_norm:.2e}, σ {w.sigma:.3e}, notes {w.notes}")
    import os

    if os.environ.get("OUT"):
        import numpy as np

        np.savez_compressed(os.path.join(os.environ["OUT"], "worst_module.npz"), Z=stats.input_factor(worst_name),
                            y=stats.output_factor(worst_name), G=stats.mean_grad(worst_name))
    print(f"\nmodel: Llama {args.layers} layers, hidden {args.hidden}, {params:.0f}M parameters, bf16; "
          f"{len(stats.modules)} target modules, {len(stats.input_factors)} input factors; "
          f"{args.samples} samples × {args.length} tokens")
    print("| batch size | time per sample (ms) | peak GPU memory (GiB) | peak host memory (GiB) |")
    print("|---:|---:|---:|---:|")
    for bs, ms, gpu, host in rows:
        print(f"| {bs} | {ms:.1f} | {gpu:.2f} | {host:.2f} |")
    print(f"\ncompute_init (rank 8, {len(inits)} modules, host): {t_solve:.1f} s; worst residual {worst:.1e}; methods {methods}")


if __name__ == "__main__":
    main()
