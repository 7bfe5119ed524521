"""A PEFT user's second day (issue 21): warnings about a poor init, one report schema,
an adapter that says how it was made, files a team can read, a short Statistics repr."""

from __future__ import annotations

import json
import os
import stat
import warnings

import numpy as np
import pytest
import torch
from helpers import batches, data, tiny_llama
from peft import LoraConfig, get_peft_model

import lora_da
from lora_da.cli import main
from lora_da.quality import POOR_GAP_REL, PoorInitWarning
from lora_da.reference import reference_solve

TARGETS = ["q_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def one_sample_stats():
    ids, mask = data()
    return lora_da.collect_statistics(tiny_llama(), batches(ids[:1], mask[:1], 1), TARGETS, progress=False)


@pytest.fixture(scope="module")
def six_sample_stats():
    ids, mask = data()
    return lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), TARGETS, progress=False)


def _poor_by_reference(stats, name, r, n_pop=1000.0) -> tuple[bool, bool]:
    """(λ_r ≥ 0, gap < POOR_GAP_REL·‖Ω‖₂) from SciPy's full spectrum of the reference Ω."""
    ref = reference_solve(stats.input_factor(name), stats.output_factor(name), stats.mean_grad(name), rank=r, n_pop=n_pop)
    w = np.linalg.eigvalsh(ref.omega)
    norm = np.abs(w).max()
    return bool(w[r - 1] >= 0), bool(w[r] - w[r - 1] < POOR_GAP_REL * norm)


# -- item 2: a poor init is said ---------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 2, 4, 8, 12])
@pytest.mark.parametrize("which", ["one", "six"])
def test_the_warnings_say_what_the_reference_spectrum_says(r, which, one_sample_stats, six_sample_stats):
    stats = one_sample_stats if which == "one" else six_sample_stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorInitWarning)
        inits = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=1000, rank=r, method="dense"), progress=False)
    for name, init in inits.items():
        positive, small_gap = _poor_by_reference(stats, name, r)
        said = " ".join(init.warnings)
        assert ("exceeds the informative directions" in said) == positive, (name, r, said)
        assert ("not determined by the data" in said) == small_gap, (name, r, said)


def test_one_sample_at_r_12_warns_and_a_healthy_init_does_not(one_sample_stats, six_sample_stats):
    # the case: one calibration sample at r = 12, cut gap ~1e-11·‖Ω‖ with λ_r > 0
    with pytest.warns(PoorInitWarning, match=r"modules have a poor init.*q_proj: r = 12 exceeds"):
        inits = lora_da.compute_init(one_sample_stats, lora_da.LoraDAConfig(n_pop=1000, rank=12), progress=False)
    q = inits["model.layers.0.self_attn.q_proj"]
    assert q.result.eigenvalues[-1] > 0 and q.result.gap < 1e-9 * q.result.omega_norm
    assert len(q.warnings) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", PoorInitWarning)
        healthy = lora_da.compute_init(six_sample_stats, lora_da.LoraDAConfig(n_pop=1000, rank=2), progress=False)
    assert not any(i.warnings for i in healthy.values())


def test_the_peft_path_warns_and_its_report_names_the_poor_modules(tmp_path):
    ids, mask = data()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=12, target_modules=["q_proj"]))
    with pytest.warns(PoorInitWarning):
        lora_da.initialize_lora_da_weights(peft_model, batches(ids[:1], mask[:1], 1),
                                           lora_da_config=lora_da.LoraDAConfig(n_pop=100), progress=False)
    peft_model.save_pretrained(tmp_path / "a")
    report = json.loads((tmp_path / "a" / "lora_da_report.json").read_text())
    assert report["poor_init"] == sorted(report["modules"]) and len(report["poor_init"]) == 2
    assert all(m["warnings"] for m in report["modules"].values())


def test_lora_da_report_prints_the_warnings_and_marks_the_plot(one_sample_stats, tmp_path, capsys):
    stats_path = tmp_path / "stats.safetensors"
    one_sample_stats.save(stats_path)
    out = tmp_path / "adapter"
    with pytest.warns(PoorInitWarning):
        assert main(["solve", str(stats_path), "--n-pop", "1000", "--rank", "12", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--plot", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out
    assert "warning: poor init: model.layers.0.self_attn.q_proj: r = 12 exceeds" in printed
    assert "modules have a poor init" in printed

    from lora_da.cli import _figure

    report = json.loads((out / "lora_da_report.json").read_text())
    fig = _figure(report)
    marked = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "poor init"]
    assert marked and all(ax.get_yscale() == "log" for ax in fig.axes if ax.get_visible() and ax.get_lines())
    # the red × sits at the cut: (r, gap/‖Ω‖₂) of a poor module
    q = report["modules"]["model.layers.0.self_attn.q_proj"]
    xs = np.concatenate([line.get_xdata() for line in marked])
    ys = np.concatenate([line.get_ydata() for line in marked])
    assert np.any((xs == 12) & np.isclose(ys, max(q["gap"] / q["omega_norm"], 1e-17)))


def test_a_version_1_report_is_still_judged(tmp_path, capsys):
    v1 = {"format": "lora-da-report", "config": {"rank": 2}, "modules": {
        "m.q_proj": {"eigenvalues": [-1.0, 0.5], "next_eigenvalue": 0.5 + 1e-9, "gap": 1e-9}}}
    (tmp_path / "r.json").write_text(json.dumps(v1))
    assert main(["report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "exceeds the informative directions" in printed and "not determined by the data" in printed


# -- items 7 and 9: one report schema; the adapter says how it was made; a short repr ------------


def test_api_and_cli_reports_have_one_schema(six_sample_stats, tmp_path):
    from lora_da.report import REPORT_VERSION

    stats_path = tmp_path / "stats.safetensors"
    six_sample_stats.save(stats_path)
    assert main(["solve", str(stats_path), "--n-pop", "1000", "--rank", "2", "--out", str(tmp_path / "cli"), "-q"]) == 0
    cli = json.loads((tmp_path / "cli" / "lora_da_report.json").read_text())
    ids, mask = data()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=TARGETS))
    lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3),
                                       lora_da_config=lora_da.LoraDAConfig(n_pop=1000), progress=False)
    peft_model.save_pretrained(tmp_path / "api")
    api = json.loads((tmp_path / "api" / "lora_da_report.json").read_text())
    assert set(api) == set(cli)
    assert api["version"] == cli["version"] == REPORT_VERSION and api["format"] == cli["format"] == "lora-da-report"
    a, c = next(iter(api["modules"].values())), next(iter(cli["modules"].values()))
    assert set(a) == set(c)
    assert set(api["config"]) == set(cli["config"])


def test_the_saved_adapter_says_lora_da_in_its_model_card(tmp_path, six_sample_stats):
    ids, mask = data()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"]))
    lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3),
                                       lora_da_config=lora_da.LoraDAConfig(n_pop=1000, gamma=8.0), progress=False)
    for _ in range(2):  # a second save replaces the section, it does not repeat it
        peft_model.save_pretrained(tmp_path / "api")
    card = (tmp_path / "api" / "README.md").read_text()
    assert card.count("## Initialization: LoRA-DA") == 1 and "γ = 8.0" in card and "lora_da_report.json" in card
    stats_path = tmp_path / "stats.safetensors"
    six_sample_stats.save(stats_path)
    assert main(["solve", str(stats_path), "--n-pop", "1000", "--rank", "2", "--out", str(tmp_path / "cli"), "-q"]) == 0
    assert "## Initialization: LoRA-DA" in (tmp_path / "cli" / "README.md").read_text()
    # --overwrite still recognizes the folder as a lora-da adapter
    assert main(["solve", str(stats_path), "--n-pop", "1000", "--rank", "2", "--out", str(tmp_path / "cli"), "-q",
                 "--overwrite"]) == 0


def test_statistics_print_a_summary_not_every_module(six_sample_stats):
    text = repr(six_sample_stats)
    assert text.startswith("Statistics(3 modules") or text.startswith("Statistics(6 modules")
    n = len(six_sample_stats.modules)
    assert f"{n} modules in {len(six_sample_stats.input_factors)} input groups" in text
    assert f"{six_sample_stats.n_samples} samples" in text and "more)" in text
    assert "array(" not in text and "InputFactor" not in text and len(text) < 400


# -- item 6: files a team can read ----------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_outputs_follow_the_umask(umask_022, six_sample_stats, tmp_path, capsys):
    stats_path = tmp_path / "stats.safetensors"
    six_sample_stats.save(stats_path)
    out = tmp_path / "cli"
    assert main(["solve", str(stats_path), "--n-pop", "1000", "--rank", "2", "--out", str(out), "-q"]) == 0
    assert _mode(out) == 0o755
    assert all(_mode(p) == 0o644 for p in out.iterdir()), {p.name: oct(_mode(p)) for p in out.iterdir()}
    sd = tmp_path / "sd.safetensors"
    assert main(["solve", str(stats_path), "--n-pop", "1000", "--rank", "2", "--out", str(sd), "--format",
                 "state-dict", "-q"]) == 0
    assert _mode(sd) == 0o644 and _mode(tmp_path / "sd.lora_da_report.json") == 0o644
    assert main(["report", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    assert _mode(tmp_path / "p.png") == 0o644
    ids, mask = data()
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"]))
    lora_da.initialize_lora_da_weights(peft_model, batches(ids, mask, 3), lora_da_config=lora_da.LoraDAConfig(
        n_pop=1000, preserve_output=True), progress=False)
    lora_da.save_initial_adapter(peft_model, tmp_path / "init")
    assert _mode(tmp_path / "init") == 0o755
    peft_model.save_pretrained(tmp_path / "api", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    for p in (tmp_path / "api").iterdir():
        assert _mode(p) == 0o644, p.name
