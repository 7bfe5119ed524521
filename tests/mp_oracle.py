"""SPEC §3 in extended precision (mpmath), for small n.

The float64 SciPy reference forms Ω and so carries its own forward error of
about cond(Z_λ)·eps; a test that compares against it must allow that much,
which near cond 1e8 is 1e-5·‖Ω‖ and hides real errors. Here every step runs
with `dps` decimal digits from the exact float64 inputs, so the oracle's own
error is negligible and the bound can be the solver's contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import mpmath
import numpy as np


@dataclass
class ExactResult:
    eigenvalues: np.ndarray  # all n eigenvalues of Ω, ascending (rounded to float64)
    vectors: np.ndarray  # n × n, matching columns
    omega: np.ndarray  # Ω rounded to float64 (only for residuals)
    delta_hat: np.ndarray  # Δ̂ rounded to float64
    sigma: float
    c: float
    omega_norm: float


def exact_solve(Z, y, G, *, n_pop, alpha=1.0, beta=0.03, damping=1e-6, output_damping=None,
                normalize=True, output_precision=None, dps=60, **_ignored) -> ExactResult:
    Z, y, G = (np.asarray(a, dtype=np.float64) for a in (Z, y, G))
    n, m = Z.shape[0], G.shape[0]
    lam_y = damping if output_damping is None else output_damping
    with mpmath.workdps(dps):
        mpf = mpmath.mpf
        # mpf(float) is exact: the oracle sees precisely the bits the core sees
        Zl = mpmath.matrix(n, n)
        for i in range(n):
            for j in range(n):
                Zl[i, j] = mpf(float(Z[i, j]))
            Zl[i, i] += mpf(damping)
        Zinv = mpmath.inverse(Zl)
        if output_precision is None:
            yt = [1 / (mpf(float(y[j])) + mpf(lam_y)) for j in range(m)]
        else:
            yt = [mpf(float(p)) for p in output_precision]
        GtY = mpmath.matrix(n, m)
        for i in range(n):
            for j in range(m):
                GtY[i, j] = mpf(float(G[j, i])) * yt[j]
        delta = -(Zinv * GtY)
        if normalize:
            ev = mpmath.eigsy(delta.T * delta, eigvals_only=True)
            sigma = mpmath.sqrt(max(ev))
        else:
            sigma = mpf(1)
        dh = delta / sigma
        c = mpmath.fsum(yt) / mpf(n_pop) / sigma**2
        omega = -mpf(alpha) * (dh * dh.T) + mpf(beta) * c * Zinv
        omega = (omega + omega.T) / 2
        E, Q = mpmath.eigsy(omega)
        order = sorted(range(n), key=lambda k: E[k])
        w = np.array([float(E[k]) for k in order])
        V = np.array([[float(Q[i, k]) for k in order] for i in range(n)])
        to_np = lambda M: np.array(M.tolist(), dtype=np.float64)  # noqa: E731
        return ExactResult(
            eigenvalues=w,
            vectors=V,
            omega=to_np(omega),
            delta_hat=to_np(dh),
            sigma=float(sigma),
            c=float(c),
            omega_norm=float(max(abs(E[k]) for k in range(n))),
        )
