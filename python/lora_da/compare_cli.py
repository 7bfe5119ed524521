"""``lora-da compare``: the issue-13 comparison of LoRA initializations on the user's own local
sequence-classification model and ``text<TAB>label`` data (no downloads). Kept apart from
:mod:`lora_da.compare` so that building the CLI parser does not import torch."""

from __future__ import annotations


def add_subcommand(sub) -> None:
    p = sub.add_parser("compare", help="fine-tune a local classifier under several LoRA inits and compare them")
    p.add_argument("--model", required=True, help="local model directory (AutoModelForSequenceClassification)")
    p.add_argument("--data", required=True, help="text<TAB>integer-label lines (--vader: the VADER lexicon)")
    p.add_argument("--vader", action="store_true", help="--data is vader_lexicon.txt (label: mean valence > 0)")
    p.add_argument("--target-modules", nargs="+", default=["query", "key", "value", "dense"])
    p.add_argument("--train", type=int, default=1024, help="training rows (default 1024)")
    p.add_argument("--select", type=int, default=256, help="held-back rows that choose lr and scale (default 256)")
    p.add_argument("--eval", type=int, default=1024, help="reported evaluation rows (default 1024)")
    p.add_argument("--calib", type=int, default=256, help="calibration rows, a prefix of the training rows")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 5e-4, 2e-3])
    p.add_argument("--methods", nargs="+", default=None, help="only these arms (names as printed in the table)")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the LoRA-DA γ-sensitivity table")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="lora_da_compare", help="directory for results.md and loss_curves.png")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    import torch

    from lora_da import compare

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = compare.read_label_rows(args.data, vader=args.vader)
    task = compare.classification_task(args.model, rows, n_train=args.train, n_select=args.select, n_eval=args.eval,
                                       n_calib=min(args.calib, args.train), target_modules=args.target_modules,
                                       device=device)
    compare.run_comparison([task], seeds=list(range(args.seeds)), lrs=args.lrs, steps=args.steps, out_dir=args.out,
                           device=device, only=args.methods,
                           sensitivity=() if args.no_sensitivity else compare.SENSITIVITY_GAMMAS)
    return 0
