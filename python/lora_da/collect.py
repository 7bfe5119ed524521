"""One pass over the calibration data gives every statistic (SPEC §2).

For each batch the back-propagated loss is ``Σ_s ℓ_s``, each sample's own
token-mean loss, so the statistics do not depend on the batch size. Hooks:

* a forward hook on each target module pairs the call's input ``x`` with a
  tensor hook on its output, which receives ``g = ∂(Σ_s ℓ_s)/∂o``. Pairing per
  call means a module called twice per forward (weight tying) counts both
  calls, and a forward whose output takes no gradient (e.g. the no-grad first
  pass of reentrant checkpointing) counts nothing;
* ``Ḡ`` gets ``Σ_t g_t x_tᵀ`` over all tokens (the exact gradient), while
  ``Z`` and ``y`` use the valid tokens only (attention mask or label mask);
* modules whose calls receive the very same input tensor share one ``Z``.

Statistics go to float64 accumulators on the host whatever the model's dtype
and device; on a GPU the per-batch Gram matrix is formed on the device in
float64 (when it fits in ``max_device_bytes``) and flushed to the host.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lora_da._core import InputFactor, OutputFactor
from lora_da.distributed import active_group, agree, all_reduce_statistics, check_same_options, together
from lora_da.errors import InvalidArgumentError, LoraDAError, NonFiniteError, ShapeError, StatisticsFileError
from lora_da.memory import OutOfMemoryError
from lora_da.memory import release as _release
from lora_da.plan import (DEVICE_SOLVE_WORKERS, FLUSH_THREADS, MemoryPlan, Step, Unit, available_host_bytes, choose_plan,
                          gram_block_rows)
from lora_da.statistics import ModuleInfo, Statistics, StatisticsWriter, file_header

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


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


# -- per-sample losses -----------------------------------------------------------


def causal_lm_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean next-token cross-entropy over its labels (``-100`` ignored);
    a sample with no label token contributes 0."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    valid = (shift_labels != -100).to(tok.dtype)
    return (tok * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def default_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample losses for causal LMs (``labels`` or ``input_ids`` with padding
    masked) and sequence classification (``labels`` of shape ``(B,)``; the
    ``label`` key that ``datasets`` produces is accepted too)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
    out = model(**inputs)
    # a model may return its logits bare; out[0] of a tensor would be its first sample
    logits = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])
    if not isinstance(logits, torch.Tensor):
        raise InvalidArgumentError(f"default loss: the model returned {type(out).__name__} without logits; pass loss_fn")
    labels = batch.get("labels", batch.get("label"))
    if logits.dim() == 3:
        if labels is None:
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
        return causal_lm_per_sample_loss(logits, labels)
    if logits.dim() == 2:
        if labels is None:
            raise InvalidArgumentError("sequence classification needs 'labels' in every batch")
        if logits.shape[-1] == 1 or labels.dtype.is_floating_point:
            return ((logits.float().squeeze(-1) - labels.float()) ** 2).reshape(labels.shape[0], -1).mean(1)
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    raise InvalidArgumentError(f"default loss: cannot interpret logits of shape {tuple(logits.shape)}; pass loss_fn")


def token_mask_of(batch: dict, mode: str) -> torch.Tensor | None:
    """``(B, L)`` bool mask of valid tokens (SPEC §2) or None (all valid)."""
    if mode == "attention":
        m = batch.get("attention_mask")
        return None if m is None else m.bool()
    if mode == "labels":
        labels = batch.get("labels")
        if labels is None:
            raise InvalidArgumentError("token_mask='labels' needs 'labels' in every batch")
        if labels.dim() != 2:
            # class labels (B,) have no token to shift: sequence classification masks by attention
            raise InvalidArgumentError(
                f"token_mask='labels' needs per-token labels (batch, length) of a causal LM; these labels have shape "
                f"{tuple(labels.shape)} (one class per sample?): pass token_mask='attention'")
        valid = torch.zeros_like(labels, dtype=torch.bool)
        valid[:, :-1] = labels[:, 1:] != -100
        return valid
    raise InvalidArgumentError(f"token_mask must be 'attention' or 'labels', got {mode!r}")


# -- accumulation ------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    module: torch.nn.Module
    kind: str
    m: int
    n: int
    calls: list = field(default_factory=list)  # (x, g) pairs of this batch
    keys: list = field(default_factory=list)  # input identities of this batch's calls
    seen: list = field(default_factory=list)  # this batch's inputs (or their finite flags), to name the source of a NaN


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _valid_rows(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of the valid tokens and, when the call is per-token ``(B, L, ·)``,
    the number of valid tokens of each sample."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        m = mask.to(x.device)
        return x[m], m.sum(1)
    if mask is not None and x.dim() == 2 and x.shape[0] == mask.shape[0] and mask.dim() == 1:
        return x[mask.to(x.device)], None
    rows = _as_rows(x)
    lens = torch.full((x.shape[0],), x.shape[1], dtype=torch.long) if x.dim() == 3 else None
    return rows, lens


def _input_to_host(f: InputFactor, rows: torch.Tensor) -> None:
    """``Σ x xᵀ`` of ``rows`` into the float64 host accumulator (exact products)."""
    if rows.shape[0] == 0:
        return
    rows = rows.detach()
    if rows.dtype == torch.bfloat16:
        f.add(rows.cpu().contiguous().view(torch.int16).numpy().view(np.uint16))
    elif rows.dtype == torch.float64:
        f.add(rows.cpu().numpy())
    else:  # float32, float16 (exact in float32)
        f.add(rows.float().cpu().numpy())


def collect_statistics(
    model: torch.nn.Module,
    dataloader: Iterable[dict],
    target_modules=None,
    *,
    loss_fn: LossFn | None = None,
    token_mask: str = "attention",
    output_fisher: str = "diagonal",
    max_samples: int | None = None,
    max_device_bytes: int | None = None,
    max_host_bytes: int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    accumulate_on: str = "auto",
    reduce_across_ranks: bool = True,
    out: str | os.PathLike | None = None,
) -> Statistics:
    """One pass over ``dataloader`` → :class:`Statistics` for every target module (SPEC §2).

    ``loss_fn(model, batch)`` must return the per-sample losses ``(B,)``; the
    default handles causal LMs and sequence classification. ``output_fisher``
    is ``"diagonal"`` (``y`` only) or ``"sequence_lowrank"`` (also keeps the
    per-sample output-gradient sums ``u_s``).

    On a GPU the statistics are formed and summed on the device in float64
    and reach the host's compensated accumulators at the end of the pass (and
    at checkpoints). A planner (:mod:`lora_da.plan`, printed when
    ``progress``) sizes this from the free device memory less what the
    model's forward and backward take on the first batch; ``max_device_bytes``
    and ``max_host_bytes`` bound it. Statistics that do not fit the device at
    once are collected in several passes over the data (the dataloader must
    then yield the same batches each time). ``max_device_bytes=0`` sends every
    batch's rows to the host instead (slow; for a GPU short of memory). On
    the CPU the rows go to the Rust accumulators. ``accumulate_on`` ("auto",
    "device" or "host") overrides that choice (``"device"`` on a CPU model
    runs the planned float64 path on the CPU). The model's parameters
    receive no ``.grad`` (they are restored).

    Long passes: with ``checkpoint_path`` and ``checkpoint_every = N`` the
    statistics so far are written (atomically) every N batches; with
    ``resume`` (the default) an existing checkpoint is loaded and its batches
    are skipped, so the dataloader must yield the same batches in the same
    order. A batch that fails (non-finite values, ...) raises; the last
    checkpoint stays valid.

    Data-parallel runs: when ``torch.distributed`` is initialized with more
    than one rank, every rank passes its own shard (a ``DistributedSampler``)
    and receives the statistics of all shards, summed exactly
    (:func:`lora_da.distributed.all_reduce_statistics`); the ranks also agree
    on one memory plan. ``reduce_across_ranks=False`` keeps each rank's own.
    A checkpoint path gets the rank in its name (``ck.rank1.safetensors``).

    Keeping the statistics of a large model (SPEC §7): the host's share is
    counted before the first batch against the available memory (and
    ``max_host_bytes``): the statistics themselves and the transfer staging.
    If they do not fit, the call refuses with the bytes needed and available.
    With ``out=PATH`` each pass's sums are written into the statistics file
    as the pass ends, so the host holds about one group's worth beside the
    model, and the result is memory-mapped from that file
    (:meth:`Statistics.load` with ``mmap=True``); ``compute_init`` then reads
    one group at a time. On the host path (a CPU model) ``out`` is written at
    the end.
    """
    group = active_group(reduce_across_ranks)
    if out is not None and (checkpoint_path is not None or group is not None):
        raise InvalidArgumentError(
            "collect_statistics: out= (statistics written pass by pass) works without checkpoint_path and outside a "
            "process group; collect, then save the result on one rank"
        )
    if group is not None:
        check_same_options(dict(target_modules=target_modules, loss_fn=loss_fn, token_mask=token_mask,
                                output_fisher=output_fisher, accumulate_on=accumulate_on), group, "collect_statistics")
    if group is not None and checkpoint_path is not None:
        checkpoint_path = _rank_path(checkpoint_path)
    run = _Run.start(model, dataloader, target_modules, loss_fn=loss_fn, token_mask=token_mask,
                     output_fisher=output_fisher, max_samples=max_samples, checkpoint_path=checkpoint_path,
                     checkpoint_every=checkpoint_every, resume=resume, progress=progress)
    on_host = _on_host(run.device, max_device_bytes, accumulate_on)
    if run.finished is not None:  # a rerun of a finished checkpointed pass: its statistics, once the data match
        with together(group, "collect"):
            run.confirm_finished()
    elif on_host:
        run.check_host_floor(max_host_bytes, streaming=False)
        with together(group, "collect"):
            run.collect_on_host()
    else:
        run.check_host_floor(max_host_bytes, streaming=out is not None)
        run.collect_on_device(max_device_bytes=max_device_bytes, max_host_bytes=max_host_bytes, keep_on_host=True,
                              group=group, to_disk=out)
    if out is not None and not on_host:
        if run.n_samples == 0:
            raise InvalidArgumentError("collect_statistics: the dataloader yielded no sample")
        stats = Statistics.load(out, mmap=True)
        stats.plan = run.plan
        return stats
    if group is None:
        stats = run.finish()
        if out is not None:
            stats.save(out)
        return stats
    # A rank without samples must still join the sum, or the others would wait forever.
    if agree([float(run.n_samples == 0)], group, "max")[0]:
        raise InvalidArgumentError("collect_statistics: a rank's dataloader yielded no sample; every rank needs a shard")
    stats = run.finish()
    total = all_reduce_statistics(stats, group)
    total.plan = stats.plan
    return total


def _rank_path(path) -> str:
    """``ck.safetensors`` → ``ck.rank<r>.safetensors``: each rank checkpoints its own shard."""
    import torch.distributed as dist

    p = Path(path)
    return str(p.with_name(f"{p.stem}.rank{dist.get_rank()}{p.suffix}"))


def _on_host(device: torch.device, max_device_bytes: int | None, accumulate_on: str) -> bool:
    if accumulate_on not in ("auto", "device", "host"):
        raise InvalidArgumentError(f"accumulate_on must be 'auto', 'device' or 'host', got {accumulate_on!r}")
    if accumulate_on != "auto":
        return accumulate_on == "host"
    return device.type == "cpu" or max_device_bytes == 0


def _device_free(dev: torch.device) -> int:
    """Bytes the statistics may take on ``dev``: free device memory plus what
    the caching allocator holds unused (the host's available memory on the CPU)."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return available_host_bytes() or (1 << 62)


# -- one collection run: its state, its passes ----------------------------------------


class _BackwardDone(Exception):
    """Raised from the last awaited tensor hook to end the backward pass there."""


class _Recorder:
    """The hooks of one pass, with their own lifetime: a forward hook on each
    target pairs the call's input with a tensor hook on its output, and
    ``sink(target, x, g, key)`` receives the pair when the gradient arrives.
    Per batch each target keeps its calls' input identities (``keys``, for
    shared-input detection) and, in ``seen``, its inputs (host path) or whether
    each was finite (device path), to name the source of non-finite values."""

    def __init__(self, targets: Sequence[_Target], sink, stop_early: bool = False, keep_inputs: bool = True):
        self.targets, self.sink, self.handles = list(targets), sink, []
        # ``seen`` holds the inputs themselves (scanned only when a loss is not
        # finite) or, where they should not outlive their call, a finite flag each.
        self.keep_inputs = keep_inputs
        # With ``stop_early`` the backward is cut once every call of this batch
        # had its gradient: a pass over the top layers need not reach the bottom.
        self.stop_early, self.expect, self.received = stop_early, None, 0
        self.recomputes = False

    def __enter__(self) -> _Recorder:
        self.handles = [t.module.register_forward_hook(self._hook(t)) for t in self.targets]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.clear()

    def clear(self) -> None:
        self.received = 0
        for t in self.targets:
            t.calls.clear()
            t.keys.clear()
            t.seen.clear()

    def _hook(self, target: _Target):
        sink = self.sink
        recorder = self

        def hook(module, args, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version)
            target.keys.append(key)
            target.seen.append(x if recorder.keep_inputs else torch.isfinite(x).all())

            def grad_hook(g):
                sink(target, x, g.detach(), key)
                recorder.received += 1
                if recorder.expect is not None and recorder.received >= recorder.expect:
                    raise _BackwardDone

            output.register_hook(grad_hook)

        return hook


@dataclass
class _Run:
    """The state of one collection run: targets, host accumulators, counts."""

    model: torch.nn.Module
    dataloader: Iterable[dict]
    targets: dict[str, _Target]
    loss_fn: LossFn
    token_mask: str
    per_sample: bool
    max_samples: int | None
    checkpoint_path: str | os.PathLike | None
    checkpoint_every: int | None
    progress: bool
    config: dict
    outputs: dict[str, OutputFactor]
    grad_sums: dict[str, np.ndarray]
    inputs: dict[str, InputFactor] = field(default_factory=dict)
    groups: dict[str, str] | None = None  # module → group leader, fixed on the first batch
    n_samples: int = 0
    skip: int = 0
    batches_done: int = 0
    n_samples_at_start: int = 0
    plan: MemoryPlan | None = None
    recomputes: bool = False  # the model ran forward calls inside its backward (seen on the probe)
    fingerprints: dict = field(default_factory=dict)  # model / data fingerprints written into checkpoints
    expected_data: str | None = None  # the resumed checkpoint's data fingerprint
    micro: int = 1  # samples per forward + backward on the planned device path (plan.micro_batch, lowered on OOM)
    finished: Statistics | None = None  # a finished checkpoint of this very pass, returned as it is
    grads_written: set = field(default_factory=set)  # modules whose host Ḡ holds sums (the others are still zero)

    @classmethod
    def start(cls, model, dataloader, target_modules, *, loss_fn, token_mask, output_fisher, max_samples,
              checkpoint_path, checkpoint_every, resume, progress) -> _Run:
        if checkpoint_every is not None and (checkpoint_path is None or checkpoint_every < 1):
            raise InvalidArgumentError(f"checkpoint_every={checkpoint_every!r} needs a checkpoint_path and must be ≥ 1")
        if output_fisher not in ("diagonal", "sequence_lowrank"):
            raise InvalidArgumentError(f"output_fisher must be 'diagonal' or 'sequence_lowrank', got {output_fisher!r}")
        if max_samples is not None and max_samples <= 0:
            raise InvalidArgumentError(f"max_samples must be > 0, got {max_samples}")
        token_mask_of({"attention_mask": None, "labels": torch.zeros(1, 1, dtype=torch.long)}, token_mask)
        named = dict(model.named_modules())
        targets = {}
        for name in resolve_targets(model, target_modules):
            mod = named[name]
            kind = linear_kind(mod)
            m, n = module_shape(mod, kind)
            targets[name] = _Target(name, mod, kind, m, n)
        per_sample = output_fisher == "sequence_lowrank"
        run = cls(
            model=model, dataloader=dataloader, targets=targets, loss_fn=loss_fn or default_loss, token_mask=token_mask,
            per_sample=per_sample, max_samples=max_samples, checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every, progress=progress,
            config={"token_mask": token_mask, "output_fisher": output_fisher},
            outputs={name: OutputFactor(t.m, per_sample=per_sample) for name, t in targets.items()},
            grad_sums={name: np.zeros((t.m, t.n)) for name, t in targets.items()},
        )
        if checkpoint_path is not None:
            run.fingerprints["model_fingerprint"] = _model_fingerprint(targets)
            # a finished pass is reused only for the same sample budget
            run.fingerprints["max_samples"] = None if max_samples is None else int(max_samples)
        if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
            run._resume(Statistics.load(checkpoint_path))
        return run

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _resume(self, ck: Statistics) -> None:
        _check_is_checkpoint(self.checkpoint_path, ck)
        want = {n: (t.n, t.m, t.kind) for n, t in self.targets.items()}
        have = {n: (i.in_features, i.out_features, i.kind) for n, i in ck.modules.items()}
        if want != have or any(ck.config.get(k) != v for k, v in self.config.items()):
            raise StatisticsFileError(
                f"{self.checkpoint_path}: the checkpoint is for other modules or options; delete it or pass resume=False"
            )
        _check_checkpoint_identity(self.checkpoint_path, ck, self.fingerprints["model_fingerprint"])
        self.expected_data = ck.config.get("data_fingerprint")
        if ck.config.get("finished"):
            if ck.config.get("max_samples", "unrecorded") != self.fingerprints["max_samples"]:
                raise StatisticsFileError(
                    f"{self.checkpoint_path}: the checkpoint holds a finished pass with max_samples="
                    f"{ck.config.get('max_samples', 'unrecorded')}, not {self.max_samples}; delete it or pass "
                    "resume=False to collect again"
                )
            self.finished, self.n_samples = ck, ck.n_samples
            self.batches_done = int(ck.config["batches_done"])
            return
        self.inputs, self.outputs = ck.input_factors, ck.output_factors
        self.grad_sums = {n: g.copy() for n, g in ck.grad_sums.items()}
        self.grads_written = set(self.grad_sums)
        self.groups = {n: i.input_group for n, i in ck.modules.items()}
        self.n_samples, self.skip = ck.n_samples, int(ck.config["batches_done"])
        self.batches_done = self.skip
        if self.progress:
            total = _length(self.dataloader)
            print(f"lora-da: {self.checkpoint_path}: resuming at batch {self.skip + 1}"
                  f"{f' of {total}' if total is not None else ''} ({self.n_samples} samples already summed)",
                  file=sys.stderr)

    def confirm_finished(self) -> None:
        """A finished checkpoint stands for this pass only on the same data: its first
        batch (and its length, when the dataloader has one and no max_samples cut it)."""
        first = next(iter(self.dataloader), None)
        if not isinstance(first, Mapping) or _batch_digest(first) != self.expected_data:
            raise StatisticsFileError(
                f"{self.checkpoint_path}: the checkpoint holds a finished pass on other data or another order (its "
                "first batch differs from this dataloader's); delete it or pass resume=False"
            )
        total = _length(self.dataloader)
        if self.max_samples is None and total is not None and total != self.batches_done:
            raise StatisticsFileError(
                f"{self.checkpoint_path}: the checkpoint holds a finished pass of {self.batches_done} batches, but this "
                f"dataloader has {total}; delete it or pass resume=False"
            )
        if self.progress:
            print(f"lora-da: {self.checkpoint_path}: the pass already finished ({self.n_samples} samples, "
                  f"{self.batches_done} batches) on this model, data and options; returning its statistics",
                  file=sys.stderr)

    def snapshot(self) -> Statistics:
        modules = self._module_infos()
        return Statistics(
            modules=modules,
            input_factors=self.inputs,
            output_factors=self.outputs,
            # not copied: a checkpoint is written at once, and finish() ends the run (a copy
            # would double the host's largest share, Ḡ, at the very end)
            grad_sums=dict(self.grad_sums),
            n_samples=self.n_samples,
            config=dict(self.config, batches_done=self.batches_done, **self.fingerprints),
            model=self._model_info(),
        )

    def finish(self) -> Statistics:
        if self.finished is not None:
            return self.finished
        if self.n_samples == 0:
            raise InvalidArgumentError("collect_statistics: the dataloader yielded no sample")
        empty = [g for g, f in self.inputs.items() if f.tokens == 0]
        if empty:
            raise InvalidArgumentError(f"collect_statistics: no valid token reached module(s) {empty}; check token_mask")
        stats = self.snapshot()
        stats.plan = self.plan
        if self.checkpoint_path is not None:
            # marked finished: a later run with resume=True refuses it instead of returning it unchanged
            replace(stats, config=dict(stats.config, finished=True)).save(self.checkpoint_path)
        return stats

    def _set_groups(self, host_factors: bool = True) -> None:
        """Fix the input groups on the first batch. ``host_factors``: create the
        groups' host accumulators now (the host path adds rows to them); the
        device path creates them when a pass is first flushed, and not at all
        when its passes are solved on the device."""
        if self.groups is None:
            self.groups = _detect_groups(self.targets)
            if host_factors:
                for name, leader in self.groups.items():
                    if leader == name:
                        self.inputs.setdefault(name, InputFactor(self.targets[name].n))
        else:
            _check_groups(self.targets, self.groups)

    # -- the batches ---------------------------------------------------------------

    def batches(self):
        """``(index, batch, bsz, mask)`` on the model's device, truncated at ``max_samples``."""
        skip = self.skip
        seen = self.n_samples_at_start  # a resumed checkpoint's samples count towards max_samples
        for index, batch in enumerate(self.dataloader):
            if index == 0 and self.checkpoint_path is not None and isinstance(batch, Mapping):
                self._check_data_order(batch)
            if index < skip:
                continue
            if self.max_samples is not None and seen >= self.max_samples:
                break
            if not isinstance(batch, Mapping):
                raise InvalidArgumentError(
                    f"batch {index} is a {type(batch).__name__}, not a dict of tensors: each batch must be collated "
                    "(input_ids, attention_mask and, for classification, labels), e.g. by a DataLoader with "
                    "transformers' DataCollatorWithPadding"
                )
            batch = dict(batch)
            device = self.device
            batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            bsz = _batch_size(batch)
            if self.max_samples is not None and seen + bsz > self.max_samples:
                keep = self.max_samples - seen
                batch = {k: (v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == bsz else v)
                         for k, v in batch.items()}
                bsz = keep
            seen += bsz
            yield index, batch, bsz, token_mask_of(batch, self.token_mask)

    def _check_data_order(self, first: Mapping) -> None:
        """The first batch stands for the data and its order: a checkpoint resumed on
        other data would skip batches it never saw and add the rest to the wrong sums."""
        digest = _batch_digest(first)
        if self.expected_data is not None and digest != self.expected_data:
            raise StatisticsFileError(
                f"{self.checkpoint_path}: the checkpoint was collected on other data or another order (its first batch "
                "differs from this dataloader's); delete it or pass resume=False"
            )
        self.fingerprints["data_fingerprint"] = digest

    @staticmethod
    def fingerprint(batch: dict) -> tuple:
        """Shapes and sums of a batch's tensors: several passes must see the same batches."""
        return tuple((k, tuple(v.shape), float(v.double().sum())) for k, v in sorted(batch.items())
                     if isinstance(v, torch.Tensor))

    def forward_backward(self, batch: dict, bsz: int, index: int, recorder: _Recorder) -> None:
        """The back-propagated loss is ``Σ_s ℓ_s`` (SPEC §2); the hooks see the rest."""
        recorder.clear()
        with torch.enable_grad():
            # The hooks need outputs that require grad: make the embedding output do so.
            handle = _make_inputs_require_grad(self.model)
            embeds = batch.get("inputs_embeds")
            if isinstance(embeds, torch.Tensor) and embeds.is_floating_point() and not embeds.requires_grad:
                # the embedding layer is not called for inputs_embeds: start the graph at them instead
                batch = dict(batch, inputs_embeds=embeds.detach().requires_grad_(True))
            try:
                losses = self.loss_fn(self.model, batch)
            finally:
                handle.remove()
            _check_losses(losses, bsz)
            if losses.dim() != 1 or losses.shape[0] != bsz:
                raise ShapeError(f"loss_fn must return per-sample losses of shape ({bsz},), got {tuple(losses.shape)}")
            if not torch.all(torch.isfinite(losses)):
                bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
                source = next((t.name for t in recorder.targets if any(not bool(torch.isfinite(f).all()) for f in t.seen)),
                              None)
                where = f"module {source}: non-finite input activation in " if source else ""
                raise NonFiniteError(f"{where}batch {index}: non-finite loss for samples {bad}")
            before = sum(len(t.keys) for t in recorder.targets)
            if not (recorder.stop_early and before):
                losses.sum().backward()
                # A forward call made during the backward (reentrant activation
                # checkpointing recomputes its segment there) could come after the
                # count the cut awaits: then the backward must always run to its end.
                recorder.recomputes = recorder.recomputes or sum(len(t.keys) for t in recorder.targets) > before
                return
            recorder.expect = before
            try:
                losses.sum().backward()
            except _BackwardDone:
                pass  # every hooked output has its gradient: the rest of the graph is not needed
            finally:
                recorder.expect = None

    def _checkpoint_due(self) -> bool:
        return self.checkpoint_every is not None and self.batches_done % self.checkpoint_every == 0

    def _bar(self, desc: str, batch_size: int | None = None):
        """A progress bar over the batches still to come, with a total (and so an ETA)
        whenever it is known: the dataloader's length, less the batches a resumed run
        skips, and the batches ``max_samples`` leaves at the dataloader's ``batch_size``
        (or ``batch_size``, the first batch's size), whichever is fewer."""
        total = None
        try:
            total = max(0, len(self.dataloader) - self.skip)
        except TypeError:  # an iterable without a length
            pass
        if self.max_samples is not None:
            bs = batch_size or getattr(self.dataloader, "batch_size", None)
            if isinstance(bs, int) and bs > 0:
                left = -(-max(0, self.max_samples - self.n_samples_at_start) // bs)
                total = left if total is None else min(total, left)
        return tqdm(desc=desc, total=total, unit="batch", disable=not self.progress)

    # -- the host path: rows to the Rust accumulators -----------------------------------

    def collect_on_host(self) -> None:
        """Every batch's rows go to the host (the CPU path, or ``max_device_bytes=0``)."""
        self.n_samples_at_start = self.n_samples

        def keep(target, x, g, key):
            target.calls.append((x, g, key))

        with _frozen(self.model), _Recorder(self.targets.values(), keep) as rec, self._bar("lora-da: collecting statistics") as bar:
            for index, batch, bsz, mask in self.batches():
                self.forward_backward(batch, bsz, index, rec)
                self._set_groups()
                _accumulate_batch(self.targets, self.groups, self.inputs, self.outputs, self.grad_sums, mask, index,
                                  self.per_sample)
                if not self.per_sample:
                    for o in self.outputs.values():
                        o.count_samples(bsz)
                self.n_samples += bsz
                self.batches_done = index + 1
                bar.update(1)
                if self._checkpoint_due():
                    self.snapshot().save(self.checkpoint_path)

    # -- the device path: float64 sums on the GPU, planned ------------------------------

    def probe(self, first) -> Step:
        """Forward + backward of the first batch with nothing accumulated: fixes
        the input groups and measures what a plain step takes on the device
        (SPEC §7). A step that runs out of device memory is tried again on half
        as many samples, down to one: nothing is summed here, so nothing is lost."""
        index, batch, bsz, mask = first
        dev = self.device
        cuda = dev.type == "cuda"
        mb = bsz
        while True:
            sub = batch if mb == bsz else _slice_batch(batch, bsz, 0, mb)
            if cuda:
                torch.cuda.synchronize(dev)
                before = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            failed = False
            try:
                with _Recorder(self.targets.values(), lambda *a: None, keep_inputs=False) as rec:
                    self.forward_backward(sub, mb, index, rec)
                    calls = sum(len(t.keys) for t in self.targets.values())
                    self._set_groups(host_factors=False)
            except OutOfMemoryError:
                failed = True
            if not failed:
                break
            _release(dev)
            if mb == 1:
                raise LoraDAError(
                    f"collect: one sample's forward + backward does not fit on {dev} "
                    f"({_device_free(dev) / 2**30:.2f} GiB free beside the model): shorten the sequences "
                    "(max_length), turn on gradient checkpointing (model.gradient_checkpointing_enable()), "
                    "or collect on a larger device"
                )
            mb = (mb + 1) // 2
        if cuda:
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        self.recomputes = rec.recomputes
        step = torch.cuda.max_memory_allocated(dev) - before if cuda else 0
        ids = sub.get("input_ids")
        per_sample = int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 1
        widest = max(t.n + 2 * t.m for t in self.targets.values())
        return Step(samples=mb, bytes=int(step), seconds=seconds, tokens_per_sample=per_sample, calls=calls,
                    widest=widest)

    def units(self) -> list[Unit]:
        out: dict[str, list] = {}
        for name, leader in self.groups.items():
            out.setdefault(leader, []).append((name, self.targets[name].m))
        return [Unit(group=g, n=self.targets[g].n, modules=tuple(mods)) for g, mods in out.items()]

    def plan_device(self, step: Step, batch: int, *, max_device_bytes, max_host_bytes, keep_on_host: bool,
                    group=None, to_disk=None) -> MemoryPlan:
        """SPEC §7: everything the device will hold against what is free now, before the first pass."""
        dev = self.device
        units = self.units()
        device_free = _device_free(dev)
        host_free = available_host_bytes() if keep_on_host else None
        if group is not None:
            # every rank plans from the same figures: the least room, the largest step
            big = float(1 << 62)
            vals = agree([float(device_free), float(host_free if host_free is not None else big), float(step.samples),
                          -float(step.bytes), -step.seconds, -float(step.tokens_per_sample), -float(batch)], group, "min")
            device_free, host = int(vals[0]), vals[1]
            host_free = None if host_free is None else int(host)
            step = replace(step, samples=int(vals[2]), bytes=int(-vals[3]), seconds=-vals[4],
                           tokens_per_sample=int(-vals[5]))
            batch = int(-vals[6])
        plan = choose_plan(units, step, batch=batch, device_free=device_free, max_device_bytes=max_device_bytes,
                           host_free=host_free, max_host_bytes=max_host_bytes, keep_on_host=keep_on_host,
                           to_disk=to_disk, max_solve_workers=DEVICE_SOLVE_WORKERS if dev.type == "cuda" else 1)
        if step.samples < batch:
            plan.notes.insert(0, f"the first batch ({batch} samples) ran out of device memory in a plain forward + "
                                 f"backward; it fit at {step.samples}")
        return plan

    def collect_on_device(self, *, max_device_bytes, max_host_bytes, keep_on_host: bool, on_pass=None,
                          group=None, to_disk=None) -> None:
        """Plan, then one pass per group of input groups that fits the device:
        float64 sums on the GPU, flushed to the host (``keep_on_host``; into the
        file ``to_disk`` as each pass ends when given) or handed to
        ``on_pass(sums)`` (which solves them on the device) after the pass.
        Under a process group (``group``) the ranks plan together: the same
        passes everywhere, sized for the rank with the least room.

        Out of device memory during a pass, the plan shrinks and the work goes
        on from where it stopped (SPEC §7): a pass whose sums cannot be
        allocated is split in two; a step that fails is redone at half the
        micro-batch, skipping the module calls whose products it had already
        summed, so nothing is lost and nothing is counted twice."""
        self.n_samples_at_start = self.n_samples
        dev = self.device
        with _frozen(self.model):
            stream = self.batches()
            with together(group, "collect: the first batch"):
                first = next(stream, None)
                if first is not None:
                    step = self.probe(first)
            if group is not None and agree([float(first is None)], group, "max")[0]:
                raise InvalidArgumentError("collect: a rank's dataloader yielded no sample; every rank needs a shard")
            if first is None:
                return
            self.plan = self.plan_device(step, first[2], max_device_bytes=max_device_bytes,
                                         max_host_bytes=max_host_bytes, keep_on_host=keep_on_host, group=group,
                                         to_disk=to_disk)
            self.micro = self.plan.micro_batch or first[2]
            if self.progress:
                print(self.plan.describe(), file=sys.stderr)
            passes = self.plan.passes
            self._check_multipass(len(passes))
            writer = None
            if to_disk is not None:
                writer = self.open_writer(to_disk, [u for p in passes for u in p])
            staging = _Staging(dev)
            first_prints: list = []  # the first pass's batch fingerprints, when there are several passes
            p = 0
            try:
                while p < len(passes):
                    pass_units = passes[p]
                    try:
                        sums = _DeviceSums(pass_units, self.targets, self.groups, dev, self.per_sample)
                    except OutOfMemoryError:
                        sums = None
                    if sums is None:
                        self._split_pass(passes, p)
                        continue
                    source = itertools.chain([first], stream) if p == 0 else self.batches()
                    names = [name for u in pass_units for name, _ in u.modules]
                    check = lambda: _check_groups({n: self.targets[n] for n in names},  # noqa: E731
                                                  {n: self.groups[n] for n in names})
                    samples = 0
                    prints = []
                    # an error on one rank is raised on all at the end of the pass (no rank left waiting)
                    with together(group, f"collect: pass {p + 1}"):
                        with _Recorder([self.targets[n] for n in names], sums.add, stop_early=not self.recomputes,
                                       keep_inputs=False) as rec, \
                                self._bar(f"lora-da: pass {p + 1}/{len(passes)}",
                                          batch_size=first[2]) as bar:
                            for index, batch, bsz, mask in source:
                                if len(passes) > 1:
                                    prints.append(self.fingerprint(batch))
                                    if p > 0 and (len(prints) > len(first_prints)
                                                  or prints[-1] != first_prints[len(prints) - 1]):
                                        raise InvalidArgumentError(
                                            f"pass {p + 1} got other data than pass 1 at batch {index}: the dataloader "
                                            "must yield the same batches on every pass (no shuffling), or raise "
                                            "max_device_bytes for one pass"
                                        )
                                self._batch_steps(batch, bsz, index, rec, sums, check)
                                samples += bsz
                                bar.update(1)
                                if p == 0:
                                    self.n_samples += bsz
                                    self.batches_done = index + 1
                                    if keep_on_host and writer is None and self._checkpoint_due():
                                        sums.flush(self, staging)
                                        self.snapshot().save(self.checkpoint_path)
                        if p == 0:
                            first_prints = prints
                        if p > 0 and samples != self.n_samples - self.n_samples_at_start:
                            raise InvalidArgumentError(
                                f"pass {p + 1} saw {samples} samples, the first {self.n_samples - self.n_samples_at_start}: "
                                "the dataloader must yield the same batches on every pass"
                            )
                    if writer is not None:
                        sums.write(self, staging, self.n_samples)
                    elif keep_on_host:
                        sums.flush(self, staging)
                    else:
                        on_pass(sums, self.n_samples)
                    del sums
                    p += 1
                if writer is not None:
                    writer.finish(self.stream_header())
                    writer = None
            finally:
                if writer is not None:
                    writer.abort()

    def open_writer(self, path, units: list[Unit]) -> StatisticsWriter:
        """The statistics file that each pass's sums go to as it ends (SPEC §6, §7)."""
        modules = self._module_infos()
        self._written = {"groups": {}, "outputs": {}}
        placeholder = file_header(
            modules=modules, groups={u.group: {"n": u.n, "tokens": 10**18} for u in units},
            outputs={n: {"tokens": 10**18, "samples": 10**18, "per_sample": self.per_sample} for n in modules},
            n_samples=10**18, config=dict(self.config, batches_done=10**18, **self.fingerprints), model=self._model_info())
        self.writer = StatisticsWriter(path, modules, {u.group: u.n for u in units}, self.per_sample, placeholder)
        return self.writer

    def stream_header(self) -> dict:
        modules = self._module_infos()
        return file_header(modules=modules, groups=self._written["groups"], outputs=self._written["outputs"],
                           n_samples=self.n_samples, config=dict(self.config, batches_done=self.batches_done,
                                                                 **self.fingerprints), model=self._model_info())

    def _module_infos(self) -> dict[str, ModuleInfo]:
        return {name: ModuleInfo(name=name, in_features=t.n, out_features=t.m, kind=t.kind, input_group=self.groups[name])
                for name, t in self.targets.items()}

    def _model_info(self) -> dict:
        return {"class": type(self.model).__name__,
                "name_or_path": getattr(getattr(self.model, "config", None), "_name_or_path", "")}

    def check_host_floor(self, max_host_bytes: int | None, *, streaming: bool) -> None:
        """Before the first batch (SPEC §7): the host must hold at least every module's ``Ḡ`` and ``y``
        sums, whatever the input groups turn out to be (the plan counts the rest after the probe)."""
        if streaming:
            return
        need = sum(8 * (t.m * t.n + 2 * t.m) for t in self.targets.values())
        have = available_host_bytes()
        if max_host_bytes is not None:
            have = max_host_bytes if have is None else min(have, max_host_bytes)
        if have is not None and need > have:
            raise InvalidArgumentError(
                f"collect_statistics: the statistics need at least {need / 2**30:.2f} GiB of host memory ({need} bytes: "
                f"the mean gradients alone) but {have / 2**30:.2f} GiB ({have} bytes) are available; target fewer "
                "modules, use collect_and_solve (initialize_lora_da_weights / get_lora_da_state_dict) which keeps no "
                "statistics, or pass out=PATH to write them to disk as they are collected (on a GPU)"
            )

    def _check_multipass(self, n_passes: int) -> None:
        if n_passes <= 1:
            return
        if self.checkpoint_path is not None:
            raise InvalidArgumentError(
                f"checkpointing needs a one-pass plan; this one has {n_passes} passes: raise max_device_bytes "
                "or collect fewer modules per run"
            )
        if iter(self.dataloader) is self.dataloader:
            raise InvalidArgumentError(
                f"the plan needs {n_passes} passes over the data but the dataloader is a one-shot iterator; "
                "pass a list or a DataLoader"
            )

    def _split_pass(self, passes: list, p: int) -> None:
        """The sums of pass ``p`` could not be allocated (nothing of it is summed
        yet): split it in two, or give up when it holds one input group."""
        _release(self.device)
        units = passes[p]
        if len(units) == 1:
            raise LoraDAError(
                f"collect: out of device memory allocating the float64 sums of input group {units[0].group} "
                f"({units[0].device_bytes / 2**30:.2f} GiB; {_device_free(self.device) / 2**30:.2f} GiB free): "
                "free device memory, or pass max_device_bytes=0 to accumulate on the host CPU (slow)"
            )
        half = len(units) // 2
        passes[p:p + 1] = [units[:half], units[half:]]
        self._note(f"out of device memory allocating pass {p + 1}'s sums: split it in two ({len(passes)} passes now)")
        self._check_multipass(len(passes))

    def _note(self, text: str) -> None:
        if self.plan is not None:
            self.plan.notes.append(text)
        if self.progress:
            print(f"lora-da: {text}", file=sys.stderr)

    def _batch_steps(self, batch, bsz: int, index: int, rec, sums, check) -> None:
        """One user batch, in micro-batches of ``self.micro`` samples (SPEC §2:
        the sums do not depend on how the samples are split)."""
        self._steps(batch, bsz, index, rec, sums, check, 0, bsz, frozenset())

    def _steps(self, batch, bsz, index, rec, sums, check, lo: int, hi: int, skip: frozenset) -> None:
        """Samples ``lo:hi`` of a batch. A step that runs out of device memory
        halves the micro-batch and is redone on its samples, skipping the
        module calls (``skip``) whose products it had already summed."""
        a = lo
        while a < hi:
            k = min(self.micro, hi - a)
            sub = batch if (a == 0 and k == bsz) else _slice_batch(batch, bsz, a, a + k)
            sums.begin_step(token_mask_of(sub, self.token_mask), skip)
            failed = False
            try:
                self.forward_backward(sub, k, index, rec)
                check()
            except OutOfMemoryError:
                failed = True
            if failed:
                done = sums.abort_step()
                rec.clear()
                _release(self.device)
                if self.micro == 1:
                    raise LoraDAError(
                        f"collect: out of device memory at batch {index} with micro-batches of one sample "
                        f"({_device_free(self.device) / 2**30:.2f} GiB free now); pass a smaller max_device_bytes "
                        "so that the plan keeps fewer sums on the device, or free device memory"
                    )
                self.micro = (self.micro + 1) // 2
                self._note(f"batch {index}: out of device memory; micro-batch lowered to {self.micro}, the step redone "
                           f"without its {len(done)} module call(s) already summed")
                self._steps(batch, bsz, index, rec, sums, check, a, a + k, skip | done)
            else:
                sums.end_step(k, index, rec.targets)
            a += k


class _DeviceSums:
    """Float64 running sums of one pass, on the device: per module ``Σ gᵀx``
    (all tokens), ``Σ g²`` and its token count (valid tokens), per input group
    ``Σ x xᵀ`` of the valid tokens as its lower block triangle (row blocks
    ``(b − a) × b``, :func:`lora_da.plan.gram_block_rows`). Products are formed
    in the tensor hook as each gradient arrives, so no call's tensors outlive
    its backward step; invalid tokens are zero-weighted rather than selected
    (no host sync).

    A step's additions are all-or-nothing per module call: the hook allocates
    every temporary first and adds in place last, and records the call as
    done; a step that fails (out of device memory) reports its done calls, so
    that the step can be redone without them (``begin_step``'s ``skip``)."""

    def __init__(self, units: list[Unit], targets: dict[str, _Target], groups: dict[str, str], device, per_sample: bool):
        f64 = dict(dtype=torch.float64, device=device)
        self.units = units
        self.grad_device = torch.device(device)
        self.grad = {n: torch.zeros(targets[n].m, targets[n].n, **f64) for u in units for n, _ in u.modules}
        self.sumsq = {n: torch.zeros(targets[n].m, **f64) for n in self.grad}
        self.tokens = {n: torch.zeros((), **f64) for n in self.grad}
        self.samples: dict[str, list] = {n: [] for n in self.grad}
        self.gram = {u.group: [torch.zeros(b - a, b, **f64) for a, b in gram_block_rows(u.n)] for u in units}
        self.gram_tokens = {u.group: torch.zeros((), **f64) for u in units}
        self.n_of = {u.group: u.n for u in units}
        self.groups = groups
        self.per_sample = per_sample
        self.flags: list = []
        self.called: set = set()
        self.batch_samples = 0
        self.mask = None
        self.skip: frozenset = frozenset()
        self.done: set = set()
        self.call_index: dict[str, int] = {}

    def begin_step(self, mask, skip: frozenset = frozenset()) -> None:
        self.mask, self.called, self.skip, self.done, self.call_index = mask, set(), skip, set(), {}

    def abort_step(self) -> frozenset:
        """The module calls of a failed step whose products were summed (its finite flags stay, to be checked)."""
        return frozenset(self.done)

    def add(self, target: _Target, x: torch.Tensor, g: torch.Tensor, key) -> None:
        name = target.name
        call = self.call_index.get(name, 0)
        self.call_index[name] = call + 1
        self.called.add(name)
        if (name, call) in self.skip:
            return  # summed by an earlier try of this step
        xr, gr = _as_rows(x), _as_rows(g)
        # x was checked by the forward hook (the recorder's ``seen``); only g is new here
        finite = torch.isfinite(gr).all()
        # Every temporary first (own float64 copies: a float64 model's tensors are
        # autograd's; zero-weighted in place below), the in-place sums last.
        xr, gr = _float64_copy(xr), _float64_copy(gr)
        w = _row_weights(x, self.mask)
        sq = gr.square()
        if w is not None:
            sq.mul_(w[:, None])  # w is 0/1: (w g)² = w g²
        sq = sq.sum(0)
        if self.per_sample:
            if x.dim() != 3:
                raise ShapeError(f"module {name}: sequence_lowrank needs per-token (B, L, m) outputs")
            rows = (gr if w is None else gr * w[:, None]).view(x.shape[0], x.shape[1], -1).sum(1)
        count = w.sum() if w is not None else None
        leader = self.groups[name] == name
        self.grad[name].addmm_(gr.T, xr)  # Ḡ: every token
        self.sumsq[name].add_(sq)
        self.tokens[name].add_(count if count is not None else gr.shape[0])
        if self.per_sample:
            self.samples[name].append(rows)
        if leader:
            if w is not None:
                xr.mul_(w[:, None])
            _add_gram_lower(self.gram[name], xr)
            self.gram_tokens[name].add_(count if count is not None else xr.shape[0])
        self.flags.append((name, "output gradient", finite))
        self.done.add((name, call))

    def end_step(self, samples: int, index: int, targets: Sequence[_Target]) -> None:
        """One sync per step: every module had a call with gradient (as on the
        host path), and every call's inputs (the finite flags the recorder's
        forward hooks kept in ``seen``) and gradients were finite."""
        missing = [n for n in self.grad if n not in self.called]
        if missing:
            raise LoraDAError(f"module {missing[0]}: no output gradient in batch {index}")
        flags = [(t.name, "input activation", f) for t in targets for f in t.seen] + self.flags
        if flags:
            ok = torch.stack([f for _, _, f in flags]).cpu()
            if not bool(ok.all()):
                name, what, _ = flags[int((~ok).nonzero()[0])]
                raise NonFiniteError(f"module {name}: non-finite {what} in batch {index}")
        self.flags = []
        self.batch_samples += samples

    def flush(self, run: _Run, staging: _Staging) -> None:
        """Into the host's compensated accumulators, then zero. The transfers and the
        host's additions of the groups run on several threads (the core and NumPy release
        the GIL), each with its own host copy: the plan counts ``FLUSH_THREADS`` of them."""
        from concurrent.futures import ThreadPoolExecutor

        tokens = {u.group: int(self.gram_tokens[u.group]) for u in self.units}
        for u in self.units:
            if u.group not in run.inputs:
                run.inputs[u.group] = InputFactor(u.n)

        local = threading.local()

        def gram(u):
            if tokens[u.group]:
                # assembled on the host, block by block: no n × n temporary on the device. One
                # buffer per thread, reused: fresh host pages cost more than the copy itself,
                # and add_gram reads only the lower triangle, which the blocks cover.
                buf = getattr(local, "buf", None)
                if buf is None or buf.size < u.n * u.n:
                    buf = local.buf = None
                    buf = local.buf = np.empty(u.n * u.n)
                full = buf[:u.n * u.n].reshape(u.n, u.n)
                for (a, b), blk in zip(gram_block_rows(u.n), self.gram[u.group]):
                    full[a:b, :b] = blk.cpu().numpy()
                run.inputs[u.group].add_gram(full, tokens[u.group])

        def grad(name):
            acc = run.grad_sums[name]
            if name in run.grads_written:
                np.add(acc, self.grad[name].cpu().numpy(), out=acc)
            else:  # still zero: the transfer lands in the accumulator, no host temporary
                torch.from_numpy(acc).copy_(self.grad[name])
                run.grads_written.add(name)

        workers = 1 if self.grad_device.type != "cuda" else FLUSH_THREADS
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(gram, u) for u in self.units] + [pool.submit(grad, n) for n in self.grad]
            for j in jobs:
                j.result()
        for u in self.units:
            for blk in self.gram[u.group]:
                blk.zero_()
            self.gram_tokens[u.group].zero_()
        for name, gsum in self.grad.items():
            u = None
            if self.per_sample:  # a flush after a checkpoint on the pass's last batch has no new sample: (0, m)
                u = (torch.cat(self.samples[name]).cpu().numpy() if self.samples[name]
                     else np.zeros((0, self.sumsq[name].shape[0])))
            run.outputs[name].add_sums(self.sumsq[name].cpu().numpy(), int(self.tokens[name]), u)
            if not self.per_sample:
                run.outputs[name].count_samples(self.batch_samples)
            gsum.zero_()
            self.sumsq[name].zero_()
            self.tokens[name].zero_()
            self.samples[name] = []
        self.batch_samples = 0

    def write(self, run: _Run, staging: _Staging, n_samples: int) -> None:
        """This pass's sums into the statistics file, group by group (SPEC §6), then free them."""
        writer = run.writer
        writer.set_samples(n_samples)
        for u in self.units:
            t = int(self.gram_tokens.pop(u.group))
            run._written["groups"][u.group] = {"n": u.n, "tokens": t}
            # the transpose's rows hold the lower triangle's columns: the file's packed order
            upper = _lower_full(self.gram.pop(u.group), u.n).T.contiguous()
            writer.write_gram(f"input.{u.group}", staging.host(upper))
            del upper
            for name, _ in u.modules:
                writer.write(f"grad.{name}", staging.host(self.grad.pop(name)))
                writer.write(f"output.{name}", self.sumsq.pop(name).cpu().numpy())
                samples = n_samples
                if self.per_sample:
                    rows = torch.cat(self.samples.pop(name)).cpu().numpy()
                    writer.write(f"samples.{name}", rows)
                    samples = rows.shape[0]
                run._written["outputs"][name] = {"tokens": int(self.tokens.pop(name)), "samples": samples,
                                                 "per_sample": self.per_sample}

    def reduce_across(self, group, n_samples: int, owner: dict[str, int]) -> int:
        """Sum this pass's device sums over the ranks of ``group`` into each
        input group's ``owner`` (the rank that solves it; exact float64 sums),
        and free the sums of the groups other ranks own: each rank sends what
        others solve and receives only what it solves itself, half the traffic
        of an all-reduce on two ranks. Per-sample rows are gathered. Returns
        the samples of all ranks."""
        import torch.distributed as dist

        from lora_da.distributed import collective_device, gather_objects, settle

        where = collective_device(group)
        me = dist.get_rank(group)
        # the token counts and the samples in one small all-reduce (every rank reads its own groups' counts)
        counts = torch.stack([*self.tokens.values(), *self.gram_tokens.values(),
                              torch.tensor(float(n_samples), dtype=torch.float64, device=self.grad_device)]).to(where)
        dist.all_reduce(counts, group=group)
        settle([counts])  # before any view of it holds a reference
        counts = counts.to(self.grad_device)
        for t, c in zip([*self.tokens.values(), *self.gram_tokens.values()], counts.unbind()):
            t.copy_(c)
        sent = []
        for u in self.units:
            dst = dist.get_global_rank(group, owner[u.group]) if group is not dist.group.WORLD else owner[u.group]
            for t in [*self.gram[u.group], *(x for name, _ in u.modules for x in (self.grad[name], self.sumsq[name]))]:
                if t.device == where:
                    dist.reduce(t, dst=dst, group=group)
                    sent.append(t)
                else:
                    moved = t.to(where)
                    dist.reduce(moved, dst=dst, group=group)
                    if owner[u.group] == me:
                        t.copy_(moved)
                    settle([moved])  # now, not at the end: the copies would add up to all the sums
        settle(sent)
        del sent
        if self.per_sample:
            mine = {n: torch.cat(v).cpu().numpy() if v else None for n, v in self.samples.items()}
            parts = gather_objects(mine, group)
            for n, rows in self.samples.items():
                got = [torch.from_numpy(p[n]) for p in parts if p[n] is not None]
                self.samples[n] = [torch.cat(got).to(self.grad[n].device)] if got else []
        # what other ranks solve is no longer needed here
        for u in self.units:
            if owner[u.group] != me:
                del self.gram[u.group]
                for name, _ in u.modules:
                    del self.grad[name], self.sumsq[name]
        self.units = [u for u in self.units if owner[u.group] == me]
        return int(round(float(counts[-1])))

    def unit_statistics(self, u: Unit, n_samples: int):
        """``Z``, and per module ``(y, Ḡ)``, of one input group on the device (SPEC §2)."""
        t = float(self.gram_tokens[u.group])
        if t == 0:
            raise InvalidArgumentError(f"collect: no valid token reached module(s) {[n for n, _ in u.modules]}; check token_mask")
        Z = _symmetric_from_lower(self.gram.pop(u.group), u.n).div_(t)
        per_module = []
        for name, _ in u.modules:
            y = self.sumsq.pop(name) / float(self.tokens.pop(name))
            G = self.grad.pop(name).div_(n_samples)
            u_s = torch.cat(self.samples.pop(name)).cpu().numpy() if self.per_sample else None
            per_module.append((name, y, G, u_s))
        return Z, per_module


def _add_gram_lower(rows: list[torch.Tensor], x: torch.Tensor) -> None:
    """``Σ xᵀx`` into its lower block triangle (row blocks ``(b − a) × b`` of
    ``GRAM_BLOCK`` rows, :func:`lora_da.plan.gram_block_rows`): ``Z`` is
    symmetric (SPEC §2), and the float64 products are the collection's main
    cost, so about 40 % of them are skipped, and the blocks above the diagonal
    take no memory."""
    for (a, b), blk in zip(gram_block_rows(x.shape[1]), rows):
        blk.addmm_(x[:, a:b].T, x[:, :b])


def _symmetric_from_lower(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """The full symmetric ``n × n`` matrix from the row blocks that :func:`_add_gram_lower`
    fills (the lower triangle of each diagonal block mirrored too); frees the blocks."""
    blocks = gram_block_rows(n)
    full = torch.empty(n, n, dtype=rows[0].dtype, device=rows[0].device)
    for (a, b), blk in zip(blocks, rows):
        full[a:b, :b].copy_(blk)
    rows.clear()
    for a, b in blocks:
        d = full[a:b, a:b]
        d.copy_(torch.tril(d).add_(torch.tril(d, -1).T))
        if b < n:
            full[a:b, b:].copy_(full[b:, a:b].T)
    return full


def _lower_full(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """An ``n × n`` matrix whose lower triangle is the Gram's (the rest is not read)."""
    full = torch.zeros(n, n, dtype=rows[0].dtype, device=rows[0].device)
    for (a, b), blk in zip(gram_block_rows(n), rows):
        full[a:b, :b].copy_(blk)
    return full


def _float64_copy(t: torch.Tensor) -> torch.Tensor:
    """lora-da's own per-call float64 copy (the fault-injection tests replace it)."""
    return t.to(torch.float64, copy=True)


def _slice_batch(batch: dict, bsz: int, lo: int, hi: int) -> dict:
    """Samples ``lo:hi`` of a collated batch: every tensor whose first dimension is the batch's."""
    return {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == bsz else v)
            for k, v in batch.items()}


class _Staging:
    """Host side of the device-to-host transfers of a flush: one page-locked
    buffer (on CUDA) reused for every tensor, so a pass's sums reach the host
    at the link's speed without a pageable copy each (SPEC §7 counts it)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.buf: torch.Tensor | None = None

    def host(self, t: torch.Tensor) -> np.ndarray:
        """A host copy of ``t`` (float64), valid until the next call."""
        if self.device.type != "cuda":
            return t.detach().cpu().numpy()
        k = t.numel()
        if self.buf is None or self.buf.numel() < k:
            self.buf = None
            self.buf = torch.empty(k, dtype=torch.float64, pin_memory=True)
        view = self.buf[:k].view(t.shape)
        view.copy_(t)
        return view.numpy()

    def lower(self, rows: list[torch.Tensor], n: int) -> np.ndarray:
        return self.host(_lower_full(rows, n))

    def add_into(self, acc: np.ndarray, t: torch.Tensor) -> None:
        """``acc += t`` (exact float64 addition; into zeros it is a copy)."""
        np.add(acc, self.host(t), out=acc)


def _row_weights(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Float64 0/1 weight of each row of ``x`` (its valid tokens, SPEC §2), or None when all count."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return mask.reshape(-1).to(device=x.device, dtype=torch.float64)
    if mask is not None and x.dim() == 2 and mask.dim() == 1 and x.shape[0] == mask.shape[0]:
        return mask.to(device=x.device, dtype=torch.float64)
    return None


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """Gradients are needed w.r.t. module outputs only: parameters take none
    during collection, and get their flags, ``.grad`` and mode back after."""
    requires = {p: p.requires_grad for p in model.parameters()}
    grads_before = {p: p.grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    # Gradient checkpointing (what a user short of GPU memory turns on) is active
    # only in training mode in transformers' layers: keep those layers' own flag
    # so the pass fits where training fits; their submodules stay in eval (no dropout).
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: its layers checkpoint by other means
        GradientCheckpointingLayer = ()
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
            p.grad = grads_before[p]
        for m, mode in modes.items():  # each module's own mode: a model may mix them
            m.training = mode


def _check_losses(losses, bsz: int) -> None:
    """What ``loss_fn`` returned must be the per-sample losses ``(B,)``: a real floating
    tensor attached to the model's graph (SPEC §2); anything else is named, with what to return."""
    what = "loss_fn(model, batch) must return a tensor of per-sample losses"
    if not isinstance(losses, torch.Tensor):
        raise InvalidArgumentError(f"{what} of shape ({bsz},), got a {type(losses).__name__}"
                                   + (" (return the losses alone, not a tuple)" if isinstance(losses, tuple) else ""))
    if losses.is_complex() or not losses.is_floating_point():
        raise InvalidArgumentError(f"{what} as real floats, got dtype {losses.dtype}")
    if losses.grad_fn is None and not losses.requires_grad:
        raise InvalidArgumentError(f"{what} computed from the model's outputs, got a tensor without gradient (detached, "
                                   "or computed under torch.no_grad())")


def _batch_size(batch: dict) -> int:
    for k in ("input_ids", "attention_mask", "labels", "inputs_embeds"):
        v = batch.get(k)
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ShapeError("cannot infer the batch size: no tensor in the batch")


def _make_inputs_require_grad(model: torch.nn.Module):
    """Make the input embeddings' output require grad (parameters are frozen
    during collection, so nothing else would start the graph)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        # Fall back to the first module that produces a floating tensor.
        emb = next(m for m in model.modules() if not list(m.children()))

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.requires_grad_(True) if output.is_leaf else output

    return emb.register_forward_hook(hook)


def _detect_groups(targets: dict[str, _Target]) -> dict[str, str]:
    """Modules whose calls saw the very same input tensors share one ``Z``."""
    leaders: dict[tuple, str] = {}
    groups = {}
    for name, t in targets.items():
        key = tuple(t.keys)
        if not key:
            raise LoraDAError(f"module {name} was not called with gradient in the first batch; it cannot be targeted")
        groups[name] = leaders.setdefault(key, name)
    return groups


def _check_groups(targets: dict[str, _Target], groups: dict[str, str]) -> None:
    for name, leader in groups.items():
        if leader != name and targets[name].keys != targets[leader].keys:
            raise LoraDAError(
                f"modules {leader} and {name} shared their input in the first batch but not in a later one; "
                "shared-input detection needs a fixed call pattern"
            )


def _accumulate_batch(targets, groups, inputs, outputs, grad_sums, mask, batch_index, per_sample):
    # Validate everything before adding anything: a bad batch leaves the statistics as they were.
    for name, t in targets.items():
        if not t.calls:
            raise LoraDAError(f"module {name}: no output gradient in batch {batch_index}")
        for x, g, _ in t.calls:
            if not torch.all(torch.isfinite(x)):
                raise NonFiniteError(f"module {name}: non-finite input activation in batch {batch_index}")
            if not torch.all(torch.isfinite(g)):
                raise NonFiniteError(f"module {name}: non-finite output gradient in batch {batch_index}")
    updates = []
    for name, t in targets.items():
        gsum = None
        sumsq = None
        tokens = 0
        samples = []
        for x, g, _ in t.calls:
            xr, gr = _as_rows(x), _as_rows(g)
            # Ḡ: exact gradient over all tokens, float64
            part = gr.double().T @ xr.double()
            gsum = part if gsum is None else gsum + part
            gv, lens = _valid_rows(g, mask)
            sq = (gv.double() ** 2).sum(0)
            sumsq = sq if sumsq is None else sumsq + sq
            tokens += gv.shape[0]
            if per_sample:
                if lens is None:
                    raise ShapeError(f"module {name}: sequence_lowrank needs per-token (B, L, m) outputs")
                starts = torch.cumsum(lens, 0) - lens
                samples.append(torch.stack([gv[s : s + l].double().sum(0) for s, l in zip(starts.tolist(), lens.tolist())]))
        updates.append((name, gsum, sumsq.cpu().numpy(), tokens, torch.cat(samples).cpu().numpy() if per_sample else None))
    for name, gsum, sumsq, tokens, u in updates:
        if not bool(torch.isfinite(gsum).all()):
            raise NonFiniteError(f"module {name}: the gradient overflowed float64 in batch {batch_index}")
    for name, gsum, sumsq, tokens, u in updates:
        acc = grad_sums[name]
        if isinstance(acc, torch.Tensor):
            acc.add_(gsum.to(acc.device))
        else:
            acc += gsum.cpu().numpy()
        outputs[name].add_sums(sumsq, tokens, u)
    for name, t in targets.items():
        if groups[name] != name:
            continue
        for x, _, _ in t.calls:
            xv, _ = _valid_rows(x, mask)
            _input_to_host(inputs[name], xv)



# -- checkpoint identity ---------------------------------------------------------------------


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


def _batch_digest(batch: Mapping) -> str:
    """The exact bytes of a batch's tensors (sums would not see a permutation within it)."""
    parts = []
    for k, v in sorted(batch.items(), key=lambda kv: str(kv[0])):
        if isinstance(v, torch.Tensor):
            raw = v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            parts.append(f"{k}|{v.dtype}|{tuple(v.shape)}".encode() + b"|" + raw)
    return _digest(b"\0".join(parts))


def _model_fingerprint(targets: dict[str, _Target]) -> str:
    """The targets' names, kinds and shapes, and a few values of each weight (its first
    and last 8): enough to tell another model, or other weights of the same shape."""
    parts = []
    for name, t in sorted(targets.items()):
        parts.append(f"{name}|{t.kind}|{t.m}|{t.n}".encode())
        w = getattr(t.module, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.numel() and w.device.type != "meta":
            flat = w.detach().reshape(-1)
            k = min(8, flat.numel())
            parts.append(torch.cat([flat[:k], flat[-k:]]).double().cpu().numpy().tobytes())
    return _digest(b"\0".join(parts))


def _length(dataloader) -> int | None:
    try:
        return len(dataloader)
    except (TypeError, NotImplementedError):  # an iterable without a length (a generator, an IterableDataset)
        return None


def _check_is_checkpoint(path, ck: Statistics) -> None:
    """Only a file a checkpointed pass wrote is resumed: it carries the fingerprints of its
    model and data. A plain statistics file (``Statistics.save``, ``lora-da collect``)
    has none, and resuming it would hand another model's statistics back."""
    missing = [k for k in ("model_fingerprint", "data_fingerprint") if not ck.config.get(k)]
    if missing or "batches_done" not in ck.config:
        raise StatisticsFileError(
            f"{path}: not a checkpoint (no {' or '.join(missing) or 'batches_done'}): a statistics file from "
            "Statistics.save or 'lora-da collect' cannot be resumed; pass another checkpoint_path (or resume=False "
            "to overwrite it), and load statistics with lora_da.Statistics.load"
        )


def _check_checkpoint_identity(path, ck: Statistics, model_fingerprint: str) -> None:
    """Refuse a checkpoint written for another model (a finished one too)."""
    have = ck.config.get("model_fingerprint")
    if have != model_fingerprint:
        raise StatisticsFileError(
            f"{path}: the checkpoint was collected on another model (its target weights differ from this "
            "model's); delete it or pass resume=False"
        )
