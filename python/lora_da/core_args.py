"""The Rust core's solve entry points as the package exports them (SPEC §3): ``solve`` and
``solve_shared``, with their numeric options checked here
first, by name. The binding's own conversion took ``True`` for 1 and raised a raw
``TypeError`` (``rank=2.0``) or ``OverflowError`` (``n_pop=10**400``) naming no option;
the domains (``rank ≥ 1``, ``n_pop > 0``, ...) stay the core's, with its messages."""

from __future__ import annotations

import functools
import numbers

from lora_da._core import solve as _core_solve
from lora_da._core import solve_shared as _core_solve_shared
from lora_da.errors import InvalidArgumentError

_INTEGERS = ("rank", "max_applications", "n", "m")
_REALS = ("n_pop", "alpha", "beta", "damping", "output_damping", "gamma", "tol")


def check_numbers(where: str, options: dict) -> dict:
    """``options`` with each integer option an ``int`` (a Python or numpy integer, not a bool
    or a float) within 64 bits, and each real option a ``float`` (any real number, not a bool)
    within float64's range; anything else refused naming ``where`` and the option."""
    out = dict(options)
    for names, kind, need in ((_INTEGERS, numbers.Integral, "an integer"), (_REALS, numbers.Real, "a real number")):
        for name in names:
            v = out.get(name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, kind):
                raise InvalidArgumentError(f"{where}: {name} must be {need}, got {v!r}")
            digits = f"{str(v)[:12]}… ({len(str(v))} digits)"
            if kind is numbers.Integral:
                if not -(2**63) <= v < 2**63:
                    raise InvalidArgumentError(f"{where}: {name} = {digits} is past 64 bits")
                out[name] = int(v)
                continue
            try:
                out[name] = float(v)
            except OverflowError:
                raise InvalidArgumentError(f"{where}: {name} = {digits} is too large for a float64") from None
    for name in ("normalize", "auto_damping", "deterministic", "dense_fallback"):
        v = out.get(name)
        if v is not None and not isinstance(v, bool) and type(v).__name__ != "bool_":
            raise InvalidArgumentError(f"{where}: {name} must be True or False, got {v!r}")
        if v is not None:
            out[name] = bool(v)
    return out


def _checked(core_fn):
    @functools.wraps(core_fn)
    def call(*args, **kwargs):
        return core_fn(*args, **check_numbers(core_fn.__name__, kwargs))

    return call


solve = _checked(_core_solve)
solve_shared = _checked(_core_solve_shared)
