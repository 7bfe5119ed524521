"""The data a command reads: calibration texts and labels from a JSONL or text file,
the task they imply, the size of a classification head, and the batches a model is run on.

Kept below the command line so that the commands and the comparison read data the
same way without importing each other. Bad data is a ``ValueError`` naming the file and
the line; a choice only the user can make (the task, the number of classes) is a
:class:`lora_da.errors.CLIError` that names the flag to pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_da.errors import CLIError

# a larger classification head is almost surely a data error (a 10^7 label built a 6.6 GB head)
MAX_LABELS = 10_000


def read_data(path: str, task: str, limit: int | None = None) -> tuple[list[str], list[int] | None]:
    """Texts (and labels for seq-cls) from a JSONL or plain-text file: the first
    ``limit`` samples, read line by line (the rest of the file is never parsed)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    texts: list[str] = []
    labels: list[int] = []
    jsonl = p.suffix.lower() in (".jsonl", ".json", ".ndjson")
    if task == "seq-cls" and not jsonl:
        raise ValueError(f"{path}: seq-cls needs a JSONL file with 'text' and 'label' fields")
    for i, line in _lines(path):
        if limit is not None and len(texts) >= limit:
            break
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line.rstrip("\r\n"))
            continue
        text, label = _parse_jsonl_line(path, i, line, task)
        texts.append(text)
        if label is not None:
            labels.append(label)
    if not texts:
        raise ValueError(f"{path}: no sample found")
    return texts, (labels if task == "seq-cls" else None)


def all_labels(path: str) -> set[int]:
    """Every label of the whole file (its other fields unread past ``--max-samples``):
    the classification head's size comes from all the classes, not from the calibration
    slice (a file sorted by label would otherwise give a head too small)."""
    seen: set[int] = set()
    for i, line in _lines(path):
        if not line.strip():
            continue
        obj = _json_line(path, i, line)
        lab = obj.get("label") if isinstance(obj, dict) else None
        if isinstance(lab, bool) or not isinstance(lab, int) or lab < 0:
            raise ValueError(f"{path}:{i}: seq-cls needs a class index 0..K-1 in the 'label' field, got "
                             f"{json.dumps(lab)[:40]}")
        seen.add(lab)
    return seen


def _lines(path: str):
    """``(line number, text)`` of each line of ``path``, each line decoded on its own: a byte
    that is not UTF-8 is reported at its own line (a text-mode file decodes ahead in chunks,
    and named line 1 for a bad byte further on)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{i}: not UTF-8 text (convert the file to UTF-8)") from None


def _json_line(path: str, i: int, line: str):
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as e:  # bad JSON, nested past the limit
        raise ValueError(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None


def infer_task(data: str, model_dir: str) -> str:
    """``--task`` when it is not given: sequence classification when the data
    carry labels and the model is not a causal LM, causal LM when neither;
    anything else is ambiguous and refused with the flag to pass."""
    has_labels = False
    jsonl = Path(data).suffix.lower() in (".jsonl", ".json", ".ndjson") and Path(data).is_file()
    if jsonl:
        for i, line in _lines(data):  # the first row, checked: the task is read off it
            if line.strip():
                _parse_jsonl_line(data, i, line, "causal-lm")
                has_labels = "label" in json.loads(line)
                break
    try:
        archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        archs = []
    arch = ", ".join(archs) or "unknown architecture"
    causal = any("CausalLM" in a or "LMHead" in a for a in archs)
    classifier = any("ForSequenceClassification" in a for a in archs)
    if jsonl and ((has_labels and causal and not classifier) or (not has_labels and (classifier or not causal))):
        _check_rows(data)  # a malformed file is bad data (file:line), not a task to choose
    if has_labels and causal and not classifier:
        raise CLIError(
            f"{data} has 'label' fields but {model_dir} is a causal LM ({arch}): pass --task seq-cls to fit a "
            "classification head to the labels, or --task causal-lm to ignore them"
        )
    if has_labels:
        return "seq-cls"
    if classifier or not causal:
        raise CLIError(
            f"{model_dir} ({arch}) is not a causal LM and {data} has no 'label' field: give the data "
            "'label' fields (JSONL) for sequence classification, or pass --task causal-lm to train a language-model head"
        )
    return "causal-lm"


def _check_rows(path: str) -> None:
    """Every row of a JSONL file read as :func:`read_data` reads it; the first bad one raised."""
    for i, line in _lines(path):
        if line.strip():
            _parse_jsonl_line(path, i, line, "causal-lm")


def _parse_jsonl_line(path: str, i: int, line: str, task: str) -> tuple[str, int | None]:
    obj = _json_line(path, i, line)
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError(f"{path}:{i}: each line must be an object with a string 'text' field")
    if not obj["text"].strip():
        # an empty text tokenizes to no token at all and fails deep inside the model
        raise ValueError(f"{path}:{i}: the 'text' field is empty")
    try:
        obj["text"].encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escape: a lone surrogate, which no tokenizer takes
        raise ValueError(f"{path}:{i}: the 'text' field holds a lone surrogate ({obj['text'][e.start]!a}), which is not "
                         "Unicode text; remove or pair it") from None
    if task != "seq-cls":
        return obj["text"], None
    lab = obj.get("label")
    if isinstance(lab, bool) or not isinstance(lab, int):
        raise ValueError(f"{path}:{i}: seq-cls needs an integer 'label' field, got {json.dumps(lab)[:40]}")
    if lab < 0:
        raise ValueError(f"{path}:{i}: label {lab} is negative; labels are class indices 0..K-1")
    return obj["text"], lab


def num_labels(path: str, labels, model_dir: str, requested: int | None = None) -> int:
    """K, the size of the classification head, for the labels of the whole file: ``--num-labels``
    when given; a sequence classifier's own head (its config.json); else max label + 1 — at
    least 2 (transformers takes a 1-output head for regression) and refused above
    MAX_LABELS unless the model's config.json declares that many classes. A head that
    cannot hold every label is refused, before any model is loaded."""
    k = max(labels) + 1
    declared, classifier = None, False
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        declared = cfg.get("num_labels", len(cfg["id2label"]) if isinstance(cfg.get("id2label"), dict) else None)
        classifier = any("ForSequenceClassification" in str(a) for a in cfg.get("architectures") or [])
    except (OSError, ValueError, RecursionError, AttributeError):
        pass
    if not (isinstance(declared, int) and not isinstance(declared, bool) and declared > 0):
        declared = None
    if requested is not None:
        if requested < 2:
            raise CLIError(f"--num-labels {requested}: a classifier needs at least 2 classes (a 1-output head is "
                           "regression in transformers)")
        if k > requested:
            raise CLIError(f"{path}: label {k - 1} does not fit --num-labels {requested} (labels are 0..K-1): pass "
                           f"--num-labels {k} or more")
        if classifier and declared is not None and declared != requested:
            raise CLIError(f"--num-labels {requested} disagrees with the {declared}-way head of {model_dir} "
                           "(config.json): pass the model's own number of classes, or a model without a head")
        return requested
    if classifier and declared is not None:
        if k > declared:
            raise CLIError(f"{path}: label {k - 1} does not fit the {declared}-way classification head of {model_dir} "
                           "(config.json num_labels): the data and the model's head disagree")
        return declared
    if k < 2:
        raise CLIError(f"{path}: every label is 0, which would build a 1-output head (regression in transformers): "
                       "pass --num-labels K with the number of classes")
    if k <= MAX_LABELS:
        return k
    if declared is not None and k <= declared:
        return declared
    raise ValueError(
        f"{path}: label {k - 1} asks for a {k}-way classification head; labels must be class indices 0..K-1 with "
        f"K ≤ {MAX_LABELS}, or ≤ the num_labels of the model's config.json ({declared if declared is not None else 'none'})"
    )


def make_batches(tokenizer, texts, labels, batch_size: int, max_length: int, task: str) -> list[dict]:
    """Padded, truncated batches of ``batch_size`` texts, with the labels the task's loss
    reads: the class indices (seq-cls), or the input ids with padding set to -100."""
    import torch

    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if task == "seq-cls":
            batch["labels"] = torch.tensor(labels[i : i + batch_size], dtype=torch.long)
        else:
            lab = enc["input_ids"].clone()
            lab[enc["attention_mask"] == 0] = -100
            batch["labels"] = lab
        batches.append(batch)
    return batches

