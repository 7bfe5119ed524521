"""Fine-tune one model under several LoRA initializations and compare them fairly.

Every arm starts from a deep copy of the same base model (same head seed),
sees the same training batches in the same order, the same optimizer and the
same number of steps; each arm gets the same search budget over the learning
rate and over its own scale (γ) where it has one (a coordinate search: every scale at the middle lr, then
every lr at the best scale), chosen on a held-back split
that is neither the training nor the reported evaluation set.

An initialization is ``init(base, lora_config, calib_batches, scale=..., task=...)``
returning a :class:`peft.PeftModel`. ``benches/bench_quality.py`` and
``lora-da compare`` drive :func:`run_comparison`.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    name: str
    base: Callable[[int], torch.nn.Module]  # seed -> a fresh base model (deterministic given seed)
    lora_config: Callable[[], object]  # -> a new peft.LoraConfig (PEFT mutates configs)
    train: Callable[[int], list]  # seed -> training batches in training order
    calib: list  # calibration batches (a part of the training data, fixed)
    select: list  # held-back batches for the lr / scale choice
    eval: list  # reported evaluation batches
    evaluate: Callable  # (model, batches) -> {"loss": float, "metric": float}
    metric: str
    n_pop: int  # size of the fine-tuning set (LoRA-DA's variance term)
    eva_label_mask: bool = True
    about: dict = field(default_factory=dict)  # what results.md records: model, data, sizes


def _dev(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def read_label_rows(path, *, vader: bool = False) -> list[tuple[str, int]]:
    """``text<TAB>label`` lines; with ``vader`` the VADER lexicon (label 1 iff mean valence > 0); a
    ``.jsonl``/``.json``/``.ndjson`` file is read as the other commands read it (``{"text", "label"}``
    per line, each line checked)."""
    if not vader and Path(path).suffix.lower() in (".jsonl", ".json", ".ndjson"):
        from lora_da.data import read_data as _read_data

        texts, labels = _read_data(str(path), "seq-cls")
        return list(zip(texts, labels))
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        try:
            rows.append((parts[0], (1 if float(parts[1]) > 0 else 0) if vader else int(parts[1])))
        except ValueError:
            continue
        if rows[-1][1] < 0:  # a class index; a negative one ended in a StopIteration deep in the split
            raise ValueError(f"{path}:{i}: label {rows[-1][1]} is negative; labels are class indices 0..K-1")
    return rows


def classification_task(model_dir, rows, *, n_train, n_select, n_eval, n_calib, batch=32, max_length=16,
                        target_modules=("query", "key", "value", "dense"), device="cpu", name=None) -> Task:
    """Sequence classification from a local model directory with a fresh seeded head."""
    import random

    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = list(rows)
    random.Random(1234).shuffle(rows)  # the split is fixed; the seeds vary the order within train
    need = n_train + n_select + n_eval
    if need > len(rows):
        raise ValueError(f"train + select + eval = {need} exceeds the {len(rows)} labeled rows")
    train_rows, select_rows, eval_rows = rows[:n_train], rows[n_train:n_train + n_select], rows[n_train + n_select:need]
    n_labels = max(lab for _, lab in rows) + 1
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def batches(rs, bs):
        out = []
        for i in range(0, len(rs), bs):
            chunk = rs[i:i + bs]
            enc = tok([w for w, _ in chunk], padding="longest", truncation=True, max_length=max_length,
                      return_tensors="pt")
            out.append(_dev({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "labels": torch.tensor([lab for _, lab in chunk])}, device))
        return out

    cache = {}

    def base(seed):
        if "m" not in cache:
            cache["m"] = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=n_labels,
                                                                            local_files_only=True)
            about["parameters"] = f"{sum(p.numel() for p in cache['m'].parameters()):,} ({type(cache['m']).__name__})"
        m = copy.deepcopy(cache["m"]).float()  # float32 training whatever dtype the checkpoint was saved in
        g = torch.Generator().manual_seed(seed)  # the head: seeded, the same for every arm of a seed
        for mod in m.modules():
            if mod is getattr(m, "classifier", None) and isinstance(mod, torch.nn.Linear):
                torch.nn.init.normal_(mod.weight, std=0.02, generator=g)
                torch.nn.init.zeros_(mod.bias)
        return m.to(device)

    def lora_config():
        return LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0, target_modules=list(target_modules),
                          task_type=TaskType.SEQ_CLS, modules_to_save=["classifier"])

    def train(seed):
        if ("train", seed) not in cache:  # tokenized once per seed; every arm gets this same list
            rs = list(train_rows)
            random.Random(seed).shuffle(rs)
            cache["train", seed] = batches(rs, batch)
        return cache["train", seed]

    @torch.no_grad()
    def evaluate(model, bs):
        model.eval()
        loss = correct = n = 0.0
        for b in bs:
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
            loss += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += float((logits.argmax(-1) == b["labels"]).sum())
            n += b["labels"].shape[0]
        return {"loss": loss / n, "metric": correct / n}

    def balance(rs):
        counts = [0] * n_labels
        for _, lab in rs:
            counts[lab] += 1
        return " / ".join(f"{lab}: {c} ({c / max(1, len(rs)):.0%})" for lab, c in enumerate(counts))

    about = {"model": str(model_dir), "rows": len(rows), "labels": n_labels,
             "label balance (all rows)": balance(rows), "label balance (eval)": balance(eval_rows),
             "sizes": f"train {n_train}, select {n_select}, eval {n_eval}, calib {n_calib} (a prefix of train), "
                      f"batch {batch}, max_length {max_length}",
             "targets": ", ".join(target_modules)}
    return Task(name or f"{Path(model_dir).name} classification", base, lora_config, train,
                calib=batches(train_rows[:n_calib], batch), select=batches(select_rows, 128),
                eval=batches(eval_rows, 128), evaluate=evaluate, metric="accuracy", n_pop=n_train,
                eva_label_mask=False, about=about)


# -- causal LM: a tiny Llama pretrained on additions, adapted to subtractions ------------------------

_CHARS = "0123456789+-="
PAD, BOS, EOS = 0, 1, 2
VOCAB = 3 + len(_CHARS)
LM_LEN = 12  # BOS + "99+99=198" + EOS = 11 tokens


def _encode(s):
    return [BOS] + [3 + _CHARS.index(c) for c in s] + [EOS]


def _arith(op, pairs):
    """token lists and the index of the first answer token (after '=')."""
    out = []
    for a, b in pairs:
        s = f"{a}{op}{b}=" + str(a + b if op == "+" else a - b)
        ids = _encode(s)
        out.append((ids, s.index("=") + 2))
    return out


def _lm_batches(samples, bs):
    out = []
    for i in range(0, len(samples), bs):
        chunk = samples[i:i + bs]
        ids = torch.full((len(chunk), LM_LEN), PAD)
        mask = torch.zeros((len(chunk), LM_LEN), dtype=torch.long)
        ans = torch.zeros((len(chunk), LM_LEN), dtype=torch.bool)
        for j, (s, start) in enumerate(chunk):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
            ans[j, start:len(s)] = True  # the answer digits and EOS
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
                    "answer_mask": ans})
    return out


def _strip(b):
    return {k: v for k, v in b.items() if k != "answer_mask"}


def lm_task(*, n_train, n_select, n_eval, n_calib, pretrain_steps, batch=64, pretrain_batch=64, device="cpu",
            log=print) -> Task:
    """A 4-layer, hidden-128 Llama (fixed seed) pretrained here on ``a+b=c``, adapted to ``a-b=c`` (a ≥ b)."""
    import random

    from peft import LoraConfig, TaskType
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(7)
    sub = [(a, b) for a in range(100) for b in range(a + 1)]
    rng.shuffle(sub)
    need = n_train + n_select + n_eval
    if need > len(sub):
        raise ValueError(f"{need} subtraction samples asked for, {len(sub)} exist")
    train_s = _arith("-", sub[:n_train])
    select_s = _arith("-", sub[n_train:n_train + n_select])
    eval_s = _arith("-", sub[n_train + n_select:need])

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LM_LEN,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device)
    t0 = time.perf_counter()
    add_rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(pretrain_steps):
        pairs = [(add_rng.randrange(100), add_rng.randrange(100)) for _ in range(pretrain_batch)]
        b = _dev(_strip(_lm_batches(_arith("+", pairs), pretrain_batch)[0]), device)
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    log(f"[lm] pretrained a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama on a+b=c: "
        f"{pretrain_steps} steps, final loss {loss.item():.3f}, {time.perf_counter() - t0:.1f} s")
    pretrained = model

    def base(seed):
        return copy.deepcopy(pretrained)

    def lora_config():
        return LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0, task_type=TaskType.CAUSAL_LM,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    train_cache = {}

    def train(seed):
        if seed not in train_cache:
            s = list(train_s)
            random.Random(seed).shuffle(s)
            train_cache[seed] = [_dev(_strip(b), device) for b in _lm_batches(s, batch)]
        return train_cache[seed]

    @torch.no_grad()
    def evaluate(model, bs):
        model.eval()
        loss = exact = n = ntok = 0.0
        for b in bs:
            logits = model(**_strip(b)).logits.float()[:, :-1]
            tgt = b["labels"][:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none", ignore_index=-100)
            loss += float(ce.sum())
            ntok += float((tgt != -100).sum())
            ans = b["answer_mask"][:, 1:]
            ok = ((logits.argmax(-1) == tgt) | ~ans).all(1)  # teacher-forced argmax == greedy exact match
            exact += float(ok.sum())
            n += tgt.shape[0]
        return {"loss": loss / ntok, "metric": exact / n}

    calib = [_dev(_strip(b), device) for b in _lm_batches(train_s[:n_calib], batch)]
    return Task("tiny Llama: a+b → a-b", base, lora_config, train, calib=calib,
                select=[_dev(b, device) for b in _lm_batches(select_s, 256)],
                eval=[_dev(b, device) for b in _lm_batches(eval_s, 256)],
                evaluate=evaluate, metric="exact match", n_pop=n_train)


# ----------------------------------------------------------------------------- initializations


def _peft(base, cfg, seed=0):
    from peft import get_peft_model

    torch.manual_seed(seed)  # PEFT's random A (and anything else it draws) is the same for every arm of a seed
    return get_peft_model(base, cfg)


def init_default(base, cfg, calib, *, scale=None, task=None, seed=0):
    return _peft(base, cfg, seed)


def init_gaussian(base, cfg, calib, *, scale=None, task=None, seed=0):
    return _peft(base, replace(cfg, init_lora_weights="gaussian"), seed)


def init_pissa(base, cfg, calib, *, scale=None, task=None, seed=0):
    return _peft(base, replace(cfg, init_lora_weights="pissa"), seed)


def init_eva(base, cfg, calib, *, scale=None, task=None, seed=0):
    from peft.tuners.lora import EvaConfig, initialize_lora_eva_weights

    # rho = 1: every layer keeps rank r, as in every other arm (EVA would otherwise move rank between layers)
    eva = EvaConfig(rho=1.0, use_label_mask=task.eva_label_mask if task else True)
    model = _peft(base, replace(cfg, init_lora_weights="eva", eva_config=eva), seed)
    initialize_lora_eva_weights(model, calib, prepare_layer_inputs_fn=_eva_layer_inputs, show_progress_bar=False)
    return model


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
    return _peft(base, cfg, seed)


def init_lora_ga(base, cfg, calib, *, scale=16, task=None, seed=0):
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    cfg = replace(cfg, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(stable_gamma=int(scale)))

    def train_step():
        for b in calib:
            (base(**b).loss / len(calib)).backward()

    preprocess_loraga(base, cfg, train_step)
    return _peft(base, cfg, seed)


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
    model = _peft(base, cfg, seed)
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
    return model


# -- LoRA-DA arms: one solve at γ = 1 per (task, seed, variant), each γ is that state dict / √γ -----------


def _cached(task, key, compute, device):
    """``task``'s ``{(seed, variant): (unit weights, seconds, peak MiB)}``: the statistics of one seed serve every
    lr and γ of that seed; the arm that reuses them is charged the time and memory of computing them (run_one)."""
    _UNIT = task.__dict__.setdefault("_unit_cache", {})
    if key not in _UNIT:
        is_cuda = torch.device(device).type == "cuda"
        if is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        unit = compute()
        if is_cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if is_cuda else None
        _UNIT[key] = (unit, time.perf_counter() - t0, peak)
    return _UNIT[key]


def _device_of(model):
    return next(model.parameters()).device


def _unit_lora_da(base, cfg, calib, task, seed, beta):
    from lora_da import LoraDAConfig, initialize_lora_da_weights

    def compute():
        model = _peft(copy.deepcopy(base), copy.deepcopy(cfg), seed)
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


def init_lora_da(base, cfg, calib, *, scale=1024.0, task=None, seed=0, beta=0.03):
    unit, secs, peak = _unit_lora_da(base, cfg, calib, task, seed, beta)
    model = _peft(base, cfg, seed)
    model._solve_cost = (secs, peak)
    return _write(model, unit, {n: float(scale) for n in unit})


def init_lora_da_beta0(base, cfg, calib, *, scale=1024.0, task=None, seed=0):
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
    unit, secs, peak = _unit_lora_da(base, cfg, calib, task, seed, 0.03)
    model = _peft(base, cfg, seed)
    model._solve_cost = (secs, peak)
    gam = auto_norm_gammas(model, unit)
    model._auto_gammas = gam  # reported: the median γ it chose
    return _write(model, unit, gam)


def _authors_module():
    try:
        import baseline_authors
    except ImportError:
        import importlib.util

        path = Path(__file__).resolve().parents[2] / "benches" / "baseline_authors.py"
        if not path.is_file():
            raise ImportError(f"{path}: benches/baseline_authors.py not found (run from the repository)")
        spec = importlib.util.spec_from_file_location("baseline_authors", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["baseline_authors"] = mod
        return mod
    return baseline_authors


def init_lora_da_authors(base, cfg, calib, *, scale=1024.0, task=None, seed=0):
    """The published research code's numerics: statistics rounded to float32, then the authors' per-module
    dense float32 solve with 10 LOBPCG iterations (benches/baseline_authors.py ``_solve``)."""
    from lora_da import collect_statistics

    ba = _authors_module()
    def compute():
        probe = _peft(copy.deepcopy(base), copy.deepcopy(cfg), seed)
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
            A, B, _ = ba._solve(Z, y, 1.0, G, n_pop=task.n_pop, rank=cfg.r, alpha=1.0, beta=0.03, gamma=1.0,
                                damping=1e-6)
            unit[n] = (A.float().cpu(), B.float().cpu())
        return unit

    unit, secs, peak = _cached(task, (seed, "authors"), compute, _device_of(base))
    model = _peft(base, cfg, seed)
    model._solve_cost = (secs, peak)
    return _write(model, unit, {n: float(scale) for n in unit})


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


# ----------------------------------------------------------------------------- training


@dataclass
class Run:
    method: str
    seed: int
    lr: float
    scale: float | None
    losses: list  # training loss of every step (before its update)
    select: dict
    eval: dict
    init_s: float
    train_s: float
    peak_mb: float | None
    first_batch: object = field(default=None, repr=False)
    base_fingerprint: float | None = None
    extra: str = ""


def _fingerprint(model):
    """A number that changes if any base weight does (taken before PEFT wraps the model)."""
    with torch.no_grad():
        return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_one(task: Task, method: Method, *, seed, lr, scale, steps, device="cpu", keep_model=False) -> Run:
    is_cuda = torch.device(device).type == "cuda"
    base = task.base(seed)
    fp = _fingerprint(base)
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    kw = {} if scale is None else {"scale": scale}
    model = method.init(base, task.lora_config(), task.calib, task=task, seed=seed, **kw)
    _sync(device)
    init_s = time.perf_counter() - t0
    batches = task.train(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    losses = [float(x) for x in losses]  # one sync at the end, not one per step
    _sync(device)
    train_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if is_cuda else None
    if hasattr(model, "_solve_cost"):  # statistics + solve computed once per seed: charge them to every run
        init_s += model._solve_cost[0]
        if peak is not None and model._solve_cost[1] is not None:
            peak = max(peak, model._solve_cost[1])
    sel, ev = task.evaluate(model, task.select), task.evaluate(model, task.eval)
    extra = ""
    if hasattr(model, "_auto_gammas"):
        g = sorted(model._auto_gammas.values())
        extra = f"γ median {g[len(g) // 2]:.3g} (range {g[0]:.3g}…{g[-1]:.3g})"
    run = Run(method.name, seed, lr, scale, losses, sel, ev, init_s, train_s, peak,
              first_batch=batches[0]["input_ids"].cpu(), base_fingerprint=fp, extra=extra)
    if keep_model:
        run.model = model
    return run


def log_steps(steps: int) -> list[int]:
    """Steps (1-based) at which the training loss is reported: the mean over the window ending there."""
    pts = sorted({1, max(1, steps // 10), max(1, steps // 4), max(1, steps // 2), max(1, 3 * steps // 4), steps})
    return pts


def logged(losses, steps):
    pts, out, prev = log_steps(steps), [], 0
    for p in pts:
        win = losses[prev:p] if p > 1 else losses[:1]
        out.append(sum(win) / len(win))
        prev = p
    return out


@dataclass
class TaskResult:
    task: Task
    chosen: dict  # method -> (lr, scale)
    search: dict  # method -> [(lr, scale, select loss)]
    runs: dict  # method -> [Run per seed] at the chosen setting
    sensitivity: dict  # γ -> [Run per seed]
    failed: dict  # method -> why it could not run on this task
    steps: int


def compare_task(task: Task, methods: list[Method], *, seeds, lrs, steps, device="cpu", log=print,
                 sensitivity=SENSITIVITY_GAMMAS) -> TaskResult:
    chosen, search, runs, done = {}, {}, {}, {}

    def get(m, seed, lr, sc):  # a (method, seed, lr, scale) run is deterministic: the γ table reuses the grid's
        key = (m.name, seed, lr, sc)
        if key not in done:
            done[key] = run_one(task, m, seed=seed, lr=lr, scale=sc, steps=steps, device=device)
        return done[key]

    def _search_and_seeds(m):
        t0 = time.perf_counter()
        grid = []

        def pick():  # lowest held-back loss; ties: the larger γ (the smaller first step)
            return min(grid, key=lambda g: (g[0], -(g[2] or 0)))

        # coordinate search, the same for every arm that has a scale: all scales at the middle lr, then the
        # other lrs at the best scale (len(scales) + len(lrs) - 1 runs, not their product: the full H200 run
        # has to fit in 8 minutes)
        mid = lrs[len(lrs) // 2]
        for sc in m.scales:
            r = get(m, seeds[0], mid, sc)
            grid.append((r.select["loss"], mid, sc, r))
        sc_best = pick()[2]
        for lr in lrs:
            if lr != mid:
                r = get(m, seeds[0], lr, sc_best)
                grid.append((r.select["loss"], lr, sc_best, r))
        best = pick()
        chosen[m.name] = (best[1], best[2])
        search[m.name] = [(lr, sc, s) for s, lr, sc, _ in grid]
        runs[m.name] = [best[3]] + [get(m, s, best[1], best[2]) for s in seeds[1:]]
        ev = [r.eval["metric"] for r in runs[m.name]]
        log(f"[{task.name}] {m.name:18s} lr {best[1]:g} scale {best[2]}  eval {task.metric} "
            f"{sum(ev) / len(ev):.4f}  ({time.perf_counter() - t0:.1f} s)")

    failed = {}
    for m in methods:
        try:
            _search_and_seeds(m)
        except Exception as e:  # an arm that cannot initialize this model is a result, not a crash of the bench
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            failed[m.name] = msg
            search.pop(m.name, None)
            chosen.pop(m.name, None)
            log(f"[{task.name}] {m.name}: FAILED ({msg})")

    sens = {}
    da = next((m for m in methods if m.name == "LoRA-DA"), None)
    if da is not None and sensitivity and "LoRA-DA" in chosen:
        lr = chosen["LoRA-DA"][0]
        for g in sensitivity:
            sens[g] = [get(da, s, lr, float(g)) for s in seeds]
        log(f"[{task.name}] γ sensitivity done at lr {lr:g}")
    return TaskResult(task, chosen, search, runs, sens, failed, steps)


# ----------------------------------------------------------------------------- reporting


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def markdown(res: TaskResult) -> str:
    t, steps = res.task, res.steps
    pts = log_steps(steps)
    head = (["method", "lr", "γ/scale"] + [f"loss@{p}" for p in pts]
            + [f"eval loss", f"eval {t.metric}", "init s", "train s", "peak MiB", "note"])
    seeds = sorted({r.seed for rs in res.runs.values() for r in rs})
    spread = (f"mean over seeds; ± = std of eval {t.metric} between seeds" if len(seeds) > 1
              else "one seed: no spread between seeds was measured")
    lines = [f"#### {t.name} — {steps} steps, seeds {seeds} ({spread})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in res.runs.items():
        lr, sc = res.chosen[name]
        curves = [logged(r.losses, steps) for r in rs]
        ls = [_mean([c[i] for c in curves]) for i in range(len(pts))]
        ev = [r.eval["metric"] for r in rs]
        peak = _mean([r.peak_mb for r in rs])
        row = [name, f"{lr:g}", "—" if sc is None else f"{sc:g}"] + [f"{x:.4f}" for x in ls] + [
            f"{_mean([r.eval['loss'] for r in rs]):.4f}",
            f"{_mean(ev):.4f} ± {_std(ev):.4f}" if len(ev) > 1 else f"{_mean(ev):.4f}",
            f"{_mean([r.init_s for r in rs]):.2f}", f"{_mean([r.train_s for r in rs]):.2f}",
            "n/a (CPU)" if peak is None else f"{peak:.0f}", rs[0].extra]
        lines.append("| " + " | ".join(row) + " |")
    for name, why in res.failed.items():
        lines.append(f"| {name} | — | — | " + " | ".join("—" for _ in pts) + f" | — | — | — | — | — | FAILED: {why} |")
    if res.sensitivity:
        lines += ["", f"γ sensitivity of LoRA-DA (published defaults otherwise; lr {res.chosen['LoRA-DA'][0]:g}):", "",
                  "| γ | held-back loss | " + " | ".join(f"loss@{p}" for p in pts) + f" | eval loss | eval {t.metric} |",
                  "|" + "---|" * (len(pts) + 4)]
        for g, rs in res.sensitivity.items():
            curves = [logged(r.losses, steps) for r in rs]
            ls = [_mean([c[i] for c in curves]) for i in range(len(pts))]
            lines.append(f"| {g:g} | {_mean([r.select['loss'] for r in rs]):.4f} | "
                         + " | ".join(f"{x:.4f}" for x in ls)
                         + f" | {_mean([r.eval['loss'] for r in rs]):.4f} | {_mean([r.eval['metric'] for r in rs]):.4f} |")
    return "\n".join(lines)


def verdict(res: TaskResult) -> str:
    """The closing line: the best arm on the held-out (eval) metric, higher is better, and
    whether its lead over the next arm exceeds the spread between seeds (the larger of
    the two arms' standard deviations); with one seed, that no spread was measured."""
    t = res.task
    means = sorted(((_mean([r.eval["metric"] for r in rs]), name, [r.eval["metric"] for r in rs])
                    for name, rs in res.runs.items()), key=lambda x: -x[0])
    if not means:
        return f"Verdict ({t.name}): no arm ran."
    best, name, ev = means[0]
    if len(means) == 1:
        return f"Verdict ({t.name}): {name} is the only arm that ran (eval {t.metric} {best:.4f})."
    tied = [n for m, n, _ in means if m == best]
    if len(tied) > 1:
        return (f"Verdict ({t.name}): no best arm on held-out {t.metric}: {', '.join(tied)} tie at {best:.4f}"
                + (" (one seed: no spread between seeds was measured)." if len(ev) < 2 else "."))
    second, other, ev2 = means[1]
    lead = best - second
    head = (f"Verdict ({t.name}): best on held-out {t.metric} is {name} ({best:.4f}), "
            f"{lead:.4f} ahead of {other} ({second:.4f}); ")
    if len(ev) < 2 or len(ev2) < 2:
        return head + ("one seed, so no spread between seeds was measured: run --seeds 3 or more "
                       "before acting on this lead.")
    spread = max(_std(ev), _std(ev2))
    if lead > spread:
        return head + f"the lead exceeds the spread between seeds ({spread:.4f}, {len(ev)} seeds)."
    return head + (f"the lead is within the spread between seeds ({spread:.4f}, {len(ev)} seeds): "
                   "no clear winner.")


def auto_norm_bar(res: TaskResult) -> tuple[bool, str]:
    """LoRA-DA auto-norm's logged training loss ≤ PEFT default's at every logged step, every seed."""
    a, d = res.runs.get("LoRA-DA auto-norm"), res.runs.get("PEFT default")
    if not a or not d:
        return False, "auto-norm or the PEFT default arm was not run"
    fails = []
    for ra, rd in zip(a, d):
        for p, la, ld in zip(log_steps(res.steps), logged(ra.losses, res.steps), logged(rd.losses, res.steps)):
            if la > ld:
                fails.append(f"seed {ra.seed} step {p}: {la:.4f} > {ld:.4f}")
    ok = not fails
    return ok, ("PASS" if ok else "FAIL: " + "; ".join(fails[:8]) + (" …" if len(fails) > 8 else ""))


def plot(results: list[TaskResult], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results):
        w = max(1, res.steps // 20)
        for name, rs in res.runs.items():
            mean = [sum(r.losses[i] for r in rs) / len(rs) for i in range(res.steps)]
            sm = [sum(mean[max(0, i - w + 1):i + 1]) / len(mean[max(0, i - w + 1):i + 1]) for i in range(res.steps)]
            ax.plot(range(1, res.steps + 1), sm, label=name, lw=2.2 if name.startswith("LoRA-DA") else 1.2,
                    ls="-" if name.startswith("LoRA-DA") else "--")
        ax.set_title(f"{res.task.name} (mean of {len(next(iter(res.runs.values())))} seeds, window {w})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_comparison(tasks, *, seeds, lrs, steps, out_dir, methods=None, device="cpu", log=print,
                   sensitivity=SENSITIVITY_GAMMAS, only=None, command=None, internal_checks=True) -> list[TaskResult]:
    """Compare on each task; writes ``results.md`` and ``loss_curves.png`` in ``out_dir``.

    ``results.md`` opens with ``command`` (when given), each task's model, data and sizes
    (``Task.about``), and ends each task with :func:`verdict`. ``internal_checks`` adds the
    benchmark's own auto-norm bar (benches/bench_quality.py), which ``lora-da compare`` leaves out."""
    os.makedirs(out_dir, exist_ok=True)
    methods = methods if methods is not None else available_methods(log)
    if only:
        methods = [m for m in methods if m.name in only]
    results = []

    def write():
        md = []
        if command:
            md += ["Command:", "", f"    {command}", ""]
        md += [f"Device: {device}; seeds {list(seeds)}; lrs {list(lrs)}; {steps} steps", ""]
        for res in results:
            if res.task.about:
                md += [f"{res.task.name}:", ""] + [f"- {k}: {v}" for k, v in res.task.about.items()] + [""]
            md += [markdown(res), "", verdict(res), ""]
            if internal_checks:
                ok, msg = auto_norm_bar(res)
                md += [f"auto-norm bar (≤ PEFT default at every logged step, every seed): {msg}", ""]
        text = "\n".join(md)
        Path(out_dir, "results.md").write_text(text + "\n", encoding="utf-8")
        return text

    for task in tasks:
        results.append(compare_task(task, methods, seeds=seeds, lrs=lrs, steps=steps, device=device, log=log,
                                    sensitivity=sensitivity))
        write()  # after each task: a run stopped by a time limit keeps the tasks it finished
    text = write()
    log(text)
    try:
        plot(results, Path(out_dir, "loss_curves.png"))
        log(f"[compare] wrote {Path(out_dir, 'results.md')} and {Path(out_dir, 'loss_curves.png')}")
    except ImportError as e:  # the table is the result; a machine without matplotlib still gets it
        log(f"[compare] wrote {Path(out_dir, 'results.md')}; no plot ({e})")
    return results
