"""The model a command runs: its directory checked, loaded with its tokenizer (and the
classification head it initializes), the devices asked for checked against this
machine, and a failure of the model on the data said in one line."""

from __future__ import annotations

from pathlib import Path

from lora_da.errors import CLIError


def check_model_dir(model_dir: str) -> None:
    """A local Hugging Face model directory (with its config.json), before anything is read."""
    p = Path(model_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")


def load_model(model_dir: str, task: str, num_labels: int | None, device: str, quiet: bool = False, seed: int = 0):
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


def check_device(choice: str, option: str) -> None:
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


def load_model_checked(model_dir: str, *args, **kwargs):
    """:func:`load_model`, with a model directory that transformers cannot read (corrupted
    weights, a broken tokenizer) reported in one line instead of the library's traceback."""
    try:
        return load_model(model_dir, *args, **kwargs)
    except (CLIError, ValueError, OSError):
        raise
    except Exception as e:  # safetensors, tokenizers and torch each raise their own types here
        msg = " ".join(str(e).split())[:300]
        raise CLIError(f"{model_dir}: could not load the model ({type(e).__name__}: {msg})") from e


def solve_device(choice: str):
    """``--solve-device`` → the ``device`` of :func:`lora_da.compute_init` (None: the host routes)."""
    import torch

    if choice == "host":
        return None
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else None
    check_device(choice, "--solve-device")
    return torch.device(choice)


def parse_targets(s: str | None):
    """``--targets``: ``"all-linear"``, or the list of comma-separated names/suffixes."""
    if s is None or s == "all-linear":
        return "all-linear"
    names = [t.strip() for t in s.split(",") if t.strip()]
    if not names:
        raise ValueError("--targets: empty list")
    return names


def model_failure(args, model, batches, e: Exception) -> str:
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


def check_head_not_targeted(model, targets, new_weights: dict, task: str | None = None) -> None:
    """A classification head the model initializes is saved whole (PEFT
    ``modules_to_save``); PEFT's loader drops the LoRA A/B of a module that is also
    saved whole, so a head in ``--targets`` would lose its solve without a word. The
    model's own head is refused too: for ``--task seq-cls`` PEFT saves it whole itself."""
    from lora_da.collect import resolve_targets

    heads = {key.rsplit(".", 1)[0] for key in new_weights}
    names = resolve_targets(model, targets)
    refuse_head_targets(sorted(heads & set(names)))
    refuse_task_heads(names, PEFT_TASK_TYPES.get(task))


# --task → PEFT's task_type of the adapter written
PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def refuse_task_heads(names, task_type: str | None) -> None:
    """Refuse targets that PEFT's model class for ``task_type`` saves whole itself (a
    SEQ_CLS adapter's ``classifier``/``score``): the adapter would not load."""
    from lora_da.adapters import task_heads

    both = task_heads(names, task_type)
    if both:
        raise CLIError(
            f"--targets selects {', '.join(both)}, the head of the {task_type} model, which PEFT saves whole for that "
            "task (modules_to_save) and cannot also load as a LoRA target. Leave it out of --targets"
        )


def refuse_head_targets(both: list[str]) -> None:
    """Refuse the modules that are both targets and saved whole (see :func:`check_head_not_targeted`)."""
    if both:
        raise CLIError(
            f"--targets selects {', '.join(both)}, the classification head the model initializes, which the adapter "
            "saves whole (PEFT modules_to_save); PEFT would drop its LoRA A/B. Leave it out of --targets"
        )


def modules_to_save(stats) -> list[str] | None:
    """The modules owning ``stats.new_weights`` (``classifier.weight`` → ``classifier``)."""
    mods = sorted({key.rsplit(".", 1)[0] for key in stats.new_weights})
    return mods or None
