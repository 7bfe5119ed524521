"""The orchestrator (lora_da.pipeline): what every route of collect_and_solve
and the PEFT entry points return, and the options the torch route and the
configuration refuse before any work, each by name (SPEC §3, §7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, batches, data, tiny_llama
from peft import LoraConfig, get_peft_model

import lora_da
from lora_da.torch_solve import solve_group_device

CFG = lora_da.LoraDAConfig(n_pop=100, rank=2)


@pytest.mark.parametrize("route", ["host", "device", "checkpoint"])
def test_every_route_of_collect_and_solve_returns_its_report(route, tmp_path):
    """The report rides on the result on every route (it was a function attribute,
    overwritten by the next call, and empty on the host and checkpoint routes)."""
    kw = {"host": {}, "device": {"accumulate_on": "device"},
          "checkpoint": {"checkpoint_path": tmp_path / "ck.safetensors"}}[route]
    ids, mask = data()
    inits = lora_da.collect_and_solve(tiny_llama(), batches(ids, mask, 3), ["q_proj", "v_proj"], CFG,
                                      progress=False, **kw)
    assert isinstance(inits, lora_da.Inits) and list(inits) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    rep = inits.report
    assert isinstance(rep, lora_da.RunReport) and rep.collect_seconds > 0 and rep.solve_seconds > 0
    assert (rep.plan is not None) == (route == "device")  # only the planned device path makes a plan
    # the same answer on every route (the statistics are sums, SPEC §2)
    ref = lora_da.compute_init(lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj", "v_proj"],
                                                          progress=False), CFG, progress=False)
    for n, init in inits.items():
        np.testing.assert_allclose(np.abs(init.A), np.abs(ref[n].A), rtol=1e-7, atol=1e-9)


def test_the_peft_entry_point_returns_the_runs_report():
    ids, mask = data()
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    res = lora_da.initialize_lora_da_weights(pm, batches(ids, mask, 3), lora_da_config=CFG, progress=False)
    assert isinstance(res.report, lora_da.RunReport) and res.report.collect_seconds > 0
    assert sorted(res) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_compute_init_returns_inits_without_a_run():
    ids, mask = data()
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), LLAMA_TARGETS[:1], progress=False)
    inits = lora_da.compute_init(stats, CFG, progress=False)
    assert isinstance(inits, lora_da.Inits) and inits.report is None and set(inits) == set(stats.modules)


# -- options refused by name before any work ------------------------------------------------------

NOT_NUMBERS = [True, np.True_, None, "2", [1.0]]
REALS = ["n_pop", "alpha", "beta", "damping", "gamma", "tol"]


def _device_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    return X.T @ X / 20, [torch.rand(3, generator=g, dtype=torch.float64) + 0.1], \
        [torch.randn(3, 4, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize("name", REALS + ["output_damping"])
@pytest.mark.parametrize("value", NOT_NUMBERS)
def test_the_torch_route_refuses_what_is_not_a_number_by_name(name, value):
    if name == "output_damping" and value is None:
        pytest.skip("None is output_damping's default: λ_y = λ")
    Z, ys, Gs = _device_problem()
    kw = {"rank": 1, "n_pop": 100.0, name: value}
    with pytest.raises(lora_da.InvalidArgumentError, match=rf"^torch_solve: {name} must be a real number"):
        solve_group_device(Z, ys, Gs, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(rank=0), r"rank must be an integer ≥ 1, got 0"),
    (dict(rank=-3), r"rank must be an integer ≥ 1, got -3"),
    (dict(rank=2.0), r"rank must be an integer ≥ 1, got 2.0"),
    (dict(rank=10**400), r"rank must be less than 2⁶³"),
    (dict(tol=10**400), r"tol must be representable in float64"),
    (dict(gamma=float("inf")), r"gamma must be finite and > 0, got inf"),
    (dict(beta=-1.0), r"beta must be finite and ≥ 0, got -1.0"),
    (dict(method="fast"), r"method must be 'auto', 'krylov' or 'dense', got 'fast'"),
    (dict(method=None), r"method must be 'auto', 'krylov' or 'dense', got None"),
])
def test_the_torch_route_names_each_bad_option(kw, message):
    Z, ys, Gs = _device_problem()
    with pytest.raises(lora_da.InvalidArgumentError, match="^torch_solve: " + message):
        solve_group_device(Z, ys, Gs, **{"rank": 1, "n_pop": 100.0, **kw})


@pytest.mark.parametrize("name", ["alpha", "beta", "damping", "gamma", "tol", "output_damping"])
@pytest.mark.parametrize("value", [True, "1", [1.0]] + [None])
def test_the_config_refuses_what_is_not_a_number_by_name(name, value):
    if name == "output_damping" and value is None:
        assert lora_da.LoraDAConfig(n_pop=10, output_damping=None).output_damping is None
        return
    with pytest.raises(lora_da.InvalidArgumentError, match=rf"^LoraDAConfig: {name} must be a number"):
        lora_da.LoraDAConfig(n_pop=10, **{name: value})


def test_numpy_numbers_are_numbers():
    Z, ys, Gs = _device_problem()
    (res,) = solve_group_device(Z, ys, Gs, rank=np.int64(1), n_pop=np.float32(100.0), gamma=np.float64(4.0))
    assert res.A.shape == (1, 4)
    cfg = lora_da.LoraDAConfig(n_pop=np.int32(10), gamma=np.float32(4.0), beta=np.int64(0))
    assert cfg.gamma == 4.0 and type(cfg.gamma) is float and cfg.beta == 0
