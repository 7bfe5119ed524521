"""Statistics files and the command line's writes: statistics files from careless
or hostile hands, what ``--overwrite`` may delete, memory before validation,
one-line CLI errors, and the smaller API holes (preserve_output twice, a
foreign checkpoint, NaN lora_alpha, hyper-parameters checked late)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TARGETS, batches, data, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lora_da
from lora_da.report import REPORT_NAME
from lora_da.cli import main
from lora_da.errors import StatisticsFileError



# -- a statistics file and ways to spoil it ----------------------------------------------------


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory) -> Path:
    ids, mask = data()
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), TARGETS, progress=False,
                                       output_fisher="sequence_lowrank")
    path = tmp_path_factory.mktemp("stats") / "good.safetensors"
    stats.save(path)
    return path


def read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with safe_open(str(path), framework="numpy") as f:
        header = json.loads(f.metadata()["lora_da"])
    return header, load_file(str(path))


def write(path: Path, header, tensors: dict[str, np.ndarray], *, raw: str | None = None) -> Path:
    """``header`` as the ``lora_da`` metadata (or the text ``raw`` verbatim)."""
    save_file(tensors, str(path), metadata={"lora_da": raw if raw is not None else json.dumps(header)})
    return path


def spoiled(stats_file: Path, tmp_path: Path, edit, name="bad.safetensors") -> Path:
    header, tensors = read(stats_file)
    header = edit(header) or header
    return write(tmp_path / name, header, tensors)


def load_refused(path: Path, match: str | None = None) -> StatisticsFileError:
    with pytest.raises(StatisticsFileError) as e:
        lora_da.Statistics.load(path)
    assert str(path) in str(e.value), f"the message does not name the file: {e.value}"
    if match is not None:
        assert match in str(e.value), f"{match!r} not in {e.value}"
    return e.value


def first_module(header) -> str:
    return next(iter(header["modules"]))


# -- 4: a malformed header is a StatisticsFileError, never a raw Python error ----------------

MALFORMED_RAW = {
    "a JSON list": "[1, 2, 3]",
    "null": "null",
    "a string": '"lora-da-statistics"',
    "deeply nested JSON": "[" * 100_000 + "]" * 100_000,
    "an integer too long to parse": "1" * 5000,
}


@pytest.mark.parametrize("case", MALFORMED_RAW)
def test_metadata_that_is_not_an_object(case, stats_file, tmp_path):
    _, tensors = read(stats_file)
    load_refused(write(tmp_path / "bad.safetensors", None, tensors, raw=MALFORMED_RAW[case]))


def _set(path: tuple, value):
    def edit(h):
        d = h
        for k in path[:-1]:
            d = d[k] if not callable(k) else d[k(d)]
        d[path[-1] if not callable(path[-1]) else path[-1](d)] = value

    return edit


def _first(d):
    return next(iter(d))


def _drop(*path):
    def edit(h):
        d = h
        for k in path[:-1]:
            d = d[k] if not callable(k) else d[k(d)]
        del d[path[-1] if not callable(path[-1]) else path[-1](d)]

    return edit


MALFORMED = {
    "a group without n": (_drop("groups", _first, "n"), "lacks n"),
    "a group that is a list": (_set(("groups", _first), [32, 10]), "must be a JSON object"),
    "config a list": (_set(("config",), ["token_mask"]), "config"),
    "model null": (_set(("model",), None), "model"),
    "modules a list": (_set(("modules",), []), "modules"),
    "a module null": (_set(("modules", _first), None), "modules["),
    "a module with an extra field": (_set(("modules", _first, "bias"), True), "unknown field"),
    "in_features a string": (_set(("modules", _first, "in_features"), "32"), "in_features"),
    "in_features a float": (_set(("modules", _first, "in_features"), 32.0), "in_features"),
    "out_features a bool": (_set(("modules", _first, "out_features"), True), "out_features"),
    "in_features 2^64": (_set(("modules", _first, "in_features"), 2**64), "in_features"),
    "kind unknown": (_set(("modules", _first, "kind"), "conv2d"), "kind"),
    "input_group a number": (_set(("modules", _first, "input_group"), 3), "input_group"),
    "outputs without a module": (_drop("outputs", _first), "outputs"),
    "per_sample a string": (_set(("outputs", _first, "per_sample"), "yes"), "per_sample"),
    "tokens negative": (_set(("outputs", _first, "tokens"), -5), "tokens"),
    "samples NaN": (_set(("outputs", _first, "samples"), math.nan), "samples"),
    "n_samples missing": (_drop("n_samples"), "n_samples"),
    "n_samples a float": (_set(("n_samples",), 12.5), "n_samples"),
    "format_version true": (_set(("format_version",), True), "version"),
    "batches_done a string": (_set(("config", "batches_done"), "2"), "batches_done"),
    "output_fisher unknown": (_set(("config", "output_fisher"), "full"), "output_fisher"),
    "name_or_path a list": (_set(("model", "name_or_path"), ["x"]), "name_or_path"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_header_fields(case, stats_file, tmp_path):
    edit, match = MALFORMED[case]
    load_refused(spoiled(stats_file, tmp_path, edit), match)


def test_n_samples_1e999(stats_file, tmp_path):
    # JSON has no infinity; 1e999 is how a careless writer makes one (Python reads it as inf)
    header, tensors = read(stats_file)
    text = json.dumps(header).replace(f'"n_samples": {header["n_samples"]}', '"n_samples": 1e999')
    assert "1e999" in text
    load_refused(write(tmp_path / "inf.safetensors", None, tensors, raw=text), "n_samples")


# -- 5: a well-formed but meaningless file is refused -----------------------------------------


def test_negative_n_samples_is_refused(stats_file, tmp_path):
    # it would flip the sign of every B (Ḡ = grad_sum / N_s)
    load_refused(spoiled(stats_file, tmp_path, _set(("n_samples",), -6)), "n_samples")


def test_zero_samples_is_refused(stats_file, tmp_path):
    load_refused(spoiled(stats_file, tmp_path, _set(("n_samples",), 0)), "n_samples")


def test_no_module_is_refused_and_solve_writes_nothing(stats_file, tmp_path, capsys):
    header, tensors = read(stats_file)
    header["modules"], header["outputs"], header["groups"] = {}, {}, {}
    path = write(tmp_path / "empty.safetensors", header, {"unused": np.zeros(1)})
    load_refused(path, "no module")
    out = tmp_path / "adapter"
    assert main(["solve", str(path), "--n-pop", "100", "--out", str(out), "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-da: error:") and "no module" in err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty.safetensors"]


@pytest.mark.parametrize("where", ["groups", "outputs"])
def test_zero_tokens_names_the_file_and_the_module(where, stats_file, tmp_path):
    header, _ = read(stats_file)
    name = first_module(header)
    key = header["modules"][name]["input_group"] if where == "groups" else name
    err = load_refused(spoiled(stats_file, tmp_path, _set((where, key, "tokens"), 0)), "no")
    assert name in str(err)


@pytest.mark.parametrize("dtype", [np.complex64, np.int64])
def test_a_tensor_that_is_not_real_floats_is_refused(dtype, stats_file, tmp_path):
    header, tensors = read(stats_file)
    key = f"grad.{first_module(header)}"
    t = tensors[key].astype(dtype)
    if np.iscomplexobj(t):
        t = t + 1j  # an imaginary part that astype(float64) would drop
    tensors[key] = t
    load_refused(write(tmp_path / "c.safetensors", header, tensors), key)


def test_non_finite_factor_is_refused(stats_file, tmp_path):
    header, tensors = read(stats_file)
    key = f"output.{first_module(header)}"
    tensors[key] = tensors[key].copy()
    tensors[key][0] = np.nan
    load_refused(write(tmp_path / "n.safetensors", header, tensors), key)


def test_valid_file_still_loads_bit_exact(stats_file, tmp_path):
    a = lora_da.Statistics.load(stats_file)
    a.save(tmp_path / "again.safetensors")
    b = lora_da.Statistics.load(tmp_path / "again.safetensors")
    assert a.modules == b.modules and a.n_samples == b.n_samples and a.config == b.config
    for n in a.modules:
        np.testing.assert_array_equal(a.input_factor(n), b.input_factor(n))
        np.testing.assert_array_equal(a.output_factor(n), b.output_factor(n))
        np.testing.assert_array_equal(a.mean_grad(n), b.mean_grad(n))


# -- 6: --overwrite replaces only what lora-da wrote, and no output may touch an input ---------



def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its content."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-da: error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def solve(stats, out, *extra) -> int:
    return main(["solve", str(stats), "--n-pop", "100", "--out", str(out), "-q", *extra])


def test_overwrite_refuses_a_directory_lora_da_did_not_write(stats_file, model_dir, capsys):
    before = tree(model_dir)
    assert solve(stats_file, model_dir, "--overwrite") != 0
    one_error_line(capsys, "--overwrite refuses", str(model_dir), REPORT_NAME)
    assert tree(model_dir) == before


def test_overwrite_refuses_a_file_lora_da_did_not_write(stats_file, model_dir, tmp_path, capsys):
    weights = next(model_dir.glob("*.safetensors"))
    victim = tmp_path / "model.safetensors"
    victim.write_bytes(weights.read_bytes())
    assert solve(stats_file, victim, "--overwrite", "--format", "state-dict") != 0
    one_error_line(capsys, "not a lora-da state dict")
    assert victim.read_bytes() == weights.read_bytes()


@pytest.mark.parametrize("where", ["model dir itself", "inside the model dir", "the data file", "the data's dir"])
def test_init_refuses_an_output_overlapping_an_input(where, model_dir, data_file, capsys):
    out = {
        "model dir itself": model_dir,
        "inside the model dir": model_dir / "adapter",
        "the data file": data_file,
        "the data's dir": data_file.parent,
    }[where]
    before = tree(model_dir), tree(data_file.parent)
    code = main(["init", str(model_dir), str(data_file), "--n-pop", "100", "--out", str(out), "--overwrite", "-q",
                 "--batch-size", "3"])
    assert code != 0
    one_error_line(capsys, "overlaps")
    assert (tree(model_dir), tree(data_file.parent)) == before


def test_solve_refuses_to_write_over_its_statistics(stats_file, tmp_path, capsys):
    copy = tmp_path / "s.safetensors"
    copy.write_bytes(stats_file.read_bytes())
    assert solve(copy, copy, "--overwrite", "--format", "state-dict") != 0
    one_error_line(capsys, "overlaps the statistics file")
    assert copy.read_bytes() == stats_file.read_bytes()


def test_collect_overwrite_refuses_a_foreign_file(model_dir, data_file, tmp_path, capsys):
    victim = tmp_path / "notes.safetensors"
    save_file({"x": np.ones(3)}, str(victim))
    before = victim.read_bytes()
    code = main(["collect", str(model_dir), str(data_file), "--out", str(victim), "--overwrite", "-q"])
    assert code != 0
    one_error_line(capsys, "not a lora-da statistics file")
    assert victim.read_bytes() == before


def test_overwrite_replaces_lora_da_outputs(stats_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert solve(stats_file, out) == 0
    first = tree(out)
    assert solve(stats_file, out, "--gamma", "4", "--overwrite") == 0
    assert set(tree(out)) == set(first) and tree(out) != first
    sd = tmp_path / "sd.safetensors"
    assert solve(stats_file, sd, "--format", "state-dict") == 0
    assert solve(stats_file, sd, "--format", "state-dict", "--gamma", "4", "--overwrite") == 0
    # an adapter directory with something else in it is no longer only lora-da's
    (out / "training_args.bin").write_bytes(b"x")
    capsys.readouterr()
    assert solve(stats_file, out, "--overwrite") != 0
    one_error_line(capsys, "training_args.bin")
    assert (out / "training_args.bin").exists()


# -- 8: the data is validated (and only as much of it read) before any model is built --------


def _no_model(*a, **k):
    raise AssertionError("the model was loaded before the data was validated")


def test_huge_label_is_refused_before_the_model_is_built(model_dir, tmp_path, monkeypatch, capsys):
    import lora_da.cli.models as models

    monkeypatch.setattr(models, "load_model", _no_model)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the cat", "label": lab}) for lab in (0, 1, 10**7)) + "\n")
    code = main(["collect", str(model_dir), str(data), "--task", "seq-cls", "--out", str(tmp_path / "s.safetensors"), "-q"])
    assert code != 0
    one_error_line(capsys, str(data), "10000000", "0..K-1")
    assert not (tmp_path / "s.safetensors").exists()


def test_negative_label_names_the_line(model_dir, tmp_path, monkeypatch, capsys):
    import lora_da.cli.models as models

    monkeypatch.setattr(models, "load_model", _no_model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a", "label": 0}) + "\n" + json.dumps({"text": "b", "label": -3}) + "\n")
    assert main(["collect", str(model_dir), str(data), "--task", "seq-cls", "--out", str(tmp_path / "s"), "-q"]) != 0
    one_error_line(capsys, f"{data}:2", "-3")


def test_a_head_as_large_as_the_config_declares_is_allowed(tmp_path):
    from lora_da.data import MAX_LABELS, num_labels

    (tmp_path / "config.json").write_text(json.dumps({"num_labels": MAX_LABELS + 5}))
    assert num_labels("d", [0, MAX_LABELS + 4], str(tmp_path)) == MAX_LABELS + 5
    with pytest.raises(ValueError, match=f"{MAX_LABELS + 6}-way"):
        num_labels("d", [MAX_LABELS + 5], str(tmp_path))
    assert num_labels("d", [0, 2, 1], str(tmp_path)) == 3  # unchanged: max label + 1


def test_max_samples_stops_reading_the_file(model_dir, tmp_path):
    # the line after the first --max-samples samples is garbage: it must never be parsed
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "the cat sat on the mat"}) + "\n" for _ in range(4)) + "{not json\n")
    out = tmp_path / "s.safetensors"
    assert main(["collect", str(model_dir), str(data), "--max-samples", "4", "--batch-size", "2", "--out", str(out), "-q"]) == 0
    assert lora_da.Statistics.load(out).n_samples == 4


# -- 9: every expected failure is one line `lora-da: error: ...`, and leaves no file behind ---


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_empty_text_names_the_line(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the cat"}) + "\n" + json.dumps({"text": "  "}) + "\n")
    out = tmp_path / "s.safetensors"
    assert main(["collect", str(model_dir), str(data), "--out", str(out), "-q"]) != 0
    one_error_line(capsys, f"{data}:2", "empty")
    assert listing(tmp_path) == ["d.jsonl"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("option", ["--device", "--solve-device"])
def test_cuda_on_a_machine_without_a_gpu(option, model_dir, data_file, tmp_path, monkeypatch, capsys):
    import lora_da.cli.models as models

    monkeypatch.setattr(models, "load_model", _no_model)  # refused before any model is loaded
    code = main(["init", str(model_dir), str(data_file), "--n-pop", "100", "--out", str(tmp_path / "a"), option, "cuda",
                 "-q"])
    assert code != 0
    one_error_line(capsys, option, "no CUDA GPU")
    assert listing(tmp_path) == []


def _full_disk(*args, **kwargs):
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensors_refuses(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("writer", [_full_disk, _safetensors_refuses])
@pytest.mark.parametrize("fmt", ["peft", "state-dict"])
def test_full_disk_while_solving_leaves_nothing_half_written(writer, fmt, stats_file, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    out = tmp_path / ("adapter" if fmt == "peft" else "sd.safetensors")
    assert solve(stats_file, out, "--format", fmt) == 0
    before = tree(out) if fmt == "peft" else {**tree(out), **tree(tmp_path / "sd.lora_da_report.json")}
    names = listing(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", writer)
    capsys.readouterr()
    assert solve(stats_file, out, "--format", fmt, "--gamma", "4", "--overwrite") != 0
    one_error_line(capsys, f"could not write {out}", "No space left on device")
    after = tree(out) if fmt == "peft" else {**tree(out), **tree(tmp_path / "sd.lora_da_report.json")}
    assert after == before and listing(tmp_path) == names  # the old output intact, no temporary left


@pytest.mark.parametrize("writer", [_full_disk, _safetensors_refuses])
def test_full_disk_while_collecting(writer, model_dir, data_file, tmp_path, monkeypatch, capsys):
    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", writer)
    out = tmp_path / "s.safetensors"
    assert main(["collect", str(model_dir), str(data_file), "--out", str(out), "--batch-size", "3", "-q"]) != 0
    one_error_line(capsys, f"could not write {out}", "No space left on device")
    assert listing(tmp_path) == []


def test_corrupted_model_weights(model_dir, data_file, tmp_path, capsys):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "adapter"
    assert main(["init", str(broken), str(data_file), "--n-pop", "100", "--out", str(out), "-q"]) != 0
    one_error_line(capsys, str(broken), "could not load the model")
    assert not out.exists()


REPORTS = {
    "modules a list": {"format": "lora-da-report", "modules": []},
    "a module a string": {"format": "lora-da-report", "modules": {"q": "x"}},
    "eigenvalues strings": {"format": "lora-da-report", "modules": {"q": {"eigenvalues": ["1", "2"]}}},
    "residual a string": {"format": "lora-da-report", "modules": {"q": {"residual": "small"}}},
    "notes a number": {"format": "lora-da-report", "modules": {"q": {"notes": 3}}},
    "config a list": {"format": "lora-da-report", "config": [], "modules": {}},
}


@pytest.mark.parametrize("case", REPORTS)
def test_report_json_of_the_wrong_shape(case, tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(REPORTS[case]))
    assert main(["report", str(path)]) != 0
    one_error_line(capsys, str(path), "not a lora-da report")


def test_report_json_nested_too_deep(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["report", str(path)]) != 0
    one_error_line(capsys, str(path), "not valid JSON")


# -- 10: the smaller ones --------------------------------------------------------------------


def test_preserve_output_twice_is_refused_and_changes_nothing():
    from peft import LoraConfig, get_peft_model

    ids, mask = data()
    x = {"input_ids": ids[:3], "attention_mask": mask[:3]}
    base = tiny_llama(torch.float64)
    with torch.no_grad():
        before = base(**x).logits.clone()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    cfg = lora_da.LoraDAConfig(n_pop=100, rank=4, gamma=1.0, preserve_output=True)
    lora_da.initialize_lora_da_weights(model, batches(ids, mask, 3), lora_da_config=cfg, progress=False)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for again in (cfg, lora_da.LoraDAConfig(n_pop=100, rank=4, gamma=1.0)):
        with pytest.raises(lora_da.LoraDAError, match="already initialized with preserve_output"):
            lora_da.initialize_lora_da_weights(model, batches(ids, mask, 3), lora_da_config=again, progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, before, rtol=0, atol=1e-10)
    # the same modified base wrapped anew is still recognized
    again = get_peft_model(model.unload(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    with pytest.raises(lora_da.LoraDAError, match="already initialized"):
        lora_da.initialize_lora_da_weights(again, batches(ids, mask, 3), lora_da_config=cfg, progress=False)


def many_batches():
    ids, mask = data()
    return batches(torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)]), 2)  # 6 batches


def test_a_finished_checkpoint_is_not_silently_reused(tmp_path):
    """A finished checkpoint is returned only for the same data (a matching rerun
    returns it, tests/test_collect_inputs.py): other data are refused."""
    ckpt = tmp_path / "c.safetensors"
    lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt, progress=False)
    with pytest.raises(StatisticsFileError, match="finished pass on other data") as e:
        lora_da.collect_statistics(tiny_llama(), many_batches()[::-1], TARGETS, checkpoint_path=ckpt, progress=False)
    assert str(ckpt) in str(e.value)
    assert lora_da.Statistics.load(ckpt).n_samples == 12  # still usable as statistics


def _partial_checkpoint(path: Path) -> None:
    """A pass interrupted after 2 of 6 batches (the 3rd batch fails), checkpointed every batch."""

    def failing(model, batch, calls=[0]):
        from lora_da.collect import default_loss

        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("interrupted")
        return default_loss(model, batch)

    with pytest.raises(RuntimeError, match="interrupted"):
        lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=path, checkpoint_every=1,
                                   loss_fn=failing, progress=False)
    assert lora_da.Statistics.load(path).config["batches_done"] == 2


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    _partial_checkpoint(ckpt)
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # same names and shapes, other weights
    with pytest.raises(StatisticsFileError, match="another model"):
        lora_da.collect_statistics(other, many_batches(), TARGETS, checkpoint_path=ckpt, progress=False)


def test_a_checkpoint_of_other_data_is_refused(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    _partial_checkpoint(ckpt)
    shuffled = many_batches()[::-1]
    with pytest.raises(StatisticsFileError, match="other data or another order"):
        lora_da.collect_statistics(tiny_llama(), shuffled, TARGETS, checkpoint_path=ckpt, progress=False)
    # the same model and data resume, and equal an uninterrupted pass
    resumed = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, checkpoint_path=ckpt, progress=False)
    whole = lora_da.collect_statistics(tiny_llama(), many_batches(), TARGETS, progress=False)
    assert resumed.n_samples == whole.n_samples == 12
    for n in whole.modules:
        np.testing.assert_allclose(resumed.mean_grad(n), whole.mean_grad(n), rtol=1e-12, atol=0)


def test_state_dict_and_report_are_replaced_together(stats_file, tmp_path, monkeypatch, capsys):
    import os

    sd, rep = tmp_path / "sd.safetensors", tmp_path / "sd.lora_da_report.json"
    assert solve(stats_file, sd, "--format", "state-dict") == 0
    before = sd.read_bytes(), rep.read_bytes()
    real = os.replace

    def report_rename_fails(src, dst):
        # the report's rename into place fails (not the putting back of the old one)
        if Path(dst) == rep and "old-" not in str(src):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", report_rename_fails)
    assert solve(stats_file, sd, "--format", "state-dict", "--gamma", "4", "--overwrite") != 0
    one_error_line(capsys, str(sd))
    assert (sd.read_bytes(), rep.read_bytes()) == before  # both old, not a new state dict beside the old report
    assert listing(tmp_path) == ["sd.lora_da_report.json", "sd.safetensors"]


@pytest.mark.parametrize("value", ["nan", "-16", "0", "inf"])
def test_lora_alpha_must_be_finite_and_positive(value, stats_file, tmp_path, capsys):
    assert solve(stats_file, tmp_path / "a", f"--lora-alpha={value}") != 0
    one_error_line(capsys, "--lora-alpha")
    assert listing(tmp_path) == []


OPTIONS = {  # a bad value → what the one-line error must name
    "--gamma=-1": "gamma",
    "--beta=nan": "beta",
    "--alpha=inf": "alpha",
    "--damping=-1e-3": "damping",
    "--n-pop=0": "n_pop",
    "--rank=0": "rank",
    "--lora-alpha=nan": "--lora-alpha",
    "--solve-device=nowhere": "--solve-device",
}


@pytest.mark.parametrize("option", OPTIONS)
def test_init_validates_every_option_before_loading_the_model(option, model_dir, data_file, tmp_path, monkeypatch,
                                                              capsys):
    import lora_da.cli.models as models

    monkeypatch.setattr(models, "load_model", _no_model)
    code = main(["init", str(model_dir), str(data_file), "--n-pop", "100", "--out", str(tmp_path / "a"), option, "-q"])
    assert code != 0
    one_error_line(capsys, OPTIONS[option])
    assert listing(tmp_path) == []


def test_a_failed_adapter_rename_puts_the_old_adapter_back(stats_file, tmp_path, monkeypatch, capsys):
    import os

    out = tmp_path / "adapter"
    assert solve(stats_file, out) == 0
    before = tree(out)
    real = os.replace

    def install_fails(src, dst):
        if Path(dst) == out and ".tmp-" in str(src):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", install_fails)
    assert solve(stats_file, out, "--gamma", "4", "--overwrite") != 0
    one_error_line(capsys, str(out))
    assert tree(out) == before and listing(tmp_path) == ["adapter"] + [f"adapter/{n}" for n in sorted(before)]


# -- the fuzzing pass over Statistics.load (FUZZING.md, "Statistics file headers") -----------

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2**63, 2**64, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)  # unicode included
)
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every (container, key) path inside a decoded JSON value."""
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def header_mutations(draw, header: dict):
    """The valid header with 0-3 edits: a value replaced by random JSON (or a nearby
    wrong-typed one), a key deleted, a key added, or the whole header replaced."""
    import copy

    h = copy.deepcopy(header)
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(h) if isinstance(h, (dict, list)) else []
        op = draw(st.sampled_from(["replace", "delete", "add", "whole", "wrap"]))
        if op == "whole" or not paths:
            h = draw(json_values)
            continue
        path = draw(st.sampled_from(paths))
        parent = h
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if op == "replace":
            parent[key] = draw(json_values)
        elif op == "delete":
            del parent[key]
        elif op == "wrap":
            parent[key] = [parent[key]] if draw(st.booleans()) else {"v": parent[key]}
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
    return h


@st.composite
def tensor_mutations(draw, tensors: dict):
    """The tensors with 0-2 edits: another dtype, another shape, one dropped or added,
    non-finite values."""
    t = dict(tensors)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(t))) if t else None
        op = draw(st.sampled_from(["dtype", "shape", "drop", "add", "nonfinite"]))
        if key is None or op == "add":
            t[draw(st.sampled_from(sorted(tensors)))[:3] + draw(st.text(max_size=4))] = np.zeros(draw(st.integers(0, 5)))
        elif op == "dtype":
            dt = draw(st.sampled_from([np.float32, np.float16, np.int32, np.int64, np.uint8, np.complex64, np.bool_]))
            with warnings.catch_warnings(), np.errstate(all="ignore"):  # lossy casts are the point here
                warnings.simplefilter("ignore")
                t[key] = t[key].astype(dt)
        elif op == "shape":
            a = t[key].reshape(-1)
            t[key] = draw(st.sampled_from([a[:-1] if a.size else a, a, np.concatenate([a, a[:1]]), a.reshape(1, -1),
                                           a.reshape(-1, 1)]))
        elif op == "drop":
            del t[key]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = t[key].astype(np.float64).copy()
            if a.size:
                a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            t[key] = a
    return t


def _assert_valid(s: lora_da.Statistics) -> None:
    assert isinstance(s.n_samples, int) and s.n_samples >= 1 and s.modules
    for name, info in s.modules.items():
        n, m = info.in_features, info.out_features
        Z, y, G = s.input_factor(name), s.output_factor(name), s.mean_grad(name)
        assert Z.shape == (n, n) and y.shape == (m,) and G.shape == (m, n)
        assert np.isfinite(Z).all() and np.isfinite(y).all() and np.isfinite(G).all()


@pytest.fixture(scope="module")
def fuzz_base(stats_file):
    return read(stats_file)


def test_fuzz_statistics_headers(fuzz_base):
    header, tensors = fuzz_base
    counts = {"loaded": 0, "refused": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        h = data.draw(header_mutations(header), label="header")
        t = data.draw(tensor_mutations(tensors), label="tensors")
        raw = None
        if data.draw(st.integers(0, 19), label="deep") == 0:
            depth = data.draw(st.integers(500, 200_000), label="depth")
            raw = "[" * depth + "]" * depth
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "fuzz ünï.safetensors"
            try:
                write(path, h, t, raw=raw if raw is not None else json.dumps(h, allow_nan=True))
            except Exception:  # safetensors itself refuses some tensors (complex128, ...): nothing to load
                return
            try:
                s = lora_da.Statistics.load(path)
            except StatisticsFileError as e:
                assert str(path) in str(e), f"the message does not name the file: {e}"
                counts["refused"] += 1
                return
            _assert_valid(s)
            counts["loaded"] += 1

    check()
    print(f"fuzz_statistics_headers: {counts}")
    assert counts["refused"] > 0


def test_report_plot_may_not_write_over_its_input(stats_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert solve(stats_file, out) == 0
    before = tree(out)
    assert main(["report", str(out / REPORT_NAME), "--plot", str(out / REPORT_NAME)]) != 0
    one_error_line(capsys, "--plot", "would write over")
    assert tree(out) == before


def test_collect_overwrite_refuses_a_lora_da_state_dict(stats_file, model_dir, data_file, tmp_path, capsys):
    sd = tmp_path / "sd.safetensors"
    assert solve(stats_file, sd, "--format", "state-dict") == 0
    before = sd.read_bytes()
    capsys.readouterr()
    assert main(["collect", str(model_dir), str(data_file), "--out", str(sd), "--overwrite", "-q"]) != 0
    one_error_line(capsys, "not a lora-da statistics file")
    assert sd.read_bytes() == before


def test_report_plot_on_a_full_disk_leaves_no_partial_image(stats_file, tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    out = tmp_path / "adapter"
    assert solve(stats_file, out) == 0

    def half_written(self, fname, *a, **k):
        Path(fname).write_bytes(b"\x89PNG half")
        _full_disk()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    capsys.readouterr()
    png = tmp_path / "spectra.png"
    assert main(["report", str(out), "--plot", str(png)]) != 0
    one_error_line(capsys, f"could not write {png}", "No space left on device")
    assert listing(tmp_path) == ["adapter"] + [f"adapter/{n}" for n in sorted(tree(out))]
