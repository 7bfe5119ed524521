"""A collection interrupted and resumed, bad batches, files from
elsewhere, fork safety, determinism across thread counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import TARGETS, assert_same_statistics, many_batches, tiny_llama
from peft import LoraConfig, get_peft_model

import lora_da
from lora_da.collect import default_loss

HERE = Path(__file__).parent
_KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import lora_da
    from helpers import many_batches, TARGETS, tiny_llama
    from lora_da.collect import default_loss

    def slow_loss(model, batch):
        time.sleep(0.4)
        return default_loss(model, batch)

    lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, loss_fn=slow_loss,
                               checkpoint_path={ckpt!r}, checkpoint_every=1, progress=False)
    """
)


def test_sigkill_mid_pass_then_resume_equals_uninterrupted(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    script = _KILLED_RUN.format(tests=str(HERE), ckpt=str(ckpt))
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        done = 0
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    done = lora_da.Statistics.load(ckpt).config["batches_done"]
                except lora_da.StatisticsFileError:
                    done = 0
                if done >= 3:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the collection finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = lora_da.Statistics.load(ckpt)
    assert 3 <= partial.config["batches_done"] < 9
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no torn temporary file
    done = partial.config["batches_done"]
    # A fresh recomputation gives the same statistics as a resumed pass: only
    # the batches the loss actually sees tell them apart.
    seen = []

    def counting_loss(model, batch):
        seen.append(batch["input_ids"].clone())
        return default_loss(model, batch)

    resumed = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, loss_fn=counting_loss,
                                         checkpoint_path=ckpt, progress=False)
    expected = [b["input_ids"] for b in many_batches()[done:]]
    assert len(seen) == len(expected) == 9 - done, f"{len(seen)} batches processed after a checkpoint of {done}"
    for got, want in zip(seen, expected):
        assert torch.equal(got, want)
    whole = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, progress=False)
    assert resumed.config["batches_done"] == 9
    assert_same_statistics(resumed, whole)


def test_non_finite_activation_names_module_and_batch_and_keeps_checkpoint(tmp_path):
    model = tiny_llama()
    target = model.model.layers[1].mlp.down_proj
    calls = {"n": 0}

    def poison(module, args):
        calls["n"] += 1
        if calls["n"] == 3:  # the third batch
            x = args[0].clone()
            x[0, 1, 2] = float("inf")
            return (x,)

    h = target.register_forward_pre_hook(poison)
    ckpt = tmp_path / "ck.safetensors"
    with pytest.raises(lora_da.NonFiniteError, match=r"model\.layers\.1\.mlp\.down_proj.*batch 2"):
        lora_da.collect_statistics(model, many_batches(), TARGETS, checkpoint_path=ckpt, checkpoint_every=1, progress=False)
    h.remove()
    kept = lora_da.Statistics.load(ckpt)
    assert kept.config["batches_done"] == 2
    first_two = lora_da.collect_statistics(tiny_llama(), many_batches()[:2], TARGETS, progress=False)
    assert_same_statistics(kept, first_two)


def test_checkpoint_from_other_options_is_refused(tmp_path):
    ckpt = tmp_path / "ck.safetensors"
    lora_da.collect_statistics(tiny_llama(), many_batches()[:2], ["q_proj"], checkpoint_path=ckpt, progress=False)
    with pytest.raises(lora_da.StatisticsFileError, match="other modules"):
        lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt, progress=False)
    with pytest.raises(lora_da.InvalidArgumentError, match="checkpoint_every"):
        lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_every=2, progress=False)


def test_statistics_of_another_model_are_refused_before_writing():
    other = lora_da.collect_statistics(tiny_llama(), many_batches()[:2], ["q_proj"], progress=False)
    # same module names, other shapes: a wider model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    peft_model = get_peft_model(wide, LoraConfig(r=4, target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    with pytest.raises(lora_da.ShapeError, match="q_proj"):
        lora_da.initialize_lora_da_weights(peft_model, statistics=other, lora_da_config=lora_da.LoraDAConfig(n_pop=10, rank=4))
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, before[n])


def test_version_mismatch_is_refused(tmp_path):
    import json

    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    stats = lora_da.collect_statistics(tiny_llama(), many_batches()[:1], ["q_proj"], progress=False)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    with safe_open(str(path), framework="numpy") as f:
        header = json.loads(f.metadata()["lora_da"])
    header["format_version"] = 99
    save_file(load_file(str(path)), str(tmp_path / "v99.safetensors"), metadata={"lora_da": json.dumps(header)})
    with pytest.raises(lora_da.StatisticsFileError, match="version 99"):
        lora_da.Statistics.load(tmp_path / "v99.safetensors")


_DETERMINISM = textwrap.dedent(
    """
    import sys, hashlib
    sys.path.insert(0, {tests!r})
    import numpy as np, lora_da
    from helpers import many_batches, TARGETS, tiny_llama
    stats = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, progress=False)
    from lora_da.synthetic import make_problem
    p = make_problem(300, 260, cond=1e5, seed=4)
    res = lora_da.solve(p.Z, p.y, p.G, rank=8, n_pop=1000.0, method="krylov")
    inits = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100, rank=4), progress=False)
    h = hashlib.sha256()
    for n in stats.modules:
        h.update(stats.grad_sums[n].tobytes()); h.update(stats.input_factor(n).tobytes())
        h.update(inits[n].A.tobytes()); h.update(inits[n].B.tobytes())
    h.update(res.A.tobytes()); h.update(res.B.tobytes())
    print(lora_da.num_threads(), h.hexdigest())
    """
)


def test_statistics_and_adapters_bit_identical_across_runs_and_threads():
    digests = set()
    for threads in ("1", "2", "2", "4"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", _DETERMINISM.format(tests=str(HERE))], env=env,
                             capture_output=True, text=True, check=True, timeout=300)
        used, digest = out.stdout.split()
        assert used == threads
        digests.add(digest)
    assert len(digests) == 1


_FORK = textwrap.dedent(
    """
    import numpy as np, torch, lora_da
    f = lora_da.InputFactor(64)
    f.add(np.ones((10, 64), np.float32))      # the pool is running in the parent now
    lora_da.solve(np.eye(300), np.ones(250), np.ones((250, 300)) * 1e-3, rank=4, n_pop=10.0, method="krylov")

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            g = lora_da.InputFactor(300)        # the core, inside a forked worker
            g.add(np.random.default_rng(i).standard_normal((50, 300)).astype(np.float32))
            r = lora_da.solve(np.eye(300) + g.mean(), np.ones(250), np.ones((250, 300)) * 1e-3,
                              rank=4, n_pop=10.0, method="krylov")
            return torch.tensor(r.eigenvalues[0])

    loader = torch.utils.data.DataLoader(Data(), batch_size=2, num_workers=2, multiprocessing_context="fork")
    print(len([b for b in loader]))
    """
)


def test_forked_dataloader_workers_do_not_deadlock():
    out = subprocess.run([sys.executable, "-c", _FORK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "4"
