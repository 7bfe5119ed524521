"""Checkpoints of a long pass (SPEC §6): the fingerprints of the model and the
data that a checkpoint carries, and the checks before one is resumed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from lora_da.collect.targets import Target
from lora_da.errors import StatisticsFileError
from lora_da.statistics import Statistics


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


def batch_digest(batch: Mapping) -> str:
    """The exact bytes of a batch's tensors (sums would not see a permutation within it)."""
    parts = []
    for k, v in sorted(batch.items(), key=lambda kv: str(kv[0])):
        if isinstance(v, torch.Tensor):
            raw = v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            parts.append(f"{k}|{v.dtype}|{tuple(v.shape)}".encode() + b"|" + raw)
    return _digest(b"\0".join(parts))


def model_fingerprint(targets: dict[str, Target]) -> str:
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


def dataloader_length(dataloader) -> int | None:
    try:
        return len(dataloader)
    except (TypeError, NotImplementedError):  # an iterable without a length (a generator, an IterableDataset)
        return None


def check_is_checkpoint(path, ck: Statistics) -> None:
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


def check_checkpoint_identity(path, ck: Statistics, model_fingerprint: str) -> None:
    """Refuse a checkpoint written for another model (a finished one too)."""
    have = ck.config.get("model_fingerprint")
    if have != model_fingerprint:
        raise StatisticsFileError(
            f"{path}: the checkpoint was collected on another model (its target weights differ from this "
            "model's); delete it or pass resume=False"
        )


def rank_path(path) -> str:
    """``ck.safetensors`` → ``ck.rank<r>.safetensors``: each rank checkpoints its own shard."""
    import torch.distributed as dist

    p = Path(path)
    return str(p.with_name(f"{p.stem}.rank{dist.get_rank()}{p.suffix}"))
