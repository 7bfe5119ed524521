"""Check another implementation's ``A``/``B`` against the exact answer (SPEC §5).

Per module of each case it measures the subspace (``sin θ_max`` between the
span of ``Aᵀ`` and the exact ``V``), the relative error of ``B·A``, the error
of the Rayleigh quotients of ``Aᵀ``'s columns and of the bottom-r objective,
relative to ``‖Ω‖₂``, and, where the results carry them, σ and c. Each is held
to the bound that :mod:`lora_da.conformance.tolerances` gives, with the
reason printed next to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_da.conformance import tolerances as tol
from lora_da.conformance.cases import CASES, Case, Expected, Inputs, omega_and_exact
from lora_da.errors import InvalidArgumentError, ShapeError

EXPECTED_FILE = Path(__file__).with_name("expected.safetensors")


def result_key(case: str, module: str, what: str) -> str:
    """Key of a tensor in a results file: ``<case>/<module>/<A|B|sigma|c>``."""
    return f"{case}/{module}/{what}"


@dataclass
class Check:
    """One measured quantity against its bound (``bound=None``: reported, not checked)."""

    what: str
    value: float
    bound: float | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.bound is None or (np.isfinite(self.value) and self.value <= self.bound)


@dataclass
class ModuleVerdict:
    case: str
    module: str
    checks: list[Check] = field(default_factory=list)
    error: str | None = None  # results missing or malformed

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.checks)


@dataclass
class Report:
    modules: list[ModuleVerdict]
    notes: list[str] = field(default_factory=list)

    def case_ok(self) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for m in self.modules:
            out[m.case] = out.get(m.case, True) and m.ok
        return out

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.modules)

    def failed_cases(self) -> list[str]:
        return [c for c, ok in self.case_ok().items() if not ok]

    def format(self) -> str:
        lines = list(self.notes)
        for m in self.modules:
            head = f"{'PASS' if m.ok else 'FAIL'}  {m.case}  {m.module}"
            lines.append(head)
            if m.error:
                lines.append(f"      error: {m.error}")
            for c in m.checks:
                mark = "ok " if c.ok else "BAD"
                b = "not checked" if c.bound is None else f"≤ {c.bound:.1e}"
                lines.append(f"      {mark} {c.what:<16} {c.value:9.2e}  {b:<12} {c.reason}")
        cases = self.case_ok()
        bad = [c for c, ok in cases.items() if not ok]
        verdict = (f"verdict: PASS — {len(cases)}/{len(cases)} cases within SPEC §5's tolerances" if not bad else
                   f"verdict: FAIL — {len(bad)} of {len(cases)} cases outside SPEC §5's tolerances: {', '.join(bad)}")
        lines.append(verdict)
        return "\n".join(lines)


def _unit(a) -> float:
    """Unit roundoff of the format an array was stored in (float64 counts as 0:
    the bounds already allow for it)."""
    dt = np.asarray(a).dtype
    return 0.0 if dt == np.float64 else float(np.finfo(dt).eps) / 2


def _orthonormal(M: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(M)
    return q


def _plus(bound_reason, extra: float):
    bound, reason = bound_reason
    if bound is None or extra == 0:
        return bound, reason
    return bound + extra, f"{reason}; + storage {extra:.1e}"


def check_module(case: Case, module: str, exp: Expected, omega: np.ndarray, A, B, sigma=None, c=None,
                 unit: float = 0.0) -> ModuleVerdict:
    """Measure one module's ``A`` (``r × n``), ``B`` (``m × r``) against ``exp``;
    ``unit`` is the unit roundoff of the format they were stored in (0: float64)."""
    v = ModuleVerdict(case.name, module)
    r, n = exp.A.shape
    m = exp.B.shape[0]
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.shape != (r, n) or B.shape != (m, r):
        v.error = f"A {A.shape}, B {B.shape}; expected A ({r}, {n}) and B ({m}, {r})"
        return v
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        v.error = "A or B is not finite"
        return v
    norm = exp.omega_norm
    extra = tol.stored(r, unit)
    # the subspace: sin θ between span(Aᵀ) and the exact V (A's scale and basis do not matter here)
    V_ref = exp.A.T / np.linalg.norm(exp.A[0])
    if np.linalg.matrix_rank(A) < r:
        v.error = f"A has rank {np.linalg.matrix_rank(A)} < r = {r}"
        return v
    Q = _orthonormal(A.T)
    sin = float(np.linalg.norm(Q - V_ref @ (V_ref.T @ Q), 2))
    bound, why = _plus(tol.subspace(exp.n, exp.cond, exp.gap_rel), extra)
    v.checks.append(Check("sin θ", sin, bound, why))
    # B·A: the product PEFT uses
    ba, ba_ref = B @ A, exp.B @ exp.A
    ref_norm = float(np.linalg.norm(ba_ref))
    if ref_norm == 0:
        v.checks.append(Check("‖B·A‖ (Ḡ = 0)", float(np.linalg.norm(ba)), 0.0,
                              "SPEC §3: Ḡ = 0 gives B = 0 exactly"))
    else:
        bound, why = _plus(tol.product(exp.n, exp.cond, exp.gap_rel, r, exp.alignment), extra / max(exp.alignment, 1e-300))
        v.checks.append(Check("B·A rel. error", float(np.linalg.norm(ba - ba_ref)) / ref_norm, bound, why))
    # eigenvalues: Rayleigh quotients of the returned vectors, and the bottom-r objective
    W = A.T
    rq = np.sort(np.einsum("ij,ij->j", W, omega @ W) / np.einsum("ij,ij->j", W, W))
    bound, why = _plus(tol.eigenvalue(exp.n, exp.cond), extra)
    v.checks.append(Check("eigenvalues", float(np.abs(rq - exp.eigenvalues).max()) / norm, bound, why))
    obj = float(np.trace(Q.T @ omega @ Q))
    bound, why = _plus(tol.objective(exp.n, exp.cond, r), r * extra)
    v.checks.append(Check("objective", abs(obj - float(exp.eigenvalues.sum())) / norm, bound, why))
    if sigma is not None:
        bound, why = tol.sigma(exp.n, exp.cond)
        v.checks.append(Check("σ rel. error", abs(float(sigma) / exp.sigma - 1.0), bound, why))
    if c is not None:
        bound, why = tol.scale_c(exp.n, exp.cond)
        v.checks.append(Check("c rel. error", abs(float(c) / exp.c - 1.0), bound, why))
    return v


# -- expected answers on file -------------------------------------------------------------------


def save_expected(path, cases, inputs: dict[str, Inputs]) -> None:
    """Write every case's exact answer and its inputs' checksum (safetensors, atomically)."""
    import json
    import os
    import tempfile

    from safetensors.numpy import save_file

    tensors, meta = {}, {"format": "lora-da-conformance-expected", "version": 1, "cases": {}}
    for case in cases:
        inp = inputs[case.name]
        meta["cases"][case.name] = {"checksum": inp.checksum(), "modules": list(case.modules)}
        for name in case.modules:
            _, e = omega_and_exact(case, inp, name)
            tensors[result_key(case.name, name, "A")] = e.A
            tensors[result_key(case.name, name, "B")] = e.B
            tensors[result_key(case.name, name, "eigenvalues")] = e.eigenvalues
            tensors[result_key(case.name, name, "scalars")] = np.array(
                [e.next_eigenvalue, e.omega_norm, e.sigma, e.c, e.cond, e.alignment])
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        # safetensors.numpy writes the raw buffer: a Fortran-ordered array would be stored scrambled
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={"lora_da_conformance": json.dumps(meta)})
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a package data file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_expected(path=EXPECTED_FILE) -> tuple[dict[str, dict[str, Expected]], dict[str, str]]:
    """``({case: {module: Expected}}, {case: checksum of its inputs})``."""
    import json

    from safetensors import safe_open

    out: dict[str, dict[str, Expected]] = {}
    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["lora_da_conformance"])
        for cname, info in meta["cases"].items():
            out[cname] = {}
            for name in info["modules"]:
                s = f.get_tensor(result_key(cname, name, "scalars"))
                A = f.get_tensor(result_key(cname, name, "A"))
                out[cname][name] = Expected(A=A, B=f.get_tensor(result_key(cname, name, "B")),
                                            eigenvalues=f.get_tensor(result_key(cname, name, "eigenvalues")),
                                            next_eigenvalue=float(s[0]), omega_norm=float(s[1]), sigma=float(s[2]),
                                            c=float(s[3]), cond=float(s[4]), n=A.shape[1], alignment=float(s[5]))
    return out, {c: i["checksum"] for c, i in meta["cases"].items()}


# -- a whole run --------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What checking needs besides the results: per ``(case, module)``, ``Ω`` and the exact answer."""

    cases: tuple
    answers: dict  # (case, module) -> (Ω, Expected)
    notes: list[str]


def prepare(inputs: dict[str, Inputs] | None = None, *, cases=CASES, expected: dict | None = None,
            checksums: dict | None = None) -> Prepared:
    """``Ω`` of every case module from its inputs (default: the recipes' regeneration)
    and its exact answer: the recorded one where the inputs' checksum matches the
    recorded checksum, else the oracle rerun on these inputs (with a note)."""
    from lora_da.conformance.cases import regenerate

    if inputs is None:
        inputs = regenerate(cases)
    if expected is None and checksums is None and EXPECTED_FILE.is_file():
        expected, checksums = load_expected()
    expected, checksums = expected or {}, checksums or {}
    answers, notes = {}, []
    for case in cases:
        inp = inputs[case.name]
        recorded = expected.get(case.name)
        if recorded is not None and checksums.get(case.name) != inp.checksum():
            notes.append(f"note: {case.name}: the inputs differ from the recorded ones (checksum); "
                         f"its exact answer is recomputed with lora_da.reference")
            recorded = None
        for name in case.modules:
            omega, exp = omega_and_exact(case, inp, name)
            answers[(case.name, name)] = (omega, exp if recorded is None else recorded[name])
    return Prepared(tuple(cases), answers, notes)


def check_results(results: dict[str, np.ndarray], inputs: dict[str, Inputs] | None = None, *, cases=CASES,
                  expected: dict | None = None, checksums: dict | None = None,
                  prepared: Prepared | None = None, units: dict[str, float] | None = None) -> Report:
    """Check ``results`` (``{"<case>/<module>/A": …, "…/B": …}``, optionally ``…/sigma``
    and ``…/c``) on ``cases``; see :func:`prepare` for the other arguments
    (``prepared`` reuses one preparation for several results). ``units``: the unit
    roundoff each result tensor was stored with, where its dtype no longer says."""
    units = units or {}
    if prepared is None:
        prepared = prepare(inputs, cases=cases, expected=expected, checksums=checksums)
    cases = prepared.cases
    known = {result_key(c.name, m, w) for c in cases for m in c.modules for w in ("A", "B", "sigma", "c")}
    stray = sorted(set(results) - known)
    report = Report([], list(prepared.notes))
    if stray:
        report.notes.append(f"note: {len(stray)} tensors in the results belong to no case (first: {stray[0]})")
    for case in cases:
        for name in case.modules:
            omega, exp = prepared.answers[(case.name, name)]
            ka, kb = result_key(case.name, name, "A"), result_key(case.name, name, "B")
            if ka not in results or kb not in results:
                report.modules.append(ModuleVerdict(case.name, name, error=f"no {ka} / {kb} in the results"))
                continue
            sig, c = results.get(result_key(case.name, name, "sigma")), results.get(result_key(case.name, name, "c"))
            unit = max(units.get(ka, _unit(results[ka])), units.get(kb, _unit(results[kb])))
            report.modules.append(check_module(case, name, exp, omega, results[ka], results[kb],
                                               None if sig is None else float(np.asarray(sig).reshape(-1)[0]),
                                               None if c is None else float(np.asarray(c).reshape(-1)[0]), unit=unit))
    return report


def solve_with_core(inputs: dict[str, Inputs], cases=CASES) -> dict[str, np.ndarray]:
    """This library's answer on every case, as a results dict (what CI checks)."""
    from lora_da import solve_shared

    out = {}
    for case in cases:
        inp = inputs[case.name]
        names = list(case.modules)
        precs = [inp.output_precision(n, case) for n in names]
        res = solve_shared(inp.Z, [inp.y[n] for n in names], [inp.G[n] for n in names], names=names,
                           output_precisions=None if precs[0] is None else precs, **case.options())
        for n, r in zip(names, res):
            out[result_key(case.name, n, "A")] = r.A
            out[result_key(case.name, n, "B")] = r.B
            out[result_key(case.name, n, "sigma")] = np.array([r.sigma])
            out[result_key(case.name, n, "c")] = np.array([r.c])
    return out


def read_results(path) -> dict[str, np.ndarray]:
    """A results safetensors file (keys ``<case>/<module>/A`` …), each array in its stored
    dtype (the checker widens them, and allows for their rounding)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"lora_da.conformance: RESULTS {path} is not a file")
    try:
        with safe_open(str(path), "np") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a malformed file
        raise ShapeError(f"lora_da.conformance: {path} is not a readable safetensors file of A/B tensors: {e}") from e


def check_adapter(adapter_dir, statistics_path, *, n_pop: float, gamma: float, alpha: float, beta: float,
                  damping: float, normalize: bool = True, output_fisher: str = "diagonal") -> Report:
    """Check a PEFT adapter directory against the statistics file it was computed
    from: every module of the adapter found in the statistics is a case (one
    per input group), at the adapter's rank and the given SPEC §3 options."""
    import torch
    from safetensors import safe_open

    from lora_da.conformance.cases import cut
    from lora_da.statistics import Statistics

    d = Path(adapter_dir)
    files = [d / "adapter_model.safetensors"]
    if not files[0].is_file():
        raise InvalidArgumentError(f"lora_da.conformance: {d} has no adapter_model.safetensors (not a PEFT adapter)")
    with safe_open(str(files[0]), "pt") as f:
        weights, stored_units = {}, {}
        for k in f.keys():
            t = f.get_tensor(k)
            weights[k] = t.to(torch.float64).numpy()
            stored_units[k] = 0.0 if t.dtype == torch.float64 else float(torch.finfo(t.dtype).eps) / 2
    stats = Statistics.load(statistics_path)

    def key(module: str, which: str):
        hits = [k for k in weights if (k == f"{module}.{which}.weight" or k.endswith(f".{module}.{which}.weight"))]
        return hits[0] if len(hits) == 1 else None

    def find(module: str, which: str):
        k = key(module, which)
        return None if k is None else weights[k]

    results, units, cases = {}, {}, []
    for group, names in stats.groups().items():
        present = [n for n in names if find(n, "lora_A") is not None and find(n, "lora_B") is not None]
        if not present:
            continue
        rank = find(present[0], "lora_A").shape[0]
        case = Case(name=group, source="statistics", modules=tuple(present), covers=f"input group {group}",
                    rank=rank, n_pop=n_pop, gamma=gamma, output_fisher=output_fisher,
                    extra={"alpha": alpha, "beta": beta, "damping": damping, "normalize": normalize})
        cases.append(case)
        for n in present:
            for which, what in (("lora_A", "A"), ("lora_B", "B")):
                results[result_key(group, n, what)] = find(n, which)
                units[result_key(group, n, what)] = stored_units[key(n, which)]
    if not cases:
        raise InvalidArgumentError(f"lora_da.conformance: no module of {statistics_path} has lora_A/lora_B in {d}")
    inputs = {c.name: cut(c, stats) for c in cases}
    return check_results(results, inputs, cases=cases, expected={}, checksums={}, units=units)
