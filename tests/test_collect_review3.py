"""Issue 22 (hardening, third round), the collection's defect classes: a
statistics file taken for a checkpoint (3), token_mask='labels' with class
labels (13), inputs_embeds batches (15), misused loss functions and model
outputs (16); and issue 21 item 4: a finished checkpointed run rerun returns
its statistics, a resumed one says where it resumes.

Each test failed on the code before the fix (checked by stashing the fix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TARGETS, assert_same_statistics, batches, brute_force, data, many_batches, tiny_classifier, tiny_llama

import lora_da
from lora_da.collect import default_loss
from lora_da.errors import InvalidArgumentError, ShapeError, StatisticsFileError


def _counting():
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return default_loss(model, batch)

    return loss_fn, calls


# -- 3: a plain statistics file is not a checkpoint -------------------------------------------


def test_a_statistics_file_is_refused_as_a_checkpoint_and_left_as_it_was(tmp_path):
    path = tmp_path / "stats.safetensors"
    ids, mask = data()
    lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 2), TARGETS, progress=False).save(path)
    before = path.read_bytes()
    other = tiny_llama()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    loss_fn, calls = _counting()
    with pytest.raises(StatisticsFileError, match="not a checkpoint .*Statistics.save or 'lora-da collect'") as e:
        lora_da.collect_statistics(other, many_batches(), TARGETS, checkpoint_path=path, loss_fn=loss_fn,
                                   progress=False)
    assert str(path) in str(e.value) and not calls
    assert path.read_bytes() == before
    # resume=False collects anew over it, as documented
    fresh = lora_da.collect_statistics(other, many_batches(), TARGETS, checkpoint_path=path, resume=False,
                                       progress=False)
    assert fresh.n_samples == 18


# -- issue 21 item 4: rerunning a finished run, resuming ---------------------------------------


def test_rerunning_a_finished_checkpointed_run_returns_its_statistics(tmp_path, capsys):
    ckpt = tmp_path / "c.safetensors"
    first = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt,
                                       checkpoint_every=4, progress=False)
    loss_fn, calls = _counting()
    again = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt, loss_fn=loss_fn)
    assert not calls  # no forward pass: the statistics come from the checkpoint
    assert_same_statistics(again, first)
    assert "already finished (18 samples, 9 batches)" in capsys.readouterr().err
    # the PEFT path through collect_and_solve too
    inits = lora_da.init.collect_and_solve(tiny_llama(), many_batches(), TARGETS, lora_da.LoraDAConfig(n_pop=100),
                                           checkpoint_path=ckpt, loss_fn=loss_fn, progress=False)
    want = lora_da.compute_init(first, lora_da.LoraDAConfig(n_pop=100), progress=False)
    assert not calls and inits.keys() == want.keys()
    for n in want:
        np.testing.assert_array_equal(inits[n].B, want[n].B)


def test_a_finished_checkpoint_is_not_returned_for_another_pass(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt, progress=False)
    with pytest.raises(StatisticsFileError, match="finished pass of 9 batches, but this dataloader has 10"):
        lora_da.collect_statistics(tiny_llama(), many_batches() + many_batches()[:1], TARGETS, checkpoint_path=ckpt,
                                   progress=False)
    with pytest.raises(StatisticsFileError, match="max_samples=None, not 8"):
        lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt, max_samples=8,
                                   progress=False)
    with pytest.raises(StatisticsFileError, match="other modules or options"):
        lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt, token_mask="labels",
                                   progress=False)
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    with pytest.raises(StatisticsFileError, match="another model"):
        lora_da.collect_statistics(other, many_batches(), TARGETS, checkpoint_path=ckpt, progress=False)


def test_a_resumed_run_says_where_it_resumes(tmp_path, capsys):
    ckpt = tmp_path / "c.safetensors"

    def failing(model, batch, calls=[0]):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("interrupted")
        return default_loss(model, batch)

    with pytest.raises(RuntimeError, match="interrupted"):
        lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt, checkpoint_every=1,
                                   loss_fn=failing, progress=False)
    capsys.readouterr()
    resumed = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt)
    assert "resuming at batch 4 of 9 (6 samples already summed)" in capsys.readouterr().err
    assert_same_statistics(resumed, lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, progress=False),
                           exact_grad=False)


# -- 9: Statistics.merge is all or nothing -------------------------------------------------------


def test_a_refused_merge_changes_nothing():
    ids, mask = data()
    mine = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), TARGETS, progress=False)
    want = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), TARGETS, progress=False)
    lowrank = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 2), TARGETS, output_fisher="sequence_lowrank",
                                         progress=False)
    with pytest.raises(ShapeError, match="per_sample"):
        mine.merge(lowrank)  # the output factors refuse, after the input factors were merged
    assert_same_statistics(mine, want)
    mine.merge(want)  # and a valid merge still adds
    assert mine.n_samples == 12
    for n in mine.modules:
        np.testing.assert_array_equal(mine.grad_sums[n], 2 * want.grad_sums[n])


# -- 15, 16: inputs_embeds, misused loss functions and model outputs --------------------------------


def _with_labels(ids, mask):
    labels = ids.clone()
    labels[mask == 0] = -100
    return labels


def test_inputs_embeds_batches_give_the_statistics_of_their_input_ids():
    ids, mask = data()
    model = tiny_llama()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    by_ids = [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": _with_labels(ids, mask)[i:i + 3]}
              for i in (0, 3)]
    by_embeds = [{"inputs_embeds": embeds[i:i + 3], "attention_mask": mask[i:i + 3],
                  "labels": _with_labels(ids, mask)[i:i + 3]} for i in (0, 3)]
    want = lora_da.collect_statistics(model, by_ids, TARGETS, progress=False)
    got = lora_da.collect_statistics(model, by_embeds, TARGETS, progress=False)
    assert_same_statistics(got, want, exact_grad=False)
    for n in want.modules:
        np.testing.assert_allclose(got.mean_grad(n), want.mean_grad(n), rtol=1e-12, atol=1e-15)
    assert not by_embeds[0]["inputs_embeds"].requires_grad  # the caller's tensors are left as they were


@pytest.mark.parametrize("bad, match", [
    (lambda m, b: (default_loss(m, b), None), "got a tuple .*not a tuple"),
    (lambda m, b: default_loss(m, b).detach(), "without gradient"),
    (lambda m, b: default_loss(m, b).long(), "real floats, got dtype torch.int64"),
    (lambda m, b: default_loss(m, b).to(torch.complex128), "real floats, got dtype torch.complex128"),
    (lambda m, b: float(default_loss(m, b).sum()), "got a float"),
])
def test_a_misused_loss_fn_is_named(bad, match):
    ids, mask = data()
    with pytest.raises(InvalidArgumentError, match="loss_fn\\(model, batch\\) must return .*" + match):
        lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), TARGETS, loss_fn=bad, progress=False)


def test_a_model_returning_bare_logits():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_classifier()

        def forward(self, **kw):
            return self.inner(**kw).logits

    ids, mask = data()
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    bs = [dict(b, labels=y[i:i + 3]) for i, b in zip((0, 3), batches(ids, mask, 3))]
    bare = Bare()
    got = lora_da.collect_statistics(bare, bs, ["query"], progress=False)
    want = lora_da.collect_statistics(bare.inner, bs, ["query"], progress=False)
    assert [n.removeprefix("inner.") for n in got.modules] == list(want.modules)
    for a, b in zip(got.modules, want.modules):
        np.testing.assert_array_equal(got.mean_grad(a), want.mean_grad(b))
