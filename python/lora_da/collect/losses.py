"""Per-sample losses and the tokens that count (SPEC §2): the back-propagated
loss is ``Σ_s ℓ_s``, each sample's own token-mean loss, so the statistics do
not depend on the batch size; ``Z`` and ``y`` use the valid tokens only
(attention mask or label mask), ``Ḡ`` every token."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from lora_da.errors import InvalidArgumentError, ShapeError


LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


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


def _logits_of(out):
    """The logits of a model's output: a bare tensor (out[0] of it would be its first
    sample), a ModelOutput or dict's ``logits``, a tuple's first entry; else None."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping):
        return out.get("logits")
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return None


def default_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample losses for causal LMs (``labels`` or ``input_ids`` with padding
    masked) and sequence classification (``labels`` of shape ``(B,)``; the
    ``label`` key that ``datasets`` produces is accepted too)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
    out = model(**inputs)
    logits = _logits_of(out)
    if not isinstance(logits, torch.Tensor):
        keys = f" (keys {sorted(map(str, out))[:6]})" if isinstance(out, Mapping) else ""
        raise InvalidArgumentError(
            f"default loss: the model returned {type(out).__name__}{keys} without logits; pass "
            "loss_fn(model, batch) returning the per-sample losses")
    labels = batch.get("labels", batch.get("label"))
    if logits.dim() == 3:
        if labels is None:
            if not isinstance(batch.get("input_ids"), torch.Tensor):
                raise InvalidArgumentError(
                    "default loss: a causal-LM batch without 'labels' takes them from 'input_ids', and this one has "
                    f"neither (keys {sorted(map(str, batch))}): give batches of inputs_embeds their 'labels' (the "
                    "token ids, -100 on padding), or pass loss_fn")
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
        return causal_lm_per_sample_loss(logits, labels)
    if logits.dim() == 2:
        if labels is None:
            raise InvalidArgumentError("sequence classification needs 'labels' in every batch")
        if logits.shape[-1] == 1 or labels.dtype.is_floating_point:
            return ((logits.float().squeeze(-1) - labels.float()) ** 2).reshape(labels.shape[0], -1).mean(1)
        if tuple(labels.shape) != (logits.shape[0],):  # (B, 1) class ids: cross_entropy's raw RuntimeError
            raise InvalidArgumentError(
                f"default loss: sequence classification needs one class id per sample, labels of shape "
                f"({logits.shape[0]},); these have shape {tuple(labels.shape)}: flatten them, or pass loss_fn")
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
        tokens = _token_shape(batch)
        if labels.dim() != 2 or (tokens is not None and tuple(labels.shape) != tokens):
            # class labels (B,), (B, 1) or multi-label (B, K) have no token to shift: a mask read from
            # them would not be the tokens' (and one of another shape was ignored without a word)
            of = f" of the input's shape {tokens}" if tokens is not None else ""
            raise InvalidArgumentError(
                f"token_mask='labels' needs per-token labels (batch, length){of} of a causal LM; these labels have "
                f"shape {tuple(labels.shape)} (one class or label set per sample?): pass token_mask='attention'")
        if labels.is_floating_point() or labels.is_complex():
            raise InvalidArgumentError(
                f"token_mask='labels' needs per-token class ids (integers, -100 for ignored tokens); these labels "
                f"are {labels.dtype} (multi-label targets?): pass token_mask='attention'")
        valid = torch.zeros_like(labels, dtype=torch.bool)
        valid[:, :-1] = labels[:, 1:] != -100
        return valid
    raise InvalidArgumentError(f"token_mask must be 'attention' or 'labels', got {mode!r}")


def _token_shape(batch: dict) -> tuple[int, int] | None:
    """``(B, T)`` of the batch's tokens (``input_ids``, ``attention_mask`` or ``inputs_embeds``), or None."""
    for key in ("input_ids", "attention_mask"):
        v = batch.get(key)
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            return tuple(v.shape)
    v = batch.get("inputs_embeds")
    if isinstance(v, torch.Tensor) and v.dim() == 3:
        return tuple(v.shape[:2])
    return None


def check_losses(losses, bsz: int) -> None:
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


def batch_size(batch: dict) -> int:
    for k in ("input_ids", "attention_mask", "labels", "inputs_embeds"):
        v = batch.get(k)
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ShapeError("cannot infer the batch size: no tensor in the batch")


def per_sample(v, bsz: int) -> bool:
    """A collated batch's value that holds one entry per sample: a tensor whose first dimension is the batch's."""
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == bsz


def slice_batch(batch: dict, bsz: int, lo: int, hi: int) -> dict:
    """Samples ``lo:hi`` of a collated batch: every tensor whose first dimension is the batch's."""
    return {k: (v[lo:hi] if per_sample(v, bsz) else v) for k, v in batch.items()}


def as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def valid_rows(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of the valid tokens and, when the call is per-token ``(B, L, ·)``,
    the number of valid tokens of each sample."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        m = mask.to(x.device)
        return x[m], m.sum(1)
    if mask is not None and x.dim() == 2 and x.shape[0] == mask.shape[0] and mask.dim() == 1:
        return x[mask.to(x.device)], None
    rows = as_rows(x)
    lens = torch.full((x.shape[0],), x.shape[1], dtype=torch.long) if x.dim() == 3 else None
    return rows, lens


def row_weights(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Float64 0/1 weight of each row of ``x`` (its valid tokens, SPEC §2), or None when all count."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return mask.reshape(-1).to(device=x.device, dtype=torch.float64)
    if mask is not None and x.dim() == 2 and mask.dim() == 1 and x.shape[0] == mask.shape[0]:
        return mask.to(device=x.device, dtype=torch.float64)
    return None
