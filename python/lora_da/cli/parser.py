"""The ``lora-da`` command line: its parser and :func:`main`.

Subcommands::

    lora-da collect MODEL_DIR DATA --out STATS.safetensors   # one pass → statistics file
    lora-da solve STATS --n-pop N --out OUT                  # statistics → PEFT adapter / state dict
    lora-da init MODEL_DIR DATA --n-pop N --out OUT          # collect, then solve
    lora-da report STATS_OR_OUTDIR                           # per-module diagnostics table
    lora-da demo                                             # offline demo (MiniLM + VADER lexicon)
    lora-da compare ...                                      # LoRA-DA against other inits (lora_da.compare_cli)
    lora-da conformance ...                                  # the conformance kit (lora_da.conformance)

User errors print one line, ``lora-da: error: ...``, on stderr and give a
non-zero exit status; outputs are written to a temporary path in the same
directory and renamed into place, so a failure leaves no partial output.
Building the parser imports no heavy library (torch, transformers, peft).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_da.cli.commands import cmd_collect, cmd_demo, cmd_init, cmd_report, cmd_solve
from lora_da.errors import CLIError, LoraDAError

PROG = "lora-da"


def positive_int(name):
    def conv(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {v}")
        return v

    return conv


def gamma_arg(s: str):
    if s == "auto":
        return s
    try:
        return float(s)  # its range is the core's to check (_validate_solve_options), like every other option's
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gamma must be a number or 'auto', got {s!r}") from None


def number(s: str):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    return int(v) if v.is_integer() else v


def _add_collect_args(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face model directory")
    p.add_argument("data", metavar="DATA", help="JSONL file ('text' [+ 'label']) or .txt file (one sample a line)")
    p.add_argument("--targets", default="all-linear", help="comma-separated module names/suffixes, or all-linear (default)")
    p.add_argument("--max-samples", type=positive_int("--max-samples"), default=256, help="calibration samples (default 256)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=4, help="samples per batch (default %(default)s)")
    p.add_argument("--max-length", type=positive_int("--max-length"), default=128,
                   help="tokens per sample, longer ones cut (default %(default)s)")
    p.add_argument("--token-mask", choices=["attention", "labels"], default="attention",
                   help="the tokens whose statistics count: every attended one, or those with a next-token label "
                        "(default %(default)s)")
    p.add_argument("--task", choices=["causal-lm", "seq-cls"], default=None,
                   help="default: seq-cls when the data have 'label' fields, causal-lm when neither they have "
                        "labels nor the model is a classifier (anything else asks for the flag)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of what the model initializes itself (a classification head; default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--num-labels", type=positive_int("--num-labels"), default=None,
                   help="seq-cls: the number of classes (default: the model's own head, else max label + 1 over the "
                        "whole data file)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint the pass here (default: none); rerunning the same command resumes it after an "
                        "interruption, or returns the finished pass")
    p.add_argument("--checkpoint-every", type=positive_int("--checkpoint-every"), default=8, metavar="N",
                   help="with --checkpoint: write it every N batches (default 8)")


def _add_solve_args(p, *, n_pop_required: bool) -> None:
    p.add_argument("--n-pop", type=number, required=n_pop_required, default=None, help="size of the fine-tuning set")
    p.add_argument("--rank", type=int, default=8, help="LoRA r (default %(default)s)")
    from lora_da._core import SOLVE_DEFAULTS  # the core's defaults, their one source

    p.add_argument("--alpha", type=float, default=SOLVE_DEFAULTS["alpha"], help="bias weight α (default %(default)g)")
    p.add_argument("--beta", type=float, default=SOLVE_DEFAULTS["beta"], help="variance weight β (default %(default)g)")
    p.add_argument("--damping", type=float, default=SOLVE_DEFAULTS["damping"], help="damping λ of Z (default %(default)g)")
    p.add_argument("--gamma", type=gamma_arg, default=SOLVE_DEFAULTS["gamma"],
                   help="scale γ (default %(default)g, the published value for 7B models; smaller models usually want "
                        "1-64): a number, or 'auto' (init only) to choose it on held-back data")
    p.add_argument("--no-normalize", action="store_true", help="do not normalize Δ by its spectral norm")
    p.add_argument("--method", choices=["auto", "krylov", "dense"], default=SOLVE_DEFAULTS["method"],
                   help="eigensolver route (default %(default)s)")
    p.add_argument("--solve-device", default="auto",
                   help="where to solve: auto (a CUDA GPU when there is one, else the host), host (the Rust core "
                        "and LAPACK), or a torch device such as cuda:1 (float64 on that device)")


def _add_output_args(p) -> None:
    p.add_argument("--out", required=True, help="output: adapter directory (peft) or .safetensors file (state-dict)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="PEFT's lora_alpha (default %(default)g)")
    p.add_argument("--rslora", action="store_true", help="rsLoRA scaling lora_alpha/sqrt(r)")
    p.add_argument("--format", choices=["peft", "state-dict"], default="peft",
                   help="a PEFT adapter folder or one .safetensors state dict (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _add_common(p) -> None:
    p.add_argument("--output-fisher", choices=["diagonal", "sequence_lowrank"], default=None,
                   help="output-side Fisher (default: the statistics' own, else diagonal)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="LoRA-DA initialization for PEFT LoRA adapters.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("collect", help="collect the K-FAC statistics of a model on calibration data")
    _add_collect_args(p)
    p.add_argument("--out", required=True, help="statistics file (.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("solve", help="compute the LoRA-DA init from a statistics file")
    p.add_argument("stats", metavar="STATS", help="statistics file from 'lora-da collect'")
    _add_solve_args(p, n_pop_required=True)
    _add_output_args(p)
    p.add_argument("--task", choices=["causal-lm", "seq-cls"], default=None, help="PEFT task type (default: from the statistics)")
    _add_common(p)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("init", help="collect, then solve")
    _add_collect_args(p)
    _add_solve_args(p, n_pop_required=True)
    _add_output_args(p)
    p.add_argument("--save-stats", default=None, metavar="PATH", help="also save the statistics here")
    _add_common(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("report", help="print per-module diagnostics (from an output dir, a report .json, or statistics)")
    p.add_argument("path", metavar="STATS_OR_OUTDIR")
    _add_solve_args(p, n_pop_required=False)
    p.add_argument("--plot", default=None, metavar="PNG", help="write a plot of each module's bottom eigenvalues")
    _add_common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="offline demo: MiniLM on the VADER lexicon, PEFT default init vs LoRA-DA")
    p.add_argument("--samples", type=positive_int("--samples"), default=256, help="training/calibration words (default 256)")
    p.add_argument("--eval-samples", type=positive_int("--eval-samples"), default=1000, help="held-out words (default 1000)")
    p.add_argument("--steps", type=positive_int("--steps"), default=60)
    p.add_argument("--gamma", default="auto", help="'auto' (search) or a number")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    from lora_da.compare_cli import add_subcommand as add_compare  # its own module: the parser stays light

    add_compare(sub)
    from lora_da.conformance.command import add_subcommand as add_conformance  # its own package, also run alone

    add_conformance(sub)
    return parser


def main(argv=None) -> int:
    """Run one ``lora-da`` command; its exit status: 0, 1 after a one-line error, 2 on a
    usage error, 130 when interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return int(args.func(args) or 0)
    except (LoraDAError, CLIError, ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return e.exit_code if isinstance(e, CLIError) else 1
    except KeyboardInterrupt:
        ck = getattr(args, "checkpoint", None)
        again = f"; rerun the same command to resume from {ck}" if ck and Path(ck).exists() else ""
        print(f"{PROG}: interrupted{again}", file=sys.stderr)
        return 130
