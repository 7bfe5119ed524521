"""Review 5: defects found in the day's four changes (SPEC §7's one-sample recovery, CUDA
library out-of-memory errors, freed device sums, the σ iteration bounded by 0). Each test
fails on the code it was written against because of the defect its docstring names; those
marked *pre-existing* fail on 22e7ed5 as well (found while reviewing the same code)."""

from __future__ import annotations

import lora_da
import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, batches, data, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_da import torch_solve
from lora_da.collect import device_sums
from lora_da.collect.device_sums import DeviceSums
from test_memory_plan import (
    assert_same,
    device_statistics,
    fail_copy_on,
    failing_on,
    host_statistics,
    oom_while_holding_more_than,
)

# -- change 1: out of memory at one sample ------------------------------------------------------

ONE_GROUP = ["model.layers.0.mlp.down_proj"]  # one module: one input group, two float64 copies per step


def test_a_one_sample_step_is_redone_as_it_is_after_the_micro_batch_drops_to_one(monkeypatch):
    """SPEC §7: "a step of one sample that fails is redone once as it is". Batches of 2, one
    group: the 3rd float64 copy (batch 1's two-sample step) fails, the micro-batch drops to 1,
    and the 4th (that step's first one-sample step) fails once, as a fragmented device does.
    ``steps`` recurses with ``retried=run.micro == 1``: the one-sample step counts as already
    redone, and with one group to move the run ends in the one-sample error instead."""
    host = host_statistics(bs=2, targets=ONE_GROUP)
    monkeypatch.setattr(device_sums, "float64_copy", fail_copy_on({3, 4}))
    try:
        dev = device_statistics(bs=2, targets=ONE_GROUP)
    except lora_da.LoraDAError as e:
        pytest.fail(f"a single transient failure of a one-sample step was not redone: {e}")
    assert any("redone after releasing" in n for n in dev.plan.notes), dev.plan.notes
    assert_same(host, dev)


def test_a_one_sample_step_that_a_release_cures_does_not_split_the_pass(monkeypatch):
    """The same with every group: after the drop to one sample, one transient failure moves
    half the pass's input groups to a pass of their own (the data read again for them) where
    a plain redo fits."""
    host = host_statistics(bs=2)
    # batch 0 takes copies 1-28 (14 modules); copy 30 fails in batch 1's two-sample step, 31 in
    # its first one-sample step
    monkeypatch.setattr(device_sums, "float64_copy", fail_copy_on({30, 31}))
    dev = device_statistics(bs=2)
    assert len(dev.plan.passes) == 1, "\n".join(dev.plan.notes)
    assert_same(host, dev)


def rows_loader():
    """A DataLoader with persistent workers (HF Trainer's dataloader_persistent_workers): its
    ``iter()`` resets and returns the one live iterator instead of a new one."""
    ids, mask = data()
    rows = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(6)]
    return torch.utils.data.DataLoader(rows, batch_size=2, num_workers=1, persistent_workers=True)


def test_moving_half_a_pass_out_keeps_a_persistent_workers_loader_in_place(monkeypatch):
    """``move_half_out`` asks ``iter(run.dataloader) is run.dataloader`` in the middle of the
    pass: on a DataLoader with persistent workers that call restarts the iterator the pass
    is reading, so the groups that stay sum the first batches again (12 samples for 6) and
    the run ends in "the dataloader must yield the same batches on every pass"."""
    ids, mask = data()
    host = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 2), LLAMA_TARGETS, progress=False)
    monkeypatch.setattr(DeviceSums, "add", oom_while_holding_more_than(4, after=30))
    try:
        dev = lora_da.collect_statistics(tiny_llama(), rows_loader(), LLAMA_TARGETS, progress=False,
                                         accumulate_on="device")
    except lora_da.LoraDAError as e:
        pytest.fail(f"moving groups out broke a valid persistent-workers DataLoader: {e}")
    assert any("moved from pass 1" in n for n in dev.plan.notes)
    assert_same(host, dev)


def test_a_multi_pass_plan_keeps_a_persistent_workers_loader_in_place():
    """*Pre-existing* (``check_multipass``, called after the first batch was read): the same
    reset of the live iterator on a plan of several passes."""
    ids, mask = data()
    host = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 2), LLAMA_TARGETS, progress=False)
    try:
        dev = lora_da.collect_statistics(tiny_llama(), rows_loader(), LLAMA_TARGETS, progress=False,
                                         accumulate_on="device", max_device_bytes=60_000)
    except lora_da.LoraDAError as e:
        pytest.fail(f"a multi-pass plan broke a valid persistent-workers DataLoader: {e}")
    assert len(dev.plan.passes) > 1
    assert_same(host, dev)


# -- change 4: σ's filtered iteration bounded above by 0 ----------------------------------------


def low_rank_psd(n: int, k: int, seed: int, scale: float) -> torch.Tensor:
    """``X Xᵀ`` of rank ``k``: ``ΔᵀΔ`` or ``ΔΔᵀ`` when ``Ḡ`` has rank ``k`` (a mean gradient over
    fewer than ``n`` tokens), or any ``S`` with a single nonzero eigenvalue (``k = 1``)."""
    g = np.random.default_rng(seed)
    X = g.standard_normal((n, k)) * np.logspace(0, -g.uniform(0, 4), k) * scale
    return torch.from_numpy(X @ X.T)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(520, 640), k=st.integers(1, 12), seed=st.integers(0, 2**16),
       scale=st.floats(-3, 3).map(lambda e: 10.0**e))
def test_sigma_of_a_low_rank_matrix_comes_from_the_iteration_not_the_dense_fallback(n, k, seed, scale):
    """``_top_eigenvalue`` with ``upper=0.0``: for ``S`` of rank below the block's 17 columns,
    the initial block's top Ritz value of ``−S`` is a rounding of 0, and whenever it rounds to
    ``≥ 0`` the loop's ``if not upper > a: break`` leaves at once, residual ∞, for the dense
    solve of the whole ``n × n`` (on a GPU a full ``eigh``; silent: σ's notes are dropped). The
    old 12 power steps took 1 to 6 block products here. The answer is right; the route is the
    dense fallback SPEC keeps for spectra the filter cannot handle, on the easiest one."""
    S = low_rank_psd(n, k, seed, scale)
    ref = float(np.linalg.eigvalsh(S.numpy())[-1])
    dense = []
    real = torch_solve.dense_bottom
    torch_solve.dense_bottom = lambda *a, **kw: (dense.append(a[0].shape), real(*a, **kw))[1]
    try:
        got = torch_solve._top_eigenvalue(S)
    finally:
        torch_solve.dense_bottom = real
    assert abs(got - ref) <= 1e-9 * ref
    assert not dense, f"σ of a rank-{k} {n} × {n} matrix fell back to the dense solve"


def spread_psd(n: int, scale: float) -> torch.Tensor:
    g = np.random.default_rng(0)
    Q, _ = np.linalg.qr(g.standard_normal((n, n)))
    S = (Q * np.linspace(0.1, 1.0, n)) @ Q.T
    return torch.from_numpy((S + S.T) / 2 * scale)


@pytest.mark.parametrize("scale", [2.0**-540, 2.0**-600])
def test_sigma_at_a_tiny_scale_is_the_top_eigenvalue(scale):
    """*Pre-existing*, in the iteration σ now runs through: residuals are ``vector_norm``s of
    entries near ``1e-10·‖S‖``; below ``‖S‖ ≈ 1e-155`` their squares underflow, the residual
    reads 0.0, and the first Ritz value is returned (0.47 % low here: σ to 2e-3, not 1e-9).
    ``S`` is a plain PSD matrix times a power of two, so the answer scales exactly."""
    S0 = spread_psd(600, 1.0)
    ref = float(np.linalg.eigvalsh(S0.numpy())[-1])
    got = torch_solve._top_eigenvalue(S0 * scale) / scale
    assert abs(got - ref) <= 1e-9 * ref, f"σ² off by {abs(got - ref) / ref:.2e} relative at scale {scale:.1e}"


@pytest.mark.parametrize("scale", [2.0**600, 2.0**900])
def test_sigma_at_a_huge_scale_comes_from_the_iteration(scale):
    """*Pre-existing*: above ``‖S‖ ≈ 1e155`` the residuals' squares overflow, the residual reads
    ∞ at every step, and σ comes from the dense fallback after 500+ block products (the
    answer right, the time ~40 times the iteration's)."""
    S = spread_psd(600, scale)
    dense = []
    real = torch_solve.dense_bottom
    torch_solve.dense_bottom = lambda *a, **kw: (dense.append(a[0].shape), real(*a, **kw))[1]
    try:
        torch_solve._top_eigenvalue(S)
    finally:
        torch_solve.dense_bottom = real
    assert not dense, f"σ of a spread 600 × 600 spectrum at scale {scale:.1e} fell back to the dense solve"


def test_the_power_steps_bound_the_spectrum_of_omega_from_above(monkeypatch):
    """*Pre-existing* (the every-fourth-step QR changes nothing here): ``_upper_bound``'s docstring
    promised "an upper bound of the spectrum", but its 12 power steps on ``Ω′ − lower·I``
    barely separate the top from the bulk when ``lower = −ασ²`` sits far below it (ratio
    ``1 + λ/ασ²``): the Ritz value plus its residual bounds *an* eigenvalue, not the largest.
    Here (a solve of 560 inputs, cond(Z) = 1e6, a rank-1 signal) it gave 2.28e9 for
    λ_max = 4.10e9; the filter then amplifies what lies above it instead of damping it.
    (Lead's revision after the fix: the bound is now documented as an estimate, and the
    iteration raises it when the filtered block's top Ritz value reaches it; here the bound is
    forced near the bottom of the spectrum, and the solve must still converge by the filter, to the
    dense reference's subspace, with the top of the spectrum not above the final bound.)"""
    from lora_da.reference import subspace_sin_theta
    from lora_da.synthetic import make_problem

    seen = []
    real = torch_solve._upper_bound

    def too_low(Omega, lower):
        upper, top = real(Omega, lower)
        seen.append(float(np.linalg.eigvalsh(Omega.numpy())[-1]))
        return lower + 1e-3 * (upper - lower), top  # below the start block's top Ritz value

    monkeypatch.setattr(torch_solve, "_upper_bound", too_low)
    p = make_problem(560, 64, cond=1e6, seed=2, signal_rank=1, signal=1.0)
    got = torch_solve.solve_group_device(torch.tensor(p.Z), [torch.tensor(p.y)], [torch.tensor(p.G)], rank=8,
                                         n_pop=100.0)[0]
    assert seen
    assert got.method == "chebyshev", got.notes
    monkeypatch.setattr(torch_solve, "_upper_bound", real)
    dense = torch_solve.solve_group_device(torch.tensor(p.Z), [torch.tensor(p.y)], [torch.tensor(p.G)], rank=8,
                                           n_pop=100.0, method="dense")[0]
    assert subspace_sin_theta(dense.V, got.V) <= 1e-8


def test_an_oom_forming_a_pass_z_for_its_solve_is_recovered(monkeypatch):
    """*Pre-existing*: SPEC §7 "out of device memory in lora-da's own allocations, nothing summed
    is lost"; a device solve that fails is retried, then solved on the host. In
    ``collect_and_solve`` the full ``Z`` a pass's solve needs is formed by
    ``DeviceSums.unit_statistics`` (an ``n × n`` of lora-da's, counted in ``Unit.solve_bytes``)
    outside that retry: out of memory there, the run ends in torch's raw OutOfMemoryError (its
    Gram blocks already popped from the sums), not in a recovered solve nor a LoraDAError that
    says what would fit."""
    from lora_da.memory import OutOfMemoryError

    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    ids, mask = data()
    ref = lora_da.collect_and_solve(tiny_llama(), batches(ids, mask, 2), LLAMA_TARGETS, cfg, progress=False,
                                    accumulate_on="device")
    monkeypatch.setattr(device_sums, "symmetric_from_lower", failing_on(
        device_sums.symmetric_from_lower, {1}, lambda k: OutOfMemoryError("injected: CUDA out of memory forming Z for a solve")))
    try:
        got = lora_da.collect_and_solve(tiny_llama(), batches(ids, mask, 2), LLAMA_TARGETS, cfg, progress=False,
                                        accumulate_on="device")
    except OutOfMemoryError as e:
        pytest.fail(f"out of memory forming a solve's Z ended the run: {e}")
    for n in ref:
        assert np.abs(ref[n].result.B - got[n].result.B).max() <= 1e-8 * np.abs(ref[n].result.B).max(), n
