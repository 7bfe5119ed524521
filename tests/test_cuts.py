"""Passes that start their backward at a layer's input (SPEC §7, ``lora_da.collect.cuts``):
run on the CPU with the planned device path and a small ``max_device_bytes`` (one pass per
input group or two), against a one-pass run of the same path, which back-propagates every
step from the loss. The cut changes where each pass's forward ends and where its backward
starts, not what is summed: on the CPU the sums are the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, batches, data, tiny_gpt2, tiny_llama, units_7b

import lora_da
import lora_da.collect.cuts as cuts_mod
import lora_da.collect.device_sums as device_sums
import lora_da.collect.passes as passes
from lora_da.memory import OutOfMemoryError
from lora_da.pipeline import collect_and_solve
from lora_da.plan import GiB, CutModel, Step, choose_plan, cut_step_bytes, graph_step_bytes, step_bytes
from lora_da.reference import subspace_sin_theta

SMALL = "largest"  # max_device_bytes: the largest input group's sums, so one or two groups per pass


def collect(model_fn=tiny_llama, targets=LLAMA_TARGETS, bs=3, max_device_bytes=None, **kw):
    ids, mask = data()
    if max_device_bytes == SMALL:
        one = lora_da.collect_statistics(model_fn(), batches(ids, mask, bs), targets, progress=False,
                                         accumulate_on="device", **kw)
        max_device_bytes = max(u.device_bytes for p in one.plan.passes for u in p)
    return lora_da.collect_statistics(model_fn(), batches(ids, mask, bs), targets, progress=False,
                                      accumulate_on="device", max_device_bytes=max_device_bytes, **kw)


def assert_bits(a, b):
    assert a.groups() == b.groups() and a.n_samples == b.n_samples
    for n in a.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            assert np.array_equal(getattr(a, f)(n), getattr(b, f)(n)), (n, f)
        assert a.output_factors[n].tokens == b.output_factors[n].tokens


@pytest.fixture
def spy(monkeypatch):
    """Counts the steps that ended their forward at a cut and the gradients saved for one."""
    seen = {"cut": 0, "saved": 0}
    real_gradient, real_save = cuts_mod.Cuts.gradient, cuts_mod.Cuts._save

    def gradient(self, like):
        seen["cut"] += 1
        return real_gradient(self, like)

    def save(self, recorder):
        pre = real_save(self, recorder)

        def counted(module, args, kwargs):
            seen["saved"] += 1
            return pre(module, args, kwargs)
        return counted

    monkeypatch.setattr(cuts_mod.Cuts, "gradient", gradient)
    monkeypatch.setattr(cuts_mod.Cuts, "_save", save)
    return seen


@pytest.mark.parametrize("model_fn,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_passes_below_the_top_start_at_a_layer_input_and_sum_the_same_bits(spy, model_fn, targets):
    one = collect(model_fn, targets)
    cut = collect(model_fn, targets, max_device_bytes=SMALL)
    assert len(one.plan.passes) == 1 and len(cut.plan.passes) > 2 and cut.plan.cuts
    assert "cuts:" in cut.plan.describe()
    # every pass over the lower layer (two batches each) started from a saved gradient
    assert spy["cut"] > 0 and spy["saved"] > 0
    assert_bits(one, cut)


def test_collect_and_solve_with_cuts_matches_the_core():
    ids, mask = data()
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    host = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, progress=False)
    ref = lora_da.compute_init(host, cfg, progress=False)
    got = collect_and_solve(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS, cfg, progress=False,
                            accumulate_on="device", max_device_bytes=40_000)
    assert got.report.plan.cuts
    for n in ref:
        assert subspace_sin_theta(ref[n].result.V, got[n].result.V) <= 1e-8
        assert np.abs(ref[n].B - got[n].B).max() <= 1e-8 * np.abs(ref[n].B).max()


def test_sequence_lowrank_rows_with_cuts():
    ids, mask = data()
    bs = batches(ids, mask, 2)
    for b in bs:
        labels = b["input_ids"].clone()
        labels[b["attention_mask"] == 0] = -100
        b["labels"] = labels
    kw = dict(token_mask="labels", output_fisher="sequence_lowrank", progress=False, accumulate_on="device")
    one = lora_da.collect_statistics(tiny_llama(), bs, ["q_proj", "down_proj"], **kw)
    largest = max(u.device_bytes for p in one.plan.passes for u in p)
    cut = lora_da.collect_statistics(tiny_llama(), bs, ["q_proj", "down_proj"], max_device_bytes=largest, **kw)
    assert cut.plan.cuts
    assert_bits(one, cut)
    for n in one.modules:
        assert np.array_equal(one.output_factors[n].sample_sums(), cut.output_factors[n].sample_sums())


def test_joined_steps_read_their_samples_rows(monkeypatch, spy):
    """Batches of one joined into steps (as on a GPU): a step's saved rows are its samples'."""
    monkeypatch.setattr(passes, "joins_batches", lambda dev: True)
    one = collect(bs=1)
    cut = collect(bs=1, max_device_bytes=SMALL)
    assert cut.plan.cuts and cut.plan.micro_batch > 1 and spy["cut"] > 0
    assert_bits(one, cut)


def fail_copy_on(calls):
    real = device_sums.float64_copy

    def fn(t):
        fn.calls += 1
        if fn.calls in calls:
            raise OutOfMemoryError(f"injected at call {fn.calls}")
        return real(t)
    fn.calls = 0
    return fn


@pytest.mark.parametrize("k", [1, 7, 20, 27])  # 14 modules, 2 copies each, one step per pass
def test_an_oom_in_a_cut_pass_halves_the_step_and_loses_nothing(monkeypatch, k):
    """The step is redone on fewer samples: it reads fewer saved rows, from where it failed."""
    one = collect(bs=6)
    failing = fail_copy_on({k})
    monkeypatch.setattr(device_sums, "float64_copy", failing)
    cut = collect(bs=6, max_device_bytes=40_000)
    assert cut.plan.cuts and failing.calls > k and any("out of device memory" in n for n in cut.plan.notes)
    for n in one.modules:  # other micro-batches: the same sums up to their order
        for f in ("mean_grad", "input_factor", "output_factor"):
            x, y = getattr(one, f)(n), getattr(cut, f)(n)
            assert np.abs(x - y).max() <= 1e-13 * np.abs(x).max(), (n, f)


def test_a_pass_split_or_shrunk_out_of_memory_keeps_its_cuts_and_sums(monkeypatch):
    """Pass 1's sums cannot be allocated (split in two, the upper half first), and later a
    step at one sample fails twice (half its groups move to a pass of their own): the
    statistics equal the one-pass run's."""
    one = collect(bs=1)
    real_init = device_sums.DeviceSums.__init__
    state = {"inits": 0, "adds": 0}

    def init(self, units, *a, **kw):
        state["inits"] += 1
        if state["inits"] == 1 and len(units) > 1:
            raise OutOfMemoryError("injected: a pass's sums")
        real_init(self, units, *a, **kw)

    real_add = device_sums.DeviceSums.add

    def add(self, target, x, g, key):
        state["adds"] += 1
        if state["adds"] in (20, 21) and len(self.units) > 1:
            raise OutOfMemoryError("injected: a step at one sample")
        return real_add(self, target, x, g, key)

    monkeypatch.setattr(device_sums.DeviceSums, "__init__", init)
    monkeypatch.setattr(device_sums.DeviceSums, "add", add)
    monkeypatch.setattr(passes.DeviceSums, "__init__", init)
    got = collect(bs=1, max_device_bytes=80_000)
    assert got.plan.cuts
    assert any("split it in two" in n for n in got.plan.notes)
    for n in one.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            x, y = getattr(one, f)(n), getattr(got, f)(n)
            assert np.abs(x - y).max() <= 1e-13 * np.abs(x).max(), (n, f)


class Stack(torch.nn.Module):
    """Layers in a ModuleList whose loss also reads the first layer's output directly (a path
    around every layer above it), or whose first layer is called twice."""

    def __init__(self, bypass=False, twice=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(3))
        self.head = torch.nn.Linear(8, 50)
        self.bypass, self.twice = bypass, twice
        self.double()

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        h = self.emb(input_ids)
        first = h = self.layers[0](h)
        if self.twice:
            h = self.layers[0](h)
        for layer in self.layers[1:]:
            h = layer(h)
        if self.bypass:
            h = h + first
        return SimpleNamespace(logits=self.head(h))


@pytest.mark.parametrize("kind", ["bypass", "twice"])
def test_a_model_that_is_not_a_chain_runs_whole_passes(kind, spy):
    targets = ["layers.0.0", "layers.1.0", "layers.2.0"]
    kw = {kind: True}
    one = collect(lambda: Stack(**kw), targets)
    got = collect(lambda: Stack(**kw), targets, max_device_bytes=SMALL)
    assert len(got.plan.passes) > 1 and not got.plan.cuts and spy["cut"] == 0
    assert_bits(one, got)


def test_a_chain_of_plain_layers_is_cut():
    targets = ["layers.0.0", "layers.1.0", "layers.2.0"]
    one = collect(Stack, targets)
    got = collect(Stack, targets, max_device_bytes=SMALL)
    assert got.plan.cuts
    assert_bits(one, got)


# -- the planner ------------------------------------------------------------------------------


def seven_b(samples=4):
    units = units_7b(32)
    calls = [name for u in units for name, _ in u.modules]
    shares = {u.group: (len(calls) - calls.index(u.modules[0][0])) / len(calls) for u in units}
    step = Step(samples=samples, bytes=int(2.25 * samples * GiB), seconds=0.05 * samples, tokens_per_sample=512,
                calls=len(calls), widest=11008 + 8192, top_bytes=int(0.5 * samples * GiB), shares=tuple(shares.items()))
    cut = CutModel(layer_of=tuple((u.group, int(u.group.split(".")[2])) for u in units), layers=32,
                   row_bytes=512 * 4096 * 2, samples=64)
    return units, step, cut


def test_a_cut_pass_holds_its_own_layers_graph_only():
    units, step, cut = seven_b()
    full = step_bytes(step, 4)
    q0 = units[0]
    # the bottom layer alone: about a 31st of the graph below the top; never more than the whole step
    one_layer = cut_step_bytes(step, 4, q0, 1, cut)
    assert one_layer < graph_step_bytes(step, 4, q0) / 10
    assert cut_step_bytes(step, 4, q0, 31, cut) <= full + 2 * 4 * cut.row_bytes
    # ... and a layer's more than its span, for the backward's working set (measured on the H200)
    layer = (full - 4 * step.top_bytes // step.samples) / 32
    assert one_layer - 2 * 4 * cut.row_bytes >= 1.9 * layer
    assert cut_step_bytes(step, 4, q0, 3, cut) - 2 * 4 * cut.row_bytes >= 3.9 * layer
    # grows with the span
    spans = [cut_step_bytes(step, 4, q0, j, cut) for j in range(1, 32)]
    assert spans == sorted(spans)


@pytest.mark.parametrize("free_gib,ratio", [(11.4, 0.5), (27.4, 0.9)])
def test_cuts_give_a_24_and_a_40_gib_card_fewer_or_cheaper_passes_that_fit(free_gib, ratio):
    units, step, cut = seven_b()
    kw = dict(batch=8, device_free=int(free_gib * GiB), max_device_bytes=None, host_free=None, max_host_bytes=None,
              keep_on_host=False)
    whole, with_cuts = choose_plan(units, step, **kw), choose_plan(units, step, cut=cut, **kw)
    assert with_cuts.cuts and with_cuts.estimate < ratio * whole.estimate
    # at most one pass more: each cut pass keeps a layer's room for the backward's working set
    assert len(with_cuts.passes) <= len(whole.passes) + 1
    free = int(free_gib * GiB)
    for p, reserve in zip(with_cuts.passes, with_cuts.reserves):
        assert sum(u.device_bytes for u in p) + reserve <= free
        assert reserve >= 2 * cut.row_bytes * cut.samples  # the saved gradients are held back


def test_with_cuts_a_batch_the_whole_step_could_not_take_is_still_a_candidate():
    """24 GiB, 7B: the probe's whole step ran out of memory at 8 samples and fit at 2. No pass
    with cuts holds the whole step, so steps of the user's 8 are planned where they fit, and
    each pass's sums beside its step still fit."""
    units, step, cut = seven_b(samples=2)
    free = int(11.4 * GiB)
    kw = dict(batch=8, device_free=free, max_device_bytes=None, host_free=None, max_host_bytes=None,
              keep_on_host=False)
    whole = choose_plan(units, step, **kw)
    plan = choose_plan(units, step, cut=cut, **kw)
    assert whole.micro_batch <= 2 and plan.micro_batch > 2 and plan.cuts
    for p, reserve in zip(plan.passes, plan.reserves):
        assert sum(u.device_bytes for u in p) + reserve <= free


def test_a_cut_plan_describes_each_pass_budget_that_its_sums_fit():
    """The printed plan of a cut plan states the passes' budgets (the 40 GiB run printed
    "budget 0.00 GiB": a pass holding the whole step, which no cut pass does), each pass's
    sums fit its own budget, and the step is named as the whole step, not what a pass holds."""
    units, step, cut = seven_b()
    plan = choose_plan(units, step, batch=8, device_free=int(27.4 * GiB), max_device_bytes=None, host_free=None,
                       max_host_bytes=None, keep_on_host=False, cut=cut)
    assert plan.cuts and len(plan.budgets) == len(plan.passes) > 1
    for p, budget, reserve in zip(plan.passes, plan.budgets, plan.reserves):
        assert 0 < sum(u.device_bytes for u in p) <= budget == int(27.4 * GiB) - reserve
    text = plan.describe()
    lo, hi = min(plan.budgets) / GiB, max(plan.budgets) / GiB
    assert f"budget {lo:.2f} GiB–{hi:.2f} GiB a pass" in text and "budget 0.00 GiB" not in text
    assert "a whole step (each pass holds its layers' share)" in text
