"""Where the device solves' wall time goes: the GPU's own work against the host's.

    python benches/bench_solve_wall.py --shape llama7b --layers 0 16 31

1. The filter's block products ``Ω′X`` (n = 4096 and 11008, k = 24): the wall time per
   product of :func:`lora_da.torch_solve.chebyshev_filter` against the device's time for the
   same products (CUDA events), alone and with a second thread filtering on its own stream;
   a host-bound loop shows a wall time well above the device's.
2. ``compute_init(device="cuda")`` on real statistics of the named layers (random bf16
   weights of the shape, 64 × 512 tokens) with one and two solve streams, and the summed
   kernel time of the same call under ``torch.profiler``.
3. ``Z_λ⁻¹`` from a Cholesky factor: ``torch.cholesky_inverse`` against the triangular
   inverse and product by halves (``lower_inverse_`` then ``gram_of_lower_``, what the
   device solve uses since this bench first ran).

Absolute GPU times, medians of a few repeats; prints a table last.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_filter_product import timed  # noqa: E402


def wall(f, repeats=5):
    """Median wall seconds of ``f`` (``bench_filter_product.timed``), five repeats by default."""
    return timed(f, repeats)


def device_time(f):
    """Milliseconds between events around ``f`` on the current stream, after a warm-up."""
    f()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    f()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3


def filter_products(rows):
    from lora_da.torch_solve import chebyshev_filter

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    degree, rounds = 32, 8
    for n in (4096, 11008):
        O = torch.randn(n, n, dtype=torch.float64, device=dev, generator=g)
        O = (O + O.T) / (2 * n ** 0.5)
        X = torch.linalg.qr(torch.randn(n, 24, dtype=torch.float64, device=dev, generator=g)).Q

        def filt(O=O, X=X):
            for _ in range(rounds):
                chebyshev_filter(O, X, degree, 0.0, 3.0, -3.0)

        def bare(O=O, X=X):
            for _ in range(rounds * degree):
                O @ X

        k = rounds * degree
        rows.append((f"filter step, n = {n}: wall", wall(filt) / k * 1e3))
        rows.append((f"filter step, n = {n}: device", device_time(filt) / k * 1e3))
        rows.append((f"bare Ω′X, n = {n}: wall", wall(bare) / k * 1e3))
        # a second thread filtering its own Ω′ on its own stream, as two solve workers do
        O2, X2 = O.clone(), X.clone()
        times = []

        def worker(O=O2, X=X2):
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                t = time.perf_counter()
                filt(O, X)
                s.synchronize()
                times.append(time.perf_counter() - t)

        filt()
        torch.cuda.synchronize()
        t = time.perf_counter()
        th = threading.Thread(target=worker)
        th.start()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            filt()
            s.synchronize()
        th.join()
        both = time.perf_counter() - t
        rows.append((f"filter step, n = {n}, two threads: wall per step of both", both / (2 * k) * 1e3))
        del O, X, O2, X2


def inverses(rows):
    from lora_da.torch_solve import gram_of_lower_, lower_inverse_

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    for n in (4096, 11008):
        F = torch.randn(n, n, dtype=torch.float64, device=dev, generator=g)
        A = F @ F.T / n + 1e-3 * torch.eye(n, dtype=torch.float64, device=dev)
        L = torch.linalg.cholesky(A)
        rows.append((f"Cholesky, n = {n}", wall(lambda A=A: torch.linalg.cholesky_ex(A)) * 1e3))
        rows.append((f"cholesky_inverse, n = {n}", wall(lambda L=L: torch.cholesky_inverse(L)) * 1e3))
        for leaf in (512, 1024, 2048):
            # on a copy of L, as _spd_inverse does on its own factor (the copy is timed too: 8n² bytes)
            rows.append((f"L⁻¹ then L⁻ᵀL⁻¹ by halves (leaf {leaf}), n = {n}",
                         wall(lambda L=L, leaf=leaf: gram_of_lower_(lower_inverse_(L.clone(), leaf), leaf)) * 1e3))
        ref = torch.cholesky_inverse(L)
        ours = gram_of_lower_(lower_inverse_(L.clone()))
        err = float((ours - ref).abs().max() / ref.abs().max())
        rows.append((f"by halves against cholesky_inverse, n = {n}: max difference / max", err))
        del F, A, L, ref, ours


def real_solves(rows, shape_name, layers):
    import lora_da
    import lora_da.init as init
    from bench_e2e import SHAPES, TARGETS, batched, make_data, make_model

    shape = SHAPES[shape_name]
    model = make_model(shape)
    ids, mask = make_data(shape["samples"])
    names = [f"model.layers.{i}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}"
             for i in layers for t in TARGETS]
    stats = lora_da.collect_statistics(model, batched(ids, mask, shape["batch"]), names, progress=False)
    del model
    torch.cuda.empty_cache()
    cfg = lora_da.LoraDAConfig(n_pop=10000, rank=8, beta=0.03, gamma=1024.0)
    lora_da.compute_init(stats, cfg, progress=False, device="cuda", modules=names[:1])  # warm-up
    default = init.on_streams.__defaults__
    try:
        for workers in (1, 2):
            init.on_streams.__defaults__ = (workers,)
            t = wall(lambda: lora_da.compute_init(stats, cfg, progress=False, device="cuda"), 3)
            rows.append((f"compute_init, {len(names)} modules, {workers} stream(s): wall (s)", t))
        from torch.profiler import ProfilerActivity, profile

        init.on_streams.__defaults__ = (1,)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            lora_da.compute_init(stats, cfg, progress=False, device="cuda")
            torch.cuda.synchronize()
        kernels = sum(e.device_time_total for e in prof.key_averages()) / 1e6
        rows.append(("the same, one stream: summed kernel time (s)", kernels))
        top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
        for e in top:
            print(f"  {e.key[:90]:90s} {e.device_time_total / 1e3:9.1f} ms  ×{e.count}")
    finally:
        init.on_streams.__defaults__ = default


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama7b")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 16, 31])
    ap.add_argument("--skip", nargs="*", default=[], choices=["filter", "inverse", "real"])
    args = ap.parse_args()
    print("command: python " + " ".join(sys.argv))
    rows: list = []
    if "filter" not in args.skip:
        filter_products(rows)
    if "inverse" not in args.skip:
        inverses(rows)
    if "real" not in args.skip:
        real_solves(rows, args.shape, args.layers)
    print("\n| measurement | ms (or as named) |\n|---|---:|")
    for what, v in rows:
        print(f"| {what} | {v:.4g} |")


if __name__ == "__main__":
    main()
