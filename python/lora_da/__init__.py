"""lora-da: the LoRA-DA initialization for PEFT LoRA adapters.

The numerical contract is SPEC.md (shared with the project); the public API:

* :class:`InputFactor`, :class:`OutputFactor` — streaming float64 K-FAC
  factors (SPEC §2), implemented in Rust;
* :func:`solve`, :func:`solve_shared` — one module's initialization from
  ``Z``, ``y`` and ``Ḡ`` (SPEC §3), matrix-free block Krylov with a reported
  dense fallback (SPEC §4–5);
* :func:`collect_statistics` → :class:`Statistics` (one pass, any batch size);
* :class:`LoraDAConfig`, :func:`compute_init`, :func:`collect_and_solve` → :class:`Inits`
  (``{name: ModuleInit}`` with the run's :class:`RunReport`);
* PEFT: :func:`get_lora_da_state_dict`, :func:`initialize_lora_da_weights`,
  :func:`save_initial_adapter`;
* :mod:`lora_da.reference` — the dense float64 SciPy oracle.
"""

from lora_da._core import (
    GAP_REL,
    GAP_TOL,
    InputFactor,
    OutputFactor,
    SolveResult,
    lowrank_output_precision,
    num_threads,
)
from lora_da.core_args import solve, solve_shared  # the core's, their numeric options checked by name
from lora_da.adapters import get_lora_da_state_dict, initialize_lora_da_weights, save_initial_adapter
from lora_da.collect import collect_statistics
from lora_da.errors import (
    DeviceTooSmallError,
    InvalidArgumentError,
    LoraDAError,
    NonFiniteError,
    NotPositiveDefiniteError,
    ShapeError,
    StatisticsFileError,
)
from lora_da.init import LoraDAConfig
from lora_da.pipeline import collect_and_solve, compute_init
from lora_da.results import Inits, ModuleInit, RunReport
from lora_da.quality import POOR_GAP_REL, PoorInitWarning
from lora_da.statistics import Statistics
from lora_da.statistics_file import ModuleInfo
from lora_da.version import __version__  # noqa: F401 (the package's version)


def __getattr__(name):
    # The Trainer callback imports transformers' Trainer machinery: only when asked for.
    if name == "LoraDACallback":
        from lora_da.trainer import LoraDACallback

        return LoraDACallback
    raise AttributeError(f"module 'lora_da' has no attribute {name!r}")


__all__ = [
    "GAP_REL",
    "LoraDACallback",
    "GAP_TOL",
    "collect_statistics",
    "Statistics",
    "ModuleInfo",
    "LoraDAConfig",
    "ModuleInit",
    "compute_init",
    "collect_and_solve",
    "Inits",
    "RunReport",
    "get_lora_da_state_dict",
    "initialize_lora_da_weights",
    "save_initial_adapter",
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
    "DeviceTooSmallError",
    "PoorInitWarning",
    "POOR_GAP_REL",
]
