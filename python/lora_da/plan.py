"""The memory planner of the collection pass (SPEC §2 at scale).

The float64 statistics of a large model do not fit beside it on one GPU (a
7B model's ``Ḡ`` and Gram matrices are ~95 GB), and a host CPU cannot
accumulate a GPU model's activations at the rate the GPU produces them. So
the GPU forms and sums every product in float64, and this planner decides,
from sizes alone (no tensor is touched, so it is tested on the CPU):

* which statistics stay on the device during a pass — whole input groups
  (the Gram matrix and the ``Ḡ``, ``y`` of every module fed by that input), in
  the model's order;
* how many passes over the data that takes, when they do not all fit at once;
* how many bytes that costs on the device and on the host.

The device budget is what is free on the device, less what one training-like
step needs (measured on the first batch) and a margin, bounded by
``max_device_bytes``; the host budget is the available memory, bounded by
``max_host_bytes``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lora_da.errors import InvalidArgumentError

GiB = 1 << 30


@dataclass(frozen=True)
class Unit:
    """One input group: the modules that share ``Z`` and must be in the same pass."""

    group: str
    n: int  # in_features
    modules: tuple[tuple[str, int], ...]  # (name, out_features)

    @property
    def device_bytes(self) -> int:
        """Float64 running sums: the ``n × n`` Gram, each module's ``m × n`` ``Ḡ`` and ``m``-vector ``Σg²``."""
        return 8 * (self.n * self.n + sum(m * self.n + m for _, m in self.modules))

    @property
    def host_bytes(self) -> int:
        """The host's statistics: the packed Gram triangle and its compensation, ``Ḡ``, ``Σg²`` and its compensation."""
        packed = self.n * (self.n + 1) // 2
        return 8 * (2 * packed + sum(m * self.n + 2 * m for _, m in self.modules))

    @property
    def solve_bytes(self) -> int:
        """Device work space of one solve (``device_solve``): about five ``n × n``
        (the symmetrized copy and factor of ``Z``, ``Z_λ⁻¹``, ``ΔΔᵀ``/``Ω′``, a
        product), ``Δ`` and ``ḠᵀD`` of the largest module."""
        m = max(m for _, m in self.modules)
        return 8 * (5 * self.n * self.n + 2 * m * self.n)


@dataclass
class MemoryPlan:
    """What the collection pass keeps where (printed before the pass)."""

    passes: list[list[Unit]]
    device_budget: int
    host_budget: int | None
    keep_on_host: bool  # statistics end on the host (collect_statistics) or are solved pass by pass
    flush_every: int | None  # batches between flushes of device sums to the host (None: at the end of each pass)
    reserve: int = 0  # bytes held back for the model's forward and backward
    notes: list[str] = field(default_factory=list)

    @property
    def device_bytes(self) -> int:
        return max((sum(u.device_bytes for u in p) for p in self.passes), default=0)

    @property
    def host_bytes(self) -> int:
        return sum(u.host_bytes for p in self.passes for u in p) if self.keep_on_host else 0

    @property
    def modules(self) -> int:
        return sum(len(u.modules) for p in self.passes for u in p)

    def describe(self) -> str:
        gb = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        host = gb(self.host_budget) if self.host_budget is not None else "unbounded"
        lines = [
            f"lora-da plan: {self.modules} modules in {sum(len(p) for p in self.passes)} input groups; "
            f"{len(self.passes)} pass(es) over the data",
            f"  device: {gb(self.device_bytes)} of float64 running sums per pass (budget {gb(self.device_budget)}, "
            f"{gb(self.reserve)} held back for forward + backward)",
            f"  host:   {gb(self.host_bytes)} of statistics (budget {host}); "
            + ("device sums flushed " + (f"every {self.flush_every} batches" if self.flush_every else "at the end of each pass")
               if self.keep_on_host else "each pass is solved on the device, then freed"),
        ]
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


def plan_passes(
    units: list[Unit],
    *,
    device_free: int,
    reserve: int,
    max_device_bytes: int | None,
    host_free: int | None,
    max_host_bytes: int | None,
    keep_on_host: bool,
    flush_every: int | None = None,
) -> MemoryPlan:
    """Split ``units`` (in the model's order) into passes whose device sums fit
    the budget. ``keep_on_host``: the statistics must all end on the host, so
    the host budget must hold every unit (else an error that says what to do);
    otherwise each pass is solved on the device, which also needs each unit's
    solve work space within the free memory."""
    if not units:
        raise InvalidArgumentError("plan: no module to collect")
    budget = max(0, device_free - reserve)
    if max_device_bytes is not None:
        if max_device_bytes < 0:
            raise InvalidArgumentError(f"plan: max_device_bytes must be ≥ 0, got {max_device_bytes}")
        budget = min(budget, max_device_bytes)
    host_budget = host_free
    if max_host_bytes is not None:
        if max_host_bytes < 0:
            raise InvalidArgumentError(f"plan: max_host_bytes must be ≥ 0, got {max_host_bytes}")
        host_budget = max_host_bytes if host_budget is None else min(host_budget, max_host_bytes)
    big = max(units, key=lambda u: u.device_bytes)
    if big.device_bytes > budget:
        raise InvalidArgumentError(
            f"plan: the input group {big.group} needs {big.device_bytes / GiB:.2f} GiB of float64 sums on the device "
            f"but the budget is {budget / GiB:.2f} GiB ({device_free / GiB:.2f} GiB free, {reserve / GiB:.2f} GiB held "
            f"back for forward + backward, max_device_bytes={max_device_bytes}); use a smaller batch, raise "
            "max_device_bytes, or pass max_device_bytes=0 to accumulate on the host CPU (slow)"
        )
    passes: list[list[Unit]] = [[]]
    used = 0
    for u in units:
        if passes[-1] and used + u.device_bytes > budget:
            passes.append([])
            used = 0
        passes[-1].append(u)
        used += u.device_bytes
    plan = MemoryPlan(passes=passes, device_budget=budget, host_budget=host_budget, keep_on_host=keep_on_host,
                      flush_every=flush_every, reserve=reserve)
    if keep_on_host and host_budget is not None and plan.host_bytes > host_budget:
        raise InvalidArgumentError(
            f"plan: the statistics need {plan.host_bytes / GiB:.2f} GiB on the host but {host_budget / GiB:.2f} GiB are "
            "available (max_host_bytes or free memory); target fewer modules, or let get_lora_da_state_dict / "
            "initialize_lora_da_weights solve each pass on the device without keeping the statistics"
        )
    if not keep_on_host:
        worst = max(units, key=lambda u: u.solve_bytes)
        if worst.solve_bytes > device_free:
            plan.notes.append(
                f"the solve of {worst.group} needs {worst.solve_bytes / GiB:.2f} GiB of device work space; "
                "it may not fit"
            )
    if len(passes) > 1:
        plan.notes.append(f"the dataloader is read {len(passes)} times; it must yield the same batches each time")
    return plan
