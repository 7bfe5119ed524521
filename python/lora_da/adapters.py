"""LoRA-DA weights into PEFT LoRA adapters (SPEC §3, step 8).

Mirrors PEFT's data-driven init (EVA): :func:`get_lora_da_state_dict` computes
the weights from a model and data; :func:`initialize_lora_da_weights` writes
them into a :class:`peft.PeftModel`. ``lora_A`` / ``lora_B`` receive exactly
``A`` and ``B`` of SPEC §3 (PEFT applies its own scaling ``s``, rsLoRA
included) in the adapter's dtype; Linear and transformers' Conv1D alike.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile

import numpy as np
import torch

from lora_da.collect import linear_kind, resolve_targets
from lora_da.errors import InvalidArgumentError, LoraDAError, NonFiniteError, ShapeError
from lora_da.files import follow_umask, write_atomic
from lora_da.init import LoraDAConfig
from lora_da.pipeline import collect_and_solve, compute_init
from lora_da.results import Inits, ModuleInit
from lora_da.report import (  # noqa: F401 (REPORT_NAME, module_report: re-exported)
    REPORT_NAME,
    add_model_card_section,
    build_report,
    module_report,
    write_report,
)
from lora_da.statistics import Statistics
from lora_da.quality import check_zero_gradients, zero_gradient_modules  # noqa: F401 (re-exported)


def _peft_targets(model: torch.nn.Module, peft_config) -> list[str]:
    """Names of the base model's modules that ``peft_config`` targets, by PEFT's own rule
    (on :func:`_as_peft_resolves`'s copy: the model type's default or ``"all-linear"`` expanded)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [n for n, _ in model.named_modules() if n and check_target_module_exists(peft_config, n)]
    if not names:
        raise InvalidArgumentError(f"peft_config.target_modules={peft_config.target_modules!r} matches no module")
    return resolve_targets(model, names)


def _as_peft_resolves(model: torch.nn.Module, peft_config):
    """A copy of ``peft_config`` whose ``target_modules`` are those ``get_peft_model(model,
    peft_config)`` would adapt: None becomes PEFT's default for the model type (its
    ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``), ``"all-linear"`` every linear
    and Conv1D layer but the output head (PEFT's own expansion). PEFT rewrites the config
    it is given; the caller's is left as it was."""
    import copy

    from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    config = copy.deepcopy(peft_config)
    if config.target_modules is None:
        model_type = BaseTuner.get_model_config(model).get("model_type")
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if default is None:
            raise InvalidArgumentError(
                f"LoraConfig.target_modules=None: PEFT has no default target modules for model type {model_type!r}; "
                "pass target_modules (module names, or 'all-linear')"
            )
        config.target_modules = default if isinstance(default, str) else set(default)
    return _maybe_include_all_linear_layers(config, model)


def state_dict_of(inits, prefix: str = "", scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``{prefix + "<module>.lora_A.weight": scale·A, prefix + "<module>.lora_B.weight": scale·B}``
    for ``inits`` (module name → anything with ``A`` and ``B``: a :class:`ModuleInit` or a
    ``SolveResult``): SPEC §3 step 8's ``A``, ``B`` under PEFT's key names, spelt only here.

    float32 and C-contiguous (safetensors refuses other layouts), always a copy, so a
    caller may scale or write the tensors without touching the solve. ``scale`` is
    applied in the solve's precision and rounded to float32 once; ``prefix`` is
    ``"base_model.model."`` for a saved PEFT adapter.
    """
    out = {}
    for name, init in inits.items():
        for key, which, w in zip(_lora_keys(name, prefix), "AB", (init.A, init.B)):
            if scale != 1.0:
                w = w * scale
            with np.errstate(over="ignore"):
                w32 = np.array(w, dtype=np.float32, order="C")
            # finite in float64 is not enough: an extreme γ puts A or B past float32's range
            _check_finite_cast(name, which, w32, w, "float32")
            out[key] = torch.from_numpy(w32)
    return out


def _check_finite_cast(name: str, which: str, cast, original, dtype) -> None:
    """A weight that is no longer finite after its cast to the dtype it is written in is
    refused, naming the module, before anything is written (SPEC §3 step 8)."""
    finite = torch.isfinite(cast).all() if isinstance(cast, torch.Tensor) else np.isfinite(cast).all()
    if bool(finite):
        return
    big = float(np.max(np.abs(original))) if not isinstance(original, torch.Tensor) else float(original.abs().max())
    raise NonFiniteError(
        f"{name}: the LoRA-DA {which} (largest |entry| {big:.3g}) is not finite in the adapter's dtype {dtype}; "
        "γ is too small for this model: pass a larger gamma (it divides B·A)"
    )


def _lora_keys(name: str, prefix: str = "") -> tuple[str, str]:
    """The state-dict keys of module ``name``'s ``A`` and ``B``."""
    return f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_B.weight"


def _check_rank(lora_da_config: LoraDAConfig, peft_config) -> None:
    """The rank LoRA-DA solves for must be the adapter's: the shapes of A and B follow it."""
    if lora_da_config.rank != peft_config.r:
        raise InvalidArgumentError(
            f"LoraDAConfig.rank = {lora_da_config.rank} differs from the PEFT config's r = {peft_config.r} "
            "(leave rank unset to use the adapter's)"
        )


# init_lora_weights values that only draw A and B: LoRA-DA overwrites both, so any of them is fine.
# The others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, ...) also rewrite the base weights or are
# initializations of their own: the model would be neither theirs nor LoRA-DA's.
_PLAIN_INITS = (True, False, "gaussian")


def _check_peft_config(peft_config) -> None:
    """Refuse, with the reason, the ``LoraConfig`` settings LoRA-DA cannot honour;
    every other field a user sets is honoured (README, "Which LoraConfig")."""
    if getattr(peft_config, "target_parameters", None):
        raise InvalidArgumentError(
            f"LoraConfig.target_parameters={list(peft_config.target_parameters)!r}: LoRA on bare parameters (e.g. MoE "
            "experts) has no per-module input and output gradient that LoRA-DA's statistics (SPEC §2) are taken "
            "from; target the linear modules with target_modules instead"
        )
    init = getattr(peft_config, "init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise InvalidArgumentError(
            f"LoraConfig.init_lora_weights={init!r} is an initialization of its own (it may also change the base "
            "weights); LoRA-DA replaces A and B, so use init_lora_weights=True with it"
        )
    if getattr(peft_config, "layer_replication", None):
        raise InvalidArgumentError(
            "LoraConfig.layer_replication: replicated layers share their base weights, so each copy's LoRA-DA "
            "statistics would be of a model that does not exist before the replication; not supported"
        )


# the modules each task's PeftModel class adds to ``modules_to_save`` itself (PEFT's
# PeftModelForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def task_heads(names, task_type) -> list[str]:
    """The modules of ``names`` that PEFT saves whole for ``task_type`` (its
    ``modules_to_save``, matched by PEFT's own rule: the name ends with the head's)."""
    heads = _TASK_HEADS.get(str(getattr(task_type, "value", task_type)), ())
    return sorted(n for n in names if any(n.endswith(h) for h in heads))


def check_no_task_head(names, task_type, option: str = "LoraConfig.target_modules") -> None:
    """Refuse targets that are the task's head: PEFT's model class for ``task_type`` puts
    that head in ``modules_to_save`` itself, and its loader then finds no base weight
    under the LoRA-wrapped name: the adapter does not load, or loses its LoRA A/B."""
    both = task_heads(names, task_type)
    if both:
        raise InvalidArgumentError(
            f"{option} selects {', '.join(both)}, the head of a {getattr(task_type, 'value', task_type)} model, which "
            "PEFT saves whole for that task (modules_to_save) and cannot also load as a LoRA target: leave it out of "
            f"{option}"
        )


def _pattern_ranks(peft_config, names: list[str]) -> dict[str, int]:
    """Each targeted module's r by PEFT's own ``rank_pattern`` rule (its ``get_pattern_key``)."""
    pattern = getattr(peft_config, "rank_pattern", None) or {}
    if not pattern:
        return {}
    from peft.utils.other import get_pattern_key

    return {n: int(pattern.get(get_pattern_key(pattern.keys(), n), peft_config.r)) for n in names}


def _with_ranks(lora_da_config: LoraDAConfig, ranks: dict[str, int]) -> LoraDAConfig:
    """``lora_da_config`` solving each module at the adapter's own r (a ``rank_pattern``);
    ranks the user set on the LoraDAConfig must agree with the adapter's."""
    from dataclasses import replace

    mine = lora_da_config.ranks or {}
    clash = [(n, r, ranks[n]) for n, r in mine.items() if n in ranks and ranks[n] != r]
    if clash:
        n, r, theirs = clash[0]
        raise InvalidArgumentError(f"{n}: LoraDAConfig.ranks gives r = {r}, the PEFT adapter has r = {theirs}")
    differ = {n: r for n, r in ranks.items() if r != lora_da_config.rank}
    return replace(lora_da_config, ranks={**mine, **differ} or None) if differ or mine else lora_da_config


def get_lora_da_state_dict(
    model: torch.nn.Module,
    dataloader,
    peft_config,
    lora_da_config: LoraDAConfig,
    *,
    loss_fn=None,
    statistics: Statistics | None = None,
    progress: bool = True,
    **collect_kwargs,
) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A.weight": A, "<module>.lora_B.weight": B}`` (float32) for
    the modules ``get_peft_model(model, peft_config)`` would adapt, computed from one pass
    over ``dataloader`` (or from ``statistics`` already collected); with ``use_dora``
    also DoRA's ``"<module>.lora_magnitude_vector"`` for the new weights."""
    _check_peft_config(peft_config)
    lora_da_config = lora_da_config.with_rank(peft_config.r)
    _check_rank(lora_da_config, peft_config)
    peft_config = _as_peft_resolves(model, peft_config)
    names = _peft_targets(model, peft_config)
    check_no_task_head(names, getattr(peft_config, "task_type", None))
    lora_da_config = _with_ranks(lora_da_config, _pattern_ranks(peft_config, names))
    if statistics is None:
        inits = collect_and_solve(model, dataloader, names, lora_da_config, loss_fn=loss_fn, progress=progress,
                                  **collect_kwargs)
    else:
        _check_statistics_cover(statistics, names)
        inits = compute_init(statistics, lora_da_config, modules=names, progress=progress)
    check_zero_gradients(inits)
    out = state_dict_of(inits)
    if getattr(peft_config, "use_dora", False):
        out.update(_dora_magnitudes(model, peft_config, out, names))
    return out


def _dora_magnitudes(model: torch.nn.Module, peft_config, state_dict: dict[str, torch.Tensor],
                     names: list[str]) -> dict[str, torch.Tensor]:
    """DoRA (``use_dora``) on the state-dict route: ``{"<module>.lora_magnitude_vector": m}``
    (PEFT's own key, as ``get_peft_model_state_dict`` writes it), ``m = ‖W + s·B A‖`` (rows)
    from the base ``W`` and the ``A``, ``B`` of ``state_dict``, so that an adapter loaded with
    ``set_peft_model_state_dict`` starts as :func:`initialize_lora_da_weights` leaves it
    (:func:`_refresh_dora_magnitude`). ``s`` is the layer's scale as PEFT sets it: the
    module's ``alpha_pattern`` entry (else ``lora_alpha``) over its r (√r with rsLoRA)."""
    import math

    from peft.utils.other import get_pattern_key

    pattern = getattr(peft_config, "alpha_pattern", None) or {}
    out = {}
    for name in names:
        ka, kb = _lora_keys(name)
        A, B = state_dict[ka], state_dict[kb]
        alpha = pattern.get(get_pattern_key(pattern.keys(), name), peft_config.lora_alpha)
        r = A.shape[0]
        s = alpha / (math.sqrt(r) if peft_config.use_rslora else r)
        module = model.get_submodule(name)
        W = module.weight.detach()
        if linear_kind(module) == "conv1d":
            W = W.T  # stored in × out; the norms are per output feature
        m = _dora_norms(W, s, A, B).float()
        _check_finite_cast(name, "DoRA magnitude", m, m, "float32")
        out[f"{name}.lora_magnitude_vector"] = m.cpu().contiguous()
    return out


def _dora_norms(W: torch.Tensor, s: float, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``‖W + s·B A‖`` per row (output feature), in float64; ``W`` out × in."""
    W = W.double()
    return torch.linalg.norm(W + s * (B.double() @ A.double()).to(W.device), dim=1)


def _check_statistics_cover(statistics: Statistics, names: list[str]) -> None:
    """Every targeted module has statistics, before any solve: a module without them would be
    left at PEFT's init while the report says LoRA-DA."""
    missing = [n for n in names if n not in statistics.modules]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidArgumentError(
            f"the statistics have no entry for targeted module(s) {missing[:5]}{more}: collect them with these "
            "modules among the targets, or leave these modules out of the adapter"
        )


def _lora_layers(peft_model, adapter_name):
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_embedding_A", {}):
            # left alone it would keep PEFT's init while the report says LoRA-DA
            raise InvalidArgumentError(
                f"{name}: a LoRA adapter on an embedding ({type(module.get_base_layer()).__name__}); LoRA-DA's "
                "statistics are those of linear layers (SPEC §2): leave the embedding out of target_modules"
            )
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


@torch.no_grad()
def initialize_lora_da_weights(
    peft_model,
    dataloader=None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    lora_da_config: LoraDAConfig,
    adapter_name: str = "default",
    loss_fn=None,
    statistics: Statistics | None = None,
    progress: bool = True,
    **collect_kwargs,
) -> dict:
    """Write the LoRA-DA ``A``/``B`` (SPEC §3 step 8) into ``peft_model``'s adapter ``adapter_name``.

    Without ``state_dict`` the statistics are collected on the base model (the
    adapter disabled). Every shape is checked before any weight is written.
    With ``preserve_output`` the base weights lose ``s·B A`` and the model's
    :meth:`save_pretrained` is guarded (see :func:`save_initial_adapter`).
    Returns ``{module: ModuleInit}`` when it solved (``A``, ``B``, the solve's diagnostics and
    the poor-init ``warnings``, as :func:`~lora_da.compute_init`'s), with the run's
    :class:`~lora_da.RunReport` as ``report`` (None when it solved kept statistics), else ``{}``.

    A thin wrapper, as PEFT's EVA is: :func:`_solve_lora_layers` computes the
    weights, :func:`_load_lora_da_state_dict` checks and writes them.
    """
    if not (hasattr(peft_model, "peft_config") and hasattr(peft_model, "get_base_model")):
        raise InvalidArgumentError(
            f"initialize_lora_da_weights needs a peft.PeftModel, got {type(peft_model).__name__}: wrap the model with "
            "peft.get_peft_model(model, LoraConfig(...)) first, or call get_lora_da_state_dict(model, dataloader, "
            "peft_config, lora_da_config) for the weights alone"
        )
    if adapter_name not in peft_model.peft_config:
        raise InvalidArgumentError(f"the PeftModel has no adapter named {adapter_name!r}")
    peft_config = peft_model.peft_config[adapter_name]
    _check_peft_config(peft_config)
    lora_da_config = lora_da_config.with_rank(peft_config.r)
    if state_dict is None:
        _check_rank(lora_da_config, peft_config)
    layers = dict(_lora_layers(peft_model, adapter_name))
    # each layer's own r, as PEFT resolved rank_pattern for it
    lora_da_config = _with_ranks(lora_da_config, {n: int(layer.r[adapter_name]) for n, layer in layers.items()})
    # before any collection (its statistics would be of the modified base); the whole model, not
    # the adapter's layers: W − s·B·A on any layer changes the base every adapter sees
    _check_not_preserved(peft_model, adapter_name)
    if lora_da_config.preserve_output:
        _check_only_adapter(peft_model, adapter_name)
    results = {}
    if state_dict is None:
        if dataloader is None and statistics is None:
            raise InvalidArgumentError("initialize_lora_da_weights needs a dataloader, statistics or a state_dict")
        inits = _solve_lora_layers(peft_model, layers, dataloader, statistics, lora_da_config,
                                   loss_fn=loss_fn, progress=progress, **collect_kwargs)
        check_zero_gradients(inits)
        state_dict = state_dict_of(inits)
        results = inits
    _load_lora_da_state_dict(peft_model, state_dict, layers, adapter_name, lora_da_config, results)
    return results


def _solve_lora_layers(peft_model, layers: dict, dataloader, statistics: Statistics | None,
                       lora_da_config: LoraDAConfig, *, loss_fn, progress: bool, **collect_kwargs) -> dict:
    """``{LoRA layer name: ModuleInit}`` for the adapter's ``layers`` (SPEC §2–§3):
    from ``statistics`` when given (the layers they cover), else one pass of
    ``dataloader`` through the base model with the adapter disabled."""
    if statistics is not None:
        _check_statistics_cover(statistics, list(layers))
        return compute_init(statistics, lora_da_config, modules=list(layers), progress=progress)
    # hook the wrapped base layers; the results are named after the LoRA layers
    suffix = ".base_layer"
    if lora_da_config.ranks:
        from dataclasses import replace

        lora_da_config = replace(lora_da_config, ranks={f"{n}{suffix}": r for n, r in lora_da_config.ranks.items()})
    with peft_model.disable_adapter():
        solved = collect_and_solve(peft_model.get_base_model(), dataloader, [f"{n}{suffix}" for n in layers],
                                   lora_da_config, loss_fn=loss_fn, progress=progress, **collect_kwargs)
    return Inits({k.removesuffix(suffix): ModuleInit(k.removesuffix(suffix), v.result, v.seconds)
                  for k, v in solved.items()}, solved.report)


def _load_lora_da_state_dict(peft_model, state_dict: dict[str, torch.Tensor], layers: dict, adapter_name: str,
                             lora_da_config: LoraDAConfig, results: dict) -> None:
    """Copy ``state_dict`` into the ``lora_A``/``lora_B`` of ``layers`` (SPEC §3 step 8),
    all or nothing: every entry's presence, shape and finiteness is checked before
    the first write. Then ``preserve_output``'s ``W ← W − s·B A``, the report that
    ``save_pretrained`` writes beside the adapter (SPEC §5), and the save guard."""
    plan = []
    for name, layer in layers.items():
        ka, kb = _lora_keys(name)
        if ka not in state_dict or kb not in state_dict:
            raise ShapeError(f"{name}: the LoRA-DA state dict has no entry for this adapter layer")
        A, B = state_dict[ka], state_dict[kb]
        wa, wb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if tuple(A.shape) != tuple(wa.shape) or tuple(B.shape) != tuple(wb.shape):
            raise ShapeError(
                f"{name}: LoRA-DA A {tuple(A.shape)} / B {tuple(B.shape)} do not fit the adapter's "
                f"lora_A {tuple(wa.shape)} / lora_B {tuple(wb.shape)}"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise NonFiniteError(f"{name}: non-finite LoRA-DA weights in the state dict")
        # the check that counts is in the dtype written: float16 overflows where float32 does not
        A_cast, B_cast = A.to(device=wa.device, dtype=wa.dtype), B.to(device=wb.device, dtype=wb.dtype)
        _check_finite_cast(name, "A", A_cast, A, wa.dtype)
        _check_finite_cast(name, "B", B_cast, B, wb.dtype)
        base = _residual_base(layer, adapter_name, A_cast, B_cast) if lora_da_config.preserve_output else None
        _check_dora_magnitude(name, layer, adapter_name, A_cast, B_cast, base)
        plan.append((name, layer, A_cast, B_cast, base))
    for name, layer, A, B, base in plan:
        layer.lora_A[adapter_name].weight.copy_(A)
        layer.lora_B[adapter_name].weight.copy_(B)
        if base is not None:
            layer.get_base_layer().weight.data = base
            _mark_preserved(layer, adapter_name)
        _refresh_dora_magnitude(layer, adapter_name)
    _record(peft_model, adapter_name, lora_da_config, results)
    if lora_da_config.preserve_output:
        _guard_save(peft_model)


def _record(peft_model, adapter_name: str, config: LoraDAConfig, results: dict) -> None:
    """Say what was done beside the adapter: ``save_pretrained`` also writes
    ``lora_da_report.json`` (the report of SPEC §5: the LoRA-DA settings and each
    module's diagnostics) next to each saved adapter's ``adapter_config.json``, a file
    PEFT ignores (its config keeps ``init_lora_weights``, which it validates), and a
    LoRA-DA section in the README.md (model card) PEFT writes there."""
    reports = peft_model.__dict__.setdefault("_lora_da_reports", {})
    reports[adapter_name] = build_report(results, config, adapter_name=adapter_name,
                                         source="solved from data" if results else "written from a state dict")
    if getattr(peft_model, "_lora_da_recording", False):
        return
    original = peft_model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory, *args, **kwargs):
        out = original(save_directory, *args, **kwargs)
        chosen = kwargs.get("selected_adapters") or list(peft_model.peft_config)
        for name, report in peft_model._lora_da_reports.items():
            if name not in chosen:
                continue
            where = os.path.join(os.fspath(save_directory), name) if name != "default" else os.fspath(save_directory)
            if os.path.isfile(os.path.join(where, "adapter_config.json")):
                write_report(os.path.join(where, REPORT_NAME), report)
                add_model_card_section(where, report)
                for weights in ("adapter_model.safetensors", "adapter_model.bin"):
                    if os.path.isfile(os.path.join(where, weights)):
                        follow_umask(os.path.join(where, weights))  # safetensors writes 0600 whatever the umask
        return out

    save_pretrained._lora_da_wrapper = True
    peft_model.save_pretrained = save_pretrained
    peft_model._lora_da_recording = True


def _residual_base(layer, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``W − s·B A`` (in the layer's storage orientation and dtype), so the outputs at
    step 0 equal the base model's; checked finite in that dtype, not yet written."""
    base = layer.get_base_layer()
    delta = layer.scaling[adapter_name] * (B.double() @ A.double())  # m × n
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    new = base.weight.double() - delta.to(base.weight.device)
    cast = new.to(base.weight.dtype)
    _check_finite_cast(f"{layer.__class__.__name__} base of adapter {adapter_name!r}", "W − s·B·A", cast, new,
                       base.weight.dtype)
    return cast


def _refresh_dora_magnitude(layer, adapter_name: str) -> None:
    """DoRA (``use_dora``): PEFT set the magnitude ``m = ‖W + s·B A‖`` (row norms, out
    features) from its own A and B = 0. With LoRA-DA's A, B (and the base after
    ``preserve_output``) it is recomputed from the new weights, in float64, so that DoRA's
    ``m / ‖W + s·B A‖`` is 1 at step 0 and the adapted layer is ``W + s·B A``: the same
    start as the plain LoRA adapter (the base model's output with ``preserve_output``)."""
    mags = getattr(layer, "lora_magnitude_vector", None)
    if not mags or adapter_name not in mags:
        return
    dora = mags[adapter_name]
    W = layer.get_base_layer().weight
    if getattr(layer, "fan_in_fan_out", False):
        W = W.T  # Conv1D stores in × out; the norms are per output feature
    norms = _dora_norms(W, layer.scaling[adapter_name], layer.lora_A[adapter_name].weight,
                        layer.lora_B[adapter_name].weight)
    dora.weight.data.copy_(norms.to(device=dora.weight.device, dtype=dora.weight.dtype))
    if hasattr(dora, "_cache_clear"):
        dora._cache_clear()


def _check_dora_magnitude(name: str, layer, adapter_name: str, A: torch.Tensor, B: torch.Tensor, base) -> None:
    """DoRA: the magnitude :func:`_refresh_dora_magnitude` will write, ``‖W + s·B A‖`` from
    the weights about to be written (``base``: the new base of ``preserve_output``), checked
    finite in the magnitude's dtype before any write: float16 overflows where A and B do not."""
    mags = getattr(layer, "lora_magnitude_vector", None)
    if not mags or adapter_name not in mags:
        return
    W = (base if base is not None else layer.get_base_layer().weight).double()
    if getattr(layer, "fan_in_fan_out", False):
        W = W.T
    m = torch.linalg.norm(W + layer.scaling[adapter_name] * (B.double() @ A.double()).to(W.device), dim=1)
    dtype = mags[adapter_name].weight.dtype
    _check_finite_cast(name, "DoRA magnitude ‖W + s·B·A‖", m.to(dtype), m, dtype)


# on the base layer itself, so that wrapping the modified base in a new PeftModel still shows it
_PRESERVED = "_lora_da_preserved_for"


def _mark_preserved(layer, adapter_name: str) -> None:
    base = layer.get_base_layer()
    base.__dict__.setdefault(_PRESERVED, set()).add(adapter_name)


def _check_not_preserved(peft_model, adapter_name: str) -> None:
    """An adapter initialized with ``preserve_output`` anywhere in the model took its ``s·B A``
    out of the base weights: statistics or a subtraction for any adapter (itself again, or
    another) on that model would be of a modified base, and the step-0 outputs wrong. The
    marks are on the base layers, so a modified base wrapped in a new PeftModel shows them too."""
    preserved = set()
    for module in peft_model.get_base_model().modules():
        preserved |= set(module.__dict__.get(_PRESERVED, ()))
    others = sorted(a for a in preserved if a != adapter_name)
    if others:
        raise LoraDAError(
            f"adapter {others[0]!r} was initialized with preserve_output=True, so this model's base weights already "
            f"lost its s·B·A; statistics or a subtraction for {adapter_name!r} on them would be of a modified model. "
            "Start from a freshly loaded base model."
        )
    if adapter_name in preserved:
        raise LoraDAError(
            f"adapter {adapter_name!r} was already initialized with preserve_output=True, so its base weights "
            "already lost s·B·A; initializing it again would corrupt them. Start from a freshly loaded base model."
        )


def _check_only_adapter(peft_model, adapter_name: str) -> None:
    """``preserve_output`` makes ``W − s·B A`` reproduce the base for this adapter alone: any
    other adapter of the model, on these layers or others, would run on the changed base
    weights and no longer start from the base model."""
    others = sorted(a for a in peft_model.peft_config if a != adapter_name)
    if others:
        raise InvalidArgumentError(
            f"preserve_output=True needs {adapter_name!r} to be the only adapter of the model, but it also holds "
            f"{others}: subtracting s·B·A from the base weights would change what those adapters start from. "
            "Initialize one adapter per base model, or pass preserve_output=False"
        )


def _guard_save(peft_model) -> None:
    """After ``preserve_output`` the base weights are no longer the published
    ones: an adapter saved plainly would be wrong on a fresh base model. Make
    ``save_pretrained`` refuse unless it converts (PEFT's
    ``path_initial_model_for_weight_conversion``)."""
    if getattr(peft_model, "_lora_da_guarded", False):
        return
    original = peft_model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory, *args, path_initial_model_for_weight_conversion=None, **kwargs):
        if path_initial_model_for_weight_conversion is None and not kwargs.pop("lora_da_allow_residual", False):
            raise LoraDAError(
                "this model was initialized with LoRA-DA preserve_output=True: its base weights were changed, so a "
                "plainly saved adapter is wrong on a fresh base model. Save the initial adapter right after "
                "initialization with lora_da.save_initial_adapter(model, path) and pass "
                "path_initial_model_for_weight_conversion=path to save_pretrained (PEFT then stores an adapter for "
                "the original base), or pass lora_da_allow_residual=True to save the adapter for the modified base."
            )
        out = original(
            save_directory, *args, path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion, **kwargs
        )
        if path_initial_model_for_weight_conversion is not None:
            _restore_modules_to_save(peft_model, os.fspath(save_directory), kwargs.get("selected_adapters"))
        return out

    save_pretrained._lora_da_wrapper = True
    peft_model.save_pretrained = save_pretrained
    peft_model._lora_da_guarded = True


_LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")


def _restore_modules_to_save(peft_model, save_directory: str, selected) -> None:
    """PEFT's conversion for the original base (``path_initial_model_for_weight_conversion``)
    keeps only the LoRA matrices and drops ``modules_to_save`` (a classification
    head), so the saved adapter would not load. Those modules replace the base's
    outright and do not depend on it: put the trained ones back, atomically."""
    from peft.utils import get_peft_model_state_dict

    for name in selected or list(peft_model.peft_config):
        if not getattr(peft_model.peft_config[name], "modules_to_save", None):
            continue
        where = os.path.join(save_directory, name) if name != "default" else save_directory
        full = get_peft_model_state_dict(peft_model, adapter_name=name)
        extra = {k: v for k, v in full.items() if not _LORA_KEY.search(k)}
        st, pt = os.path.join(where, "adapter_model.safetensors"), os.path.join(where, "adapter_model.bin")
        if os.path.isfile(st):
            from safetensors.torch import load_file, save_file

            saved = load_file(st)
            write = lambda sd, path: save_file(sd, path, metadata={"format": "pt"})  # noqa: E731
            target = st
        elif os.path.isfile(pt):
            saved = torch.load(pt, map_location="cpu", weights_only=True)
            write = torch.save
            target = pt
        else:
            raise LoraDAError(f"{where}: PEFT wrote no adapter weights to restore modules_to_save into")
        missing = {k: v.detach().cpu().contiguous() for k, v in extra.items() if k not in saved}
        if not missing:
            continue
        saved.update(missing)
        write_atomic(target, functools.partial(write, saved))


def save_initial_adapter(peft_model, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Save the adapter as initialized (before training) for PEFT's conversion
    at save time: ``model.save_pretrained(out, path_initial_model_for_weight_conversion=path)``."""
    save = peft_model.save_pretrained
    while getattr(save, "_lora_da_wrapper", False):  # past lora-da's own wrappers (the guard, the report)
        save = save.__wrapped__
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lora_da_init_", dir=os.path.dirname(os.path.abspath(path)))
    try:
        save(tmp, selected_adapters=[adapter_name])
        src = os.path.join(tmp, adapter_name) if adapter_name != "default" else tmp
        if os.path.exists(path):
            raise LoraDAError(f"{path} already exists")
        follow_umask(src)  # mkdtemp's 0700 would stay on the renamed folder
        os.replace(src, path)
    finally:
        if os.path.isdir(tmp):
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
