"""``conformance export DIR``: the cases' inputs in plain formats, for any language.

``DIR/manifest.json`` lists the cases: the tensor file of each, its modules,
its SPEC §3 options, what it covers and the sha256 of its inputs (as
:meth:`lora_da.conformance.cases.Inputs.checksum` forms it), and under
``layout`` every key of the case files and of the results file, with its shape
and meaning (:data:`LAYOUT`). Each ``DIR/<case>.safetensors`` holds float64
tensors ``Z`` (``n × n``) and, per module, ``y/<module>`` (``m``),
``G/<module>`` (``Ḡ``, ``m × n``, out × in) and, with ``output_fisher =
"sequence_lowrank"``, ``U/<module>``: the per-sample sums ``u_s`` of SPEC §2 as
rows, ``N_s × m`` — the transpose of SPEC §2's ``U = [u_1 … u_{N_s}]``
(``m × N_s``). An implementation writes its answer as one safetensors file of
``<case>/<module>/A`` (``r × n``) and ``…/B`` (``m × r``), optionally
``…/sigma`` and ``…/c`` (one element each), and runs ``lora-da conformance
check RESULTS --inputs DIR``. The folder and its files get the mode the umask
gives a new file (:func:`lora_da.files.write_atomic`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lora_da.conformance.cases import CASES, Inputs
from lora_da.errors import InvalidArgumentError
from lora_da.files import follow_umask, write_atomic

MANIFEST = "manifest.json"
FORMAT = "lora-da-conformance-cases"

# Every key of a case file ("inputs") and of a results file ("results"): its shape in
# SPEC §1's letters (n in, m out, r rank, N_s samples) and its meaning; written into
# the manifest, and the test of export checks each case file against it.
LAYOUT = {
    "inputs": {
        "Z": {"shape": ["n", "n"], "dtype": "float64",
              "meaning": "input factor Z of the case's input group (SPEC §2), symmetric; undamped"},
        "y/<module>": {"shape": ["m"], "dtype": "float64", "meaning": "output factor y of the module (SPEC §2)"},
        "G/<module>": {"shape": ["m", "n"], "dtype": "float64",
                       "meaning": "mean gradient Ḡ of the module's weight, out × in (SPEC §2)"},
        "U/<module>": {"shape": ["N_s", "m"], "dtype": "float64",
                       "meaning": "only with output_fisher = sequence_lowrank: the per-sample sums u_s of SPEC §2 "
                                  "as ROWS (N_s × m), i.e. the transpose of SPEC §2's U = [u_1 … u_{N_s}] (m × N_s)"},
    },
    "results": {
        "<case>/<module>/A": {"shape": ["r", "n"], "meaning": "A = Vᵀ/√γ (SPEC §3 step 8)"},
        "<case>/<module>/B": {"shape": ["m", "r"], "meaning": "B = Δ̂ᵀV/√γ (SPEC §3 step 8)"},
        "<case>/<module>/sigma": {"shape": [1], "meaning": "optional: σ = ‖Δ‖₂ (SPEC §3 step 4)"},
        "<case>/<module>/c": {"shape": [1], "meaning": "optional: c (SPEC §3 step 5)"},
        "dtype": "float64 (checked fully), or float32, float16, bfloat16 (each bound gets 4r·u_store more, SPEC §5)",
    },
}


def export(directory, inputs: dict[str, Inputs], cases=CASES, *, overwrite: bool = False) -> Path:
    """Write the cases to ``directory`` (built in a temporary sibling, then renamed:
    never half-written). Returns the directory."""
    from safetensors.numpy import save_file

    out = Path(directory)
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"lora_da.conformance: {out} exists (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp_dir: str) -> None:
        tmp = Path(tmp_dir)
        manifest = {"format": FORMAT, "version": 1, "spec": "SPEC.md §3 (recipe), §5 (tolerances)",
                    "results": "one safetensors file: '<case>/<module>/A' (r × n), '<case>/<module>/B' (m × r), "
                               "optionally '/sigma' and '/c' (1 element); float64, or narrower (checked less)",
                    "layout": LAYOUT, "cases": []}
        for case in cases:
            inp = inputs[case.name]
            tensors = {"Z": np.ascontiguousarray(inp.Z)}
            for n in case.modules:
                tensors[f"y/{n}"] = np.ascontiguousarray(inp.y[n])
                tensors[f"G/{n}"] = np.ascontiguousarray(inp.G[n])
                if n in inp.U:
                    tensors[f"U/{n}"] = np.ascontiguousarray(inp.U[n])
            path = tmp / f"{case.name}.safetensors"
            save_file(tensors, str(path))
            follow_umask(path)  # safetensors writes 0600 whatever the umask
            manifest["cases"].append({
                "name": case.name, "file": path.name, "modules": list(case.modules),
                "covers": case.covers, "options": {**case.options(), "output_fisher": case.output_fisher},
                "sha256": inp.checksum(),
            })
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_atomic(os.fspath(out), write, directory=True)
    return out


def read_exported(directory, cases=CASES) -> dict[str, Inputs]:
    """The inputs written by :func:`export`, each checked against its manifest's sha256."""
    from safetensors.numpy import load_file

    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"lora_da.conformance: {d / MANIFEST}: not a case manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise InvalidArgumentError(f"lora_da.conformance: {d / MANIFEST}: format {manifest.get('format')!r}, not {FORMAT!r}")
    entries = {c["name"]: c for c in manifest.get("cases", [])}
    out = {}
    for case in cases:
        if case.name not in entries:
            raise InvalidArgumentError(f"lora_da.conformance: {d}: the manifest has no case {case.name!r}")
        t = load_file(str(d / entries[case.name]["file"]))
        inp = Inputs(t["Z"], {n: t[f"y/{n}"] for n in case.modules}, {n: t[f"G/{n}"] for n in case.modules},
                     {n: t[f"U/{n}"] for n in case.modules if f"U/{n}" in t})
        if inp.checksum() != entries[case.name]["sha256"]:
            raise InvalidArgumentError(f"lora_da.conformance: {d}: case {case.name}'s tensors do not match the "
                                       f"manifest's sha256 (changed after export?)")
        out[case.name] = inp
    return out
