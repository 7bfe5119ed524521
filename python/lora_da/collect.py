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

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from lora_da._core import InputFactor, OutputFactor
from lora_da.errors import InvalidArgumentError, LoraDAError, NonFiniteError, ShapeError, StatisticsFileError
from lora_da.statistics import ModuleInfo, Statistics

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
        out = [n for n in named if n and any(n == k or n.endswith("." + k) for k in keys)]
    if not out:
        raise InvalidArgumentError(f"target_modules={target_modules!r} matches no module of {type(model).__name__}")
    bad = [n for n in out if linear_kind(named[n]) is None]
    if bad:
        raise InvalidArgumentError(
            f"target_modules={target_modules!r} matches modules that are not linear layers: "
            + ", ".join(f"{n} ({type(named[n]).__name__})" for n in bad[:5])
        )
    return out


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
    masked) and sequence classification (``labels`` of shape ``(B,)``)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    labels = batch.get("labels")
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
    seen: list = field(default_factory=list)  # this batch's inputs, to name the source of a NaN


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


class _DeviceGrams:
    """Running float64 sums of ``Σ x xᵀ`` kept on the GPU for the input groups
    that fit in the budget; ``flush`` moves them into the host accumulators
    (compensated), so the host sees one addition per flush, not per batch."""

    def __init__(self, groups: dict[str, int], device):
        self.sums = {g: torch.zeros(n, n, dtype=torch.float64, device=device) for g, n in groups.items()}
        self.tokens = dict.fromkeys(groups, 0)
        self.batches = 0

    @classmethod
    def within(cls, inputs: dict[str, InputFactor], device, budget: int) -> _DeviceGrams:
        chosen, used = {}, 0
        for g, f in sorted(inputs.items(), key=lambda kv: kv[1].n):
            if used + 8 * f.n * f.n <= budget:
                chosen[g] = f.n
                used += 8 * f.n * f.n
        return cls(chosen, device)

    def add(self, group: str, rows: torch.Tensor) -> bool:
        if group not in self.sums:
            return False
        r64 = rows.double()
        self.sums[group].addmm_(r64.T, r64)
        self.tokens[group] += rows.shape[0]
        return True

    def flush(self, inputs: dict[str, InputFactor]) -> None:
        for g, s in self.sums.items():
            if self.tokens[g]:
                inputs[g].add_gram(s.cpu().numpy(), self.tokens[g])
                s.zero_()
                self.tokens[g] = 0
        self.batches = 0


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
    max_device_bytes: int = 4 << 30,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
) -> Statistics:
    """One pass over ``dataloader`` → :class:`Statistics` for every target module (SPEC §2).

    ``loss_fn(model, batch)`` must return the per-sample losses ``(B,)``; the
    default handles causal LMs and sequence classification. ``output_fisher``
    is ``"diagonal"`` (``y`` only) or ``"sequence_lowrank"`` (also keeps the
    per-sample output-gradient sums ``u_s``). ``max_device_bytes`` bounds the
    device memory the statistics may hold on a GPU: the running float64 sums
    of ``Ḡ`` and of the Gram matrices stay there while they fit (flushed to
    the host's compensated accumulators every 64 batches, at checkpoints and
    at the end); what does not fit goes to the host every batch. The model's parameters receive no ``.grad`` (they are restored).

    Long passes: with ``checkpoint_path`` and ``checkpoint_every = N`` the
    statistics so far are written (atomically) every N batches; with
    ``resume`` (the default) an existing checkpoint is loaded and its batches
    are skipped, so the dataloader must yield the same batches in the same
    order. A batch that fails (non-finite values, ...) adds nothing: the last
    checkpoint stays valid.
    """
    if checkpoint_every is not None and (checkpoint_path is None or checkpoint_every < 1):
        raise InvalidArgumentError(f"checkpoint_every={checkpoint_every!r} needs a checkpoint_path and must be ≥ 1")
    if output_fisher not in ("diagonal", "sequence_lowrank"):
        raise InvalidArgumentError(f"output_fisher must be 'diagonal' or 'sequence_lowrank', got {output_fisher!r}")
    if max_samples is not None and max_samples <= 0:
        raise InvalidArgumentError(f"max_samples must be > 0, got {max_samples}")
    token_mask_of({"attention_mask": None, "labels": torch.zeros(1, 1, dtype=torch.long)}, token_mask)
    loss_fn = loss_fn or default_loss
    named = dict(model.named_modules())
    names = resolve_targets(model, target_modules)
    targets = {}
    for name in names:
        mod = named[name]
        kind = linear_kind(mod)
        m, n = module_shape(mod, kind)
        targets[name] = _Target(name, mod, kind, m, n)

    per_sample = output_fisher == "sequence_lowrank"
    outputs = {name: OutputFactor(t.m, per_sample=per_sample) for name, t in targets.items()}
    grad_sums = {name: np.zeros((t.m, t.n)) for name, t in targets.items()}
    groups: dict[str, str] | None = None  # module → group leader, fixed on the first batch
    inputs: dict[str, InputFactor] = {}
    n_samples = 0
    skip = 0
    config = {"token_mask": token_mask, "output_fisher": output_fisher}
    if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
        ck = Statistics.load(checkpoint_path)
        want = {n: (t.n, t.m, t.kind) for n, t in targets.items()}
        have = {n: (i.in_features, i.out_features, i.kind) for n, i in ck.modules.items()}
        if want != have or any(ck.config.get(k) != v for k, v in config.items()):
            raise StatisticsFileError(
                f"{checkpoint_path}: the checkpoint is for other modules or options; delete it or pass resume=False"
            )
        inputs, outputs = ck.input_factors, ck.output_factors
        grad_sums = {n: g.copy() for n, g in ck.grad_sums.items()}
        groups = {n: i.input_group for n, i in ck.modules.items()}
        n_samples, skip = ck.n_samples, int(ck.config["batches_done"])

    def snapshot(batches_done: int) -> Statistics:
        modules = {
            name: ModuleInfo(name=name, in_features=t.n, out_features=t.m, kind=t.kind, input_group=groups[name])
            for name, t in targets.items()
        }
        return Statistics(
            modules=modules,
            input_factors=inputs,
            output_factors=outputs,
            grad_sums={n: (g.cpu().numpy() if isinstance(g, torch.Tensor) else g.copy()) for n, g in grad_sums.items()},
            n_samples=n_samples,
            config=dict(config, batches_done=batches_done),
            model={
                "class": type(model).__name__,
                "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", ""),
            },
        )

    def forward_hook(target: _Target):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version)
            target.keys.append(key)
            target.seen.append(x)

            def grad_hook(g):
                target.calls.append((x, g.detach(), key))

            output.register_hook(grad_hook)

        return hook

    # On a GPU, Σ_s ∂ℓ_s/∂W stays on the device in float64 when it fits in
    # max_device_bytes (moving every module's m × n sum to the host each batch
    # costs more than the forward and backward passes); it comes to the host at
    # checkpoints and at the end.
    device = next(model.parameters()).device
    budget = max_device_bytes if device.type != "cpu" else 0
    grad_bytes = 8 * sum(t.m * t.n for t in targets.values())
    if grad_bytes <= budget:
        grad_sums = {n: torch.as_tensor(g, dtype=torch.float64, device=device) for n, g in grad_sums.items()}
        budget -= grad_bytes
    device_grams: _DeviceGrams | None = None

    handles = [t.module.register_forward_hook(forward_hook(t)) for t in targets.values()]
    requires = {p: p.requires_grad for p in model.parameters()}
    grads_before = {p: p.grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    batches_done = skip
    try:
        # Gradients are needed w.r.t. module outputs only; parameters need none.
        for p in model.parameters():
            p.requires_grad_(False)
        bar = tqdm(dataloader, desc="lora-da: collecting statistics", unit="batch", disable=not progress)
        for index, batch in enumerate(bar):
            if index < skip:
                continue
            if max_samples is not None and n_samples >= max_samples:
                break
            batch = dict(batch)
            device = next(model.parameters()).device
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            bsz = _batch_size(batch)
            if max_samples is not None and n_samples + bsz > max_samples:
                keep = max_samples - n_samples
                batch = {k: (v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == bsz else v) for k, v in batch.items()}
                bsz = keep
            mask = token_mask_of(batch, token_mask)
            for t in targets.values():
                t.calls.clear()
                t.keys.clear()
                t.seen.clear()
            with torch.enable_grad():
                # The hooks need outputs that require grad: make the embedding output do so.
                handle = _make_inputs_require_grad(model)
                try:
                    losses = loss_fn(model, batch)
                finally:
                    handle.remove()
                if losses.dim() != 1 or losses.shape[0] != bsz:
                    raise ShapeError(f"loss_fn must return per-sample losses of shape ({bsz},), got {tuple(losses.shape)}")
                if not torch.all(torch.isfinite(losses)):
                    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
                    source = next((n for n, t in targets.items() if any(not torch.isfinite(x).all() for x in t.seen)), None)
                    where = f"module {source}: non-finite input activation in " if source else ""
                    raise NonFiniteError(f"{where}batch {index}: non-finite loss for samples {bad}")
                losses.sum().backward()
            if groups is None:
                groups = _detect_groups(targets)
                for name, leader in groups.items():
                    if leader == name:
                        inputs[name] = InputFactor(targets[name].n)
            else:
                _check_groups(targets, groups)
            if device_grams is None and budget > 0:
                device_grams = _DeviceGrams.within(inputs, device, budget)
            _accumulate_batch(targets, groups, inputs, outputs, grad_sums, mask, index, per_sample, device_grams)
            if not per_sample:
                for o in outputs.values():
                    o.count_samples(bsz)
            n_samples += bsz
            batches_done = index + 1
            bar.set_postfix(samples=n_samples)
            checkpoint_now = checkpoint_every is not None and batches_done % checkpoint_every == 0
            if device_grams is not None and (checkpoint_now or device_grams.batches >= 64):
                device_grams.flush(inputs)
            if checkpoint_now:
                snapshot(batches_done).save(checkpoint_path)
    finally:
        for h in handles:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
            p.grad = grads_before[p]
        model.train(was_training)
        for t in targets.values():
            t.calls.clear()
            t.keys.clear()
            t.seen.clear()
    if device_grams is not None:
        device_grams.flush(inputs)
    if n_samples == 0:
        raise InvalidArgumentError("collect_statistics: the dataloader yielded no sample")
    empty = [g for g, f in inputs.items() if f.tokens == 0]
    if empty:
        raise InvalidArgumentError(f"collect_statistics: no valid token reached module(s) {empty}; check token_mask")
    stats = snapshot(batches_done)
    if checkpoint_path is not None:
        stats.save(checkpoint_path)
    return stats


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


def _accumulate_batch(targets, groups, inputs, outputs, grad_sums, mask, batch_index, per_sample, device_grams):
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
            if device_grams is None or not device_grams.add(name, xv):
                _input_to_host(inputs[name], xv)
    if device_grams is not None:
        device_grams.batches += 1

