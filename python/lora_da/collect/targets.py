"""Which modules a collection targets (SPEC §2): PEFT's ``target_modules`` forms
resolved against a model, each target's kind and ``m × n`` shape (out × in)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from lora_da.errors import InvalidArgumentError


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # transformers is a dependency, but keep the core usable without it
        return None


def linear_kind(module: torch.nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (transformers' transposed linear) or None."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def module_shape(module: torch.nn.Module, kind: str) -> tuple[int, int]:
    """``(m, n)`` = (out_features, in_features) in the out × in convention."""
    if kind == "linear":
        return module.out_features, module.in_features
    n, m = module.weight.shape  # Conv1D stores its weight as in × out
    return m, n


def resolve_targets(model: torch.nn.Module, target_modules) -> list[str]:
    """Module names selected by ``target_modules``.

    Accepted forms (as PEFT's): ``None`` or ``"all-linear"`` (every linear
    module except an output head named ``lm_head``/``score``/``classifier``), a
    regular expression string matched against the full name, or a list of
    names, each matching a full name or a name suffix after a dot.
    """
    named = dict(model.named_modules())
    if target_modules is None or target_modules == "all-linear":
        heads = {"lm_head", "score", "classifier", "cls"}
        out = [n for n, m in named.items() if linear_kind(m) and n.split(".")[-1] not in heads and n]
    elif isinstance(target_modules, str):
        pat = re.compile(target_modules)
        out = [n for n in named if n and pat.fullmatch(n)]
    else:
        keys = list(target_modules)
        if not all(isinstance(k, str) and k for k in keys):
            raise InvalidArgumentError(f"target_modules must be names (strings), got {target_modules!r}")
        out = [n for n in named if n and any(n == k or n.endswith("." + k) for k in keys)]
        unmatched = [k for k in keys if not any(n == k or n.endswith("." + k) for n in named if n)]
        if unmatched and out:
            raise InvalidArgumentError(
                f"target_modules: {unmatched} match no module of {type(model).__name__}"
                f"{_suggest(unmatched[0], named)}; the others match {len(out)} modules"
            )
    if not out:
        hint = _suggest(target_modules if isinstance(target_modules, str) else list(target_modules)[0], named) \
            if target_modules else ""
        raise InvalidArgumentError(f"target_modules={target_modules!r} matches no module of {type(model).__name__}{hint}")
    lora = [n for n in out if hasattr(named[n], "base_layer") and linear_kind(named[n]) is None]
    if lora:
        raise InvalidArgumentError(
            f"{lora[0]} is a PEFT LoRA layer, not the linear layer it wraps: collect on the base model with the adapter "
            "disabled, or call lora_da.initialize_lora_da_weights(peft_model, dataloader, ...), which does that"
        )
    bad = [n for n in out if linear_kind(named[n]) is None]
    if bad:
        raise InvalidArgumentError(
            f"target_modules={target_modules!r} matches modules that are not linear layers: "
            + ", ".join(f"{n} ({type(named[n]).__name__})" for n in bad[:5])
        )
    return out


def _suggest(key, named: dict) -> str:
    """``" (did you mean: …?)"`` with the linear modules' last name parts closest to ``key``."""
    import difflib

    leaves = sorted({n.split(".")[-1] for n, m in named.items() if n and linear_kind(m)})
    close = difflib.get_close_matches(str(key).split(".")[-1], leaves, n=4, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}? linear modules end in: {', '.join(leaves[:12])})" if close else (
        f" (linear modules end in: {', '.join(leaves[:12])})" if leaves else "")


@dataclass
class Target:
    name: str
    module: torch.nn.Module
    kind: str
    m: int
    n: int
    calls: list = field(default_factory=list)  # (x, g) pairs of this batch
    keys: list = field(default_factory=list)  # input identities of this batch's calls
    seen: list = field(default_factory=list)  # this batch's inputs (or their finite flags), to name the source of a NaN
    grad_calls: tuple | None = None  # per call of a step, whether it takes gradient in a whole step (the probe's)
