"""The conformance cases run by the authors' float32 recipe, and by the
authors' own ``lora_da.py`` when given its path, checked against the exact answers.

    python benches/bench_conformance.py [--inputs DIR] [--authors PATH/TO/lora_da.py] [--markdown]

``--inputs`` reads the cases written by ``lora-da conformance export DIR``
(default: regenerate them from the recipes, which needs the demo extra).

* **float32 recipe** — ``lora_da.compare.authors.solve_float32``, the recipe the
  end-to-end benchmark compares against: float32 ``Z``, ``y``, ``Ḡ``, Cholesky
  and ``cholesky_inverse``, σ from ``svd_lowrank``, 10 LOBPCG iterations (dense
  ``eigh`` only if LOBPCG raises or returns non-finite vectors). It has no
  ``sequence_lowrank`` and one damping for ``Z`` and ``y``.
* **authors' lora_da.py** — its ``_compute_group_initializations`` called on
  the cases' statistics (float32 factors with a token count of 1, so that the
  means it forms are the cases' ``Z`` and ``y``), 10 LOBPCG iterations,
  ``svd_lowrank`` with 16 iterations; nothing of it is copied here.

Per case: the worst module's sin θ, ``B·A`` error and eigenvalue error against
the bound of SPEC §5 (:mod:`lora_da.conformance.tolerances`), and the verdict.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from lora_da.compare.authors import solve_float32 as authors_float32_solve
from lora_da.conformance import CASES, checker, regenerate, result_key
from lora_da.conformance.export import read_exported

SKIP = "skip"


def run_float32_recipe(inputs) -> tuple[dict, dict]:
    """The baseline's float32 recipe on every case it supports; ``notes[case]`` says why not."""
    out, notes = {}, {}
    for case in CASES:
        inp, o = inputs[case.name], case.options()
        if case.output_fisher != "diagonal":
            notes[case.name] = "no sequence_lowrank"
            continue
        Z = torch.from_numpy(inp.Z).float()
        for name in case.modules:
            try:
                A, B, _ = authors_float32_solve(Z, torch.from_numpy(inp.y[name]).float(), 1.0,
                                                torch.from_numpy(inp.G[name]).float(), n_pop=o["n_pop"],
                                                rank=o["rank"], alpha=o["alpha"], beta=o["beta"], gamma=o["gamma"],
                                                damping=o["damping"])
            except Exception as e:  # the recipe's own failure is the measurement
                notes[case.name] = f"raised {type(e).__name__}"
                continue
            out[result_key(case.name, name, "A")] = A.double().numpy()
            out[result_key(case.name, name, "B")] = B.double().numpy()
    return out, notes


class _Factor:
    def __init__(self, value, samples=None):
        self.value, self.tokens, self.samples = value, 1, samples


class _Collector:
    """The two dicts the authors' solve reads, filled from a case's inputs."""

    def __init__(self, case, inp):
        self.input_factors = {case.name: _Factor(torch.from_numpy(inp.Z).float())}
        self.output_factors = {
            n: _Factor(torch.from_numpy(inp.y[n]).float(),
                       [torch.from_numpy(u).float() for u in inp.U[n]] if n in inp.U else None)
            for n in case.modules
        }


def run_authors_file(path, inputs) -> tuple[dict, dict]:
    spec = importlib.util.spec_from_file_location("authors_lora_da", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, notes = {}, {}
    for case in CASES:
        inp, o = inputs[case.name], case.options()
        grads = {n + ".weight": torch.from_numpy(inp.G[n]).float() for n in case.modules}
        try:
            inits = mod._compute_group_initializations(
                _Collector(case, inp), {case.name: list(case.modules)}, grads, o["rank"], o["alpha"], o["beta"],
                o["n_pop"], o["damping"], o["gamma"], 10, o["normalize"], 16, output_fisher_mode=case.output_fisher)
        except Exception as e:
            notes[case.name] = f"raised {type(e).__name__}"
            continue
        per = inits[o["beta"]] if o["beta"] in inits else inits
        for n in case.modules:
            ab = per[n + ".weight"]
            out[result_key(case.name, n, "A")] = ab["lora_A"].double().numpy()
            out[result_key(case.name, n, "B")] = ab["lora_B"].double().numpy()
    return out, notes


def table(label, report, notes, markdown) -> list[str]:
    rows = []
    by_case = {}
    for m in report.modules:
        by_case.setdefault(m.case, []).append(m)
    for case in CASES:
        mods = by_case.get(case.name, [])
        worst = {}
        for m in mods:
            for c in m.checks:
                if c.what in ("sin θ", "B·A rel. error", "eigenvalues", "‖B·A‖ (Ḡ = 0)"):
                    key = "B·A" if c.what.startswith(("B·A", "‖B·A")) else c.what
                    old = worst.get(key)  # the worst module: a failing one first, then the largest value
                    if old is None or (not c.ok, c.value) > (not old[2], old[0]):
                        worst[key] = (c.value, c.bound, c.ok)
        errors = [m.error for m in mods if m.error]
        if errors:
            why = notes.get(case.name) or ("non-finite A or B" if "not finite" in errors[0] else "no answer")
            verdict = f"FAIL ({why})"
        else:
            verdict = "pass" if all(m.ok for m in mods) else "FAIL"

        def cell(k):
            if k not in worst:
                return "—"
            v, b, ok = worst[k]
            return f"{v:.1e}" + ("" if b is None else f" (≤ {b:.0e})") + ("" if ok else " ✗")

        rows.append((label, case.name, cell("sin θ"), cell("B·A"), cell("eigenvalues"), verdict))
    sep = " | " if markdown else "  "
    out = []
    for r in rows:
        out.append(("| " if markdown else "") + sep.join(r) + (" |" if markdown else ""))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", default=None, help="directory from 'lora-da conformance export'")
    p.add_argument("--authors", default=None, help="path to the authors' lora_da.py")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    inputs = read_exported(args.inputs) if args.inputs else regenerate()
    prepared = checker.prepare(inputs)
    runs = [("float32 recipe", run_float32_recipe)]
    if args.authors:
        runs.append(("authors' lora_da.py", lambda inp: run_authors_file(args.authors, inp)))
    runs.append(("lora-da core", lambda inp: (checker.solve_with_core(inp), {})))
    head = ("implementation", "case", "sin θ (bound)", "B·A rel. error (bound)", "eigenvalue error / ‖Ω‖ (bound)",
            "verdict")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if args.markdown else ["  ".join(head)]
    for label, run in runs:
        results, notes = run(inputs)
        report = checker.check_results(results, prepared=prepared)
        lines += table(label, report, notes, args.markdown)
    print("\n".join(lines))
    print(f"\n{len(CASES)} cases, {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
