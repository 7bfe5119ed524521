"""The memory planner of the collection pass (SPEC §2 at scale, SPEC §7).

The float64 statistics of a large model do not fit beside it on one GPU (a
7B model's ``Ḡ`` and Gram triangles are ~70 GiB), and a host CPU cannot
accumulate a GPU model's activations at the rate the GPU produces them. So
the GPU forms and sums every product in float64, and this planner decides,
from sizes alone (no tensor is touched, so it is tested on the CPU):

* the micro-batch: the user's batch is split when one training-like step at
  that size leaves too little room for the sums, and small batches are joined
  into larger steps on a GPU (the statistics are sums of per-sample terms,
  SPEC §2, so neither changes them);
* which statistics stay on the device during a pass — whole input groups
  (the Gram's lower block triangle and the ``Ḡ``, ``y`` of every module fed
  by that input), in the model's order — and so how many passes over the data;
* where each group is solved: on the device, one or two at a time, when its
  work space fits beside what the pass still holds, else on the host;
* how many bytes that costs on the device, on the host and on disk.

Everything the device will hold is counted against what is free before the
first pass: the model's step at the micro-batch (measured on the first
batch, with the graph from the first input group and from the last: a pass's
graph starts at its own modules, so it is planned at its share of the step),
lora-da's own per-call float64 temporaries, the pass's running sums, the
largest solve's work space, and a margin for the allocator. Of the plans
that fit, the one with the least estimated time wins; the estimate is
passes × steps per pass × (a fixed cost per step + the measured cost per
sample). Host accumulation of per-batch products was measured out: a batch's
float64 ``Ḡ`` crosses PCIe at ~50 GB/s while the GPU forms it at ~256 flop
per byte, a tenth of the rate a pass needs, so a second pass is always cheaper.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from lora_da.errors import DeviceTooSmallError, InvalidArgumentError
from lora_da.words import count

GiB = 1 << 30

# Column blocks of the Gram's lower block triangle (collect.device_sums.add_gram_lower):
# the sums keep only the blocks on and below the diagonal.
GRAM_BLOCK = 1024

# Held back on the device beyond the measured step: the caching allocator's
# fragmentation and the libraries' work spaces (cuBLAS, cuSOLVER).
# 4 %: on the H200, 7B at 40 GiB, 8 % cost a pass and still met one out-of-memory step
# (35.4 s against 40.1 s); a step that fails is redone, not lost (collect.passes.steps).
MARGIN_BYTES = 384 << 20
MARGIN_FRACTION = 0.04

# Rows per block of a device solve's element-wise passes over an n × n matrix
# (torch_solve: symmetry, finiteness, row sums): their temporaries are SOLVE_ROWS × n.
SOLVE_ROWS = 1024

# Samples per step up to which small user batches are joined (collect.passes.join_batches):
# a 1.1B model's step at one sample of 512 tokens leaves the GPU mostly idle.
MERGE_SAMPLES = 16

# Threads of a flush to the host's accumulators: each assembles one Gram on the host.
FLUSH_THREADS = 4

# Page-locked staging of a device-to-host copy, per flush thread: sums reach the host
# in row blocks of at most this size at the link's speed (51 GiB/s on the H200, against
# about 1 GiB/s into fresh pageable pages), without a pageable copy of the whole tensor.
STAGE_BYTES = 64 << 20

# Share of the probe's step time that a step costs whatever its size (kernel launches, the
# model's Python, the hooks' small kernels and a synchronization per step), the rest taken in
# proportion to its samples. Measured on the H200 with a 7B model at 24 GiB: a pass's step
# took 85 ms at one sample and 94 ms at two, so half is if anything low; only the ratio of
# plans' estimates matters.
STEP_FIXED_SHARE = 0.5


def gram_block_rows(n: int, block: int | None = None) -> list[tuple[int, int]]:
    """``(a, b)`` of each row block of the lower block triangle: rows ``a:b``, columns ``0:b``."""
    block = block or GRAM_BLOCK
    edges = list(range(0, n, block)) + [n]
    return list(zip(edges[:-1], edges[1:]))


def gram_bytes(n: int, block: int | None = None) -> int:
    """Float64 bytes of the Gram's lower block triangle on the device."""
    return 8 * sum((b - a) * b for a, b in gram_block_rows(n, block))


@dataclass(frozen=True)
class Unit:
    """One input group: the modules that share ``Z`` and must be in the same pass."""

    group: str
    n: int  # in_features
    modules: tuple[tuple[str, int], ...]  # (name, out_features)

    @property
    def device_bytes(self) -> int:
        """Float64 running sums: the ``n × n`` Gram's lower block triangle, each module's ``m × n`` ``Ḡ`` and ``m``-vector ``Σg²``."""
        return gram_bytes(self.n) + 8 * sum(m * self.n + m for _, m in self.modules)

    @property
    def host_bytes(self) -> int:
        """The host's statistics: the packed Gram triangle and its compensation, ``Ḡ``, ``Σg²`` and its compensation."""
        packed = self.n * (self.n + 1) // 2
        return 8 * (2 * packed + sum(m * self.n + 2 * m for _, m in self.modules))

    @property
    def file_bytes(self) -> int:
        """Bytes of this group in a statistics file written as it is collected
        (SPEC §6, version 2: device sums are plain float64 sums, no compensation)."""
        packed = self.n * (self.n + 1) // 2
        return 8 * (packed + sum(m * self.n + m for _, m in self.modules))

    @property
    def solve_bytes(self) -> int:
        """Device work space of one solve (``torch_solve``, the filtered or Krylov route)
        beyond the pass's sums: the symmetric ``Z`` built from its block triangle, and at
        the worst moment two more ``n × n`` (the factor and ``Z_λ⁻¹``, then ``Z_λ⁻¹`` and
        ``ΔΔᵀ``/``Ω′``), ``Δ`` and ``Ḡᵀ diag(ỹ)`` of the widest module, and the element-wise
        passes' ``SOLVE_ROWS × n`` temporaries (two at a time)."""
        m = max(m for _, m in self.modules)
        rows = min(SOLVE_ROWS, self.n)
        return 8 * (3 * self.n * self.n + 2 * m * self.n + 2 * rows * self.n)

    @property
    def dense_solve_bytes(self) -> int:
        """The same with the device's dense symmetric eigensolver (``method="dense"``): its
        eigenvectors and work space take up to three ``n × n`` more."""
        return self.solve_bytes + 8 * 3 * self.n * self.n


@dataclass
class MemoryPlan:
    """What the collection pass keeps where (printed before the pass)."""

    passes: list[list[Unit]]
    device_budget: int
    host_budget: int | None
    keep_on_host: bool  # statistics end on the host (collect_statistics) or are solved pass by pass
    flush_every: int | None  # batches between flushes of device sums to the host (None: at the end of each pass)
    reserve: int = 0  # bytes held back for the model's forward and backward (the most any pass needs)
    reserves: list[int] = field(default_factory=list)  # per pass: its graph starts at its first module
    budgets: list[int] = field(default_factory=list)  # per pass: what its sums may take beside its step
    planned_passes: int = 0  # len(passes) as planned, before any out-of-memory recovery split one
    notes: list[str] = field(default_factory=list)
    micro_batch: int | None = None  # samples per forward + backward (None: the user's batches as they come)
    batch: int | None = None  # the user's batch size (the first batch's)
    solve_workers: int = 1  # device solves at once (collect_and_solve)
    host_solves: tuple[str, ...] = ()  # groups whose solve work space does not fit the device
    to_disk: str | None = None  # the statistics file written pass by pass
    device_free: int = 0  # what was free for lora-da and the step when planned
    estimate: float | None = None  # relative cost of the plan's passes (only compared between plans)
    why: str = ""
    solve_room: int | None = None  # device bytes a pass's sums and its solves may take together
    dense_solves: bool = False
    cuts: bool = False  # passes run top-down, each below the top from the gradient saved at its cut (collect.cuts)

    def solve_order(self, units: list[Unit]) -> list[Unit]:
        """The order in which a pass's groups are solved (:func:`solve_order`)."""
        room = self.solve_room if self.solve_room is not None else 1 << 62
        return solve_order(units, room, self.solve_workers, self.dense_solves, self.host_solves)

    @property
    def device_bytes(self) -> int:
        return max((sum(u.device_bytes for u in p) for p in self.passes), default=0)

    @property
    def statistics_bytes(self) -> int:
        """The statistics' own size on the host (``Statistics`` in memory)."""
        return sum(u.host_bytes for p in self.passes for u in p)

    @property
    def file_bytes(self) -> int:
        return sum(u.file_bytes for p in self.passes for u in p)

    @property
    def transfer_bytes(self) -> int:
        """Host memory of the transfers while a pass is flushed: per flush thread its
        page-locked staging (``STAGE_BYTES``), through which row blocks go straight into
        the packed sums; written to disk, one group's Gram and ``Ḡ`` at a time."""
        units = [u for p in self.passes for u in p]
        if not units or not self.keep_on_host:
            return 0
        if self.to_disk:
            return max(8 * u.n * u.n + 8 * max(m for _, m in u.modules) * u.n for u in units)
        return FLUSH_THREADS * STAGE_BYTES

    @property
    def host_bytes(self) -> int:
        """Everything the host holds for the statistics: the statistics themselves
        (unless they go to disk) and the staging of the transfers."""
        if not self.keep_on_host:
            return 0
        return (0 if self.to_disk else self.statistics_bytes) + self.transfer_bytes

    @property
    def modules(self) -> int:
        return sum(len(u.modules) for p in self.passes for u in p)

    def describe(self) -> str:
        gb = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        host = gb(self.host_budget) if self.host_budget is not None else "unbounded"
        mb = ""
        if self.micro_batch is not None and self.batch is not None and self.micro_batch < self.batch:
            mb = f"; each batch of {self.batch} split into micro-batches of {self.micro_batch}"
        elif self.micro_batch is not None and self.batch is not None and self.micro_batch > self.batch:
            mb = (f"; batches of {self.batch} joined into steps of up to {self.micro_batch} samples where their "
                  "shapes agree")
        budget = gb(self.device_budget)
        if len(set(self.budgets)) > 1:
            budget = f"{gb(min(self.budgets))}–{budget} a pass"
        lines = [
            f"lora-da plan: {count(self.modules, 'module')} in {count(sum(len(p) for p in self.passes), 'input group')}; "
            f"{count(len(self.passes), 'pass', 'passes')} over the data{mb}",
            f"  device: {gb(self.device_bytes)} of float64 running sums per pass (budget {budget}, "
            f"{gb(self.reserve)} held back for forward + backward, {gb(self.device_free)} free)",
        ]
        if len(set(self.reserves)) > 1:
            lines.append(f"  graph:  each pass's autograd graph starts at its first module: forward + backward holds "
                         f"{gb(max(self.reserves))} in the first pass, {gb(min(self.reserves))} in the last, "
                         "so later passes hold more sums")
        if self.cuts:
            lines.append("  cuts:   passes run from the top layer down; each pass below the top ends its forward at the "
                         "input of the layer above its modules and starts its backward there, from the gradient the "
                         "pass above saved (its graph holds its own layers only)")
        if self.keep_on_host:
            where = (f"written to {self.to_disk} as each pass ends ({gb(self.file_bytes)} on disk)" if self.to_disk
                     else f"{gb(self.statistics_bytes)} of statistics")
            lines.append(f"  host:   {gb(self.host_bytes)} (budget {host}): {where}, "
                         f"{gb(self.transfer_bytes)} of transfer staging; device sums flushed "
                         + (f"every {self.flush_every} batches" if self.flush_every else "at the end of each pass"))
        else:
            solves = f"{self.solve_workers} at a time" if self.solve_workers > 1 else "one at a time"
            host_s = f"; {len(self.host_solves)} group(s) solved on the host (work space too large)" if self.host_solves else ""
            lines.append(f"  solves: each pass is solved on the device, {solves}, then freed{host_s}")
        if self.why:
            lines.append(f"  why: {self.why}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def available_host_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def margin(device_free: int) -> int:
    return MARGIN_BYTES + int(MARGIN_FRACTION * max(device_free, 0))


def _host_budget(host_free: int | None, max_host_bytes: int | None) -> int | None:
    if max_host_bytes is not None:
        if max_host_bytes < 0:
            raise InvalidArgumentError(f"plan: max_host_bytes must be ≥ 0, got {max_host_bytes}")
        return max_host_bytes if host_free is None else min(host_free, max_host_bytes)
    return host_free


def check_host(plan: MemoryPlan, *, streaming_possible: bool) -> None:
    """SPEC §7: the host must hold what the plan keeps there, counted before the first batch."""
    if not plan.keep_on_host or plan.host_budget is None or plan.host_bytes <= plan.host_budget:
        return
    need, have = plan.host_bytes, plan.host_budget
    disk = (f"pass out=PATH (the CLI's collect --out) to write them to disk as they are collected "
            f"({plan.file_bytes / GiB:.2f} GiB on disk, {plan.transfer_bytes / GiB:.2f} GiB of host memory)"
            if streaming_possible and not plan.to_disk else "free host memory")
    raise InvalidArgumentError(
        f"plan: the statistics need {need / GiB:.2f} GiB of host memory ({need} bytes) but {have / GiB:.2f} GiB "
        f"({have} bytes) are available (MemAvailable or max_host_bytes); target fewer modules, use collect_and_solve "
        f"(initialize_lora_da_weights / get_lora_da_state_dict) which keeps no statistics, or {disk}"
    )


def _work(u: Unit, dense: bool, host_solves=()) -> int:
    if u.group in host_solves:
        return 0  # its Z and Ḡ go to the host: the device holds nothing more for it
    return u.dense_solve_bytes if dense else u.solve_bytes


def solve_peak(order: list[Unit], workers: int, dense: bool = False, host_solves=()) -> int:
    """Device bytes at the worst moment of a pass's solves run in ``order`` on ``workers``
    streams (SPEC §7). A solved group's sums are freed with it, so when the ``k``-th solve
    starts the device holds the sums of it and the groups after it, its work space, and at
    most ``workers − 1`` earlier solves still running with their sums and work spaces
    (bounded by the largest of those)."""
    peak, left, done_max = 0, sum(u.device_bytes for u in order), 0
    for u in order:
        w = _work(u, dense, host_solves)
        peak = max(peak, left + w + (workers - 1) * done_max)
        left -= u.device_bytes
        done_max = max(done_max, u.device_bytes + w)
    return peak


def solve_order(units: list[Unit], room: int, workers: int, dense: bool = False, host_solves=()) -> list[Unit]:
    """Largest groups first (the long solves start first and the streams end together) where
    that fits ``room``; else smallest work space first, so that the largest solves run when the
    other groups' sums are already freed (on a 24 GiB card a 7B down_proj's 3.8 GB of work space
    beside a whole pass's sums cost a third more passes)."""
    first = sorted(units, key=lambda u: -u.n)  # stable: ties keep the model's order
    if solve_peak(first, workers, dense, host_solves) <= room:
        return first
    return sorted(units, key=lambda u: (_work(u, dense, host_solves), u.device_bytes))


def plan_passes(
    units: list[Unit],
    *,
    device_free: int,
    reserve: int | Callable[[Unit], int],
    max_device_bytes: int | None,
    host_free: int | None,
    max_host_bytes: int | None,
    keep_on_host: bool,
    flush_every: int | None = None,
    solve_workers: int = 1,
    solve_room: int | None = None,
    to_disk: str | None = None,
    dense_solves: bool = False,
    cut: CutModel | None = None,
) -> MemoryPlan:
    """Split ``units`` (in the model's order) into passes whose device sums fit
    the budget (``device_free − reserve``, at most ``max_device_bytes``).
    ``reserve`` may depend on the pass's first unit: a pass's autograd graph
    starts at its first module, so a pass over the upper layers holds less of
    the step's activations (:func:`graph_step_bytes`).

    ``keep_on_host``: the statistics all end on the host (or in ``to_disk``),
    so the host budget must hold what the plan keeps there (else an error
    that says what to do). Otherwise each pass is solved on the device right
    after it, while the step's memory is free again: then a pass also keeps
    ``solve_workers`` solves' work space free beside its sums within
    ``solve_room`` (default ``device_free``); a group whose work space does
    not fit even alone in its own pass is solved on the host."""
    if not units:
        raise InvalidArgumentError("plan: no module to collect")
    if max_device_bytes is not None and max_device_bytes < 0:
        raise InvalidArgumentError(f"plan: max_device_bytes must be ≥ 0, got {max_device_bytes}")
    reserve_of = reserve if callable(reserve) else (lambda u, upto=None: reserve)
    layer = dict(cut.layer_of) if cut is not None else {}

    def upto_of(top: Unit) -> int | None:
        """The layer at whose input a pass whose highest group is ``top`` starts its backward (collect.cuts)."""
        if cut is None or top.group not in layer:
            return None
        return layer[top.group] + 1 if layer[top.group] + 1 < cut.layers else None

    def budget_of(first: Unit, upto: int | None = None) -> int:
        """What the sums of a pass that starts at ``first`` (and, with cuts, ends below layer ``upto``) may take."""
        b = max(0, device_free - (reserve_of(first, upto) if upto is not None else reserve_of(first)))
        return b if max_device_bytes is None else min(b, max_device_bytes)

    def refuse(u: Unit):
        return DeviceTooSmallError(
            f"plan: the input group {u.group} needs {u.device_bytes / GiB:.2f} GiB of float64 sums on the device "
            f"but the budget is {budget_of(u) / GiB:.2f} GiB ({device_free / GiB:.2f} GiB free, {reserve_of(u) / GiB:.2f} "
            f"GiB held back for forward + backward, max_device_bytes={max_device_bytes}); use a smaller batch, raise "
            "max_device_bytes, or pass max_device_bytes=0 to accumulate on the host CPU (slow)"
        )

    host_budget = _host_budget(host_free, max_host_bytes)
    big = max(units, key=lambda u: u.device_bytes)
    if big.device_bytes > budget_of(big, upto_of(big)):  # alone in its pass, as its first unit: the most room it can get
        raise refuse(big)
    room = device_free if solve_room is None else solve_room
    host_solves = []
    if not keep_on_host:
        host_solves = [u.group for u in units if u.device_bytes + _work(u, dense_solves) > room]

    def solve_fits(p: list[Unit], used: int) -> bool:
        if keep_on_host:
            return True
        return solve_peak(solve_order(p, room, solve_workers, dense_solves, host_solves), solve_workers,
                          dense_solves, host_solves) <= room

    passes: list[list[Unit]] = [[]]
    used = 0
    for u in units:
        # with cuts the pass's graph ends at the layer above its highest group: it grows with the pass
        if passes[-1] and (used + u.device_bytes > budget_of(passes[-1][0], upto_of(u))
                           or not solve_fits(passes[-1] + [u], used + u.device_bytes)):
            passes.append([])
            used = 0
        if u.device_bytes > budget_of(passes[-1][0] if passes[-1] else u, upto_of(u)):
            raise refuse(u)  # first of a pass whose graph holds more than the largest unit's does
        passes[-1].append(u)
        used += u.device_bytes
    reserves = [reserve_of(p[0], upto_of(p[-1])) if upto_of(p[-1]) is not None else reserve_of(p[0]) for p in passes]
    budgets = [budget_of(p[0], upto_of(p[-1])) for p in passes]
    plan = MemoryPlan(passes=passes, device_budget=max(budgets), budgets=budgets, host_budget=host_budget,
                      keep_on_host=keep_on_host, flush_every=flush_every, reserve=max(reserves),
                      solve_workers=solve_workers, host_solves=tuple(host_solves), to_disk=to_disk,
                      device_free=device_free, reserves=reserves, planned_passes=len(passes), solve_room=room,
                      dense_solves=dense_solves, cuts=cut is not None and len(passes) > 1)
    check_host(plan, streaming_possible=True)
    if host_solves:
        plan.notes.append(f"{len(host_solves)} input group(s) (the largest: n = {max(u.n for u in units if u.group in host_solves)}) "
                          "need more device work space than is free: their statistics go to the host and the Rust core solves them")
    if len(passes) > 1:
        plan.notes.append(f"the dataloader is read {len(passes)} times; it must yield the same batches each time")
    return plan


@dataclass(frozen=True)
class Step:
    """The first batch's forward + backward, as the probe measured it."""

    samples: int  # the micro-batch it ran at
    bytes: int  # device bytes above the resident ones at its peak
    seconds: float  # its wall time (0 where unknown)
    tokens_per_sample: int
    calls: int  # hooked module calls per step
    widest: int  # n + 2m of the widest module: its float64 copies per token
    # The step's peak when its autograd graph starts at the last input group (None: not
    # measured, every pass is planned at ``bytes``), and per input group the share of the
    # hooked calls from its first call on: what of the graph a pass that starts there holds.
    top_bytes: int | None = None
    shares: tuple[tuple[str, float], ...] = ()


def pass_share(step: Step, p: list[Unit], cut: CutModel | None) -> float:
    """A pass's step as a share of a whole step: the forward (a third) over the layers up to
    its end, the backward (two thirds) from there down to its first group."""
    shares = dict(step.shares)
    s_first = shares.get(p[0].group, 1.0)
    layer = dict(cut.layer_of) if cut is not None else {}
    top = layer.get(p[-1].group)
    if cut is None or top is None or top + 1 >= cut.layers:
        return (1 + 2 * s_first) / 3
    end = layer_start_share(shares, cut, top + 1)
    return ((1 - end) + 2 * max(0.0, s_first - end)) / 3


@dataclass(frozen=True)
class CutModel:
    """A chain of layers whose passes may start their backward at a layer's input
    (:mod:`lora_da.collect.cuts`), as the planner sees it."""

    layer_of: tuple[tuple[str, int], ...]  # input group → the layer it is in
    layers: int
    row_bytes: int  # one sample's hidden state (and so its saved gradient) at a layer's input
    samples: int  # the samples whose gradients are saved (the data's, as far as known)

    @property
    def saved_bytes(self) -> int:
        """Two layers' saved gradients at once: the one a pass reads and the one it saves."""
        return 2 * self.row_bytes * self.samples


def layer_start_share(shares: dict[str, float], cut: CutModel, layer: int) -> float:
    """The share of a step's hooked calls from the start of ``layer`` on (its first group's)."""
    return max((shares[g] for g, j in cut.layer_of if j == layer and g in shares), default=0.0)


def cut_step_bytes(step: Step, micro_batch: int, first: Unit, upto: int, cut: CutModel) -> int:
    """A step of a pass whose graph spans its first group ``first`` up to the input of layer
    ``upto`` (SPEC §7): the activations between, taken in proportion to the hooked calls
    there (the whole step less its top end spans the shares from the last group's to 1),
    one layer's more for the backward's working set, and the step's rows of the two saved
    gradients."""
    shares = dict(step.shares)
    full = step_bytes(step, micro_batch)
    top = -(-(step.top_bytes or 0) * micro_batch // max(step.samples, 1))  # not measured: 0, the largest estimate
    last = min(shares.values())
    per_share = max(0, full - top) / max(1e-9, 1 - last)
    span = max(0.0, shares.get(first.group, 1.0) - layer_start_share(shares, cut, upto))
    # The gradients of the layer being differentiated sit beside the saved activations: a whole
    # step holds them once, not in proportion to its layers. On the H200 (7B at 8 and 16 samples,
    # TinyLlama at 16) cut passes held 0.6–1.1 GiB, about a layer, above their span's share.
    working = max(0, full - top) / cut.layers
    return min(full, math.ceil(per_share * span + working)) + 2 * micro_batch * cut.row_bytes


def transient_bytes(step: Step, micro_batch: int) -> int:
    """lora-da's own per-call temporaries in the backward hook: float64 copies
    of one call's ``x`` and ``g`` and the squares of ``g``."""
    return 8 * micro_batch * step.tokens_per_sample * step.widest


def step_bytes(step: Step, micro_batch: int) -> int:
    """A step's activations scale with its tokens (the probe ran at ``step.samples``)."""
    return -(-step.bytes * micro_batch // max(step.samples, 1))


def graph_step_bytes(step: Step, micro_batch: int, first: Unit | None = None) -> int:
    """A step of a pass whose autograd graph starts at its first unit ``first`` (SPEC §7):
    the layers below it run without a graph and keep no activations. Between the two
    measured ends (the graph from the first input group and from the last) the activations
    are taken in proportion to the hooked calls the graph spans; never above the whole step."""
    full = step_bytes(step, micro_batch)
    share = dict(step.shares).get(first.group) if first is not None else None
    if step.top_bytes is None or share is None:
        return full
    top = -(-step.top_bytes * micro_batch // max(step.samples, 1))
    return min(full, top + math.ceil((full - top) * share))


def choose_plan(
    units: list[Unit],
    step: Step,
    *,
    batch: int,
    device_free: int,
    max_device_bytes: int | None,
    host_free: int | None,
    max_host_bytes: int | None,
    keep_on_host: bool,
    to_disk: str | None = None,
    max_solve_workers: int = 2,
    dense_solves: bool = False,
    merge: bool = False,
    cut: CutModel | None = None,
) -> MemoryPlan:
    """The cheapest plan that fits (module docstring): micro-batches of
    ``batch``, ``batch/2``, …, 1 (never above what the probe ran), each with
    its passes and solve placement; the least estimated time wins, ties to
    the larger micro-batch. With ``merge`` (the user's batches are small and
    may be joined) also steps of ``2·batch``, ``4·batch``, … up to
    ``MERGE_SAMPLES``, their memory extrapolated from the probe's. With ``cut``
    (passes that start at a layer's input) the micro-batches start at ``batch``
    whatever the probe ran at. A refusal names what would fit."""
    # With cuts no pass holds the whole step the probe ran (or failed to run) at: the user's
    # batch is a candidate even where the probe had to halve it, its memory extrapolated.
    sizes, mb = [], batch if cut is not None else min(batch, step.samples)
    if merge and (step.samples >= batch or cut is not None):
        up = 2 * batch
        while up <= MERGE_SAMPLES:
            sizes.insert(0, up)
            up *= 2
    while True:
        sizes.append(mb)
        if mb == 1:
            break
        mb = (mb + 1) // 2
    seconds = step.seconds if step.seconds > 0 else 1e-3 * max(step.samples, 1)
    per_sample = (1 - STEP_FIXED_SHARE) * seconds / max(step.samples, 1)
    fixed = STEP_FIXED_SHARE * seconds
    candidates, errors = [], []
    # a pass's solves run beside the gradient it saved for the pass below
    room = device_free - margin(device_free) - (cut.saved_bytes // 2 if cut is not None else 0)
    for mb in sizes:
        def reserve(first: Unit, upto: int | None = None, mb=mb) -> int:
            graph = graph_step_bytes(step, mb, first) if upto is None else cut_step_bytes(step, mb, first, upto, cut)
            saved = cut.saved_bytes if cut is not None else 0
            return graph + transient_bytes(step, mb) + margin(device_free) + saved

        for workers in range(max(1, max_solve_workers), 0, -1):
            try:
                plan = plan_passes(units, device_free=device_free, reserve=reserve, max_device_bytes=max_device_bytes,
                                   host_free=host_free, max_host_bytes=max_host_bytes, keep_on_host=keep_on_host,
                                   solve_workers=workers, solve_room=room, to_disk=to_disk,
                                   dense_solves=dense_solves, cut=cut)
            except InvalidArgumentError as e:
                errors.append(e)
                break
            if mb > step.samples and step.samples < batch and not plan.cuts:
                break  # one pass holds the whole step, which ran out of memory above step.samples
            steps = -(-batch // mb) if mb <= batch else batch / mb  # per user batch
            # the backward (about two thirds of a step) runs down to each pass's first unit only
            plan.estimate = sum(steps * fixed + batch * per_sample * pass_share(step, p, cut if plan.cuts else None)
                                for p in plan.passes) / batch
            plan.micro_batch, plan.batch = mb, batch
            candidates.append(plan)
            if keep_on_host:
                break
    if not candidates:
        raise errors[-1]
    best = min(candidates, key=lambda p: (round(p.estimate, 12), -p.micro_batch, -p.solve_workers))
    others = [p for p in candidates if p is not best]
    alt = min(others, key=lambda p: p.estimate) if others else None
    whole = "a whole step (each pass holds its layers' share)" if best.cuts else "a step"
    why = [f"micro-batch {best.micro_batch}: {whole} takes ~{step_bytes(step, best.micro_batch) / GiB:.2f} GiB, "
           f"lora-da's per-call temporaries {transient_bytes(step, best.micro_batch) / GiB:.2f} GiB"]
    if alt is not None:
        why.append(f"the next best, micro-batch {alt.micro_batch} with {count(len(alt.passes), 'pass', 'passes')}, "
                   f"is estimated {alt.estimate / best.estimate:.2f}× as long")
    best.why = "; ".join(why)
    return best


# Solves running at once on a GPU, each on its own stream: one solve is a chain
# of small dependent steps with host synchronizations, which leaves the device
# mostly idle; two chains keep it busier. Each holds its work space (Unit.solve_bytes).
DEVICE_SOLVE_WORKERS = 2
