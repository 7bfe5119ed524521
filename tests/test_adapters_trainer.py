"""The Trainer path: LoraDACallback initializes the adapter from the trainer's
own train dataloader when training begins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ClassifierRows, batches, data, lora_params, peft_classifier, trainer_of

import lora_da


def test_the_callback_initializes_from_the_trainers_dataloader(tmp_path):
    """With every sample read, the statistics do not depend on the shuffled
    order: the adapter after a zero-learning-rate step equals
    initialize_lora_da_weights on the whole set, computed independently."""
    cfg = lora_da.LoraDAConfig(n_pop=100, gamma=4.0)
    model = peft_classifier()
    before = lora_params(model)
    cb = lora_da.LoraDACallback(cfg, max_samples=None, progress=False)
    trainer_of(model, tmp_path, cb).train()
    got = lora_params(model)
    assert cb.results and len(cb.results) == 2
    want_model = peft_classifier()
    ids, mask = data()
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    whole = [dict(b, labels=y[i:i + 3]) for i, b in zip((0, 3), batches(ids, mask, 3))]
    lora_da.initialize_lora_da_weights(want_model, whole, lora_da_config=cfg, progress=False)
    want = lora_params(want_model)
    assert got.keys() == want.keys() and len(got) == 4
    for k in got:
        assert not np.allclose(got[k], before[k])  # it wrote something
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5 * np.abs(want[k]).max(), err_msg=k)


def test_max_samples_cuts_the_calibration_set_and_a_resumed_run_is_left_alone(tmp_path):
    cfg = lora_da.LoraDAConfig(n_pop=100, gamma=4.0)
    from lora_da.trainer import _first_samples

    loader = torch.utils.data.DataLoader(ClassifierRows(), batch_size=4)
    cut = _first_samples(loader, 5)
    assert [len(b["labels"]) for b in cut] == [4, 1]
    cb = lora_da.LoraDACallback(cfg, progress=False)
    model = peft_classifier()
    before = lora_params(model)

    class _State:
        global_step = 7
        is_local_process_zero = True

    cb.on_train_begin(None, _State(), None, model=model, train_dataloader=loader)
    assert cb.results is None and all(np.array_equal(v, lora_params(model)[k]) for k, v in before.items())
    with pytest.raises(lora_da.InvalidArgumentError, match="LoraDAConfig"):
        lora_da.LoraDACallback({"n_pop": 100})
    with pytest.raises(lora_da.InvalidArgumentError, match="max_samples"):
        lora_da.LoraDACallback(cfg, max_samples=0)


_TORCHRUN = '''
import os, sys
sys.path.insert(0, {tests!r})
import numpy as np, torch
torch.set_num_threads(1)
import lora_da
from helpers import peft_classifier, lora_params, trainer_of
model = peft_classifier()
cb = lora_da.LoraDACallback(lora_da.LoraDAConfig(n_pop=100, gamma=4.0), max_samples=None, progress=False)
trainer_of(model, {out!r}, cb, batch=3).train()  # 2 × 3 = the 6 rows: Accelerate repeats none to even the batches
import torch.distributed as dist
np.savez(os.path.join({out!r}, "rank%d.npz" % dist.get_rank()), world=dist.get_world_size(), **lora_params(model))
# Leaving gloo's threads to the interpreter's exit aborts the process now and then
# ("terminate called without an active exception"): end the group as a script should.
dist.barrier()
dist.destroy_process_group()
'''


def test_the_callback_under_torchrun_gives_every_rank_the_whole_sets_adapter(tmp_path):
    """torchrun with 2 CPU processes (gloo): the Trainer's DistributedSampler
    gives each rank half the rows; the adapters are the same bits on both
    ranks and equal the single-process adapter on all rows."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(_TORCHRUN.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    assert int(ranks[0].pop("world")) == int(ranks[1].pop("world")) == 2
    want_model = peft_classifier()
    ids, mask = data()
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    whole = [dict(b, labels=y[i:i + 3]) for i, b in zip((0, 3), batches(ids, mask, 3))]
    lora_da.initialize_lora_da_weights(want_model, whole, lora_da_config=lora_da.LoraDAConfig(n_pop=100, gamma=4.0),
                                       progress=False)
    want = lora_params(want_model)
    assert ranks[0].keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k], err_msg=k)
        np.testing.assert_allclose(ranks[0][k], want[k], rtol=0, atol=1e-5 * np.abs(want[k]).max(), err_msg=k)
