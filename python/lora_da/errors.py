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
  truncated, corrupted, or from another model/version;
* ``DeviceTooSmallError(InvalidArgumentError)`` — the device cannot hold one
  input group's float64 sums beside a step (SPEC §7); with
  ``accumulate_on="auto"`` the collection then sums on the host instead.

The classes are defined in the Rust extension, where the core raises them
(``rust/src/python/errors.rs``), and re-exported here; they report this module as
theirs, so ``lora_da.errors.ShapeError`` is their name in reprs and pickles.

:class:`CLIError` is apart: the error of a command (``lora-da ...``), not of the
library — a user's choice on the command line refused, or an optional extra that
is not installed. The command line prints it as one line and exits with its
``exit_code``: 1, or 2 for a :class:`UsageError` (an option's value refused after
parsing, as argparse's own usage errors exit). It lives here, below every command, so that the modules a command
runs (the demo, compare, conformance) can raise it without importing the CLI.
"""

from lora_da._core import (
    InvalidArgumentError,
    LoraDAError,
    NonFiniteError,
    NotPositiveDefiniteError,
    ShapeError,
    StatisticsFileError,
)


class DeviceTooSmallError(InvalidArgumentError):
    """The planner's refusal when no plan fits the device (SPEC §7): even alone in its
    pass, an input group's sums do not fit beside the model's step. Defined here, not in
    the core: only the planner raises it."""


__all__ = [
    "LoraDAError",
    "ShapeError",
    "NonFiniteError",
    "InvalidArgumentError",
    "NotPositiveDefiniteError",
    "StatisticsFileError",
    "DeviceTooSmallError",
    "CLIError",
    "UsageError",
]


class CLIError(Exception):
    """A user error detected by the command line itself, or a missing optional extra:
    ``lora-da: error: <message>`` on stderr, exit status :attr:`exit_code`."""

    exit_code = 1


class UsageError(CLIError):
    """An option's value refused by a command after argparse parsed it (an unknown arm
    name for ``compare --methods``): exit status 2, as argparse's own usage errors."""

    exit_code = 2


def whole_number(value, name: str, *, minimum: int = 1, what: str | None = None) -> int:
    """A count or size a user gives (``max_samples``, ``rank``, ...) as an ``int``: a Python or
    numpy integer ≥ ``minimum``. A bool (which Python counts as 0 or 1), a float (even 2.0)
    or anything else is refused with an :class:`InvalidArgumentError` naming ``name``."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InvalidArgumentError(f"{name} must be {what or f'an integer ≥ {minimum}'}, got {value!r}")
    return int(value)
