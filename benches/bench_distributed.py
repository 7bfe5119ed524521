"""Collection sharded over GPUs with torch.distributed (NCCL), summed with
`lora_da.distributed.all_reduce_statistics`; rank 0 checks the sum against a
single-GPU pass over the whole set and prints the timings.

    torchrun --nproc_per_node 2 benches/bench_distributed.py [--layers 4] [--samples 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    import lora_da
    from lora_da.distributed import all_reduce_statistics
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=2048, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                      max_position_embeddings=args.length)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 32000, (args.samples, args.length), generator=torch.Generator().manual_seed(1))
    bs = args.batch_size
    batches = [{"input_ids": ids[i:i + bs], "attention_mask": torch.ones_like(ids[i:i + bs])} for i in range(0, args.samples, bs)]
    dist.barrier()
    t = time.perf_counter()
    mine = lora_da.collect_statistics(model, batches[rank::world], "all-linear", progress=False)
    total = all_reduce_statistics(mine)
    torch.cuda.synchronize()
    dist.barrier()
    t_dist = time.perf_counter() - t
    if rank == 0:
        t = time.perf_counter()
        whole = lora_da.collect_statistics(model, batches, "all-linear", progress=False)
        t_one = time.perf_counter() - t
        worst = 0.0
        for n in whole.modules:
            for f in ("mean_grad", "input_factor", "output_factor"):
                a, b = getattr(whole, f)(n), getattr(total, f)(n)
                worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
        print("command: torchrun --nproc_per_node", world, " ".join(sys.argv))
        print(f"machine: {world} × {torch.cuda.get_device_name(0)}; torch {torch.__version__}; NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")
        print("| setup | modules | samples | wall time (s) | max rel. difference vs one GPU |")
        print("|---|---:|---:|---:|---:|")
        print(f"| 1 GPU, whole set | {len(whole.modules)} | {whole.n_samples} | {t_one:.2f} | — |")
        print(f"| {world} GPUs, sharded + all_reduce | {len(total.modules)} | {total.n_samples} | {t_dist:.2f} | {worst:.1e} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
