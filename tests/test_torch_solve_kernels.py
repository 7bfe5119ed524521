"""The device solve's inner kernels (``lora_da.torch_solve``, SPEC §3 steps 1 and 7) against
independent computations on the CPU: the Chebyshev filter against the polynomial applied
through an eigendecomposition, and the inverse by halves against LAPACK's ``dpotri``."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_da.torch_solve import _gram, chebyshev_filter, gram_of_lower_, lower_inverse_


@settings(max_examples=60, deadline=None)
@given(n=st.integers(8, 60), k=st.integers(1, 6), degree=st.integers(1, 24), seed=st.integers(0, 2**31 - 1),
       shift=st.floats(-50.0, 50.0), width=st.floats(0.1, 100.0), below=st.floats(1e-3, 1.0),
       scale=st.sampled_from([1.0, 1e-170, 1e-300, 1e150, 1e250]))
def test_chebyshev_filter_is_the_scaled_polynomial_of_omega(n, k, degree, seed, shift, width, below, scale):
    """``p(Ω′) X`` with ``p(λ) = T_d((λ − c)/e) / T_d((a0 − c)/e)``, ``c, e`` the centre and half
    width of ``[a, b]``: the recurrence's result equals the polynomial applied to each
    eigenvalue (``Q p(Λ) Qᵀ X``), to a few rounding errors per step of the largest term; ``p`` does
    not change when ``Ω′`` and the interval are scaled together, anywhere in the float64 range
    (SPEC §3: a problem scaled anywhere converges as it does at scale 1)."""
    rng = np.random.default_rng(seed)
    a, b = shift, shift + width
    a0 = a - below * width  # the filter is 1 there, and amplifies what lies below a
    lam = rng.uniform(a0 - 0.2 * width, b, n)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    Omega = (Q * lam) @ Q.T
    Omega = (Omega + Omega.T) / 2
    X = rng.standard_normal((n, k))
    c, e = (a + b) / 2, (b - a) / 2
    T = np.polynomial.chebyshev.Chebyshev.basis(degree)
    p = T((lam - c) / e) / T((a0 - c) / e)
    want = Q @ (p[:, None] * (Q.T @ X))
    got = chebyshev_filter(torch.from_numpy(Omega * scale), torch.from_numpy(X), degree, a * scale, b * scale,
                           a0 * scale).numpy()
    assert np.all(np.isfinite(got))
    scale = np.abs(p).max() * np.linalg.norm(X)
    assert np.linalg.norm(got - want) <= 1e-11 * degree * scale * max(1.0, abs(c) / e)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), leaf=st.integers(1, 16), seed=st.integers(0, 2**31 - 1),
       decades=st.floats(0.0, 8.0))
def test_inverse_by_halves_is_lapacks_inverse(n, leaf, seed, decades):
    """``gram_of_lower_(lower_inverse_(L))`` is ``(LLᵀ)⁻¹``: against LAPACK's ``dpotri`` from the
    same factor, within ``cond · n · u`` of the inverse's size; ``lower_inverse_`` leaves zeros
    above the diagonal (the halves read the blocks as triangular)."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    w = np.logspace(0.0, -decades, n)
    A = (Q * w) @ Q.T
    A = (A + A.T) / 2
    L = np.linalg.cholesky(A)
    Li = lower_inverse_(torch.from_numpy(L.copy()), leaf).numpy()
    assert np.all(np.triu(Li, 1) == 0)
    assert np.allclose(Li @ L, np.eye(n), atol=1e-12 * 10**decades * n)
    got = gram_of_lower_(torch.from_numpy(Li.copy()), leaf).numpy()
    inv, info = scipy.linalg.lapack.dpotri(L, lower=1)
    assert info == 0
    want = np.tril(inv) + np.tril(inv, -1).T
    cond = w[0] / w[-1]
    tol = 50 * n * np.finfo(float).eps * cond * np.abs(want).max()
    assert np.abs(got - want).max() <= tol
    # the upper triangle is the lower's mirror up to rounding (the caller symmetrizes)
    assert np.abs(got - got.T).max() <= tol


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2600), m=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_gram_from_its_lower_blocks_is_the_product(n, m, seed):
    """``_gram(D)`` is ``D Dᵀ`` (against NumPy's product, within the products' rounding) and
    exactly symmetric, across row-block boundaries (``plan.SOLVE_ROWS`` rows)."""
    D = np.random.default_rng(seed).standard_normal((n, m))
    W = _gram(torch.from_numpy(D)).numpy()
    want = D @ D.T
    assert np.array_equal(W, W.T)
    assert np.abs(W - want).max() <= 4 * m * np.finfo(float).eps * (np.abs(D) ** 2).sum(1).max()
