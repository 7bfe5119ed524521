"""The device solve's inner products on one GPU: ``Ω′ X`` for a symmetric
float64 ``Ω′`` (n × n) and a block ``X`` of k vectors, in each layout torch
can hand to cuBLAS, and the Cholesky inverse (SPEC §3 steps 1 and 7).

    python benches/bench_filter_product.py

The filtered subspace iteration (:func:`lora_da.torch_solve.bottom_eigenpairs`)
spends its time in these products: a pass over ``Ω′`` should be bound by the
memory's bandwidth (8n² bytes), so the table gives the time and the bandwidth
it reaches. Median of 20 repeats after a warm-up; absolute times (GPU).
"""

from __future__ import annotations

import statistics
import time

import torch


def timed(f, repeats=20):
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = ["| n | k | layout | ms | GB/s of Ω′ read |", "|---:|---:|---|---:|---:|"]
    for n in (4096, 11008):
        O = torch.randn(n, n, dtype=torch.float64, device=dev, generator=g)
        O = O + O.T
        for k in (9, 17, 24, 32, 48, 64):
            X = torch.randn(n, k, dtype=torch.float64, device=dev, generator=g)
            Xt = X.T.contiguous()  # k × n
            layouts = {
                "Ω′ @ X (X n×k row-major)": lambda: O @ X,
                "Ω′ @ Xtᵀ (X stored k×n)": lambda: O @ Xt.T,
                "(Xt @ Ω′)ᵀ (k×n result)": lambda: Xt @ O,
            }
            for name, f in layouts.items():
                s = timed(f)
                rows.append(f"| {n} | {k} | {name} | {s * 1e3:.3f} | {8 * n * n / s / 1e9:.0f} |")
        A = O @ O.T / n + torch.eye(n, dtype=torch.float64, device=dev)
        s_f = timed(lambda: torch.linalg.cholesky_ex(A), 5)
        L = torch.linalg.cholesky(A)
        s_i = timed(lambda: torch.cholesky_inverse(L), 5)
        eye = torch.eye(n, dtype=torch.float64, device=dev)

        def tri():
            Li = torch.linalg.solve_triangular(L, eye, upper=False)
            return Li.T @ Li

        s_t = timed(tri, 5)
        s_e = timed(lambda: torch.linalg.eigvalsh(A), 3)
        rows.append(f"| {n} | | Cholesky {s_f * 1e3:.1f} ms; cholesky_inverse {s_i * 1e3:.1f} ms; "
                    f"L⁻¹ by trsm then L⁻ᵀL⁻¹ {s_t * 1e3:.1f} ms; eigvalsh {s_e * 1e3:.1f} ms | | |")
        torch.cuda.empty_cache()
    # the solver as it runs: time per block product, overhead included
    import lora_da.torch_solve as ts

    # the pieces around the products, at n = 4096, k = 17
    n, k = 4096, 17
    O = torch.randn(n, n, dtype=torch.float64, device=dev, generator=g)
    O = O + O.T
    X = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, device=dev, generator=g)).Q
    pieces = {
        "qr (n × 17)": lambda: torch.linalg.qr(X),
        "qr (n × 4)": lambda: torch.linalg.qr(X[:, :4]),
        "small_eigh of Xᵀ Ω′ X (17 × 17, host round trip)": lambda: ts._small_eigh(X.T @ (O @ X)),
        "_max_row_sum (n × n)": lambda: ts._max_row_sum(O),
        "_upper_bound": lambda: ts._upper_bound(O, -1e3),
        "chebyshev_filter degree 10": lambda: ts.chebyshev_filter(O, X, 10, 0.0, 1.0, -0.5),
        "10 bare products": lambda: [O @ X for _ in range(10)],
        "float(tensor) sync": lambda: float(X[0, 0]),
    }
    for name, f in pieces.items():
        rows.append(f"| {n} | {k} | {name} | {timed(f) * 1e3:.3f} | |")

    for n in (4096, 11008):
        D = torch.randn(n, 4096, dtype=torch.float64, device=dev, generator=g)
        D *= torch.logspace(0, -6, 4096, dtype=torch.float64, device=dev)[None, :]
        W = D @ D.T
        Zi = torch.linalg.inv(D @ D.T / n + 1e-3 * torch.eye(n, dtype=torch.float64, device=dev))
        ts.PROFILE = {}
        s_sigma = timed(lambda: ts._top_eigenvalue(W), 3)
        k_sigma = ts.PROFILE["sigma products"] / 4
        s2 = ts._top_eigenvalue(W)
        Om = Zi * 0.03 * 1e-3 - W
        out = {}

        def eig():
            out["r"] = ts.bottom_eigenpairs(Om, 8, -s2, 1e-10)

        s_eig = timed(eig, 3)
        k_eig = out["r"][4]
        rows.append(f"| {n} | | σ: {s_sigma * 1e3:.1f} ms, {k_sigma:.0f} products ({s_sigma / k_sigma * 1e3:.3f} ms each); "
                    f"bottom 8: {s_eig * 1e3:.1f} ms, {k_eig} products ({s_eig / max(k_eig, 1) * 1e3:.3f} ms each) | | |")
        ts.PROFILE = None
        torch.cuda.empty_cache()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
