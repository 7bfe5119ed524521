"""The Rust core at its edges: one test per defect class, and a
Hypothesis pass over the scalar arguments of ``solve`` at the extremes of
float64 (FUZZING.md, "Scalar extremes of `solve`").

Classes: (1) two threads sharing an accumulator must not deadlock when one
call fails; (2) no ``pyo3_runtime.PanicException`` for finite, valid inputs;
(3) no NaN or infinity returned, and correct answers at extreme but finite
scales; (4) no abort on huge sizes, no wrapped counters, and an accumulator
left unchanged (and usable) after a failed call.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lora_da
from lora_da import InputFactor, OutputFactor, solve
from lora_da.errors import (
    InvalidArgumentError,
    LoraDAError,
    NonFiniteError,
    NotPositiveDefiniteError,
    ShapeError,
)
from lora_da.reference import reference_solve, subspace_sin_theta

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lora_da.__file__)))
TINY = 5e-324  # the smallest denormal
HUGE = float(np.finfo(np.float64).max)


def run_isolated(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this lora_da: a hang
    fails the test after `timeout` seconds (instead of hanging CI), and an
    abort of the interpreter fails it instead of killing pytest."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, RUST_BACKTRACE="0", PYTHONFAULTHANDLER="1")
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s (deadlock?); output so far:\n{e.stdout}\n{e.stderr}")


def problem(n=16, m=12, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((4 * n, n)) * np.linspace(0.5, 2.0, n)
    Z = X.T @ X / (4 * n)
    y = rng.random(m) + 0.2
    G = rng.standard_normal((m, n))
    return Z, y, G


def all_finite(res) -> bool:
    return (all(np.all(np.isfinite(getattr(res, k))) for k in ("A", "B", "V", "eigenvalues"))
            and all(math.isfinite(getattr(res, k))
                    for k in ("next_eigenvalue", "gap", "residual", "sigma", "c", "omega_norm", "damping")))


def assert_matches(res, ref, *, sigma_scale=1.0, c_scale=1.0, eig_scale=1.0, b_scale=1.0):
    """`res` equals the reference `ref` of an equivalent well-scaled problem,
    whose σ, c, eigenvalues and B differ from the true ones by known factors."""
    assert all_finite(res)
    assert ref.gap >= 1e-4 * ref.omega_norm, "the test problem must have a well-defined subspace"
    assert subspace_sin_theta(ref.V, res.V) <= 1e-6
    np.testing.assert_allclose(res.A, ref.A, atol=1e-8)
    np.testing.assert_allclose(res.B, ref.B * b_scale, rtol=1e-6, atol=1e-8 * np.abs(ref.B * b_scale).max())
    scale = ref.omega_norm * eig_scale
    np.testing.assert_allclose(res.eigenvalues, ref.eigenvalues * eig_scale, rtol=0, atol=1e-9 * scale)
    assert res.next_eigenvalue == pytest.approx(ref.next_eigenvalue * eig_scale, abs=1e-9 * scale)
    assert res.omega_norm == pytest.approx(ref.omega_norm * eig_scale, rel=1e-6)
    assert res.sigma == pytest.approx(ref.sigma * sigma_scale, rel=1e-9)
    assert res.c == pytest.approx(ref.c * c_scale, rel=1e-9)


# --- class 1: a failing call in one thread, a reader in another -------------

DEADLOCK_SCRIPT = """
import threading, numpy as np
from lora_da import InputFactor, OutputFactor
from lora_da.errors import LoraDAError

N = 200
n, m = 32, 24
fi, fo = InputFactor(n), OutputFactor(m)
other_i, other_o = InputFactor(n), OutputFactor(m)
empty_i, empty_o = InputFactor(n), OutputFactor(m)
good_x, good_g = np.ones((3, n)), np.full((3, m), 2.0)
# Long batches, bad in the last row: the failing call holds the lock through
# a long validation, so the readers are sure to wait for it meanwhile.
bad_x = np.ones((100_000, n)); bad_x[-1, 7] = np.nan
bad_g = np.ones((100_000, m)); bad_g[-1, 3] = np.inf
errors, done = [], []

def failing():
    ok = 0
    for k in range(N):
        for call in (lambda: fi.add(bad_x), lambda: empty_i.mean(), lambda: fo.add(bad_g), lambda: empty_o.mean()):
            try:
                call()
                errors.append("no error")
            except LoraDAError:
                pass
        if k % 3 == 0:
            fi.add(good_x); fo.add(good_g); ok += 1
    done.append(ok)

def reading():
    for _ in range(N):
        fi.tokens; fi.packed(); repr(fi); fi.merge(other_i)
        fo.tokens; fo.sum(); repr(fo); fo.merge(other_o)
        fi == other_i; other_i == fi

threads = [threading.Thread(target=failing, daemon=True), threading.Thread(target=reading, daemon=True),
           threading.Thread(target=reading, daemon=True)]
for t in threads: t.start()
for t in threads: t.join(50)
assert not any(t.is_alive() for t in threads), "deadlock"
assert not errors, errors
ok = done[0]
# Every failed call left the factors unchanged: the totals are exactly those of the good calls.
assert fi.tokens == 3 * ok and fo.tokens == 3 * ok, (fi.tokens, fo.tokens, ok)
assert np.all(fi.packed() == 3.0 * ok) and np.all(fo.sum() == 12.0 * ok)
print("OK")
"""


def test_failing_call_in_one_thread_does_not_deadlock_a_reader_in_another():
    out = run_isolated(DEADLOCK_SCRIPT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]


# --- class 2: finite, valid inputs never panic ------------------------------

@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_reported_panics_are_answers_or_lora_da_errors(method):
    Z, y, G = problem()
    n_pop = 1000.0
    kw = dict(rank=3, method=method)
    # A gradient scaled by 1e150: σ × 1e150 and c / 1e300, i.e. the problem
    # with Ḡ and n_pop × 1e300 (c ∝ 1/n_pop) has the same Ω, c, A and B.
    ref = reference_solve(Z, y, G, rank=3, n_pop=n_pop * 1e300)
    assert_matches(solve(Z, y, G * 1e150, n_pop=n_pop, **kw), ref, sigma_scale=1e150)
    # n_pop = 1e-300: the variance term dominates; the reference copes directly.
    assert_matches(solve(Z, y, G, n_pop=1e-300, **kw), reference_solve(Z, y, G, rank=3, n_pop=1e-300))
    # α = 1e308: Ω = 1e308 · (−Δ̂Δ̂ᵀ + β/1e308 · c Z_λ⁻¹).
    ref = reference_solve(Z, y, G, rank=3, n_pop=n_pop, alpha=1.0, beta=0.03 / 1e308)
    assert_matches(solve(Z, y, G, n_pop=n_pop, alpha=1e308, **kw), ref, eig_scale=1e308)
    # β = 1e308: Ω = 1e308 · (−1e-308 Δ̂Δ̂ᵀ + c Z_λ⁻¹); the eigenvalues (~1e304) are representable.
    ref = reference_solve(Z, y, G, rank=3, n_pop=n_pop, alpha=1e-308, beta=1.0)
    assert_matches(solve(Z, y, G, n_pop=n_pop, beta=1e308, **kw), ref, eig_scale=1e308)
    # An all-zero Z with damping 0 and auto_damping: λ is raised from 1e-10 (not from a denormal).
    res = solve(np.zeros_like(Z), y, G, n_pop=n_pop, damping=0.0, auto_damping=True, **kw)
    assert res.damping == 1e-10
    assert_matches(res, reference_solve(np.zeros_like(Z), y, G, rank=3, n_pop=n_pop, damping=1e-10))


# --- class 3: no silent non-finite result; scale-invariant answers ----------

@pytest.mark.parametrize("method", ["dense", "krylov"])
@pytest.mark.parametrize("s", [1e-300, 1e-150, 1e150])
def test_gradient_scale_enters_only_sigma_and_c(method, s):
    """SPEC §3 with normalize: Ḡ → sḠ gives Δ → sΔ, σ → sσ, Δ̂ unchanged and
    c = Σỹ/N_pop/σ² → c/s², the c of N_pop·s². So the solve of sḠ equals the
    reference of Ḡ with N_pop·s² (σ × s). Where c/s² is not representable the
    core must say so (NonFiniteError naming c), not return inf."""
    Z, y, G = problem()
    for n_pop in (1000.0, 1e300 if s < 1 else 1e-280):
        equivalent = n_pop * s * s
        if np.finfo(float).tiny <= equivalent < math.inf:
            ref = reference_solve(Z, y, G, rank=3, n_pop=equivalent)
            assert_matches(solve(Z, y, s * G, rank=3, n_pop=n_pop, method=method), ref, sigma_scale=s)
        else:
            expected_c = reference_solve(Z, y, G, rank=3, n_pop=n_pop).c / s / s
            assert not math.isfinite(expected_c)
            with pytest.raises(NonFiniteError, match=r"\bc\b"):
                solve(Z, y, s * G, rank=3, n_pop=n_pop, method=method)


@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_extreme_but_finite_inputs_give_finite_correct_answers_or_name_the_quantity(method):
    Z, y, G = problem()
    # A single denormal in Ḡ: σ ≈ 5e-324 · σ₁, c ≈ c₁ / 2.5e-647 is not representable.
    G1 = np.zeros_like(G)
    G1[2, 5] = TINY
    with pytest.raises(NonFiniteError, match=r"\bc\b"):
        solve(Z, y, G1, rank=3, n_pop=1000.0, method=method)
    # Without normalization σ = 1 and c = c′: finite, and B = ΔᵀV/√γ is ~1e-324 (0 or denormal).
    res = solve(Z, y, G1, rank=3, n_pop=1000.0, method=method, normalize=False)
    assert all_finite(res) and np.all(np.abs(res.B) <= 1e-300)
    # y = 1e308: ỹ ≈ 1e-308 is denormal in the plain computation. With ỹ scaled by
    # 1e308 (ones), Δ̂ is unchanged, σ → σ·1e-308 and c = Σỹ/N/σ² → the same
    # c with N·1e-308 in place of N.
    yb = np.full_like(y, 1e308)
    ref = reference_solve(Z, yb, G, rank=3, n_pop=1000.0 * 1e-308, output_precision=np.ones_like(y))
    res = solve(Z, yb, G, rank=3, n_pop=1000.0, method=method)
    assert_matches(res, ref, sigma_scale=1e-308)
    # Z_λ = 1e-300 (Z + 1e-6 I): Z_λ⁻¹ ~ 1e306 makes Δ Δᵀ overflow in the plain
    # computation. Z_λ → t Z_λ gives Δ → Δ/t, σ → σ/t, c → c t² and so
    # c Z_λ⁻¹ → t c Z_λ⁻¹: the reference on Z_λ itself with n_pop / t has the same Ω
    # (the output damping, which defaults to the damping, kept at 1e-6).
    n_pop = 1e-305
    ref = reference_solve(Z, y, G, rank=3, n_pop=n_pop * 1e300, damping=1e-6)
    res = solve(Z * 1e-300, y, G, rank=3, n_pop=n_pop, damping=1e-306, output_damping=1e-6, method=method)
    assert_matches(res, ref, sigma_scale=1e300, c_scale=1e-300)


# --- class 4: sizes, counters, and an accumulator unchanged by a failure ----

def test_huge_sizes_raise_memory_error_instead_of_aborting():
    out = run_isolated("""
        from lora_da import InputFactor, OutputFactor
        for make in (lambda: InputFactor(2**40), lambda: InputFactor(2**32 + 1), lambda: InputFactor(2**28),
                     lambda: OutputFactor(2**62)):
            try:
                make()
                print("no error")
            except MemoryError as e:
                print("MemoryError", e)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("MemoryError") for line in lines), out.stdout
    assert "n = 1099511627776" in lines[0]


def test_failed_update_leaves_the_accumulator_unchanged_and_usable():
    f = OutputFactor(4, per_sample=True)
    g = np.arange(8.0).reshape(2, 4)
    f.add(g, sample_lengths=[1, 1])
    before = (f.tokens, f.samples, f.sum_raw(), f.sample_sums())
    # The lengths sum to 2 modulo 2**64: a wrapped check passed, then the
    # per-sample loop indexed out of bounds after the sums were updated.
    with pytest.raises(ShapeError, match="sample_lengths"):
        f.add(g, sample_lengths=[2**64 - 1, 3])
    after = (f.tokens, f.samples, f.sum_raw(), f.sample_sums())
    assert before[:2] == after[:2]
    for a, b in zip(before[2] + (before[3],), after[2] + (after[3],)):
        np.testing.assert_array_equal(a, b)
    f.add(g, sample_lengths=[2])
    assert f.tokens == 4 and f.samples == 3
    np.testing.assert_array_equal(f.sum(), 2 * (g * g).sum(axis=0))
    # Counters never wrap.
    c = OutputFactor(3)
    c.count_samples(2**64 - 1)
    with pytest.raises(InvalidArgumentError, match="overflow"):
        c.count_samples(1)
    assert c.samples == 2**64 - 1
    x = InputFactor(3)
    x.add_gram(np.eye(3), 2**64 - 1)
    with pytest.raises(InvalidArgumentError, match="overflow"):
        x.add_gram(np.eye(3), 1)
    assert x.tokens == 2**64 - 1
    np.testing.assert_array_equal(x.packed(), [1.0, 0.0, 0.0, 1.0, 0.0, 1.0])  # the lower triangle, by columns


# --- the Python routes (torch_solve / host LAPACK) -------------------------

def test_python_routes_never_return_non_finite_results():
    torch = pytest.importorskip("torch")
    from lora_da.torch_solve import solve_group_device

    Z, y, G = problem()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    G1 = np.zeros_like(G)
    G1[2, 5] = TINY
    for GG in (G * 1e-300, G1):
        try:
            (res,) = solve_group_device(t(Z), [t(y)], [t(GG)], rank=3, n_pop=1000.0, method="dense")
        except LoraDAError as e:
            assert isinstance(e, NonFiniteError)
        else:
            assert all_finite(res)


# --- Hypothesis: scalar extremes of `solve` ---------------------------------

VALID_EXTREMES = [0.0, -0.0, TINY, 2.2250738585072014e-308, 1e-300, 1e-150, 1e-20, 0.03, 1.0, 3.0, 1e20, 1e150,
                  1e300, HUGE]
INVALID_EXTREMES = [math.inf, -math.inf, math.nan, -1.0, -1e300, -TINY, -HUGE]
SCALES = [TINY * 2**40, 1e-300, 1e-150, 1e-20, 1.0, 1e20, 1e150, 1e300]
# Mostly valid values (so that most examples reach the solve), some invalid
# ones, and any float at all.
extreme = st.tuples(st.integers(0, 9), st.sampled_from(VALID_EXTREMES), st.sampled_from(INVALID_EXTREMES),
                   st.floats(allow_nan=True, allow_infinity=True)).map(
    lambda t: t[1] if t[0] < 8 else t[2] if t[0] == 8 else t[3])

# The rules of SolveOptions::check_scalars (check_solve_options; torch_solve calls it too).
RULES = {
    "n_pop": lambda v: v > 0 and math.isfinite(v),
    "alpha": math.isfinite,
    "beta": lambda v: v >= 0 and math.isfinite(v),
    "damping": lambda v: v >= 0 and math.isfinite(v),
    "output_damping": lambda v: v is None or (v >= 0 and math.isfinite(v)),
    "gamma": lambda v: v > 0 and math.isfinite(v),
}
MODERATE = (1e-60, 1e60)


def moderate(v) -> bool:
    return v is None or v == 0 or MODERATE[0] <= abs(v) <= MODERATE[1]


BASE = problem(10, 9, seed=4)


def solve_or_error(*a, **kw):
    try:
        return solve(*a, **kw), None
    except LoraDAError as e:
        return None, e


@settings(max_examples=int(os.environ.get("HARDENING_EXAMPLES", "300")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(n_pop=extreme, alpha=extreme, beta=extreme, damping=extreme, output_damping=st.one_of(st.none(), extreme),
       gamma=extreme, sz=st.sampled_from(SCALES), sy=st.sampled_from(SCALES), sg=st.sampled_from(SCALES),
       method=st.sampled_from(["dense", "krylov"]), normalize=st.booleans())
def test_solve_scalar_extremes(n_pop, alpha, beta, damping, output_damping, gamma, sz, sy, sg, method, normalize):
    """Every call returns a finite result or raises a LoraDAError naming the
    argument (invalid scalars) or the quantity (results float64 cannot hold);
    results match the dense reference at moderate scales, and the exact
    scaling law of Ḡ (σ × s, same Ω and c as N_pop·s²) at any scale."""
    Z0, y0, G0 = BASE
    Z, y, G = Z0 * sz, y0 * sy, G0 * sg
    args = dict(n_pop=n_pop, alpha=alpha, beta=beta, damping=damping, output_damping=output_damping, gamma=gamma)
    invalid = [k for k, rule in RULES.items() if not rule(args[k])]
    kw = dict(rank=2, method=method, normalize=normalize)
    res, err = solve_or_error(Z, y, G, **kw, **args)
    if err is not None:
        msg = str(err)
        if invalid:
            event("invalid scalar: InvalidArgumentError naming it")
            assert isinstance(err, InvalidArgumentError), msg
            named = [k for k in invalid if re.search(rf"\b{k} must be\b", msg)]
            assert named, msg
            got = float(msg.rsplit("got ", 1)[1])
            assert got == args[named[0]] or (math.isnan(got) and math.isnan(args[named[0]])), msg
            return
        event(f"valid scalars: {type(err).__name__}")
        # Valid scalars: only a result that float64 cannot hold, a Z + λI that
        # does not factor (damping 0 with Z scaled to denormals), or
        # y + λ_y = 0 (y scaled to 0 with output damping 0).
        assert isinstance(err, (NonFiniteError, NotPositiveDefiniteError, InvalidArgumentError)), msg
        if isinstance(err, NonFiniteError):
            assert "not representable" in msg or "overflows" in msg or "non-finite" in msg, msg
        elif isinstance(err, InvalidArgumentError):
            assert "output_damping" in msg, msg
    else:
        assert not invalid, f"invalid {invalid} accepted"
        assert all_finite(res), res
        event("valid scalars: finite result")
    if invalid:
        return
    if normalize and sg != 1.0 and np.finfo(float).tiny <= n_pop * sg * sg < math.inf:
        # Ḡ → sḠ: σ → sσ, Δ̂ and Ω unchanged, c → c/s², i.e. c of N_pop·s².
        base, base_err = solve_or_error(Z, y, G0, **kw, **dict(args, n_pop=n_pop * sg * sg))
        if base is not None:
            expected_sigma = base.sigma * sg
            # Values within rounding of the largest float64 (‖Ω‖ of α = 1.8e308,
            # say) may round either way in the two solves.
            at_edge = max(abs(v) for v in (base.omega_norm, base.next_eigenvalue, base.c, *base.eigenvalues,
                                           *base.B.ravel())) > HUGE / 2
            if not math.isfinite(expected_sigma):
                assert isinstance(err, NonFiniteError) and "sigma" in str(err), err
            elif at_edge and isinstance(err, NonFiniteError):
                event("scaling law: at the edge of float64")
            else:
                event("compared with the scaling law of Ḡ")
                assert err is None, f"{err}; the same problem with Ḡ unscaled solved to {base}"
                assert res.sigma == pytest.approx(expected_sigma, rel=1e-8)
                assert res.c == pytest.approx(base.c, rel=1e-8)
                np.testing.assert_allclose(res.eigenvalues, base.eigenvalues, rtol=0, atol=1e-8 * base.omega_norm)
                if base.gap >= 1e-4 * base.omega_norm and base.gap > 0:  # a well-defined subspace
                    assert subspace_sin_theta(base.V, res.V) <= 1e-6
    if err is None and all(moderate(v) for v in (*args.values(), sz, sy, sg)):
        compare_with_reference(res, Z, y, G, normalize, args)


def compare_with_reference(res, Z, y, G, normalize, args):
    """At moderate scales the dense reference is well-defined: compare with it."""
    with np.errstate(all="ignore"):
        try:
            ref = reference_solve(Z, y, G, rank=2, normalize=normalize, **args)
        except (np.linalg.LinAlgError, ValueError):
            return
    if not (np.all(np.isfinite(ref.omega)) and ref.gap >= 1e-4 * ref.omega_norm > 0):
        return
    event("compared with the reference")
    assert subspace_sin_theta(ref.V, res.V) <= 1e-6
    np.testing.assert_allclose(res.eigenvalues, ref.eigenvalues, rtol=0, atol=1e-8 * ref.omega_norm)
    assert res.sigma == pytest.approx(ref.sigma, rel=1e-8)
    assert res.c == pytest.approx(ref.c, rel=1e-8)


log_uniform = st.floats(-6, 6).map(lambda e: 10.0**e)


@settings(max_examples=int(os.environ.get("HARDENING_EXAMPLES", "300")) // 3, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(n_pop=log_uniform, alpha=st.one_of(log_uniform, log_uniform.map(lambda v: -v), st.just(0.0)),
       beta=st.one_of(log_uniform, st.just(0.0)), damping=st.one_of(log_uniform, st.just(0.0)),
       output_damping=st.one_of(st.none(), log_uniform), gamma=log_uniform,
       sz=st.sampled_from([1e-20, 1.0, 1e20]), sy=st.sampled_from([1e-20, 1.0, 1e20]),
       sg=st.sampled_from([1e-20, 1.0, 1e20]), method=st.sampled_from(["dense", "krylov"]), normalize=st.booleans())
def test_solve_moderate_scalars_match_reference(n_pop, alpha, beta, damping, output_damping, gamma, sz, sy, sg,
                                               method, normalize):
    """The fuzz above, in the range where the dense float64 reference is
    itself reliable: the core's result must match it."""
    Z0, y0, G0 = BASE
    args = dict(n_pop=n_pop, alpha=alpha, beta=beta, damping=damping, output_damping=output_damping, gamma=gamma)
    res, err = solve_or_error(Z0 * sz, y0 * sy, G0 * sg, rank=2, method=method, normalize=normalize, **args)
    assert err is None, err
    assert all_finite(res)
    compare_with_reference(res, Z0 * sz, y0 * sy, G0 * sg, normalize, args)


# -- the device solve's element-wise passes by blocks of rows (torch_solve, SPEC §7) ----------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 23), rows=st.integers(1, 9), seed=st.integers(0, 2**16), bad=st.booleans())
def test_the_blocked_passes_equal_the_plain_ones(n, rows, seed, bad):
    """``_symmetric`` (in place, by blocks of ``SOLVE_ROWS`` rows) gives the bits of
    ``(S + Sᵀ)/2`` formed whole; ``_asymmetry``, ``_max_row_sum`` and ``_all_finite``
    give what the whole-matrix expressions give; ``_top_eigenvalue`` leaves its input
    bit for bit as it found it (it negates it in place and back)."""
    import lora_da.plan
    from lora_da import torch_solve as ts

    old = lora_da.plan.SOLVE_ROWS
    lora_da.plan.SOLVE_ROWS = rows
    try:
        g = torch.Generator().manual_seed(seed)
        S = torch.randn(n, n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, (n, 1), generator=g)
        if bad:
            S[seed % n, (seed // 7) % n] = float("inf")
        plain = (S + S.T) * 0.5
        assert ts._all_finite(S) == bool(torch.isfinite(S).all())
        if not bad:
            assert ts._asymmetry(S) == float((S - S.T).abs().max())
            assert ts._max_row_sum(S) == float(S.abs().sum(1).max())
            got = ts._symmetric(S.clone())
            assert torch.equal(got, plain) and torch.equal(got, got.T)
            P = plain @ plain.T  # symmetric positive semi-definite
            before = P.clone()
            ts._top_eigenvalue(P)
            assert torch.equal(P, before)
    finally:
        lora_da.plan.SOLVE_ROWS = old
