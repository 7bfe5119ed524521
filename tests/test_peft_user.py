"""A PEFT user's second day: warnings about a poor init, one report schema,
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
    with pytest.warns(PoorInitWarning, match=r"modules have a poor init.*q_proj: r = 12 exceeds") as caught:
        inits = lora_da.compute_init(one_sample_stats, lora_da.LoraDAConfig(n_pop=1000, rank=12), progress=False)
    assert [w.filename for w in caught] == [__file__]  # the user's line, not lora-da's internals
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
    with pytest.warns(PoorInitWarning) as caught:
        results = lora_da.initialize_lora_da_weights(peft_model, batches(ids[:1], mask[:1], 1),
                                                     lora_da_config=lora_da.LoraDAConfig(n_pop=100), progress=False)
    assert [w.filename for w in caught if w.category is PoorInitWarning] == [__file__]
    assert "model.layers.0.self_attn.q_proj:" in str(caught[0].message) and ".base_layer" not in str(caught[0].message)
    # the returned results carry the warnings compute_init's do, on the same statistics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorInitWarning)
        stats = lora_da.collect_statistics(tiny_llama(), batches(ids[:1], mask[:1], 1), ["q_proj"], progress=False)
        expected = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100, rank=12), progress=False)
    assert set(results) == set(expected)
    for name, res in results.items():
        # the same two findings (their numbers are of a gap at rounding level: compared by their opening words)
        assert res.name == name and [w[:24] for w in res.warnings] == [w[:24] for w in expected[name].warnings]
        assert len(res.warnings) == 2
        assert res.eigenvalues[-1] > 0 and res.rank == 12  # the solve's own fields read through
    peft_model.save_pretrained(tmp_path / "a")
    report = json.loads((tmp_path / "a" / "lora_da_report.json").read_text())
    assert report["poor_init"] == sorted(report["modules"]) and len(report["poor_init"]) == 2
    assert all(m["warnings"] for m in report["modules"].values())


def test_lora_da_report_prints_the_warnings_and_marks_the_plot(one_sample_stats, tmp_path, capsys):
    stats_path = tmp_path / "stats.safetensors"
    one_sample_stats.save(stats_path)
    out = tmp_path / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PoorInitWarning)  # the CLI says it in its own lines, not as a Python warning
        assert main(["solve", str(stats_path), "--n-pop", "1000", "--rank", "12", "--out", str(out), "-q"]) == 0
    said = capsys.readouterr().out
    assert "lora-da: warning: poor init: model.layers.0.self_attn.q_proj: r = 12 exceeds" in said
    assert f"lora-da: warning: {len(one_sample_stats.modules)} of {len(one_sample_stats.modules)} modules" in said
    assert main(["report", str(out), "--plot", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out
    assert "warning: poor init: model.layers.0.self_attn.q_proj: r = 12 exceeds" in printed
    assert "modules have a poor init" in printed

    from lora_da.report import figure

    report = json.loads((out / "lora_da_report.json").read_text())
    fig = figure(report)
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


def test_the_model_card_marks_only_a_list_it_cuts():
    from lora_da.report import model_card_section

    for n, cut in ((2, False), (5, False), (7, True)):
        poor = [f"m{i}" for i in range(n)]
        line = next(x for x in model_card_section({"poor_init": poor, "modules": {}}).splitlines()
                    if x.startswith("- modules with a poor init"))
        assert line.endswith(f": {n} ({', '.join(poor[:5])}{', …' if cut else ''})"), line


def test_counts_of_one_are_singular(one_sample_stats, data_file, model_dir, tmp_path, capsys):
    from lora_da.quality import assess

    # "only 1 of the 2 eigenvalues is negative, so the last direction comes ...", not "the last 1 directions"
    said = assess([-1.0, 0.5], gap=1.0, omega_norm=2.0)[0]
    assert "only 1 of the 2 eigenvalues is negative, so the last direction comes from the variance term" in said
    said = assess([-1.0, -0.5, 0.5, 0.7], gap=1.0, omega_norm=2.0)[0]
    assert "only 2 of the 4 eigenvalues are negative, so the last 2 directions come from the variance term" in said
    assert ", 1 sample, " in repr(one_sample_stats)
    one_row = tmp_path / "one.jsonl"
    one_row.write_text('{"text": "the cat sat"}\n')
    assert main(["collect", str(model_dir), str(one_row), "--targets", "q_proj", "--out", str(tmp_path / "s.st"),
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "lora-da: collected 2 modules (2 input groups), 1 sample, " in out
    assert main(["solve", str(tmp_path / "s.st"), "--n-pop", "10", "--rank", "1", "--format", "state-dict",
                 "--out", str(tmp_path / "sd.safetensors"), "-q"]) == 0
    assert "(2 modules)" in capsys.readouterr().out
    stats = lora_da.collect_statistics(tiny_llama(), batches(*[t[:1] for t in data()], 1),
                                       ["model.layers.0.self_attn.q_proj"], progress=False)
    assert repr(stats).startswith("Statistics(1 module in 1 input group, 1 sample, ")


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


# -- item 3: `compare` gives a verdict a user can act on -----------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from helpers import WORDS, word_tokenizer
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert-compare")
    vocab_size = word_tokenizer(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=32, pad_token_id=0)).save_pretrained(d)
    rng = np.random.default_rng(3)
    data_path = d / "rows.jsonl"
    with open(data_path, "w") as f:
        for i in range(40):
            words = list(rng.choice(WORDS, 4))
            f.write(json.dumps({"text": " ".join(words), "label": int(i % 4 == 0)}) + "\n")
    return d, data_path


def _compare(tiny_encoder, out, *extra):
    d, data_path = tiny_encoder
    return main(["compare", "--model", str(d), "--data", str(data_path), "--train", "16", "--select", "8", "--eval",
                 "8", "--calib", "8", "--steps", "2", "--lrs", "1e-3", "--no-sensitivity", "--device", "cpu",
                 "--target-modules", "query", "value", "--out", str(out), *extra])


def test_compare_with_one_seed_records_the_run_and_says_no_spread_was_measured(tiny_encoder, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(tiny_encoder, out, "--seeds", "1", "--methods", "PEFT default", "LoRA-DA",
                    "LoRA-DA auto-norm") == 0
    text = (out / "results.md").read_text()
    d, data_path = tiny_encoder
    assert "± 0" not in text and "one seed: no spread between seeds was measured" in text
    closing = [line for line in text.splitlines() if line.startswith("Verdict (")]
    assert len(closing) == 1 and "no spread between seeds was measured" in closing[0]
    # the best arm it names is the one with the highest eval accuracy in the table (or the arms tied there)
    rows = {line.split("|")[1].strip(): float(line.split("|")[-6].strip()) for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    top = [n for n, v in rows.items() if v == max(rows.values())]
    if len(top) == 1:
        assert f"is {top[0]} (" in closing[0]
    else:
        assert f"{', '.join(top)} tie at" in closing[0]
    assert "auto-norm bar" not in text and "auto-norm bar" not in capsys.readouterr().out
    assert "lora-da compare --model" in text and "--seeds 1" in text and "--steps 2" in text
    assert f"{data_path} (40 labeled rows)" in text
    assert "label balance (all rows): 0: 30 (75%) / 1: 10 (25%)" in text
    assert f"model: {d}" in text and "train 16, select 8, eval 8, calib 8" in text
    from transformers import AutoModelForSequenceClassification

    n_params = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(d, num_labels=2).parameters())
    assert f"parameters: {n_params:,} (BertForSequenceClassification)" in text


def test_compare_says_a_poor_init_in_one_line_of_its_own(tiny_encoder, tmp_path, capsys):
    # one calibration row at r = 8: every module's init is poor (the library's PoorInitWarning);
    # compare says it as the other commands do, not as Python's warning with a source line
    assert _compare(tiny_encoder, tmp_path / "cmp", "--seeds", "1", "--methods", "LoRA-DA", "--calib", "1") == 0
    captured = capsys.readouterr()
    said = [line for line in captured.out.splitlines() if "poor init" in line]
    assert len(said) == 1 and said[0].startswith("lora-da: warning: 2 of 2 modules have a poor init — ")
    assert "PoorInitWarning" not in captured.err and "initialize_lora_da_weights(" not in captured.err


def test_compare_refuses_unknown_methods_and_shows_defaults(tiny_encoder, tmp_path, capsys):
    # an unknown arm is a usage error: exit status 2, as argparse's own (a bad --seeds type too)
    assert _compare(tiny_encoder, tmp_path / "x", "--methods", "LoRA-DA", "LoRA-XYZ") == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-da: error: --methods: unknown arm(s) ['LoRA-XYZ']") and "'PEFT default'" in err
    assert not (tmp_path / "x").exists()
    assert _compare(tiny_encoder, tmp_path / "x", "--seeds", "0") == 2
    assert _compare(tiny_encoder, tmp_path / "x", "--seeds", "x") == 2
    capsys.readouterr()
    assert main(["compare", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 1024)", "(default: 3)", "(default: 100)", "(default: lora_da_compare)"):
        assert default in help_text
    # a default of None or False says nothing: the help says what happens without the option
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    assert "(default: every arm the installed PEFT has)" in help_text


def test_init_help_shows_the_defaults():
    import argparse

    from lora_da.cli import build_parser

    parser = build_parser()
    init = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)).choices["init"]
    help_text = " ".join(init.format_help().split())
    for option in ("--rank", "--batch-size", "--max-length", "--damping", "--method", "--lora-alpha", "--format",
                   "--token-mask"):
        action = next(a for a in init._actions if option in a.option_strings)
        value = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
        assert f"(default {value})" in help_text, option


def test_compare_reads_the_jsonl_of_the_other_commands_with_its_checks(tmp_path):
    from lora_da.compare import read_label_rows

    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a b", "label": 1}\n{"text": "c", "label": 0}\n')
    assert read_label_rows(p) == [("a b", 1), ("c", 0)]
    p.write_text('{"text": "a b", "label": 1}\n{"text": "c", "label": "x"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: seq-cls needs an integer 'label'"):
        read_label_rows(p)


def _task_result(evals: dict[str, list[float]]):
    from lora_da import compare

    task = compare.Task("t", base=None, lora_config=None, train=None, calib=[], select=[], eval=[], evaluate=None,
                        metric="accuracy", n_pop=1)
    runs = {name: [compare.Run(name, s, 1e-3, None, [1.0], {"loss": 1.0}, {"loss": 1.0, "metric": v}, 0, 0, None)
                   for s, v in enumerate(vs)] for name, vs in evals.items()}
    return compare.TaskResult(task, {n: (1e-3, None) for n in evals}, {}, runs, {}, {}, 1)


@pytest.mark.parametrize("evals,best,clear", [
    ({"A": [0.80, 0.82, 0.81], "B": [0.70, 0.71, 0.69]}, "A", True),
    ({"A": [0.80, 0.70, 0.75], "B": [0.74, 0.73, 0.75]}, "A", False),
    ({"A": [0.60, 0.61], "B": [0.90, 0.50]}, "B", False),
])
def test_the_verdict_compares_the_lead_with_the_spread_between_seeds(evals, best, clear):
    from lora_da.compare import verdict

    text = verdict(_task_result(evals))
    means = {k: float(np.mean(v)) for k, v in evals.items()}
    order = sorted(means, key=means.get, reverse=True)
    assert order[0] == best and f"is {best} ({means[best]:.4f})" in text
    lead = means[order[0]] - means[order[1]]
    spread = max(float(np.std(evals[k], ddof=1)) for k in order[:2])
    assert (lead > spread) == clear
    assert ("exceeds the spread" in text) == clear and ("no clear winner" in text) == (not clear)
    assert f"{spread:.4f}" in text


def test_the_verdict_names_a_tie_and_a_single_seed():
    from lora_da.compare import verdict

    assert "A, B tie at 0.5000 (one seed" in verdict(_task_result({"A": [0.5], "B": [0.5], "C": [0.25]}))
    one = verdict(_task_result({"A": [0.75], "B": [0.5]}))
    assert "is A (0.7500), 0.2500 ahead of B" in one and "no spread between seeds was measured" in one
    assert "±" not in one


# -- item 5: progress with a total and an ETA -------------------------------------------------------


class _Bar:
    made: list = []

    def __init__(self, *a, total=None, disable=False, **k):
        self.total, self.n = total, 0
        _Bar.made.append(self)

    def update(self, k=1):
        self.n += k

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


class _Rows(torch.utils.data.IterableDataset):
    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def __iter__(self):
        for i in range(len(self.ids)):
            yield {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


@pytest.mark.parametrize("make,max_samples,total", [
    ("list", None, 3),  # a list of batches: its length
    ("loader", None, 3),  # a DataLoader over 6 rows, batch 2
    ("loader", 3, 2),  # max_samples = 3 at batch 2: two batches, the second cut to one row
    ("iterable", 5, 3),  # no length, but max_samples and the loader's batch_size bound it
    ("generator", None, None),  # nothing bounds it: no total is invented
])
def test_the_collection_bar_has_a_total_when_the_data_bound_it(monkeypatch, make, max_samples, total):
    import lora_da.collect.run

    monkeypatch.setattr(lora_da.collect.run, "tqdm", _Bar)
    _Bar.made = []
    ids, mask = data()
    if make == "list":
        dl = batches(ids, mask, 2)
    elif make == "loader":
        dl = torch.utils.data.DataLoader([{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(6)],
                                         batch_size=2)
    elif make == "iterable":
        dl = torch.utils.data.DataLoader(_Rows(ids, mask), batch_size=2)
    else:
        dl = (b for b in batches(ids, mask, 2))
    stats = lora_da.collect_statistics(tiny_llama(), dl, ["v_proj"], max_samples=max_samples, progress=True)
    bar = _Bar.made[0]
    assert bar.total == total
    if total is not None:
        assert bar.n == total  # the bar ends full: the total was right
    assert stats.n_samples == (max_samples or 6)


# -- item 8: --gamma auto at the edge of its grid -------------------------------------------------------


def _search(per_sample: dict[float, list[float]]):
    from lora_da.gamma import GammaSearch

    table = [(g, 0.0, float(np.mean(v))) for g, v in per_sample.items()]
    best = min(table, key=lambda row: (row[2], -row[0]))[0]
    return GammaSearch(best=best, table=table, losses=per_sample)


def _paired(per_sample, best):
    """Independently: per candidate, |mean paired difference| ≤ 2 standard errors?"""
    ref = np.asarray(per_sample[best])
    out = {}
    for g, v in per_sample.items():
        if g != best:
            d = np.asarray(v) - ref
            out[g] = abs(d.mean()) <= 2 * d.std(ddof=1) / np.sqrt(len(d))
    return out


def test_an_edge_choice_within_noise_says_so_and_suggests_the_next_grid():
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.3, size=20)
    # γ = 1 lowest by a hair, every candidate within its noise
    per = {g: list(base + 1e-4 * k + rng.normal(0, 0.05, size=20)) for k, g in enumerate((1.0, 4.0, 16.0, 64.0))}
    per[1.0] = list(np.asarray(per[1.0]) - 0.01)
    s = _search(per)
    assert s.best == 1.0 and all(_paired(per, 1.0).values())
    assert s.at_edge() and s.within_noise()
    text = s.verdict()
    assert "γ = 1 is at the edge of the grid" in text and "did not determine γ" in text
    assert s.next_grid() == [1 / 64, 1 / 16, 1 / 4, 1.0] and "0.015625, 0.0625, 0.25, 1" in text


def test_an_edge_choice_out_of_noise_suggests_going_further_and_a_clear_interior_choice_says_nothing():
    rng = np.random.default_rng(1)
    base = rng.normal(1.0, 0.3, size=20)
    per = {g: list(base + 0.1 * k + rng.normal(0, 0.001, size=20)) for k, g in enumerate((1.0, 4.0, 16.0))}
    per = {g: v for g, v in zip((16.0, 4.0, 1.0), per.values())}  # the lowest at the large edge
    s = _search(per)
    assert s.best == 16.0 and not any(_paired(per, 16.0).values())
    assert s.at_edge() and not s.within_noise()
    assert "γ = 16 is at the edge" in s.verdict() and s.next_grid() == [16.0, 64.0, 256.0, 1024.0]
    inner = {1.0: per[4.0], 4.0: per[16.0], 16.0: per[1.0]}  # the lowest in the middle, clearly
    s = _search(inner)
    assert s.best == 4.0 and not s.at_edge() and s.verdict() == ""


@pytest.mark.parametrize("gamma", [9.0, 1024.0])
def test_unit_state_dict_brings_a_solve_to_gamma_one(gamma):
    """SPEC §3 step 8: ``A = Vᵀ/√γ`` and ``B = Δ̂ᵀV/√γ``, so the weights at γ = 1 that
    ``search_gamma`` divides by each candidate's √γ are ``A·√γ = Vᵀ`` and ``B·√γ = Δ̂ᵀV``:
    against the SciPy reference solved at γ = 1, to float32 rounding."""
    from lora_da.adapters import _lora_keys
    from lora_da.gamma import unit_state_dict

    ids, mask = data()
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["o_proj", "down_proj"], progress=False)
    inits = lora_da.compute_init(stats, lora_da.LoraDAConfig(n_pop=100, rank=2, gamma=gamma), progress=False)
    unit = unit_state_dict(inits, gamma)
    assert set(unit) == {k for n in inits for k in _lora_keys(n)}
    for n, init in inits.items():
        ka, kb = _lora_keys(n)
        assert unit[ka].dtype == unit[kb].dtype == torch.float32
        ref = reference_solve(stats.input_factor(n), stats.output_factor(n), stats.mean_grad(n), rank=2, n_pop=100.0,
                              gamma=1.0)
        V = init.result.V
        assert ref.gap >= 1e-3 * ref.omega_norm and np.abs(V - ref.V).max() <= 1e-8  # a determined subspace
        np.testing.assert_allclose(unit[ka].double().numpy(), V.T, rtol=0, atol=2**-23 * np.abs(V).max())
        B1 = ref.delta_hat.T @ V
        np.testing.assert_allclose(unit[kb].double().numpy(), B1, rtol=0, atol=1e-6 * np.abs(B1).max())


def test_search_gamma_keeps_the_per_sample_losses_and_the_cli_reports_the_verdict(tmp_path, capsys, tiny_encoder,
                                                                                  monkeypatch):
    # the CLI's search on a grid of two candidates: whichever wins sits at an edge, so the verdict is
    # known to say so, with the next grid past that edge at the grid's ratio (4)
    import lora_da.gamma as gamma

    real = gamma.search_gamma
    monkeypatch.setattr(gamma, "search_gamma", lambda *a, **kw: real(*a, **{**kw, "gammas": (4.0, 16.0)}))
    d, data_path = tiny_encoder
    out = tmp_path / "adapter"
    assert main(["init", str(d), str(data_path), "--n-pop", "100", "--rank", "2", "--gamma", "auto", "--batch-size",
                 "8", "--targets", "query,value", "--out", str(out), "-q"]) == 0
    search = json.loads((out / "lora_da_report.json").read_text())["gamma_search"]
    assert [row["gamma"] for row in search["table"]] == [4.0, 16.0] and search["at_edge"]
    assert f"γ = {search['chosen']:g} is at the edge of the grid" in search["verdict"]
    assert f"lora-da: note: {search['verdict']}" in capsys.readouterr().out
    assert search["next_grid"] == ([0.0625, 0.25, 1.0, 4.0] if search["chosen"] == 4.0 else [16.0, 64.0, 256.0, 1024.0])

    from lora_da.gamma import held_back_loss, held_back_losses

    model = tiny_llama()
    ids, mask = data()
    b = batches(ids, mask, 4)
    per = held_back_losses(model, b)
    assert len(per) == 6 and held_back_loss(model, b) == pytest.approx(float(np.mean(per)), rel=1e-12)
