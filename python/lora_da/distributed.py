"""Statistics from several processes (``torch.distributed``).

Each rank runs :func:`lora_da.collect_statistics` on its own shard of the
calibration set (e.g. a ``DistributedSampler``), then
:func:`all_reduce_statistics` sums the shards on every rank: the float64
gradient sums, the raw compensated sums of both factors and the counts. The
statistics of SPEC §2 are sums over samples and tokens, so the result is the
statistics of the whole set. Every rank then holds the same `Statistics`;
solve on one rank, or split the modules between ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from lora_da._core import InputFactor, OutputFactor
from lora_da.errors import InvalidArgumentError, ShapeError
from lora_da.statistics import Statistics


def _reduce(arrays: list[np.ndarray], device, group) -> list[np.ndarray]:
    """Sum float64 arrays over all ranks, in one flat buffer."""
    import torch.distributed as dist

    sizes = [a.size for a in arrays]
    flat = torch.from_numpy(np.concatenate([np.ascontiguousarray(a, dtype=np.float64).ravel() for a in arrays]))
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.cpu().numpy()
    out, k = [], 0
    for a, n in zip(arrays, sizes):
        out.append(flat[k : k + n].reshape(a.shape).copy())
        k += n
    return out


def all_reduce_statistics(stats: Statistics, group=None, device=None) -> Statistics:
    """The sum of every rank's ``stats`` (a new `Statistics`, the same on all ranks).

    ``device``: where the collective runs (``cuda`` for NCCL; the default is
    the current CUDA device under NCCL, else the CPU). The modules must be the
    same on every rank (checked). ``sequence_lowrank`` per-sample sums are not
    reduced (their number differs per rank): collect those on one rank.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError("all_reduce_statistics needs an initialized torch.distributed process group")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    if any(f.per_sample for f in stats.output_factors.values()):
        raise InvalidArgumentError("all_reduce_statistics: sequence_lowrank per-sample sums cannot be reduced")
    # the same modules, in the same order, everywhere
    signature = [(n, i.in_features, i.out_features, i.input_group) for n, i in stats.modules.items()]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, signature, group=group)
    if any(s != signature for s in gathered):
        raise ShapeError("all_reduce_statistics: the ranks collected statistics for different modules")

    groups = list(stats.input_factors)
    names = list(stats.modules)
    arrays: list[np.ndarray] = []
    for g in groups:
        arrays.extend(stats.input_factors[g].packed_raw())
    for n in names:
        arrays.extend(stats.output_factors[n].sum_raw())
        arrays.append(stats.grad_sums[n])
    counts = [stats.input_factors[g].tokens for g in groups]
    counts += [v for n in names for v in (stats.output_factors[n].tokens, stats.output_factors[n].samples)]
    counts.append(stats.n_samples)
    arrays.append(np.array(counts, dtype=np.float64))  # exact below 2^53
    red = _reduce(arrays, device, group)
    counts = [int(round(c)) for c in red.pop()]
    it = iter(red)
    k = iter(counts)
    inputs = {}
    for g in groups:
        s, c = next(it), next(it)
        inputs[g] = InputFactor.from_packed(stats.input_factors[g].n, s, next(k), c)
    outputs, grads = {}, {}
    for n in names:
        s, c = next(it), next(it)
        outputs[n] = OutputFactor.from_parts(s, next(k), next(k), None, c)
        grads[n] = next(it)
    return Statistics(
        modules=dict(stats.modules),
        input_factors=inputs,
        output_factors=outputs,
        grad_sums=grads,
        n_samples=next(k),
        config=dict(stats.config, world_size=dist.get_world_size(group)),
        model=stats.model,
    )
