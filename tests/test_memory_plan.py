"""Every GPU size (SPEC §7): the plan counts what the device will hold and
chooses micro-batches, passes and solve places; out-of-memory errors from
lora-da's own work shrink the plan and the work goes on from where it stopped.
Run on the CPU with the planned device path (``accumulate_on="device"``) and
fault injection: an allocation or a step that raises ``OutOfMemoryError``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, batches, data, device_sums_of, sums_units, tiny_llama, units_7b

import lora_da
import lora_da.collect as collect
import lora_da.init as init
import lora_da.pipeline as pipeline
import lora_da.collect.device_sums as device_sums
from lora_da.collect.device_sums import DeviceSums
from lora_da.memory import OutOfMemoryError
from lora_da.plan import MARGIN_BYTES, MARGIN_FRACTION, GiB, Step, Unit, choose_plan, gram_bytes, margin, transient_bytes
from lora_da.reference import reference_solve, subspace_sin_theta

GRAM_ROWS = [(0, 1024), (1024, 2048)]


def host_statistics(bs=3, targets=LLAMA_TARGETS, **kw):
    ids, mask = data()
    return lora_da.collect_statistics(tiny_llama(), batches(ids, mask, bs), targets, progress=False, **kw)


def device_statistics(bs=3, targets=LLAMA_TARGETS, **kw):
    ids, mask = data()
    return lora_da.collect_statistics(tiny_llama(), batches(ids, mask, bs), targets, progress=False,
                                      accumulate_on="device", **kw)


def assert_same(a, b, rel=1e-13):
    """The sums of every sample, each once: a lost or a doubled contribution moves them by far more."""
    assert a.groups() == b.groups() and a.n_samples == b.n_samples
    for n in a.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            x, y = getattr(a, f)(n), getattr(b, f)(n)
            assert np.abs(x - y).max() <= rel * np.abs(x).max(), (n, f)
        assert a.output_factors[n].tokens == b.output_factors[n].tokens
    for g in a.input_factors:
        assert a.input_factors[g].tokens == b.input_factors[g].tokens


# -- the planner's byte counts against what is allocated ------------------------------------


def test_unit_bytes_equal_the_tensors_the_pass_allocates():
    """``Unit.device_bytes`` (what the plan counts) against the sizes of the
    tensors ``DeviceSums`` actually holds, for groups of one and of several
    modules and for n below, at and above the Gram's block size."""
    units = sums_units()
    sums = device_sums_of(units, "cpu")
    held = sum(t.numel() * t.element_size() for blocks in sums.gram.values() for t in blocks)
    held += sum(t.numel() * t.element_size() for d in (sums.grad, sums.sumsq) for t in d.values())
    assert held == sum(u.device_bytes for u in units)
    assert gram_bytes(2048) == 8 * (1024 * 1024 + 1024 * 2048)  # two row blocks: 3/4 of the full matrix


def test_host_bytes_equal_the_statistics_kept():
    """``Unit.host_bytes`` against the bytes a collected ``Statistics`` holds (packed sums and
    compensations, Ḡ, y and its compensation)."""
    stats = host_statistics()
    run_units = {}
    for name, info in stats.modules.items():
        run_units.setdefault(info.input_group, []).append((name, info.out_features))
    units = [Unit(g, stats.input_factors[g].n, tuple(mods)) for g, mods in run_units.items()]
    held = sum(a.nbytes for f in stats.input_factors.values() for a in f.packed_raw())
    held += sum(a.nbytes for f in stats.output_factors.values() for a in f.sum_raw())
    held += sum(g.nbytes for g in stats.grad_sums.values())
    assert held == sum(u.host_bytes for u in units)


# One torch_solve of one group in a fresh process, its peak resident memory above what it held
# before: every buffer of 64 KiB or more is its own mapping (a fixed mmap threshold; glibc's
# dynamic one would keep freed buffers in the heap), NumPy's huge pages are off (they round
# up to 2 MiB), and VmHWM is reset to VmRSS before the solve (/proc/self/clear_refs). This
# counts torch's CPU tensors and the NumPy arrays SciPy's LAPACK calls make alike.
_SOLVE_PEAK = r"""
import json, re, sys
import torch
from lora_da.synthetic import make_problem
from lora_da.torch_solve import solve_group_device

def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024

n, m, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
p = make_problem(n, m, cond=1e4, seed=1, signal_rank=8, signal=10.0)
Z, ys, Gs = torch.tensor(p.Z), [torch.tensor(p.y)], [torch.tensor(p.G)]
solve = lambda: solve_group_device(Z, ys, Gs, rank=8, n_pop=100.0, method=method)
solve()  # the libraries' one-time buffers
peaks = []
for _ in range(2):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        print(json.dumps({"skip": str(e)}))
        sys.exit(0)
    before = status("VmRSS")
    res = solve()
    peaks.append(status("VmHWM") - before)
print(json.dumps({"peak": min(peaks), "method": res[0].method}))
"""


@pytest.mark.parametrize("method", ["auto", "dense"])
def test_solve_bytes_bound_what_a_torch_solve_holds(method):
    """``Unit.solve_bytes`` (the work space the plan keeps free beside a pass's sums for each
    device solve) against the peak of what one solve of one group allocates on the CPU, by
    the filtered subspace iteration (``auto``) and the dense route: at least the peak, and
    not so far above it that the plan would split passes for nothing."""
    import json
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    n, m = 400, 100
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", NUMPY_MADVISE_HUGEPAGE="0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _SOLVE_PEAK, str(n), str(m), method], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in got:
        pytest.skip(got["skip"])
    assert got["method"] == ("chebyshev" if method == "auto" else "dense")
    # on the CPU the dense route is LAPACK's for the bottom pairs only: the same bound
    # (the device's full eigensolver has its own, Unit.dense_solve_bytes, in test_gpu.py)
    need = Unit("g", n, (("g", m),)).solve_bytes
    assert got["peak"] > 2 * 8 * n * n  # the measure sees the n × n work space (Z_λ⁻¹, Ω′, …)
    assert got["peak"] <= need <= 1.5 * got["peak"], (got["peak"], need)


# -- choosing a plan -------------------------------------------------------------------------


def test_a_step_too_large_for_its_sums_is_split_into_micro_batches():
    """A 24 GiB card with a 7B model: a batch of 8 takes 17.8 GiB in one step,
    which leaves no room for a down_proj group's sums; halving it does."""
    step = Step(samples=8, bytes=int(17.8 * GiB), seconds=0.25, tokens_per_sample=512, calls=224, widest=11008 + 8192)
    free = int(11.4 * GiB)
    plan = choose_plan(units_7b(), step, batch=8, device_free=free, max_device_bytes=None, host_free=None,
                       max_host_bytes=None, keep_on_host=False)
    assert plan.micro_batch < 8
    reserve = plan.reserve
    assert reserve >= step.bytes * plan.micro_batch // 8
    # everything the device holds at the peak of a pass fits what was free
    assert all(sum(u.device_bytes for u in p) + reserve <= free for p in plan.passes)
    assert "split into micro-batches" in plan.describe() and "why:" in plan.describe()
    # and every pass leaves its solves room (the step's memory is free again then)
    for p in plan.passes:
        used = sum(u.device_bytes for u in p)
        assert used + max(u.solve_bytes for u in p) <= free


def test_a_solve_that_fits_nowhere_goes_to_the_host():
    units = [Unit("small", 64, (("small", 32),)), Unit("big", 2048, (("big", 64),))]
    big = units[1]
    # what is left after the allocator's margin holds its sums and half its solve's work space
    free = int((big.device_bytes + big.solve_bytes // 2 + MARGIN_BYTES) / (1 - MARGIN_FRACTION))
    step = Step(samples=1, bytes=0, seconds=0.0, tokens_per_sample=4, calls=2, widest=2048 + 128)
    plan = choose_plan(units, step, batch=1, device_free=free, max_device_bytes=None, host_free=None,
                       max_host_bytes=None, keep_on_host=False)
    assert plan.host_solves == ("big",)
    assert "solved on the host" in plan.describe()


def test_refusal_names_what_is_needed_and_what_is_free():
    step = Step(samples=1, bytes=10 * GiB, seconds=0.1, tokens_per_sample=512, calls=4, widest=100)
    with pytest.raises(lora_da.InvalidArgumentError, match=r"input group .* needs .* GiB .* budget is"):
        choose_plan(units_7b(1), step, batch=1, device_free=11 * GiB, max_device_bytes=None, host_free=None,
                    max_host_bytes=None, keep_on_host=False)


def test_two_solves_at_once_only_where_both_fit():
    units = units_7b(2)
    step = Step(samples=1, bytes=GiB, seconds=0.1, tokens_per_sample=512, calls=56, widest=11008 + 8192)
    roomy = choose_plan(units, step, batch=1, device_free=200 * GiB, max_device_bytes=None, host_free=None,
                        max_host_bytes=None, keep_on_host=False)
    assert roomy.solve_workers == 2 and len(roomy.passes) == 1
    down = next(u for u in units if u.n == 11008)
    tight = down.device_bytes + down.solve_bytes + 2 * GiB
    plan = choose_plan(units, step, batch=1, device_free=tight, max_device_bytes=None, host_free=None,
                       max_host_bytes=None, keep_on_host=False)
    for p in plan.passes:
        assert worst_solve_moment(plan.solve_order(p), plan.solve_workers) <= tight


def worst_solve_moment(order, workers):
    """Brute force over the moments a pass's solves can meet: when the ``k``-th starts, the
    sums of it and every later group are still held, and any ``workers − 1`` earlier solves may
    still run with their sums and work space."""
    import itertools

    worst = 0
    for k, u in enumerate(order):
        later = sum(v.device_bytes for v in order[k:])
        for running in itertools.combinations(order[:k], min(workers - 1, k)):
            worst = max(worst, later + u.solve_bytes + sum(v.device_bytes + v.solve_bytes for v in running))
    return worst


def test_the_largest_solves_wait_for_the_other_groups_sums_where_memory_is_short():
    """A 24 GiB card with a 7B model: a down_proj's solve takes 3.8 GB of work space. Solved
    first, beside the whole pass's sums, it bounds every pass by it; solved last, when the
    other groups' sums are freed, the passes hold more sums, and none is over at any moment."""
    units = units_7b(32)
    step = Step(samples=2, bytes=GiB // 4, seconds=0.1, tokens_per_sample=512, calls=224, widest=11008 + 8192)
    free = int(8 * GiB)
    plan = choose_plan(units, step, batch=2, device_free=free, max_device_bytes=None, host_free=None,
                       max_host_bytes=None, keep_on_host=False)
    room = free - margin(free)
    for p in plan.passes:
        order = plan.solve_order(p)
        assert sorted(u.group for u in order) == sorted(u.group for u in p)
        assert worst_solve_moment(order, plan.solve_workers) <= room
    largest_first = [p for p in plan.passes
                     if worst_solve_moment(sorted(p, key=lambda u: -u.n), plan.solve_workers) > room]
    assert largest_first, "the plan should need the other order somewhere"
    # the planner of before (every pass held its largest solves beside all its sums) needed more passes
    old = 1
    used = 0
    for u in units:
        if used and used + u.device_bytes + 2 * max(v.solve_bytes for v in units) > room:
            old, used = old + 1, 0
        used += u.device_bytes
    assert len(plan.passes) < old


@pytest.mark.parametrize("keep_on_host", [True, False])
def test_later_passes_hold_more_sums_when_the_graph_starts_at_each_pass(keep_on_host):
    """A 24 GiB card with a 7B model: the step measured with its graph from the first group
    (4.5 GiB at micro-batch 2) and from the last (1.0 GiB). Each pass's reserve interpolates
    by its first group's share of the calls, so later passes hold more sums: fewer passes than
    a plan that holds the whole step back in every pass (keeping the statistics; solving each
    pass, the solves' work space bounds the sums too), and every pass still fits."""
    units = units_7b(32)
    calls = [name for u in units for name, _ in u.modules]
    shares = {u.group: (len(calls) - calls.index(u.modules[0][0])) / len(calls) for u in units}
    full = Step(samples=2, bytes=int(4.5 * GiB), seconds=0.1, tokens_per_sample=512, calls=len(calls),
                widest=11008 + 8192)
    graph = Step(**{**full.__dict__, "top_bytes": int(1.0 * GiB), "shares": tuple(shares.items())})
    free = int(11.7 * GiB)
    kw = dict(batch=2, device_free=free, max_device_bytes=None, host_free=None, max_host_bytes=None,
              keep_on_host=keep_on_host)
    flat, plan = choose_plan(units, full, **kw), choose_plan(units, graph, **kw)
    assert len(plan.passes) < len(flat.passes)
    mb = plan.micro_batch
    assert plan.reserves == sorted(plan.reserves, reverse=True) and plan.reserves[0] > plan.reserves[-1]
    room = free - margin(free)
    for p, reserve in zip(plan.passes, plan.reserves):
        sums = sum(u.device_bytes for u in p)
        # the reserve at least the graph's share of the step above its top, and the sums fit beside it
        step_part = reserve - transient_bytes(graph, mb) - margin(free)
        top = graph.top_bytes * mb / 2
        assert step_part >= top + (full.bytes * mb / 2 - top) * shares[p[0].group] - 1
        assert sums + reserve <= free
        if not keep_on_host:
            assert worst_solve_moment(plan.solve_order(p), plan.solve_workers) <= room
    assert "graph starts at its first module" in plan.describe()


def test_a_pass_over_upper_layers_keeps_no_graph_below_it():
    """On the planned device path each pass's graph starts at its own first module: in a pass
    over layer 1 the modules of layer 0 run without a graph (their outputs take no gradient),
    while the statistics equal the host path's, which back-propagates from the embedding."""
    host = host_statistics()
    model = tiny_llama()
    seen = []
    low = model.model.layers[0].mlp.down_proj
    handle = low.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad) if torch.is_grad_enabled()
                                       else None)
    ids, mask = data()
    targets = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    try:
        dev = lora_da.collect_statistics(model, batches(ids, mask, 3), targets, progress=False, accumulate_on="device")
    finally:
        handle.remove()
    # the probe runs the whole graph once (the first entry); every pass after it, none below layer 1
    assert seen[0] is True and seen[1:] and not any(seen[1:])
    for name in targets:
        for f in ("mean_grad", "input_factor", "output_factor"):
            x, y = getattr(host, f)(name), getattr(dev, f)(name)
            assert np.abs(x - y).max() <= 1e-13 * np.abs(x).max(), (name, f)


def test_the_graph_shares_follow_the_calls():
    """Input groups in the order of their first calls, each with the share of the calls from it on."""
    from lora_da.collect.passes import graph_shares

    units = [Unit("b", 4, (("b", 2),)), Unit("a", 4, (("a", 2), ("a2", 3)))]
    shares = graph_shares(["a", "a2", "b", "a"], units)
    assert shares == {"a": 1.0, "b": 0.5}


# -- small batches joined into larger steps ----------------------------------------------------


def test_batches_of_one_are_joined_into_larger_steps_and_sum_the_same(monkeypatch):
    """Batches of one sample (the research code's way) joined into the plan's steps where their
    shapes agree: the statistics equal the host path's, which adds every batch alone."""
    import lora_da.collect.passes as passes

    monkeypatch.setattr(passes, "joins_batches", lambda dev: True)
    joined = []
    real = passes.batch_steps

    def spy(run, batch, bsz, *a):
        joined.append(bsz)
        return real(run, batch, bsz, *a)

    monkeypatch.setattr(passes, "batch_steps", spy)
    host = host_statistics(bs=1)
    dev = device_statistics(bs=1)
    assert dev.plan.batch == 1 and dev.plan.micro_batch > 1
    assert "joined into steps" in dev.plan.describe()
    assert max(joined) > 1 and sum(joined) == 6 * len(dev.plan.passes)
    assert_same(host, dev)


def test_batches_of_other_shapes_are_not_joined(monkeypatch):
    """Sequences of other lengths (dynamic padding) stay apart: a step joins only what concatenates."""
    import lora_da.collect.passes as passes

    monkeypatch.setattr(passes, "joins_batches", lambda dev: True)
    ids, mask = data()
    rows = [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]} for i, n in
            enumerate([9, 9, 7, 7, 9, 8])]
    host = lora_da.collect_statistics(tiny_llama(), rows, LLAMA_TARGETS, progress=False)
    dev = lora_da.collect_statistics(tiny_llama(), rows, LLAMA_TARGETS, progress=False, accumulate_on="device")
    assert dev.plan.micro_batch > 1
    assert_same(host, dev)
    assert passes.joinable(rows[0], 1, rows[1], 1) and not passes.joinable(rows[1], 1, rows[2], 1)
    assert not passes.joinable({"input_ids": ids[:1], "k": 1}, 1, {"input_ids": ids[1:2], "k": 2}, 1)


def test_an_oom_in_a_joined_step_loses_nothing(monkeypatch):
    """The k-th float64 copy of a joined step fails: the step is redone at half its size
    without the calls already summed, and nothing is lost or counted twice."""
    import lora_da.collect.passes as passes

    monkeypatch.setattr(passes, "joins_batches", lambda dev: True)
    host = host_statistics(bs=1)
    monkeypatch.setattr(device_sums, "float64_copy", fail_copy_on({9}))
    dev = device_statistics(bs=1)
    assert any("micro-batch lowered" in n for n in dev.plan.notes)
    assert_same(host, dev)


# -- out of memory in the first step ---------------------------------------------------------


def oom_above(limit):
    """A loss that runs out of memory on more than ``limit`` samples (a step too large for the device)."""
    def loss(model, batch):
        if batch["input_ids"].shape[0] > limit:
            raise OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 2.00 GiB")
        return collect.default_loss(model, batch)
    return loss


def test_a_first_batch_that_does_not_fit_is_probed_smaller_and_split():
    host = host_statistics(bs=6)
    dev = device_statistics(bs=6, loss_fn=oom_above(2))
    assert dev.plan.micro_batch <= 2 and dev.plan.batch == 6
    assert any("it fit at 2" in n for n in dev.plan.notes)
    assert_same(host, dev)


def test_not_even_one_sample_fits():
    with pytest.raises(lora_da.LoraDAError, match="one sample's forward \\+ backward does not fit"):
        device_statistics(bs=3, loss_fn=oom_above(0))


# -- out of memory during a pass ---------------------------------------------------------


def failing_on(real, calls, error=lambda k: OutOfMemoryError(f"injected at call {k}")):
    """``real`` raising ``error(k)`` on its k-th calls (counted from 1); ``.calls`` counts them all."""
    def fn(*a, **kw):
        fn.calls += 1
        if fn.calls in calls:
            raise error(fn.calls)
        return real(*a, **kw)
    fn.calls = 0
    return fn


def fail_copy_on(calls):
    """lora-da's per-call float64 copy raising on its k-th calls (counted from 1)."""
    return failing_on(device_sums.float64_copy, calls)


@pytest.mark.parametrize("k", [1, 5, 16, 23, 28])  # 14 modules, 2 copies each per step
def test_an_oom_in_a_hook_halves_the_micro_batch_and_loses_nothing(monkeypatch, k):
    """The k-th float64 copy fails (mid-backward: some modules of the step were
    summed, others not): the step is redone at half the micro-batch without the
    summed calls, and the statistics equal the host path's."""
    host = host_statistics(bs=6)
    monkeypatch.setattr(device_sums, "float64_copy", fail_copy_on({k}))
    dev = device_statistics(bs=6)
    assert dev.plan.micro_batch == 6  # planned at 6, lowered on the way
    assert any("micro-batch lowered to 3" in n for n in dev.plan.notes)
    assert_same(host, dev)


def test_repeated_ooms_go_down_to_one_sample(monkeypatch):
    host = host_statistics(bs=6)
    monkeypatch.setattr(device_sums, "float64_copy", fail_copy_on({3, 20, 40}))
    dev = device_statistics(bs=6)
    assert_same(host, dev)


def test_an_oom_at_one_sample_is_an_error_that_says_what_to_do(monkeypatch):
    monkeypatch.setattr(device_sums, "float64_copy", fail_copy_on(set(range(7, 10**6))))
    with pytest.raises(lora_da.LoraDAError, match="micro-batches of one sample.*max_device_bytes"):
        device_statistics(bs=2)


def test_an_oom_at_one_sample_that_a_release_cures_is_redone_as_it_is(monkeypatch):
    """Batches of one sample: the 5th float64 copy fails once (fragments the release gives
    back); the step is redone at one sample, in the same pass, and nothing is lost."""
    host = host_statistics(bs=1)
    monkeypatch.setattr(device_sums, "float64_copy", fail_copy_on({5}))
    dev = device_statistics(bs=1)
    assert len(dev.plan.passes) == 1 and dev.plan.micro_batch == 1
    assert any("redone after releasing" in n for n in dev.plan.notes)
    assert_same(host, dev)


def oom_while_holding_more_than(groups: int, after: int):
    """DeviceSums.add that runs out of memory, from its ``after``-th call on, whenever its pass
    holds more than ``groups`` input groups: only smaller passes fit."""
    real = DeviceSums.add
    calls = {"n": 0}

    def add(self, target, x, g, key):
        calls["n"] += 1
        if calls["n"] > after and len(self.units) > groups and target.name in self.grad:
            raise OutOfMemoryError(f"injected: a pass of {len(self.units)} groups at call {calls['n']}")
        return real(self, target, x, g, key)
    return add


@pytest.mark.parametrize("kw", [{}, {"output_fisher": "sequence_lowrank"}, {"out": True}])
def test_an_oom_that_persists_at_one_sample_moves_half_the_pass_out(monkeypatch, tmp_path, kw):
    """From the 30th call (the first batches summed), a pass of more than two input groups
    runs out of memory at every step, one sample too: halves of the pass move to passes of
    their own until each fits. The groups that stay keep what they summed, the moved ones
    are summed again from the start: the statistics equal the host path's (and a streamed
    file, written in the planned order, is valid and the same)."""
    host = host_statistics(bs=2, **{k: v for k, v in kw.items() if k != "out"})
    monkeypatch.setattr(DeviceSums, "add", oom_while_holding_more_than(2, after=30))
    if kw.get("out"):
        kw = {"out": tmp_path / "stats.safetensors"}
    dev = device_statistics(bs=2, **kw)
    assert len(dev.plan.passes) >= 4 and max(len(p) for p in dev.plan.passes) <= 2
    assert any("redone after releasing" in n for n in dev.plan.notes)
    assert any("moved from pass 1 to a pass of their own" in n for n in dev.plan.notes)
    assert_same(host, dev)
    if "output_fisher" in kw:
        for n in host.modules:
            assert np.allclose(host.output_factors[n].sample_sums(), dev.output_factors[n].sample_sums(), rtol=1e-13)
    if "out" in kw:
        again = lora_da.Statistics.load(kw["out"])
        assert_same(host, again)


def test_an_oom_at_one_sample_is_not_met_by_moving_groups_across_ranks_or_checkpoints(monkeypatch, tmp_path):
    """With checkpoints a moved group would be recorded as summed: the error instead."""
    monkeypatch.setattr(DeviceSums, "add", oom_while_holding_more_than(2, after=30))
    with pytest.raises(lora_da.LoraDAError, match="micro-batches of one sample.*could not be split"):
        device_statistics(bs=2, checkpoint_path=tmp_path / "ck.safetensors")


def test_a_pass_whose_sums_cannot_be_allocated_is_split(monkeypatch):
    host = host_statistics()
    real = DeviceSums.__init__
    sizes = []

    def init_or_oom(self, units, *a, **kw):
        sizes.append(len(units))
        if len(units) > 2:
            raise OutOfMemoryError("injected: the pass's sums")
        real(self, units, *a, **kw)

    monkeypatch.setattr(DeviceSums, "__init__", init_or_oom)
    dev = device_statistics()
    assert len(dev.plan.passes) > 1 and max(len(p) for p in dev.plan.passes) <= 2
    assert any("split it in two" in n for n in dev.plan.notes)
    assert_same(host, dev)


# -- out of memory in a device solve -----------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "krylov"])  # krylov: the host's result is the core's SolveResult
def test_a_device_solve_that_runs_out_of_memory_is_solved_on_the_host(monkeypatch, method):
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0, method=method)
    stats = host_statistics()
    calls = {"n": 0}
    real = init._solve_on_device

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] <= 3:  # the first group fails twice (host route), the second once (retried on the device)
            raise OutOfMemoryError("injected: the solve's work space")
        return real(*a, **kw)

    monkeypatch.setattr(init, "_solve_on_device", flaky)
    ids, mask = data()
    got = pipeline.collect_and_solve(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, cfg, progress=False,
                                 accumulate_on="device")
    on_host = [name for name, i in got.items() if any("solved on the host" in n for n in i.result.notes)]
    assert on_host  # the first group solved (the widest: down_proj)
    for n in stats.modules:
        ref = reference_solve(stats.input_factor(n), stats.output_factor(n), stats.mean_grad(n), rank=2, n_pop=100.0,
                              gamma=4.0)
        assert subspace_sin_theta(ref.V, got[n].result.V) <= 1e-8
        assert np.abs(ref.B - got[n].B).max() <= 1e-8 * np.abs(ref.B).max()


CUSOLVER_HANDLE = ("cusolver error: CUSOLVER_STATUS_INTERNAL_ERROR, when calling `cusolverDnCreate(handle)`. "
                   "If you keep seeing this error, you may use `torch.backends.cuda.preferred_linalg_library()`")


def test_a_cuda_librarys_own_out_of_memory_error_is_handled_as_one(monkeypatch):
    """A solve thread's cuSOLVER handle could not be created (the H200's whole-GPU 7B cell):
    the solve is retried, as after torch's own out-of-memory error, and the result is the
    reference's. An unrelated RuntimeError is not taken for one."""
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    stats = host_statistics()
    real = init._solve_on_device
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(CUSOLVER_HANDLE)
        return real(*a, **kw)

    monkeypatch.setattr(init, "_solve_on_device", flaky)
    got = lora_da.compute_init(stats, cfg, progress=False, device="cpu")
    assert calls["n"] == len(stats.groups()) + 1  # the first group twice
    for n in stats.modules:
        ref = reference_solve(stats.input_factor(n), stats.output_factor(n), stats.mean_grad(n), rank=2, n_pop=100.0,
                              gamma=4.0)
        assert subspace_sin_theta(ref.V, got[n].result.V) <= 1e-8
    monkeypatch.setattr(init, "_solve_on_device", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        lora_da.compute_init(stats, cfg, progress=False, device="cpu")


def test_a_library_out_of_memory_error_inside_a_solve_is_not_called_non_finite(monkeypatch):
    """torch_solve turns a RuntimeError of extreme values into NonFiniteError naming the module;
    a CUDA library's out-of-memory error must reach the caller's retry instead."""
    from lora_da import torch_solve

    def oom(*a, **kw):
        raise RuntimeError(CUSOLVER_HANDLE)

    monkeypatch.setattr(torch_solve, "bottom_eigenpairs", oom)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 12))
    Z, G, y = torch.from_numpy(X.T @ X / 64), torch.from_numpy(rng.standard_normal((5, 12))), torch.ones(5)
    with pytest.raises(RuntimeError, match="cusolverDnCreate") as err:
        torch_solve.solve_group_device(Z, [y.double()], [G], rank=2, n_pop=10.0, names=["q"])
    assert not isinstance(err.value, lora_da.LoraDAError)


def test_a_cublas_allocation_failure_in_a_step_halves_the_micro_batch(monkeypatch):
    """cuBLAS's own allocation failure inside a hook's product: the step is redone smaller, nothing lost;
    another RuntimeError in the step stays the user's error."""
    host = host_statistics(bs=6)
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    monkeypatch.setattr(device_sums, "float64_copy", failing_on(device_sums.float64_copy, {9}, lambda k: cublas))
    dev = device_statistics(bs=6)
    assert any("micro-batch lowered to 3" in n for n in dev.plan.notes)
    assert_same(host, dev)
    monkeypatch.setattr(device_sums, "float64_copy", lambda t: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        device_statistics(bs=6)


def test_a_z_that_cannot_be_formed_on_the_device_twice_is_formed_on_the_host(monkeypatch):
    """The full Z of a pass's solve fails on the device twice (released in between): it is
    assembled from the block triangle on the host; nothing lost, the same answer."""
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    ids, mask = data()
    ref = pipeline.collect_and_solve(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, cfg, progress=False,
                                     accumulate_on="device")
    flaky = failing_on(device_sums.symmetric_from_lower, {1, 2})
    monkeypatch.setattr(device_sums, "symmetric_from_lower", flaky)
    got = pipeline.collect_and_solve(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, cfg, progress=False,
                                     accumulate_on="device")
    assert flaky.calls == len(ref.report.plan.passes[0]) + 2
    for n in ref:
        assert np.array_equal(ref[n].result.B, got[n].result.B), n


def test_a_broken_cuda_context_is_not_taken_for_out_of_memory(monkeypatch):
    """cusolverDnCreate fails alike on a full device and on a context broken by a device-side
    assert; only the second fails a synchronization too, and only the first is out of memory."""
    from lora_da import memory

    err = RuntimeError(CUSOLVER_HANDLE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    assert memory.out_of_memory(err)
    assert not memory.out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))

    def broken(*a):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    assert not memory.out_of_memory(err)
    assert memory.out_of_memory(OutOfMemoryError("CUDA out of memory"))


def test_a_shuffled_loader_after_a_recovery_split_is_told_why_there_were_two_passes(monkeypatch):
    """A one-pass plan split by the recovery at one sample, on data whose order changes between
    passes: the error says the split came from running out of memory, not from the plan."""
    ids, mask = data()
    rng = np.random.default_rng(0)

    class Shuffled:
        def __iter__(self):
            order = rng.permutation(len(ids))
            return iter(batches(ids[order], mask[order], 2))

    monkeypatch.setattr(DeviceSums, "add", oom_while_holding_more_than(4, after=30))
    with pytest.raises(lora_da.InvalidArgumentError, match="no shuffling.*the plan had one pass, and out of device"):
        lora_da.collect_statistics(tiny_llama(), Shuffled(), LLAMA_TARGETS, progress=False, accumulate_on="device")


def test_a_pass_that_ends_in_an_error_frees_its_device_sums(monkeypatch):
    """The error's traceback references the pass's frame: its sums are freed before it leaves,
    so a caller that catches the error and tries again does not run beside them."""
    made = []
    real = DeviceSums.__init__

    def init_and_keep(self, *a, **kw):
        real(self, *a, **kw)
        made.append(self)

    def loss(model, batch):
        if len(made) and made[-1].batch_samples >= 3:
            raise ValueError("the user's loss failed")
        return collect.default_loss(model, batch)

    monkeypatch.setattr(DeviceSums, "__init__", init_and_keep)
    with pytest.raises(ValueError, match="the user's loss failed"):
        device_statistics(bs=3, loss_fn=loss)
    assert made and not made[-1].grad and not made[-1].gram and not made[-1].units


def test_compute_init_on_a_device_falls_back_to_the_host_too(monkeypatch):
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    stats = host_statistics()
    monkeypatch.setattr(init, "_solve_on_device", lambda *a, **kw: (_ for _ in ()).throw(OutOfMemoryError("injected")))
    got = lora_da.compute_init(stats, cfg, progress=False, device="cpu")
    for n in stats.modules:
        ref = reference_solve(stats.input_factor(n), stats.output_factor(n), stats.mean_grad(n), rank=2, n_pop=100.0,
                              gamma=4.0)
        assert subspace_sin_theta(ref.V, got[n].result.V) <= 1e-8
        assert "solved on the host" in got[n].result.notes[-1]


# -- keeping the statistics: the host's share checked first, or streamed to disk ----------------------


def counting_loss():
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        return collect.default_loss(model, batch)
    return loss, calls


@pytest.mark.parametrize("kw", [{}, {"output_fisher": "sequence_lowrank"}, {"max_device_bytes": 40_000}])
def test_statistics_streamed_to_disk_equal_the_in_memory_ones_bit_for_bit(tmp_path, kw):
    """``out=`` writes each pass's sums into the file as the pass ends; the result is
    memory-mapped from it and equals the in-memory collection exactly (device sums are
    plain float64 sums, so the in-memory accumulators hold them with zero compensation)."""
    mem = device_statistics(**kw)
    path = tmp_path / "stats.safetensors"
    st = device_statistics(out=path, **kw)
    assert (len(st.plan.passes) > 1) == ("max_device_bytes" in kw)
    for n in mem.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            assert np.array_equal(getattr(mem, f)(n), getattr(st, f)(n)), (n, f)
        if "output_fisher" in kw:
            assert np.array_equal(mem.output_factors[n].sample_sums(), st.output_factors[n].sample_sums())
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0, output_fisher=kw.get("output_fisher", "diagonal"))
    a, b = lora_da.compute_init(mem, cfg, progress=False), lora_da.compute_init(st, cfg, progress=False)
    assert all(np.array_equal(a[n].A, b[n].A) and np.array_equal(a[n].B, b[n].B) for n in a)
    # the file is a valid statistics file, read eagerly too, and nothing is left beside it
    again = lora_da.Statistics.load(path)
    assert all(np.array_equal(again.mean_grad(n), mem.mean_grad(n)) for n in mem.modules)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]
    with pytest.raises(lora_da.InvalidArgumentError, match="memory-mapped"):
        st.merge(mem)


@pytest.mark.parametrize("chunk", [None, 8 * 7])
def test_a_mapped_file_reads_each_grad_into_a_buffer_bit_for_bit_and_checked(tmp_path, monkeypatch, chunk):
    """compute_init on a GPU reads a streamed file's Ḡ into a reused page-locked buffer
    rather than through its map: the same values as the map, and a non-finite or
    truncated tensor is still refused by name."""
    import json

    import lora_da.statistics_file as statistics_file

    if chunk is not None:  # reads of 7 float64 on the reading threads: every tensor in many pieces
        monkeypatch.setattr(statistics_file, "READ_CHUNK", chunk)
    path = tmp_path / "s.safetensors"
    stats = device_statistics(out=str(path))
    for n in stats.modules:
        want = np.asarray(stats.grad_sums[n])
        got = np.full(want.shape, np.nan)
        stats.grad_sums.read_into(n, got)
        assert np.array_equal(got, want), n
    name = stats.modules[0] if isinstance(stats.modules, list) else next(iter(stats.modules))
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8:8 + size])[f"grad.{name}"]["data_offsets"]
    bad = tmp_path / "bad.safetensors"
    at = 8 + size + start + 8 * 5
    bad.write_bytes(raw[:at] + np.array([np.inf]).tobytes() + raw[at + 8:])
    broken = lora_da.Statistics.load(bad, mmap=True)
    with pytest.raises(lora_da.StatisticsFileError, match=f"grad.{name}.*non-finite"):
        broken.grad_sums.read_into(name, np.empty(np.asarray(stats.grad_sums[name]).shape))
    # cut short after it was opened: the read that finds the end says so, by name
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw)
    short = lora_da.Statistics.load(cut, mmap=True)
    with open(cut, "r+b") as f:
        f.truncate(8 + size + start + 8 * 20)
    with pytest.raises(lora_da.StatisticsFileError, match=f"grad.{name}.*ends early"):
        short.grad_sums.read_into(name, np.empty(np.asarray(stats.grad_sums[name]).shape))


def test_compute_init_on_a_mapped_file_asks_for_each_groups_bytes_ahead(tmp_path, monkeypatch):
    """compute_init on a streamed file asks the kernel to read each group's triangle and Ḡ
    ahead of its preparation (posix_fadvise WILLNEED, every range inside the file's data),
    and gives the inits it gives from the statistics in memory, bit for bit."""
    import os

    import lora_da.init as init

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    monkeypatch.setattr(init, "READ_AHEAD", 2)
    path = tmp_path / "s.safetensors"
    mapped = device_statistics(out=str(path))
    mem = device_statistics()
    size = path.stat().st_size
    asked = []
    real = os.posix_fadvise

    def advise(fd, offset, length, advice):
        asked.append((offset, length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    a = lora_da.compute_init(mapped, cfg, progress=False, device="cpu")
    b = lora_da.compute_init(mem, cfg, progress=False, device="cpu")
    assert all(np.array_equal(a[n].A, b[n].A) and np.array_equal(a[n].B, b[n].B) for n in b)
    # every group but the first solved (the largest) asked for: its triangle and its modules' Ḡ
    order = sorted(mapped.groups().items(), key=lambda kv: -mapped.input_factors.groups[kv[0]]["n"])
    assert len(asked) == sum(1 + len(names) for _, names in order[1:])
    assert all(adv == os.POSIX_FADV_WILLNEED and 0 < off and off + n <= size for off, n, adv in asked)


def test_groups_prepared_ahead_of_the_device_solves_are_as_many_as_fit(monkeypatch):
    """compute_init on a GPU prepares up to PREPARE_AHEAD groups ahead of each solve, as many
    as fit beside the solves' work spaces in the free memory, each at the largest group's
    upload; one where nothing more fits, and one off a GPU."""
    import torch

    import lora_da.init as init

    stats = device_statistics()
    order = sorted(stats.groups().items(), key=lambda kv: -init._group_n(stats, kv[0]))
    units = [(init._group_n(stats, g), [stats.modules[n].out_features for n in names]) for g, names in order]
    upload = max(8 * (n * n + n * (n + 1) // 2 + sum(m * n for m in ms)) for n, ms in units)
    work = init.DEVICE_SOLVE_WORKERS * max(8 * (3 * n * n + 2 * max(ms) * n + 2 * min(1024, n) * n) for n, ms in units)
    cuda = torch.device("cuda")
    for free, want in [(work + 100 * upload, init.PREPARE_AHEAD), (work + 5 * upload, 3), (work, 1), (0, 1)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 1 << 40))
        assert init._prepare_ahead(stats, order, cuda) == want, free
    assert init._prepare_ahead(stats, order, torch.device("cpu")) == 1


@pytest.mark.parametrize("kw", [{}, {"output_fisher": "sequence_lowrank"}])
def test_a_gram_of_several_blocks_is_streamed_to_disk_bit_for_bit(tmp_path, monkeypatch, kw):
    """The device keeps the Gram as its lower block triangle (``GRAM_BLOCK`` rows a block): the
    blocks above the diagonal are never formed, so the file's packed triangle must be read from
    the columns of the lower one. With blocks of 12 rows every group (n = 32, 40) spans three or
    four blocks; the streamed Gram equals the in-memory one bit for bit and the host's
    accumulators to rounding."""
    monkeypatch.setattr(lora_da.plan, "GRAM_BLOCK", 12)
    path = tmp_path / "stats.safetensors"
    st = device_statistics(out=path, **kw)
    assert all(u.n > 2 * 12 for p in st.plan.passes for u in p)
    mem, host = device_statistics(**kw), host_statistics(**kw)
    for n in mem.modules:
        Z = st.input_factor(n)
        assert np.array_equal(Z, mem.input_factor(n)), n
        ref = host.input_factor(n)
        assert np.abs(Z - ref).max() <= 1e-13 * np.abs(ref).max(), n
        assert np.array_equal(st.mean_grad(n), mem.mean_grad(n))
        assert np.array_equal(st.output_factor(n), mem.output_factor(n))
    again = lora_da.Statistics.load(path)
    assert all(np.array_equal(again.input_factor(n), mem.input_factor(n)) for n in mem.modules)


def threaded_staging(monkeypatch, stage_elements=100, flush_bytes=4096):
    """The GPU's way of writing a file, on the CPU: blocks of ``stage_elements`` through two
    buffers and a writer thread, the file flushed early every ``flush_bytes``."""
    import functools

    import lora_da.collect.device_sums as device_sums
    import lora_da.collect.passes as passes
    import lora_da.statistics_file as statistics_file

    monkeypatch.setattr(device_sums, "STAGE_BYTES", 8 * stage_elements)
    monkeypatch.setattr(statistics_file, "FLUSH_BYTES", flush_bytes)
    monkeypatch.setattr(passes, "DiskStaging", functools.partial(device_sums.DiskStaging, threaded=True))


@pytest.mark.parametrize("kw", [{}, {"output_fisher": "sequence_lowrank"}, {"max_device_bytes": 40_000}])
def test_blocks_written_by_a_thread_while_the_next_are_staged_give_the_same_bits(tmp_path, monkeypatch, kw):
    """Every tensor goes to the file in blocks of 100 elements through two buffers, a thread
    writing one while the next is filled, and the file is flushed early as it grows: the
    file's Grams (blocks of 12 rows, so packed column block by column block), Ḡ and sums
    equal the in-memory collection's bit for bit."""
    threaded_staging(monkeypatch)
    monkeypatch.setattr(lora_da.plan, "GRAM_BLOCK", 12)
    path = tmp_path / "stats.safetensors"
    st = device_statistics(out=path, **kw)
    mem = device_statistics(**kw)
    for n in mem.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            assert np.array_equal(getattr(mem, f)(n), getattr(st, f)(n)), (n, f)
        if "output_fisher" in kw:
            assert np.array_equal(mem.output_factors[n].sample_sums(), st.output_factors[n].sample_sums())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]


def test_a_write_that_fails_leaves_no_file_and_no_thread(tmp_path, monkeypatch):
    """The disk fills up on the writer thread's third block: the error reaches the caller
    naming the file, the partial file is removed, and neither the writer's nor the
    flusher's thread is left."""
    import errno
    import threading

    import lora_da.statistics_file as statistics_file

    threaded_staging(monkeypatch)
    real, calls = os.pwrite, {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(statistics_file.os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space left on device .writing the statistics file .*stats.safetensors") as e:
        device_statistics(out=tmp_path / "stats.safetensors")
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith(("lora-da-writer", "lora-da-flusher"))]


def test_out_on_the_host_path_writes_the_statistics_it_returns(tmp_path):
    """On the host path (a CPU model) ``out=`` saves the collected statistics at the end:
    the file holds what the call returns and what a collection without ``out`` gives, bit for bit."""
    path = tmp_path / "stats.safetensors"
    got = host_statistics(out=path, output_fisher="sequence_lowrank")
    plain = host_statistics(output_fisher="sequence_lowrank")
    again = lora_da.Statistics.load(path)
    for n in plain.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            assert np.array_equal(getattr(again, f)(n), getattr(plain, f)(n)), (n, f)
            assert np.array_equal(getattr(got, f)(n), getattr(plain, f)(n)), (n, f)
        assert np.array_equal(again.output_factors[n].sample_sums(), plain.output_factors[n].sample_sums())
    assert again.n_samples == plain.n_samples == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]


@pytest.mark.parametrize("kw", [{}, {"output_fisher": "sequence_lowrank"}, {"max_device_bytes": 40_000}])
def test_the_plans_file_bytes_are_the_files_data(tmp_path, kw):
    """``MemoryPlan.file_bytes`` (what the plan prints and the disk must hold) against the file
    ``out=`` writes: a safetensors file is an 8-byte length, the header, then the data; the plan
    counts the data of the fixed-size tensors (packed Gram triangles, Ḡ, Σg²); the per-sample
    sums of ``sequence_lowrank`` (N × m per module) come on top, their N unknown when planned."""
    import struct

    path = tmp_path / "stats.safetensors"
    st = device_statistics(out=path, **kw)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    data_bytes = len(raw) - 8 - header_len
    per_sample = 8 * st.n_samples * sum(i.out_features for i in st.modules.values()) if kw.get("output_fisher") else 0
    assert data_bytes == st.plan.file_bytes + per_sample
    # and the counts are those of the statistics' own arrays
    packed = sum(8 * f.n * (f.n + 1) // 2 for f in st.input_factors.values())
    assert st.plan.file_bytes == packed + sum(8 * (g.size + g.shape[0]) for g in st.grad_sums.values())


def test_a_host_too_small_for_the_statistics_is_refused_before_the_first_batch(tmp_path):
    stats_bytes = sum(a.nbytes for g in host_statistics().grad_sums.values() for a in [g])
    loss, calls = counting_loss()
    with pytest.raises(lora_da.InvalidArgumentError, match=r"host memory \(\d+ bytes.*available.*out=PATH"):
        device_statistics(loss_fn=loss, max_host_bytes=stats_bytes // 2)
    assert calls["n"] == 0  # refused before any forward pass
    with pytest.raises(lora_da.InvalidArgumentError, match=r"host memory .*out=PATH"):
        host_statistics(loss_fn=loss, max_host_bytes=stats_bytes // 2)
    assert calls["n"] == 0
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flushes", ["once", "every batch"])
def test_sums_reach_the_host_through_staging_blocks_bit_for_bit(tmp_path, monkeypatch, flushes):
    """A flush copies each device sum through a small staging buffer, row block by row block:
    the host's sums must be those of one whole copy, on the first flush (a copy into zero pages)
    and on later ones (an addition), block boundaries anywhere in a Gram's row blocks."""
    kw = {} if flushes == "once" else dict(checkpoint_every=1)

    def run(name):
        extra = {} if not kw else dict(kw, checkpoint_path=str(tmp_path / f"{name}.safetensors"))
        return device_statistics(**extra)

    whole = run("whole")
    monkeypatch.setattr(device_sums, "STAGE_BYTES", 8 * 97)  # 2–3 rows of the tiny model's 32- and 40-wide sums
    staged = []
    monkeypatch.setattr(device_sums.Staging, "staged",
                        lambda self, k: staged.append(k) or torch.empty(k, dtype=torch.float64))
    blocks = run("blocks")
    assert staged and max(staged) <= 97
    reference = host_statistics()  # the per-batch host path: no flush at all
    assert_same(reference, whole)
    assert whole.groups() == blocks.groups() and whole.n_samples == blocks.n_samples
    for n in whole.modules:
        assert np.array_equal(whole.grad_sums[n], blocks.grad_sums[n]), n
        assert np.array_equal(whole.output_factor(n), blocks.output_factor(n)), n
    for g in whole.input_factors:
        assert np.array_equal(whole.input_factors[g].mean(), blocks.input_factors[g].mean()), g


def test_the_plan_counts_the_staging_and_the_statistics(tmp_path):
    """Past the Ḡ floor, the plan's exact count (statistics + staging) is checked after the
    probe, still before anything is summed; streaming to disk needs only the staging."""
    full = device_statistics()
    need = full.plan.host_bytes
    assert need == full.plan.statistics_bytes + full.plan.transfer_bytes
    floor = sum(g.nbytes for g in full.grad_sums.values())
    budget = (floor + need) // 2
    assert floor < budget < need
    with pytest.raises(lora_da.InvalidArgumentError, match=rf"need {need / 2**30:.2f} GiB of host memory \({need} bytes"):
        device_statistics(max_host_bytes=budget)
    st = device_statistics(max_host_bytes=budget, out=tmp_path / "s.safetensors")
    assert st.plan.host_bytes == st.plan.transfer_bytes < budget
    assert "on disk" in st.plan.describe()


def test_the_page_locked_buffer_grows_is_reused_and_falls_back_once(monkeypatch):
    """``memory.PinnedBuffer`` (the flush's staging and compute_init's Z and Ḡ buffers): a view
    of the requested size, the same memory while it is large enough, a larger one when not; where
    page-locking fails, None from then on (the callers copy pageable memory)."""
    from lora_da import memory

    real = torch.empty
    made = []

    def empty(k, dtype=None, pin_memory=False):
        assert pin_memory
        made.append(k)
        return real(k, dtype=dtype)

    monkeypatch.setattr(memory.torch, "empty", empty)
    buf = memory.PinnedBuffer()
    a = buf.get(10)
    b = buf.get(4)
    assert a.numel() == 10 and b.numel() == 4 and b.data_ptr() == a.data_ptr() and made == [10]
    assert buf.get(12).numel() == 12 and made == [10, 12]

    def fails(*a, **k):
        made.append("failed")
        raise RuntimeError("no page-locked memory")

    monkeypatch.setattr(memory.torch, "empty", fails)
    gone = memory.PinnedBuffer()
    assert gone.get(3) is None and gone.get(1) is None and made.count("failed") == 1


# -- the host path (accumulate_on="host", or max_device_bytes=0 on a GPU) -----------------------


def test_host_path_steps_that_run_out_of_memory_are_halved_and_lose_nothing():
    """A step of the host path keeps its inputs and output gradients on the device until its
    products are formed: one that runs out is redone at half its samples, from where it
    stopped, and the statistics are those of the whole batches."""
    from lora_da.collect import default_loss

    sizes = []

    def loss(model, batch):
        sizes.append(batch["input_ids"].shape[0])
        if sizes[-1] > 2:
            raise OutOfMemoryError("injected: the step does not fit")
        return default_loss(model, batch)

    plain = host_statistics(bs=6)
    got = host_statistics(bs=6, loss_fn=loss)
    assert sizes == [6, 3, 2, 2, 2]
    assert_same(plain, got)


@pytest.mark.parametrize("k", [1, 4, 8])  # 8 input groups' rows per step: the first, mid-way, the last
def test_host_path_out_of_memory_after_the_gradient_products_adds_nothing(monkeypatch, k):
    """The rows of ``Σ x xᵀ`` are brought to the host before anything is added: a step that runs
    out of memory there, after its ``Ḡ`` products were formed, has added nothing, and its redo
    (two steps of 3) counts each sample once."""
    import lora_da.collect.host_sums as host_sums

    plain = host_statistics(bs=6)
    rows = failing_on(host_sums.input_rows, {k})
    monkeypatch.setattr(host_sums, "input_rows", rows)
    got = host_statistics(bs=6)
    assert rows.calls == k + 2 * 8
    assert_same(plain, got)


def test_host_path_out_of_memory_at_one_sample_says_what_to_do():
    def loss(model, batch):
        raise OutOfMemoryError("injected: nothing fits")

    with pytest.raises(lora_da.LoraDAError, match="one sample per step on the host path.*shorten the sequences"):
        host_statistics(bs=3, loss_fn=loss)


def test_a_device_too_small_for_any_plan_falls_back_to_the_host_path(monkeypatch, tmp_path):
    """SPEC §7: when not even one input group's sums fit beside a step, ``accumulate_on="auto"``
    sums on the host instead, with a warning that gives the planner's reason; the probe summed
    nothing, so the statistics and the inits are the host path's. The caller's
    ``accumulate_on="device"`` and a one-shot iterator (the probe read its first batch) keep
    the refusal."""
    import lora_da.collect.run as run_mod

    def as_on_a_gpu(device, max_device_bytes, accumulate_on):  # on the CPU "auto" is the host path
        return accumulate_on == "host" or max_device_bytes == 0

    monkeypatch.setattr(run_mod, "accumulates_on_host", as_on_a_gpu)
    monkeypatch.setattr(pipeline, "accumulates_on_host", as_on_a_gpu)
    plain = host_statistics(bs=3)
    with pytest.warns(UserWarning, match="no device plan fits.*summed on the host.*needs .* GiB of float64 sums"):
        got = host_statistics(bs=3, max_device_bytes=1000)
    assert got.plan is None  # the host path's statistics
    assert_same(plain, got)
    with pytest.raises(lora_da.DeviceTooSmallError, match="needs .* GiB of float64 sums on the device"):
        device_statistics(bs=3, max_device_bytes=1000)
    ids, mask = data()
    with pytest.raises(lora_da.DeviceTooSmallError):
        lora_da.collect_statistics(tiny_llama(), iter(batches(ids, mask, 3)), LLAMA_TARGETS, progress=False,
                                   max_device_bytes=1000)
    # out= bounds the host's memory, which the host path (all statistics held to the end) would not
    with pytest.raises(lora_da.DeviceTooSmallError):
        lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False,
                                   max_device_bytes=1000, out=str(tmp_path / "stats.safetensors"))
    assert not (tmp_path / "stats.safetensors").exists()

    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2)
    ref = lora_da.collect_and_solve(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, cfg, progress=False,
                                    accumulate_on="host")
    with pytest.warns(UserWarning, match="no device plan fits"):
        fell = lora_da.collect_and_solve(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, cfg, progress=False,
                                         max_device_bytes=1000)
    assert list(fell) == list(ref)
    for name in ref:
        np.testing.assert_array_equal(fell[name].result.V, ref[name].result.V)


@pytest.mark.parametrize("accumulate_on", ["host", "device"])
def test_a_non_finite_loss_in_a_split_batch_names_the_batchs_samples(accumulate_on):
    """Steps that split a batch (out of memory above 2 samples) number the samples of a
    non-finite loss within the user's batch, not within the step."""
    from lora_da.collect import default_loss

    ids, mask = data()
    poisoned = ids[2:4]

    def loss(model, batch):
        if batch["input_ids"].shape[0] > 2:
            raise OutOfMemoryError("injected: the step does not fit")
        losses = default_loss(model, batch)
        bad = (batch["input_ids"][:, None, :] == poisoned[None]).all(-1).any(-1)
        return torch.where(bad, torch.full_like(losses, float("nan")), losses)

    with pytest.raises(lora_da.NonFiniteError, match=r"batch 0: non-finite loss for samples \[2, 3\]"):
        lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 6), LLAMA_TARGETS, loss_fn=loss, progress=False,
                                   accumulate_on=accumulate_on)
