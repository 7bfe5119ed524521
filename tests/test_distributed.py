"""Statistics of several ranks summed with torch.distributed (gloo, 2 CPU processes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import lora_da
from helpers import TARGETS, many_batches, tiny_llama

HERE = Path(__file__).parent

# The two processes' script: the body runs in each, after the gloo group is up,
# with ``rank``, ``world`` and ``out`` (the test's tmp_path) defined.
_HARNESS = textwrap.dedent(
    """
    import datetime, json, os, sys, warnings
    sys.path.insert(0, {tests!r})
    import numpy as np, torch, torch.distributed as dist, torch.multiprocessing as mp

    def work(rank, world, out):
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = {port!r}
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds={timeout}))
        warnings.filterwarnings("error", message="lora_da.distributed.settle")  # a collective that never settles fails
    {body}
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(2, sys.argv[1]), nprocs=2)
    """
)

_RANKS = """\
import lora_da
from lora_da.distributed import all_reduce_statistics
from helpers import many_batches, TARGETS, tiny_llama
shard = many_batches()[rank::world]
stats = lora_da.collect_statistics(tiny_llama(), shard, TARGETS, progress=False, reduce_across_ranks=False)
total = all_reduce_statistics(stats)
total.save(os.path.join(out, f"rank{rank}.safetensors"))
from lora_da.distributed import gather_objects
got = gather_objects({"rank": rank, "pad": "x" * (1000 * rank + 3)}, dist.group.WORLD)  # sizes differ
json.dump(got, open(os.path.join(out, f"objects{rank}.json"), "w"))
"""


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run_two_ranks(body: str, tmp_path, timeout_s: int = 300) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(_HARNESS.format(tests=str(HERE), port=_free_port(), timeout=timeout_s,
                                      body=textwrap.indent(body, " " * 4).strip("\n")))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_ranks_sum_to_the_whole_set(tmp_path):
    _run_two_ranks(_RANKS, tmp_path)
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
    import json

    for r in range(2):  # objects of different sizes, in rank order, on both ranks
        got = json.load(open(tmp_path / f"objects{r}.json"))
        assert got == [{"rank": k, "pad": "x" * (1000 * k + 3)} for k in range(2)]


def test_needs_a_process_group():
    import pytest

    from lora_da.distributed import all_reduce_statistics

    stats = lora_da.collect_statistics(tiny_llama(), many_batches()[:1], ["q_proj"], progress=False)
    with pytest.raises(lora_da.InvalidArgumentError, match="process group"):
        all_reduce_statistics(stats)


# What a data-parallel user runs: every call on every rank with its own shard
# and no lora-da-specific glue; the library sums and splits by itself.
_DEFAULTS = """\
import lora_da
from lora_da.pipeline import collect_and_solve
from peft import LoraConfig, get_peft_model
from helpers import many_batches, TARGETS, tiny_llama
shard = many_batches()[rank::world]
cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
lora_da.collect_statistics(tiny_llama(), shard, TARGETS, progress=False).save(
    os.path.join(out, f"stats{rank}.safetensors"))
lora_da.collect_statistics(tiny_llama(), shard, TARGETS, progress=False,
                           output_fisher="sequence_lowrank").save(os.path.join(out, f"lowrank{rank}.safetensors"))
res = {}
for route in ("host", "device"):
    inits = collect_and_solve(tiny_llama(), shard, TARGETS, cfg, progress=False, accumulate_on=route)
    for n, i in inits.items():
        res[f"{route}/{n}/A"], res[f"{route}/{n}/B"] = i.A, i.B
peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
lora_da.initialize_lora_da_weights(peft_model, shard, lora_da_config=lora_da.LoraDAConfig(n_pop=100, gamma=4.0),
                                   progress=False)
for n, p in peft_model.named_parameters():
    if "lora_" in n:
        res["peft/" + n] = p.detach().numpy()
np.savez(os.path.join(out, f"res{rank}.npz"), **res)
"""


def test_data_parallel_runs_agree_by_default(tmp_path):
    """Under a process group the defaults sum the shards (statistics of the
    whole set on every rank) and give every rank the same adapter, equal to a
    single process on the whole set up to the rounding of the shard sums."""
    from peft import LoraConfig, get_peft_model

    from lora_da.pipeline import collect_and_solve

    _run_two_ranks(_DEFAULTS, tmp_path)
    whole = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, progress=False)
    for r in range(2):
        st = lora_da.Statistics.load(tmp_path / f"stats{r}.safetensors")
        assert st.n_samples == whole.n_samples and st.config["world_size"] == 2
        for n in whole.modules:
            np.testing.assert_allclose(st.mean_grad(n), whole.mean_grad(n), rtol=0, atol=1e-14 * np.abs(whole.mean_grad(n)).max())
            np.testing.assert_allclose(st.input_factor(n), whole.input_factor(n), rtol=1e-14, atol=0)
    lowrank = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, progress=False, output_fisher="sequence_lowrank")
    shards = [many_batches()[r::2] for r in range(2)]
    for r in range(2):
        st = lora_da.Statistics.load(tmp_path / f"lowrank{r}.safetensors")
        for n in lowrank.modules:
            # rank 0's samples, then rank 1's: the whole set's rows, reordered
            order = [lora_da.collect_statistics(tiny_llama(), sh, [n], progress=False, output_fisher="sequence_lowrank")
                     .output_factors[n].sample_sums() for sh in shards]
            np.testing.assert_allclose(st.output_factors[n].sample_sums(), np.concatenate(order), rtol=1e-13, atol=1e-300)
            assert st.output_factors[n].samples == lowrank.output_factors[n].samples

    res = [dict(np.load(tmp_path / f"res{r}.npz")) for r in range(2)]
    assert res[0].keys() == res[1].keys() and len(res[0]) == 2 * 4 * 2 + 4 * 2  # 2 routes × 4 modules × (A, B), then the adapter's 4 × (A, B)
    for k in res[0]:
        np.testing.assert_array_equal(res[0][k], res[1][k], err_msg=k)  # the same bits on every rank
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0)
    single = collect_and_solve(tiny_llama(), many_batches(), TARGETS, cfg, progress=False)
    for route in ("host", "device"):
        for n, init in single.items():
            for key, want in (("A", init.A), ("B", init.B)):
                got = res[0][f"{route}/{n}/{key}"]
                np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=0, atol=1e-8 * np.abs(want).max(),
                                           err_msg=f"{route} {n} {key}")
    peft_single = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    lora_da.initialize_lora_da_weights(peft_single, many_batches(), lora_da_config=lora_da.LoraDAConfig(n_pop=100, gamma=4.0),
                                       progress=False)
    for n, p in peft_single.named_parameters():
        if "lora_" in n:
            want = p.detach().numpy()
            np.testing.assert_allclose(np.abs(res[0]["peft/" + n]), np.abs(want), rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=n)


_SPLIT = """\
import lora_da
import lora_da.init as init_mod
solved = []
real = init_mod._solve_on_host

def spy(Z, ys, Gs, names, *a, **k):
    solved.extend(names)
    return real(Z, ys, Gs, names, *a, **k)

init_mod._solve_on_host = spy
stats = lora_da.Statistics.load(os.path.join(out, "stats.safetensors"))
inits = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0), progress=False,
                             across_ranks=True)
res = {f"{n}/{k}": getattr(i.result, k) for n, i in inits.items() for k in ("A", "B", "V", "eigenvalues")}
res.update({f"{n}/residual": np.float64(i.result.residual) for n, i in inits.items()})

def fails_on_rank_1(*a, **k):
    if rank == 1:
        raise lora_da.NonFiniteError("planted failure")
    return real(*a, **k)

init_mod._solve_on_host = fails_on_rank_1
try:
    lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0), progress=False,
                         across_ranks=True)
    raised = "nothing"
except lora_da.LoraDAError as e:
    raised = f"{type(e).__name__}: {e}"
np.savez(os.path.join(out, f"split{rank}.npz"), solved=np.array(solved), raised=np.array(raised), **res)
"""


def test_compute_init_across_ranks_splits_the_solves_and_equals_one_process(tmp_path):
    """Every module is solved on exactly one rank, both ranks solve some, and
    every rank returns all modules with the bits one process computes."""
    stats = lora_da.collect_statistics(tiny_llama(), many_batches(), ["q_proj", "k_proj", "down_proj"], progress=False)
    stats.save(tmp_path / "stats.safetensors")
    _run_two_ranks(_SPLIT, tmp_path)
    one = lora_da.compute_init(lora_da.Statistics.load(tmp_path / "stats.safetensors"),
                               lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0), progress=False)
    parts = [dict(np.load(tmp_path / f"split{r}.npz")) for r in range(2)]
    solved = [set(p.pop("solved").tolist()) for p in parts]
    assert solved[0] and solved[1] and not solved[0] & solved[1] and solved[0] | solved[1] == set(one)
    for p in parts:
        for n, init in one.items():
            for k in ("A", "B", "V", "eigenvalues"):  # the gathered arrays keep every bit and shape
                np.testing.assert_array_equal(p[f"{n}/{k}"], getattr(init.result, k), err_msg=f"{n} {k}")
                assert p[f"{n}/{k}"].dtype == np.float64
            assert p[f"{n}/residual"] == init.result.residual
    # a failure on one rank is raised on both, naming the rank, instead of leaving the other waiting
    for p in parts:
        assert str(p["raised"]).startswith("NonFiniteError:") and "planted failure" in str(p["raised"])
    assert "rank 1" in str(parts[0]["raised"])


def test_owners_balance_over_passes(monkeypatch):
    """A plan of one input group per pass alternates the ranks when the load is
    carried over the passes, instead of giving every pass to rank 0."""
    import torch.distributed as dist

    from lora_da.distributed import owners

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    load = [0.0, 0.0]
    got = [owners({f"g{p}": 1.0}, None, load)[f"g{p}"] for p in range(6)]
    assert got == [0, 1, 0, 1, 0, 1] and load == [3.0, 3.0]
    one = owners({"a": 5.0, "b": 3.0, "c": 2.0, "d": 1.0}, None)  # largest first, to the least loaded
    assert one == {"a": 0, "b": 1, "c": 1, "d": 0}


_ONE_RANK_FAILS = """\
import lora_da
from lora_da.pipeline import collect_and_solve
from helpers import many_batches, TARGETS, tiny_llama
got = {}
cases = [("host", 1), ("device", 1), ("device", 0), ("solve", 1)]
for route, where in cases:
    shard = many_batches()[rank::world]
    if rank == 1:
        shard[where] = [shard[where]["input_ids"]]  # not a dict: refused on rank 1 only
    try:
        if route == "solve":
            collect_and_solve(tiny_llama(), shard, TARGETS, lora_da.LoraDAConfig(n_pop=100, rank=2), progress=False,
                              accumulate_on="device")
        else:
            lora_da.collect_statistics(tiny_llama(), shard, TARGETS, progress=False, accumulate_on=route)
        got[f"{route}{where}"] = "nothing"
    except Exception as e:
        got[f"{route}{where}"] = f"{type(e).__name__}: {e}"
json.dump(got, open(os.path.join(out, f"fails{rank}.json"), "w"))
"""


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    """A batch refused on rank 1 only (in the probe, mid-pass, on the host and
    device routes, and in collect_and_solve) raises there, and rank 0 raises
    the same type naming rank 1 at the end of the pass instead of waiting in
    its next collective; both ranks then go on to the next case together."""
    import json

    # short: the code before the agreement points left rank 0 waiting in its next collective
    _run_two_ranks(_ONE_RANK_FAILS, tmp_path, timeout_s=40)
    got = [json.load(open(tmp_path / f"fails{r}.json")) for r in range(2)]
    assert set(got[0]) == {"host1", "device1", "device0", "solve1"}
    for case in got[0]:
        assert got[1][case].startswith("InvalidArgumentError:") and "is a list, not a dict" in got[1][case], case
        assert got[0][case].startswith("InvalidArgumentError:"), (case, got[0][case])
        assert "rank 1 failed" in got[0][case] and "is a list, not a dict" in got[0][case], (case, got[0][case])


_OPTIONS_DIFFER = """\
import lora_da
from lora_da.pipeline import collect_and_solve
from helpers import many_batches, TARGETS, tiny_llama
shard = many_batches()[rank::world]
got = {}
cases = {
    "output_fisher": lambda: lora_da.collect_statistics(
        tiny_llama(), shard, TARGETS, progress=False, output_fisher=["diagonal", "sequence_lowrank"][rank]),
    "token_mask": lambda: lora_da.collect_statistics(
        tiny_llama(), [dict(b, labels=b["input_ids"]) for b in shard], TARGETS, progress=False,
        token_mask=["attention", "labels"][rank]),
    "target_modules": lambda: lora_da.collect_statistics(
        tiny_llama(), shard, [TARGETS, ["q_proj"]][rank], progress=False),
    "gamma": lambda: collect_and_solve(tiny_llama(), shard, TARGETS, lora_da.LoraDAConfig(n_pop=100, rank=2,
                                       gamma=[4.0, 16.0][rank]), progress=False, accumulate_on="device"),
}
for name, call in cases.items():
    try:
        call()
        got[name] = "nothing"
    except Exception as e:
        got[name] = f"{type(e).__name__}: {e}"
got["same"] = lora_da.collect_statistics(tiny_llama(), shard, TARGETS, progress=False).n_samples
json.dump(got, open(os.path.join(out, f"options{rank}.json"), "w"))
"""


def test_options_that_differ_between_ranks_are_refused_on_every_rank(tmp_path):
    """A different output_fisher had ended in a raw gloo error on one rank
    and statistics on the other; a different token_mask was summed silently."""
    import json

    _run_two_ranks(_OPTIONS_DIFFER, tmp_path, timeout_s=60)
    got = [json.load(open(tmp_path / f"options{r}.json")) for r in range(2)]
    shown = {"output_fisher": "rank 0 has 'diagonal', rank 1 has 'sequence_lowrank'",
             "token_mask": "rank 0 has 'attention', rank 1 has 'labels'",
             "target_modules": "rank 0 has ['q_proj', 'down_proj'], rank 1 has ['q_proj']",
             "gamma": "rank 0 has 4.0, rank 1 has 16.0"}
    for r in range(2):
        for option, text in shown.items():
            assert got[r][option].startswith("InvalidArgumentError:"), (r, option, got[r][option])
            assert f"the ranks disagree on {option} ({text}" in got[r][option], (r, option, got[r][option])
        assert got[r]["same"] == 18  # the ranks still work together afterwards


def _loss_of_another_process(scale):
    """A loss function as another rank has it: the same code, another object (another address)."""
    def scaled_loss(model, batch, scale=1.0):
        return scale
    import functools

    return functools.partial(scaled_loss, scale=scale)


class _Callable:
    def __call__(self, model, batch):
        return 0.0


def test_identical_callables_agree_across_ranks_and_different_arguments_do_not(monkeypatch):
    """The options are compared by stand-ins that do not hold addresses: an identical
    functools.partial (or callable instance) on two ranks was refused (its repr differs)."""
    import pytest

    import lora_da.distributed as d

    def check(mine, theirs):
        monkeypatch.setattr(d, "gather_objects", lambda obj, group: [obj, {k: d._option_value(v) for k, v in theirs.items()}])
        d.check_same_options(mine, None, "collect_statistics")

    check({"loss_fn": _loss_of_another_process(1.0)}, {"loss_fn": _loss_of_another_process(1.0)})
    check({"loss_fn": _Callable()}, {"loss_fn": _Callable()})
    check({"targets": ("q_proj",), "tm": "labels"}, {"targets": ["q_proj"], "tm": "labels"})
    with pytest.raises(lora_da.InvalidArgumentError, match=r"disagree on loss_fn .*scale=1.0.*scale=3.0.*same loss_fn"):
        check({"loss_fn": _loss_of_another_process(1.0)}, {"loss_fn": _loss_of_another_process(3.0)})
    with pytest.raises(lora_da.InvalidArgumentError, match="disagree on loss_fn"):
        check({"loss_fn": _loss_of_another_process(1.0)}, {"loss_fn": _Callable()})
