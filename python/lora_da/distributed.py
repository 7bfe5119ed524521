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

import functools

import pickle
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch

from lora_da._core import InputFactor, OutputFactor
from lora_da import errors
from lora_da.errors import InvalidArgumentError, LoraDAError, ShapeError
from lora_da.results import RESULT_ARRAYS, DeviceSolveResult, ModuleInit
from lora_da.statistics import Statistics


def _reduce(arrays: list[np.ndarray], device, group) -> list[np.ndarray]:
    """Sum float64 arrays over all ranks, in one flat buffer."""
    import torch.distributed as dist

    sizes = [a.size for a in arrays]
    flat = torch.from_numpy(np.concatenate([np.ascontiguousarray(a, dtype=np.float64).ravel() for a in arrays]))
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    settle([flat])
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
    same on every rank (checked). ``sequence_lowrank`` per-sample sums are
    gathered (rank 0's samples first). :func:`lora_da.collect_statistics`
    calls this itself under a process group (``reduce_across_ranks=True``);
    statistics already summed are refused rather than summed twice.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError("all_reduce_statistics needs an initialized torch.distributed process group")
    if stats.config.get("world_size", 1) > 1:
        raise InvalidArgumentError(
            f"all_reduce_statistics: these statistics are already the sum of {stats.config['world_size']} ranks "
            "(collect_statistics reduces under a process group unless reduce_across_ranks=False)"
        )
    if device is None:
        device = collective_device(group)
    # the same modules, in the same order, everywhere
    signature = [(n, i.in_features, i.out_features, i.input_group) for n, i in stats.modules.items()]
    gathered = gather_objects(signature, group)
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
    samples = {}
    if any(f.per_sample for f in stats.output_factors.values()):
        # per-sample rows differ in number per rank: gathered, not summed
        parts = gather_objects({n: stats.output_factors[n].sample_sums() for n in names}, group)
        samples = {n: np.concatenate([p[n] for p in parts]) for n in names}
    inputs = {}
    for g in groups:
        s, c = next(it), next(it)
        inputs[g] = InputFactor.from_packed(stats.input_factors[g].n, s, next(k), c)
    outputs, grads = {}, {}
    for n in names:
        s, c = next(it), next(it)
        outputs[n] = OutputFactor.from_parts(s, next(k), next(k), samples.get(n), c)
        grads[n] = next(it)
    return Statistics(
        modules=dict(stats.modules),
        input_factors=inputs,
        output_factors=outputs,
        grad_sums=grads,
        n_samples=next(k),
        config=dict(stats.config, world_size=dist.get_world_size(group)),
        model=stats.model,
        new_weights=dict(stats.new_weights),
    )


# -- runs under a process group: which group, who solves what, one answer for all ------------


def active_group(reduce_across_ranks: bool = True):
    """The default process group when statistics are to be summed over ranks:
    ``torch.distributed`` initialized with more than one rank and
    ``reduce_across_ranks`` true; else None (a plain single-process run)."""
    import torch.distributed as dist

    if not reduce_across_ranks or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD if dist.get_world_size() > 1 else None


def collective_device(group) -> torch.device:
    """Where a collective's tensors live: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


# -- collectives that leave no tensor to a worker thread -------------------------------
#
# A gloo worker thread that drops the last reference to a tensor with a Python
# wrapper must take the GIL to free that wrapper. When the collective was the
# last before the interpreter exits, the thread can find the interpreter
# finalizing, is ended inside a C++ destructor and the process aborts
# ("terminate called without an active exception", SIGABRT at exit): 2–3 of 20
# two-rank gloo runs of collect_statistics under torchrun, a core dump showing
# ProcessGroupGloo::AsyncWork's destructor in take_gil. So every tensor given
# to a collective here stays referenced until the worker has let go of it, and
# the main thread, holding the GIL, frees it.

SETTLE_SECONDS = 2.0  # a worker lets go microseconds after the collective completes


def settle(tensors) -> None:
    """Return once no thread but this one references ``tensors`` (CPU
    collectives; bounded by ``SETTLE_SECONDS``). Device tensors are left to
    the backend, which keeps them until the stream is done anyway."""
    cpu = [t for t in tensors if t.device.type == "cpu" and hasattr(t, "_use_count")]
    deadline = time.monotonic() + SETTLE_SECONDS
    for t in cpu:
        while t._use_count() > 1:
            if time.monotonic() > deadline:
                warnings.warn(f"lora_da.distributed.settle: a {tuple(t.shape)} collective tensor is still referenced "
                              f"after {SETTLE_SECONDS} s; going on", RuntimeWarning, stacklevel=2)
                return
            time.sleep(1e-4)


def gather_objects(obj, group) -> list:
    """Every rank's picklable ``obj``, in rank order (``all_gather_object``'s
    contract, over tensors this module settles)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    device = collective_device(group)
    data = pickle.dumps(obj)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    settle([size, *sizes, buf, *parts])
    return [pickle.loads(p[:n].cpu().numpy().tobytes()) for p, n in zip(parts, lengths)]


def raise_together(error: BaseException | None, group, what: str) -> None:
    """One agreement point: if any rank's ``error`` is set, every rank raises
    (the failed rank its own error, the others the same type naming that rank),
    rather than the others waiting forever in their next collective."""
    failures = gather_objects(None if error is None else (type(error).__name__, str(error)), group)
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            name, message = failure
            kind = getattr(errors, name, None)
            kind = kind if isinstance(kind, type) and issubclass(kind, LoraDAError) else LoraDAError
            raise kind(f"{what}: rank {rank} failed: {name}: {message}")


@contextmanager
def together(group, what: str):
    """Run the block on every rank of ``group``, then :func:`raise_together`
    (nothing without a group)."""
    if group is None:
        yield
        return
    try:
        yield
    except Exception as e:
        raise_together(e, group, what)
        raise
    raise_together(None, group, what)


def _option_value(v):
    """A comparable, printable stand-in for an option that is the same on every rank that
    passes the same thing, whatever the addresses of its objects there:

    * a ``functools.partial``: its function's stand-in with its positional and keyword
      arguments' stand-ins (a repr would hold the function's address);
    * a function, method or class: its module and qualified name (the same code);
    * a list, tuple, set or dict: its items' stand-ins (a tuple as a list: ``("q_proj",)``
      and ``["q_proj"]`` select the same modules; a set sorted);
    * an object whose class keeps ``object``'s repr (``<... at 0x...>``, e.g. a callable
      instance): its class's module and qualified name;
    * anything else: its repr (strings, numbers, None, enums)."""
    if isinstance(v, functools.partial):
        args = ", ".join(_option_value(a) for a in v.args)
        kw = ", ".join(f"{k}={_option_value(x)}" for k, x in sorted(v.keywords.items()))
        return f"functools.partial({_option_value(v.func)}, args=[{args}], keywords={{{kw}}})"
    if callable(v) and hasattr(v, "__qualname__"):
        return f"{getattr(v, '__module__', '?')}.{v.__qualname__}"
    if isinstance(v, (set, frozenset)):
        return "{" + ", ".join(sorted(_option_value(x) for x in v)) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_option_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_option_value(k)}: {_option_value(x)}" for k, x in sorted(v.items(), key=repr)) + "}"
    if type(v).__repr__ is object.__repr__:
        return f"<{type(v).__module__}.{type(v).__qualname__} object>"
    return repr(v)


def check_same_options(options: dict, group, where: str) -> None:
    """Every rank of ``group`` must pass the same ``options`` (those that shape the
    statistics or the solve: ``token_mask``, ``output_fisher``, the targets, the loss,
    the route, the solve settings). Checked once, before any collection: a different
    ``output_fisher`` left one rank with statistics and the other with a raw gloo error,
    a different ``token_mask`` was summed silently. Raised on every rank, naming the
    option and each rank's value."""
    mine = {k: _option_value(v) for k, v in options.items()}
    every = gather_objects(mine, group)
    for key in options:
        values = [ranks.get(key) for ranks in every]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(f"rank {r} has {v}" for r, v in enumerate(values))
            raise InvalidArgumentError(f"{where}: the ranks disagree on {key} ({shown}); pass the same {key} on "
                                       "every rank")


def agree(values: list[float], group, op: str) -> list[float]:
    """Every rank's ``values`` reduced element-wise with ``op`` ("min", "max" or "sum");
    float64, so integers below 2^53 (bytes, counts) stay exact."""
    import torch.distributed as dist

    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=ops[op], group=group)
    settle([t])
    return t.cpu().tolist()


def owners(costs: dict[str, float], group, load: list[float] | None = None) -> dict[str, int]:
    """Each key (an input group) → the rank that solves it: largest cost first,
    each to the least loaded rank (the same answer on every rank: no communication).
    ``load``: each rank's cost so far, updated in place, so that a plan of many
    small passes does not give every pass's one group to rank 0."""
    import torch.distributed as dist

    if load is None:
        load = [0.0] * dist.get_world_size(group)
    out = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(range(len(load)), key=lambda i: (load[i], i))
        out[key] = r
        load[r] += costs[key]
    return out


def solve_cost(n: int, ms: list[int], rank: int) -> float:
    """A solve's rough cost: the Cholesky and dense eigensolve of ``n × n``, plus each module's ``Ḡ`` products."""
    return float(n) ** 3 + sum(float(m) * n * (rank + 16) for m in ms)


def share_inits(local, group) -> dict:
    """Every rank's solved modules (``{name: ModuleInit}``) on every rank:
    the ``A``/``B`` of a module are the bits its owner computed, so all ranks
    initialize their adapters identically. ``local`` may be the exception a
    rank's solves raised: it is raised on every rank (rather than leaving the
    others waiting in a collective).

    Two collectives: a small header per rank (names, diagnostics, array
    shapes), then every rank's arrays as one flat float64 tensor (on the GPUs
    under NCCL), which copies the bits unchanged."""
    import torch.distributed as dist


    fields = [k for k in DeviceSolveResult.__dataclass_fields__ if k not in RESULT_ARRAYS]

    def header(init):
        r = init.result
        plain = {k: getattr(r, k) for k in fields}
        notes = plain["notes"]
        plain["notes"] = [notes] if isinstance(notes, str) and notes else list(notes or [])
        arrays = [(k, np.shape(getattr(r, k)), np.asarray(getattr(r, k)).dtype.str) for k in RESULT_ARRAYS]
        return init.seconds, plain, arrays

    world = dist.get_world_size(group)
    mine = local if isinstance(local, BaseException) else {k: header(v) for k, v in local.items()}
    headers = gather_objects(mine, group)
    for rank, part in enumerate(headers):
        if isinstance(part, BaseException):
            if rank == dist.get_rank(group) and isinstance(local, BaseException):
                raise local
            raise type(part)(f"rank {rank}: {part}") if isinstance(part, LoraDAError) else part
    seen: set = set()
    for part in headers:
        for name in part:
            if name in seen:
                raise ShapeError(f"share_inits: module {name} was solved on two ranks")
            seen.add(name)

    lengths = [sum(int(np.prod(shape)) for _, _, arrays in part.values() for _, shape, _ in arrays) for part in headers]
    longest = max(lengths)
    if longest == 0:
        return {}
    device = collective_device(group)
    flat = torch.zeros(longest, dtype=torch.float64, device=device)
    if local:
        ours = np.concatenate([np.asarray(getattr(init.result, k), dtype=np.float64).ravel()
                               for init in local.values() for k in RESULT_ARRAYS])
        flat[: ours.size] = torch.from_numpy(ours).to(device)
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat, group=group)
    settle([flat, *parts])
    out = {}
    for part, buf in zip(headers, parts):
        buf = buf.cpu().numpy()
        k = 0
        for name, (seconds, plain, arrays) in part.items():
            values = {}
            for field_name, shape, dtype in arrays:
                size = int(np.prod(shape))
                values[field_name] = buf[k : k + size].reshape(shape).astype(dtype)
                k += size
            out[name] = ModuleInit(name, DeviceSolveResult(**values, **plain), seconds)
    return out
