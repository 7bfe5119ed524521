"""`lora_da.solve` against the dense float64 SciPy reference (SPEC §3, §5).

The reference forms Ω explicitly, so its own forward error grows with
cond(Z_λ); every tolerance below is `contract + cond(Z_λ)·(a few ulp)`, the
accuracy the reference itself can certify.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import EPS, check_against_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_da
from lora_da.reference import reference_solve, subspace_sin_theta
from lora_da.synthetic import make_problem
from mp_oracle import exact_solve

def _options(draw, rank: int) -> dict:
    """The solve options both property tests draw (the rank is drawn by each)."""
    return dict(
        rank=rank,
        n_pop=draw(st.sampled_from([100.0, 5000.0, 1e6])),
        alpha=draw(st.sampled_from([1.0, 0.5, 2.0])),
        beta=draw(st.sampled_from([0.0, 0.03, 1.0])),
        damping=draw(st.sampled_from([1e-6, 1e-4, 1e-8])),
        gamma=draw(st.sampled_from([1024.0, 16.0, 1.0])),
        normalize=draw(st.booleans()),
    )


@st.composite
def problems(draw):
    n = draw(st.integers(6, 72))
    m = draw(st.integers(6, 72))
    rank = draw(st.integers(1, min(16, min(n, m) - 1)))
    cond = 10.0 ** draw(st.floats(0, 8))
    deficient = draw(st.booleans()) and n > 8
    tokens = draw(st.integers(2, n - 1)) if deficient else None
    kw = dict(
        cond=cond,
        y_decades=draw(st.floats(0, 8)),
        tokens=tokens,
        # signal 0: noise only, bottom eigenvalues cluster; large: well separated
        signal=draw(st.sampled_from([0.0, 1.0, 5.0, 20.0])),
        signal_rank=draw(st.integers(1, 12)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    p = make_problem(n, m, **kw)
    return p, _options(draw, rank)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["krylov", "dense"]))
def test_solve_matches_reference(problem, method):
    p, opts = problem
    ref = reference_solve(p.Z, p.y, p.G, **opts)
    res = lora_da.solve(p.Z, p.y, p.G, method=method, **opts)
    assert res.method in ("krylov", "dense")
    if method == "dense":
        assert res.method == "dense"
    check_against_reference(res, ref, p.Z, opts)


@st.composite
def small_problems(draw):
    """problems() at n, m ≤ 14, where the extended-precision oracle is cheap;
    the same hard region: cond(Z) up to 1e8, rank-deficient Z, damping 1e-8."""
    n = draw(st.integers(6, 14))
    m = draw(st.integers(6, 14))
    deficient = draw(st.booleans()) and n > 8
    p = make_problem(
        n, m, cond=10.0 ** draw(st.floats(0, 8)), y_decades=draw(st.floats(0, 8)),
        tokens=draw(st.integers(2, n - 1)) if deficient else None,
        signal=draw(st.sampled_from([0.0, 1.0, 5.0, 20.0])), signal_rank=draw(st.integers(1, 12)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return p, _options(draw, draw(st.integers(1, min(n, m) - 1)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems(), st.sampled_from(["krylov", "dense"]))
def test_solve_matches_extended_precision_oracle(problem, method):
    """Against Ω computed with 60 digits from the same float64 inputs, the only
    error left is the solver's: the contract (1e-10) plus what float64 input
    data of condition cond(Z_λ) allows, one cond·eps — not the 640·cond·eps
    (up to 1e-3·‖Ω‖) that the float64 reference needs. Worst seen: 0.18 of it."""
    p, opts = problem
    ex = exact_solve(p.Z, p.y, p.G, **opts)
    res = lora_da.solve(p.Z, p.y, p.G, method=method, **opts)
    r, norm = opts["rank"], ex.omega_norm
    w = np.linalg.eigvalsh(p.Z + opts["damping"] * np.eye(p.n))
    tol = 1e-10 + w[-1] / max(w[0], np.finfo(float).tiny) * EPS
    assert np.abs(res.eigenvalues - ex.eigenvalues[:r]).max() <= tol * norm
    R = ex.omega @ res.V - res.V * res.eigenvalues[None, :]
    assert np.linalg.norm(R, axis=0).max() <= tol * norm
    assert abs(np.trace(res.V.T @ ex.omega @ res.V) - ex.eigenvalues[:r].sum()) <= r * tol * norm
    gap = ex.eigenvalues[r] - ex.eigenvalues[r - 1]
    if gap >= 1e-4 * norm:
        assert subspace_sin_theta(ex.vectors[:, :r], res.V) <= tol * norm / gap
    assert abs(res.sigma - ex.sigma) <= tol * ex.sigma
    assert abs(res.c - ex.c) <= tol * ex.c
    B = ex.delta_hat.T @ res.V / np.sqrt(opts["gamma"])
    np.testing.assert_allclose(res.B, B, rtol=0, atol=tol * np.linalg.norm(ex.delta_hat, 2) / np.sqrt(opts["gamma"]))


@st.composite
def krylov_problems(draw):
    """n = 200–600: the Krylov basis (at most 6·(r + 1) ≤ 102 vectors) is a
    proper subspace, so the answer comes from restarted Krylov, not from a
    basis that has grown to span everything. Noise-dominated gradients
    (signal 0 or 1) cluster the bottom of Ω: over 400 random draws the gap
    was 2e-4 to 1·‖Ω‖, median 5e-2, a tenth below 3e-3."""
    n = draw(st.integers(200, 600))
    m = draw(st.integers(150, 600))
    rank = draw(st.integers(1, 16))
    p = make_problem(
        n, m, cond=10.0 ** draw(st.floats(2, 8)), y_decades=draw(st.floats(0, 6)),
        signal=draw(st.sampled_from([0.0, 1.0])), signal_rank=draw(st.integers(1, 12)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    # β = 1 with a small N_pop (variance-dominated Ω) needs thousands of
    # applications, past the default budget: a fallback there is the contract
    opts = dict(rank=rank, n_pop=draw(st.sampled_from([1e3, 1e4])), beta=draw(st.sampled_from([0.03, 0.1])),
                damping=1e-6, gamma=1024.0)
    return p, opts


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(krylov_problems())
def test_restarted_krylov_matches_reference(problem):
    p, opts = problem
    res = lora_da.solve(p.Z, p.y, p.G, method="krylov", **opts)
    # a silent dense solve would meet every accuracy check below
    assert res.method == "krylov", res.notes
    # more applications than the basis holds: it was restarted (every one of
    # 400 random draws restarted)
    assert res.iterations > max(6 * max(opts["rank"] + 1, 8), 48)
    check_against_reference(res, reference_solve(p.Z, p.y, p.G, **opts), p.Z, opts)


@pytest.mark.parametrize("n,m", [(300, 200), (200, 320)])
def test_krylov_at_moderate_size_is_krylov(n, m):
    """Above the dense cut-over, `auto` uses the matrix-free path and meets the contract."""
    p = make_problem(n, m, cond=1e5, seed=7)
    opts = dict(rank=8, n_pop=1000.0)
    res = lora_da.solve(p.Z, p.y, p.G, **opts)
    assert res.method == "krylov", res.notes
    check_against_reference(res, reference_solve(p.Z, p.y, p.G, **opts), p.Z, dict(opts, damping=1e-6, gamma=1024.0))


def test_float32_gradient_is_accepted_and_exact():
    p = make_problem(40, 30, seed=3)
    g32 = p.G.astype(np.float32)
    a = lora_da.solve(p.Z, p.y, g32, rank=4, n_pop=100.0)
    b = lora_da.solve(p.Z, p.y, g32.astype(np.float64), rank=4, n_pop=100.0)
    np.testing.assert_array_equal(a.B, b.B)


def test_solve_shared_equals_separate_solves():
    p = make_problem(50, 40, seed=11)
    q = make_problem(50, 60, seed=12)
    kw = dict(rank=5, n_pop=500.0)
    shared = lora_da.solve_shared(p.Z, [p.y, q.y], [p.G, q.G], names=["q_proj", "k_proj"], **kw)
    for res, (y, G) in zip(shared, [(p.y, p.G), (q.y, q.G)]):
        alone = lora_da.solve(p.Z, y, G, **kw)
        np.testing.assert_array_equal(res.A, alone.A)
        np.testing.assert_array_equal(res.B, alone.B)


def test_zero_gradient_falls_back_to_principal_inputs():
    p = make_problem(30, 20, seed=5)
    res = lora_da.solve(p.Z, p.y, np.zeros_like(p.G), rank=3, n_pop=100.0)
    assert res.zero_gradient and res.notes
    assert np.all(res.B == 0) and res.sigma == 1.0
    w, Q = np.linalg.eigh(p.Z)
    assert subspace_sin_theta(Q[:, -3:], res.V) <= 1e-8


def test_sequence_lowrank_precision_matches_dense_inverse():
    rng = np.random.default_rng(0)
    U = rng.standard_normal((7, 25)) * 1e-2
    got = lora_da.lowrank_output_precision(U, 1e-4)
    from lora_da.reference import lowrank_output_precision as dense

    np.testing.assert_allclose(got, dense(U, 1e-4), rtol=1e-10)
    p = make_problem(30, 25, seed=2)
    a = lora_da.solve(p.Z, p.y, p.G, rank=4, n_pop=100.0, output_precision=got)
    ref = reference_solve(p.Z, p.y, p.G, rank=4, n_pop=100.0, output_precision=got)
    assert subspace_sin_theta(ref.V, a.V) < 1e-8


def test_auto_damping_raises_and_reports():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 20))
    Z = x.T @ x  # rank 3: singular without damping
    Z[0, 0] -= 1.0  # and indefinite
    Z = 0.5 * (Z + Z.T)
    y = np.full(10, 1e-3)
    G = rng.standard_normal((10, 20))
    with pytest.raises(lora_da.NotPositiveDefiniteError, match="up_proj"):
        lora_da.solve(Z, y, G, rank=2, n_pop=10.0, damping=0.0, name="up_proj")
    res = lora_da.solve(Z, y, G, rank=2, n_pop=10.0, damping=0.0, auto_damping=True)
    assert res.damping > 0 and any("damping raised" in s for s in res.notes)
    assert np.all(np.isfinite(res.A)) and np.all(np.isfinite(res.B))


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(rank=0), lora_da.InvalidArgumentError, "rank"),
        (dict(rank=10), lora_da.InvalidArgumentError, "rank"),
        (dict(n_pop=0.0), lora_da.InvalidArgumentError, "n_pop"),
        (dict(n_pop=-3.0), lora_da.InvalidArgumentError, "n_pop"),
        (dict(damping=-1.0), lora_da.InvalidArgumentError, "damping"),
        (dict(method="lobpcg"), lora_da.InvalidArgumentError, "method"),
        (dict(gamma=0.0), lora_da.InvalidArgumentError, "gamma"),
    ],
)
def test_bad_scalars(change, exc, match):
    p = make_problem(12, 10, seed=0)
    kw = dict(rank=3, n_pop=10.0, name="layers.0.mlp.up_proj")
    kw.update(change)
    with pytest.raises(exc, match=match):
        lora_da.solve(p.Z, p.y, p.G, **kw)


def test_bad_arrays_name_module_and_value():
    p = make_problem(12, 10, seed=0)
    kw = dict(rank=3, n_pop=10.0, name="layers.3.self_attn.q_proj")
    G = p.G.copy()
    G[2, 5] = np.nan
    with pytest.raises(lora_da.NonFiniteError, match=r"q_proj.*\(2, 5\)"):
        lora_da.solve(p.Z, p.y, G, **kw)
    with pytest.raises(lora_da.ShapeError, match="q_proj"):
        lora_da.solve(p.Z, p.y, p.G.T, **kw)
    y = p.y.copy()
    y[1] = -1.0
    with pytest.raises(lora_da.InvalidArgumentError, match="y must be"):
        lora_da.solve(p.Z, y, p.G, **kw)
    Z = p.Z.copy()
    Z[0, 1] += 1.0
    with pytest.raises(lora_da.InvalidArgumentError, match="symmetric"):
        lora_da.solve(Z, p.y, p.G, **kw)
    with pytest.raises(lora_da.ShapeError):
        lora_da.solve(p.Z[:, :5], p.y, p.G, **kw)
    with pytest.raises(lora_da.ShapeError):
        lora_da.solve(p.Z, p.y, p.G.astype(np.int64), **kw)
    # every error is also a ValueError and a LoraDAError
    with pytest.raises(ValueError):
        lora_da.solve(p.Z, p.y, p.G, rank=99, n_pop=1.0)


def test_output_is_deterministic():
    p = make_problem(260, 200, seed=9)
    a = lora_da.solve(p.Z, p.y, p.G, rank=8, n_pop=100.0)
    b = lora_da.solve(p.Z, p.y, p.G, rank=8, n_pop=100.0)
    np.testing.assert_array_equal(a.A, b.A)
    np.testing.assert_array_equal(a.B, b.B)
