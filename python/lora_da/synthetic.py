"""K-FAC-consistent synthetic problems for tests, benchmarks and golden vectors.

A problem is ``(Z, y, G)`` shaped like real statistics (SPEC §2):

* ``Z = Q diag(d) Qᵀ`` with eigenvalues ``d`` log-spaced over ``cond`` (or, with
  ``tokens < n``, the rank-deficient Gram of correlated token rows);
* ``y`` log-uniform over ``y_decades`` decades;
* ``Ḡ = diag(√y) (S + E) Z^{1/2} / √N_s``: a low-rank "signal" ``S`` plus noise,
  mapped through the input covariance, so that the natural-gradient step has
  the structure a real layer gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Problem:
    Z: np.ndarray
    y: np.ndarray
    G: np.ndarray

    @property
    def n(self) -> int:
        return self.Z.shape[0]

    @property
    def m(self) -> int:
        return self.y.shape[0]


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def make_problem(
    n: int,
    m: int,
    *,
    cond: float = 1e4,
    y_decades: float = 4.0,
    tokens: int | None = None,
    signal_rank: int = 4,
    signal: float = 3.0,
    n_samples: int = 256,
    seed: int = 0,
) -> Problem:
    rng = np.random.default_rng(seed)
    if tokens is not None and tokens < n:
        # Rank-deficient Z: the Gram of `tokens` correlated rows.
        mix = rng.standard_normal((n, n)) * np.logspace(0, -np.log10(cond) / 2, n)[None, :]
        x = rng.standard_normal((tokens, n)) @ mix.T
        Z = x.T @ x / tokens
        w, Q = np.linalg.eigh(Z)
        root = Q * np.sqrt(np.clip(w, 0, None))[None, :]
    else:
        Q = _orthogonal(rng, n)
        d = np.logspace(0, -np.log10(cond), n)
        Z = (Q * d[None, :]) @ Q.T
        root = Q * np.sqrt(d)[None, :]
    Z = 0.5 * (Z + Z.T)
    y = 1e-4 * 10.0 ** rng.uniform(-y_decades, 0.0, size=m)
    k = max(1, min(signal_rank, n, m))
    S = signal * rng.standard_normal((m, k)) @ rng.standard_normal((k, n)) / np.sqrt(k)
    E = rng.standard_normal((m, n))
    G = np.sqrt(y)[:, None] * ((S + E) @ root.T) / np.sqrt(n_samples)
    return Problem(Z=Z, y=y, G=G)
