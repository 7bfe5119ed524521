"""Every LoraConfig field a PEFT user sets is honoured or refused with a reason.

Each honoured field is checked against an independent computation: the SciPy
reference on brute-force statistics at the module's own r, PEFT's own forward
(the base model's output with ``preserve_output``), or the DoRA magnitude
recomputed here from the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import batches, brute_force, data, tiny_gpt2, tiny_llama
from peft import LoraConfig, get_peft_model

import lora_da
from lora_da.errors import InvalidArgumentError
from lora_da.reference import reference_solve


def _x():
    ids, mask = data()
    return ids, mask, {"input_ids": ids[:3], "attention_mask": mask[:3]}


def _check_against_reference(model, names, ranks, weights, ids, mask, gamma=16.0, n_pop=1000.0):
    """Each module's A, B are the reference's at that module's r (brute-force statistics)."""
    brute, _ = brute_force(model, ids, mask, names)
    for name in names:
        G, Z, y = brute[name]
        ref = reference_solve(Z, y, G, rank=ranks[name], n_pop=n_pop, gamma=gamma)
        A, B = weights[name]
        assert A.shape == ref.A.shape and B.shape == ref.B.shape, name
        np.testing.assert_allclose(A, ref.A, atol=1e-6 * np.abs(ref.A).max())
        np.testing.assert_allclose(B, ref.B, atol=1e-6 * np.abs(ref.B).max())


def test_rank_pattern_solves_each_module_at_its_own_r_in_a_shared_input_group():
    # q_proj and v_proj read the same input (one Z) but get different r: 4 and 2
    model = tiny_llama()
    ids, mask, _ = _x()
    pc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    cfg = lora_da.LoraDAConfig(n_pop=1000, gamma=16.0, method="dense")
    sd = lora_da.get_lora_da_state_dict(model, batches(ids, mask, 3), pc, cfg, progress=False)
    names = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    assert len(names) == 4
    ranks = {n: 2 if n.endswith("v_proj") else 4 for n in names}
    weights = {n: (sd[f"{n}.lora_A.weight"].double().numpy(), sd[f"{n}.lora_B.weight"].double().numpy()) for n in names}
    _check_against_reference(model, names, ranks, weights, ids, mask)


@pytest.mark.parametrize("method", ["dense", "krylov", "auto"])
def test_rank_pattern_on_a_peft_model_with_each_solver_route(method):
    base = tiny_llama()
    ids, mask, _ = _x()
    pc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                    rank_pattern={r"model\.layers\.1\.self_attn\.q_proj": 3, "down_proj": 2})
    peft_model = get_peft_model(base, pc)
    cfg = lora_da.LoraDAConfig(n_pop=1000, gamma=16.0, method=method)
    results = lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    layers = {n: peft_model.get_base_model().get_submodule(n) for n in results}
    ranks = {n: layer.r["default"] for n, layer in layers.items()}
    assert sorted(set(ranks.values())) == [2, 3, 4]
    weights = {n: (layer.lora_A["default"].weight.detach().double().numpy(),
                   layer.lora_B["default"].weight.detach().double().numpy()) for n, layer in layers.items()}
    # the same weights (tiny_llama seeds itself), unwrapped, for the brute force's autograd
    _check_against_reference(tiny_llama(), sorted(results), ranks, weights, ids, mask)
    # the diagnostics are those of each module's own r: λ_1..λ_r, λ_{r+1} and the gap at its cut
    brute, _ = brute_force(tiny_llama(), *_x()[:2], sorted(results))
    for name, res in results.items():
        G, Z, y = brute[name]
        ref = reference_solve(Z, y, G, rank=ranks[name], n_pop=1000.0, gamma=16.0)
        tol = 1e-8 * ref.omega_norm
        assert len(res.eigenvalues) == ranks[name]
        np.testing.assert_allclose(res.eigenvalues, ref.eigenvalues, rtol=0, atol=tol)
        if method != "krylov":  # Krylov's λ_{r+1} is an upper bound within GAP_TOL (SPEC §5); auto is dense at n = 32
            assert res.next_eigenvalue == pytest.approx(ref.next_eigenvalue, abs=tol)
            assert res.gap == pytest.approx(ref.gap, abs=tol)


def test_rank_pattern_from_collected_statistics():
    model = tiny_llama()
    ids, mask, _ = _x()
    stats = lora_da.collect_statistics(model, batches(ids, mask, 3), ["q_proj", "k_proj"], progress=False)
    pc = LoraConfig(r=4, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 1})
    sd = lora_da.get_lora_da_state_dict(model, None, pc, lora_da.LoraDAConfig(n_pop=50), statistics=stats, progress=False)
    for key, w in sd.items():
        r = 1 if ".k_proj." in key else 4
        assert (w.shape[0] if ".lora_A." in key else w.shape[1]) == r, key


def test_per_module_ranks_are_validated_and_checked_against_the_adapter():
    with pytest.raises(InvalidArgumentError, match=r"ranks\['x'\]"):
        lora_da.LoraDAConfig(n_pop=10, ranks={"x": 0})
    base = tiny_llama()
    ids, mask, _ = _x()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["v_proj"]))
    name = "model.layers.0.self_attn.v_proj"
    cfg = lora_da.LoraDAConfig(n_pop=10, ranks={name: 2})
    with pytest.raises(InvalidArgumentError, match=f"{name}: LoraDAConfig.ranks gives r = 2, the PEFT adapter has r = 4"):
        lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_preserve_output_with_rank_and_alpha_patterns(use_rslora):
    # preserve_output subtracts each layer's own s·B A: s = alpha_pattern's α over its r (√r with rsLoRA)
    base = tiny_llama(torch.float64)
    ids, mask, x = _x()
    with torch.no_grad():
        expected = base(**x).logits.clone()
    pc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=use_rslora,
                    rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 32, "up_proj": 3}, lora_dropout=0.0)
    peft_model = get_peft_model(base, pc)
    cfg = lora_da.LoraDAConfig(n_pop=100, gamma=4.0, preserve_output=True)
    results = lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    for name in results:
        layer = peft_model.get_base_model().get_submodule(name)
        r, alpha = (2, 32) if name.endswith("v_proj") else (4, 3 if name.endswith("up_proj") else 8)
        assert layer.scaling["default"] == pytest.approx(alpha / (np.sqrt(r) if use_rslora else r))
        assert layer.lora_A["default"].weight.abs().max() > 0 and layer.lora_B["default"].weight.abs().max() > 0
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**x).logits, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model_fn,targets", [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_dora_magnitude_is_recomputed_from_the_new_weights(model_fn, targets):
    # With m = ‖W + s·B A‖ DoRA's layer is W + s·B A at step 0: the plain LoRA adapter's output
    ids, mask, x = _x()
    cfg = lora_da.LoraDAConfig(n_pop=100, gamma=4.0)
    outs = {}
    for dora in (False, True):
        pc = LoraConfig(r=3, lora_alpha=6, target_modules=targets, use_dora=dora, lora_dropout=0.0,
                        fan_in_fan_out=model_fn is tiny_gpt2)
        peft_model = get_peft_model(model_fn(torch.float64), pc)
        lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
        with torch.no_grad():
            outs[dora] = peft_model(**x).logits.clone()
        if dora:
            for name, layer in peft_model.get_base_model().named_modules():
                if hasattr(layer, "lora_magnitude_vector") and "default" in layer.lora_magnitude_vector:
                    W = layer.get_base_layer().weight.detach().double()
                    W = W.T if model_fn is tiny_gpt2 else W
                    BA = layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()
                    want = torch.linalg.norm(W + layer.scaling["default"] * BA, dim=1)
                    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.detach().double(), want)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-9, atol=1e-9)


def test_dora_with_preserve_output_starts_at_the_base_model():
    base = tiny_llama(torch.float64)
    ids, mask, x = _x()
    with torch.no_grad():
        expected = base(**x).logits.clone()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["v_proj", "o_proj"], use_dora=True, lora_dropout=0.0))
    cfg = lora_da.LoraDAConfig(n_pop=100, gamma=4.0, preserve_output=True)
    lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**x).logits, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw,solved", [
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
     {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
    (dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
     {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
])
def test_layers_to_transform_and_exclude_modules_select_the_modules_peft_adapts(kw, solved):
    ids, mask, _ = _x()
    cfg = lora_da.LoraDAConfig(n_pop=1000, gamma=16.0, method="dense")
    model = tiny_llama()
    pc = LoraConfig(r=4, **kw)
    sd = lora_da.get_lora_da_state_dict(model, batches(ids, mask, 3), pc, cfg, progress=False)
    assert {k.rsplit(".lora_", 1)[0] for k in sd} == solved
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, **kw))
    results = lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    assert set(results) == solved
    for name in solved:
        layer = peft_model.get_base_model().get_submodule(name)
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), sd[f"{name}.lora_A.weight"].numpy())


def test_modules_to_save_are_left_to_peft_and_the_head_is_not_solved():
    ids, mask, x = _x()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    head = peft_model.get_base_model().lm_head
    before = head.modules_to_save["default"].weight.detach().clone()
    results = lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3),
                                                 lora_da_config=lora_da.LoraDAConfig(n_pop=10), progress=False)
    assert set(results) == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}
    torch.testing.assert_close(head.modules_to_save["default"].weight, before, rtol=0, atol=0)


@pytest.mark.parametrize("targets", [["query", "classifier"], ["classifier"]])
def test_the_task_head_as_a_target_is_refused_before_the_pass(targets, monkeypatch):
    """PEFT's SEQ_CLS model saves ``classifier`` whole (modules_to_save) itself: a state
    dict that also holds its LoRA A/B does not load. Refused before any collection."""
    from helpers import tiny_classifier

    import lora_da.adapters

    def no_pass(*a, **k):
        raise AssertionError("the pass ran")

    monkeypatch.setattr(lora_da.adapters, "collect_and_solve", no_pass)
    pc = LoraConfig(r=2, target_modules=targets, task_type="SEQ_CLS")
    with pytest.raises(InvalidArgumentError, match="selects classifier, the head of a SEQ_CLS model.*leave it out"):
        lora_da.get_lora_da_state_dict(tiny_classifier(), [], pc, lora_da.LoraDAConfig(n_pop=10), progress=False)
    # without a task type PEFT saves nothing whole, and the head is an ordinary target
    assert lora_da.adapters.task_heads(["classifier", "bert.pooler.dense"], None) == []
    assert lora_da.adapters.task_heads(["classifier", "model.score", "q"], "SEQ_CLS") == ["classifier", "model.score"]


def test_target_parameters_is_refused_with_the_reason():
    pc = LoraConfig(r=4, target_modules=[], target_parameters=["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(InvalidArgumentError, match="target_parameters.*target_modules instead"):
        lora_da.get_lora_da_state_dict(tiny_llama(), [], pc, lora_da.LoraDAConfig(n_pop=10), progress=False)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_that_change_the_base_are_refused(init):
    ids, mask, _ = _x()
    peft_model = get_peft_model(tiny_llama(torch.float32), LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=init))
    with pytest.raises(InvalidArgumentError, match=f"init_lora_weights='{init}'.*use init_lora_weights=True"):
        lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3),
                                           lora_da_config=lora_da.LoraDAConfig(n_pop=10), progress=False)


def test_an_embedding_adapter_is_refused_not_left_at_peft_init():
    ids, mask, _ = _x()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj", "embed_tokens"]))
    with pytest.raises(InvalidArgumentError, match="embed_tokens: a LoRA adapter on an embedding"):
        lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3),
                                           lora_da_config=lora_da.LoraDAConfig(n_pop=10), progress=False)


@pytest.mark.parametrize("kw", [dict(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}), dict(use_dora=True)])
def test_preserve_output_adapters_with_patterns_or_dora_convert_for_the_original_base(kw, tmp_path):
    # trained (here: B moved by hand) on the modified base; saved through PEFT's conversion; loaded on a fresh
    # base it gives the same outputs: W + (s·B A − s·B₀A₀) = (W − s·B₀A₀) + s·B A, each layer at its own r and s
    from peft import PeftModel

    ids, mask, x = _x()
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, **kw))
    lora_da.initialize_lora_da_weights(pm, batches(ids, mask, 3), progress=False,
                                       lora_da_config=lora_da.LoraDAConfig(n_pop=100, gamma=4.0, preserve_output=True))
    lora_da.save_initial_adapter(pm, tmp_path / "init")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
        trained = pm(**x).logits.clone()
    pm.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    fresh = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, trained, rtol=1e-10, atol=1e-10)


def _lora_a_modules(peft_model) -> set[str]:
    """The modules PEFT gave a ``lora_A`` (names in the base model)."""
    return {n.removesuffix(".lora_A") for n, _ in peft_model.get_base_model().named_modules() if n.endswith(".lora_A")}


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("target_modules", ["all-linear", "ALL-LINEAR", None])
def test_the_state_dict_covers_the_modules_peft_adapts_for_all_linear_and_the_default(model_fn, target_modules):
    # "all-linear": every Linear/Conv1D but the output head; None: PEFT's default for the model type
    # (q_proj, v_proj for Llama; c_attn for GPT-2). The keys are those of PEFT's own model.
    ids, mask, _ = _x()
    pc = LoraConfig(r=2, target_modules=target_modules, fan_in_fan_out=model_fn is tiny_gpt2)
    sd = lora_da.get_lora_da_state_dict(model_fn(), batches(ids, mask, 3), pc,
                                        lora_da.LoraDAConfig(n_pop=100, gamma=4.0), progress=False)
    assert pc.target_modules == target_modules  # the caller's config is not rewritten
    peft_model = get_peft_model(model_fn(), LoraConfig(r=2, target_modules=target_modules,
                                                      fan_in_fan_out=model_fn is tiny_gpt2))
    adapted = _lora_a_modules(peft_model)
    assert {k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")} == adapted
    assert {k.removesuffix(".lora_B.weight") for k in sd if k.endswith(".lora_B.weight")} == adapted
    assert not any(n.endswith("lm_head") for n in adapted)
    if target_modules is None:
        assert {n.rsplit(".", 1)[1] for n in adapted} == ({"q_proj", "v_proj"} if model_fn is tiny_llama else {"c_attn"})
    else:
        assert len(adapted) == (14 if model_fn is tiny_llama else 8)  # 7 per Llama layer, 4 per GPT-2 block


def test_no_default_target_modules_for_the_model_type_is_one_clear_error():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

    with pytest.raises(InvalidArgumentError, match="target_modules=None: PEFT has no default target modules for "
                                                   "model type 'custom'; pass target_modules"):
        lora_da.get_lora_da_state_dict(Plain(), [], LoraConfig(r=2), lora_da.LoraDAConfig(n_pop=10), progress=False)


@pytest.mark.parametrize("model_fn,targets,kw", [
    (tiny_llama, ["q_proj", "v_proj", "down_proj"], dict(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32})),
    (tiny_gpt2, ["c_attn", "c_proj"], dict(use_rslora=True, fan_in_fan_out=True)),
])
def test_a_dora_state_dict_loaded_by_peft_starts_where_initialize_lora_da_weights_does(model_fn, targets, kw):
    # the state dict carries m = ‖W + s·B A‖ under PEFT's key: loaded with set_peft_model_state_dict
    # the DoRA adapter gives the logits of the initialize_lora_da_weights route (a stale m would not)
    from peft import set_peft_model_state_dict

    ids, mask, x = _x()
    cfg = lora_da.LoraDAConfig(n_pop=100, gamma=4.0)
    pc = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True, lora_dropout=0.0, **kw)
    sd = lora_da.get_lora_da_state_dict(model_fn(torch.float32), batches(ids, mask, 3), LoraConfig(**pc), cfg,
                                        progress=False)
    loaded = get_peft_model(model_fn(torch.float32), LoraConfig(**pc))
    result = set_peft_model_state_dict(loaded, {f"base_model.model.{k}": v for k, v in sd.items()})
    assert not result.unexpected_keys
    solved = get_peft_model(model_fn(torch.float32), LoraConfig(**pc))
    lora_da.initialize_lora_da_weights(solved, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, solved(**x).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("route", ["peft_model", "state_dict"])
def test_statistics_without_a_targeted_module_are_refused_by_name_on_both_routes(route):
    # the statistics hold q_proj only; the adapter targets v_proj too: say the statistics lack it,
    # on the PEFT route as on the state-dict route, before anything is written
    ids, mask, _ = _x()
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj"], progress=False)
    pc = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    cfg = lora_da.LoraDAConfig(n_pop=100)
    want = (r"the statistics have no entry for targeted module\(s\) \['model.layers.0.self_attn.v_proj', "
            r"'model.layers.1.self_attn.v_proj'\]")
    if route == "state_dict":
        with pytest.raises(InvalidArgumentError, match=want):
            lora_da.get_lora_da_state_dict(tiny_llama(), None, pc, cfg, statistics=stats, progress=False)
        return
    peft_model = get_peft_model(tiny_llama(), pc)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    with pytest.raises(InvalidArgumentError, match=want):
        lora_da.initialize_lora_da_weights(peft_model, statistics=stats, lora_da_config=cfg, progress=False)
    for n, p in peft_model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_layer_replication_is_refused_with_the_reason_on_both_routes():
    # replicated layers share their base weights: statistics of the replicated model are of no model that
    # exists before it; refused before any pass, and the PEFT model's adapter is left as it was
    ids, mask, _ = _x()
    kw = dict(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]])
    cfg = lora_da.LoraDAConfig(n_pop=10)
    want = "LoraConfig.layer_replication: replicated layers share their base weights"
    with pytest.raises(InvalidArgumentError, match=want):
        lora_da.get_lora_da_state_dict(tiny_llama(), batches(ids, mask, 3), LoraConfig(**kw), cfg, progress=False)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(**kw))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    with pytest.raises(InvalidArgumentError, match=want):
        lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    for n, p in peft_model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
