"""Statistics of several ranks summed with torch.distributed (gloo, 2 CPU processes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import lora_da
from test_hardening import TARGETS, many_batches
from test_collect import tiny_llama

HERE = Path(__file__).parent

_RANKS = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def work(rank, world, out):
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = {port!r}
        dist.init_process_group("gloo", rank=rank, world_size=world)
        import lora_da
        from lora_da.distributed import all_reduce_statistics
        from test_hardening import many_batches, TARGETS
        from test_collect import tiny_llama
        shard = many_batches()[rank::world]
        stats = lora_da.collect_statistics(tiny_llama(), shard, TARGETS, progress=False)
        total = all_reduce_statistics(stats)
        total.save(os.path.join(out, f"rank{{rank}}.safetensors"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(2, sys.argv[1]), nprocs=2)
    """
)


def test_two_ranks_sum_to_the_whole_set(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS.format(tests=str(HERE), port=port))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    whole = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, progress=False)
    ranks = [lora_da.Statistics.load(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for st in ranks:
        assert st.n_samples == whole.n_samples and st.config["world_size"] == 2
        for n in whole.modules:
            assert st.output_factors[n].tokens == whole.output_factors[n].tokens
            np.testing.assert_allclose(st.mean_grad(n), whole.mean_grad(n), rtol=0, atol=1e-14 * np.abs(whole.mean_grad(n)).max())
            np.testing.assert_allclose(st.input_factor(n), whole.input_factor(n), rtol=1e-14, atol=0)
            np.testing.assert_allclose(st.output_factor(n), whole.output_factor(n), rtol=1e-14, atol=0)
    for n in whole.modules:  # every rank holds the same statistics
        np.testing.assert_array_equal(ranks[0].input_factor(n), ranks[1].input_factor(n))


def test_needs_a_process_group():
    import pytest

    from lora_da.distributed import all_reduce_statistics

    stats = lora_da.collect_statistics(tiny_llama(), many_batches()[:1], ["q_proj"], progress=False)
    with pytest.raises(lora_da.InvalidArgumentError, match="process group"):
        all_reduce_statistics(stats)
