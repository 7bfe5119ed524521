"""From statistics to per-module initializations (SPEC §3)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from lora_da._core import SolveResult, lowrank_output_precision, num_threads, solve_shared
from lora_da.errors import InvalidArgumentError
from lora_da.statistics import Statistics


@dataclass
class LoraDAConfig:
    """Hyper-parameters of the LoRA-DA init (SPEC §3); defaults are the
    authors' published configuration. ``n_pop`` (the size of the fine-tuning
    set) is required: it scales the variance term.

    ``gamma`` divides ``B A``: the published 1024 was chosen for a 7B model;
    small models usually want a much smaller value (see the demo).
    ``preserve_output`` subtracts ``s·B A`` from the base weights so that the
    adapted model equals the base model at step 0 (PiSSA-style; see
    :func:`lora_da.save_initial_adapter`).
    """

    n_pop: int | float | None = None
    rank: int = 8
    alpha: float = 1.0
    beta: float = 0.03
    damping: float = 1e-6
    output_damping: float | None = None
    gamma: float = 1024.0
    normalize: bool = True
    token_mask: str = "attention"
    output_fisher: str = "diagonal"
    preserve_output: bool = False
    method: str = "auto"
    auto_damping: bool = False
    tol: float = 1e-12
    deterministic: bool = True

    def __post_init__(self):
        if self.n_pop is None:
            raise InvalidArgumentError("LoraDAConfig: n_pop (the number of fine-tuning samples) is required")
        if not (isinstance(self.n_pop, (int, float)) and np.isfinite(self.n_pop) and self.n_pop > 0):
            raise InvalidArgumentError(f"LoraDAConfig: n_pop must be > 0, got {self.n_pop!r}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise InvalidArgumentError(f"LoraDAConfig: rank must be an integer ≥ 1, got {self.rank!r}")
        if self.token_mask not in ("attention", "labels"):
            raise InvalidArgumentError(f"LoraDAConfig: token_mask must be 'attention' or 'labels', got {self.token_mask!r}")
        if self.output_fisher not in ("diagonal", "sequence_lowrank"):
            raise InvalidArgumentError(
                f"LoraDAConfig: output_fisher must be 'diagonal' or 'sequence_lowrank', got {self.output_fisher!r}"
            )
        if self.method not in ("auto", "krylov", "dense"):
            raise InvalidArgumentError(f"LoraDAConfig: method must be 'auto', 'krylov' or 'dense', got {self.method!r}")

    def solve_kwargs(self) -> dict:
        return dict(
            rank=self.rank,
            n_pop=float(self.n_pop),
            alpha=self.alpha,
            beta=self.beta,
            damping=self.damping,
            output_damping=self.output_damping,
            gamma=self.gamma,
            normalize=self.normalize,
            method=self.method,
            auto_damping=self.auto_damping,
            tol=self.tol,
            deterministic=self.deterministic,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModuleInit:
    """One module's ``A`` (``r × n``), ``B`` (``m × r``) and solve diagnostics."""

    name: str
    result: SolveResult
    seconds: float

    @property
    def A(self) -> np.ndarray:
        return self.result.A

    @property
    def B(self) -> np.ndarray:
        return self.result.B


def compute_init(stats: Statistics, config: LoraDAConfig, *, progress: bool = True, modules=None) -> dict[str, ModuleInit]:
    """Solve every module (SPEC §3); modules sharing ``Z`` share one Cholesky."""
    wanted = set(stats.modules) if modules is None else set(modules)
    missing = wanted - set(stats.modules)
    if missing:
        raise InvalidArgumentError(f"compute_init: no statistics for module(s) {sorted(missing)}")
    out: dict[str, ModuleInit] = {}
    groups = {g: [n for n in names if n in wanted] for g, names in stats.groups().items()}
    groups = {g: v for g, v in groups.items() if v}
    for names in groups.values():
        for name in names:
            info = stats.modules[name]
            if config.rank >= min(info.in_features, info.out_features):
                raise InvalidArgumentError(
                    f"{name}: rank {config.rank} must be < min(in_features, out_features) = "
                    f"{min(info.in_features, info.out_features)}"
                )

    def solve_group(item):
        group, names = item
        t0 = time.perf_counter()
        Z = stats.input_factors[group].mean()
        precisions = None
        if config.output_fisher == "sequence_lowrank":
            lam_y = config.damping if config.output_damping is None else config.output_damping
            precisions = []
            for name in names:
                u = stats.output_factors[name].sample_sums()
                if u is None:
                    raise InvalidArgumentError(f"{name}: output_fisher='sequence_lowrank' needs statistics collected with it")
                precisions.append(lowrank_output_precision(u, lam_y))
        results = solve_shared(
            Z,
            [stats.output_factor(n) for n in names],
            [stats.mean_grad(n) for n in names],
            output_precisions=precisions,
            names=names,
            **config.solve_kwargs(),
        )
        dt = (time.perf_counter() - t0) / len(names)
        return [ModuleInit(name, res, dt) for name, res in zip(names, results)]

    # Groups run concurrently: the core releases the GIL and each solve is
    # sequential (deterministic), so this is where the cores are used.
    bar = tqdm(total=sum(len(v) for v in groups.values()), desc="lora-da: solving", unit="module", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, num_threads())) as pool:
        for inits in pool.map(solve_group, groups.items()):
            for init in inits:
                out[init.name] = init
            bar.update(len(inits))
    bar.close()
    return {n: out[n] for n in stats.modules if n in out}
