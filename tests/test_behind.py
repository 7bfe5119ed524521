"""A pass's solves behind the next pass's collection (SPEC §7): on a GPU the solves of
pass ``p`` run on their own streams in a background thread while pass ``p + 1`` collects,
where the plan and the free memory hold both. Here on the CPU the thread runs the same
solves (the streams are CUDA's), so the results are compared bit for bit with the same
plan solved after each pass; the planner's side is checked on the 7B shape."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from helpers import LLAMA_TARGETS, batches, data, tiny_llama
from test_cuts import seven_b

import lora_da
import lora_da.collect.passes as passes
import lora_da.pipeline as pipeline
from lora_da.errors import LoraDAError
import lora_da.plan as plan_mod
from lora_da.plan import BEHIND_HIDDEN, GiB, choose_plan, run_seconds, solve_order, solve_peak, solve_seconds

CFG = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)


def run(max_device_bytes=40_000):
    ids, mask = data()
    return lora_da.collect_and_solve(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, CFG, progress=False,
                                     accumulate_on="device", max_device_bytes=max_device_bytes)


@pytest.fixture
def threads(monkeypatch):
    """Solves behind every pass but the last, and the threads each module was solved on."""
    seen: dict[str, str] = {}
    real = pipeline.solve_on_device_or_host

    def solve(inputs, host_inputs, names, *a, **kw):
        for n in names:
            seen[n] = threading.current_thread().name
        return real(inputs, host_inputs, names, *a, **kw)

    monkeypatch.setattr(pipeline, "solve_on_device_or_host", solve)
    monkeypatch.setattr(passes, "behind_fits", lambda run, ps, p: p + 1 < len(ps))
    return seen


def test_solves_behind_the_next_pass_give_the_same_bits(threads):
    import lora_da.collect.passes as real_passes

    behind = run()
    assert len(behind.report.plan.passes) > 2
    on_thread = {n for n, t in threads.items() if t.startswith("lora-da-solves")}
    last = {name for u in behind.report.plan.passes[-1] for name, _ in u.modules}
    # every pass but the last was solved on the background thread, while the next one collected
    assert on_thread and on_thread.isdisjoint(last) and len(on_thread | last) == len(behind)
    assert behind.report.behind_seconds > 0
    real_passes.behind_fits = TRUE_BEHIND_FITS  # the same plan, each pass solved before the next
    try:
        after = run()
    finally:
        real_passes.behind_fits = lambda run, ps, p: p + 1 < len(ps)
    assert after.report.behind_seconds == 0
    assert [n for n in behind] == [n for n in after]
    for n in after:
        assert np.array_equal(behind[n].A, after[n].A) and np.array_equal(behind[n].B, after[n].B), n


TRUE_BEHIND_FITS = passes.behind_fits


def test_an_error_in_the_solves_behind_reaches_the_caller_and_leaves_no_thread(threads, monkeypatch):
    real = pipeline.solve_on_device_or_host

    def fail(inputs, host_inputs, names, *a, **kw):
        if threading.current_thread().name.startswith("lora-da-solves"):
            raise LoraDAError(f"injected in the solves behind: {names[0]}")
        return real(inputs, host_inputs, names, *a, **kw)

    monkeypatch.setattr(pipeline, "solve_on_device_or_host", fail)
    with pytest.raises(LoraDAError, match="injected in the solves behind"):
        run()
    assert not [t for t in threading.enumerate() if t.name.startswith("lora-da-solves")]


def test_on_the_cpu_no_pass_is_solved_behind():
    got = run()
    assert got.report.behind_seconds == 0 and "behind:" not in got.report.plan.describe()


# -- the planner ------------------------------------------------------------------------------


def kw(free_gib):
    return dict(batch=8, device_free=int(free_gib * GiB), max_device_bytes=None, host_free=None,
                max_host_bytes=None, keep_on_host=False, max_solve_workers=2)


def test_the_whole_gpu_one_pass_plan_is_cut_with_the_upper_solves_behind():
    """The 7B shape on an H200 (125 GiB free beside the model): one pass fits. Cut at layers'
    inputs, each pass's solves at their worst moment fit beside the next pass's sums and step,
    and the estimated run (the extra forwards against half the solves hidden) is shorter."""
    units, step, cut = seven_b()
    one = choose_plan(units, step, **kw(125))
    assert len(one.passes) == 1
    cuts = passes.behind_plan(units, step, cut, kw(125), one)
    assert cuts is not None and cuts.cuts and len(cuts.passes) >= 2
    run_order = replace(cuts, passes=cuts.passes[::-1], reserves=cuts.reserves[::-1], behind=True)
    for p in range(len(cuts.passes) - 1):
        upper, lower = run_order.passes[p], run_order.passes[p + 1]
        peak = solve_peak(solve_order(upper, cuts.solve_room, cuts.solve_workers), cuts.solve_workers)
        assert peak + sum(u.device_bytes for u in lower) + run_order.reserves[p + 1] <= 125 * GiB
        assert run_order.solves_behind(p)
    assert not run_order.solves_behind(len(cuts.passes) - 1)
    assert run_seconds(run_order, 64) < run_seconds(replace(one, behind=True), 64)
    # the model: the solves hidden are half of all but the last pass's
    hidden = sum(solve_seconds(p) for p in run_order.passes[:-1]) * BEHIND_HIDDEN
    assert run_seconds(run_order, 64) == pytest.approx(cuts.estimate * 64 + solve_seconds(units) - hidden)
    assert "behind: the solves of pass(es) 1" in run_order.describe()


def test_no_smaller_passes_where_the_solves_hidden_do_not_pay_for_them(monkeypatch):
    units, step, cut = seven_b()
    one = choose_plan(units, step, **kw(125))
    monkeypatch.setattr(plan_mod, "BEHIND_HIDDEN", 0.0)
    assert passes.behind_plan(units, step, cut, kw(125), one) is None


def test_solves_behind_only_where_the_plan_allows_them():
    units, step, cut = seven_b()
    plan = choose_plan(units, step, cut=cut, **kw(27.4))
    assert len(plan.passes) > 2
    assert not any(plan.solves_behind(p) for p in range(len(plan.passes)))  # behind is off
    plan.behind = True
    for p in range(len(plan.passes) - 1):
        fits = plan.solves_behind(p)
        peak = solve_peak(plan.solve_order(plan.passes[p]), plan.solve_workers)
        need = peak + sum(u.device_bytes for u in plan.passes[p + 1]) + plan.reserves[p + 1]
        assert fits == (need <= plan.device_free)
    plan.passes.insert(1, plan.passes[0][:1])  # a pass split out of memory: the reserves no longer match
    assert not any(plan.solves_behind(p) for p in range(len(plan.passes)))
