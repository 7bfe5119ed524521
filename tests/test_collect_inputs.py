"""What a collection is given, and its defect classes (numbered as in the third
hardening review): a
statistics file taken for a checkpoint (3), token_mask='labels' with class
labels (13), inputs_embeds batches (15), misused loss functions and model
outputs (16); and a finished checkpointed run, rerun, returns
its statistics, a resumed one says where it resumes.

Each test failed on the code before the fix (checked by stashing the fix)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TARGETS, assert_same_statistics, batches, data, many_batches, tiny_classifier, tiny_llama

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


# -- rerunning a finished run, resuming ------------------------------------------------------


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
    inits = lora_da.collect_and_solve(tiny_llama(), many_batches(), TARGETS, lora_da.LoraDAConfig(n_pop=100),
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


@pytest.mark.parametrize("accumulate_on", ["host", "device"])
def test_a_resumed_run_says_where_it_resumes(tmp_path, capsys, accumulate_on):
    """Interrupted after a checkpoint, resumed: the statistics of the uninterrupted pass (on the
    device path, on the CPU, the checkpoint flushes the device sums into the host's accumulators)."""
    ckpt = tmp_path / "c.safetensors"

    def failing(model, batch, calls=[0]):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("interrupted")
        return default_loss(model, batch)

    with pytest.raises(RuntimeError, match="interrupted"):
        lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt, checkpoint_every=1,
                                   loss_fn=failing, progress=False, accumulate_on=accumulate_on)
    capsys.readouterr()
    resumed = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt,
                                         accumulate_on=accumulate_on)
    # the device path's probe runs the first batch's forward + backward once more: the 4th call is batch 3
    where = {"host": "batch 4 of 9 (6 samples", "device": "batch 3 of 9 (4 samples"}[accumulate_on]
    assert f"resuming at {where} already summed)" in capsys.readouterr().err
    whole = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, progress=False)
    if accumulate_on == "host":
        assert_same_statistics(resumed, whole, exact_grad=False)
        return
    # device sums reach the host's accumulators in other groupings (a flush per checkpoint): rounding apart
    assert resumed.n_samples == whole.n_samples == 18
    for n in whole.modules:
        assert resumed.output_factors[n].tokens == whole.output_factors[n].tokens
        for f in ("mean_grad", "input_factor", "output_factor"):
            a, b = getattr(resumed, f)(n), getattr(whole, f)(n)
            assert np.abs(a - b).max() <= 1e-13 * np.abs(b).max(), (n, f)


# -- 9: Statistics.merge is all or nothing -------------------------------------------------------


def test_a_refused_merge_changes_nothing():
    ids, mask = data()
    mine = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), TARGETS, progress=False)
    want = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), TARGETS, progress=False)
    lowrank = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 2), TARGETS, output_fisher="sequence_lowrank",
                                         progress=False)
    with pytest.raises(ShapeError, match="output_fisher|per_sample"):
        mine.merge(lowrank)  # refused: by the options' check, else by the output factors after the input factors
    assert_same_statistics(mine, want)
    mine.merge(want)  # and a valid merge still adds
    assert mine.n_samples == 12
    for n in mine.modules:
        np.testing.assert_array_equal(mine.grad_sums[n], 2 * want.grad_sums[n])


def test_a_merge_of_a_wrong_shard_names_it_and_changes_nothing():
    """A non-Statistics, a wrong-shaped or a missing gradient sum: one line naming the shard
    or module (they were an AttributeError, numpy's ValueError, a KeyError)."""
    import copy

    ids, mask = data()
    mine = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), TARGETS, progress=False)
    want = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), TARGETS, progress=False)
    name = next(iter(mine.modules))
    with pytest.raises(InvalidArgumentError, match="Statistics.merge: the other shard must be a lora_da.Statistics, got object"):
        mine.merge(object())
    wrong = copy.copy(want)  # the other shard: the same but for what is spoilt (new dicts, shared factors)
    wrong.grad_sums = dict(want.grad_sums, **{name: want.grad_sums[name][:, :-1]})
    with pytest.raises(ShapeError, match=f"module {re.escape(name)}: the other shard's gradient sum is"):
        mine.merge(wrong)
    missing = copy.copy(want)
    missing.grad_sums = {n: g for n, g in want.grad_sums.items() if n != name}
    with pytest.raises(ShapeError, match=f"module {re.escape(name)}: the other shard has no gradient sum"):
        mine.merge(missing)
    no_output = copy.copy(want)
    no_output.output_factors = {n: f for n, f in want.output_factors.items() if n != name}
    with pytest.raises(ShapeError, match=f"module {re.escape(name)}: the other shard has no output factor"):
        mine.merge(no_output)
    assert_same_statistics(mine, want)
    assert mine.n_samples == want.n_samples


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


@pytest.mark.parametrize("labels", [
    torch.tensor([[0., 1.], [1., 0.], [1., 1.]]),  # multi-label targets: the mask was ignored, every token counted
    torch.tensor([[0], [1], [1]]),  # class labels (B, 1): a raw RuntimeError in the loss
    torch.tensor([[0, 1], [1, 0], [1, 1]]),  # integer (B, 2): not the tokens' (B, T) either
], ids=["float-B2", "B1", "int-B2"])
def test_token_mask_labels_needs_labels_of_the_inputs_shape(labels):
    ids, mask = data()
    bs = [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": labels} for i in (0, 3)]
    with pytest.raises(InvalidArgumentError,
                       match=rf"token_mask='labels' needs per-token labels .*input's shape \(3, 9\).*shape "
                             rf"{re.escape(str(tuple(labels.shape)))}.*pass token_mask='attention'"):
        lora_da.collect_statistics(tiny_classifier(), bs, ["query"], token_mask="labels", progress=False)


def test_class_labels_of_shape_b1_are_named_by_the_default_loss():
    ids, mask = data()
    bs = [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": torch.tensor([[0], [1], [1]])}
          for i in (0, 3)]
    with pytest.raises(InvalidArgumentError, match=r"one class id per sample, labels of shape \(3,\); these have "
                                                   r"shape \(3, 1\): flatten them, or pass loss_fn"):
        lora_da.collect_statistics(tiny_classifier(), bs, ["query"], progress=False)


def test_token_mask_labels_refuses_float_labels_of_the_tokens_shape():
    ids, mask = data()
    bs = [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": _with_labels(ids, mask)[i:i + 3].double()}
          for i in (0, 3)]
    with pytest.raises(InvalidArgumentError, match="token_mask='labels' needs per-token class ids.*torch.float64"):
        lora_da.collect_statistics(tiny_llama(), bs, TARGETS, token_mask="labels", progress=False)


def test_inputs_embeds_without_labels_or_input_ids_says_what_to_pass():
    ids, mask = data()
    model = tiny_llama()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    bs = [{"inputs_embeds": embeds[i:i + 3], "attention_mask": mask[i:i + 3]} for i in (0, 3)]
    with pytest.raises(InvalidArgumentError, match="neither.*give batches of inputs_embeds their 'labels'.*loss_fn"):
        lora_da.collect_statistics(model, bs, TARGETS, progress=False)


class _Wrapped(torch.nn.Module):
    def __init__(self, give):
        super().__init__()
        self.inner, self.give = tiny_llama(), give

    def forward(self, **kw):
        return self.give(self.inner(**kw).logits)


@pytest.mark.parametrize("give, match", [
    (lambda logits: {"hidden": logits}, r"returned dict \(keys \['hidden'\]\) without logits; pass loss_fn"),
    (lambda logits: None, "returned NoneType without logits; pass loss_fn"),
    (lambda logits: 3.0, "returned float without logits; pass loss_fn"),
], ids=["dict", "None", "float"])
def test_a_model_output_without_logits_is_named(give, match):
    ids, mask = data()
    with pytest.raises(InvalidArgumentError, match="default loss: the model " + match):
        lora_da.collect_statistics(_Wrapped(give), batches(ids, mask, 3), ["q_proj"], progress=False)


def test_a_model_returning_a_dict_with_logits_is_read():
    ids, mask = data()
    wrapped = _Wrapped(lambda logits: {"logits": logits})
    got = lora_da.collect_statistics(wrapped, batches(ids, mask, 3), ["q_proj"], progress=False)
    want = lora_da.collect_statistics(wrapped.inner, batches(ids, mask, 3), ["q_proj"], progress=False)
    for a, b in zip(got.modules, want.modules):
        np.testing.assert_array_equal(got.mean_grad(a), want.mean_grad(b))


# -- the README's determinism claim, as written ---------------------------------------------------

_RUN = """
import sys, hashlib
sys.path.insert(0, {tests!r})
import numpy as np, torch, lora_da
from helpers import many_batches, TARGETS, tiny_llama
stats = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, progress=False)
inits = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100, rank=4), progress=False)
h, arrays = hashlib.sha256(), {{}}
for n in stats.modules:
    for key, a in (("G", stats.mean_grad(n)), ("Z", stats.input_factor(n)), ("y", stats.output_factor(n)),
                   ("A", inits[n].A), ("B", inits[n].B)):
        h.update(a.tobytes())
        arrays[f"{{n}}/{{key}}"] = a
np.savez({out!r}, **arrays)
print(torch.get_num_threads(), lora_da.num_threads(), h.hexdigest())
"""


def test_bit_identical_across_core_threads_at_fixed_torch_threads_and_close_across_torch_threads(tmp_path):
    """README, Determinism: bit for bit across runs and RAYON_NUM_THREADS at a fixed torch thread
    count; across torch thread counts (its backward reorders its sums) Ḡ, Z, y within 1e-12."""
    import os
    import subprocess
    import sys

    here = str(Path(__file__).parent)
    runs = {}
    for torch_threads, core_threads in (("2", "1"), ("2", "2"), ("2", "2"), ("1", "2")):
        out = tmp_path / f"t{torch_threads}c{core_threads}-{len(runs)}.npz"
        env = dict(os.environ, OMP_NUM_THREADS=torch_threads, RAYON_NUM_THREADS=core_threads)
        done = subprocess.run([sys.executable, "-c", _RUN.format(tests=here, out=str(out))], env=env,
                              capture_output=True, text=True, check=True, timeout=300)
        used_torch, used_core, digest = done.stdout.split()
        assert (used_torch, used_core) == (torch_threads, core_threads)
        runs[out] = (torch_threads, digest)
    at_two = {d for t, d in runs.values() if t == "2"}
    assert len(at_two) == 1  # three runs, core threads 1 and 2: the same bits
    files = list(runs)
    two, one = np.load(files[0]), np.load(files[-1])
    for key in two.files:
        if key.endswith(("/G", "/Z", "/y")):
            scale = np.abs(two[key]).max()
            np.testing.assert_allclose(one[key], two[key], rtol=0, atol=1e-12 * scale, err_msg=key)


# -- fuzzing the checkpoint path (FUZZING.md, "Checkpoint headers") ----------------------------------

import json  # noqa: E402
import os  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CHECKPOINT_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
_FUZZ_TARGETS = ["q_proj"]


def _fuzz_batches():
    return many_batches()[:4]


@pytest.fixture(scope="module")
def partial_checkpoint(tmp_path_factory):
    """A checkpoint of the first 2 of 4 batches (the 3rd fails), and the statistics of the whole pass."""
    path = tmp_path_factory.mktemp("ck") / "ck.safetensors"

    def failing(model, batch, calls=[0]):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("interrupted")
        return default_loss(model, batch)

    with pytest.raises(RuntimeError):
        lora_da.collect_statistics(tiny_llama(), _fuzz_batches(), _FUZZ_TARGETS, checkpoint_path=path,
                                   checkpoint_every=1, loss_fn=failing, progress=False)
    whole = lora_da.collect_statistics(tiny_llama(), _fuzz_batches(), _FUZZ_TARGETS, progress=False)
    return path, whole


def test_fuzz_checkpoint_headers(partial_checkpoint, tmp_path):
    """A checkpoint spoiled as test_fuzz_statistics_headers spoils statistics files, then resumed:
    the pass either refuses it with a StatisticsFileError naming the file, or returns statistics
    that are usable — and equal to the uninterrupted pass whenever the header and tensors were
    left as they were. Nothing else escapes (no KeyError, TypeError, LoraDAError without the file)."""
    from test_cli_files import header_mutations, read, tensor_mutations, write

    base, whole = partial_checkpoint
    header, tensors = read(base)
    model = tiny_llama()
    counts = {"resumed": 0, "refused": 0}

    @settings(max_examples=CHECKPOINT_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        h = data.draw(header_mutations(header), label="header")
        t = data.draw(tensor_mutations(tensors), label="tensors")
        path = tmp_path / "chéck point.safetensors"
        try:
            write(path, h, t, raw=json.dumps(h, allow_nan=True))
        except Exception:  # safetensors itself refuses some tensors: nothing to resume
            return
        try:
            got = lora_da.collect_statistics(model, _fuzz_batches(), _FUZZ_TARGETS, checkpoint_path=path,
                                             progress=False)
        except StatisticsFileError as e:
            assert str(path) in str(e), f"the message does not name the checkpoint: {e}"
            counts["refused"] += 1
            return
        assert got.n_samples >= 1 and got.modules.keys() == whole.modules.keys()
        for n in got.modules:
            assert np.isfinite(got.mean_grad(n)).all() and np.isfinite(got.input_factor(n)).all()
        # (a file without the compensation tensors is valid since format 2: the keys first)
        if h == header and t.keys() == tensors.keys() and all(
                np.array_equal(t[k], tensors[k]) and t[k].dtype == tensors[k].dtype for k in tensors):
            assert_same_statistics(got, whole, exact_grad=False)
        counts["resumed"] += 1

    check()
    print(f"fuzz_checkpoint_headers: {counts}")
    assert counts["refused"] > 0
