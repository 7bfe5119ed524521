"""The ``lora-da`` command line.

Subcommands::

    lora-da collect MODEL_DIR DATA --out STATS.safetensors   # one pass → statistics file
    lora-da solve STATS --n-pop N --out OUT                  # statistics → PEFT adapter / state dict
    lora-da init MODEL_DIR DATA --n-pop N --out OUT          # collect, then solve
    lora-da report STATS_OR_OUTDIR                           # per-module diagnostics table
    lora-da demo                                             # offline demo (MiniLM + VADER lexicon)

User errors print one line, ``lora-da: error: ...``, on stderr and give a
non-zero exit status; outputs are written to a temporary path in the same
directory and renamed into place, so a failure leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lora_da.adapters import REPORT_NAME, add_model_card_section, state_dict_of  # REPORT_NAME: one name for the API and the CLI
from lora_da.files import follow_umask

PROG = "lora-da"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in a saved adapter's weights


class CLIError(Exception):
    """A user error detected by the command line itself."""


# -- data and model ------------------------------------------------------------------


# a larger classification head is almost surely a data error (a 10^7 label built a 6.6 GB head)
MAX_LABELS = 10_000


def _read_data(path: str, task: str, limit: int | None = None) -> tuple[list[str], list[int] | None]:
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
    i = 0
    try:
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
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
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{i + 1}: not UTF-8 text (convert the file to UTF-8)") from None
    if not texts:
        raise ValueError(f"{path}: no sample found")
    return texts, (labels if task == "seq-cls" else None)


def _all_labels(path: str) -> set[int]:
    """Every label of the whole file (its other fields unread past ``--max-samples``):
    the classification head's size comes from all the classes, not from the calibration
    slice (a file sorted by label would otherwise give a head too small)."""
    seen: set[int] = set()
    i = 0
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
                lab = obj.get("label") if isinstance(obj, dict) else None
                if isinstance(lab, bool) or not isinstance(lab, int) or lab < 0:
                    raise ValueError(f"{path}:{i}: seq-cls needs a class index 0..K-1 in the 'label' field, got "
                                     f"{json.dumps(lab)[:40]}")
                seen.add(lab)
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{i + 1}: not UTF-8 text (convert the file to UTF-8)") from None
    return seen


def _infer_task(data: str, model_dir: str) -> str:
    """``--task`` when it is not given: sequence classification when the data
    carry labels and the model is not a causal LM, causal LM when neither;
    anything else is ambiguous and refused with the flag to pass."""
    has_labels = False
    if Path(data).suffix.lower() in (".jsonl", ".json", ".ndjson") and Path(data).is_file():
        try:
            with open(data, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        try:
                            first = json.loads(line)
                        except (ValueError, RecursionError):  # bad JSON, nested past the limit
                            break  # _read_data reports it with its line number
                        has_labels = isinstance(first, dict) and "label" in first
                        break
        except UnicodeDecodeError:
            pass  # _read_data names the file and the line
    try:
        archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        archs = []
    arch = ", ".join(archs) or "unknown architecture"
    causal = any("CausalLM" in a or "LMHead" in a for a in archs)
    classifier = any("ForSequenceClassification" in a for a in archs)
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


def _parse_jsonl_line(path: str, i: int, line: str, task: str) -> tuple[str, int | None]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
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


def _num_labels(path: str, labels, model_dir: str, requested: int | None = None) -> int:
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


def _check_model_dir(model_dir: str) -> None:
    p = Path(model_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")


def _load_model(model_dir: str, task: str, num_labels: int | None, device: str, quiet: bool = False, seed: int = 0):
    """The model and tokenizer, and the parameters the model had to initialize
    (a classification head), from ``seed``: the statistics depend on them, so
    they are kept and written into the adapter (PEFT ``modules_to_save``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{model_dir}: the tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)  # what from_pretrained initializes (a new head) is drawn from this
    new_weights: dict = {}
    if task == "seq-cls":
        kw = {"num_labels": num_labels} if num_labels else {}
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, output_loading_info=True, **kw)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        state = model.state_dict()
        fresh = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
        for key in sorted(fresh):
            if key in state:
                t = state[key].detach().cpu()
                new_weights[key] = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).numpy().copy()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    return model, tokenizer, new_weights


def _check_device(choice: str, option: str) -> None:
    """Refuse a device this machine lacks now, not after the data and model are loaded."""
    import torch

    if choice in ("auto", "host"):
        return
    try:
        dev = torch.device(choice)
    except (RuntimeError, ValueError):
        also = ", host" if option == "--solve-device" else ""
        raise CLIError(f"{option} must be auto{also} or a torch device (cpu, cuda, cuda:1), got {choice!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"{option} {choice}: no CUDA GPU is available on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"{option} {choice}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"{option} {choice}: MPS is not available on this machine")


def _load_model_checked(model_dir: str, *args, **kwargs):
    """:func:`_load_model`, with a model directory that transformers cannot read (corrupted
    weights, a broken tokenizer) reported in one line instead of the library's traceback."""
    try:
        return _load_model(model_dir, *args, **kwargs)
    except (CLIError, ValueError, OSError):
        raise
    except Exception as e:  # safetensors, tokenizers and torch each raise their own types here
        msg = " ".join(str(e).split())[:300]
        raise CLIError(f"{model_dir}: could not load the model ({type(e).__name__}: {msg})") from e


class _Writing:
    """Turn a failed write of ``path`` (a full disk: OSError; safetensors: its own
    SafetensorError) into one line that names the file; the writers themselves
    remove their temporary files, so nothing half-written is left."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        from safetensors import SafetensorError

        if e is not None and isinstance(e, (OSError, SafetensorError)):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
            raise CLIError(f"could not write {self.path}: {reason}; nothing was written there") from e
        return False


def _make_batches(tokenizer, texts, labels, batch_size: int, max_length: int, task: str) -> list[dict]:
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


def _parse_targets(s: str | None):
    if s is None or s == "all-linear":
        return "all-linear"
    names = [t.strip() for t in s.split(",") if t.strip()]
    if not names:
        raise ValueError("--targets: empty list")
    return names


# -- collect / solve -------------------------------------------------------------------


def _positive_int(name):
    def conv(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {v}")
        return v

    return conv


def _gamma_arg(s: str):
    if s == "auto":
        return s
    try:
        return float(s)  # its range is the core's to check (_validate_solve_options), like every other option's
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gamma must be a number or 'auto', got {s!r}") from None


def _number(s: str):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    return int(v) if v.is_integer() else v


def _collect(args, search: bool = False):
    """Statistics of the calibration data; with ``search`` (``--gamma auto``) the
    last fifth of the samples is held back from them, and the model, the
    calibration batches and the held-back batches are returned too."""
    from lora_da.collect import collect_statistics
    from lora_da.errors import LoraDAError

    _check_model_dir(args.model_dir)
    _check_device(args.device, "--device")
    if args.task is None:
        args.task = _infer_task(args.data, args.model_dir)
    if args.task == "seq-cls" and args.token_mask == "labels":
        raise CLIError("--token-mask labels keeps the tokens whose next-token label is set (a causal LM); seq-cls has "
                       "one class label per sample: use --token-mask attention")
    texts, labels = _read_data(args.data, args.task, args.max_samples)
    targets = _parse_targets(args.targets)
    requested = getattr(args, "num_labels", None)
    if requested is not None and args.task != "seq-cls":
        raise CLIError(f"--num-labels sizes a classification head: it needs --task seq-cls, not {args.task}")
    num_labels = _num_labels(args.data, _all_labels(args.data), args.model_dir, requested) if labels else None
    if search:
        k = max(1, len(texts) // 5)
        if len(texts) - k < 1:
            raise CLIError(f"--gamma auto holds back a fifth of the samples to score γ; {args.data} has only {len(texts)}")
        texts, held_texts = texts[:-k], texts[-k:]
        labels, held_labels = (labels[:-k], labels[-k:]) if labels is not None else (None, None)
    model, tokenizer, new_weights = _load_model_checked(args.model_dir, args.task, num_labels, args.device, args.quiet,
                                                        args.seed)
    _check_head_not_targeted(model, targets, new_weights)
    batches = _make_batches(tokenizer, texts, labels, args.batch_size, args.max_length, args.task)
    checkpoint = getattr(args, "checkpoint", None)
    try:
        stats = collect_statistics(
            model,
            batches,
            targets,
            token_mask=args.token_mask,
            output_fisher=args.output_fisher or "diagonal",
            max_samples=args.max_samples,
            progress=not args.quiet,
            checkpoint_path=checkpoint,
            checkpoint_every=args.checkpoint_every if checkpoint else None,
        )
    except (LoraDAError, CLIError, OSError, KeyboardInterrupt):
        raise
    except Exception as e:  # the model's own failure (an IndexError past its positions, ...): one line
        raise CLIError(_model_failure(args, model, batches, e)) from e
    stats.config.setdefault("task", args.task)
    stats.config["seed"] = args.seed
    stats.new_weights = new_weights
    tokens = sum(f.tokens for f in stats.input_factors.values())
    groups = len(stats.input_factors)
    print(
        f"lora-da: collected {len(stats.modules)} modules ({groups} input groups), "
        f"{stats.n_samples} samples, {tokens} tokens (summed over input groups)"
    )
    if search:
        held = _make_batches(tokenizer, held_texts, held_labels, args.batch_size, args.max_length, args.task)
        return stats, (model, batches, held)
    return stats


def _model_failure(args, model, batches, e: Exception) -> str:
    """One line for an exception the model raised on the calibration data, with the
    likely cause: sequences longer than its position table."""
    msg = " ".join(str(e).split())[:200]
    longest = max((b["input_ids"].shape[1] for b in batches), default=0)
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    hint = ""
    if isinstance(limit, int) and longest > limit:
        hint = (f"; the batches hold {longest} tokens but the model has {limit} positions: pass --max-length {limit} "
                "or less")
    return f"{args.model_dir}: the model failed on {args.data} ({type(e).__name__}: {msg}){hint}"


def _check_head_not_targeted(model, targets, new_weights: dict) -> None:
    """A classification head the model initializes is saved whole (PEFT
    ``modules_to_save``); PEFT's loader drops the LoRA A/B of a module that is also
    saved whole, so a head in ``--targets`` would lose its solve without a word."""
    from lora_da.collect import resolve_targets

    heads = {key.rsplit(".", 1)[0] for key in new_weights}
    _refuse_head_targets(sorted(heads & set(resolve_targets(model, targets))))


def _refuse_head_targets(both: list[str]) -> None:
    if both:
        raise CLIError(
            f"--targets selects {', '.join(both)}, the classification head the model initializes, which the adapter "
            "saves whole (PEFT modules_to_save); PEFT would drop its LoRA A/B. Leave it out of --targets"
        )


def _search_gamma(args, stats, model, calibration, held):
    """``--gamma auto``: :func:`lora_da.gamma.search_gamma` on one PeftModel whose
    trainable weights are reset before each candidate (no copy of the model)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_da.gamma import search_gamma, unit_state_dict
    from lora_da.pipeline import compute_init

    import warnings

    from lora_da.quality import PoorInitWarning

    config = _config(args, stats)
    with warnings.catch_warnings():  # the final solve (_solve) says it, once
        warnings.simplefilter("ignore", PoorInitWarning)
        unit = unit_state_dict(compute_init(stats, config, progress=False, device=_solve_device(args.solve_device)),
                               config.gamma)
    peft_model = get_peft_model(model, LoraConfig(
        r=config.rank, lora_alpha=args.lora_alpha, use_rslora=args.rslora, lora_dropout=0.0,
        target_modules=sorted(stats.modules), modules_to_save=_modules_to_save(stats),
        fan_in_fan_out=any(stats.modules[n].kind == "conv1d" for n in stats.modules)))
    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    def fresh():
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        return peft_model

    print(f"lora-da: choosing γ on {sum(len(b['input_ids']) for b in held)} held-back samples "
          f"after {GAMMA_SEARCH_STEPS} AdamW steps (lr {GAMMA_SEARCH_LR:g}) on the calibration batches")
    found = search_gamma(fresh, unit, calibration, held, config, steps=GAMMA_SEARCH_STEPS, lr=GAMMA_SEARCH_LR,
                         seed=args.seed)
    print(found.describe())
    print(f"lora-da: chose γ = {found.best:g}")
    if found.verdict():
        print(f"lora-da: note: {found.verdict()}")
    return found


GAMMA_SEARCH_STEPS = 5
GAMMA_SEARCH_LR = 5e-4


def _config(args, stats=None):
    from lora_da.init import LoraDAConfig

    if args.n_pop is None:
        raise ValueError("--n-pop is required (the number of fine-tuning samples)")
    fisher = args.output_fisher
    if fisher is None:
        fisher = (stats.config.get("output_fisher") if stats is not None else None) or "diagonal"
    return LoraDAConfig(
        n_pop=args.n_pop,
        rank=args.rank,
        alpha=args.alpha,
        beta=args.beta,
        damping=args.damping,
        gamma=1.0 if args.gamma == "auto" else args.gamma,  # auto: searched after the collection
        normalize=not args.no_normalize,
        method=args.method,
        output_fisher=fisher,
        token_mask=getattr(args, "token_mask", None) or "attention",
    )


def _validate_solve_options(args) -> None:
    """Every solve option, before any statistics or model is read: a bad γ, β, α or
    damping used to surface only after the whole collection pass."""
    import math

    import numpy as np

    from lora_da._core import solve

    config = _config(args)
    kw = dict(config.solve_kwargs(), rank=1, method="auto")
    # the core's own scalar rules (its check runs before any work), on a 2 × 2 problem:
    # one definition of each domain, not a copy here that could drift
    solve(np.eye(2), np.ones(2), np.zeros((2, 2)), **kw)
    _solve_device(args.solve_device)
    lora_alpha = getattr(args, "lora_alpha", None)
    if lora_alpha is not None and not (math.isfinite(lora_alpha) and lora_alpha > 0):
        # PEFT takes any float; NaN or a negative scale gives NaN or sign-flipped logits
        raise CLIError(f"--lora-alpha must be a finite number > 0, got {lora_alpha}")


def _floats(a) -> list[float]:
    import numpy as np

    return [float(v) for v in np.asarray(a, dtype=float).ravel()]


def _report_dict(stats, inits, config) -> dict:
    """The report (SPEC §5, "The report"): the same schema as the API's ``lora_da_report.json``."""
    from lora_da.report import build_report

    return build_report(inits, config, stats=stats)


def _task_type(args, stats) -> str | None:
    task = getattr(args, "task", None)
    if task is None:
        task = stats.config.get("task")
    if task is None:
        cls = stats.model.get("class", "")
        task = "seq-cls" if "SequenceClassification" in cls else ("causal-lm" if "CausalLM" in cls else None)
    return {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(task)


def _modules_to_save(stats) -> list[str] | None:
    """The modules owning ``stats.new_weights`` (``classifier.weight`` → ``classifier``)."""
    mods = sorted({key.rsplit(".", 1)[0] for key in stats.new_weights})
    return mods or None


def _check_out_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such directory for the output")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """Before the pass: the output is written to a temporary file beside it, so that
    directory must take a new file (a read-only or foreign directory used to be found
    only after the whole collection)."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
    except OSError as e:
        raise CLIError(f"cannot write {out}: {e.strerror or e} in {parent}; choose a writable --out") from None
    os.close(fd)
    os.unlink(probe)


def _replace(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing an existing ``out`` (checked earlier)."""
    if out.is_dir() and not out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / "x", out)  # the old adapter back, not stranded in a hidden directory
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write_outputs(args, stats, inits, config) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from lora_da.adapters import check_zero_gradients

    out = Path(args.out)
    _refuse_head_targets(sorted(set(inits) & set(_modules_to_save(stats) or ())))
    zero = check_zero_gradients(inits, warn=False)  # refused when every module's is zero
    if zero:
        print(f"lora-da: warning: the mean gradient is zero in {len(zero)} of {len(inits)} modules "
              f"({', '.join(zero[:5])}{' ...' if len(zero) > 5 else ''}): their B is 0", file=sys.stderr)
    report = _report_dict(stats, inits, config)
    found = getattr(args, "gamma_search", None)
    if found is not None:
        report["gamma_search"] = {"chosen": found.best, "steps": GAMMA_SEARCH_STEPS, "lr": GAMMA_SEARCH_LR,
                                  "table": [{"gamma": g, "loss_at_0": a, "loss_after": b} for g, a, b in found.table],
                                  "at_edge": found.at_edge(), "within_noise": found.within_noise(),
                                  "verdict": found.verdict() or None,
                                  "next_grid": found.next_grid() if found.at_edge() else None}
    if args.format == "peft":
        from peft import LoraConfig

        tensors = state_dict_of(inits, prefix=PEFT_PREFIX)
        # The head the statistics were taken with travels with the adapter (PEFT's key names).
        for key, w in stats.new_weights.items():
            tensors[f"{PEFT_PREFIX}{key}"] = torch.from_numpy(np.ascontiguousarray(w))
        conv1d = any(stats.modules[n].kind == "conv1d" for n in inits)
        lcfg = LoraConfig(
            r=config.rank,
            lora_alpha=args.lora_alpha,
            use_rslora=args.rslora,
            target_modules=sorted(inits),  # full names: exactly the solved modules
            init_lora_weights=True,
            fan_in_fan_out=conv1d,
            task_type=_task_type(args, stats),
            modules_to_save=_modules_to_save(stats),
        )
        lcfg.base_model_name_or_path = stats.model.get("name_or_path") or None
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            follow_umask(tmp / ADAPTER_WEIGHTS)  # safetensors writes 0600 whatever the umask
            lcfg.save_pretrained(str(tmp))
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
            add_model_card_section(str(tmp), report)
            follow_umask(tmp)  # mkdtemp's 0700 would stay on the renamed adapter folder
            _replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"lora-da: wrote PEFT adapter ({len(inits)} modules) to {out}")
    else:
        tensors = state_dict_of(inits)
        for key, w in stats.new_weights.items():  # load into the base model (strict=False) before wrapping it
            tensors[key] = torch.from_numpy(np.ascontiguousarray(w))
        rep = _state_dict_report_path(out)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            save_file(tensors, str(stage / out.name), metadata={"format": "pt", "lora_da": "state-dict"})
            follow_umask(stage / out.name)  # safetensors writes 0600 whatever the umask
            (stage / rep.name).write_text(json.dumps(report, indent=2))
            _install_together([(stage / out.name, out), (stage / rep.name, rep)])
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        print(f"lora-da: wrote state dict ({len(inits)} modules) to {out}; report {rep}")


def _install_together(moves: list[tuple[Path, Path]]) -> None:
    """Rename each staged file onto its destination, all or none: the destinations
    already there are first set aside, and put back if any rename fails, so a state dict
    is never left beside the report of another solve."""
    aside = Path(tempfile.mkdtemp(prefix=".lora-da-old-", dir=moves[0][1].parent))
    kept: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for i, (_, dst) in enumerate(moves):
            if dst.exists():
                os.replace(dst, aside / str(i))
                kept.append((aside / str(i), dst))
        for src, dst in moves:
            os.replace(src, dst)
            placed.append(dst)
    except BaseException:
        for dst in placed:
            dst.unlink(missing_ok=True)
        for old, dst in kept:
            os.replace(old, dst)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _state_dict_report_path(out: Path) -> Path:
    return out.parent / (out.stem + "." + REPORT_NAME)


def _prepare_out(args) -> None:
    out = Path(args.out)
    outputs = [(out, "adapter" if args.format == "peft" else "state-dict")]
    if args.format == "state-dict":
        outputs.append((_state_dict_report_path(out), "report"))
    if getattr(args, "save_stats", None):
        outputs.append((Path(args.save_stats), "statistics"))
    _guard_outputs(args, outputs)
    _check_out_free(out, args.overwrite)
    if getattr(args, "save_stats", None):
        _check_writable(Path(args.save_stats))  # written after the pass: its directory is checked before it


# -- what --overwrite may replace ------------------------------------------------------------

# the entries of an adapter directory written by `lora-da solve/init`
_ADAPTER_ENTRIES = {ADAPTER_WEIGHTS, "adapter_config.json", REPORT_NAME, "README.md"}
_INPUT_ARGS = {"model_dir": "the model directory", "data": "the data file", "stats": "the statistics file"}


def _input_paths(args) -> list[tuple[str, Path]]:
    return [(what, Path(getattr(args, k))) for k, what in _INPUT_ARGS.items() if getattr(args, k, None)]


def _overlaps(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same path, or one lies inside the other (after symlinks)."""
    def real(p: Path) -> Path:
        try:
            return p.resolve()
        except (OSError, RuntimeError):  # a symlink loop: compare the spelled-out paths
            return p.absolute()

    a, b = real(a), real(b)
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _is_lora_da_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(report, dict) and report.get("format") == "lora-da-report"


def _safetensors_metadata(path: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own error types on a file that is not its own
        return None


def _is_statistics_header(meta: dict | None) -> bool:
    from lora_da.statistics import FORMAT

    try:
        header = json.loads(meta["lora_da"])  # a state dict's "lora_da" is the string "state-dict"
    except (TypeError, KeyError, ValueError, RecursionError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT


def _written_by_lora_da(path: Path, kind: str) -> str | None:
    """None when ``path`` is an output of ``kind`` that lora-da wrote, else why not."""
    if path.is_symlink():
        return "it is a symbolic link"
    if kind == "adapter":
        if not path.is_dir():
            return "it is not a directory"
        if not (path / REPORT_NAME).is_file() or not _is_lora_da_report(path / REPORT_NAME):
            return f"it has no lora-da {REPORT_NAME}"
        foreign = sorted(e.name for e in path.iterdir() if e.name not in _ADAPTER_ENTRIES)
        if foreign:
            return f"it holds files lora-da does not write ({', '.join(foreign[:3])})"
        return None
    if not path.is_file():
        return "it is not a regular file"
    if kind == "report":
        return None if _is_lora_da_report(path) else "it is not a lora-da report"
    meta = _safetensors_metadata(path)
    if kind == "statistics":
        return None if _is_statistics_header(meta) else "it is not a lora-da statistics file"
    # a state dict: marked by lora-da since issue 10; before that, recognized by its report beside it
    if meta is not None and (meta.get("lora_da") == "state-dict" or _is_lora_da_report(_state_dict_report_path(path))):
        return None
    return "it is not a lora-da state dict"


def _guard_outputs(args, outputs: list[tuple[Path, str]]) -> None:
    """Before any work: no output may be (or contain, or lie inside) an input or
    another output, and ``--overwrite`` replaces only what lora-da itself wrote."""
    inputs = _input_paths(args)
    for i, (out, kind) in enumerate(outputs):
        for what, inp in inputs:
            if _overlaps(out, inp):
                raise CLIError(f"the output {out} overlaps {what} {inp}: choose an output path outside every input")
        for other, _ in outputs[i + 1 :]:
            if _overlaps(out, other):
                raise CLIError(f"the outputs {out} and {other} overlap")
        if out.exists() or out.is_symlink():
            if not args.overwrite:
                raise ValueError(f"{out} already exists (pass --overwrite to replace it)")
            why = _written_by_lora_da(out, kind)
            if why is not None:
                raise CLIError(f"--overwrite refuses to replace {out}: {why}; lora-da only replaces a {kind} it wrote")


def _solve_device(choice: str):
    """``--solve-device`` → the ``device`` of :func:`lora_da.compute_init` (None: the host routes)."""
    import torch

    if choice == "host":
        return None
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else None
    _check_device(choice, "--solve-device")
    return torch.device(choice)


def _solve(args, stats):
    from lora_da.pipeline import compute_init

    import warnings

    from lora_da.quality import PoorInitWarning

    config = _config(args, stats)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # said below, one line per module, instead of Python's warning with a source line
        warnings.simplefilter("ignore", PoorInitWarning)
        inits = compute_init(stats, config, progress=not args.quiet, device=_solve_device(args.solve_device))
    print(f"lora-da: solved {len(inits)} modules in {time.perf_counter() - t0:.2f} s (rank {config.rank}, γ {config.gamma:g})")
    # on stdout with the other progress lines: stderr carries a failed command's one error line
    poor = {name: init.warnings for name, init in inits.items() if init.warnings}
    for name, msgs in poor.items():
        for msg in msgs:
            print(f"lora-da: warning: poor init: {name}: {msg}")
    if poor:
        print(f"lora-da: warning: {len(poor)} of {len(inits)} modules have a poor init (SPEC §5); the report lists them")
    return inits, config


# -- report ------------------------------------------------------------------------------


def _fmt(v, spec=".2e"):
    return "-" if v is None else format(v, spec)


def _print_table(report: dict) -> None:
    rows = []
    for name, r in report["modules"].items():
        ev = r.get("eigenvalues") or []
        lam = f"{ev[0]:.3e}..{ev[-1]:.3e}" if ev else "-"
        rows.append(
            [
                name,
                str(r.get("n", "-")),
                str(r.get("m", "-")),
                str(r.get("method", "-")),
                _fmt(r.get("residual")),
                _fmt(r.get("gap")),
                lam,
                _fmt(r.get("sigma")),
                _fmt(r.get("c")),
                _fmt(r.get("seconds"), ".3f"),
            ]
        )
    head = ["module", "n", "m", "method", "residual", "gap", "λ_1..λ_r", "σ", "c", "time[s]"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for name, r in report["modules"].items():
        for note in r.get("notes") or []:
            print(f"note: {name}: {note}")
    poor = _poor_modules(report)
    for name, msgs in poor.items():
        for msg in msgs:
            print(f"warning: poor init: {name}: {msg}")
    if poor:
        print(f"lora-da report: {len(poor)} of {len(report['modules'])} modules have a poor init (warnings above; "
              "SPEC §5, 'A poor init')")


def _poor_modules(report: dict) -> dict[str, list[str]]:
    """``{module: warnings}`` for the modules whose init is poor: the report's own
    ``warnings`` (version 2), else judged from its eigenvalues (a version-1 report)."""
    from lora_da.quality import assess

    out = {}
    for name, r in report["modules"].items():
        msgs = r.get("warnings")
        if msgs is None:
            msgs = assess(r.get("eigenvalues") or [], r.get("gap"), r.get("omega_norm"))
        if msgs:
            out[name] = list(msgs)
    return out


def _pyplot():
    """matplotlib's pyplot on a file backend, or an error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'lora-da[plot]' (or pip install matplotlib)") from None
    return plt


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    """``model.layers.12.self_attn.q_proj`` → ``(12, "q_proj")``."""
    numbers = [int(p) for p in name.split(".") if p.isdigit()]
    return (numbers[0] if numbers else None), name.rsplit(".", 1)[-1]


def _figure(report: dict):
    """One panel per projection type. In it, for each module (coloured by layer), how
    far each of its bottom eigenvalues lies below the next one past the cut,
    ``(λ_{r+1} − λ_i) / ‖Ω‖₂`` for i = 1..r, on a log scale: the last point is the gap
    at the cut, which a plot of λ_i itself hides when it is 1e-11 of ‖Ω‖. The dashed line
    is the poor-gap threshold (SPEC §5); a module with a poor init gets a red ×, and an
    eigenvalue λ_i ≥ 0 (r past the informative directions) an open marker."""
    import numpy as np

    from lora_da.quality import POOR_GAP_REL

    plt = _pyplot()
    poor = _poor_modules(report)
    kinds: dict[str, list] = {}
    for name, r in report["modules"].items():
        layer, kind = _layer_and_kind(name)
        kinds.setdefault(kind, []).append((layer, name, r))
    layers = [layer for rows in kinds.values() for layer, _, _ in rows if layer is not None]
    lo, hi = (min(layers), max(layers)) if layers else (0, 1)
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(lo, max(hi, lo + 1))
    ncols = min(4, len(kinds)) or 1
    nrows = -(-len(kinds) // ncols) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.2, 3.0 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    floor = 1e-17  # below float64 resolution relative to ‖Ω‖: a gap of exactly 0 is drawn here
    rank = report.get("config", {}).get("rank")
    for ax, (kind, rows) in zip(axes.flat, sorted(kinds.items())):
        poor_x, poor_y = [], []
        for layer, name, r in sorted(rows, key=lambda t: (t[0] is None, t[0] or 0, t[1])):
            ev = np.asarray(r.get("eigenvalues") or [], dtype=float)
            nxt = r.get("next_eigenvalue")
            if not len(ev) or nxt is None:
                continue
            scale = r.get("omega_norm") or max(np.abs(ev).max(), abs(nxt)) or 1.0
            d = np.maximum((nxt - ev) / scale, floor)
            i = np.arange(1, len(ev) + 1)
            color = cmap(norm(layer)) if layer is not None else "0.4"
            ax.plot(i, d, color=color, linewidth=0.8)
            neg = ev < 0
            ax.plot(i[neg], d[neg], linestyle="none", marker="o", markersize=2.5, color=color)
            ax.plot(i[~neg], d[~neg], linestyle="none", marker="o", markersize=3.5, markerfacecolor="none",
                    color=color)
            if name in poor:
                poor_x.append(len(ev))
                poor_y.append(d[-1])
        ax.set_yscale("log")
        ax.axhline(POOR_GAP_REL, color="crimson", linewidth=0.8, linestyle="--", label="poor-gap threshold")
        ks = {len(r.get("eigenvalues") or []) for _, _, r in rows} - {0}
        cut = rank if rank else (max(ks) if ks else None)
        if cut:
            ax.axvline(cut + 0.5, color="crimson", linewidth=0.8, linestyle=":", label="the cut")
        if poor_x:
            ax.plot(poor_x, poor_y, linestyle="none", marker="x", markersize=7, color="crimson", label="poor init")
        n_poor = sum(n in poor for _, n, _ in rows)
        ax.set_title(f"{kind} ({len(rows)} modules" + (f", {n_poor} poor)" if n_poor else ")"), fontsize=9)
        ax.set_xlabel("i", fontsize=8)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel("(λ_r+1 − λ_i) / ‖Ω‖₂", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    if layers:
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=[a for a in axes.flat if a.get_visible()], label="layer", shrink=0.8)
    fig.suptitle(f"LoRA-DA: distance of λ_1..λ_r below λ_r+1 (last point: the gap at the cut r = {rank or '?'}); "
                 "open: λ_i ≥ 0, red ×: poor init", fontsize=9)
    return fig


def _plot(report: dict, path: str) -> None:
    plt = _pyplot()
    fig = _figure(report)
    target = Path(path)
    # savefig writes in place: a full disk would leave a truncated image at --plot
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".png", dir=target.parent)
    os.close(fd)
    try:
        with _Writing(path):
            fig.savefig(tmp, dpi=120)
            follow_umask(tmp)
            os.replace(tmp, target)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"lora-da: wrote {path}")


def _load_report(path: Path) -> dict | None:
    cand = None
    if path.is_dir():
        cand = path / REPORT_NAME
        if not cand.is_file():
            raise FileNotFoundError(f"{path}: directory without {REPORT_NAME}")
    elif path.suffix == ".json":
        cand = path
    if cand is None:
        return None
    try:
        report = json.loads(cand.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nested past the recursion limit
        raise ValueError(f"{cand}: not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
    if not isinstance(report, dict) or "modules" not in report:
        raise ValueError(f"{cand}: not a lora-da report")
    _check_report_shape(cand, report)
    return report


_REPORT_NUMBERS = ("next_eigenvalue", "gap", "residual", "sigma", "c", "seconds", "omega_norm")


def _check_report_shape(path: Path, report: dict) -> None:
    """Every field the table and the plot read has the type they expect, so a report
    edited or produced elsewhere gives one line, not a TypeError from format()."""

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def bad(what: str, v) -> CLIError:
        return CLIError(f"{path}: not a lora-da report: {what}, got {json.dumps(v)[:60]}")

    if not isinstance(report.get("config", {}), dict):
        raise bad("'config' must be an object", report["config"])
    mods = report["modules"]
    if not isinstance(mods, dict):
        raise bad("'modules' must be an object", mods)
    for name, r in mods.items():
        if not isinstance(r, dict):
            raise bad(f"module {name!r} must be an object", r)
        for key in _REPORT_NUMBERS:
            if r.get(key) is not None and not number(r[key]):
                raise bad(f"module {name!r}: {key!r} must be a number", r[key])
        ev = r.get("eigenvalues")
        if ev is not None and not (isinstance(ev, list) and all(number(v) for v in ev)):
            raise bad(f"module {name!r}: 'eigenvalues' must be a list of numbers", ev)
        for key in ("notes", "warnings"):
            v = r.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise bad(f"module {name!r}: {key!r} must be a list of strings", v)


# -- subcommands ---------------------------------------------------------------------------


def cmd_collect(args) -> int:
    out = Path(args.out)
    _guard_outputs(args, [(out, "statistics")])
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such directory for the output")
    _check_writable(out)
    _check_checkpoint_arg(args, [out])
    stats = _collect(args)
    with _Writing(out):
        stats.save(out)
    print(f"lora-da: wrote statistics to {out}")
    return 0


def _no_auto_gamma(args) -> None:
    if args.gamma == "auto":
        raise CLIError("--gamma auto trains briefly on held-back data, so it needs the model: use "
                       "'lora-da init MODEL_DIR DATA --gamma auto'")


def cmd_solve(args) -> int:
    from lora_da.statistics import Statistics

    _no_auto_gamma(args)
    if not Path(args.stats).is_file():
        raise FileNotFoundError(f"{args.stats}: no such statistics file")
    _validate_solve_options(args)
    _prepare_out(args)
    stats = Statistics.load(args.stats)
    _refuse_head_targets(sorted(set(stats.modules) & set(_modules_to_save(stats) or ())))
    inits, config = _solve(args, stats)
    with _Writing(args.out):
        _write_outputs(args, stats, inits, config)
    return 0


def _check_checkpoint_arg(args, outputs: list[Path]) -> None:
    """``--checkpoint`` is neither an input nor an output (it is resumed, then kept)."""
    ck = getattr(args, "checkpoint", None)
    if ck is None:
        return
    for what, p in _input_paths(args) + [("the output", o) for o in outputs]:
        if _overlaps(Path(ck), p):
            raise CLIError(f"--checkpoint {ck} overlaps {what} {p}: give the checkpoint its own path")
    if not Path(ck).parent.is_dir():
        raise FileNotFoundError(f"{Path(ck).parent}: no such directory for --checkpoint")
    _check_writable(Path(ck))


def cmd_init(args) -> int:
    _validate_solve_options(args)  # before the expensive pass
    _prepare_out(args)
    _check_checkpoint_arg(args, [Path(args.out)] + ([Path(args.save_stats)] if args.save_stats else []))
    if args.gamma == "auto":
        stats, (model, calibration, held) = _collect(args, search=True)
        from lora_da.errors import LoraDAError

        try:
            found = _search_gamma(args, stats, model, calibration, held)
        except (LoraDAError, CLIError, OSError):
            raise
        except Exception as e:  # the model's own failure in the AdamW steps: one line, as in the pass
            raise CLIError(_model_failure(args, model, calibration + held, e)) from e
        del model, calibration, held
        args.gamma, args.gamma_search = found.best, found
    else:
        stats = _collect(args)
    if args.save_stats:
        with _Writing(args.save_stats):
            stats.save(args.save_stats)
        print(f"lora-da: wrote statistics to {args.save_stats}")
    inits, config = _solve(args, stats)
    with _Writing(args.out):
        _write_outputs(args, stats, inits, config)
    return 0


def cmd_report(args) -> int:
    from lora_da.statistics import Statistics

    _no_auto_gamma(args)
    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if args.plot:
        _pyplot()  # before the solve, not after it
    if args.plot and _overlaps(Path(args.plot), path):
        raise CLIError(f"--plot {args.plot} would write over the input {path}")
    report = _load_report(path)
    if report is None:
        if args.n_pop is None:
            raise ValueError("report on a statistics file needs --n-pop (it solves first)")
        _validate_solve_options(args)
        stats = Statistics.load(path)
        inits, config = _solve(args, stats)
        report = _report_dict(stats, inits, config)
    cfg = report.get("config", {})
    print(
        f"lora-da report: {len(report['modules'])} modules, {report.get('n_samples', '?')} samples, "
        f"rank {cfg.get('rank', '?')}, n_pop {cfg.get('n_pop', '?')}, γ {cfg.get('gamma', '?')}"
    )
    _print_table(report)
    if args.plot:
        _plot(report, args.plot)
    return 0


# -- demo (lora_da.demo) ------------------------------------------------------------------------


def cmd_demo(args) -> int:
    """``lora-da demo``: check ``--gamma``, then run :func:`lora_da.demo.run_demo`."""
    gamma_fixed = None
    if args.gamma != "auto":
        try:
            gamma_fixed = float(args.gamma)
        except ValueError:
            raise ValueError(f"--gamma must be 'auto' or a number, got {args.gamma!r}") from None
        if not gamma_fixed > 0:
            raise ValueError(f"--gamma must be > 0, got {gamma_fixed}")
    from lora_da.demo import run_demo

    return run_demo(samples=args.samples, eval_samples=args.eval_samples, steps=args.steps, gamma=gamma_fixed,
                    seed=args.seed)


# -- argument parsing ---------------------------------------------------------------------------


def _add_collect_args(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face model directory")
    p.add_argument("data", metavar="DATA", help="JSONL file ('text' [+ 'label']) or .txt file (one sample a line)")
    p.add_argument("--targets", default="all-linear", help="comma-separated module names/suffixes, or all-linear (default)")
    p.add_argument("--max-samples", type=_positive_int("--max-samples"), default=256, help="calibration samples (default 256)")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=4)
    p.add_argument("--max-length", type=_positive_int("--max-length"), default=128)
    p.add_argument("--token-mask", choices=["attention", "labels"], default="attention")
    p.add_argument("--task", choices=["causal-lm", "seq-cls"], default=None,
                   help="default: seq-cls when the data have 'label' fields, causal-lm when neither they have "
                        "labels nor the model is a classifier (anything else asks for the flag)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of what the model initializes itself (a classification head; default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--num-labels", type=_positive_int("--num-labels"), default=None,
                   help="seq-cls: the number of classes (default: the model's own head, else max label + 1 over the "
                        "whole data file)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint the pass here (default: none); rerunning the same command resumes it after an "
                        "interruption, or returns the finished pass")
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=8, metavar="N",
                   help="with --checkpoint: write it every N batches (default 8)")


def _add_solve_args(p, *, n_pop_required: bool) -> None:
    p.add_argument("--n-pop", type=_number, required=n_pop_required, default=None, help="size of the fine-tuning set")
    p.add_argument("--rank", type=int, default=8)
    from lora_da._core import SOLVE_DEFAULTS  # the core's defaults, their one source

    p.add_argument("--alpha", type=float, default=SOLVE_DEFAULTS["alpha"], help="bias weight α (default %(default)g)")
    p.add_argument("--beta", type=float, default=SOLVE_DEFAULTS["beta"], help="variance weight β (default %(default)g)")
    p.add_argument("--damping", type=float, default=SOLVE_DEFAULTS["damping"])
    p.add_argument("--gamma", type=_gamma_arg, default=SOLVE_DEFAULTS["gamma"],
                   help="scale γ (default %(default)g, the published value for 7B models; smaller models usually want "
                        "1-64): a number, or 'auto' (init only) to choose it on held-back data")
    p.add_argument("--no-normalize", action="store_true", help="do not normalize Δ by its spectral norm")
    p.add_argument("--method", choices=["auto", "krylov", "dense"], default=SOLVE_DEFAULTS["method"])
    p.add_argument("--solve-device", default="auto",
                   help="where to solve: auto (a CUDA GPU when there is one, else the host), host (the Rust core "
                        "and LAPACK), or a torch device such as cuda:1 (float64 on that device)")


def _add_output_args(p) -> None:
    p.add_argument("--out", required=True, help="output: adapter directory (peft) or .safetensors file (state-dict)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--rslora", action="store_true", help="rsLoRA scaling lora_alpha/sqrt(r)")
    p.add_argument("--format", choices=["peft", "state-dict"], default="peft")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _add_common(p) -> None:
    p.add_argument("--output-fisher", choices=["diagonal", "sequence_lowrank"], default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="LoRA-DA initialization for PEFT LoRA adapters.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("collect", help="collect the K-FAC statistics of a model on calibration data")
    _add_collect_args(p)
    p.add_argument("--out", required=True, help="statistics file (.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("solve", help="compute the LoRA-DA init from a statistics file")
    p.add_argument("stats", metavar="STATS", help="statistics file from 'lora-da collect'")
    _add_solve_args(p, n_pop_required=True)
    _add_output_args(p)
    p.add_argument("--task", choices=["causal-lm", "seq-cls"], default=None, help="PEFT task type (default: from the statistics)")
    _add_common(p)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("init", help="collect, then solve")
    _add_collect_args(p)
    _add_solve_args(p, n_pop_required=True)
    _add_output_args(p)
    p.add_argument("--save-stats", default=None, metavar="PATH", help="also save the statistics here")
    _add_common(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("report", help="print per-module diagnostics (from an output dir, a report .json, or statistics)")
    p.add_argument("path", metavar="STATS_OR_OUTDIR")
    _add_solve_args(p, n_pop_required=False)
    p.add_argument("--plot", default=None, metavar="PNG", help="write a plot of each module's bottom eigenvalues")
    _add_common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="offline demo: MiniLM on the VADER lexicon, PEFT default init vs LoRA-DA")
    p.add_argument("--samples", type=_positive_int("--samples"), default=256, help="training/calibration words (default 256)")
    p.add_argument("--eval-samples", type=_positive_int("--eval-samples"), default=1000, help="held-out words (default 1000)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=60)
    p.add_argument("--gamma", default="auto", help="'auto' (search) or a number")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    from lora_da.compare_cli import add_subcommand as add_compare  # issue 13; lives in its own module

    add_compare(sub)
    from lora_da.conformance.command import add_subcommand as add_conformance  # issue 24; its own package

    add_conformance(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    from lora_da.errors import LoraDAError

    try:
        return int(args.func(args) or 0)
    except (LoraDAError, CLIError, ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        ck = getattr(args, "checkpoint", None)
        again = f"; rerun the same command to resume from {ck}" if ck and Path(ck).exists() else ""
        print(f"{PROG}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
