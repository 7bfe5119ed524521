"""Review of 8e7fb02 (collect.cuts): one test per defect, each failing on that commit.

Written by a hostile review of the first cut commit; all pass since the fixes after it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import LLAMA_TARGETS, batches, data, tiny_llama  # noqa: E402

import lora_da  # noqa: E402
import lora_da.collect.cuts as cuts_mod  # noqa: E402
import lora_da.collect.passes as passes  # noqa: E402
from lora_da.memory import OutOfMemoryError  # noqa: E402
from lora_da.plan import GiB, choose_plan, margin, solve_order, solve_peak  # noqa: E402


def one_pass(model_fn, data, targets, **kw):
    return lora_da.collect_statistics(model_fn(), data, targets, progress=False, accumulate_on="device", **kw)


def largest_unit(stats) -> int:
    return max(u.device_bytes for p in stats.plan.passes for u in p)


def assert_close(a, b, rel=1e-12):
    assert a.n_samples == b.n_samples
    for n in a.modules:
        for f in ("mean_grad", "input_factor", "output_factor"):
            x, y = getattr(a, f)(n), getattr(b, f)(n)
            assert np.abs(x - y).max() <= rel * np.abs(x).max(), (n, f, float(np.abs(x - y).max() / np.abs(x).max()))


@pytest.fixture
def cut_steps(monkeypatch):
    """Counts the steps whose backward started from a saved gradient (Cuts.gradient)."""
    seen = {"n": 0}
    real = cuts_mod.Cuts.gradient

    def gradient(self, like):
        seen["n"] += 1
        return real(self, like)

    monkeypatch.setattr(cuts_mod.Cuts, "gradient", gradient)
    return seen


# -- D1: Joiner ordinals -------------------------------------------------------------------------


def test_joined_steps_after_an_unjoinable_batch_read_another_batchs_saved_rows(monkeypatch):
    """Wrong statistics: Joiner.add flushes the pending step first, and flush() leaves run.ordinal at the
    flushed step's first sample, which add() then takes as the new step's (collect/passes.py:395 with
    passes.py:407). Here an out-of-memory step lowers the micro-batch to 3 in a cut pass, so a 2-sample batch no
    longer joins the next one: that batch's backward starts from the previous batch's saved dL/dh."""
    monkeypatch.setattr(passes, "joins_batches", lambda dev: True)
    ids, mask = data(n=6)
    ids = torch.cat([ids, data(n=6, seed=1)[0], data(n=6, seed=2)[0], ids[:4]])
    mask = torch.cat([mask, data(n=6, seed=1)[1], data(n=6, seed=2)[1], mask[:4]])
    bl, a = [], 0
    for s in [3, 3, 3, 3, 2, 2, 2, 2, 2, 2]:
        bl.append({"input_ids": ids[a:a + s], "attention_mask": mask[a:a + s]})
        a += s
    one = one_pass(tiny_llama, bl, LLAMA_TARGETS)
    real = cuts_mod.Cuts.gradient
    calls = {"n": 0}

    def gradient(self, like):  # the first two cut steps run out of device memory: micro-batch 12 → 6 → 3
        calls["n"] += 1
        if calls["n"] in (1, 2):
            raise OutOfMemoryError(f"injected at cut step {calls['n']}")
        return real(self, like)

    monkeypatch.setattr(cuts_mod.Cuts, "gradient", gradient)
    got = one_pass(tiny_llama, bl, LLAMA_TARGETS, max_device_bytes=largest_unit(one))
    assert got.plan.cuts and calls["n"] > 2
    assert any("micro-batch lowered to 3" in n for n in got.plan.notes)
    # the note names the pass: the first below the top layer's (those run no cut step)
    n_passes = len(got.plan.passes)
    first_cut = min(i for i, p in enumerate(got.plan.passes) if max(int(n.split(".")[2]) for u in p for n, _ in u.modules) < 1)
    assert any(n.startswith(f"pass {first_cut + 1} of {n_passes}, batch 0: out of device memory; micro-batch lowered to 6")
               for n in got.plan.notes), got.plan.notes
    assert_close(one, got)


def test_joined_batches_of_different_lengths_still_start_at_their_cut(monkeypatch, cut_steps):
    """Cuts silently lost (passes planned as cut passes run whole, with the whole graph the plan did not reserve):
    with batches padded to different lengths (not joinable) every Joiner.add flushes first and reuses the
    flushed step's ordinal (collect/passes.py:395, 407), so the capture pass writes its rows over each other,
    len(saved) != rows and cuts_of_pass (passes.py:494) falls back to whole passes."""
    monkeypatch.setattr(passes, "joins_batches", lambda dev: True)
    ids, mask = data()
    bl = []
    for i in range(len(ids)):  # one sample per batch, padded to its own length (DataCollatorWithPadding)
        n = int(mask[i].sum())
        bl.append({"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]})
    one = one_pass(tiny_llama, bl, LLAMA_TARGETS)
    got = one_pass(tiny_llama, bl, LLAMA_TARGETS, max_device_bytes=largest_unit(one))
    assert got.plan.cuts and got.plan.micro_batch > 1
    assert cut_steps["n"] > 0, "the plan has cuts, but no pass below the top started from a saved gradient"


# -- D2: the saved gradients' reserve refuses plans that fit -------------------------------------


def test_a_large_dataset_that_fits_in_one_pass_is_not_refused_for_gradients_no_pass_will_save(monkeypatch):
    """Crash: choose_plan(cut=...) holds back 2 x row_bytes x samples for every pass (plan.py:540) and
    plan_device takes that plan or its refusal (collect/passes.py:186, no fallback, no comparison with the
    whole-pass plan): 30 000 samples on a device with 0.5 GiB free are refused, though one whole pass fits (and
    a one-pass plan saves no gradient at all)."""
    ids, mask = data()

    class Many(Sequence):
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            if i >= len(self):
                raise IndexError(i)
            j = 3 * (i % 2)
            return {"input_ids": ids[j:j + 3], "attention_mask": mask[j:j + 3]}

    class Planned(Exception):
        pass

    def planned(run, n):
        raise Planned(n)

    monkeypatch.setattr(passes, "check_multipass", planned)  # stop right after the plan (the data is long)
    monkeypatch.setattr(passes, "free_device_bytes", lambda dev: 512 << 20)
    with monkeypatch.context() as m:  # the same without cuts: one pass
        m.setattr(passes, "find_stack", lambda model, targets: None)
        with pytest.raises(Planned) as whole:
            one_pass(tiny_llama, Many(), LLAMA_TARGETS)
    assert whole.value.args[0] == 1
    with pytest.raises(Planned):
        one_pass(tiny_llama, Many(), LLAMA_TARGETS)


# -- D3: the saved rows assume the hidden state's first dimension is the step's samples ---------


def pair_loss(model, batch):
    """A preference-style per-sample loss: each sample and a second sequence of it in one model call (2k rows)."""
    x = torch.cat([batch["input_ids"], batch["input_ids"].flip(1)])
    m = torch.cat([batch["attention_mask"], batch["attention_mask"]])
    logp = torch.log_softmax(model(input_ids=x, attention_mask=m).logits[:, :-1], -1)
    s = (logp.gather(-1, x[:, 1:, None])[..., 0] * m[:, 1:]).sum(1)
    k = batch["input_ids"].shape[0]
    return -torch.nn.functional.logsigmoid(s[:k] - s[k:])


def test_a_loss_that_runs_the_model_on_more_rows_than_samples_is_not_cut():
    """Crash ("the saved gradient at layer 1 has shape (3, 9, 32), the hidden state (6, 9, 32)"): Cuts._save
    stores g[i] for the step's k samples only (collect/cuts.py:182-183) and gradient() stacks k rows
    (cuts.py:200-203); nothing checks that the layer input's first dimension is the step's samples (ChainCheck,
    cuts.py:93-94, or validate). The one-pass run of the same loss works."""
    ids, mask = data()
    bl = batches(ids, mask, 3)
    one = one_pass(tiny_llama, bl, LLAMA_TARGETS, loss_fn=pair_loss)
    got = one_pass(tiny_llama, bl, LLAMA_TARGETS, loss_fn=pair_loss, max_device_bytes=largest_unit(one))
    assert_close(one, got, rel=0)


class SeqFirst(torch.nn.Module):
    """torch.nn.TransformerEncoder with its default batch_first=False: layer inputs are (T, B, H)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0)
        self.enc = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 50)
        self.double()

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        h = self.enc(self.emb(input_ids).transpose(0, 1)).transpose(0, 1)
        return SimpleNamespace(logits=self.head(h))


def test_sequence_first_layers_are_not_cut():
    """Crash ("the saved gradient at layer 2 has shape (3, 3, 16), the hidden state (9, 3, 16)"): the rows are
    h[i] for i < k (collect/cuts.py:93-94 row_bytes, 182-183, 200-203), tokens here, not samples; whole passes
    of this model are bit-identical to the one-pass run."""
    ids, _ = data()
    bl = batches(ids, torch.ones_like(ids), 3)
    one = one_pass(SeqFirst, bl, ["linear1", "linear2"])
    got = one_pass(SeqFirst, bl, ["linear1", "linear2"], max_device_bytes=largest_unit(one))
    assert_close(one, got, rel=0)


# -- D4: the saved gradients are planned at the first batch's length ------------------------------


def test_the_saved_gradients_fit_what_the_plan_held_back_for_them(monkeypatch):
    """Wrong memory accounting: CutModel.row_bytes is the first batch's T x H (collect/cuts.py:93-94, used by
    cut_model at collect/passes.py:158 and plan.py:457), so later, longer batches save more than
    CutModel.saved_bytes, which the plan held back: here 10 240 bytes saved against 6 144 planned."""
    planned = {}
    real_cut_model = passes.cut_model

    def cut_model(*a, **kw):
        c = real_cut_model(*a, **kw)
        planned.setdefault("cut", c)
        return c

    peak = {"bytes": 0}
    real_steps = passes.batch_steps

    def batch_steps(run, *a, **kw):
        real_steps(run, *a, **kw)
        if run.cuts is not None:
            storages = {}
            for rows in run.cuts.saved.values():
                for t in rows.values():
                    s = t.untyped_storage()
                    storages[s.data_ptr()] = s.nbytes()
            peak["bytes"] = max(peak["bytes"], sum(storages.values()))

    monkeypatch.setattr(passes, "cut_model", cut_model)
    monkeypatch.setattr(passes, "batch_steps", batch_steps)
    ids, mask = data()
    bl = batches(ids, mask, 2)
    bl[0] = {k: v[:, :2] for k, v in bl[0].items()}  # a short first batch; the others are 9 tokens long
    one = one_pass(tiny_llama, bl, LLAMA_TARGETS)
    planned.clear()
    got = one_pass(tiny_llama, bl, LLAMA_TARGETS, max_device_bytes=largest_unit(one))
    assert got.plan.cuts and planned["cut"] is not None
    assert peak["bytes"] <= planned["cut"].saved_bytes, (peak["bytes"], planned["cut"].saved_bytes)


# -- D5: a pass's solves are planned as if the saved gradients were not there ------------------


def test_a_passs_solves_fit_beside_the_gradient_saved_for_the_next_pass():
    """Wrong memory accounting (collect_and_solve): the solves of a pass run (collect/passes.py:330, on_pass)
    while the gradient it saved for the next pass is held (drop_unneeded comes after, passes.py:334-335), but
    plan_passes' solve_fits (plan.py:381-385) bounds solve_peak by device_free - margin alone: at the 24 GiB
    card of the commit's benchmark (11.4 GiB free, 64 samples) a pass's solves + one saved layer exceed it."""
    import test_cuts

    units, step, cut = test_cuts.seven_b()
    free = int(11.4 * GiB)
    plan = choose_plan(units, step, batch=8, device_free=free, max_device_bytes=None, host_free=None,
                       max_host_bytes=None, keep_on_host=False, cut=cut)
    assert plan.cuts
    room = free - margin(free)
    one_layer = cut.row_bytes * cut.samples
    # every pass but the lowest saves a gradient for the pass below it and holds it through its solves
    for p in plan.passes[1:]:
        order = solve_order(p, room, plan.solve_workers, False, plan.host_solves)
        peak = solve_peak(order, plan.solve_workers, False, plan.host_solves)
        assert peak + one_layer <= room, ([u.group for u in p], (peak + one_layer) / GiB, room / GiB)
