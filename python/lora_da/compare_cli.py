"""``lora-da compare``: the comparison of LoRA initializations that benches/bench_quality.py runs, on
the user's own local sequence-classification model and data (``text<TAB>label`` lines, or the JSONL
the other commands read; no downloads). Kept apart from :mod:`lora_da.compare` so that building the
CLI parser does not import torch."""

from __future__ import annotations

import argparse
import shlex
import warnings

# the options results.md records, in the order the parser declares them
_RECORDED = ("model", "data", "vader", "target_modules", "train", "select", "eval", "calib", "seeds", "steps", "lrs",
             "methods", "no_sensitivity", "device", "out")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, except None and False: a required option, a flag, or
    one whose help says what happens without it ("(default: None)" said nothing)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_subcommand(sub) -> None:
    p = sub.add_parser("compare", help="fine-tune a local classifier under several LoRA inits and compare them",
                       formatter_class=_Defaults,
                       description="Fine-tune one local classifier under several LoRA initializations (same data, "
                                   "steps and search budget) and compare them on held-out rows; ends with a verdict.")
    p.add_argument("--model", required=True, help="local model directory (AutoModelForSequenceClassification)")
    p.add_argument("--data", required=True,
                   help="JSONL with 'text' and integer 'label' per line (as the other commands), or text<TAB>label "
                        "lines (--vader: the VADER lexicon)")
    p.add_argument("--vader", action="store_true", help="--data is vader_lexicon.txt (label: mean valence > 0)")
    p.add_argument("--target-modules", nargs="+", default=["query", "key", "value", "dense"], help="LoRA targets")
    p.add_argument("--train", type=int, default=1024, help="training rows")
    p.add_argument("--select", type=int, default=256, help="held-back rows that choose lr and scale")
    p.add_argument("--eval", type=int, default=1024, help="reported evaluation rows")
    p.add_argument("--calib", type=int, default=256, help="calibration rows, a prefix of the training rows")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (one seed measures no spread)")
    p.add_argument("--steps", type=int, default=100, help="training steps per run")
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 5e-4, 2e-3], help="learning rates searched")
    p.add_argument("--methods", nargs="+", default=None,
                   help="only these arms, by the names the table prints (default: every arm the installed PEFT has)")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the LoRA-DA γ-sensitivity table")
    p.add_argument("--device", default=None, help="cuda if available, else cpu, when not given")
    p.add_argument("--out", default="lora_da_compare", help="directory for results.md and loss_curves.png")
    p.set_defaults(func=cmd_compare)


def command_line(args) -> str:
    """The command with every option it ran with (defaults included), for results.md."""
    words = ["lora-da", "compare"]
    for key in _RECORDED:
        v = getattr(args, key, None)
        flag = "--" + key.replace("_", "-")
        if v is None or v is False:
            continue
        if v is True:
            words.append(flag)
        elif isinstance(v, list):
            words += [flag, *map(str, v)]
        else:
            words += [flag, str(v)]
    return shlex.join(words)


def cmd_compare(args) -> int:
    import torch

    from lora_da import compare
    from lora_da.errors import UsageError

    methods = compare.available_methods()  # prints a note for each arm the installed PEFT lacks
    if args.methods:
        known = [m.name for m in methods]
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            raise UsageError(f"--methods: unknown arm(s) {unknown}; the arms are: " + ", ".join(repr(k) for k in known))
    if args.seeds < 1:
        raise UsageError(f"--seeds must be ≥ 1, got {args.seeds}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = compare.read_label_rows(args.data, vader=args.vader)
    task = compare.classification_task(args.model, rows, n_train=args.train, n_select=args.select, n_eval=args.eval,
                                       n_calib=min(args.calib, args.train), target_modules=args.target_modules,
                                       device=device)
    # in place: the task fills in the model's parameter count once it has loaded it
    rest = dict(task.about)
    task.about.clear()
    task.about.update({"data": f"{args.data} ({len(rows)} labeled rows{', VADER lexicon' if args.vader else ''})",
                       **rest})
    with warnings.catch_warnings():
        _poor_init_as_lines()
        compare.run_comparison([task], seeds=list(range(args.seeds)), lrs=args.lrs, steps=args.steps,
                               out_dir=args.out, device=device, only=args.methods, methods=methods,
                               command=command_line(args), internal_checks=False,
                               sensitivity=() if args.no_sensitivity else compare.SENSITIVITY_GAMMAS)
    return 0


def _poor_init_as_lines() -> None:
    """Within the caller's ``warnings.catch_warnings()``: each :class:`~lora_da.quality.PoorInitWarning`
    an arm raises is printed as one ``lora-da: warning: ...`` line on stdout, as the other commands
    say it, not as Python's warning with a source line; the same message once."""
    from lora_da.quality import PoorInitWarning

    shown = warnings.showwarning
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, PoorInitWarning):
            return shown(message, category, filename, lineno, file, line)
        text = str(message).removeprefix("lora-da: ")
        if text not in said:
            said.add(text)
            print(f"lora-da: warning: {text}", flush=True)

    warnings.simplefilter("always", PoorInitWarning)  # "once" is ours above, whatever the caller's filters say
    warnings.showwarning = show
