"""Regenerate the golden test vectors from `lora_da.reference` (SPEC §3).

    python tests/vectors/generate.py

Writes one `<name>.npz` per problem (inputs Z, y, G; outputs V, A, B,
eigenvalues, next_eigenvalue, sigma, c) and `index.json` describing them.
"""

import json
from pathlib import Path

import numpy as np

from lora_da.reference import reference_solve
from lora_da.synthetic import make_problem

HERE = Path(__file__).parent

CASES = [
    # name, n, m, problem options, solve options
    ("wide_default", 24, 40, dict(cond=1e3, seed=101), dict(rank=4, n_pop=1000.0)),
    ("tall_rank8", 48, 20, dict(cond=1e4, seed=102), dict(rank=8, n_pop=500.0)),
    ("rank_deficient_Z", 32, 32, dict(cond=1e2, tokens=12, seed=103), dict(rank=3, n_pop=100.0, damping=1e-4)),
    ("bias_only", 20, 16, dict(cond=1e2, seed=104), dict(rank=2, n_pop=50.0, beta=0.0)),
    ("unnormalized_gamma16", 16, 24, dict(cond=10.0, seed=105), dict(rank=5, n_pop=2000.0, normalize=False, gamma=16.0, alpha=0.5, beta=1.0)),
]


def main() -> None:
    index = {"format": "lora-da golden vectors v1", "spec": "SPEC.md §3", "cases": []}
    for name, n, m, pkw, skw in CASES:
        p = make_problem(n, m, **pkw)
        ref = reference_solve(p.Z, p.y, p.G, **skw)
        np.savez(
            HERE / f"{name}.npz",
            Z=p.Z, y=p.y, G=p.G, V=ref.V, A=ref.A, B=ref.B,
            eigenvalues=ref.eigenvalues, next_eigenvalue=ref.next_eigenvalue,
            sigma=ref.sigma, c=ref.c,
        )
        index["cases"].append({
            "name": name, "file": f"{name}.npz", "n": n, "m": m,
            "options": skw,
            "gap_over_norm": ref.gap / ref.omega_norm,
        })
    (HERE / "index.json").write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main()
