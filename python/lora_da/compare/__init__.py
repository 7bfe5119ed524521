"""Fine-tune one model under several LoRA initializations and compare them fairly.

Every arm starts from a deep copy of the same base model (same head seed),
sees the same training batches in the same order, the same optimizer and the
same number of steps; each arm gets the same search budget over the learning
rate and over its own scale (γ) where it has one (a coordinate search: every scale at the middle lr, then
every lr at the best scale), chosen on a held-back split
that is neither the training nor the reported evaluation set.

Modules, in the order of a run: :mod:`~lora_da.compare.tasks` (the models, data splits
and scores), :mod:`~lora_da.compare.arms` (the initializations compared),
:mod:`~lora_da.compare.harness` (seeds, the training loop, timing, peak memory, the
search) and :mod:`~lora_da.compare.report` (the tables, verdicts and figure it writes).
``benches/bench_quality.py`` and ``lora-da compare`` drive :func:`run_comparison`.
"""

from lora_da.compare.arms import (
    AUTO_NORM_RHO,
    GAMMA_GRID,
    SENSITIVITY_GAMMAS,
    ArmSetup,
    Method,
    auto_norm_gammas,
    available_methods,
    init_corda,
    init_default,
    init_eva,
    init_gaussian,
    init_lora_da,
    init_lora_da_authors,
    init_lora_da_auto,
    init_lora_da_beta0,
    init_lora_ga,
    init_lora_one,
    init_pissa,
    peft_model,
)
from lora_da.compare.harness import (
    Run,
    TaskResult,
    compare_task,
    run_comparison,
    run_one,
)
from lora_da.compare.report import (
    auto_norm_bar,
    log_steps,
    logged,
    markdown,
    plot,
    verdict,
)
from lora_da.compare.tasks import Task, classification_task, lm_task, read_label_rows

__all__ = ["AUTO_NORM_RHO", "GAMMA_GRID", "SENSITIVITY_GAMMAS", "ArmSetup", "Method", "Run", "Task", "TaskResult",
           "auto_norm_bar", "auto_norm_gammas", "available_methods", "classification_task", "compare_task",
           "init_corda", "init_default", "init_eva", "init_gaussian", "init_lora_da", "init_lora_da_authors",
           "init_lora_da_auto", "init_lora_da_beta0", "init_lora_ga", "init_lora_one", "init_pissa", "lm_task",
           "log_steps", "logged", "markdown", "peft_model", "plot", "read_label_rows", "run_comparison", "run_one",
           "verdict"]
