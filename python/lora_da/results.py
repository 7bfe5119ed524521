"""What a solve returns, for every route and every rank (SPEC §3, §5): one
module's result and its checks, the dict of a run's results with its report.
Below the solve routes and the data-parallel layer, so both can build them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lora_da._core import SolveResult
from lora_da.errors import NonFiniteError


@dataclass
class DeviceSolveResult:
    """Same fields as the core's :class:`lora_da.SolveResult` (SPEC §3, §5), float64 NumPy arrays."""

    A: np.ndarray
    B: np.ndarray
    V: np.ndarray
    eigenvalues: np.ndarray
    next_eigenvalue: float
    gap: float
    residual: float
    omega_norm: float
    iterations: int
    method: str
    sigma: float
    c: float
    damping: float
    zero_gradient: bool
    notes: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def with_note(res, note: str):
    """``res`` with ``note`` added to its notes: the core's :class:`SolveResult` hands out a
    copy of its notes (appending to it is lost), so it becomes a :class:`DeviceSolveResult`
    with the same fields."""
    if isinstance(res, DeviceSolveResult):
        res.notes.append(note)
        return res
    names = [f for f in DeviceSolveResult.__dataclass_fields__ if f != "notes"]
    return DeviceSolveResult(**{f: getattr(res, f) for f in names}, notes=[*res.notes, note])


RESULT_ARRAYS = ("A", "B", "V", "eigenvalues")
RESULT_SCALARS = ("next_eigenvalue", "gap", "residual", "sigma", "c", "omega_norm", "damping")


def check_finite_result(res, name: str = "") -> None:
    """No NaN or infinity is ever returned (the core's ``solve::check_result``):
    a :class:`NonFiniteError` naming the module and the first non-finite
    quantity of a result of any route (Rust, LAPACK, torch)."""
    where = f"module {name}: " if name else ""
    for what in RESULT_ARRAYS:
        a = np.asarray(getattr(res, what))
        if not np.all(np.isfinite(a)):
            k = int(np.flatnonzero(~np.isfinite(a.ravel()))[0])
            raise NonFiniteError(f"{where}the result {what} has a non-finite value {a.ravel()[k]!r} at flat index {k} "
                                 f"(σ = {res.sigma!r}, c = {res.c!r}): not representable in float64")
    for what in RESULT_SCALARS:
        v = float(getattr(res, what))
        if not math.isfinite(v):
            raise NonFiniteError(f"{where}the result {what} is not representable in float64: {v!r} "
                                 f"(σ = {res.sigma!r}, c = {res.c!r})")


@dataclass
class ModuleInit:
    """One module's ``A`` (``r × n``), ``B`` (``m × r``) and solve diagnostics: its
    ``result``'s fields (``eigenvalues``, ``gap``, ``notes``, ...) read through, so it stands
    wherever that result did, with the poor-init :attr:`warnings` beside them."""

    name: str
    result: SolveResult | DeviceSolveResult
    seconds: float

    def __getattr__(self, attr: str):
        # only for names the dataclass lacks; "result" and dunders (copy, pickle) are not looked up in it
        if attr == "result" or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.result, attr)

    @property
    def A(self) -> np.ndarray:
        return self.result.A

    @property
    def B(self) -> np.ndarray:
        return self.result.B

    @property
    def warnings(self) -> list[str]:
        """What is poor about this init (SPEC §5, "A poor init"): ``λ_r ≥ 0``, or a gap at
        the cut below ``POOR_GAP_REL·‖Ω‖₂``; empty when nothing is."""
        from lora_da.quality import assess_result

        return assess_result(self.result)


@dataclass
class RunReport:
    """What a :func:`~lora_da.pipeline.collect_and_solve` run did (its result's ``report``): its plan and its wall
    time by stage."""

    plan: object
    collect_seconds: float  # forward + backward passes with their sums
    solve_seconds: float  # everything after the passes: the three below
    reduce_seconds: float = 0.0  # summing the ranks' sums into their owners (under a process group)
    own_solve_seconds: float = 0.0  # this rank's solves
    gather_seconds: float = 0.0  # every rank's adapters to every rank


class Inits(dict):
    """``{module name: ModuleInit}`` in the statistics' module order (from
    ``initialize_lora_da_weights``: named after the adapter's LoRA layers), with the
    run's :class:`RunReport` as ``report`` (None where no run was timed)."""

    def __init__(self, inits=(), report: RunReport | None = None):
        super().__init__(inits)
        self.report = report
