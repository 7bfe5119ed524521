"""The output safety net of the commands.

Before any work: no output overlaps an input or another output, an existing output
is replaced only with ``--overwrite`` and only when lora-da wrote it, and the
output's folder takes new files. Then every output is written whole
(:func:`lora_da.files.write_atomic`; a state dict and its report are installed
together), and a failed write is one line naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lora_da.cli.models import PEFT_TASK_TYPES, modules_to_save, refuse_head_targets, refuse_task_heads
from lora_da.errors import CLIError
from lora_da.files import follow_umask, fsync_path, temp_file_beside, write_atomic
from lora_da.report import REPORT_NAME, add_model_card_section, is_report, write_report
from lora_da.words import count

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in a saved adapter's weights


class Writing:
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


def check_out_free(out: Path, overwrite: bool) -> None:
    """``--out`` is free (or may be replaced), in an existing folder that takes new files."""
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such directory for the output")
    check_writable(out)


def check_writable(out: Path) -> None:
    """Before the pass: the output is written to a temporary file beside it, so that
    directory must take a new file (a read-only or foreign directory used to be found
    only after the whole collection)."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        fd, probe = temp_file_beside(parent / out.name)
    except OSError as e:
        raise CLIError(f"cannot write {out}: {e.strerror or e} in {parent}; choose a writable --out") from None
    os.close(fd)
    os.unlink(probe)


def prepare_out(args) -> None:
    """Every output of ``solve``/``init`` (the adapter or state dict, the state dict's report,
    ``--save-stats``) checked by :func:`guard_outputs`, and its folder for new files."""
    out = Path(args.out)
    outputs = [(out, "adapter" if args.format == "peft" else "state-dict")]
    if args.format == "state-dict":
        outputs.append((state_dict_report_path(out), "report"))
    if getattr(args, "save_stats", None):
        outputs.append((Path(args.save_stats), "statistics"))
    guard_outputs(args, outputs)
    check_out_free(out, args.overwrite)
    if getattr(args, "save_stats", None):
        check_writable(Path(args.save_stats))  # written after the pass: its directory is checked before it


def state_dict_report_path(out: Path) -> Path:
    """Where a state dict's report goes: ``NAME.lora_da_report.json`` beside ``NAME.safetensors``."""
    return out.parent / (out.stem + "." + REPORT_NAME)


def check_checkpoint_arg(args, outputs: list[Path]) -> None:
    """``--checkpoint`` is neither an input nor an output (it is resumed, then kept)."""
    ck = getattr(args, "checkpoint", None)
    if ck is None:
        return
    for what, p in input_paths(args) + [("the output", o) for o in outputs]:
        if overlaps(Path(ck), p):
            raise CLIError(f"--checkpoint {ck} overlaps {what} {p}: give the checkpoint its own path")
    if not Path(ck).parent.is_dir():
        raise FileNotFoundError(f"{Path(ck).parent}: no such directory for --checkpoint")
    check_writable(Path(ck))


# -- what --overwrite may replace ------------------------------------------------------------

# the entries of an adapter directory written by `lora-da solve/init`
ADAPTER_ENTRIES = {ADAPTER_WEIGHTS, "adapter_config.json", REPORT_NAME, "README.md"}
INPUT_ARGS = {"model_dir": "the model directory", "data": "the data file", "stats": "the statistics file"}


def input_paths(args) -> list[tuple[str, Path]]:
    return [(what, Path(getattr(args, k))) for k, what in INPUT_ARGS.items() if getattr(args, k, None)]


def overlaps(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same path, or one lies inside the other (after symlinks)."""
    def real(p: Path) -> Path:
        try:
            return p.resolve()
        except (OSError, RuntimeError):  # a symlink loop: compare the spelled-out paths
            return p.absolute()

    a, b = real(a), real(b)
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _safetensors_metadata(path: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own error types on a file that is not its own
        return None


def _is_statistics_header(meta: dict | None) -> bool:
    from lora_da.statistics_file import FORMAT

    try:
        header = json.loads(meta["lora_da"])  # a state dict's "lora_da" is the string "state-dict"
    except (TypeError, KeyError, ValueError, RecursionError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT


def written_by_lora_da(path: Path, kind: str) -> str | None:
    """None when ``path`` is an output of ``kind`` that lora-da wrote, else why not."""
    if path.is_symlink():
        return "it is a symbolic link"
    if kind == "adapter":
        if not path.is_dir():
            return "it is not a directory"
        if not (path / REPORT_NAME).is_file() or not is_report(path / REPORT_NAME):
            return f"it has no lora-da {REPORT_NAME}"
        foreign = sorted(e.name for e in path.iterdir() if e.name not in ADAPTER_ENTRIES)
        if foreign:
            return f"it holds files lora-da does not write ({', '.join(foreign[:3])})"
        return None
    if not path.is_file():
        return "it is not a regular file"
    if kind == "report":
        return None if is_report(path) else "it is not a lora-da report"
    meta = _safetensors_metadata(path)
    if kind == "statistics":
        return None if _is_statistics_header(meta) else "it is not a lora-da statistics file"
    # a state dict: marked by lora-da in its metadata; one written before that mark, recognized by its report beside it
    if meta is not None and (meta.get("lora_da") == "state-dict" or is_report(state_dict_report_path(path))):
        return None
    return "it is not a lora-da state dict"


def guard_outputs(args, outputs: list[tuple[Path, str]]) -> None:
    """Before any work: no output may be (or contain, or lie inside) an input or
    another output, and ``--overwrite`` replaces only what lora-da itself wrote."""
    inputs = input_paths(args)
    for i, (out, kind) in enumerate(outputs):
        for what, inp in inputs:
            if overlaps(out, inp):
                raise CLIError(f"the output {out} overlaps {what} {inp}: choose an output path outside every input")
        for other, _ in outputs[i + 1 :]:
            if overlaps(out, other):
                raise CLIError(f"the outputs {out} and {other} overlap")
        if out.exists() or out.is_symlink():
            if not args.overwrite:
                raise ValueError(f"{out} already exists (pass --overwrite to replace it)")
            why = written_by_lora_da(out, kind)
            if why is not None:
                raise CLIError(f"--overwrite refuses to replace {out}: {why}; lora-da only replaces a {kind} it wrote")


# -- writing -----------------------------------------------------------------------------------------


def task_type(args, stats) -> str | None:
    """PEFT's ``task_type`` for the adapter: ``--task``, else the task the statistics were
    collected for, else guessed from the model's class; None when none says."""
    task = getattr(args, "task", None)
    if task is None:
        task = stats.config.get("task")
    if task is None:
        cls = stats.model.get("class", "")
        task = "seq-cls" if "SequenceClassification" in cls else ("causal-lm" if "CausalLM" in cls else None)
    return PEFT_TASK_TYPES.get(task)


def write_outputs(args, stats, inits, config, report: dict) -> None:
    """The solve as ``--format``: a PEFT adapter folder (weights, ``adapter_config.json``,
    the report, a model card), or a state dict with its report beside it; each written
    whole and installed in one step, or not at all."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from lora_da.adapters import check_zero_gradients, state_dict_of

    out = Path(args.out)
    refuse_head_targets(sorted(set(inits) & set(modules_to_save(stats) or ())))
    refuse_task_heads(list(inits), task_type(args, stats))
    zero = check_zero_gradients(inits, warn=False)  # refused when every module's is zero
    if zero:
        print(f"lora-da: warning: the mean gradient is zero in {len(zero)} of {len(inits)} modules "
              f"({', '.join(zero[:5])}{' ...' if len(zero) > 5 else ''}): their B is 0", file=sys.stderr)
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
            task_type=task_type(args, stats),
            modules_to_save=modules_to_save(stats),
        )
        lcfg.base_model_name_or_path = stats.model.get("name_or_path") or None

        def write_adapter(folder: str) -> None:
            save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
            follow_umask(os.path.join(folder, ADAPTER_WEIGHTS))  # safetensors writes 0600 whatever the umask
            lcfg.save_pretrained(folder)
            write_report(os.path.join(folder, REPORT_NAME), report)
            add_model_card_section(folder, report)

        write_atomic(out, write_adapter, directory=True)
        print(f"lora-da: wrote PEFT adapter ({count(len(inits), 'module')}) to {out}")
    else:
        tensors = state_dict_of(inits)
        for key, w in stats.new_weights.items():  # load into the base model (strict=False) before wrapping it
            tensors[key] = torch.from_numpy(np.ascontiguousarray(w))
        rep = state_dict_report_path(out)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            save_file(tensors, str(stage / out.name), metadata={"format": "pt", "lora_da": "state-dict"})
            follow_umask(stage / out.name)  # safetensors writes 0600 whatever the umask
            write_report(stage / rep.name, report)
            fsync_path(stage)
            install_together([(stage / out.name, out), (stage / rep.name, rep)])
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        print(f"lora-da: wrote state dict ({count(len(inits), 'module')}) to {out}; report {rep}")


def install_together(moves: list[tuple[Path, Path]]) -> None:
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
