"""The exception hierarchy of lora-da.

Every error the library raises on purpose is a :class:`LoraDAError`. Errors
about bad input are also :class:`ValueError`, so generic handlers still work.
The Rust core raises these same classes (``rust/src/python.rs`` maps its error
variants here).
"""


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


__all__ = [
    "LoraDAError",
    "ShapeError",
    "NonFiniteError",
    "InvalidArgumentError",
    "NotPositiveDefiniteError",
    "StatisticsFileError",
]
