"""The command line's inputs and their defect classes (numbered as in the third
hardening review): the
head sized from the calibration slice (2), weights past float32 (4), zero
gradients (6), a head named as a LoRA target (7), model errors and an
unwritable --out (11), bad JSONL (12), --token-mask labels with class labels
(13), report --plot without eigenvalues (19), compare on a negative label (20);
and ``--checkpoint``.

Each test failed on the code before the fix (checked by stashing the fix)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import WORDS, assert_same_statistics, word_tokenizer

import lora_da
from lora_da.cli import main


def _bert(d: Path, head_labels: int | None = None) -> Path:
    """A tiny BERT with 16 positions: an encoder alone, or a classifier with its own head."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=word_tokenizer(d), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, pad_token_id=0)
    if head_labels is None:
        BertModel(cfg).save_pretrained(d)
    else:
        cfg.num_labels = head_labels
        BertForSequenceClassification(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return _bert(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def classifier3(tmp_path_factory) -> Path:
    return _bert(tmp_path_factory.mktemp("classifier3"), head_labels=3)


def _rows(path: Path, labels, words: int = 3) -> Path:
    with open(path, "w") as f:
        for i, lab in enumerate(labels):
            f.write(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)), "label": lab}) + "\n")
    return path


def _collect(model, data, out, *extra) -> int:
    return main(["collect", str(model), str(data), "--out", str(out), "--batch-size", "2", "-q",
                 "--targets", "query,value", *extra])


def one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("lora-da: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _head_rows(stats_path: Path) -> int:
    return lora_da.Statistics.load(stats_path).new_weights["classifier.weight"].shape[0]


# -- 2: the head's size comes from the whole file, the flag, or the model -------------------------


def test_a_sorted_file_gets_a_head_for_all_its_classes(encoder, tmp_path):
    data = _rows(tmp_path / "sorted.jsonl", [0, 0, 0, 0, 1, 1, 2, 2])  # the first 4 rows are all class 0
    out = tmp_path / "s.safetensors"
    assert _collect(encoder, data, out, "--max-samples", "4") == 0
    assert _head_rows(out) == 3  # was a 1-output (regression) head
    assert _collect(encoder, data, tmp_path / "s5.safetensors", "--max-samples", "4", "--num-labels", "5") == 0
    assert _head_rows(tmp_path / "s5.safetensors") == 5


def test_a_head_that_disagrees_with_the_data_is_refused(encoder, classifier3, tmp_path, capsys):
    data = _rows(tmp_path / "d.jsonl", [0, 1, 2, 3])
    assert _collect(encoder, data, tmp_path / "a.safetensors", "--num-labels", "3") != 0
    one_error_line(capsys, str(data), "label 3", "--num-labels 3")
    assert _collect(classifier3, data, tmp_path / "b.safetensors") != 0
    one_error_line(capsys, "3-way classification head", "disagree")
    assert _collect(classifier3, _rows(tmp_path / "ok.jsonl", [0, 1, 2, 3][:3]), tmp_path / "c.safetensors",
                    "--num-labels", "4") != 0
    one_error_line(capsys, "--num-labels 4 disagrees with the 3-way head")
    zeros = _rows(tmp_path / "z.jsonl", [0, 0, 0, 0])
    assert _collect(encoder, zeros, tmp_path / "z.safetensors") != 0
    one_error_line(capsys, "every label is 0", "--num-labels")
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_classifiers_own_head_is_kept(classifier3, tmp_path):
    out = tmp_path / "s.safetensors"
    assert _collect(classifier3, _rows(tmp_path / "d.jsonl", [0, 1, 0, 1]), out) == 0
    stats = lora_da.Statistics.load(out)
    assert not stats.new_weights  # the trained 3-way head was loaded, not a fresh 2-way one


# -- 4, 6, 7: what would be written ---------------------------------------------------------------


def test_a_gamma_that_overflows_float32_writes_nothing(encoder, tmp_path, capsys):
    data = _rows(tmp_path / "d.jsonl", [0, 1, 0, 1])
    out = tmp_path / "adapter"
    code = main(["init", str(encoder), str(data), "--n-pop", "100", "--rank", "2", "--gamma", "1e-80", "--out", str(out),
                 "--targets", "query,value", "-q"])
    assert code != 0
    one_error_line(capsys, "not finite in the adapter's dtype float32", "larger gamma")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]


def test_one_token_rows_give_no_gradient_and_are_refused(model_dir, tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"text": w}) + "\n" for w in WORDS[:4]))
    out = tmp_path / "adapter"
    assert main(["init", str(model_dir), str(data), "--n-pop", "10", "--rank", "2", "--targets", "q_proj",
                 "--out", str(out), "-q"]) != 0
    one_error_line(capsys, "zero in every one of the 2 targeted modules")
    assert not out.exists()


def test_a_zero_gradient_in_some_modules_is_printed(tmp_path, capsys):
    from helpers import batches, data, tiny_llama

    ids, mask = data()
    stats = lora_da.collect_statistics(tiny_llama(), batches(ids, mask, 3), ["q_proj"], progress=False)
    stats.grad_sums["model.layers.0.self_attn.q_proj"][:] = 0.0
    stats.save(tmp_path / "s.safetensors")
    out = tmp_path / "adapter"
    assert main(["solve", str(tmp_path / "s.safetensors"), "--n-pop", "10", "--rank", "2", "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "lora-da: warning: the mean gradient is zero in 1 of 2 modules (model.layers.0.self_attn.q_proj)" in err
    assert (out / "adapter_model.safetensors").is_file()


def test_a_head_named_as_a_target_is_refused_before_the_pass(encoder, tmp_path, capsys, monkeypatch):
    import lora_da.collect

    def no_pass(*a, **k):
        raise AssertionError("the pass ran")

    monkeypatch.setattr(lora_da.cli.commands, "collect_statistics", no_pass, raising=False)
    monkeypatch.setattr(lora_da.collect, "collect_statistics", no_pass)
    data = _rows(tmp_path / "d.jsonl", [0, 1, 0, 1])
    assert main(["collect", str(encoder), str(data), "--out", str(tmp_path / "s.safetensors"), "-q",
                 "--targets", "query,classifier"]) != 0
    one_error_line(capsys, "--targets selects classifier", "modules_to_save")


@pytest.mark.parametrize("targets", ["query,classifier", "classifier"])
def test_a_classifiers_own_head_named_as_a_target_is_refused(classifier3, tmp_path, capsys, monkeypatch, targets):
    """PEFT's SEQ_CLS model saves ``classifier`` whole itself, so an adapter that also
    targets it does not load (the head the model brings, not only one lora-da creates)."""
    import lora_da.collect

    def no_pass(*a, **k):
        raise AssertionError("the pass ran")

    monkeypatch.setattr(lora_da.collect, "collect_statistics", no_pass)
    data = _rows(tmp_path / "d.jsonl", [0, 1, 2, 1])
    out = tmp_path / "adapter"
    assert main(["init", str(classifier3), str(data), "--n-pop", "10", "--rank", "2", "--gamma", "4", "--out", str(out),
                 "-q", "--targets", targets]) != 0
    one_error_line(capsys, "--targets selects classifier", "SEQ_CLS", "modules_to_save")
    assert not out.exists()


# -- 11: model errors, an unwritable --out --------------------------------------------------------


def test_max_length_past_the_models_positions_is_one_line(encoder, tmp_path, capsys):
    data = _rows(tmp_path / "long.jsonl", [0, 1], words=30)
    assert _collect(encoder, data, tmp_path / "s.safetensors", "--max-length", "40") != 0
    one_error_line(capsys, str(encoder), "30 tokens", "16 positions", "--max-length 16")


def test_an_unwritable_out_is_found_before_the_model_is_loaded(encoder, tmp_path, capsys, monkeypatch):
    import lora_da.cli.models as models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    data = _rows(tmp_path / "d.jsonl", [0, 1])
    for command in (["collect", str(encoder), str(data)], ["init", str(encoder), str(data), "--n-pop", "10"]):
        assert main([*command, "--out", "/proc/lora-da-out", "-q"]) != 0  # /proc takes no new file, even as root
        one_error_line(capsys, "cannot write /proc/lora-da-out", "writable --out")


# -- 12, 13: bad JSONL, token_mask='labels' on class labels -----------------------------------------


@pytest.mark.parametrize("case", ["surrogate", "deep", "latin1"])
def test_bad_jsonl_is_one_line_naming_the_file(case, model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    good = json.dumps({"text": "the cat sat"}) + "\n"
    if case == "surrogate":
        data.write_text(good + '{"text": "a \\ud800 b"}\n')
        needles = (f"{data}:2", "lone surrogate")
    elif case == "deep":
        data.write_text("[" * 100_000 + "]" * 100_000 + "\n")
        needles = (f"{data}:1", "not valid JSON")
    else:
        data.write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
        needles = (f"{data}:1", "not UTF-8")
    assert main(["collect", str(model_dir), str(data), "--out", str(tmp_path / "s.safetensors"), "-q"]) != 0
    one_error_line(capsys, *needles)


def test_a_bad_byte_on_a_later_line_is_reported_at_that_line(model_dir, tmp_path, capsys):
    """The text-mode reader decoded ahead in chunks and named line 1."""
    data = tmp_path / "d.jsonl"
    good = "".join(json.dumps({"text": f"the cat sat {w}"}) + "\n" for w in WORDS[:3])
    data.write_bytes(good.encode() + json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    assert main(["collect", str(model_dir), str(data), "--out", str(tmp_path / "s.safetensors"), "-q"]) != 0
    one_error_line(capsys, f"{data}:4", "not UTF-8")
    assert main(["collect", str(model_dir), str(data), "--out", str(tmp_path / "s.safetensors"), "-q",
                 "--task", "causal-lm"]) != 0
    one_error_line(capsys, f"{data}:4", "not UTF-8")


@pytest.mark.parametrize("rows, where", [
    (["{not json"], 1),
    ([json.dumps({"text": "the cat"}), json.dumps({"text": "a dog"}), "{not json"], 3),
    ([json.dumps({"text": "the cat"}), json.dumps({"txt": "a dog"})], 2),
])
def test_a_malformed_file_on_a_non_causal_model_is_bad_data_not_a_missing_label(encoder, tmp_path, capsys, rows,
                                                                                where):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n")
    assert _collect(encoder, data, tmp_path / "s.safetensors") != 0
    line = one_error_line(capsys, f"{data}:{where}")
    assert "no 'label' field" not in line


def test_token_mask_labels_with_class_labels(encoder, tmp_path, capsys):
    data = _rows(tmp_path / "d.jsonl", [0, 1])
    assert _collect(encoder, data, tmp_path / "s.safetensors", "--token-mask", "labels") != 0
    one_error_line(capsys, "--token-mask labels", "--token-mask attention")
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    from helpers import tiny_classifier

    with pytest.raises(lora_da.InvalidArgumentError, match="token_mask='labels' needs per-token labels.*'attention'"):
        lora_da.collect_statistics(tiny_classifier(), [batch], ["query"], token_mask="labels", progress=False)


# -- 19, 20: report --plot, compare -----------------------------------------------------------------


def test_report_plot_with_no_eigenvalues(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    report = {"format": "lora-da-report", "config": {"rank": None},
              "modules": {"model.layers.0.self_attn.q_proj": {"eigenvalues": [], "n": 4, "m": 4}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    assert main(["report", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_compare_refuses_a_negative_label(encoder, tmp_path, capsys):
    data = tmp_path / "d.tsv"
    data.write_text("the cat\t0\na dog\t-1\n")
    assert main(["compare", "--model", str(encoder), "--data", str(data), "--out", str(tmp_path / "c")]) != 0
    one_error_line(capsys, f"{data}:2", "label -1")


@pytest.mark.parametrize("label, needle", [
    ("99999999999", "label 99999999999 asks for a 100000000000-way"),  # was a MemoryError in the label balance
    ("1.5", "label '1.5' is not a class index"),  # was skipped without a word
    ("pos", "label 'pos' is not a class index"),
])
def test_compare_refuses_a_label_that_is_not_a_class_index(encoder, tmp_path, capsys, label, needle):
    data = tmp_path / "d.tsv"
    data.write_text("the cat\t0\n" f"a dog\t{label}\n" + "".join(f"{w}\t{k % 2}\n" for k, w in enumerate(WORDS)))
    assert main(["compare", "--model", str(encoder), "--data", str(data), "--out", str(tmp_path / "c"),
                 "--train", "8", "--select", "4", "--eval", "4"]) != 0
    one_error_line(capsys, f"{data}:2", needle)
    assert not (tmp_path / "c").exists()


def test_compare_reads_a_header_line_and_class_indices():
    import tempfile

    from lora_da.compare import read_label_rows

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "d.tsv"
        p.write_text("text\tlabel\nthe cat\t0\na dog\t+2\n\n")
        assert read_label_rows(p) == [("the cat", 0), ("a dog", 2)]
        p.write_text('{"text": "a", "label": 10000}\n')
        p = p.rename(Path(d) / "d.jsonl")
        with pytest.raises(ValueError, match="d.jsonl: label 10000 asks for a 10001-way"):
            read_label_rows(p)


# -- --checkpoint ----------------------------------------------------------------------------------


class _CtrlC:
    """The default loss, with a Ctrl-C at the third batch while ``armed``; ``calls`` counts its batches."""

    def __init__(self, monkeypatch):
        import lora_da.collect.run as collect  # where a run takes its default loss

        self.real, self.calls, self.armed = collect.default_loss, [], True
        monkeypatch.setattr(collect, "default_loss", self)

    def __call__(self, model, batch):
        self.calls.append(1)
        if self.armed and len(self.calls) == 3:
            raise KeyboardInterrupt
        return self.real(model, batch)


def _interrupt_resume_rerun(args, ck, outputs, monkeypatch, capsys, after_resume):
    """``args`` (a command with ``--checkpoint ck --checkpoint-every 1``) stopped by Ctrl-C at the
    third of three batches, then run again (it resumes), then once more (it runs no batch):
    ``after_resume()`` checks the outputs after each of the last two runs."""
    ctrl_c = _CtrlC(monkeypatch)
    assert main([*args, "-q"]) == 130
    assert f"rerun the same command to resume from {ck}" in capsys.readouterr().err
    assert not any(p.exists() for p in outputs) and lora_da.Statistics.load(ck).config["batches_done"] == 2
    ctrl_c.armed = False
    assert main(args) == 0
    assert "resuming at batch 3 of 3" in capsys.readouterr().err  # 12 rows, --batch-size 4
    first = after_resume()
    ctrl_c.armed, ctrl_c.calls = True, []
    assert main(args) == 0 and not ctrl_c.calls
    assert "already finished" in capsys.readouterr().err
    return first, after_resume()


def test_collect_checkpoint_resumes_after_ctrl_c_and_returns_a_finished_pass(model_dir, data_file, tmp_path, capsys,
                                                                             monkeypatch):
    ck, out, whole = tmp_path / "ck.safetensors", tmp_path / "s.safetensors", tmp_path / "whole.safetensors"
    assert main(["collect", str(model_dir), str(data_file), "--out", str(whole), "-q"]) == 0
    args = ["collect", str(model_dir), str(data_file), "--out", str(out), "--checkpoint", str(ck),
            "--checkpoint-every", "1", "--overwrite"]

    def same_as_whole():
        assert_same_statistics(lora_da.Statistics.load(out), lora_da.Statistics.load(whole), exact_grad=False)

    _interrupt_resume_rerun(args, ck, [out], monkeypatch, capsys, same_as_whole)


def test_init_checkpoint_resumes_after_ctrl_c_and_a_rerun_returns_the_finished_pass(model_dir, data_file, tmp_path,
                                                                                   capsys, monkeypatch):
    # init's pass checkpoints as collect's does; the rerun of the finished command writes the
    # same adapter from the checkpoint's statistics
    from safetensors.torch import load_file

    ck, whole = tmp_path / "ck.safetensors", tmp_path / "whole.safetensors"
    out, stats = tmp_path / "adapter", tmp_path / "s.safetensors"
    assert main(["collect", str(model_dir), str(data_file), "--out", str(whole), "-q"]) == 0
    args = ["init", str(model_dir), str(data_file), "--n-pop", "100", "--rank", "2", "--gamma", "16", "--out", str(out),
            "--save-stats", str(stats), "--checkpoint", str(ck), "--checkpoint-every", "1", "--overwrite"]

    def adapter():
        assert_same_statistics(lora_da.Statistics.load(stats), lora_da.Statistics.load(whole), exact_grad=False)
        return load_file(out / "adapter_model.safetensors")

    first, again = _interrupt_resume_rerun(args, ck, [out, stats], monkeypatch, capsys, adapter)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


# -- fuzzing the JSONL reader (FUZZING.md, "The CLI's JSONL reader") ------------------------------

import os  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))

_json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, 2, -1, 10**30])
                 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
_json = st.recursive(_json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=8)


@st.composite
def jsonl_lines(draw) -> bytes:
    """One line of a data file: a valid sample, a sample with a wrong-typed or odd field, a
    lone surrogate, random JSON, deep nesting, raw bytes (non-UTF-8), or blank."""
    kind = draw(st.sampled_from(["valid", "valid", "field", "surrogate", "json", "deep", "bytes", "blank"]))
    if kind == "valid":
        return json.dumps({"text": draw(st.text(min_size=1, max_size=20).filter(str.strip)),
                           "label": draw(st.integers(0, 5))}).encode()
    if kind == "field":
        obj = {"text": draw(_json | st.text(max_size=8)), "label": draw(_json)}
        return json.dumps(obj, allow_nan=True).encode()
    if kind == "surrogate":
        return ('{"text": "a \\u%04x b", "label": 0}' % draw(st.integers(0xD800, 0xDFFF))).encode()
    if kind == "json":
        return json.dumps(draw(_json), allow_nan=True).encode()
    if kind == "deep":
        depth = draw(st.integers(500, 100_000))
        return ("[" * depth + "]" * depth).encode()
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=20)).replace(b"\n", b" ")
    return b"   "


def _decodes(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _row_ok(line: bytes) -> bool:
    """A blank line, or one the reader takes as a row (an object with a non-empty Unicode 'text')."""
    if not _decodes(line):
        return False
    if not line.strip():
        return True
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return False
    if not (isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip()):
        return False
    try:
        obj["text"].encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_fuzz_jsonl_reader(tmp_path):
    """Every data file either reads into non-empty Unicode texts and class indices 0..K-1
    (the first --max-samples of them, and the labels of the whole file), or is refused
    by a ValueError (or CLIError) whose one message names the file; nothing else escapes."""
    from lora_da.data import all_labels, infer_task, read_data
    from lora_da.errors import CLIError

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    counts = {"read": 0, "refused": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(lines=st.lists(jsonl_lines(), min_size=1, max_size=6), limit=st.integers(1, 6),
           task=st.sampled_from(["seq-cls", "causal-lm", None]))
    def check(lines, limit, task):
        path = tmp_path / "dätä.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            chosen = task or infer_task(str(path), str(model))
            texts, labels = read_data(str(path), chosen, limit)
            every = all_labels(str(path)) if chosen == "seq-cls" else None
        except (ValueError, CLIError) as e:
            assert str(path) in str(e) or "--task" in str(e), f"the message does not name the file: {e}"
            assert "\n" not in str(e)
            at = re.match(re.escape(str(path)) + r":(\d+):", str(e))
            if "not UTF-8" in str(e):  # the line named is the first that does not decode (not line 1)
                assert at, e
                n = int(at.group(1))
                assert not _decodes(lines[n - 1]) and all(_decodes(x) for x in lines[:n - 1]), (n, e)
            if "no 'label' field" in str(e) or "has 'label' fields" in str(e):  # a task refused: the rows are good
                assert all(_row_ok(x) for x in lines), e
            counts["refused"] += 1
            return
        assert 1 <= len(texts) <= limit
        for t in texts:
            assert isinstance(t, str) and t.strip()
            t.encode("utf-8")  # no lone surrogate reaches the tokenizer
        if chosen == "seq-cls":
            assert len(labels) == len(texts) and all(isinstance(v, int) and v >= 0 for v in labels)
            assert set(labels) <= every and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in every)
        counts["read"] += 1

    check()
    print(f"fuzz_jsonl_reader: {counts}")
    assert counts["read"] > 0 and counts["refused"] > 0


@pytest.mark.parametrize("rank", ["100000000000000000000", "9" * 45])
def test_a_rank_past_64_bits_is_a_one_line_error(rank, tmp_path, capsys):
    """Before the statistics are read: the core counts in 64 bits, and a larger --rank had
    ended in an OverflowError's traceback."""
    stats = tmp_path / "s.safetensors"
    stats.write_bytes(b"not read")
    assert main(["solve", str(stats), "--n-pop", "10", "--rank", rank,
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "--rank must be less than 2⁶³" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
