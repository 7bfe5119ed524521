"""The command line on sequence classification: the task read from the data,
a seeded head, and adapters that carry that head and load in PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_da
from lora_da.cli import main
from helpers import WORDS

GOOD = {"good", "fast", "big", "very"}


def _tokenizer(d: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(d)
    return len(vocab)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A tiny BERT encoder without a head (``architectures: ["BertModel"]``, like all-MiniLM-L6-v2)."""
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = _tokenizer(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, pad_token_id=0)
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    p = tmp_path_factory.mktemp("labeled") / "words.jsonl"
    with open(p, "w") as f:
        for _ in range(12):
            words = list(rng.choice(WORDS, int(rng.integers(2, 7))))
            f.write(json.dumps({"text": " ".join(words), "label": int(any(w in GOOD for w in words))}) + "\n")
    return p


def _collect(model, data, out, *extra):
    return main(["collect", str(model), str(data), "--out", str(out), "--batch-size", "4", "-q",
                 "--targets", "query,value", *extra])


def _seeded_classifier(encoder_dir, seed=0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(encoder_dir, num_labels=2, local_files_only=True)


def test_labeled_data_is_sequence_classification_and_reproducible(encoder_dir, labeled, tmp_path):
    """Without --task, labels make it seq-cls; two runs are bit-identical, the
    head is seeded (another seed, another head) and the statistics are those of
    the model with exactly that head."""
    runs = []
    for i, seed in enumerate([0, 0, 1]):
        out = tmp_path / f"s{i}.safetensors"
        assert _collect(encoder_dir, labeled, out, "--seed", str(seed)) == 0
        runs.append(lora_da.Statistics.load(out))
    a, b, c = runs
    assert a.config["task"] == "seq-cls" and a.config["seed"] == 0
    assert sorted(a.new_weights) == ["classifier.bias", "classifier.weight"]
    for n in a.modules:
        np.testing.assert_array_equal(a.grad_sums[n], b.grad_sums[n])
        np.testing.assert_array_equal(a.input_factor(n), b.input_factor(n))
    np.testing.assert_array_equal(a.new_weights["classifier.weight"], b.new_weights["classifier.weight"])
    assert not np.array_equal(a.new_weights["classifier.weight"], c.new_weights["classifier.weight"])

    # independent re-derivation: the seeded head, and the Python API on that model
    model = _seeded_classifier(encoder_dir)
    np.testing.assert_array_equal(a.new_weights["classifier.weight"], model.classifier.weight.detach().numpy())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(encoder_dir)
    rows = [json.loads(line) for line in labeled.read_text().splitlines()]
    batches = []
    for i in range(0, len(rows), 4):
        enc = tok([r["text"] for r in rows[i:i + 4]], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "labels": torch.tensor([r["label"] for r in rows[i:i + 4]])})
    ref = lora_da.collect_statistics(model, batches, ["query", "value"], progress=False)
    for n in ref.modules:
        np.testing.assert_allclose(a.mean_grad(n), ref.mean_grad(n), rtol=0, atol=1e-12 * np.abs(ref.mean_grad(n)).max())


@pytest.mark.parametrize("command", ["solve", "init"])
def test_seq_cls_adapter_loads_with_its_head(command, encoder_dir, labeled, tmp_path):
    """The adapter carries the head the statistics were taken with
    (``modules_to_save``) and PeftModel.from_pretrained loads it onto a fresh
    classifier whose own head is different."""
    from peft import PeftModel

    stats_path, adapter = tmp_path / "s.safetensors", tmp_path / "adapter"
    if command == "solve":
        assert _collect(encoder_dir, labeled, stats_path) == 0
        assert main(["solve", str(stats_path), "--n-pop", "100", "--rank", "2", "--gamma", "4", "--out", str(adapter),
                     "-q"]) == 0
    else:
        assert main(["init", str(encoder_dir), str(labeled), "--n-pop", "100", "--rank", "2", "--gamma", "4",
                     "--batch-size", "4", "--targets", "query,value", "--out", str(adapter), "--save-stats",
                     str(stats_path), "-q"]) == 0
    stats = lora_da.Statistics.load(stats_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]

    fresh = _seeded_classifier(encoder_dir, seed=123)  # its own head differs
    assert not np.array_equal(fresh.classifier.weight.detach().numpy(), stats.new_weights["classifier.weight"])
    loaded = PeftModel.from_pretrained(fresh, adapter)
    head = loaded.base_model.model.classifier
    np.testing.assert_array_equal(head.weight.detach().numpy(), stats.new_weights["classifier.weight"])
    np.testing.assert_array_equal(head.bias.detach().numpy(), stats.new_weights["classifier.bias"])
    inits = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=4.0), progress=False)
    layers = {n: m for n, m in loaded.base_model.model.named_modules() if hasattr(m, "lora_B")}
    assert len(layers) == len(inits) == 4
    for name, init in inits.items():
        np.testing.assert_allclose(layers[name].lora_B["default"].weight.detach().numpy(), init.B.astype(np.float32),
                                   rtol=1e-6, atol=1e-7)


def test_state_dict_output_carries_the_head(encoder_dir, labeled, tmp_path):
    from safetensors.numpy import load_file

    stats_path, out = tmp_path / "s.safetensors", tmp_path / "init.safetensors"
    assert _collect(encoder_dir, labeled, stats_path) == 0
    assert main(["solve", str(stats_path), "--n-pop", "100", "--rank", "2", "--out", str(out), "--format",
                 "state-dict", "-q"]) == 0
    sd = load_file(str(out))
    stats = lora_da.Statistics.load(stats_path)
    np.testing.assert_array_equal(sd["classifier.weight"], stats.new_weights["classifier.weight"])


def test_ambiguous_task_asks_for_the_flag(encoder_dir, model_dir, labeled, tmp_path, capsys):  # noqa: F811
    unlabeled = tmp_path / "plain.jsonl"
    unlabeled.write_text('{"text": "the cat sat"}\n{"text": "a dog ran"}\n')
    # labels on a causal LM: classifier or LM?
    assert _collect(model_dir, labeled, tmp_path / "x.safetensors") != 0
    err = capsys.readouterr().err
    assert "--task seq-cls" in err and "--task causal-lm" in err and "LlamaForCausalLM" in err
    # an encoder without labels: nothing to fit
    assert _collect(encoder_dir, unlabeled, tmp_path / "y.safetensors") != 0
    err = capsys.readouterr().err
    assert "BertModel" in err and "label" in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
    # the flag settles it
    assert _collect(model_dir, labeled, tmp_path / "z.safetensors", "--targets", "q_proj", "--task", "causal-lm") == 0


def _fake_report(n_layers=28, kinds=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), r=4):
    rng = np.random.default_rng(0)
    mods = {}
    for layer in range(n_layers):
        for kind in kinds:
            ev = sorted(-np.abs(rng.normal(size=r + 1)) * 10.0 ** (layer % 7))  # scales that differ by layer
            mods[f"model.layers.{layer}.mlp.{kind}"] = {"eigenvalues": ev[:r], "next_eigenvalue": ev[r], "gap": 1.0}
    return {"format": "lora-da-report", "config": {"rank": r}, "modules": mods}


def test_plot_is_readable_at_two_hundred_modules():
    """One panel per projection type, layers on a colour scale, the cut at r marked."""
    from lora_da.report import figure

    report = _fake_report()
    assert len(report["modules"]) == 196
    fig = figure(report)
    panels = [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]
    # the title counts the poor inits too ("28 modules, 16 poor)"): these random gaps are small beside ‖Ω‖
    titles = sorted(a.get_title().split(",")[0].rstrip(")") for a in panels)
    assert titles == sorted(f"{k} (28 modules" for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                         "down_proj"))
    for ax in panels:
        cuts = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [4.5, 4.5]]
        assert len(cuts) == 1  # between λ_r and λ_{r+1}
        colors = {tuple(ln.get_color()) for ln in ax.get_lines() if ln not in cuts and len(ln.get_xdata()) == 4}
        assert len(colors) == 28  # one colour per layer
    assert any(a.get_label() == "<colorbar>" for a in fig.axes)


def test_plot_without_matplotlib_fails_before_the_solve(tmp_path, monkeypatch, capsys, encoder_dir, labeled):
    import sys

    stats_path = tmp_path / "s.safetensors"
    assert _collect(encoder_dir, labeled, stats_path) == 0
    import lora_da.pipeline

    def boom(*a, **k):
        raise AssertionError("solved before checking for matplotlib")

    monkeypatch.setattr(lora_da.pipeline, "compute_init", boom)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(stats_path), "--n-pop", "100", "--plot", str(tmp_path / "p.png")]) != 0
    assert "pip install 'lora-da[plot]'" in capsys.readouterr().err


def test_init_gamma_auto_chooses_on_held_back_samples(encoder_dir, labeled, tmp_path, capsys):
    """--gamma auto: statistics from the first four fifths, γ the candidate with
    the lowest held-back loss after the steps, the adapter solved at that γ."""
    from peft import PeftModel

    from lora_da.gamma import GAMMAS, held_back_loss

    stats_path, adapter = tmp_path / "s.safetensors", tmp_path / "adapter"
    assert main(["init", str(encoder_dir), str(labeled), "--n-pop", "100", "--rank", "2", "--gamma", "auto",
                 "--batch-size", "4", "--targets", "query,value", "--out", str(adapter), "--save-stats",
                 str(stats_path), "-q"]) == 0
    report = json.loads((adapter / "lora_da_report.json").read_text())
    search = report["gamma_search"]
    table = search["table"]
    assert [row["gamma"] for row in table] == list(GAMMAS)
    best = min(table, key=lambda row: (row["loss_after"], -row["gamma"]))
    assert search["chosen"] == best["gamma"] == report["config"]["gamma"]
    stats = lora_da.Statistics.load(stats_path)
    assert stats.n_samples == 10  # 12 samples, 2 held back
    inits = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=best["gamma"]), progress=False)
    loaded = PeftModel.from_pretrained(_seeded_classifier(encoder_dir, seed=5), adapter)
    layers = {n: m for n, m in loaded.base_model.model.named_modules() if hasattr(m, "lora_B")}
    for name, init in inits.items():
        np.testing.assert_allclose(layers[name].lora_B["default"].weight.detach().numpy(), init.B, rtol=1e-6, atol=1e-7)
    # the step-0 score of the chosen γ, recomputed: the loaded adapter on the two held-back rows
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in labeled.read_text().splitlines()][-2:]
    enc = AutoTokenizer.from_pretrained(encoder_dir)([r["text"] for r in rows], padding=True, return_tensors="pt")
    held = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor([r["label"] for r in rows])}]
    assert held_back_loss(loaded, held) == pytest.approx(best["loss_at_0"], rel=1e-5)
    assert "chose γ" in capsys.readouterr().out
    assert main(["solve", str(stats_path), "--n-pop", "100", "--gamma", "auto", "--out", str(tmp_path / "x")]) != 0
    assert "lora-da init" in capsys.readouterr().err
