"""When a LoRA-DA init is poor, say so (SPEC §5, "A poor init").

Two cases, read off the eigenvalues every solver reports:

* ``λ_r ≥ 0``: ``Ω = βc Z_λ⁻¹ − α Δ̂ Δ̂ᵀ`` is negative only along directions the
  gradient favours; past them the bottom of ``Ω`` is the variance term alone, so
  ``r`` exceeds the directions the calibration data inform.
* ``gap = λ_{r+1} − λ_r < POOR_GAP_REL · ‖Ω‖₂``: the ``r``-dimensional subspace is
  not determined by the data (a small change of ``Ω`` turns it).

One function, :func:`assess`, for the solve's result, the Python warning, the
report and ``lora-da report``'s table and plot, so they never disagree.
"""

from __future__ import annotations

import math
import warnings

from lora_da.words import count

# Relative to ‖Ω‖₂. Ten times GAP_TOL (1e-4), the Krylov route's bound on how far its
# λ_{r+1} (an upper bound) may sit above the true one, so a degenerate cut cannot hide
# behind that error; and by Davis–Kahan a relative change of Ω of 1e-4 (a few samples
# more or less) can already turn the subspace by sin θ ≈ 0.1 at this gap.
POOR_GAP_REL = 1e-3


class PoorInitWarning(UserWarning):
    """The init of some modules is not determined by the data (see :func:`assess`)."""


def assess(eigenvalues, gap, omega_norm) -> list[str]:
    """What is poor about one module's init, as sentences (empty when nothing is).

    ``eigenvalues`` are ``λ_1 … λ_r`` of ``Ω`` ascending, ``gap`` is ``λ_{r+1} − λ_r``
    (None when unknown) and ``omega_norm`` is ``‖Ω‖₂`` (None when unknown: the gap
    is then judged against ``max |λ_i|``, a lower bound of it)."""
    ev = [float(v) for v in eigenvalues]
    if not ev:
        return []
    r = len(ev)
    out = []
    if ev[-1] >= 0:
        k = sum(1 for v in ev if v < 0)
        if k:
            last = "the last direction comes" if r - k == 1 else f"the last {r - k} directions come"
            how = (f"only {k} of the {r} eigenvalues {'is' if k == 1 else 'are'} negative, so {last} from the "
                   f"variance term alone (use r ≤ {k}, or more calibration samples)")
        else:
            how = ("no eigenvalue is negative: the gradient informs no direction, all come from the variance term "
                   "(more calibration samples, or check that the loss has a gradient)")
        out.append(f"r = {r} exceeds the informative directions: λ_{r} = {ev[-1]:.2e} ≥ 0, {how}")
    scale = omega_norm if omega_norm is not None and omega_norm > 0 else max(abs(v) for v in ev)
    if gap is not None and math.isfinite(gap) and scale > 0 and gap < POOR_GAP_REL * scale:
        out.append(
            f"the gap at the cut λ_{r + 1} − λ_{r} = {gap:.2e} is {gap / scale:.1e}·‖Ω‖₂ < {POOR_GAP_REL:g}·‖Ω‖₂: "
            "the subspace is not determined by the data (another r, or more calibration samples)"
        )
    return out


def assess_result(result) -> list[str]:
    """:func:`assess` on a solve's result (a ``SolveResult`` or ``DeviceSolveResult``)."""
    return assess(result.eigenvalues, getattr(result, "gap", None), getattr(result, "omega_norm", None))


def _caller_level() -> int:
    """The ``stacklevel`` that points the warning at the first frame outside lora-da (the user's call)."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    # decorators around lora-da's functions (torch.no_grad) add frames of their own
    wrappers = ("torch.utils._contextlib", "contextlib", "functools")

    def inside(frame) -> bool:
        return (os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here
                or frame.f_globals.get("__name__", "") in wrappers)

    frame, level = sys._getframe(1), 1
    while frame is not None and inside(frame):
        frame, level = frame.f_back, level + 1
    return level


def warn_poor(inits: dict) -> None:
    """One :class:`PoorInitWarning` for all modules of ``inits`` (name → ``ModuleInit``) whose init is poor,
    attributed to the user's line that called lora-da."""
    # the PEFT path solves the wrapped layers: name them as the user's LoRA layers
    poor = {name.removesuffix(".base_layer"): init.warnings for name, init in inits.items() if init.warnings}
    if not poor:
        return
    shown = "; ".join(f"{name}: {msgs[0]}" for name, msgs in list(poor.items())[:3])
    more = f"; and {len(poor) - 3} more" if len(poor) > 3 else ""
    warnings.warn(f"lora-da: {len(poor)} of {count(len(inits), 'module')} {'has' if len(poor) == 1 else 'have'} "
                  f"a poor init — {shown}{more}",
                  PoorInitWarning, stacklevel=_caller_level())


def zero_gradient_modules(inits) -> list[str]:
    """The modules whose mean gradient Ḡ was exactly zero (their ``B`` is 0)."""
    return [n for n, i in inits.items() if bool(getattr(getattr(i, "result", i), "zero_gradient", False))]


def check_zero_gradients(inits, *, warn: bool = True) -> list[str]:
    """Refuse weights in which every module's gradient was zero (``B = 0`` everywhere: the
    adapter would start exactly where PEFT's default does, with nothing learned from the
    data); warn about the modules that have one. Returns those modules."""
    return _refuse_or_warn_zero(zero_gradient_modules(inits), len(inits), warn)


def check_zero_statistics(stats, modules=None) -> None:
    """Refuse, before any solve, statistics in which no module saw any gradient: every
    ``Σ g²`` zero, so every Ḡ is zero and every ``B`` would be 0 (SPEC §3). Read off the
    ``m``-long output factors, not the ``m × n`` gradient sums, whose scan costs as much
    as a pass over a 7B model's 54 GB of Ḡ (and reads every page of a streamed file); the
    modules whose Ḡ alone is zero are named from the solves' results
    (:func:`check_zero_gradients`). ``modules``: those to be solved."""
    import numpy as np

    names = [n for n in (stats.modules if modules is None else modules) if n in stats.output_factors]
    silent = [n for n in names if not np.any(stats.output_factors[n].sum())]
    if names and len(silent) == len(names):
        _refuse_or_warn_zero(silent, len(names), False)


def _refuse_or_warn_zero(zero: list[str], total: int, warn: bool) -> list[str]:
    """The one wording of the zero-gradient refusal and warning, whichever route finds it
    (the same text at the user's line: Python shows it once when two routes both check)."""
    if total and len(zero) == total:
        from lora_da.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"the mean gradient is zero in every one of the {total} targeted modules, so every B would be 0: "
            "the loss has no gradient on these samples (causal-LM rows of a single token, or labels all -100); "
            "pass samples of at least two tokens, or labels the loss can use"
        )
    if zero and warn:
        names = [n.removesuffix(".base_layer") for n in zero]  # the PEFT path solves the wrapped layers
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"lora-da: the mean gradient is zero in {len(zero)} of {total} modules ({shown}): their B is 0",
                      PoorInitWarning, stacklevel=_caller_level())
    return zero
