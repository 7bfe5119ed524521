"""The arms of a comparison: the LoRA initializations compared, each with its scale grid.

An initialization is ``init(base, lora_config, calib_batches, scale=..., task=..., seed=...)``
returning an :class:`ArmSetup`: the initialized :class:`peft.PeftModel` and what the
harness charges the run or reports for it; a :class:`Method` names it and the scales (γ,
or LoRA-GA's ``stable_gamma``) its search tries. :func:`available_methods` lists every
arm the installed PEFT supports.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

# the published defaults (SPEC §3), their one source
from lora_da._core import SOLVE_DEFAULTS


@dataclass
class ArmSetup:
    """What an arm hands the harness (:func:`lora_da.compare.harness.run_one`)."""

    model: object  # the peft.PeftModel, initialized
    # statistics and a solve computed once per seed and reused by every lr and scale of that seed: each run
    # that uses them is charged their seconds (added to its init time) and their GPU peak (MiB; None on a CPU)
    solve_s: float = 0.0
    solve_peak_mb: float | None = None
    gammas: dict | None = None  # γ per module when the arm chose them itself (auto-norm): the table gives their median


def peft_model(base, cfg, seed=0):
    """``base`` wrapped by PEFT with ``cfg``, every random draw of the wrapping seeded by ``seed``."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # PEFT's random A (and anything else it draws) is the same for every arm of a seed
    return get_peft_model(base, cfg)


def init_default(base, cfg, calib, *, scale=None, task=None, seed=0):
    return ArmSetup(peft_model(base, cfg, seed))


def init_gaussian(base, cfg, calib, *, scale=None, task=None, seed=0):
    return ArmSetup(peft_model(base, replace(cfg, init_lora_weights="gaussian"), seed))


def init_pissa(base, cfg, calib, *, scale=None, task=None, seed=0):
    return ArmSetup(peft_model(base, replace(cfg, init_lora_weights="pissa"), seed))


def init_eva(base, cfg, calib, *, scale=None, task=None, seed=0):
    from peft.tuners.lora import EvaConfig, initialize_lora_eva_weights

    # rho = 1: every layer keeps rank r, as in every other arm (EVA would otherwise move rank between layers)
    eva = EvaConfig(rho=1.0, use_label_mask=task.eva_label_mask if task else True)
    model = peft_model(base, replace(cfg, init_lora_weights="eva", eva_config=eva), seed)
    initialize_lora_eva_weights(model, calib, prepare_layer_inputs_fn=_eva_layer_inputs, show_progress_bar=False)
    return ArmSetup(model)


def _eva_layer_inputs(layer_input, model_input, layer_name):
    """PEFT's token selection, plus layers that see one vector per sequence (BERT's pooler): all rows."""
    from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling

    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if x.dim() == 2:
        return x.contiguous()  # EVA hashes x.view(-1); the pooler's input is a strided slice
    return prepare_layer_inputs_fn_language_modeling(x, model_input, layer_name)


def init_corda(base, cfg, calib, *, scale=None, task=None, seed=0):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    cfg = replace(cfg, init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))

    @torch.no_grad()
    def run_model():
        for b in calib:
            base(**b)

    preprocess_corda(base, cfg, run_model=run_model)
    return ArmSetup(peft_model(base, cfg, seed))


def init_lora_ga(base, cfg, calib, *, scale=16, task=None, seed=0):
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    cfg = replace(cfg, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(stable_gamma=int(scale)))

    def train_step():
        for b in calib:
            (base(**b).loss / len(calib)).backward()

    preprocess_loraga(base, cfg, train_step)
    return ArmSetup(peft_model(base, cfg, seed))


def _full_gradients(base, names, calib):
    """Mean gradient of the training loss w.r.t. each named Linear's weight over ``calib`` (one pass)."""
    mods = dict(base.named_modules())
    saved = [(p, p.requires_grad) for p in base.parameters()]
    for p in base.parameters():
        p.requires_grad_(False)
    for n in names:
        mods[n].weight.requires_grad_(True)
        mods[n].weight.grad = None
    base.eval()
    with torch.enable_grad():
        for b in calib:
            (base(**b).loss / len(calib)).backward()
    out = {n: mods[n].weight.grad.detach().float().clone() for n in names}
    for n in names:
        mods[n].weight.grad = None
    for p, rg in saved:
        p.requires_grad_(rg)
    return out


def _lora_names(model, adapter="default"):
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


@torch.no_grad()
def init_lora_one(base, cfg, calib, *, scale=16, task=None, seed=0):
    """LoRA-One-style spectral init, WRITTEN FROM THE PAPER'S DESCRIPTION (Zhang et al., 2025), not its code:
    one full-batch gradient G of each target weight; −G = U S Vᵀ; B = U_r S_r^½/√γ, A = S_r^½ V_rᵀ/√γ, so that
    s·BA is a projected gradient step. −G is divided by its spectral norm first (our choice, so that γ means
    the same as LoRA-DA's γ); the base weights are left as they are."""
    model = peft_model(base, cfg, seed)
    names = _lora_names(model)
    with model.disable_adapter():
        grads = _full_gradients(model.get_base_model(), [f"{n}.base_layer" for n in names], calib)
    mods = dict(model.get_base_model().named_modules())
    r = cfg.r
    for n in names:
        U, S, Vh = torch.linalg.svd(-grads[f"{n}.base_layer"], full_matrices=False)
        S = S / S[0].clamp_min(1e-30)
        root = S[:r].sqrt()
        layer = mods[n]
        layer.lora_B["default"].weight.copy_(U[:, :r] * root / math.sqrt(scale))
        layer.lora_A["default"].weight.copy_(root[:, None] * Vh[:r] / math.sqrt(scale))
    return ArmSetup(model)


# -- LoRA-DA arms: one solve at γ = 1 per (task, seed, variant), each γ is that state dict / √γ -----------


def _cached(task, key, compute, device):
    """``task.solved``, ``{(seed, variant): (unit weights, seconds, peak MiB)}``: the statistics of one seed serve every
    lr and γ of that seed; the arm that reuses them is charged the time and memory of computing them (run_one)."""
    if key not in task.solved:
        is_cuda = torch.device(device).type == "cuda"
        if is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        unit = compute()
        if is_cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if is_cuda else None
        task.solved[key] = (unit, time.perf_counter() - t0, peak)
    return task.solved[key]


def _device_of(model):
    return next(model.parameters()).device


def _unit_lora_da(base, cfg, calib, task, seed, beta):
    from lora_da import LoraDAConfig, initialize_lora_da_weights

    def compute():
        model = peft_model(copy.deepcopy(base), copy.deepcopy(cfg), seed)
        res = initialize_lora_da_weights(model, calib, lora_da_config=LoraDAConfig(n_pop=task.n_pop, beta=beta,
                                                                                   gamma=1.0), progress=False)
        return {n: (torch.from_numpy(r.A.astype("float32")), torch.from_numpy(r.B.astype("float32")))
                for n, r in res.items()}

    return _cached(task, (seed, beta, "exact"), compute, _device_of(base))


def _write(model, unit, gammas):
    """A, B ← the unit weights / √γ (γ per module from ``gammas``)."""
    from lora_da import LoraDAConfig, initialize_lora_da_weights

    sd = {}
    for n, (A, B) in unit.items():
        k = 1.0 / math.sqrt(gammas[n])
        sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = A * k, B * k
    initialize_lora_da_weights(model, state_dict=sd, lora_da_config=LoraDAConfig(n_pop=1, gamma=1.0), progress=False)
    return model


def init_lora_da(base, cfg, calib, *, scale=SOLVE_DEFAULTS["gamma"], task=None, seed=0,
                 beta=SOLVE_DEFAULTS["beta"]):
    unit, secs, peak = _unit_lora_da(base, cfg, calib, task, seed, beta)
    model = _write(peft_model(base, cfg, seed), unit, {n: float(scale) for n in unit})
    return ArmSetup(model, solve_s=secs, solve_peak_mb=peak)


def init_lora_da_beta0(base, cfg, calib, *, scale=SOLVE_DEFAULTS["gamma"], task=None, seed=0):
    return init_lora_da(base, cfg, calib, scale=scale, task=task, seed=seed, beta=0.0)


AUTO_NORM_RHO = 3e-3  # ‖s·BA‖_F = ρ‖W‖_F per layer; fixed before any run, in the middle of 1e-3…1e-2


def auto_norm_gammas(model, unit, rho=AUTO_NORM_RHO, adapter="default"):
    """γ per module such that the initial update's norm ‖s·BA‖_F is ``rho``·‖W‖_F (model and statistics only)."""
    mods = dict(model.get_base_model().named_modules())
    out = {}
    for n, (A, B) in unit.items():
        layer = mods[n]
        s = layer.scaling[adapter]
        w = layer.get_base_layer().weight.detach().float()
        upd = s * torch.linalg.matrix_norm((B.double() @ A.double()), "fro").item()  # at γ = 1
        out[n] = max(upd / (rho * torch.linalg.matrix_norm(w, "fro").item()), 1e-12)
    return out


def init_lora_da_auto(base, cfg, calib, *, scale=None, task=None, seed=0):
    unit, secs, peak = _unit_lora_da(base, cfg, calib, task, seed, SOLVE_DEFAULTS["beta"])
    model = peft_model(base, cfg, seed)
    gam = auto_norm_gammas(model, unit)
    return ArmSetup(_write(model, unit, gam), solve_s=secs, solve_peak_mb=peak, gammas=gam)


def init_lora_da_authors(base, cfg, calib, *, scale=SOLVE_DEFAULTS["gamma"], task=None, seed=0):
    """The published research code's numerics: statistics rounded to float32, then the authors' per-module
    dense float32 solve with 10 LOBPCG iterations (:func:`lora_da.compare.authors.solve_float32`)."""
    from lora_da import collect_statistics
    from lora_da.compare.authors import solve_float32

    def compute():
        probe = peft_model(copy.deepcopy(base), copy.deepcopy(cfg), seed)
        names = _lora_names(probe)
        with probe.disable_adapter():
            st = collect_statistics(probe.get_base_model(), calib, [f"{n}.base_layer" for n in names], progress=False)
        unit = {}
        for n in names:
            k = f"{n}.base_layer"
            dev = _device_of(base)  # the authors solve where their statistics live (the GPU)
            Z = torch.from_numpy(st.input_factor(k)).float().to(dev)
            y = torch.from_numpy(st.output_factor(k)).float().to(dev)
            G = torch.from_numpy(st.mean_grad(k)).float().to(dev)
            A, B, _ = solve_float32(Z, y, 1.0, G, n_pop=task.n_pop, rank=cfg.r, alpha=SOLVE_DEFAULTS["alpha"],
                                    beta=SOLVE_DEFAULTS["beta"], gamma=1.0, damping=SOLVE_DEFAULTS["damping"])
            unit[n] = (A.float().cpu(), B.float().cpu())
        return unit

    unit, secs, peak = _cached(task, (seed, "authors"), compute, _device_of(base))
    model = _write(peft_model(base, cfg, seed), unit, {n: float(scale) for n in unit})
    return ArmSetup(model, solve_s=secs, solve_peak_mb=peak)


@dataclass
class Method:
    name: str
    init: Callable
    scales: tuple = (None,)
    note: str = ""


GAMMA_GRID = (1.0, 16.0, 1024.0)
SENSITIVITY_GAMMAS = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)


def available_methods(log=print) -> list[Method]:
    """Every arm the installed PEFT supports; a printed note for each it lacks."""
    import peft.tuners.lora as L

    ms = [Method("PEFT default", init_default, note="Kaiming A, zero B"),
          Method("gaussian", init_gaussian),
          Method("PiSSA", init_pissa)]
    if hasattr(L, "EvaConfig") and hasattr(L, "initialize_lora_eva_weights"):
        ms.append(Method("EVA", init_eva, note="rho = 1"))
    else:
        log("[compare] skipped EVA: the installed PEFT has no EvaConfig / initialize_lora_eva_weights")
    try:
        from peft.tuners.lora.config import CordaConfig  # noqa: F401
        from peft.tuners.lora.corda import preprocess_corda  # noqa: F401

        ms.append(Method("CorDA", init_corda, note="KPM"))
    except Exception as e:  # PEFT 0.21's corda module imports `attr`, which may be missing
        log(f"[compare] skipped CorDA: cannot import peft.tuners.lora.corda ({type(e).__name__}: {e})")
    if hasattr(L, "LoraGAConfig"):
        ms.append(Method("LoRA-GA", init_lora_ga, GAMMA_GRID, note="PEFT's, stable_gamma searched"))
    else:
        log("[compare] skipped LoRA-GA: the installed PEFT has no LoraGAConfig")
    ms += [Method("LoRA-One*", init_lora_one, GAMMA_GRID, note="*written from the paper's description"),
           Method("LoRA-DA", init_lora_da, GAMMA_GRID, note="published defaults, γ searched"),
           Method("LoRA-DA β=0", init_lora_da_beta0, GAMMA_GRID, note="bias term only"),
           Method("LoRA-DA authors", init_lora_da_authors, GAMMA_GRID, note="float32, 10 LOBPCG iters"),
           Method("LoRA-DA auto-norm", init_lora_da_auto, note=f"γ from ‖s·BA‖_F = {AUTO_NORM_RHO:g}‖W‖_F")]
    return ms
