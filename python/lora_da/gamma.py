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


# A candidate is "within noise" of the chosen γ when the mean of their paired
# per-sample differences on the held-back samples is at most this many standard errors.
NOISE_SE = 2.0


@dataclass
class GammaSearch:
    """The chosen γ and, per candidate, ``(γ, held-back loss at step 0, after the steps)``;
    ``losses`` holds each candidate's per-sample held-back losses after the steps (the
    noise :meth:`verdict` judges the choice by)."""

    best: float
    table: list[tuple[float, float, float]]
    steps: int = 5
    losses: dict | None = None

    def describe(self) -> str:
        rows = [f"  {g:<7g}  {l0:.4f}    {l1:.4f}" for g, l0, l1 in self.table]
        return "\n".join([f"  γ        loss@0    loss@{self.steps}", *rows])

    def at_edge(self) -> bool:
        """The chosen γ is the smallest or the largest candidate: the optimum may lie past the grid."""
        grid = sorted(g for g, _, _ in self.table)
        return len(grid) > 1 and self.best in (grid[0], grid[-1])

    def differences(self) -> dict[float, tuple[float, float]]:
        """Per other candidate γ: (mean, standard error) of its per-sample held-back loss minus
        the chosen γ's, paired over the same samples (empty without ``losses`` or with < 2 samples)."""
        import numpy as np

        if not self.losses or self.best not in self.losses:
            return {}
        ref = np.asarray(self.losses[self.best], dtype=float)
        if ref.size < 2:
            return {}
        out = {}
        for g, ls in self.losses.items():
            if g == self.best:
                continue
            d = np.asarray(ls, dtype=float) - ref
            out[g] = (float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)))
        return out

    def within_noise(self) -> bool:
        """Every candidate's held-back loss is within ``NOISE_SE`` standard errors of the chosen one's."""
        diffs = self.differences()
        return bool(diffs) and all(abs(m) <= NOISE_SE * se for m, se in diffs.values())

    def next_grid(self) -> list[float]:
        """Four candidates past the edge the chosen γ sits on, at the grid's own ratio, the chosen γ included."""
        grid = sorted(g for g, _, _ in self.table)
        ratio = grid[1] / grid[0] if len(grid) > 1 and grid[0] > 0 else 4.0
        if self.best == grid[0]:
            return [self.best / ratio**k for k in (3, 2, 1, 0)]
        return [self.best * ratio**k for k in (0, 1, 2, 3)]

    def verdict(self) -> str:
        """What the choice is worth, in a sentence (empty when the choice is inside the grid and
        stands out of the noise): at the edge of the grid, within noise of every other candidate."""
        edge, flat = self.at_edge(), self.within_noise()
        if not edge and not flat:
            return ""
        diffs = self.differences()
        n = len(next(iter(self.losses.values()))) if self.losses else 0
        grid = ", ".join(f"{g:g}" for g in self.next_grid())
        noise = ""
        if diffs:
            g, (m, se) = max(diffs.items(), key=lambda kv: abs(kv[1][0]))
            noise = (f"every candidate's held-back loss is within {NOISE_SE:g} standard errors of it (the largest "
                     f"difference, at γ = {g:g}, is {m:+.4f} ± {se:.4f} over {n} held-back samples)")
        if edge and flat:
            return (f"γ = {self.best:g} is at the edge of the grid and {noise}: the search did not determine γ. "
                    f"Try the next grid, γ in {grid} (search_gamma(..., gammas=...)), or more held-back samples.")
        if edge:
            return (f"γ = {self.best:g} is at the edge of the grid: a γ past it may do better; try the next grid, "
                    f"γ in {grid} (search_gamma(..., gammas=...)).")
        return f"γ = {self.best:g} was chosen but {noise}: γ matters little here, or more held-back samples are needed."


def unit_state_dict(inits, gamma: float) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A.weight": A√γ, ...}``: a solve at ``gamma`` brought to γ = 1 (SPEC §3 step 8)."""
    from lora_da.adapters import state_dict_of

    return state_dict_of(inits, scale=math.sqrt(gamma))


def held_back_loss(model, batches, loss_fn=None) -> float:
    """Mean per-sample loss over ``batches`` (the default loss of :mod:`lora_da.collect`)."""
    losses = held_back_losses(model, batches, loss_fn)
    return math.fsum(losses) / len(losses)


def held_back_losses(model, batches, loss_fn=None) -> list[float]:
    """Each sample's loss over ``batches``, in order (the default loss of :mod:`lora_da.collect`)."""
    from lora_da.collect import default_loss

    loss_fn = loss_fn or default_loss
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for b in batches:
            out += [float(v) for v in loss_fn(model, _to(b, model)).double().cpu()]
    return out


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

    import numbers

    # numpy's numbers too (np.float32(4) was refused); a bool is not a γ (True was taken as 1)
    def positive(g) -> bool:
        if isinstance(g, bool) or not isinstance(g, numbers.Real):
            return False
        try:
            return math.isfinite(float(g)) and g > 0
        except OverflowError:  # an integer past float64
            return False

    if not gammas or not all(positive(g) for g in gammas):
        raise InvalidArgumentError(f"search_gamma: gammas must be positive finite numbers, got {gammas!r}")
    gammas = [float(g) for g in gammas]
    if not train_batches or not val_batches:
        raise InvalidArgumentError("search_gamma: needs calibration batches to train on and held-back batches to score")
    table, losses = [], {}
    for g in gammas:
        model = make_model()
        scaled = {k: v / math.sqrt(g) for k, v in unit.items()}
        initialize_lora_da_weights(model, state_dict=scaled, lora_da_config=replace(config, gamma=float(g)),
                                   adapter_name=adapter_name, progress=False)
        before = held_back_loss(model, val_batches, loss_fn)
        train_steps(model, train_batches, steps, lr, seed)
        losses[float(g)] = held_back_losses(model, val_batches, loss_fn)
        table.append((float(g), before, math.fsum(losses[float(g)]) / len(losses[float(g)])))
        del model
    # a candidate whose loss diverged (NaN or inf) cannot win: min() over NaN keys is arbitrary
    finite = [row for row in table if math.isfinite(row[2])]
    if not finite:
        from lora_da.errors import NonFiniteError

        raise NonFiniteError(f"search_gamma: the held-back loss is not finite for any γ in {list(gammas)} after {steps} "
                             "steps; lower lr or check the data")
    best = min(finite, key=lambda row: (row[2], -row[0]))[0]
    return GammaSearch(best=best, table=table, steps=steps, losses=losses)


def _to(batch: dict, model) -> dict:
    dev = next(model.parameters()).device
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
