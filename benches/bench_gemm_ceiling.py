"""How fast can an exact float64 Gram be on this CPU?

`InputFactor.add` must match exact float64 sums, so its products need float64
arithmetic. This measures, side by side and interleaved, the float64 kernels
available here on one 512-row batch at n = 2048 (no float32 conversion;
medians over three rounds of back-to-back repeats):

* OpenBLAS `dsyrk` (SciPy): the lower triangle only — the goal's baseline;
* MKL `dgemm` (torch, float64 `addmm_`): the full matrix; since a Gram only needs
  the triangle, its time is also reported halved, an upper bound on what a
  triangle kernel at MKL's efficiency could reach;
* lora-da's `InputFactor.add` on float64 rows (faer GEMM + compensated sums).

    python benches/bench_gemm_ceiling.py [--n 2048] [--rows 512] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.linalg.blas as blas
import torch

import lora_da


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    n, t = args.n, args.rows
    x = np.random.default_rng(0).standard_normal((t, n)).astype(np.float32).astype(np.float64)
    xt = torch.from_numpy(x)
    c_syrk = np.zeros((n, n), order="F")
    c_mkl = torch.zeros(n, n, dtype=torch.float64)
    factor = lora_da.InputFactor(n)

    kernels = {
        "OpenBLAS dsyrk (triangle)": lambda: blas.dsyrk(1.0, x, beta=1.0, c=c_syrk, trans=1, overwrite_c=1),
        "MKL dgemm via torch (full matrix)": lambda: c_mkl.addmm_(xt.T, xt),
        "lora-da InputFactor.add (triangle, compensated)": lambda: factor.add(x),
    }
    # Each kernel's repeats run back to back, and the set three times over:
    # interleaving single calls would time OpenBLAS's and MKL's idle threads
    # spinning against each other on two cores.
    times = {k: [] for k in kernels}
    for _ in range(3):
        for name, fn in kernels.items():
            time.sleep(0.5)
            fn()
            for _ in range(args.repeats):
                s = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - s)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["OpenBLAS dsyrk (triangle)"]
    print(f"command: python benches/bench_gemm_ceiling.py --n {n} --rows {t} --repeats {args.repeats}")
    print(f"machine: {torch.get_num_threads()} torch threads; lora-da core threads: {lora_da.num_threads()}")
    print()
    print("| kernel | median time (ms) | throughput / dsyrk |")
    print("|---|---:|---:|")
    for name, v in med.items():
        print(f"| {name} | {v * 1e3:.2f} | {base / v:.2f}× |")
        if name.startswith("MKL"):
            print(f"| MKL's rate credited for the triangle only (time / 2) | {v * 5e2:.2f} | {2 * base / v:.2f}× |")


if __name__ == "__main__":
    main()
