"""PEFT integration end to end (SPEC §3 step 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import batches, brute_force, data, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

import lora_da
from lora_da.reference import reference_solve


def lora_config(targets, use_rslora=False, r=4):
    return LoraConfig(r=r, lora_alpha=16, target_modules=targets, use_rslora=use_rslora, lora_dropout=0.0)


def test_state_dict_equals_reference_on_brute_force_statistics():
    model = tiny_llama()
    ids, mask = data()
    cfg = lora_da.LoraDAConfig(n_pop=1000, rank=4, gamma=16.0, method="dense")
    sd = lora_da.get_lora_da_state_dict(model, batches(ids, mask, 3), lora_config(["q_proj", "down_proj"]), cfg, progress=False)
    names = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    assert len(names) == 4
    brute, _ = brute_force(model, ids, mask, names)
    for name in names:
        G, Z, y = brute[name]
        ref = reference_solve(Z, y, G, rank=4, n_pop=1000.0, gamma=16.0)
        A, B = sd[f"{name}.lora_A.weight"].double().numpy(), sd[f"{name}.lora_B.weight"].double().numpy()
        # float32 weights: compare to float32 rounding of the reference's sign-fixed A, B
        np.testing.assert_allclose(A, ref.A, atol=1e-6 * np.abs(ref.A).max())
        np.testing.assert_allclose(B, ref.B, atol=1e-6 * np.abs(ref.B).max())


@pytest.mark.parametrize("use_rslora", [False, True])
def test_weights_are_A_B_and_peft_applies_its_scaling(use_rslora, tmp_path):
    ids, mask = data()
    base = tiny_llama(torch.float32)
    x = {"input_ids": ids[:2], "attention_mask": mask[:2]}
    with torch.no_grad():
        base_logits = base(**x).logits
    peft_model = get_peft_model(base, lora_config(["v_proj"], use_rslora))
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=4, gamma=4.0)
    results = lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    assert len(results) == 2
    for name, res in results.items():
        layer = peft_model.get_base_model().get_submodule(name)
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), res.A.astype(np.float32))
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), res.B.astype(np.float32))
        expected = 16 / (np.sqrt(4) if use_rslora else 4)
        assert layer.scaling["default"] == pytest.approx(expected)
    with torch.no_grad():
        adapted = peft_model(**x).logits
    assert not torch.allclose(adapted, base_logits)  # published mode: W untouched, output moves
    # round trip: save, load on a fresh base, same outputs
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(tiny_llama(torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, adapted)


def test_conv1d_adapter_weights():
    ids, mask = data()
    peft_model = get_peft_model(tiny_gpt2(torch.float32), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=4)
    res = lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    layer = peft_model.get_base_model().get_submodule("transformer.h.1.attn.c_attn")
    assert layer.lora_A["default"].weight.shape == (4, 24) and layer.lora_B["default"].weight.shape == (72, 4)
    np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), res["transformer.h.1.attn.c_attn"].B.astype(np.float32))


@pytest.mark.parametrize("model_fn,targets,kw", [(tiny_llama, ["q_proj", "gate_proj"], {}), (tiny_gpt2, ["c_attn", "c_fc"], {"fan_in_fan_out": True})])
def test_preserve_output_and_safe_save(model_fn, targets, kw, tmp_path):
    ids, mask = data()
    x = {"input_ids": ids[:3], "attention_mask": mask[:3]}
    base = model_fn(torch.float64)
    with torch.no_grad():
        before = base(**x).logits.clone()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=targets, **kw))
    layers = {n: m for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    w0 = {n: m.get_base_layer().weight.detach().double().numpy().copy() for n, m in layers.items()}
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=4, gamma=1.0, preserve_output=True)
    results = lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    # Unchanged logits alone also hold when nothing was written (B = 0, W
    # untouched): the adapter must hold the solve's A and B, and W must have
    # moved by exactly s·BA, s = lora_alpha / r.
    assert set(results) == set(layers)
    s = 16 / 4
    for name, layer in layers.items():
        res = results[name]
        A = res.A.astype(np.float32).astype(np.float64)  # the state dict's float32
        B = res.B.astype(np.float32).astype(np.float64)
        assert np.abs(B).max() > 0
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), A)
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), B)
        assert layer.scaling["default"] == s
        moved = w0[name] - layer.get_base_layer().weight.detach().numpy()
        expected = s * (B @ A)
        if kw.get("fan_in_fan_out"):
            expected = expected.T  # Conv1D stores W as in × out
        np.testing.assert_allclose(moved, expected, rtol=0, atol=1e-14 * (np.abs(w0[name]).max() + np.abs(expected).max()))
        assert np.abs(expected).max() > 1e-6 * np.abs(w0[name]).max()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**x).logits, before, rtol=0, atol=1e-10)
    # a plain save would silently be wrong on a fresh base: refused
    with pytest.raises(lora_da.LoraDAError, match="preserve_output"):
        peft_model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    lora_da.save_initial_adapter(peft_model, tmp_path / "init")
    # "train": move the adapter weights
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
        trained = peft_model(**x).logits.clone()
    peft_model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    fresh = PeftModel.from_pretrained(model_fn(torch.float64), tmp_path / "final")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x).logits, trained, rtol=0, atol=1e-8)


def test_shape_mismatch_is_refused_before_writing():
    ids, mask = data()
    peft_model = get_peft_model(tiny_llama(torch.float32), lora_config(["q_proj"], r=4))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    sd = {}
    for name, mod in peft_model.get_base_model().named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            sd[f"{name}.lora_A.weight"] = torch.zeros(4, 32)
            sd[f"{name}.lora_B.weight"] = torch.zeros(16, 4)  # wrong: q_proj is 32 × 32
    with pytest.raises(lora_da.ShapeError, match="do not fit"):
        lora_da.initialize_lora_da_weights(peft_model, state_dict=sd, lora_da_config=lora_da.LoraDAConfig(n_pop=10, rank=4))
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    with pytest.raises(lora_da.InvalidArgumentError, match="r = 4"):
        lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=lora_da.LoraDAConfig(n_pop=10, rank=8), progress=False)


def test_config_validation():
    with pytest.raises(lora_da.InvalidArgumentError, match="n_pop"):
        lora_da.LoraDAConfig()
    with pytest.raises(lora_da.InvalidArgumentError, match="n_pop"):
        lora_da.LoraDAConfig(n_pop=0)
    with pytest.raises(lora_da.InvalidArgumentError, match="token_mask"):
        lora_da.LoraDAConfig(n_pop=10, token_mask="all")
