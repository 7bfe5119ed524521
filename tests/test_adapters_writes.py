"""The API's defect classes around writing adapters (numbered as in the
third hardening review): the Trainer callback with preserve_output (1), weights that overflow
the adapter's dtype (4), preserve_output beside another adapter (5), zero
gradients (6), misused loss functions (16) and loose config types (14, 17).

Each test failed on the code before the fix (checked by stashing the fix)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import batches, data, peft_classifier, tiny_llama
from peft import LoraConfig, get_peft_model

import lora_da
from lora_da.errors import InvalidArgumentError, NonFiniteError


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_unchanged(model, before) -> None:
    now = dict(model.named_parameters())
    assert now.keys() == before.keys()
    for n, p in now.items():
        assert torch.equal(p.detach(), before[n]), n


def _classifier_batches():
    ids, mask = data()
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    return [dict(b, labels=y[i:i + 3]) for i, b in zip((0, 3), batches(ids, mask, 3))]


# -- 1: the Trainer callback with preserve_output ---------------------------------------------


def test_the_callback_refuses_preserve_output_when_it_is_built():
    with pytest.raises(InvalidArgumentError, match="preserve_output=True cannot be combined with the Trainer"):
        lora_da.LoraDACallback(lora_da.LoraDAConfig(n_pop=100, preserve_output=True))
    lora_da.LoraDACallback(lora_da.LoraDAConfig(n_pop=100))  # the plain config still builds


@pytest.mark.parametrize("late", ["set on the config", "config swapped"])
def test_the_callback_refuses_preserve_output_set_after_it_was_built(late, tmp_path):
    """Checked again when training begins, before any step: the Trainer would otherwise
    die at its first checkpoint save, where the save guard refuses."""
    import dataclasses

    from helpers import ClassifierRows
    from transformers import Trainer, TrainingArguments

    cfg = lora_da.LoraDAConfig(n_pop=6)
    cb = lora_da.LoraDACallback(cfg, progress=False)
    if late == "set on the config":
        cfg.preserve_output = True
    else:
        cb.lora_da_config = dataclasses.replace(cfg, preserve_output=True)
    model = peft_classifier()
    before = _params(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.0,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=1, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=ClassifierRows(), callbacks=[cb])
    with pytest.raises(InvalidArgumentError, match="preserve_output=True cannot be combined with the Trainer"):
        trainer.train()
    _assert_unchanged(model, before)
    assert not list(tmp_path.glob("checkpoint-*")) and cb.results is None


def test_the_callback_takes_numpy_integers_for_max_samples():
    assert lora_da.LoraDACallback(lora_da.LoraDAConfig(n_pop=6), max_samples=np.int64(8)).max_samples == 8
    for bad in (True, 2.5, 0, "8"):
        with pytest.raises(InvalidArgumentError, match="max_samples must be a positive integer or None"):
            lora_da.LoraDACallback(lora_da.LoraDAConfig(n_pop=6), max_samples=bad)


# -- 4: finite in float32, infinite in the adapter's dtype ------------------------------------


def test_weights_that_overflow_the_adapters_dtype_are_refused_before_any_write():
    model = peft_classifier()
    for _, m in model.named_modules():  # a float16 adapter: 1e5 is finite in float32, not in float16
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            m.lora_A["default"].half()
            m.lora_B["default"].half()
    state = {}
    for name, m in model.get_base_model().named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            state[f"{name}.lora_A.weight"] = torch.full(a.shape, 0.5)
            state[f"{name}.lora_B.weight"] = torch.full(b.shape, 1e5)
    before = _params(model)
    with pytest.raises(NonFiniteError, match="float16.*larger gamma"):
        lora_da.initialize_lora_da_weights(model, state_dict=state, lora_da_config=lora_da.LoraDAConfig(n_pop=10))
    _assert_unchanged(model, before)


def test_a_float16_dora_magnitude_that_overflows_is_refused_before_any_write():
    """A and B fit float16, ‖W + s·B·A‖ does not: DoRA's magnitude was written as inf."""
    ids, mask = data()
    model = get_peft_model(tiny_llama(torch.float32).half(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
                           autocast_adapter_dtype=False)
    before = _params(model)
    with pytest.raises(NonFiniteError, match="q_proj: the LoRA-DA DoRA magnitude.*float16.*larger gamma"):
        lora_da.initialize_lora_da_weights(model, batches(ids, mask, 3), progress=False,
                                           lora_da_config=lora_da.LoraDAConfig(n_pop=100, gamma=1e-5))
    _assert_unchanged(model, before)


def test_state_dict_of_refuses_an_a_or_b_past_float32():
    from types import SimpleNamespace

    from lora_da.adapters import state_dict_of

    huge = SimpleNamespace(A=np.full((2, 4), 1e-3), B=np.full((3, 2), 1e39))  # finite in float64
    with pytest.raises(NonFiniteError, match="mod.*B.*float32"):
        state_dict_of({"mod": huge})
    fine = SimpleNamespace(A=np.full((2, 4), 1e-3), B=np.full((3, 2), 1e30))
    assert torch.isfinite(state_dict_of({"mod": fine})["mod.lora_B.weight"]).all()


def test_preserve_output_refuses_a_base_weight_that_would_overflow():
    model = peft_classifier()
    state, before = {}, _params(model)
    for name, m in model.get_base_model().named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            state[f"{name}.lora_A.weight"] = torch.full(a.shape, 1e19)  # s·B·A = 2·16·1e38: past float32
            state[f"{name}.lora_B.weight"] = torch.full(b.shape, 1e19)
    cfg = lora_da.LoraDAConfig(n_pop=10, preserve_output=True)
    with pytest.raises(NonFiniteError, match="W − s·B·A"):
        lora_da.initialize_lora_da_weights(model, state_dict=state, lora_da_config=cfg)
    _assert_unchanged(model, before)


# -- 5: preserve_output on a second adapter -----------------------------------------------------


def test_preserve_output_on_a_second_adapter_is_refused_and_changes_nothing():
    model = peft_classifier()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    before = _params(model)
    cfg = lora_da.LoraDAConfig(n_pop=100, gamma=4.0, preserve_output=True)
    with pytest.raises(InvalidArgumentError, match="only adapter"):
        lora_da.initialize_lora_da_weights(model, _classifier_batches(), lora_da_config=cfg, adapter_name="second",
                                           progress=False)
    _assert_unchanged(model, before)


def test_an_adapter_beside_a_preserved_one_is_refused():
    ids, mask = data()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=4, gamma=1.0, preserve_output=True)
    lora_da.initialize_lora_da_weights(model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    before = _params(model)
    with pytest.raises(lora_da.LoraDAError, match="'default' was initialized with preserve_output"):
        lora_da.initialize_lora_da_weights(model, batches(ids, mask, 3), adapter_name="second",
                                           lora_da_config=lora_da.LoraDAConfig(n_pop=100, rank=4), progress=False)
    _assert_unchanged(model, before)


def test_preserve_output_beside_an_adapter_on_other_layers_is_refused_and_changes_nothing():
    """W − s·B·A on q_proj changes the base the v_proj adapter runs on: whole model, not per layer."""
    ids, mask = data()
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    before = _params(model)
    cfg = lora_da.LoraDAConfig(n_pop=10, gamma=4.0, preserve_output=True)
    with pytest.raises(InvalidArgumentError, match="'default' to be the only adapter of the model.*\\['other'\\]"):
        lora_da.initialize_lora_da_weights(model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    _assert_unchanged(model, before)


def test_an_adapter_on_other_layers_than_a_preserved_one_is_refused():
    ids, mask = data()
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora_da.initialize_lora_da_weights(model, batches(ids, mask, 3), progress=False,
                                       lora_da_config=lora_da.LoraDAConfig(n_pop=10, gamma=4.0, preserve_output=True))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    before = _params(model)
    with pytest.raises(lora_da.LoraDAError, match="'default' was initialized with preserve_output.*'other'"):
        lora_da.initialize_lora_da_weights(model, batches(ids, mask, 3), adapter_name="other", progress=False,
                                           lora_da_config=lora_da.LoraDAConfig(n_pop=10, gamma=4.0))
    _assert_unchanged(model, before)


# -- 6: zero gradients ----------------------------------------------------------------------------


def test_all_zero_gradients_are_refused_and_nothing_is_written():
    """One-token causal-LM rows have no next token: the loss has no gradient anywhere."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    one_token = [{"input_ids": torch.tensor([[5], [7]]), "attention_mask": torch.ones(2, 1, dtype=torch.long)}]
    before = _params(model)
    with pytest.raises(InvalidArgumentError, match="zero in every one of the 4 targeted modules"):
        lora_da.initialize_lora_da_weights(model, one_token, lora_da_config=lora_da.LoraDAConfig(n_pop=10),
                                           progress=False)
    _assert_unchanged(model, before)
    with pytest.raises(InvalidArgumentError, match="zero in every"):
        lora_da.get_lora_da_state_dict(tiny_llama(), one_token, LoraConfig(r=4, target_modules=["q_proj"]),
                                       lora_da.LoraDAConfig(n_pop=10), progress=False)


def test_some_zero_gradients_warn_and_name_the_modules():
    ids, mask = data()
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj", "v_proj"], progress=False)
    zeroed = "model.layers.1.self_attn.v_proj"
    stats.grad_sums[zeroed][:] = 0.0
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with pytest.warns(UserWarning, match=f"zero in 1 of 4 modules \\({zeroed}\\)"):
        res = lora_da.initialize_lora_da_weights(model, statistics=stats, lora_da_config=lora_da.LoraDAConfig(n_pop=10),
                                                 progress=False)
    assert res[zeroed].zero_gradient and not np.abs(res[zeroed].B).any()
    with warnings.catch_warnings():  # no warning when every module has a gradient
        warnings.filterwarnings("error", message="lora-da")
        full = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj"], progress=False)
        lora_da.initialize_lora_da_weights(
            get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])), statistics=full,
            lora_da_config=lora_da.LoraDAConfig(n_pop=10), progress=False)


def test_compute_init_and_collect_and_solve_refuse_all_zero_gradients_and_warn_on_some():
    """The lower routes returned B = 0 everywhere with no word (labels all -100: no gradient)."""
    ids, mask = data()
    no_grad = [dict(b, labels=torch.full_like(b["input_ids"], -100)) for b in batches(ids, mask, 3)]
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    cfg = lora_da.LoraDAConfig(n_pop=10, rank=2)
    with pytest.raises(InvalidArgumentError, match="zero in every one of the 2 targeted modules"):
        lora_da.collect_and_solve(tiny_llama(), no_grad, targets, cfg, progress=False)
    stats = lora_da.collect_statistics(tiny_llama(), no_grad, targets, progress=False)
    with pytest.raises(InvalidArgumentError, match="zero in every one of the 2 targeted modules"):
        lora_da.compute_init(stats, cfg, progress=False)
    some = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), targets, progress=False)
    some.grad_sums[targets[1]][:] = 0.0
    with pytest.warns(UserWarning, match=f"zero in 1 of 2 modules \\({targets[1]}\\): their B is 0"):
        inits = lora_da.compute_init(some, cfg, progress=False)
    assert inits[targets[1]].result.zero_gradient and not np.abs(inits[targets[1]].B).any()
    assert np.abs(inits[targets[0]].B).any()


# -- 14, 17: loose config types -----------------------------------------------------------------


@pytest.mark.parametrize("flag", ["preserve_output", "normalize", "auto_damping", "deterministic"])
def test_a_flag_given_as_a_string_is_refused(flag):
    with pytest.raises(InvalidArgumentError, match=f"{flag} must be True or False, got 'no'"):
        lora_da.LoraDAConfig(n_pop=10, **{flag: "no"})
    assert getattr(lora_da.LoraDAConfig(n_pop=10, **{flag: np.bool_(False)}), flag) is False


def test_numpy_integers_and_huge_n_pop():
    cfg = lora_da.LoraDAConfig(n_pop=np.int64(5000), rank=np.int32(4))
    assert cfg.n_pop == 5000 and type(cfg.n_pop) is int and cfg.rank == 4 and type(cfg.rank) is int
    big = lora_da.LoraDAConfig(n_pop=10**20)
    assert big.n_pop == 1e20 and big.solve_kwargs()["n_pop"] == 1e20
    with pytest.raises(InvalidArgumentError, match="n_pop = 1000.*too large"):
        lora_da.LoraDAConfig(n_pop=10**400)
    for bad in ("100", True, float("nan"), -3):
        with pytest.raises(InvalidArgumentError, match="n_pop"):
            lora_da.LoraDAConfig(n_pop=bad)
    for bad in (8.0, "8", True):
        with pytest.raises(InvalidArgumentError, match="rank must be an integer"):
            lora_da.LoraDAConfig(n_pop=10, rank=bad)


@pytest.mark.parametrize("kw, match", [
    (dict(rank=True), "solve: rank must be an integer, got True"),  # was taken as 1
    (dict(rank=2.0), "solve: rank must be an integer, got 2.0"),  # was a raw TypeError
    (dict(rank=10**30), "solve: rank = 100000000000… \\(31 digits\\) is past 64 bits"),
    (dict(n_pop=10**400), "solve: n_pop = 100000000000… \\(401 digits\\) is too large for a float64"),
    (dict(n_pop=True), "solve: n_pop must be a real number, got True"),
    (dict(max_applications=True), "solve: max_applications must be an integer, got True"),
    (dict(normalize="no"), "solve: normalize must be True or False, got 'no'"),
])
def test_the_cores_solve_refuses_loose_numbers_by_name(kw, match):
    Z, y, G = np.eye(3) + 0.1, np.ones(3), np.arange(9.0).reshape(3, 3)
    args = dict(rank=1, n_pop=10.0) | kw
    with pytest.raises(InvalidArgumentError, match=match):
        lora_da.solve(Z, y, G, **args)
    with pytest.raises(InvalidArgumentError, match=match.replace("solve:", "solve_shared:")):
        lora_da.solve_shared(Z, [y], [G], **args)
    want = lora_da.solve(Z, y, G, rank=1, n_pop=10.0)
    got = lora_da.solve(Z, y, G, rank=np.int64(1), n_pop=np.float32(10.0))  # numpy numbers are numbers
    np.testing.assert_array_equal(got.A, want.A)


def test_collect_statistics_refuses_loose_counts_and_negative_bytes_at_entry():
    ids, mask = data()
    for bad in (2.5, True, 0, "3"):
        with pytest.raises(InvalidArgumentError, match=f"max_samples must be a positive integer or None, got {bad!r}"):
            lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj"], max_samples=bad, progress=False)
    for name in ("max_host_bytes", "max_device_bytes"):
        with pytest.raises(InvalidArgumentError, match=f"collect_statistics: {name} must be a number of bytes ≥ 0"):
            lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj"], progress=False, **{name: -5})
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj"], max_samples=np.int64(4),
                                       progress=False)
    assert stats.n_samples == 4


def _model_and_unit():
    """A PEFT classifier and unit weights (0.01 everywhere) for its LoRA layers: a γ search's inputs."""
    model = peft_classifier()
    unit = {}
    for name, m in model.get_base_model().named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            unit[f"{name}.lora_A.weight"] = torch.full(m.lora_A["default"].weight.shape, 0.01)
            unit[f"{name}.lora_B.weight"] = torch.full(m.lora_B["default"].weight.shape, 0.01)
    return model, unit


def test_gamma_search_takes_numpy_numbers_and_refuses_bools(monkeypatch):
    import lora_da.gamma as gamma

    model, unit = _model_and_unit()
    losses = iter([0.7, 0.4, 0.7, 0.6])  # γ = 4 is best
    monkeypatch.setattr(gamma, "held_back_loss", lambda *a, **k: next(losses))
    monkeypatch.setattr(gamma, "held_back_losses", lambda *a, **k: [next(losses)])
    monkeypatch.setattr(gamma, "train_steps", lambda *a, **k: [])
    cfg = lora_da.LoraDAConfig(n_pop=10)
    found = gamma.search_gamma(lambda: model, unit, [{}], [{}], cfg, gammas=[np.float32(4), np.int64(16)])
    assert found.best == 4.0 and type(found.best) is float
    for bad in ([True], [4.0, 10**400], [np.float64("nan")]):
        with pytest.raises(InvalidArgumentError, match="gammas must be positive finite numbers"):
            gamma.search_gamma(lambda: model, unit, [{}], [{}], cfg, gammas=bad)


# -- 10: the γ search never picks a diverged candidate ---------------------------------------------


def test_gamma_search_skips_a_nan_candidate(monkeypatch):
    import lora_da.gamma as gamma

    model, unit = _model_and_unit()
    losses = iter([0.7, float("nan"), 0.7, 0.5, 0.7, 0.6])  # γ = 1 diverges; γ = 4 is best
    monkeypatch.setattr(gamma, "held_back_loss", lambda *a, **k: next(losses))  # before the steps
    monkeypatch.setattr(gamma, "held_back_losses", lambda *a, **k: [next(losses)])  # after them, per sample
    monkeypatch.setattr(gamma, "train_steps", lambda *a, **k: [])
    found = gamma.search_gamma(lambda: model, unit, [{}], [{}], lora_da.LoraDAConfig(n_pop=10), gammas=(1.0, 4.0, 16.0))
    assert found.best == 4.0 and len(found.table) == 3
    nan = iter([float("nan")] * 4)
    monkeypatch.setattr(gamma, "held_back_loss", lambda *a, **k: next(nan))
    monkeypatch.setattr(gamma, "held_back_losses", lambda *a, **k: [next(nan)])
    with pytest.raises(lora_da.NonFiniteError, match="not finite for any γ"):
        gamma.search_gamma(lambda: model, unit, [{}], [{}], lora_da.LoraDAConfig(n_pop=10), gammas=(1.0, 4.0))


# -- 18: negative counts and sizes to the Rust core ------------------------------------------------

_EYE, _ONES = np.eye(3), np.ones(3)


@pytest.mark.parametrize("call, name", [
    (lambda f, o: lora_da.InputFactor(-1), "InputFactor: n"),
    (lambda f, o: lora_da.OutputFactor(-2), "OutputFactor: m"),
    (lambda f, o: f.add_gram(_EYE, -1), "InputFactor.add_gram: tokens"),
    (lambda f, o: lora_da.InputFactor.from_packed(-3, np.zeros(6), 1), "InputFactor.from_packed: n"),
    (lambda f, o: lora_da.InputFactor.from_packed(3, np.zeros(6), -1), "InputFactor.from_packed: tokens"),
    (lambda f, o: o.add_sums(np.zeros(3), -4), "OutputFactor.add_sums: tokens"),
    (lambda f, o: o.count_samples(-1), "OutputFactor.count_samples: k"),
    (lambda f, o: lora_da.OutputFactor(3, per_sample=True).add(np.ones((2, 3), np.float32), [3, -1]),
     "OutputFactor.add: sample_lengths"),
    (lambda f, o: lora_da.OutputFactor.from_parts(np.zeros(3), -1, 1), "OutputFactor.from_parts: tokens"),
    (lambda f, o: lora_da.OutputFactor.from_parts(np.zeros(3), 1, -1), "OutputFactor.from_parts: samples"),
    (lambda f, o: lora_da.solve(_EYE, _ONES, np.ones((3, 3)), rank=-1, n_pop=10.0), "rank"),
    (lambda f, o: lora_da.solve(_EYE, _ONES, np.ones((3, 3)), rank=1, n_pop=10.0, max_applications=-5),
     "max_applications"),
    (lambda f, o: lora_da.solve_shared(_EYE, [_ONES], [np.ones((3, 3))], rank=-2, n_pop=10.0), "rank"),
])
def test_negative_counts_and_sizes_to_the_core(call, name):
    refused_and_unchanged(call, f"^{name} must be ≥ 0, got -[0-9]+$")


def refused_and_unchanged(call, message: str) -> None:
    """``call(f, o)`` on a used input and output factor is refused with ``message`` and changes neither."""
    f, o = lora_da.InputFactor(3), lora_da.OutputFactor(3)
    f.add(np.ones((2, 3)))
    o.add(np.ones((2, 3)))
    o.count_samples(2)
    f0, o0 = f.copy(), o.copy()
    with pytest.raises(InvalidArgumentError, match=message):
        call(f, o)
    assert f == f0 and o == o0  # a refused call changes nothing


@pytest.mark.parametrize("call, name", [
    (lambda f, o: lora_da.InputFactor(True), "InputFactor: n"),
    (lambda f, o: lora_da.OutputFactor(True), "OutputFactor: m"),
    (lambda f, o: f.add_gram(_EYE, True), "InputFactor.add_gram: tokens"),
    (lambda f, o: lora_da.InputFactor.from_packed(3, np.zeros(6), False), "InputFactor.from_packed: tokens"),
    (lambda f, o: o.add_sums(np.zeros(3), True), "OutputFactor.add_sums: tokens"),
    (lambda f, o: o.count_samples(True), "OutputFactor.count_samples: k"),
    (lambda f, o: lora_da.OutputFactor(3, per_sample=True).add(np.ones((2, 3), np.float32), [True, 1]),
     "OutputFactor.add: sample_lengths"),
])
def test_a_bool_given_as_a_count_to_the_core_is_refused_by_name(call, name):
    """Python counts True as 1; given where a count or size belongs it is a mistake, refused
    by the core's binding with the argument's name, and nothing changes."""
    refused_and_unchanged(call, f"^{name} must be an integer, got the bool (True|False)$")
    assert lora_da.InputFactor(np.int64(3)).n == 3  # numpy integers stay counts


def test_output_factor_equality_compares_contents():
    """README: ``==`` compares the accumulators (OutputFactor's compared identities: a copy was never equal)."""
    o = lora_da.OutputFactor(3, per_sample=True)
    o.add(np.arange(6.0).reshape(2, 3), [1, 1])
    c = o.copy()
    assert c == o and c is not o
    c.add(np.ones((1, 3)), [1])
    assert c != o and o != lora_da.InputFactor(3)
