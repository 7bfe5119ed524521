"""Choosing γ by a short search on held-back data (SPEC §3 step 8).

``A = Vᵀ/√γ`` and ``B = Δ̂ᵀV/√γ``, so ``s·BA = (s/γ)·Δ̂ᵀVVᵀ``: γ sets the size
of the initial step and nothing else. The published γ = 1024 was tuned for a
7B model; a small model can stall at chance with it. Until a rule is known,
the honest choice is empirical and cheap: one solve (at γ = 1), then for each
candidate γ the same weights divided by √γ, a few optimizer steps on the
calibration batches, and the loss on batches that neither the statistics nor
the steps saw. The lowest loss wins (ties: the larger γ, the smaller step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

GAMMAS = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)


@dataclass
class GammaSearch:
    """The chosen γ and, per candidate, ``(γ, held-back loss at step 0, after the steps)``."""

    best: float
    table: list[tuple[float, float, float]]
    steps: int = 5

    def describe(self) -> str:
        rows = [f"  {g:<7g}  {l0:.4f}    {l1:.4f}" for g, l0, l1 in self.table]
        return "\n".join([f"  γ        loss@0    loss@{self.steps}", *rows])


def unit_state_dict(inits, gamma: float) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A.weight": A√γ, ...}``: a solve at ``gamma`` brought to γ = 1 (SPEC §3 step 8)."""
    from lora_da.adapters import state_dict_of

    return state_dict_of(inits, scale=math.sqrt(gamma))


def held_back_loss(model, batches, loss_fn=None) -> float:
    """Mean per-sample loss over ``batches`` (the default loss of :mod:`lora_da.collect`)."""
    from lora_da.collect import default_loss

    loss_fn = loss_fn or default_loss
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            per_sample = loss_fn(model, _to(b, model))
            total += float(per_sample.double().sum())
            n += per_sample.shape[0]
    return total / n


def train_steps(model, batches, steps: int, lr: float, seed: int) -> list[float]:
    """``steps`` AdamW steps cycling over ``batches``; each step's loss before its update."""
    torch.manual_seed(seed)  # the same dropout masks for every candidate
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**_to(batches[step % len(batches)], model)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def search_gamma(make_model, unit: dict[str, torch.Tensor], train_batches, val_batches, config, *,
                 gammas=GAMMAS, steps: int = 5, lr: float = 5e-4, seed: int = 0, loss_fn=None,
                 adapter_name: str = "default") -> GammaSearch:
    """Try each γ in ``gammas`` (see the module docstring); ``make_model()`` returns
    a fresh PeftModel (the same one each call), ``unit`` the weights at γ = 1
    (:func:`unit_state_dict`), ``config`` the LoRA-DA settings (its γ is replaced)."""
    from lora_da.adapters import initialize_lora_da_weights
    from lora_da.errors import InvalidArgumentError

    if not gammas or any(not (isinstance(g, (int, float)) and math.isfinite(g) and g > 0) for g in gammas):
        raise InvalidArgumentError(f"search_gamma: gammas must be positive finite numbers, got {gammas!r}")
    if not train_batches or not val_batches:
        raise InvalidArgumentError("search_gamma: needs calibration batches to train on and held-back batches to score")
    table = []
    for g in gammas:
        model = make_model()
        scaled = {k: v / math.sqrt(g) for k, v in unit.items()}
        initialize_lora_da_weights(model, state_dict=scaled, lora_da_config=replace(config, gamma=float(g)),
                                   adapter_name=adapter_name, progress=False)
        before = held_back_loss(model, val_batches, loss_fn)
        train_steps(model, train_batches, steps, lr, seed)
        table.append((float(g), before, held_back_loss(model, val_batches, loss_fn)))
        del model
    # a candidate whose loss diverged (NaN or inf) cannot win: min() over NaN keys is arbitrary
    finite = [row for row in table if math.isfinite(row[2])]
    if not finite:
        from lora_da.errors import NonFiniteError

        raise NonFiniteError(f"search_gamma: the held-back loss is not finite for any γ in {list(gammas)} after {steps} "
                             "steps; lower lr or check the data")
    best = min(finite, key=lambda row: (row[2], -row[0]))[0]
    return GammaSearch(best=best, table=table, steps=steps)


def _to(batch: dict, model) -> dict:
    dev = next(model.parameters()).device
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
