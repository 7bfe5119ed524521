"""The conformance tolerances of SPEC §5, as formulas: their one source.

SPEC §5 ("Conformance tolerances") restates these formulas and their reasons;
the checker (:mod:`lora_da.conformance.checker`) reads them from here and
nowhere else. Each function returns ``(bound, reason)``, or ``(None, reason)``
where the quantity is not determined by the data and is not checked.

The quantities they depend on, per module of a case:

* ``n`` — the input dimension (``Z`` is ``n × n``);
* ``cond`` — ``cond₂(Z_λ) = (λ_max(Z) + λ) / (λ_min(Z) + λ)``, the
  condition number of the damped input factor the recipe solves with;
* ``gap_rel`` — ``(λ_{r+1} − λ_r) / ‖Ω‖₂`` of the exact answer;
* ``r`` — the rank; ``alignment`` — ``‖Δ̂ᵀ V Vᵀ‖_F``, the size of ``γ·B A``.

Why these formulas. A backward-stable float64 solve with a Cholesky factor of
``Z_λ`` computes ``Z_λ⁻¹`` (hence ``Δ`` and ``Ω``) with a relative error of
at most about ``η = n · u · cond`` (u = 2⁻⁵³; Higham, *Accuracy and Stability
of Numerical Algorithms*, Thm. 10.4 and §7.1). The oracle carries an error of
the same size, so two correct implementations may differ by ``2η``. To that
the solver's own residual bound adds ``RESIDUAL = 1e-10`` (SPEC §5 Bounds).
Weyl's theorem turns a perturbation of ``Ω`` into eigenvalue errors of the
same size; Davis–Kahan's sin θ theorem divides it by the gap.
"""

from __future__ import annotations

from lora_da._core import CONTRACT_RESIDUAL

UNIT_ROUNDOFF = 2.0**-53
RESIDUAL = CONTRACT_RESIDUAL  # SPEC §5: the eigen-residual every solver must reach, relative to ‖Ω‖₂
SIGMA_RESIDUAL = 1e-9  # SPEC §5: σ to a relative residual of 1e-9
SUBSPACE_CHECKABLE = 0.1  # a sin θ bound above this says nothing: the subspace is not checked


def rounding(n: int, cond: float) -> float:
    """``η = n · u · cond(Z_λ)``: the relative error a backward-stable float64
    Cholesky solve may leave in ``Z_λ⁻¹``, ``Δ`` and ``Ω``."""
    return n * UNIT_ROUNDOFF * cond


def stored(r: int, unit: float) -> float:
    """What storing ``A``/``B`` in a format of unit roundoff ``unit`` adds (0 for
    float64): each entry moves by ``unit`` relative, so a basis of ``r`` vectors by
    at most ``√r · unit`` in norm; ``4r · unit`` is added to every bound below
    (float32 results: about ``2.4e-7 · r``)."""
    return 4 * r * unit


def eigenvalue(n: int, cond: float) -> tuple[float, str]:
    """``|λ_i − λ_i^ref| ≤ (RESIDUAL + 2η) · ‖Ω‖₂``."""
    eta = rounding(n, cond)
    return RESIDUAL + 2 * eta, (
        f"Weyl: eigenvalues move by ‖δΩ‖; residual {RESIDUAL:g} + 2·n·u·cond = 2·{eta:.1e} (both sides round)"
    )


def subspace(n: int, cond: float, gap_rel: float) -> tuple[float | None, str]:
    """``sin θ_max(V, V_ref) ≤ (RESIDUAL + 2η) / (gap/‖Ω‖₂)``, checked only where
    that bound is below ``SUBSPACE_CHECKABLE`` (elsewhere the data do not fix the
    subspace: any basis of the near-degenerate cluster is right, and
    :func:`objective` is the check)."""
    eta = rounding(n, cond)
    bound = (RESIDUAL + 2 * eta) / gap_rel if gap_rel > 0 else float("inf")
    if bound > SUBSPACE_CHECKABLE:
        return None, (f"not determined: (residual + 2·n·u·cond) / gap = {bound:.1e} > {SUBSPACE_CHECKABLE:g} "
                      f"(gap/‖Ω‖ {gap_rel:.1e}); the objective is checked instead")
    return bound, f"Davis–Kahan: (residual {RESIDUAL:g} + 2·n·u·cond {2 * eta:.1e}) / gap {gap_rel:.1e}"


def objective(n: int, cond: float, r: int) -> tuple[float, str]:
    """``|tr(Qᵀ Ω Q) − Σ λ_i^ref| ≤ r · (RESIDUAL + 2η) · ‖Ω‖₂`` (``Q`` an orthonormal
    basis of the returned subspace): checked on every case, and the only
    subspace check where the gap is too small to fix the subspace."""
    tol, _ = eigenvalue(n, cond)
    return r * tol, f"r eigenvalue bounds: the bottom-r objective is what any basis of the cluster must reach ({r}·{tol:.1e})"


def product(n: int, cond: float, gap_rel: float, r: int, alignment: float) -> tuple[float | None, str]:
    """``‖BA − (BA)_ref‖_F / ‖(BA)_ref‖_F ≤ (√(2r) · sinθ_bound + σ_bound) / alignment``:
    ``γ·B A = Δ̂ᵀ V Vᵀ``, a projector moved by ``sin θ`` (‖δP‖_F ≤ √(2r) sin θ) and
    ``Δ̂`` moved by the relative error of σ. Not checked where the subspace is not."""
    s, why = subspace(n, cond, gap_rel)
    if s is None:
        return None, why
    sig, _ = sigma(n, cond)
    if alignment <= 0:
        return None, "B = 0 here: checked as exactly zero"
    bound = ((2 * r) ** 0.5 * s + sig) / alignment
    return bound, f"projector: (√(2r)·sinθ bound + σ bound) / ‖Δ̂ᵀVVᵀ‖_F = {alignment:.2f}"


def sigma(n: int, cond: float) -> tuple[float, str]:
    """``|σ − σ_ref| / σ_ref ≤ SIGMA_RESIDUAL + η``: ``Δ`` carries ``η``; σ's own
    iteration stops at a relative residual of 1e-9."""
    eta = rounding(n, cond)
    return SIGMA_RESIDUAL + eta, f"σ residual {SIGMA_RESIDUAL:g} + n·u·cond {eta:.1e}"


def scale_c(n: int, cond: float) -> tuple[float, str]:
    """``|c − c_ref| / c_ref ≤ 2 · σ bound``: ``c = (Σ ỹ) / N_pop / σ²``."""
    sig, _ = sigma(n, cond)
    return 2 * sig + n * UNIT_ROUNDOFF, "c ∝ 1/σ²: twice σ's bound, plus the sum of ỹ"
