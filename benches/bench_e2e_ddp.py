"""lora-da end to end under torchrun: statistics and solves spread over the GPUs of one host.

    torchrun --standalone --nproc_per_node 1 benches/bench_e2e_ddp.py --out DIR   # one GPU
    torchrun --standalone --nproc_per_node 2 benches/bench_e2e_ddp.py --out DIR   # two GPUs
    python benches/bench_e2e_ddp.py --compare DIR                                  # the table

The TinyLlama shape and data of ``bench_e2e.py`` (random bf16 weights, 256 ×
512 tokens, all seven projections, rank 8, β 0.03, γ 1024). Every rank builds
the same model (same seed), takes its shard of the batches (``rank::world``)
and calls :func:`lora_da.pipeline.collect_and_solve` with default settings: the
statistics are summed over the ranks with NCCL, the solves split over them,
and every rank receives every module. Each run writes its wall time by stage,
per-rank GPU and host peaks and rank 0's adapters to ``DIR/w<world>[.<tag>].npz``;
``--compare`` prints the speed-up and how far the adapters of the runs are
apart (subspace angles), next to the distance between two one-GPU runs (GPU
statistics are not bit-reproducible: the bf16 backward is not).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))


def run(out: str, tag: str, repeats: int) -> None:
    import torch.distributed as dist

    from bench_e2e import SHAPES, TARGETS, HostPeak, batched, floor_pass, make_data, make_model

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    import lora_da
    from lora_da.pipeline import collect_and_solve
    from peft import LoraConfig

    shape = SHAPES["tinyllama"]
    model = make_model(shape)
    ids, mask = make_data(shape["samples"])
    batches = batched(ids, mask, shape["batch"])
    shard = batches[rank::world]
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8, beta=0.03, gamma=1024.0)
    names = lora_da.adapters._peft_targets(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    floor_pass(model, shard[:1])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    floor_pass(model, shard)  # this rank's forward + backward alone: what the collection cannot beat
    torch.cuda.synchronize()
    floor = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        inits = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        with HostPeak() as hp:
            t0 = time.perf_counter()
            inits = collect_and_solve(model, shard, names, cfg, progress=False)
            torch.cuda.synchronize()
            dist.barrier()
            wall = time.perf_counter() - t0
        rep = inits.report
        runs.append({"wall": wall, "collect": rep.collect_seconds, "solve": rep.solve_seconds,
                     "reduce": rep.reduce_seconds, "own_solve": rep.own_solve_seconds, "gather": rep.gather_seconds,
                     "passes": len(rep.plan.passes), "gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "host_gib": hp.peak / 2**30})
    walls = [r["wall"] for r in runs]
    mine = dict(runs[int(np.argsort(walls)[len(walls) // 2])], rank=rank, batches=len(shard), walls=walls, floor=floor)
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        arrays = {f"{n}/A": i.A for n, i in inits.items()}
        arrays.update({f"{n}/B": i.B for n, i in inits.items()})
        name = f"w{world}" + (f".{tag}" if tag else "")
        np.savez(os.path.join(out, name + ".npz"), **arrays)
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump({"world": world, "ranks": every, "modules": len(inits)}, f)
        print(json.dumps(every))
    dist.destroy_process_group()


def sin_theta(A1: np.ndarray, A2: np.ndarray) -> float:
    """Largest principal angle's sine between the row spaces of two ``r × n`` matrices."""
    Q1, _ = np.linalg.qr(A1.T)
    Q2, _ = np.linalg.qr(A2.T)
    s = np.linalg.svd(Q1.T @ Q2, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - s.min() ** 2)))


def median_wall(meta: dict) -> float:
    """The median over the repeats of the slowest rank's wall time."""
    return float(np.median([max(w) for w in zip(*(r["walls"] for r in meta["ranks"]))]))


def compare(out: str) -> None:
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "w*.json"))):
        key = os.path.basename(path)[:-5]
        runs[key] = (json.load(open(path)), dict(np.load(path[:-5] + ".npz")))
    print("| run | GPUs | wall (s), median | runs (s) | floor (s) | collect (s) | reduce (s) | own solves (s) | gather (s) | passes "
          "| GPU peak per rank (GiB) | host peak per rank (GiB) |")
    print("|---|---:|---:|---|---|---|---|---|---|---:|---|---|")
    for key, (meta, _) in runs.items():
        ranks = meta["ranks"]

        def each(field):
            return ", ".join(f"{r[field]:.2f}" for r in ranks)

        wall = median_wall(meta)
        runs_s = ", ".join(f"{max(w):.1f}" for w in zip(*(r["walls"] for r in ranks)))
        print(f"| {key} | {meta['world']} | {wall:.1f} | {runs_s} | {each('floor')} | {each('collect')} | {each('reduce')} | "
              f"{each('own_solve')} | {each('gather')} | {ranks[0]['passes']} | "
              + ", ".join(f"{r['gpu_gib']:.1f}" for r in ranks) + " | "
              + ", ".join(f"{r['host_gib']:.1f}" for r in ranks) + " |")
    base = runs.get("w1")
    if base is None:
        return
    t1 = median_wall(base[0])
    for key, (meta, arrays) in runs.items():
        if key == "w1":
            continue
        t = median_wall(meta)
        mods = sorted({k.rsplit("/", 1)[0] for k in arrays})
        angles = np.array([sin_theta(arrays[f"{n}/A"], base[1][f"{n}/A"]) for n in mods])
        rel = max(float(np.abs(np.abs(arrays[f"{n}/B"]) - np.abs(base[1][f"{n}/B"])).max() / np.abs(base[1][f"{n}/B"]).max())
                  for n in mods)
        print(f"{key} vs w1: speed-up {t1 / t:.2f}×; sin θ over {len(mods)} modules: median {np.median(angles):.1e}, "
              f"90th pct {np.quantile(angles, 0.9):.1e}, max {angles.max():.1e}; max |ΔB| / max|B| {rel:.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--repeats", type=int, default=3, help="runs in this process; the median is reported")
    ap.add_argument("--compare", default=None, metavar="DIR")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare)
    else:
        run(args.out, args.tag, args.repeats)


if __name__ == "__main__":
    main()
