"""Types of the Rust extension `lora_da._core` (rust/src/python/)."""

from collections.abc import Sequence
from typing import TypedDict, final

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

# Checked against the compiled module by tests/test_stub.py (mypy's stubtest).

__all__ = [
    "InputFactor",
    "OutputFactor",
    "SolveResult",
    "solve",
    "solve_shared",
    "check_solve_options",
    "lowrank_output_precision",
    "num_threads",
    "LoraDAError",
    "ShapeError",
    "NonFiniteError",
    "InvalidArgumentError",
    "NotPositiveDefiniteError",
    "StatisticsFileError",
    "SOLVE_DEFAULTS",
    "TOKEN_CHUNK",
    "GAP_TOL",
    "GAP_REL",
    "CONTRACT_RESIDUAL",
    "SYMMETRY_TOL",
]

TOKEN_CHUNK: int
GAP_TOL: float
GAP_REL: float
CONTRACT_RESIDUAL: float
"""The largest eigen-residual ``max_i ‖Ω v_i − λ_i v_i‖ / ‖Ω‖₂`` a solve may return (SPEC §5)."""
SYMMETRY_TOL: float
"""The largest ``|Z[i,j] − Z[j,i]|``, relative to ``max |Z|``, that a solve accepts (SPEC §3)."""

class _SolveDefaults(TypedDict):
    alpha: float
    beta: float
    damping: float
    output_damping: float | None
    gamma: float
    normalize: bool
    method: str
    auto_damping: bool
    tol: float
    max_applications: int | None
    deterministic: bool
    dense_fallback: bool

SOLVE_DEFAULTS: _SolveDefaults
"""The defaults of `solve` and `solve_shared` (SolveOptions::default(), SPEC §3)."""

class LoraDAError(Exception):
    """Base class of every lora-da error."""

class ShapeError(LoraDAError, ValueError):
    """An array has the wrong shape, length or dtype."""

class NonFiniteError(LoraDAError, ValueError):
    """A NaN or infinity where a finite number is required."""

class InvalidArgumentError(LoraDAError, ValueError):
    """A scalar argument is outside its domain (rank, n_pop, damping, ...)."""

class NotPositiveDefiniteError(LoraDAError, ValueError):
    """``Z + λI`` could not be factored (SPEC §3 step 1); raise the damping."""

class StatisticsFileError(LoraDAError, ValueError):
    """A statistics file is truncated, corrupted, or from another model/version."""

@final
class InputFactor:
    """Streaming float64 accumulator of Σ_t x_t x_tᵀ (SPEC §2); one packed triangle.
    Thread-safe: calls are serialized by a lock; a failed call changes nothing."""
    def __new__(cls, n: int) -> Self:
        """MemoryError when the n(n+1)/2 sums (and their compensations) cannot be allocated."""
    @property
    def n(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    def add(self, x: npt.NDArray[np.float32] | npt.NDArray[np.float64] | npt.NDArray[np.uint16]) -> None:
        """Add (T, n) token rows: float32, float64 or bfloat16 bits (uint16); any strides."""
    def touch(self) -> None:
        """Fault in the accumulator's host pages without the GIL (the sums do not change)."""
    def add_gram(self, gram: npt.NDArray[np.float64], tokens: int) -> None: ...
    def add_gram_rows(self, first_row: int, rows: npt.NDArray[np.float64], tokens: int) -> None:
        """Rows first_row.. of a symmetric Σ x xᵀ ((k, width), C-contiguous): the lower-triangle entries added."""
    def merge(self, other: InputFactor) -> None: ...
    def mean(self) -> npt.NDArray[np.float64]:
        """Z = (1/T) Σ x xᵀ, (n, n)."""
    def mean_into(self, out: npt.NDArray[np.float64]) -> None:
        """Z written into a contiguous float64 (n, n) array (C or Fortran order: Z is symmetric)."""
    def packed(self) -> npt.NDArray[np.float64]: ...
    def packed_raw(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
    @staticmethod
    def from_packed(n: int, packed: npt.NDArray[np.float64], tokens: int, compensation: npt.NDArray[np.float64] | None = None) -> InputFactor: ...
    @staticmethod
    def packed_mean_into(n: int, packed: npt.NDArray[np.float64], tokens: int, out: npt.NDArray[np.float64], compensation: npt.NDArray[np.float64] | None = None) -> None:
        """Z into a contiguous float64 (n, n) array straight from a packed triangle: from_packed(...).mean_into(out) without the factor."""
    def copy(self) -> InputFactor: ...
    def __eq__(self, value: object, /) -> bool: ...

@final
class OutputFactor:
    """Streaming float64 accumulator of Σ_t g_t ⊙ g_t and optional per-sample sums (SPEC §2).
    Thread-safe like InputFactor."""
    def __new__(cls, m: int, per_sample: bool = False) -> Self:
        """MemoryError when the m sums cannot be allocated."""
    @property
    def m(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def samples(self) -> int: ...
    @property
    def per_sample(self) -> bool: ...
    def add(self, g: npt.NDArray[np.generic], sample_lengths: Sequence[int] | None = None) -> None: ...
    def add_sums(self, sumsq: npt.NDArray[np.float64], tokens: int, sample_sums: npt.NDArray[np.float64] | None = None) -> None: ...
    def count_samples(self, k: int) -> None: ...
    def merge(self, other: OutputFactor) -> None: ...
    def mean(self) -> npt.NDArray[np.float64]: ...
    def sum(self) -> npt.NDArray[np.float64]: ...
    def sample_sums(self) -> npt.NDArray[np.float64] | None: ...
    def sum_raw(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
    @staticmethod
    def from_parts(sumsq: npt.NDArray[np.float64], tokens: int, samples: int, sample_sums: npt.NDArray[np.float64] | None = None, compensation: npt.NDArray[np.float64] | None = None) -> OutputFactor: ...
    def copy(self) -> OutputFactor: ...
    def __eq__(self, value: object, /) -> bool: ...

@final
class SolveResult:
    """One module's LoRA-DA initialization (SPEC §3) and diagnostics (SPEC §5)."""
    A: npt.NDArray[np.float64]  # (r, n)
    B: npt.NDArray[np.float64]  # (m, r)
    V: npt.NDArray[np.float64]  # (n, r)
    eigenvalues: npt.NDArray[np.float64]
    next_eigenvalue: float  # λ_{r+1}; Krylov: an upper bound, to max(GAP_TOL·‖Ω‖₂, GAP_REL·gap)
    gap: float
    residual: float
    omega_norm: float
    iterations: int
    method: str
    sigma: float
    c: float
    damping: float
    zero_gradient: bool
    notes: list[str]
    rank: int

def solve(
    z: npt.NDArray[np.floating], y: npt.NDArray[np.floating], g: npt.NDArray[np.floating], *,
    rank: int, n_pop: float, alpha: float = 1.0, beta: float = 0.03, damping: float = 1e-6,
    output_damping: float | None = None, gamma: float = 1024.0, normalize: bool = True,
    method: str = "auto", auto_damping: bool = False, tol: float = 1e-12,
    max_applications: int | None = None, deterministic: bool = True, dense_fallback: bool = True,
    output_precision: npt.NDArray[np.floating] | None = None, name: str = "",
) -> SolveResult: ...
def solve_shared(
    z: npt.NDArray[np.floating], ys: Sequence[npt.NDArray[np.floating]], gs: Sequence[npt.NDArray[np.floating]], *,
    rank: int, n_pop: float, alpha: float = 1.0, beta: float = 0.03, damping: float = 1e-6,
    output_damping: float | None = None, gamma: float = 1024.0, normalize: bool = True,
    method: str = "auto", auto_damping: bool = False, tol: float = 1e-12,
    max_applications: int | None = None, deterministic: bool = True, dense_fallback: bool = True,
    output_precisions: Sequence[npt.NDArray[np.floating] | None] | None = None,
    names: Sequence[str] | None = None,
) -> list[SolveResult]: ...
def lowrank_output_precision(sample_sums: npt.NDArray[np.float64], damping: float) -> npt.NDArray[np.float64]: ...
def num_threads() -> int: ...
def check_solve_options(
    *, rank: int, n_pop: float, alpha: float = 1.0, beta: float = 0.03, damping: float = 1e-6,
    output_damping: float | None = None, gamma: float = 1024.0, normalize: bool = True,
    method: str = "auto", auto_damping: bool = False, tol: float = 1e-12,
    max_applications: int | None = None, deterministic: bool = True, dense_fallback: bool = True,
    n: int | None = None, m: int | None = None, name: str = "",
) -> None:
    """The options checked as `solve` checks them, without solving: the same exceptions and
    messages. With `n` and `m` (Z is n × n, Ḡ is m × n) the rank is checked against them."""
