"""SPEC §3 with torch in float64: the GPU route of :func:`lora_da.compute_init`,
and on the CPU the host's dense route (LAPACK through torch and SciPy).

On an H200 float64 matrix products run at tens of TFLOP/s while the host's
cores manage a fraction of one, so here the dense quantities of SPEC §3 are
formed (``Z_λ⁻¹``, ``Δ``, ``ΔΔᵀ``) and the eigenproblem is solved on the
device. The bottom of ``Ω`` is found by Chebyshev-filtered subspace iteration:

* ``Ω′ = β c′ Z_λ⁻¹ − α Δ Δᵀ`` with ``c′ = Σ ỹ / N_pop`` is ``σ² Ω`` (σ only
  scales Ω, SPEC §3 steps 4–6), so its eigenvectors are Ω's;
* ``ΔΔᵀ ≼ σ² I`` and ``Z_λ⁻¹ ≻ 0``, so every eigenvalue of ``Ω′`` exceeds
  ``−α σ²``: a lower bound of the spectrum for free, which the filter needs;
* a filter step is a product of the dense ``Ω′`` with a block, one
  memory-bound pass over ``Ω′`` (fast on a GPU); where the spectrum makes the
  filter slow (a wide top, from an ill-conditioned ``Z``), the budget of
  block products runs out and the dense solver of the device runs instead;
* every result is checked by its true residual ``‖Ω′ v − λ v‖ / ‖Ω′‖₂``
  (SPEC §5); above ``1e-10`` the dense symmetric eigensolver of the device
  takes over and ``notes`` says so.

The same code runs on the CPU (the tests compare it there with the SciPy
reference and the Rust core); it is meant for CUDA devices.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import time

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import torch

from lora_da._core import CONTRACT_RESIDUAL, SOLVE_DEFAULTS, SYMMETRY_TOL, check_solve_options
from lora_da import plan
from lora_da.memory import out_of_memory
from lora_da.errors import InvalidArgumentError, LoraDAError, NonFiniteError, NotPositiveDefiniteError, ShapeError
from lora_da.results import DeviceSolveResult, check_finite_result


# Vectors beyond r in the filtered block: more cost little while the product
# with Ω′ stays memory-bound, and widen the gap the filter converges at.
BLOCK_EXTRA = 16

# Seconds per stage, summed over solves, when a caller sets ``PROFILE = {}``
# (benches only: each stage then ends with a device synchronization).
PROFILE: dict[str, float] | None = None


@contextlib.contextmanager
def _stage(name: str, device):
    if PROFILE is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    PROFILE[name] = PROFILE.get(name, 0.0) + time.perf_counter() - t


def _count(name: str, k: int) -> None:
    if PROFILE is not None:
        PROFILE[name] = PROFILE.get(name, 0) + k


def _row_blocks(n: int):
    """Rows of the element-wise passes over an ``n × n`` matrix (symmetry, finiteness, row
    sums): temporaries of ``SOLVE_ROWS × n`` instead of a second ``n × n`` (SPEC §7 plans a
    device solve's work space, :attr:`lora_da.plan.Unit.solve_bytes`)."""
    rows = plan.SOLVE_ROWS
    return ((a, min(a + rows, n)) for a in range(0, n, rows))


def _all_finite(t: torch.Tensor) -> bool:
    if t.dim() != 2:
        return bool(torch.isfinite(t).all())
    return all(bool(torch.isfinite(t[a:b]).all()) for a, b in _row_blocks(t.shape[0]))


def _require_finite(t: torch.Tensor, what: str) -> None:
    if not _all_finite(t):
        raise NonFiniteError(f"torch_solve: {what} has non-finite entries")


def _asymmetry(Z: torch.Tensor) -> float:
    """``max |Z − Zᵀ|``, a block of rows at a time."""
    return max(float((Z[a:b] - Z[:, a:b].T).abs().max()) for a, b in _row_blocks(Z.shape[0]))


def _max_row_sum(S: torch.Tensor) -> float:
    """``‖S‖_∞ = max_i Σ_j |S_ij|``, a block of rows at a time."""
    return max(float(S[a:b].abs().sum(1).max()) for a, b in _row_blocks(S.shape[0]))


def inverse_input(Z: torch.Tensor, damping: float, auto_damping: bool, name: str = "") -> tuple[torch.Tensor, float]:
    """SPEC §3 step 1 (``Z`` square, as :func:`solve_group_device` checks): ``Z_λ⁻¹`` from the Cholesky factor of ``Z + λI``, and the
    ``λ`` used (raised ten-fold from at least ``1e-10 · mean(diag Z)``, at most
    12 times, when ``auto_damping``, as the core does). LAPACK's
    ``dpotrf``/``dpotri`` through SciPy on the CPU (three times faster than
    torch's there), the device's Cholesky on a GPU."""
    where = f"module {name}: " if name else ""
    _require_finite(Z, f"{where}Z")
    scale = float(torch.linalg.vector_norm(Z, float("inf")))
    if _asymmetry(Z) > SYMMETRY_TOL * max(scale, np.finfo(float).tiny):
        raise InvalidArgumentError(f"torch_solve: {where}Z is not symmetric")
    # summed left to right as the core does (cholesky.rs): torch's reduction order changes
    # between releases (2.15 moved λ's last bit against the core's)
    diag = Z.diagonal().cpu().numpy()
    mean_diag = float(np.add.accumulate(diag)[-1]) / len(diag) if len(diag) else 0.0
    lam = damping
    for attempt in range(13):
        inv = _spd_inverse(Z, lam)
        if inv is not None:
            return inv, lam
        if not auto_damping or attempt == 12:
            break
        # From 1e-10 of the mean diagonal (or of 1 for an all-zero Z): a subnormal λ
        # would factor and then overflow in the inverse.
        lam = max(lam * 10.0, 1e-10 * (abs(mean_diag) if mean_diag != 0 else 1.0))
    hint = "" if auto_damping else " or allow it to be raised automatically (auto_damping=True)"
    raise NotPositiveDefiniteError(
        f"{where}the Cholesky factorization of Z + λI failed with λ = {lam:e} (mean diagonal of Z = {mean_diag:e}); "
        f"raise the damping{hint}"
    )


def _spd_inverse(Z: torch.Tensor, lam: float) -> torch.Tensor | None:
    """``((Z + Zᵀ)/2 + λI)⁻¹``, symmetric, or None when the Cholesky fails or the inverse
    overflows. On a GPU at most two ``n × n`` beside ``Z`` at any time (the symmetric copy
    and its factor; then the factor, inverted in place, and temporaries of ``n²/2``)."""
    n = Z.shape[0]
    if Z.device.type == "cpu":
        a = _symmetric(Z.clone()).numpy()
        a[np.diag_indices(n)] += lam
        c, info = scipy.linalg.lapack.dpotrf(a, lower=1, clean=0, overwrite_a=1)
        if info != 0:
            return None
        inv, info = scipy.linalg.lapack.dpotri(c, lower=1, overwrite_c=1)
        if info != 0:
            return None
        inv = torch.from_numpy(np.tril(inv))
        inv = inv.add_(torch.tril(inv, -1).T)
        return inv if bool(torch.isfinite(inv).all()) else None
    A = _symmetric(Z.clone())
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if int(info) != 0:
        return None
    inv = _symmetric(gram_of_lower_(lower_inverse_(L)))
    return inv if _all_finite(inv) else None


# Order below which the halving of :func:`lower_inverse_` and :func:`gram_of_lower_` stops:
# at n = 1024 a triangular solve or product is a single efficient kernel on an H200.
HALVING_LEAF = 1024


def lower_inverse_(L: torch.Tensor, leaf: int = HALVING_LEAF) -> torch.Tensor:
    """``L ← L⁻¹`` in place for a lower-triangular ``L`` (zeros above the diagonal), by halves:
    ``[A 0; B C]⁻¹ = [A⁻¹ 0; −C⁻¹ B A⁻¹  C⁻¹]`` (LAPACK's recursive ``trtri``). With
    :func:`gram_of_lower_` it gives ``Z_λ⁻¹`` in ``4n³/3`` flops of matrix products, where
    ``torch.cholesky_inverse`` solves with the identity in ``2n³`` (H200, n = 11008: 41 ms
    against 75 ms, ``benches/bench_solve_wall.py``); the temporaries are ``n²/2`` at most."""
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        return L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
    h = n // 2
    lower_inverse_(L[:h, :h], leaf)
    lower_inverse_(L[h:, h:], leaf)
    L[h:, :h] = torch.mm(L[h:, h:], L[h:, :h] @ L[:h, :h]).neg_()
    return L


def gram_of_lower_(M: torch.Tensor, leaf: int = HALVING_LEAF) -> torch.Tensor:
    """``M ← MᵀM`` in place for a lower-triangular ``M``, by halves (LAPACK's ``lauum``):
    with ``M = [A 0; B C]``, ``MᵀM = [AᵀA + BᵀB  BᵀC; CᵀB  CᵀC]``; ``CᵀB`` is formed while
    ``C`` is still triangular, the upper block last. Not symmetrized (the caller does)."""
    n = M.shape[0]
    if n <= leaf:
        return M.copy_(M.T @ M)
    h = n // 2
    A, B, C = M[:h, :h], M[h:, :h], M[h:, h:]
    BtB = B.T @ B
    gram_of_lower_(A, leaf).add_(BtB)
    del BtB
    B.copy_(C.T @ B)
    gram_of_lower_(C, leaf)
    M[:h, h:] = B.T
    return M


_starts: dict = {}
_starts_lock = threading.Lock()


def _start_block(n: int, k: int, device) -> torch.Tensor:
    """The iterations' orthonormal start (``n × k``), drawn on the CPU with a fixed seed: the
    same start on every device. Kept per device and shape (read only by its callers): a 7B
    model's solves ask for a few shapes some 700 times, and each draw and QR held the host."""
    key = (n, k, str(device))
    with _starts_lock:
        X = _starts.get(key)
    if X is None:
        g = torch.Generator().manual_seed(0x10DA)
        X = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64).to(device)).Q
        if X.device.type == "cuda":
            torch.cuda.current_stream(X.device).synchronize()  # other streams will read it
        with _starts_lock:
            X = _starts.setdefault(key, X)
    return X


def _top_eigenvalue(S: torch.Tensor) -> float:
    """Largest eigenvalue of a symmetric PSD matrix: the bottom of ``−S`` by the
    same filtered subspace iteration (its row-sum norm bounds the spectrum
    below), to a relative residual of 1e-10; its error is about the square of
    that, well inside the 1e-9 promised for σ."""
    lower = -_max_row_sum(S)
    if lower == 0.0:
        return 0.0
    n = S.shape[0]
    if S.device.type == "cpu" and n <= 512:
        # LAPACK's dsyevr for the one pair: milliseconds at this size
        return max(0.0, float(scipy.linalg.eigh(S.numpy(), subset_by_index=[n - 1, n - 1], eigvals_only=True,
                                                driver="evr")[0]))
    # the bottom of −S in S's own memory (negation is exact, and undone after)
    S.neg_()
    try:
        # −S ≼ 0: the top of its spectrum is bounded by 0 for sure, no power steps needed
        values, _, _, _, applications, *_ = bottom_eigenpairs(S, 1, lower, 1e-10, upper=0.0)
    finally:
        S.neg_()
    _count("sigma products", applications)
    return max(0.0, -float(values[0]))


def _symmetric(S: torch.Tensor) -> torch.Tensor:
    """``(S + Sᵀ)/2`` in place: a product such as ``Δ Δᵀ`` need not come out exactly
    symmetric. A block of rows ``a:b`` against the same block of columns, from column
    ``a`` on: what it reads, no earlier block has written, and both triangles get the
    same ``(S_ij + S_ji)/2``; the temporary is ``ROWS × n``, not a copy of ``S``."""
    n = S.shape[0]
    for a, b in _row_blocks(n):
        T = (S[a:b, a:] + S[a:, a:b].T).mul_(0.5)
        S[a:b, a:].copy_(T)
        S[a:, a:b].copy_(T.T)
    return S


def _gram(D: torch.Tensor) -> torch.Tensor:
    """``D Dᵀ`` (rows × rows), exactly symmetric, from its lower block triangle: each block of
    rows against the rows up to the block's end (at n = 4096, five eighths of a full product's
    flops), the diagonal blocks averaged with their transposes, the upper blocks mirrored
    from the lower. Temporaries of one diagonal block."""
    n = D.shape[0]
    W = torch.empty(n, n, dtype=D.dtype, device=D.device)
    blocks = list(_row_blocks(n))
    for a, b in blocks:
        W[a:b, :b].addmm_(D[a:b], D[:b].T, beta=0.0)  # beta = 0: W's unset entries are not read
    for a, b in blocks:
        d = W[a:b, a:b]
        d.copy_((d + d.T).mul_(0.5))
        W[a:b, b:] = W[b:, a:b].T
    return W


def _small_eigh(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a small projected matrix on the host: a k × k
    solve on a GPU costs a launch-bound millisecond, on the CPU microseconds."""
    w, S = torch.linalg.eigh(H.cpu())
    return w.to(H.device), S.to(H.device)


def _scaled_norms(R: torch.Tensor, scale: float) -> torch.Tensor:
    """Column norms of ``R / scale``: the entries are divided before they are squared, so that
    a residual near ``1e-10·‖Ω‖`` neither underflows (‖Ω‖ below about 1e-145) nor overflows
    (above about 1e145) on its way to a relative residual."""
    return torch.linalg.vector_norm(R / scale if scale > 0 else R, dim=0)


def _residuals(Omega: torch.Tensor, X: torch.Tensor, w: torch.Tensor, norm: float) -> torch.Tensor:
    """``‖Ω X − X diag(w)‖ / norm`` per column."""
    return _scaled_norms(Omega @ X - X * w[None, :], norm)


def chebyshev_filter(Omega: torch.Tensor, X: torch.Tensor, degree: int, a: float, b: float, a0: float) -> torch.Tensor:
    """``p(Ω′) X`` with ``p`` the degree-``degree`` Chebyshev polynomial that is
    bounded by 1 on ``[a, b]`` and grows fast below ``a``, scaled to 1 at
    ``a0`` (the three-term recurrence of Zhou & Saad's filtered subspace
    iteration, scaled so that nothing overflows)."""
    e, c = (b - a) / 2, (b + a) / 2
    sigma = e / (a0 - c)
    tau = 2.0 / sigma
    Y = torch.addmm(X, Omega, X, beta=-(c / e) * sigma, alpha=sigma / e)
    for _ in range(1, degree):
        sigma_new = 1.0 / (tau - sigma)
        # Y_new = s (Ω′Y − cY) − σσ_new X = d (X + (2c / (eσ)) Y) + s Ω′Y with s = 2σ_new/e and
        # d = −σσ_new: two launches, not six (at n = 4096 the launches, not the product, set a
        # step's time on an H200).
        s, d = 2.0 * sigma_new / e, -sigma * sigma_new
        Y_new = torch.add(X, Y, alpha=(2.0 * c / e) / sigma).addmm_(Omega, Y, beta=d, alpha=s)
        X, Y, sigma = Y, Y_new, sigma_new
    return Y


def _upper_bound(Omega: torch.Tensor, lower: float) -> tuple[float, float]:
    """An estimate of the spectrum's upper bound, and the top Ritz value: a few
    block power steps on ``Ω′ − lower·I`` (positive semi-definite, so its
    dominant end is the top of ``Ω′``), the top Ritz value plus its residual
    norm (an eigenvalue lies within that of it: the top one once the steps
    have found it, which a top close to the bulk relative to ``lower`` can
    prevent) and a 1 % margin; never above the row-sum norm, which bounds it
    surely. :func:`bottom_eigenpairs` raises it when the filtered block shows
    a Ritz value above it."""
    n = Omega.shape[0]
    X = _start_block(n, min(n, 4), Omega.device)
    for i in range(12):
        X = torch.addmm(X, Omega, X, beta=-lower)
        # orthonormal every fourth step (a QR is several launches and syncs on a GPU, the
        # product's own cost at n = 4096), columns only rescaled in between
        # (by the largest entry: a 2-norm's squares would leave the float64 range at extreme scales)
        X = torch.linalg.qr(X).Q if i % 4 == 3 else X / X.abs().amax(dim=0).clamp_min(np.finfo(float).tiny)
    w, U = _small_eigh(X.T @ Omega @ X)
    x = X @ U[:, -1]
    big = float(w.abs().max())
    res = float(_scaled_norms((Omega @ x - w[-1] * x)[:, None], big)[0]) * (big if big > 0 else 1.0)
    bound = float(w[-1]) + res
    surely = _max_row_sum(Omega)
    return min(surely, bound + 0.01 * abs(bound)), float(w[-1])


def bottom_eigenpairs(Omega: torch.Tensor, r: int, lower: float, tol: float, max_applications: int = 480,
                      upper: float | None = None) -> tuple:
    """The ``r + 1`` smallest eigenvalues of the symmetric ``Omega`` and the
    ``r`` eigenvectors, given ``lower`` ≤ λ_min (SPEC §3 step 7, §5), to a
    residual of ``min(tol, 1e-10)``; ``upper`` ≥ λ_max when the caller knows one
    for sure (else a few power steps estimate it).

    Chebyshev-filtered subspace iteration: each step is a product of ``Ω′``
    with a block of ``k > r`` vectors (a memory-bound pass over ``Ω′``, cheap
    on a GPU), then Rayleigh–Ritz. Above ``max_applications`` block products,
    or where the result misses the contract, the dense solver runs.
    Returns ``(values, vectors, residual, norm, applications, method, notes)``.
    """
    n = Omega.shape[0]
    # A looser tol would stop at a residual outside SPEC §5's contract; the core's Krylov
    # then redoes the solve densely, here the filter (cheaper) goes on to the contract.
    tol = min(tol, CONTRACT_RESIDUAL)
    notes: list[str] = []
    k = min(n, r + BLOCK_EXTRA)
    residual = float("inf")
    applications = 0
    if k < n // 2:
        # The residual is divided by a Ritz value, never above ‖Ω′‖₂: it is not understated.
        X = _start_block(n, k, Omega.device)
        w, S = _small_eigh(X.T @ Omega @ X)
        X = X @ S
        if upper is None:
            upper, top = _upper_bound(Omega, lower)
            norm = abs(top)
        else:
            norm = float(w.abs().max())  # a Ritz value: never above ‖Ω′‖₂ either
            # Above the bound by 1 % of that, as the estimated bound is: a block whose top Ritz
            # value is the bound itself (−S of rank below the block's width: zeros) would
            # otherwise leave at once for the dense solve.
            upper += 0.01 * norm
        locked = 0
        surely = None
        while applications < max_applications:
            a = float(w[-1])  # damp [θ_k, upper], amplify what lies below
            if not upper > a:
                # The block's top Ritz value reached the bound, so the bound was below the top of
                # the spectrum (an estimate: the power steps may not have found the top) and the
                # filter amplified it: raise it, up to the row-sum norm, which bounds it surely.
                surely = _max_row_sum(Omega) if surely is None else surely
                if not surely > a:
                    break
                upper = min(surely, a + 0.01 * max(abs(a), norm))
            # The filter is 1 at the lowest unlocked Ritz value and grows like
            # cosh(d·acosh(t)); keep its range within 1e10 so that the other
            # wanted directions keep their digits beside the fastest one.
            a0 = min(float(w[locked]), a - 1e-12 * norm)
            t0 = (upper + a - 2 * a0) / (upper - a)
            degree = int(min(64, max(1, math.floor(23.0 / math.acosh(max(t0, 1.0 + 1e-12))))))
            Y = chebyshev_filter(Omega, X[:, locked:], degree, a, upper, a0)
            if locked:
                # Converged vectors are locked: the rest is kept orthogonal to them.
                Xl = X[:, :locked]
                for _ in range(2):
                    Y = Y - Xl @ (Xl.T @ Y)
                X = torch.cat([Xl, torch.linalg.qr(Y).Q], dim=1)
            else:
                X = torch.linalg.qr(Y).Q
            applications += degree
            OX = Omega @ X
            w, S = _small_eigh(X.T @ OX)
            X, OX = X @ S, OX @ S
            norm = max(norm, float(w.abs().max()))
            rel = _scaled_norms(OX[:, :r] - X[:, :r] * w[None, :r], norm).cpu()
            residual = float(rel.max())
            if residual <= tol:
                return w[: r + 1], X[:, :r], residual, norm, applications, "chebyshev", notes
            done = (rel <= tol).tolist()
            locked = next((i for i, ok in enumerate(done) if not ok), r)
        if residual <= CONTRACT_RESIDUAL:
            return w[: r + 1], X[:, :r], residual, norm, applications, "chebyshev", notes
        notes.append(
            f"filtered subspace iteration stopped at residual {residual:.2e} after {applications} block products "
            f"(contract: {CONTRACT_RESIDUAL:.0e}); fell back to the dense solve"
        )
    values, X, residual, norm = dense_bottom(Omega, r, lower)
    return values, X, residual, norm, applications, "dense", notes


def dense_bottom(Omega: torch.Tensor, r: int, lower: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The ``r + 1`` smallest eigenpairs of ``Omega`` by a dense symmetric
    eigensolver: on the CPU LAPACK's ``dsyevr`` for those pairs only (SciPy),
    several times faster than a full decomposition; on a GPU the device's
    full one. Returns ``(values, vectors (n × r), residual, ‖Ω‖₂)``."""
    n = Omega.shape[0]
    if Omega.device.type == "cpu":
        w, U = scipy.linalg.eigh(Omega.numpy(), subset_by_index=[0, min(r, n - 1)], driver="evr")
        w, U = torch.from_numpy(w), torch.from_numpy(np.ascontiguousarray(U))
        # ‖Ω′‖₂ from the bottom and a Ritz value of the top (never above it: residuals are not understated)
        top = _upper_bound(Omega, min(lower, float(w[0])))[1] if n > 1 else float(w[0])
        norm = max(abs(float(w[0])), abs(top))
    else:
        w, U = torch.linalg.eigh(Omega)
        norm = float(w.abs().max())
    X = U[:, :r]
    residual = float(_residuals(Omega, X, w[:r], norm).max())
    return w[: r + 1], X, residual, norm


def fix_signs(V: torch.Tensor) -> torch.Tensor:
    """SPEC §3 step 7: each column's entry of largest magnitude made positive (the first on ties)."""
    idx = V.abs().argmax(dim=0)
    s = torch.sign(V[idx, torch.arange(V.shape[1], device=V.device)])
    s[s == 0] = 1.0
    return V * s


def _check_options(*, rank, method, **reals) -> None:
    """The types here (a bool, None or a string is not a number; the binding would
    convert or reject them without naming the option), the domains by the core's own
    rules and messages (``check_solve_options``): one definition of each."""
    def bad(name, v, need):
        raise InvalidArgumentError(f"torch_solve: {name} must be {need}, got {v!r}")

    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, numbers.Integral) or rank < 1:
        bad("rank", rank, "an integer ≥ 1")
    if rank >= 2**63:
        bad("rank", f"{str(rank)[:12]}…", "less than 2⁶³")
    floats = {}
    for name, v in reals.items():
        if v is None and name == "output_damping":
            floats[name] = None
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            bad(name, v, "a real number")
        try:
            floats[name] = float(v)
        except OverflowError:
            bad(name, f"{str(v)[:12]}…", "representable in float64")
    if method not in ("auto", "krylov", "dense"):
        bad("method", method, "'auto', 'krylov' or 'dense'")
    check_solve_options(rank=int(rank), method=method, name="torch_solve", **floats)


def solve_group_device(
    Z: torch.Tensor,
    ys: list[torch.Tensor],
    Gs: list[torch.Tensor],
    *,
    rank: int,
    n_pop: float,
    alpha: float = SOLVE_DEFAULTS["alpha"],
    beta: float = SOLVE_DEFAULTS["beta"],
    damping: float = SOLVE_DEFAULTS["damping"],
    output_damping: float | None = SOLVE_DEFAULTS["output_damping"],
    gamma: float = SOLVE_DEFAULTS["gamma"],
    normalize: bool = SOLVE_DEFAULTS["normalize"],
    auto_damping: bool = SOLVE_DEFAULTS["auto_damping"],
    tol: float = SOLVE_DEFAULTS["tol"],
    output_precisions: list | None = None,
    names: list[str] | None = None,
    method: str = SOLVE_DEFAULTS["method"],
    deterministic: bool = SOLVE_DEFAULTS["deterministic"],
) -> list[DeviceSolveResult]:
    """SPEC §3 for the modules that share one ``Z`` (one Cholesky), on ``Z``'s
    device in float64. ``Z`` is ``n × n``; each ``G`` is ``m × n``, each ``y`` has
    ``m`` entries. ``method`` "dense" skips the subspace iteration;
    ``deterministic`` is accepted with the shared options and changes nothing
    here (on a GPU the last bits may vary between runs)."""
    names = list(names) if names is not None else [""] * len(Gs)
    _check_options(rank=rank, n_pop=n_pop, alpha=alpha, beta=beta, damping=damping, output_damping=output_damping,
                   gamma=gamma, tol=tol, method=method)
    if len(ys) != len(Gs) or len(names) != len(Gs) or (output_precisions is not None and len(output_precisions) != len(Gs)):
        raise ShapeError(f"torch_solve: {len(ys)} y vectors, {len(Gs)} gradients, {len(names)} names")
    if not isinstance(Z, torch.Tensor) or Z.dim() != 2 or Z.shape[0] != Z.shape[1] or Z.shape[0] == 0:
        raise ShapeError(f"torch_solve: Z must be a square, non-empty tensor, got {getattr(Z, 'shape', type(Z))}")
    Z = Z.to(torch.float64)
    n = Z.shape[0]
    dev = Z.device
    with _stage("factor", dev):
        z_inv, lam = inverse_input(Z, damping, auto_damping, names[0] if len(names) == 1 else ",".join(names))
    lam_y = damping if output_damping is None else output_damping
    results = []
    # Z_λ⁻¹ is freed once the last module's Ω′ is formed: its eigensolve then holds one n × n less
    inverse = [z_inv]
    del z_inv

    def one(i, y, G) -> DeviceSolveResult:
        z_inv = inverse[0]
        if i == len(Gs) - 1:
            inverse.clear()
        name = names[i]
        where = f"module {name}: " if name else ""
        if not (isinstance(y, torch.Tensor) and y.dim() == 1 and isinstance(G, torch.Tensor) and G.dim() == 2):
            raise ShapeError(f"torch_solve: {where}y must be a vector and Ḡ a matrix, got {getattr(y, 'shape', None)} "
                             f"and {getattr(G, 'shape', None)}")
        y, G = y.to(torch.float64), G.to(torch.float64)
        m = y.shape[0]
        if G.shape != (m, n):
            raise ShapeError(f"torch_solve: {where}Ḡ has shape {tuple(G.shape)}, expected ({m}, {n})")
        if not 1 <= rank < min(m, n):
            raise InvalidArgumentError(f"torch_solve: {where}rank {rank} must be ≥ 1 and < min(m, n) = {min(m, n)}")
        _require_finite(y, f"{where}y")
        _require_finite(G, f"{where}Ḡ")
        if bool((y < 0).any()):
            raise InvalidArgumentError(f"torch_solve: {where}y has negative entries")
        prec = 1.0 / (y + lam_y) if output_precisions is None or output_precisions[i] is None else (
            torch.as_tensor(output_precisions[i], dtype=torch.float64, device=Z.device))
        if prec.shape != (m,):
            raise ShapeError(f"torch_solve: {where}output precision has {prec.numel()} entries, m = {m}")
        _require_finite(prec, f"{where}output precision")
        c_prime = float(prec.sum()) / n_pop
        zero_gradient = not bool(G.any())
        notes = [f"damping raised from {damping:e} to {lam:e} so that Z + λI factors"] if lam != damping else []
        if zero_gradient:
            notes.append("mean gradient is zero (Δ = 0): default used — σ = 1, B = 0, V = the top-r eigenvectors "
                         "of Z + λI (the bottom of Z_λ⁻¹)")
            delta, s2, omega, lower = None, 1.0, z_inv, 0.0
        else:
            with _stage("form", dev):
                # SPEC §3 step 3: Δ = −Z_λ⁻¹ Ḡᵀ diag(ỹ)   (n × m): one product with the
                # inverse, which a GPU runs far faster than two triangular solves (on
                # real statistics with cond(Z) = 1e8 both land 2e-10 from the
                # reference's own Ω, as the Rust core does: that is the oracle's accuracy there).
                delta = torch.mm(z_inv, G.T * prec[None, :]).neg_()
                W = _gram(delta)  # ΔΔᵀ
            with _stage("sigma", dev):
                # σ² = ‖Δ‖₂² = top eigenvalue of the smaller of ΔᵀΔ and ΔΔᵀ
                s2 = _top_eigenvalue(_gram(delta.T) if m < n else W)
            with _stage("form", dev):
                omega = W.mul_(-alpha).add_(z_inv, alpha=beta * c_prime)  # Ω′, in W's memory
                del W, z_inv
            lower = -alpha * s2 if alpha > 0 else 0.0
        if method == "dense":
            with _stage("eigen", dev):
                values, vectors, residual, norm = dense_bottom(omega, rank, lower)
            iterations, used, more = 0, "dense", []
        else:
            with _stage("eigen", dev):
                values, vectors, residual, norm, iterations, used, more = bottom_eigenpairs(omega, rank, lower, tol)
            _count("eigen products", iterations)
        notes += more
        sigma = 1.0 if zero_gradient or not normalize else math.sqrt(s2)
        scale2 = sigma * sigma
        if not scale2 > 0:
            raise NonFiniteError(f"torch_solve: {where}σ = ‖Δ‖₂ underflowed to {sigma!r} (Ḡ or ỹ near the float64 "
                                 "range's lower end): rescale the statistics")
        V = fix_signs(vectors)
        A = V.T / math.sqrt(gamma)
        B = torch.zeros(m, rank, dtype=torch.float64, device=Z.device) if zero_gradient else (delta.T @ V) / (sigma * math.sqrt(gamma))
        values = values / scale2
        out = DeviceSolveResult(
            A=A.cpu().numpy(),
            B=B.cpu().numpy(),
            V=V.cpu().numpy(),
            eigenvalues=values[:rank].cpu().numpy(),
            next_eigenvalue=float(values[rank]),
            gap=float(values[rank] - values[rank - 1]),
            residual=residual,
            omega_norm=norm / scale2,
            iterations=iterations,
            method=used,
            sigma=sigma,
            c=c_prime if zero_gradient else c_prime / scale2,
            damping=lam,
            zero_gradient=zero_gradient,
            notes=notes,
        )
        check_finite_result(out, names[i])
        return out

    for i, (y, G) in enumerate(zip(ys, Gs)):
        try:
            results.append(one(i, y, G))
        except LoraDAError:
            raise
        except (ValueError, RuntimeError, ZeroDivisionError, OverflowError, np.linalg.LinAlgError) as e:
            if out_of_memory(e):
                raise  # the caller's to handle: released, retried, or the host (SPEC §7)
            # Finite but extreme inputs (scales near the float64 range) can break a
            # step outside the checks above: an error that names the module, not a NaN.
            raise NonFiniteError(f"torch_solve: module {names[i]}: the solve failed on extreme values ({e})") from e
    return results
