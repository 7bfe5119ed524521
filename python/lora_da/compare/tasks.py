"""The tasks a comparison fine-tunes on: a model, its data splits and how a run is scored.

A :class:`Task` is what every arm of :mod:`lora_da.compare` shares: the same base
weights for a seed, the same training batches in the same order, the calibration
batches an initialization may read, a held-back split that chooses lr and scale, and
the reported evaluation split. Two are built here: a sequence classifier from a local
model directory (:func:`classification_task`, what ``lora-da compare`` runs) and a
tiny Llama pretrained on additions and adapted to subtractions (:func:`lm_task`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


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
    # what an arm computed once per seed from the calibration batches (statistics and a solve), reused by
    # every lr and scale of that seed: {key: (unit weights, seconds, peak MiB)} (lora_da.compare.arms)
    solved: dict = field(default_factory=dict, repr=False, compare=False)


def _dev(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -- sequence classification ---------------------------------------------------------------------------


def read_label_rows(path, *, vader: bool = False) -> list[tuple[str, int]]:
    """``text<TAB>label`` lines; with ``vader`` the VADER lexicon (label 1 iff mean valence > 0); a
    ``.jsonl``/``.json``/``.ndjson`` file is read as the other commands read it (``{"text", "label"}``
    per line, each line checked). A label must be a class index 0..K-1 (K ≤ ``MAX_LABELS``): any
    other (``1.5``, ``pos``, ``-1``, ``99999999999``) is refused naming the file and line, not
    skipped; a first line whose label field is ``label`` is a header."""
    from lora_da.data import MAX_LABELS

    if not vader and Path(path).suffix.lower() in (".jsonl", ".json", ".ndjson"):
        from lora_da.data import read_data

        texts, labels = read_data(str(path), "seq-cls")
        if labels and max(labels) >= MAX_LABELS:
            raise ValueError(f"{path}: label {max(labels)} asks for a {max(labels) + 1}-way classification head; "
                             f"labels must be class indices 0..K-1 with K ≤ {MAX_LABELS}")
        return list(zip(texts, labels))
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if vader:
            try:
                rows.append((parts[0], 1 if float(parts[1]) > 0 else 0))
            except ValueError:
                continue
            continue
        field = parts[1].strip()
        if i == 1 and field.lower() == "label":
            continue
        try:
            lab = int(field) if field.lstrip("+-").isdigit() else None
        except ValueError:
            lab = None
        if lab is None:
            raise ValueError(f"{path}:{i}: label {field[:40]!r} is not a class index; labels are integers 0..K-1 "
                             "(map names or scores to class indices first)")
        if lab < 0:  # a class index; a negative one ended in a StopIteration deep in the split
            raise ValueError(f"{path}:{i}: label {lab} is negative; labels are class indices 0..K-1")
        if lab >= MAX_LABELS:  # max + 1 classes: a huge label ended in a MemoryError
            raise ValueError(f"{path}:{i}: label {lab} asks for a {lab + 1}-way classification head; labels must be "
                             f"class indices 0..K-1 with K ≤ {MAX_LABELS}")
        rows.append((parts[0], lab))
    return rows


def label_batches(tokenizer, rows, batch_size: int, *, max_length: int, device=None) -> list[dict]:
    """Classification batches of ``(text, label)`` rows, in their order, each text cut at ``max_length`` tokens
    and padded to the longest of its batch; on ``device`` when given."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = tokenizer([w for w, _ in chunk], padding="longest", truncation=True, max_length=max_length,
                        return_tensors="pt")
        b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor([lab for _, lab in chunk], dtype=torch.long)}
        out.append(b if device is None else _dev(b, device))
    return out


@torch.no_grad()
def evaluate_classifier(model, batches) -> dict:
    """Mean cross-entropy (``loss``) and accuracy (``metric``) over ``batches``."""
    model.eval()
    loss = correct = n = 0.0
    for b in batches:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
        loss += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
        correct += float((logits.argmax(-1) == b["labels"]).sum())
        n += b["labels"].shape[0]
    return {"loss": loss / n, "metric": correct / n}


def classifier_lora_config(target_modules):
    """rsLoRA r = 8, α = 16 on ``target_modules``, the head trained in full: every classification arm's adapter."""
    from peft import LoraConfig, TaskType

    return LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0, target_modules=list(target_modules),
                      task_type=TaskType.SEQ_CLS, modules_to_save=["classifier"])


def classification_task(model_dir, rows, *, n_train, n_select, n_eval, n_calib, batch=32, max_length=16,
                        target_modules=("query", "key", "value", "dense"), device="cpu", name=None) -> Task:
    """Sequence classification from a local model directory with a fresh seeded head."""
    import random

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
        return label_batches(tok, rs, bs, max_length=max_length, device=device)

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

    def train(seed):
        if ("train", seed) not in cache:  # tokenized once per seed; every arm gets this same list
            rs = list(train_rows)
            random.Random(seed).shuffle(rs)
            cache["train", seed] = batches(rs, batch)
        return cache["train", seed]

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
    return Task(name or f"{Path(model_dir).name} classification", base, lambda: classifier_lora_config(target_modules),
                train, calib=batches(train_rows[:n_calib], batch), select=batches(select_rows, 128),
                eval=batches(eval_rows, 128), evaluate=evaluate_classifier, metric="accuracy", n_pop=n_train,
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
