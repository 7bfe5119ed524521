"""Errors that teach, and the inputs a PEFT user passes first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, batches, data, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import lora_da


def test_a_target_name_that_matches_nothing_is_named_with_suggestions():
    ids, mask = data()
    with pytest.raises(lora_da.InvalidArgumentError, match=r"\['querry'\] match no module.*linear modules end in: .*q_proj"):
        lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["querry", "v_proj"], progress=False)
    with pytest.raises(lora_da.InvalidArgumentError, match="matches no module.*did you mean: q_proj"):
        lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_prj"], progress=False)


def test_collecting_on_a_peft_model_says_what_to_do():
    ids, mask = data()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lora_da.InvalidArgumentError, match="PEFT LoRA layer.*initialize_lora_da_weights"):
        lora_da.collect_statistics(peft_model, batches(ids, mask, 3), ["q_proj"], progress=False)


def test_a_plain_model_passed_as_peft_model_is_refused_with_the_way_out():
    ids, mask = data()
    with pytest.raises(lora_da.InvalidArgumentError, match="needs a peft.PeftModel.*get_peft_model"):
        lora_da.initialize_lora_da_weights(tiny_llama(), batches(ids, mask, 3),
                                           lora_da_config=lora_da.LoraDAConfig(n_pop=10, rank=2))


def test_uncollated_batches_are_refused_with_what_a_batch_must_be():
    with pytest.raises(lora_da.InvalidArgumentError, match="batch 0 is a str, not a dict of tensors"):
        lora_da.collect_statistics(tiny_llama(), ["some text", "more text"], LLAMA_TARGETS, progress=False)


def test_the_label_key_of_datasets_counts_as_labels():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(cfg).double().eval()
    ids, mask = data()
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    with_labels = [dict(b, labels=y[i:i + 3]) for i, b in zip((0, 3), batches(ids, mask, 3))]
    with_label = [dict(b, label=y[i:i + 3]) for i, b in zip((0, 3), batches(ids, mask, 3))]
    a = lora_da.collect_statistics(model, with_labels, ["query"], progress=False)
    b = lora_da.collect_statistics(model, with_label, ["query"], progress=False)
    for n in a.modules:
        assert np.array_equal(a.mean_grad(n), b.mean_grad(n))


def test_rank_defaults_to_the_adapters_r():
    ids, mask = data()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=3, target_modules=["q_proj", "v_proj"]))
    results = lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3),
                                                 lora_da_config=lora_da.LoraDAConfig(n_pop=100), progress=False)
    assert results and all(r.A.shape[0] == 3 for r in results.values())
    with pytest.raises(lora_da.InvalidArgumentError, match="leave rank unset"):
        lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3),
                                           lora_da_config=lora_da.LoraDAConfig(n_pop=100, rank=4), progress=False)
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj"], progress=False)
    (init,) = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100), progress=False, modules=[
        "model.layers.0.self_attn.q_proj"]).values()
    assert init.A.shape[0] == 8  # no adapter: the published default


def test_the_saved_adapter_says_it_is_lora_da_and_still_loads(tmp_path):
    """Item 6: the settings and diagnostics are written beside adapter_config.json, which PEFT still loads."""
    import json

    from peft import PeftModel

    ids, mask = data()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    cfg = lora_da.LoraDAConfig(n_pop=100, gamma=4.0)
    results = lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    peft_model.save_pretrained(tmp_path / "adapter")
    report = json.loads((tmp_path / "adapter" / "lora_da_report.json").read_text())
    assert report["init"] == "lora-da" and report["config"]["gamma"] == 4.0 and report["config"]["rank"] == 2
    assert set(report["modules"]) == set(results)
    for name, r in results.items():
        assert report["modules"][name]["residual"] == r.residual and report["modules"][name]["method"] == r.method
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    for (n1, p1), (n2, p2) in zip(peft_model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert not [p for p in (tmp_path / "adapter").iterdir() if p.name.startswith(".")]


def _bert_classifier():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg).double().eval()


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_preserve_output_with_a_trained_head_saves_an_adapter_that_loads(tmp_path, safe_serialization):
    """Item 5: preserve_output + modules_to_save through the documented
    save_initial_adapter / path_initial_model_for_weight_conversion path. PEFT's
    conversion drops the head; the saved adapter must carry the trained head
    and, on a fresh base, give the trained model's logits."""
    from peft import PeftModel

    ids, mask = data()
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    train = [dict(b, labels=y[i:i + 3]) for i, b in zip((0, 3), batches(ids, mask, 3))]
    peft_model = get_peft_model(_bert_classifier(), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                               modules_to_save=["classifier"], task_type="SEQ_CLS"))
    lora_da.initialize_lora_da_weights(peft_model, train, progress=False,
                                       lora_da_config=lora_da.LoraDAConfig(n_pop=100, gamma=4.0, preserve_output=True))
    lora_da.save_initial_adapter(peft_model, tmp_path / "init")
    with torch.no_grad():  # a training step's worth of change, head included
        g = torch.Generator().manual_seed(1)
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    inputs = {"input_ids": ids, "attention_mask": mask}
    trained = peft_model(**inputs).logits.detach()
    peft_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"),
                               safe_serialization=safe_serialization)
    reloaded = PeftModel.from_pretrained(_bert_classifier(), tmp_path / "out")
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    got_head = reloaded.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(got_head.weight, head.weight) and torch.equal(got_head.bias, head.bias)
    torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=0, atol=1e-10)
