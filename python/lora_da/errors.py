"""The exception hierarchy of lora-da.

Every error the library raises on purpose is a :class:`LoraDAError`. Errors
about bad input are also :class:`ValueError`, so generic handlers still work:

* ``LoraDAError(Exception)`` — base class of every lora-da error;
* ``ShapeError(LoraDAError, ValueError)`` — an array has the wrong shape,
  length or dtype;
* ``NonFiniteError(LoraDAError, ValueError)`` — a NaN or infinity where a
  finite number is required;
* ``InvalidArgumentError(LoraDAError, ValueError)`` — a scalar argument is
  outside its domain (rank, n_pop, damping, ...);
* ``NotPositiveDefiniteError(LoraDAError, ValueError)`` — ``Z + λI`` could not
  be factored (SPEC §3 step 1); raise the damping;
* ``StatisticsFileError(LoraDAError, ValueError)`` — a statistics file is
  truncated, corrupted, or from another model/version.

The classes are defined in the Rust extension, where the core raises them
(``rust/src/python/errors.rs``), and re-exported here; they report this module as
theirs, so ``lora_da.errors.ShapeError`` is their name in reprs and pickles.
"""

from lora_da._core import (
    InvalidArgumentError,
    LoraDAError,
    NonFiniteError,
    NotPositiveDefiniteError,
    ShapeError,
    StatisticsFileError,
)

__all__ = [
    "LoraDAError",
    "ShapeError",
    "NonFiniteError",
    "InvalidArgumentError",
    "NotPositiveDefiniteError",
    "StatisticsFileError",
]
