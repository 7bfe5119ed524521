"""From statistics to per-module initializations (SPEC §3)."""

from __future__ import annotations

import math
import numbers
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from lora_da._core import CONTRACT_RESIDUAL, SOLVE_DEFAULTS, lowrank_output_precision, num_threads, solve_shared
from lora_da.errors import InvalidArgumentError
from lora_da.memory import PinnedBuffer, out_of_memory
from lora_da.memory import release as _release
from lora_da.packed import symmetric_mean_from_packed
from lora_da.plan import DEVICE_SOLVE_WORKERS, Unit
from lora_da.quality import warn_poor
from lora_da.results import ModuleInit, check_finite_result, with_note
from lora_da.statistics import Statistics
from lora_da.statistics_file import LazyInputFactors
from lora_da.torch_solve import solve_group_device


def _real(name: str, v) -> int | float:
    """``v`` as a Python number (an int where one is exact, else a float): any real
    number, numpy's too; refused by name if it is not one or is too large for a
    float64 (an integer n_pop of 10**400; 10**20 became numpy's TypeError)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise InvalidArgumentError(f"LoraDAConfig: {name} must be a number, got {v!r}")
    try:
        f = float(v)
    except OverflowError:
        hint = "; pass the number of fine-tuning samples" if name == "n_pop" else ""
        raise InvalidArgumentError(f"LoraDAConfig: {name} = {str(v)[:12]}… ({len(str(v))} digits) is too large for "
                                   f"a float64{hint}") from None
    return int(v) if isinstance(v, numbers.Integral) and abs(f) < 2.0**53 else f


@dataclass
class LoraDAConfig:
    """Hyper-parameters of the LoRA-DA init (SPEC §3); defaults are the
    authors' published configuration. ``n_pop`` (the size of the fine-tuning
    set) is required: it scales the variance term.

    ``gamma`` divides ``B A`` (the size of the initial step; the subspace does
    not depend on it): the published 1024 was chosen for 7B models; models of
    ≤ 100M parameters want about 4–16 (all-MiniLM-L6-v2: 4); otherwise choose
    it on held-back data with :func:`lora_da.gamma.search_gamma` (the CLI's
    ``init --gamma auto``).
    ``preserve_output`` subtracts ``s·B A`` from the base weights so that the
    adapted model equals the base model at step 0 (PiSSA-style; see
    :func:`lora_da.save_initial_adapter`).
    """

    n_pop: int | float | None = None
    rank: int | None = None  # None: the PEFT adapter's r, or the published 8 without an adapter
    # Per-module r, by full module name (a PEFT rank_pattern resolved per module); others use ``rank``.
    ranks: dict[str, int] | None = None
    # The solve defaults come from the core (SolveOptions::default()), their one source.
    alpha: float = SOLVE_DEFAULTS["alpha"]
    beta: float = SOLVE_DEFAULTS["beta"]
    damping: float = SOLVE_DEFAULTS["damping"]
    output_damping: float | None = SOLVE_DEFAULTS["output_damping"]
    gamma: float = SOLVE_DEFAULTS["gamma"]
    normalize: bool = SOLVE_DEFAULTS["normalize"]
    token_mask: str = "attention"
    output_fisher: str = "diagonal"
    preserve_output: bool = False
    method: str = SOLVE_DEFAULTS["method"]
    auto_damping: bool = SOLVE_DEFAULTS["auto_damping"]
    tol: float = SOLVE_DEFAULTS["tol"]
    deterministic: bool = SOLVE_DEFAULTS["deterministic"]

    def __post_init__(self):
        if self.n_pop is None:
            raise InvalidArgumentError("LoraDAConfig: n_pop (the number of fine-tuning samples) is required")
        self.n_pop = _real("n_pop", self.n_pop)
        if not (math.isfinite(self.n_pop) and self.n_pop > 0):
            raise InvalidArgumentError(f"LoraDAConfig: n_pop must be a finite number > 0, got {self.n_pop!r}")
        for name in ("alpha", "beta", "damping", "gamma", "tol"):  # their ranges: the core's check, at the solve
            setattr(self, name, _real(name, getattr(self, name)))
        if self.output_damping is not None:
            self.output_damping = _real("output_damping", self.output_damping)
        if self.rank is not None:
            # numpy integers are integers too; a float 8.0, a bool or a string is not
            if isinstance(self.rank, (bool, np.bool_)) or not isinstance(self.rank, numbers.Integral) or self.rank < 1:
                raise InvalidArgumentError(f"LoraDAConfig: rank must be an integer ≥ 1, got {self.rank!r}")
            self.rank = int(self.rank)
        if self.ranks is not None:
            if not isinstance(self.ranks, dict):
                raise InvalidArgumentError(f"LoraDAConfig: ranks must be a dict of module name → rank, got {self.ranks!r}")
            for name, r in self.ranks.items():
                if (not isinstance(name, str) or isinstance(r, (bool, np.bool_)) or not isinstance(r, numbers.Integral)
                        or r < 1):
                    raise InvalidArgumentError(f"LoraDAConfig: ranks[{name!r}] must be an integer ≥ 1, got {r!r}")
            self.ranks = {name: int(r) for name, r in self.ranks.items()}
        for flag in ("normalize", "preserve_output", "auto_damping", "deterministic"):
            v = getattr(self, flag)
            # "no" is truthy: a flag given as a string would silently act as True
            if not isinstance(v, (bool, np.bool_)):
                raise InvalidArgumentError(f"LoraDAConfig: {flag} must be True or False, got {v!r}")
            setattr(self, flag, bool(v))
        if self.token_mask not in ("attention", "labels"):
            raise InvalidArgumentError(f"LoraDAConfig: token_mask must be 'attention' or 'labels', got {self.token_mask!r}")
        if self.output_fisher not in ("diagonal", "sequence_lowrank"):
            raise InvalidArgumentError(
                f"LoraDAConfig: output_fisher must be 'diagonal' or 'sequence_lowrank', got {self.output_fisher!r}"
            )
        if self.method not in ("auto", "krylov", "dense"):
            raise InvalidArgumentError(f"LoraDAConfig: method must be 'auto', 'krylov' or 'dense', got {self.method!r}")

    def with_rank(self, r: int | None = None) -> LoraDAConfig:
        """This config with ``rank`` set: to ``r`` when it is None (an adapter's r), else to the published 8."""
        if self.rank is not None:
            return self
        return replace(self, rank=8 if r is None else r)

    def rank_of(self, name: str) -> int:
        """The r module ``name`` is solved at: ``ranks[name]`` when given, else ``rank`` (or the published 8)."""
        if self.ranks and name in self.ranks:
            return self.ranks[name]
        return self.with_rank().rank

    def solve_kwargs(self) -> dict:
        return dict(
            rank=self.with_rank().rank,
            n_pop=float(self.n_pop),
            alpha=self.alpha,
            beta=self.beta,
            damping=self.damping,
            output_damping=self.output_damping,
            gamma=self.gamma,
            normalize=self.normalize,
            method=self.method,
            auto_damping=self.auto_damping,
            tol=self.tol,
            deterministic=self.deterministic,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def solve_statistics(stats: Statistics, config: LoraDAConfig, *, progress: bool = True, modules=None,
                     device=None) -> dict[str, ModuleInit]:
    """Solve every module of ``stats`` (or ``modules``) in this process (SPEC §3);
    modules sharing ``Z`` share one Cholesky. ``device=None``: on the host with the
    Rust core, groups in parallel over the cores; a torch device: there, in float64
    (:mod:`lora_da.torch_solve`), largest groups first, one group uploaded at a time."""
    config = config.with_rank()
    wanted = set(stats.modules) if modules is None else set(modules)
    missing = wanted - set(stats.modules)
    if missing:
        raise InvalidArgumentError(f"compute_init: no statistics for module(s) {sorted(missing)}")
    out: dict[str, ModuleInit] = {}
    groups = {g: [n for n in names if n in wanted] for g, names in stats.groups().items()}
    groups = {g: v for g, v in groups.items() if v}
    check_rank(config, {n: (stats.modules[n].in_features, stats.modules[n].out_features)
                         for names in groups.values() for n in names})

    if device is not None:
        out = _compute_init_on_device(stats, config, groups, torch.device(device), progress)
        warn_poor(out)
        return out

    def solve_group(item):
        group, names = item
        t0 = time.perf_counter()
        Z = stats.input_factors[group].mean()
        precisions = _group_precisions(stats, names, config)
        ys, Gs = [stats.output_factor(n) for n in names], [stats.mean_grad(n) for n in names]
        results = _solve_on_host(Z, ys, Gs, names, precisions, config)
        dt = (time.perf_counter() - t0) / len(names)
        return [ModuleInit(name, res, dt) for name, res in zip(names, results)]

    # Groups run concurrently: the core releases the GIL and each solve is
    # sequential (deterministic), so this is where the cores are used.
    bar = tqdm(total=sum(len(v) for v in groups.values()), desc="lora-da: solving", unit="module", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, num_threads())) as pool:
        for inits in pool.map(solve_group, groups.items()):
            for init in inits:
                out[init.name] = init
            bar.update(len(inits))
    bar.close()
    out = {n: out[n] for n in stats.modules if n in out}
    warn_poor(out)
    return out


# The host's routes (method "auto"). The Rust core's matrix-free Krylov wins
# where its spectrum converges in few operator applications; LAPACK's dsyevr on
# the formed Ω′ (torch_solve's dense route on the CPU) costs a fixed O(n³) and
# wins on small inputs and on near-degenerate gaps, which took Krylov over a
# thousand applications on real statistics.
HOST_DENSE_BELOW = 512


def krylov_budget(n: int, m: int) -> int:
    """Krylov applications worth half the dense route's cost for an ``n × n``
    ``Ω′`` and ``m`` outputs. Both costs are fitted on the 2-core CI machine
    (benches/RESULTS.md): the dense route (``Z⁻¹``, ``Δ``, ``ΔΔᵀ``, dsyevr) took
    1.3 s at n = m = 2048 and 0.36 s at n = 1536, m = 384, so about
    ``8.2e-11·n³ + 6.9e-11·n²m`` s; a Krylov application (two passes over
    ``L``, one over ``Ḡ``) about ``1.5e-10·(n² + nm)`` s. Only their ratio
    matters. Half the break-even count: past it the spectrum is hard, and
    Krylov rarely finishes soon after."""
    dense = 8.2e-11 * n**3 + 6.9e-11 * n * n * m
    application = 1.5e-10 * (n * n + n * m)
    return max(60, int(0.5 * dense / application))


def _solve_on_host(Z, ys, Gs, names, precisions, config: LoraDAConfig) -> list:
    """One input group on the host: Krylov (Rust) within a budget, LAPACK
    where that is cheaper. Whichever route solved a module, a non-finite
    result is a :class:`NonFiniteError` naming it, never a returned NaN."""
    results = _by_rank(names, config, lambda idx, cfg: _solve_on_host_routes(
        Z, [ys[i] for i in idx], [Gs[i] for i in idx], [names[i] for i in idx],
        None if precisions is None else [precisions[i] for i in idx], cfg))
    for name, res in zip(names, results):
        check_finite_result(res, name)
    return results


def _solve_on_host_routes(Z, ys, Gs, names, precisions, config: LoraDAConfig) -> list:
    n = Z.shape[0]
    kwargs = config.solve_kwargs()
    if config.method != "auto":
        return solve_shared(Z, ys, Gs, output_precisions=precisions, names=names, **kwargs)

    def dense(idx):
        dk = {k: v for k, v in config.solve_kwargs().items() if k != "method"}
        return solve_group_device(torch.from_numpy(np.ascontiguousarray(Z)), [torch.from_numpy(ys[i]) for i in idx],
                                  [torch.from_numpy(np.ascontiguousarray(Gs[i])) for i in idx], names=[names[i] for i in idx],
                                  output_precisions=None if precisions is None else [precisions[i] for i in idx],
                                  method="dense", **dk)

    if n <= HOST_DENSE_BELOW:
        return dense(range(len(names)))
    budget = max(krylov_budget(n, G.shape[0]) for G in Gs)
    kwargs.update(method="krylov", max_applications=budget)
    results = solve_shared(Z, ys, Gs, output_precisions=precisions, names=names, dense_fallback=False, **kwargs)
    redo = [i for i, r in enumerate(results) if not r.residual <= CONTRACT_RESIDUAL]
    if redo:
        for i, res in zip(redo, dense(redo)):
            res.notes.insert(0, f"Krylov reached residual {results[i].residual:.1e} within its budget of {budget} "
                                "applications; solved by the dense LAPACK route")
            results[i] = res
    return results


def _by_rank(names: list[str], config: LoraDAConfig, solve) -> list:
    """Results for ``names`` in their order, from ``solve(indices, config)`` called once per
    distinct r among them, with that r as the config's ``rank``: the solvers take one r
    per call. Ω does not depend on r (SPEC §3 step 6), so a group's modules of different
    r share ``Z``; each r pays its own factorization, a cost only a rank_pattern brings."""
    by: dict[int, list[int]] = {}
    for i, name in enumerate(names):
        by.setdefault(config.rank_of(name), []).append(i)
    if len(by) == 1 and not config.ranks:
        return list(solve(list(range(len(names))), config))
    out: list = [None] * len(names)
    for r, idx in by.items():
        for i, res in zip(idx, solve(idx, replace(config, rank=r, ranks=None))):
            out[i] = res
    return out


def check_rank(config: LoraDAConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """``1 ≤ r < min(n, m)`` for every module, at its own r (SPEC §3), before any work."""
    for name, (n, m) in shapes.items():
        r = config.rank_of(name)
        if r >= min(n, m):
            raise InvalidArgumentError(f"{name}: rank {r} must be < min(in_features, out_features) = {min(n, m)}")


def output_precisions(config: LoraDAConfig, sample_sums: list) -> list | None:
    """``sequence_lowrank``: ``diag((λI + UUᵀ/N)⁻¹)`` per module (SPEC §2), by the core's Woodbury."""
    if config.output_fisher != "sequence_lowrank":
        return None
    lam_y = config.damping if config.output_damping is None else config.output_damping
    return [lowrank_output_precision(np.ascontiguousarray(u), lam_y) for u in sample_sums]


def _group_precisions(stats: Statistics, names: list[str], config: LoraDAConfig) -> list | None:
    """The output precisions of a group's modules from their statistics (None: the diagonal ``y``)."""
    if config.output_fisher != "sequence_lowrank":
        return None
    sums = [stats.output_factors[n].sample_sums() for n in names]
    missing = [n for n, u in zip(names, sums) if u is None]
    if missing:
        raise InvalidArgumentError(f"{missing[0]}: output_fisher='sequence_lowrank' needs statistics collected with it")
    return output_precisions(config, sums)


def _solve_on_device(Z, ys, Gs, names, config: LoraDAConfig, precisions=None) -> list[ModuleInit]:
    t0 = time.perf_counter()
    results = _by_rank(names, config, lambda idx, cfg: solve_group_device(
        Z, [ys[i] for i in idx], [Gs[i] for i in idx], names=[names[i] for i in idx],
        output_precisions=None if precisions is None else [precisions[i] for i in idx], **cfg.solve_kwargs()))
    dt = (time.perf_counter() - t0) / len(names)
    return [ModuleInit(name, res, dt) for name, res in zip(names, results)]


def _compute_init_on_device(stats: Statistics, config: LoraDAConfig, groups: dict, device, progress: bool):
    out: dict[str, ModuleInit] = {}
    # Largest first: the big factorizations start while memory is least fragmented.
    order = sorted(groups.items(), key=lambda kv: -_group_n(stats, kv[0]))
    depth = _prepare_ahead(stats, order, device)
    bar = tqdm(total=sum(len(v) for v in groups.values()), desc="lora-da: solving", unit="module", disable=not progress)

    def upload(group, names):
        """One group's statistics on the device (SPEC §2 means: ``Ḡ`` is divided there, the same
        correctly rounded division as on the host); None when they do not fit."""
        try:
            Z = _input_mean_on(stats, group, device, pinned)
            ys = [torch.as_tensor(stats.output_factor(n), device=device) for n in names]
            # on the CPU as_tensor shares the statistics' memory: divide into a new tensor there
            Gs = [_divided(g, stats.n_samples, in_place=device.type != "cpu")
                  for g in _grad_sums_on(stats, names, device, pinned)]
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # the solve runs on another stream
            return Z, ys, Gs
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            return None

    pinned = threading.local()  # each preparing thread's page-locked buffer for Z, reused group after group

    # The host's share (the packed triangle to a dense Z, the file's pages) runs ahead
    # of the device's solves on a few threads, a group or two ahead of each solve.
    prep = ThreadPoolExecutor(max_workers=max(2, min(4, num_threads())))
    advice = ThreadPoolExecutor(max_workers=1)  # the disk's read-ahead asked for, off the preparing threads
    ahead: dict = {}
    submitted: set = set()
    lock = threading.Lock()

    def fetch(i):
        with lock:
            if i < len(order) and i not in submitted:
                submitted.add(i)
                ahead[i] = prep.submit(upload, *order[i])
                if i + READ_AHEAD < len(order):
                    advice.submit(_will_need, stats, *order[i + READ_AHEAD])

    def task(i):
        def run():
            group, names = order[i]
            for k in range(i, i + 1 + depth):
                fetch(k)
            with lock:
                future = ahead.pop(i)
            inputs = future.result()
            precisions = _group_precisions(stats, names, config)
            inits = solve_on_device_or_host(inputs, lambda: _host_inputs(stats, group, names), names, config, precisions,
                                          device)
            bar.update(len(inits))
            return inits
        return run

    try:
        for i in range(1, min(READ_AHEAD, len(order))):
            advice.submit(_will_need, stats, *order[i])
        for i in range(min(1 + depth, len(order))):
            fetch(i)
        for init in on_streams([task(i) for i in range(len(order))], device):
            out[init.name] = init
    finally:
        prep.shutdown(wait=True, cancel_futures=True)
        advice.shutdown(wait=True, cancel_futures=True)
    bar.close()
    return {n: out[n] for n in stats.modules if n in out}


def _group_n(stats: Statistics, group: str) -> int:
    """A group's ``n`` without building its factor (from a mapped file that would read its triangle)."""
    factors = stats.input_factors
    return factors.groups[group]["n"] if isinstance(factors, LazyInputFactors) else factors[group].n


# Groups prepared (read, checked, uploaded) ahead of each device solve, at most: on the H200
# the 7B attention file's groups took longer to prepare (mostly the disk) than to solve, and
# one ahead left the solves waiting.
PREPARE_AHEAD = 4


def _prepare_ahead(stats: Statistics, order: list, device) -> int:
    """How many groups are prepared ahead of each solve: one off a GPU; on a GPU as many as
    fit (up to ``PREPARE_AHEAD``) beside the solves' work spaces in what is free now, each
    counted at the largest group's upload (its triangle, ``Z`` and every ``Ḡ`` of it)."""
    if device.type != "cuda" or not order:
        return 1

    def unit(group, names):
        return Unit(group=group, n=_group_n(stats, group),
                    modules=tuple((n, stats.modules[n].out_features) for n in names))

    units = [unit(g, names) for g, names in order]
    upload = max(8 * (u.n * u.n + u.n * (u.n + 1) // 2 + sum(m * u.n for _, m in u.modules)) for u in units)
    work = DEVICE_SOLVE_WORKERS * max(u.solve_bytes for u in units)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(PREPARE_AHEAD, (free - work) // max(upload, 1) - DEVICE_SOLVE_WORKERS))


# Groups ahead of the one being prepared whose bytes a memory-mapped statistics file is asked
# to read in the background (on the H200 reading the 7B attention file's 20 GiB took 11 s of
# the preparing threads' time in compute_init's 15.7 s: the disk, not the page cache).
READ_AHEAD = 4


def _will_need(stats: Statistics, group: str, names: list[str]) -> None:
    """A mapped file's pages of one group (its triangle and its modules' Ḡ) read ahead."""
    factors = stats.input_factors
    if isinstance(factors, LazyInputFactors):
        factors.mapped.will_need([f"input.{group}"] + [f"grad.{n}" for n in names])


def _input_mean_on(stats: Statistics, group: str, device, local) -> torch.Tensor:
    """``Z`` (SPEC §2) on ``device``. To a GPU it goes through this thread's page-locked
    buffer (``local.z``), formed there by the core and reused for every group: no fresh
    host pages per group, and a transfer at the link's speed; from a memory-mapped file
    straight from the mapped triangle, without building the factor. The caller
    synchronizes before the buffer is reused."""
    factors = stats.input_factors
    if device.type != "cuda":
        return torch.as_tensor(np.ascontiguousarray(factors[group].mean()), device=device)
    mapped = isinstance(factors, LazyInputFactors)
    factor = None if mapped else factors[group]
    n = _group_n(stats, group)
    if getattr(local, "z", None) is None:
        local.z = PinnedBuffer()
    if mapped and not factors.compensated(group):
        # a streamed file's triangle: read as it is (half of Z's bytes) and unpacked on the
        # device, where the host would spend most of a group's time on it
        buf = local.z.get(n * (n + 1) // 2)
        if buf is not None:
            factors.read_packed_into(group, buf.numpy())
            packed = buf.to(device, non_blocking=True)
            return symmetric_mean_from_packed(packed, n, factors.groups[group]["tokens"])
    buf = local.z.get(n * n)
    if buf is None:  # no page-locked memory to be had: the pageable copy
        return torch.as_tensor((factor or factors[group]).mean(), device=device)
    view = buf.view(n, n)
    if mapped:
        factors.mean_into(group, view.numpy())
    else:
        factor.mean_into(view.numpy())
    return view.to(device, non_blocking=True)


def _grad_sums_on(stats: Statistics, names: list[str], device, local) -> list[torch.Tensor]:
    """The modules' ``Σ_s ∂ℓ_s/∂W`` on ``device``. From a memory-mapped statistics file
    to a GPU they are read into this thread's page-locked buffer (``local.grads``; no
    page faults on the map) and sent at the link's speed. The caller synchronizes
    before the buffer is reused."""
    read_into = getattr(stats.grad_sums, "read_into", None)
    if device.type != "cuda" or read_into is None:
        return [torch.as_tensor(np.ascontiguousarray(stats.grad_sums[n]), device=device) for n in names]
    shapes = [(stats.modules[n].out_features, stats.modules[n].in_features) for n in names]
    total = sum(m * n for m, n in shapes)
    if getattr(local, "grads", None) is None:
        local.grads = PinnedBuffer()
    buf = local.grads.get(total)
    if buf is None:  # no page-locked memory to be had: the pageable copies
        return [torch.as_tensor(np.ascontiguousarray(stats.grad_sums[n]), device=device) for n in names]
    out, at = [], 0
    for name, (m, n) in zip(names, shapes):
        view = buf[at:at + m * n].view(m, n)
        read_into(name, view.numpy())
        out.append(view.to(device, non_blocking=True))
        at += m * n
    return out


def _divided(t: torch.Tensor, k: int, *, in_place: bool) -> torch.Tensor:
    return t.div_(k) if in_place else t / k


def _host_inputs(stats: Statistics, group: str, names: list[str]):
    return (stats.input_factors[group].mean(), [stats.output_factor(n) for n in names],
            [stats.mean_grad(n) for n in names])


_solo = threading.Lock()

# Device solves that ran out of memory since the process started: retried alone on the device,
# and then left to the host (benches/bench_e2e.py reports them per run).
SOLVE_EVENTS = {"retried alone": 0, "left to the host": 0}


def solve_on_device_or_host(inputs, host_inputs, names, config: LoraDAConfig, precisions, device) -> list[ModuleInit]:
    """One input group on the device, or on the host when its work space does not fit there
    (SPEC §7): ``inputs`` are the device tensors (None when they could not be uploaded),
    ``host_inputs()`` gives NumPy ones. An out-of-memory error is retried once on the device
    with the cache released, then the group is solved by the host's routes; either way
    the result is the same contract (SPEC §5)."""
    for attempt in range(2):
        if inputs is None:
            break
        failed = False
        try:
            if attempt == 0:
                return _solve_on_device(*inputs, names, config, precisions)
            with _solo:
                return _solve_on_device(*inputs, names, config, precisions)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            failed = True
        if failed:
            SOLVE_EVENTS["retried alone" if attempt == 0 else "left to the host"] += 1
            _release(device)
    del inputs
    _release(device)
    t0 = time.perf_counter()
    Z, ys, Gs = host_inputs()
    to_np = lambda a: a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)  # noqa: E731
    results = _solve_on_host(np.ascontiguousarray(to_np(Z)), [to_np(y) for y in ys],
                             [np.ascontiguousarray(to_np(G)) for G in Gs], names,
                             None if precisions is None else [to_np(p) for p in precisions], config)
    results = [with_note(r, "solved on the host: its device work space did not fit in the free device memory")
               for r in results]
    dt = (time.perf_counter() - t0) / len(names)
    return [ModuleInit(name, res, dt) for name, res in zip(names, results)]


def on_streams(tasks, device, workers: int = DEVICE_SOLVE_WORKERS) -> list[ModuleInit]:
    """Run ``tasks`` (each returns a list of :class:`ModuleInit`) in order, or on
    CUDA over ``workers`` threads with a stream each; results in task order."""
    if device.type != "cuda" or workers <= 1 or len(tasks) < 2:
        return [init for task in tasks for init in task()]
    torch.cuda.current_stream(device).synchronize()  # the sums are complete before other streams read them
    # torch.linalg loads its CUDA solver libraries lazily, and that first call is not thread-safe.
    one = torch.ones(1, 1, dtype=torch.float64, device=device)
    torch.linalg.cholesky_ex(one), torch.linalg.qr(one), torch.linalg.eigh(one)
    torch.linalg.solve_triangular(one, one, upper=False)
    local = threading.local()

    def run(task):
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(local.stream):
            out = task()
            local.stream.synchronize()  # nothing of this stream is pending when its tensors are freed
        return out

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [init for inits in pool.map(run, tasks) for init in inits]
