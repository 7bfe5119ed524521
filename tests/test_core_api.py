"""What the core exports for the routes that do not solve in Rust (SPEC §3, §5).

The torch route and the CLI check the same contract as the Rust solve: the
residual bound, the symmetry tolerance of ``Z`` and the rules of the solve
options. The core exports them (``CONTRACT_RESIDUAL``, ``SYMMETRY_TOL``,
``check_solve_options``) so that those routes read them instead of writing
them again. These tests hold each export to what ``solve`` itself enforces.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_da
from lora_da._core import CONTRACT_RESIDUAL, SYMMETRY_TOL, check_solve_options, solve, solve_shared
from lora_da.synthetic import make_problem

FELL_BACK = "fell back to the dense solve"
NOT_ASKED = "no dense fallback asked"


def test_contract_residual_is_the_bound_krylov_is_held_to():
    # SPEC §5: a Krylov result above the bound is replaced by the dense solve
    # (or, without the fallback, returned with a note); one at or below it is
    # returned as it is. The tolerances put Krylov's residual on both sides.
    p = make_problem(80, 60, seed=1)
    kw = dict(rank=4, n_pop=100.0, method="krylov")
    above = below = 0
    for tol in (1e-3, 1e-5, 1e-7, 1e-9, 3e-10, 1e-10, 1e-12):
        krylov = solve(p.Z, p.y, p.G, tol=tol, dense_fallback=False, **kw)
        final = solve(p.Z, p.y, p.G, tol=tol, **kw)
        missed = krylov.residual > CONTRACT_RESIDUAL
        above, below = above + missed, below + (not missed)
        assert any(NOT_ASKED in s for s in krylov.notes) == missed, (tol, krylov.residual, krylov.notes)
        assert any(FELL_BACK in s for s in final.notes) == missed, (tol, krylov.residual, final.notes)
        assert final.method == ("dense" if missed else "krylov")
        assert final.residual <= CONTRACT_RESIDUAL
    # one residual in (1e-10, 1e-9]: a bound of 1e-9 would not have fallen back there
    assert above >= 1 and below >= 1, (above, below)
    assert any(f"contract: {CONTRACT_RESIDUAL:.0e}" in s for s in solve(p.Z, p.y, p.G, tol=1e-3, **kw).notes)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 9),
    scale_exp=st.integers(-20, 20),
    where=st.integers(0, 10_000),
    factor=st.one_of(st.floats(0.0, 0.9), st.floats(1.1, 50.0)),
)
def test_symmetry_tol_is_the_tolerance_the_solve_accepts(n, scale_exp, where, factor):
    # Z[i, j] − Z[j, i] = factor · SYMMETRY_TOL · max|Z|: accepted below 1, refused above.
    scale = 2.0**scale_exp
    Z = np.eye(n) * scale
    pairs = [(i, j) for i in range(n) for j in range(i)]
    i, j = pairs[where % len(pairs)]
    Z[i, j] += factor * SYMMETRY_TOL * scale
    assert np.abs(Z).max() == scale
    y, G = np.ones(n), np.arange(1.0, n * n + 1).reshape(n, n)
    kw = dict(rank=1, n_pop=10.0, damping=0.0, method="dense")
    if factor < 1:
        res = solve(Z, y, G, **kw)
        assert np.all(np.isfinite(res.A))
    else:
        with pytest.raises(lora_da.InvalidArgumentError, match="not symmetric") as err:
            solve(Z, y, G, **kw)
        assert f"> {SYMMETRY_TOL!r} · max|Z|" in str(err.value)


def _outcome(call):
    try:
        call()
    except Exception as e:  # the class and the message are what is compared
        return type(e), str(e)
    return None


_BOOL = st.sampled_from([True, False, "no", 1])
_OPTIONS = dict(
    rank=st.sampled_from([-2, 0, 1, 2, 3, 4, 7, 1.5, 10**30]),
    n_pop=st.sampled_from([100.0, 1, 0.0, -1.0, math.nan, math.inf, "x"]),
    alpha=st.sampled_from([1.0, -2.0, 0.0, math.nan, math.inf]),
    beta=st.sampled_from([0.03, 0.0, -0.1, math.nan, math.inf]),
    damping=st.sampled_from([1e-6, 0.0, -1e-9, math.nan, math.inf]),
    output_damping=st.sampled_from([None, 0.0, 1e-3, -1.0, math.nan]),
    gamma=st.sampled_from([1024.0, 4.0, 0.0, -1.0, math.nan, math.inf]),
    normalize=_BOOL,
    method=st.sampled_from(["auto", "dense", "krylov", "lobpcg", 3]),
    auto_damping=_BOOL,
    tol=st.sampled_from([1e-12, 1e-6, 0.0, 1.0, 1.5, math.nan]),
    max_applications=st.sampled_from([None, 400, 0, -1, 2.5]),
    deterministic=_BOOL,
    dense_fallback=_BOOL,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=st.fixed_dictionaries({}, optional=_OPTIONS), name=st.sampled_from(["", "layers.0.q_proj"]))
def test_check_solve_options_raises_what_solve_raises(options, name):
    # Valid arrays, any options: the check and the solve agree on the exception
    # class and the message, or both accept (and then the solve returns).
    p = make_problem(5, 4, seed=3)
    options = {"rank": 1, "n_pop": 100.0, **options}
    got = _outcome(lambda: check_solve_options(n=5, m=4, name=name, **options))
    assert got == _outcome(lambda: solve(p.Z, p.y, p.G, name=name, **options))
    # solve_shared names its first module in what it checks once for all
    assert _outcome(lambda: check_solve_options(n=5, m=4, name="module 0", **options)) == _outcome(
        lambda: solve_shared(p.Z, [p.y], [p.G], **options)
    )


def test_check_solve_options_sees_several_bad_options_as_solve_does():
    # Examples of each exception the options can raise, with their messages.
    p = make_problem(5, 4, seed=3)
    cases = [
        (dict(rank=0), lora_da.InvalidArgumentError, "rank must satisfy 1 ≤ r < min(n, m) = min(5, 4) = 4, got 0"),
        (dict(rank=-1), lora_da.InvalidArgumentError, "rank must be ≥ 0, got -1"),
        (dict(n_pop=0.0), lora_da.InvalidArgumentError, "n_pop must be a finite number > 0, got 0.0"),
        (dict(gamma=math.inf), lora_da.InvalidArgumentError, "gamma must be finite and > 0, got inf"),
        (dict(method="lobpcg"), lora_da.InvalidArgumentError, "method must be 'auto', 'krylov' or 'dense', got \"lobpcg\""),
        (dict(max_applications=-5), lora_da.InvalidArgumentError, "max_applications must be ≥ 0, got -5"),
        (dict(rank=1.5), TypeError, None),
    ]
    for change, exc, message in cases:
        kw = {"rank": 2, "n_pop": 10.0, **change}
        with pytest.raises(exc) as by_solve:
            solve(p.Z, p.y, p.G, **kw)
        with pytest.raises(exc) as by_check:
            check_solve_options(n=5, m=4, **kw)
        assert str(by_check.value) == str(by_solve.value)
        if message is not None:
            assert str(by_check.value) == message


def test_check_solve_options_without_a_shape():
    # Before any statistics are read (the CLI's case) the shape is unknown:
    # the rank is only checked to be ≥ 1, every other option as with a shape.
    check_solve_options(rank=1000, n_pop=10.0)
    with pytest.raises(lora_da.InvalidArgumentError, match=r"^rank must be ≥ 1, got 0$"):
        check_solve_options(rank=0, n_pop=10.0)
    with pytest.raises(lora_da.InvalidArgumentError, match=r"^q_proj: beta must be finite and ≥ 0, got -1\.0$"):
        check_solve_options(rank=1, n_pop=10.0, beta=-1.0, name="q_proj")
    with pytest.raises(lora_da.InvalidArgumentError, match="n and m"):
        check_solve_options(rank=1, n_pop=10.0, n=5)
    with pytest.raises(lora_da.InvalidArgumentError, match=r"^m must be ≥ 0, got -4$"):
        check_solve_options(rank=1, n_pop=10.0, n=5, m=-4)
