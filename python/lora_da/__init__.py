"""lora-da: the LoRA-DA initialization for PEFT LoRA adapters.

The numerical contract is SPEC.md (shared with the project); the public API:

* :class:`InputFactor`, :class:`OutputFactor` — streaming float64 K-FAC
  factors (SPEC §2), implemented in Rust;
* :func:`solve`, :func:`solve_shared` — one module's initialization from
  ``Z``, ``y`` and ``Ḡ`` (SPEC §3), matrix-free block Krylov with a reported
  dense fallback (SPEC §4–5);
* :mod:`lora_da.reference` — the dense float64 SciPy oracle.
"""

from lora_da._core import (
    InputFactor,
    OutputFactor,
    SolveResult,
    lowrank_output_precision,
    num_threads,
    solve,
    solve_shared,
)
from lora_da.errors import (
    InvalidArgumentError,
    LoraDAError,
    NonFiniteError,
    NotPositiveDefiniteError,
    ShapeError,
    StatisticsFileError,
)

__version__ = "0.1.0"

__all__ = [
    "InputFactor",
    "OutputFactor",
    "SolveResult",
    "solve",
    "solve_shared",
    "lowrank_output_precision",
    "num_threads",
    "LoraDAError",
    "ShapeError",
    "NonFiniteError",
    "InvalidArgumentError",
    "NotPositiveDefiniteError",
    "StatisticsFileError",
]
