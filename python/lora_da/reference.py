"""The dense float64 reference of SPEC §3, in NumPy/SciPy.

This is the oracle the tests compare the Rust core against, and a readable
statement of the recipe for other implementations. It forms every matrix
(``Δ``, ``Z_λ⁻¹``, ``Ω``) explicitly and uses LAPACK's symmetric eigensolver,
so it costs ``O(n³ + n² m)``: use :func:`lora_da.solve` for real work.

Shapes follow the out × in convention: ``Ḡ`` is ``m × n``, ``Z`` is ``n × n``,
``y`` has ``m`` entries, ``A`` is ``r × n`` and ``B`` is ``m × r``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from lora_da._core import SOLVE_DEFAULTS


@dataclass
class ReferenceResult:
    """Outputs of the reference recipe (SPEC §3, steps 1–8)."""

    A: np.ndarray  # r × n
    B: np.ndarray  # m × r
    V: np.ndarray  # n × r, ascending eigenvalues, sign-fixed
    eigenvalues: np.ndarray  # the r smallest eigenvalues of Ω
    next_eigenvalue: float  # λ_{r+1}
    sigma: float
    c: float
    omega_norm: float  # ‖Ω‖₂
    omega: np.ndarray = field(repr=False)  # Ω itself (n × n)
    delta_hat: np.ndarray = field(repr=False)  # Δ̂ (n × m)

    @property
    def gap(self) -> float:
        return float(self.next_eigenvalue - self.eigenvalues[-1])


def _spectral_norm(omega: np.ndarray) -> float:
    """``‖Ω‖₂`` of a symmetric matrix: all eigenvalues up to n = 1024, ARPACK's
    largest-magnitude one above (far cheaper there), dense if ARPACK fails."""
    n = omega.shape[0]
    if n > 1024:
        import scipy.sparse.linalg

        try:
            v0 = np.ones(n) / np.sqrt(n)
            w = scipy.sparse.linalg.eigsh(omega, k=1, which="LM", tol=1e-13, v0=v0, return_eigenvectors=False)
            return float(abs(w[0]))
        except scipy.sparse.linalg.ArpackNoConvergence:
            pass
    return float(np.abs(np.linalg.eigvalsh(omega)).max())


def fix_signs(v: np.ndarray) -> np.ndarray:
    """SPEC §3 step 7: each column's entry of largest magnitude is made positive
    (the first such entry on ties, as ``numpy.argmax``)."""
    v = np.array(v, dtype=np.float64, copy=True)
    idx = np.argmax(np.abs(v), axis=0)
    signs = np.sign(v[idx, np.arange(v.shape[1])])
    signs[signs == 0] = 1.0
    return v * signs


def reference_solve(
    Z: np.ndarray,
    y: np.ndarray,
    G: np.ndarray,
    *,
    rank: int,
    n_pop: float,
    alpha: float = SOLVE_DEFAULTS["alpha"],
    beta: float = SOLVE_DEFAULTS["beta"],
    damping: float = SOLVE_DEFAULTS["damping"],
    output_damping: float | None = SOLVE_DEFAULTS["output_damping"],
    gamma: float = SOLVE_DEFAULTS["gamma"],
    normalize: bool = SOLVE_DEFAULTS["normalize"],
    output_precision: np.ndarray | None = None,
) -> ReferenceResult:
    """SPEC §3 with dense float64 linear algebra.

    ``output_precision`` replaces ``ỹ = 1/(y + λ_y)`` (the ``sequence_lowrank``
    output factor). Inputs are assumed valid; the core validates them.
    """
    Z = np.asarray(Z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    n = Z.shape[0]
    lam_y = damping if output_damping is None else output_damping

    # 1. Z_λ = Z + λI = L Lᵀ
    cho = scipy.linalg.cho_factor(Z + damping * np.eye(n), lower=True)
    # 2. ỹ
    y_tilde = 1.0 / (y + lam_y) if output_precision is None else np.asarray(output_precision, np.float64)
    # 3. Δ = −Z_λ⁻¹ Ḡᵀ diag(ỹ)   (n × m)
    delta = -scipy.linalg.cho_solve(cho, G.T * y_tilde[None, :])
    # 4. σ and Δ̂
    sigma = float(np.linalg.norm(delta, 2)) if normalize else 1.0
    delta_hat = delta / sigma
    # 5. c
    c = float(y_tilde.sum() / n_pop / sigma**2)
    # 6. Ω = −α Δ̂ Δ̂ᵀ + β c Z_λ⁻¹
    z_inv = scipy.linalg.cho_solve(cho, np.eye(n))
    z_inv = 0.5 * (z_inv + z_inv.T)
    omega = -alpha * delta_hat @ delta_hat.T + beta * c * z_inv
    omega = 0.5 * (omega + omega.T)
    # 7. bottom-r (+1 for the gap) eigenpairs
    w, vecs = scipy.linalg.eigh(omega, subset_by_index=[0, rank])
    V = fix_signs(vecs[:, :rank])
    # 8. A, B
    A = V.T / np.sqrt(gamma)
    B = delta_hat.T @ V / np.sqrt(gamma)
    omega_norm = _spectral_norm(omega)
    return ReferenceResult(
        A=A,
        B=B,
        V=V,
        eigenvalues=w[:rank].copy(),
        next_eigenvalue=float(w[rank]),
        sigma=sigma,
        c=c,
        omega_norm=omega_norm,
        omega=omega,
        delta_hat=delta_hat,
    )


def subspace_sin_theta(U: np.ndarray, V: np.ndarray) -> float:
    """``sin θ_max`` between the column spans of two orthonormal ``n × r`` bases,
    as ``‖(I − U Uᵀ) V‖₂`` (accurate for small angles, unlike ``√(1 − cos²)``)."""
    return float(np.linalg.norm(V - U @ (U.T @ V), 2))


def relative_residual(omega: np.ndarray, V: np.ndarray, eigenvalues: np.ndarray) -> float:
    """``max_i ‖Ω v_i − λ_i v_i‖ / ‖Ω‖₂`` (SPEC §5)."""
    r = omega @ V - V * eigenvalues[None, :]
    return float(np.linalg.norm(r, axis=0).max() / np.linalg.norm(omega, 2))


def lowrank_output_precision(sample_sums: np.ndarray, damping: float) -> np.ndarray:
    """Diagonal of ``(λ I + U Uᵀ / N)⁻¹`` formed densely (SPEC §2, ``sequence_lowrank``);
    ``sample_sums`` is ``N × m`` (rows are the ``u_s``)."""
    U = np.asarray(sample_sums, dtype=np.float64).T
    m, N = U.shape
    M = damping * np.eye(m) + U @ U.T / N
    return np.diag(np.linalg.inv(M)).copy()
