"""The conformance tolerances of SPEC §5, as formulas: their one source.

SPEC §5 ("Conformance tolerances") restates these formulas and their reasons
(``tests/test_conformance.py`` parses its table and compares it with
:data:`FORMULAS` and with the functions below); the checker
(:mod:`lora_da.conformance.checker`) reads them from here and nowhere else.
Each function returns ``(bound, reason)``, or ``(None, reason)`` where the
quantity is not determined by the data and is not checked.

The quantities they depend on, per module of a case:

* ``n`` — the input dimension (``Z`` is ``n × n``);
* ``cond`` — ``κ = cond₂(Z_λ) = (λ_max(Z) + λ) / (λ_min(Z) + λ)``, the
  condition number of the damped input factor the recipe solves with;
* ``gap_rel`` — ``g = (λ_{r+1} − λ_r) / ‖Ω‖₂`` of the exact answer;
* ``r`` — the rank; ``alignment`` — ``a = ‖Δ̂ᵀ V Vᵀ‖_F``, the size of ``γ·B A``;
* ``unit`` — the unit roundoff of the format the results were stored in
  (0 for float64): :func:`stored`.

Why these formulas. A backward-stable float64 solve with a Cholesky factor of
``Z_λ`` computes ``Z_λ⁻¹`` (hence ``Δ`` and ``Ω``) with a relative error of at
most ``c·n·u·κ`` (u = 2⁻⁵³; Higham, *Accuracy and Stability of Numerical
Algorithms*, Thm. 10.4 and §7.1). That worst case needs every rounding error to
add up in one direction; rounding errors of a sum of ``n`` terms grow like
``√n`` (Higham §2.8, the rule of thumb that replaces ``n`` by ``√n`` in such a
bound), and on the cases the core and the oracle differ by at least a thousand
times less than even ``√n·u·κ`` (``test_core_passes_every_case`` prints the
margins). ``η = √n·u·κ`` is therefore what two float64 implementations can be
held to, while ``n·u·κ`` was so loose (``≈ 3e-6`` at κ = 7e7) that float32
solves passed the cond(Z) ≈ 1e8 case. The oracle carries an error of the same
size, so two correct implementations may differ by ``2η``. To that the solver's
own residual bound adds ``RESIDUAL = 1e-10`` (SPEC §5 Bounds). Weyl's theorem
turns a perturbation of ``Ω`` into eigenvalue errors of the same size;
Davis–Kahan's sin θ theorem divides it by the gap.
"""

from __future__ import annotations

import math

from lora_da._core import CONTRACT_RESIDUAL

UNIT_ROUNDOFF = 2.0**-53
RESIDUAL = CONTRACT_RESIDUAL  # SPEC §5: the eigen-residual every solver must reach, relative to ‖Ω‖₂
SIGMA_RESIDUAL = 1e-9  # SPEC §5: σ to a relative residual of 1e-9
SUBSPACE_CHECKABLE = 0.1  # a sin θ bound above this says nothing: the subspace is not checked

# SPEC §5's table, formula by formula, in its notation (ρ = RESIDUAL, ρ_σ = SIGMA_RESIDUAL,
# η = rounding(), s = stored(), g = gap_rel, a = alignment); the test of the table compares
# SPEC's text with these strings and evaluates them against the functions below.
FORMULAS = {
    "η": "√n·u·κ",
    "s": "4r·u_store",
    "eigenvalues": "ρ + 2η + s",
    "sin θ": "(ρ + 2η) / g + s",
    "objective": "r·(ρ + 2η) + r·s",
    "B·A rel. error": "(√(2r)·((ρ + 2η) / g) + ρ_σ + η) / a + s / a",
    "B = Δ̂ᵀAᵀ": "ρ_σ + 3η + s",
    "γAAᵀ = I": "2r·n·u + s",
    "σ rel. error": "ρ_σ + η",
    "c rel. error": "2·(ρ_σ + η) + n·u",
}


def rounding(n: int, cond: float) -> float:
    """``η = √n · u · cond(Z_λ)``: the relative error that a float64 Cholesky
    solve leaves in ``Z_λ⁻¹``, ``Δ`` and ``Ω`` (see the module docstring for the
    ``√n``)."""
    return math.sqrt(n) * UNIT_ROUNDOFF * cond


def stored(r: int, unit: float) -> float:
    """``s = 4r · u_store``, what storing ``A``/``B`` in a format of unit roundoff
    ``unit`` adds (0 for float64): each entry moves by ``unit`` relative, so each of
    ``A``'s ``r`` rows by ``unit`` in norm, ``γAAᵀ`` by ``2√r·unit`` and ``B A`` by
    ``2r·unit`` of ``‖B‖_F‖A‖_F``; ``4r·unit`` covers each. It is added to every
    bound below (``r·s`` to the objective, a sum of ``r`` terms; ``s/a`` to ``B A``,
    whose reference size is ``a/γ``). Float32 results: ``s ≈ 2.4e-7·r``; bfloat16:
    ``s ≈ 1.6e-2·r``, which leaves little to check (the checker says so)."""
    return 4 * r * unit


def _storage(reason: str, extra: float, term: str = "s = 4r·u_store") -> str:
    return reason if extra == 0 else f"{reason}; + storage {term} = {extra:.1e}"


def eigenvalue(n: int, cond: float, r: int = 1, unit: float = 0.0) -> tuple[float, str]:
    """``|λ_i − λ_i^ref| ≤ (ρ + 2η + s) · ‖Ω‖₂``."""
    eta, s = rounding(n, cond), stored(r, unit)
    return RESIDUAL + 2 * eta + s, _storage(
        f"Weyl: eigenvalues move by ‖δΩ‖; residual {RESIDUAL:g} + 2·√n·u·κ = 2·{eta:.1e} (both sides round)", s)


def subspace(n: int, cond: float, gap_rel: float, r: int = 1, unit: float = 0.0) -> tuple[float | None, str]:
    """``sin θ_max(V, V_ref) ≤ (ρ + 2η) / g + s``, checked only where ``(ρ + 2η) / g``
    is below ``SUBSPACE_CHECKABLE`` (elsewhere the data do not fix the subspace:
    any basis of the near-degenerate cluster is right, and :func:`objective` is
    the check)."""
    eta, s = rounding(n, cond), stored(r, unit)
    bound = (RESIDUAL + 2 * eta) / gap_rel if gap_rel > 0 else float("inf")
    if bound > SUBSPACE_CHECKABLE:
        return None, (f"not determined: (residual + 2·√n·u·κ) / gap = {bound:.1e} > {SUBSPACE_CHECKABLE:g} "
                      f"(gap/‖Ω‖ {gap_rel:.1e}); the objective and B = Δ̂ᵀAᵀ are checked instead")
    return bound + s, _storage(f"Davis–Kahan: (residual {RESIDUAL:g} + 2·√n·u·κ {2 * eta:.1e}) / gap {gap_rel:.1e}", s)


def objective(n: int, cond: float, r: int, unit: float = 0.0) -> tuple[float, str]:
    """``|tr(Qᵀ Ω Q) − Σ λ_i^ref| ≤ (r·(ρ + 2η) + r·s) · ‖Ω‖₂`` (``Q`` an orthonormal
    basis of the returned subspace): checked on every case, and the only
    subspace check where the gap is too small to fix the subspace."""
    tol, _ = eigenvalue(n, cond)
    s = stored(r, unit)
    return r * tol + r * s, _storage(
        f"r eigenvalue bounds: the bottom-r objective is what any basis of the cluster must reach ({r}·{tol:.1e})",
        r * s, "r·s")


def product(n: int, cond: float, gap_rel: float, r: int, alignment: float,
            unit: float = 0.0) -> tuple[float | None, str]:
    """``‖BA − (BA)_ref‖_F / ‖(BA)_ref‖_F ≤ (√(2r) · sinθ_bound + σ_bound) / a + s / a``:
    ``γ·B A = Δ̂ᵀ V Vᵀ``, a projector moved by ``sin θ`` (‖δP‖_F ≤ √(2r) sin θ) and
    ``Δ̂`` moved by the relative error of σ. Not checked where the subspace is not
    (:func:`coefficient` checks ``B`` there)."""
    s, why = subspace(n, cond, gap_rel)
    if s is None:
        return None, why
    sig, _ = sigma(n, cond)
    if alignment <= 0:
        return None, "B = 0 here: checked as exactly zero"
    extra = stored(r, unit) / alignment
    bound = ((2 * r) ** 0.5 * s + sig) / alignment + extra
    return bound, _storage(f"projector: (√(2r)·sinθ bound + σ bound) / ‖Δ̂ᵀVVᵀ‖_F = {alignment:.2f}", extra, "s/a")


def coefficient(n: int, cond: float, r: int, unit: float = 0.0) -> tuple[float, str]:
    """``‖B − Δ̂_refᵀ Aᵀ‖_F / (‖Δ̂_ref‖₂ ‖A‖_F) ≤ ρ_σ + 3η + s``
    (``2η`` for ``Δ`` plus σ's bound ``ρ_σ + η``).

    SPEC §3 step 8 fixes ``B`` from ``A``: ``A = Vᵀ/√γ`` and ``B = Δ̂ᵀV/√γ``, so
    ``B = Δ̂ᵀ Aᵀ`` exactly, whatever ``V`` is. Held against the reference's ``Δ̂``
    and the result's own ``A``, this checks ``B`` on every case, the
    near-degenerate ones included, where the subspace and ``B·A`` are not
    determined. ``Δ = −Z_λ⁻¹Ḡᵀdiag(ỹ)`` carries ``η`` on each side (``2η``), and
    ``Δ̂ = Δ/σ`` the relative error of σ."""
    eta, s = rounding(n, cond), stored(r, unit)
    sig, _ = sigma(n, cond)
    return 2 * eta + sig + s, _storage(f"B = Δ̂ᵀAᵀ (SPEC §3 step 8): Δ̂ from a solve, 2·√n·u·κ {2 * eta:.1e} "
                                       f"+ σ bound {sig:.1e}", s)


def orthonormality(n: int, r: int, unit: float = 0.0) -> tuple[float, str]:
    """``‖γ·A·Aᵀ − I‖₂ ≤ 2r·n·u + s``: ``A = Vᵀ/√γ`` with ``V`` orthonormal (SPEC §3
    step 8), so ``A``'s scale and the orthonormality of its rows are fixed.
    Without this check ``A·4`` with ``B/4`` would leave ``B·A`` and the subspace
    unchanged. Each entry of ``VᵀV − I`` is a dot product of length ``n``: a
    float64 eigensolver leaves it within ``n·u`` (LAPACK's MRRR and QR
    eigenvectors are orthogonal to ``O(n·u)``; the core's ``‖γAAᵀ − I‖₂`` reaches
    ``1.9·n·u`` at r = 8 on these cases, a margin of 8), and the checker's own
    product ``A·Aᵀ`` adds ``n·u`` more
    (Higham Lemma 3.1: ``γ_n``); ``‖E‖₂ ≤ ‖E‖_F ≤ r·max|E_ij|`` for the ``r × r`` ``E``.
    Unlike :func:`rounding`, no ``√n``: eigenvector orthogonality is not a
    random sum of roundings."""
    s = stored(r, unit)
    return 2 * r * n * UNIT_ROUNDOFF + s, _storage(
        "A = Vᵀ/√γ, V orthonormal (SPEC §3 step 8): r·(n·u solver + n·u product)", s)


def sigma(n: int, cond: float) -> tuple[float, str]:
    """``|σ − σ_ref| / σ_ref ≤ ρ_σ + η``: ``Δ`` carries ``η``; σ's own iteration
    stops at a relative residual of ``ρ_σ = 1e-9``."""
    eta = rounding(n, cond)
    return SIGMA_RESIDUAL + eta, f"σ residual {SIGMA_RESIDUAL:g} + √n·u·κ {eta:.1e}"


def scale_c(n: int, cond: float) -> tuple[float, str]:
    """``|c − c_ref| / c_ref ≤ 2·(ρ_σ + η) + n·u``: ``c = (Σ ỹ) / N_pop / σ²``."""
    sig, _ = sigma(n, cond)
    return 2 * sig + n * UNIT_ROUNDOFF, "c ∝ 1/σ²: twice σ's bound, plus the sum of ỹ"
